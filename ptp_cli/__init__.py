"""ptp: batch inference for InternVL2 with Pyramid Token Pruning."""

__version__ = "0.1.0"
