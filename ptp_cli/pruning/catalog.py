"""The pruning methods and presets by name, with what each method needs: the registry, readable without torch.

A method is declared once here: its name, the line ``ptp methods`` shows, where its class is, and its
capabilities. Its class (in a module that imports torch) declares the same capabilities as class attributes,
which the engine and the commands read; ``method_class`` refuses a class that disagrees with its entry, and
``tests/test_pruning.py`` loads every one. So ``--method`` is checked, and ``ptp methods`` answers, before torch
loads, and no code infers what a method does from its output or from what importing it registered.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from importlib import import_module
from typing import Any


@dataclass(frozen=True)
class Capabilities:
    """What a method needs from the engine and where it acts; each is also a class attribute of the method."""

    uses_ratio: bool = True  # --ratio sets how many visual tokens it drops (False: it ignores --ratio)
    needs_vit_scores: bool = False  # may read the ViT's CLS->patch attention (``vit_score_layer``)
    needs_probe: bool = False  # may run the instruction probe through the first LLM layers (``probe_layer``)
    prunes_in_llm: bool = False  # drops tokens between LLM layers during prefill (``drop_layers``, ``after_layer``),
    # so the engine runs the LLM layer by layer; False: it prunes before the LLM (``select``) or not at all
    prunes_in_vit: bool = False  # can also drop patch blocks inside the ViT (--vit-prune: ``vit_prune_layer``,
    # ``vit_select``), then choose its final tokens among the survivors
    retiles: bool = False  # the input step re-tiles the image to fewer tiles that fit the budget (``tiles``)

    @classmethod
    def of(cls, method: type) -> Capabilities:
        """The capabilities a method class declares."""
        return cls(**{f.name: getattr(method, f.name) for f in fields(cls)})


@dataclass(frozen=True)
class MethodEntry:
    summary: str  # one line, for `ptp methods`
    implementation: str  # "module:Class", imported when the method is built
    capabilities: Capabilities


_PRE_LLM = "ptp_cli.pruning.baselines"
_DOWNSAMPLE = "ptp_cli.pruning.downsample"
_IN_LLM = "ptp_cli.pruning.inllm"
_IN_LLM_ONLY = Capabilities(uses_ratio=False, prunes_in_llm=True)

METHODS: dict[str, MethodEntry] = {
    "none": MethodEntry("Every visual token reaches every layer.", "ptp_cli.pruning.base:NoPruning",
                        Capabilities(uses_ratio=False)),
    "ptp": MethodEntry("Score = (1 - alpha) * minmax(s) + alpha * minmax(c) per tile; keep the top b_i tokens of "
                       "tile i.", "ptp_cli.pruning.ptp:PTP",
                       Capabilities(needs_vit_scores=True, needs_probe=True, prunes_in_vit=True)),
    "random": MethodEntry("K = round((1 - ratio) * N) tokens uniformly at random over all tiles of the sample.",
                          f"{_PRE_LLM}:RandomPruning", Capabilities(prunes_in_vit=True)),
    "spatial": MethodEntry("Per tile, a regular grid of b_i tokens; b_i are PTP's budgets (CLS-similarity regions, "
                           "or uniform).", f"{_PRE_LLM}:SpatialPruning", Capabilities(prunes_in_vit=True)),
    "pool": MethodEntry("Per tile, b_i groups of neighbouring tokens averaged into one each (2x1 at ratio 0.5, 2x2 at "
                        "0.75), at the group's first token; uniform b_i summing to K.", f"{_DOWNSAMPLE}:PoolPruning",
                        Capabilities()),
    "tiles": MethodEntry("Fewer tiles: the image re-tiled with the most tiles (thumbnail kept) whose tokens fit K; one "
                         "view over K is pooled down to it.", f"{_DOWNSAMPLE}:TilesPruning",
                         Capabilities(retiles=True)),
    "fastv": MethodEntry("After layer K_f, keep the (1 - ratio) visual tokens with the most mean attention received "
                         "at layer K_f - 1.", f"{_IN_LLM}:FastV", Capabilities(prunes_in_llm=True)),
    "vtw": MethodEntry("Visual Token Withdrawal: no visual token after layer K_w (default half the layers).",
                       f"{_IN_LLM}:VTW", _IN_LLM_ONLY),
    "pdrop": MethodEntry("After each stage layer, keep pdrop_keep of the remaining visual tokens, ranked by the last "
                         "prompt token's attention at that layer.", f"{_IN_LLM}:PyramidDrop", _IN_LLM_ONLY),
}

# How the kept visual tokens of a pre-LLM method are numbered for RoPE (``PruneConfig.positions``).
POSITION_MODES = ("original", "contiguous")

# Named starting points (the paper's findings): the settings each changes from PruneConfig's defaults.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "ocr": {"alpha": 0.2, "vit_layer": 2},  # OCR/charts: more s, an early ViT layer
    "scene": {"alpha": 0.8},  # open scene questions: more instruction guidance
}


def method_class(name: str) -> type:
    """The class of method ``name`` (importing its module, and torch); TypeError when the class does not
    declare what its entry says."""
    module, _, attribute = METHODS[name].implementation.partition(":")
    cls = getattr(import_module(module), attribute)
    if cls.name != name or Capabilities.of(cls) != METHODS[name].capabilities:
        raise TypeError(f"{cls.__qualname__} (name {cls.name!r}, {Capabilities.of(cls)}) does not match the "
                        f"catalog's entry {name!r} ({METHODS[name].capabilities})")
    return cls
