"""The peer ``--engine vllm`` asks for, vLLM's own multimodal InternVL2 unpruned, and its stand-in.

vLLM's own InternVL2 is not a row. The original layout (``InternVLChatModel``) needs the checkpoint's remote
configuration code: transformers does not know ``model_type: internvl_chat``. The -hf layout
(``InternVLForConditionalGeneration``, ``save_hf_layout``) needs no remote code, but vLLM's class for it imports
transformers' torchvision-backed image and video processors, and vLLM's CPU build has no torchvision that
loads (README, 'Engines'). So the report says why (``unavailable_reason``, the import error where there is
one) and compares the vLLM rows with ``vllm none``, vLLM generating from ptp's unpruned embeddings, which
stands in for "what a vLLM user runs today".
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence

from ptp_cli.bench.measurement import Stat

VLLM_PEER = "vllm-internvl"  # the row it would be
STAND_IN = "vllm none"  # the row that stands in for it
# Where vLLM (0.32) keeps the class it serves the -hf layout's InternVLForConditionalGeneration with.
HF_INTERNVL_MODULE = "vllm.model_executor.models.interns1"


def unavailable_reason() -> str:
    """Why vLLM's own InternVL2 is not a row on this machine, in one sentence."""
    try:
        importlib.import_module(HF_INTERNVL_MODULE)
    except Exception as e:  # ImportError mostly; any failure at import means vLLM cannot serve the -hf layout
        return (f"vLLM's InternVLForConditionalGeneration (the -hf layout, no remote code) does not import here "
                f"({type(e).__name__}: {e}), and the original layout needs the checkpoint's remote code")
    return ("vLLM's InternVLForConditionalGeneration imports here, but ptp bench does not run it yet "
            "(docs/benchmarks.md, 'Rows')")


def paired_vs_stand_in(vs_none: Mapping[str, Sequence[float]]) -> dict[str, Stat]:
    """Each vLLM row over the stand-in, round by round through the same none runs: (row / none) / (vllm none /
    none), the way the transformers column pairs. ``vs_none``: per row, its paired ratios to none by round."""
    base = vs_none[STAND_IN]
    return {name: Stat.of([a / b for a, b in zip(ratios, base, strict=True)])
            for name, ratios in vs_none.items() if name.startswith("vllm ") and name != STAND_IN}
