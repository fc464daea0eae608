"""From a record to an engine request: images loaded and tiled (``image``), prompts and spans (``inputs``)."""
