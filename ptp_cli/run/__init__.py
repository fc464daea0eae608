"""The run: the pipeline over records, the engines (ptp's and vLLM's), failures, devices, caches, FLOPs, Ray."""
