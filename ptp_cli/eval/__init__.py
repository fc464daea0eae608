"""Accuracy of ptp's answers against gold records: metrics, scoring, the report, and the (method, ratio) grid.

``grid`` imports the pipeline (and torch); the other modules do not, so scoring existing predictions is fast.
"""
