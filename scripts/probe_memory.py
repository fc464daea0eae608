"""Peak memory of PTP's instruction probe against question length, in row chunks (as ptp runs it) or one block.

    python scripts/probe_memory.py [--shape tiny|internvl2-1b|internvl2-2b] [--tokens 100,2000,20000]

Each case runs in a fresh process (so ``ru_maxrss`` is its own high-water mark): an LLM of the shape's widths
with only the layers the probe runs (0..llm_layer), one tile of visual tokens and a question of N tokens, then
``instruction_scores`` once. Reported: the peak resident memory the probe added over what was resident before it.
``--block`` reproduces ptp before the chunking (every instruction row against every key at once); a case that
cannot allocate under ``--limit-gb`` says so instead of taking the machine down.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys

LLM_LAYER = 1  # PTP's default probe layer (the LLM's second decoder layer)


def one_case(shape: str, tokens: int, block: bool, limit_gb: float) -> dict:
    resource.setrlimit(resource.RLIMIT_AS, (int(limit_gb * 2**30), resource.RLIM_INFINITY))
    import torch

    from ptp_cli.builders.tiny import TINY
    from ptp_cli.config import SHAPES
    from ptp_cli.models.llm import LLM
    from ptp_cli.pruning.scores import instruction_scores

    cfg = TINY.llm if shape == "tiny" else SHAPES[shape].llm
    cfg = dataclasses.replace(cfg, num_layers=LLM_LAYER + 1, vocab_size=max(cfg.vocab_size, 1000))
    torch.manual_seed(0)
    lm = LLM(cfg).eval()
    head, visual, tail = 20, 256, 5
    s = head + visual + tokens + tail
    x = torch.randn(1, s, cfg.hidden_size) * 0.5  # [1, S, D]
    valid = torch.ones(1, s, dtype=torch.bool)
    positions = torch.arange(s)[None]
    instruction = torch.zeros(1, s, dtype=torch.bool)
    instruction[0, head + visual : head + visual + tokens] = True
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kw = {"chunk_elements": 1 << 62} if block else {}
    try:
        instruction_scores(lm, x, positions, valid, instruction, layer=LLM_LAYER, **kw)
    except (RuntimeError, MemoryError) as e:
        return {"error": str(e).splitlines()[0][-160:]}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mb": round((peak - before) / 1024, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="tiny")
    ap.add_argument("--tokens", default="100,2000,20000")
    ap.add_argument("--block", action="store_true", help="one block of every row (ptp before the chunking)")
    ap.add_argument("--limit-gb", type=float, default=16.0, help="address-space cap of each case's process")
    ap.add_argument("--case", nargs=2, help=argparse.SUPPRESS)  # internal: run one case, print JSON
    a = ap.parse_args()
    if a.case:
        print(json.dumps(one_case(a.shape, int(a.case[1]), a.block, a.limit_gb)))
        return
    for n in (int(t) for t in a.tokens.split(",")):
        cmd = [sys.executable, __file__, "--shape", a.shape, "--limit-gb", str(a.limit_gb), "--case", a.shape, str(n)]
        out = subprocess.run(cmd + (["--block"] if a.block else []), capture_output=True, text=True, check=True)
        print(json.dumps({"shape": a.shape, "tokens": n, "block": a.block, **json.loads(out.stdout)}), flush=True)


if __name__ == "__main__":
    main()
