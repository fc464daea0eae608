"""Records in, rows out: JSONL parsing and error rows (``records``), ordered writing (``output``), resuming
(``resume``), the dry run (``dryrun``) and the drawing of what pruning kept (``show``)."""
