"""``run_bench``: build the model, the workload and the peer, time every row, and assemble the report.

``plan_bench`` says what a run will do before anything is built (``ptp bench`` prints it and refuses a
full-size model on a CPU unless forced).
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

import ptp_cli
from ptp_cli.bench.config import BenchConfig
from ptp_cli.bench.measurement import (
    PtpRunner,
    Runner,
    Stat,
    device_name,
    load_average,
    matmul_tflops,
    measure,
    paired_ratios,
    weights_bytes,
)
from ptp_cli.bench.peer import PEER, SHARE_WEIGHTS_MAX_PARAMS, PeerRunner, build_peer
from ptp_cli.bench.report import BenchReport, params_text, plural, si
from ptp_cli.bench.targets import evaluate
from ptp_cli.bench.vllm_peer import STAND_IN, VLLM_PEER, paired_vs_stand_in, unavailable_reason
from ptp_cli.bench.workload import (
    BenchModel,
    SyntheticEncoder,
    TokenIds,
    build_workload,
    load_bench_model,
    model_config,
)
from ptp_cli.config import ModelConfig
from ptp_cli.errors import UsageError
from ptp_cli.home import ptp_home
from ptp_cli.loading import canonical_shapes
from ptp_cli.preprocess.image import TilingOptions
from ptp_cli.pruning import PruneConfig, make_method, method_class, plan_grid
from ptp_cli.run.devices import dtype_name
from ptp_cli.run.engine import Engine, Request
from ptp_cli.run.flops import sample_flops
from ptp_cli.zoo import RANDOM_WEIGHTS, resolve_model

FULL_SIZE_PARAMS = 100_000_000  # from here on a model is "full-size": hours per batch on a CPU


def row_plan(config: BenchConfig, cfg: ModelConfig) -> list[tuple[str, PruneConfig]]:
    """(row name, settings) of every ptp row: none, then each method at each ratio (once if it ignores it)."""
    return [("none", PruneConfig(method="none")),
            *plan_grid(PruneConfig(), config.resolved_methods(), config.ratios, cfg, vit_prunes=config.vit_prunes)]


@dataclass(frozen=True)
class Plan:
    """What a run will do, known before any weight is built."""

    config: BenchConfig
    cfg: ModelConfig  # the model's config (a shape's, or the checkpoint's config.json)
    device: torch.device
    dtype: torch.dtype
    params: int  # parameters of the ptp model
    tiles: int  # tiles per image (thumbnail included)
    prompt_tokens: int  # per request, visual placeholders included
    rows: tuple[str, ...]  # every row's name, the peer's first when there is one
    flops: dict[str, int]  # analytic FLOPs of one unpruned sample, by stage and "total"

    @property
    def full_size(self) -> bool:
        return self.params >= FULL_SIZE_PARAMS

    @property
    def runs_per_round(self) -> int:
        """Timed batches per round: every row once, and none again between every two rows (``round_order``)."""
        return 2 * len(self.rows) - 1

    @property
    def batches(self) -> int:
        """Batches run in all (the peer's first-token calls not counted; pruned rows do less work)."""
        return len(self.rows) * self.config.warmup + self.runs_per_round * self.config.repeats

    def describe(self) -> str:
        c = self.config
        weights = "random weights" if c.model is None or c.model in RANDOM_WEIGHTS else "checkpoint weights"
        warm = f", after {plural(c.warmup, 'untimed batch')} per row" if c.warmup else ""
        return (f"about to run {c.source} ({params_text(self.params)}, {weights}) in {dtype_name(self.dtype)} on "
                f"{self.device}: batch {c.batch_size}, {plural(self.tiles, 'tile')} and {self.prompt_tokens} prompt tokens per "
                f"request, {c.new_tokens} new tokens; {len(self.rows)} rows, {plural(c.repeats, 'round')} of "
                f"{self.runs_per_round} timed batches (none between every two rows){warm}; about "
                f"{si(self.flops['total'], 'FLOP')} per unpruned sample, about "
                f"{si(self.flops['total'] * c.batch_size * self.batches, 'FLOP')} in all")

    def refuse_unless_forced(self, *, force: bool) -> None:
        """A full-size model on a CPU is a mistake far more often than a wish: ask for --force."""
        if self.device.type == "cpu" and self.full_size and not force:
            raise UsageError(
                f"{self.config.source} is a full-size model ({params_text(self.params)}): on a CPU this takes hours; "
                "use --model tiny for a quick run, run it on a GPU, or pass --force"
            )


def _retiled(config: BenchConfig, bench_model: BenchModel, prune: PruneConfig, dtype: torch.dtype) -> list[Request]:
    """The batch on the fewer tiles the ``tiles`` baseline reads the same image with."""
    return build_workload(config, bench_model.cfg, bench_model.ids, dtype=dtype, retile_ratio=prune.ratio).requests


def _vllm_runners(config: BenchConfig, bench_model: BenchModel, requests: list[Request], *, device: torch.device,
                  dtype: torch.dtype) -> list[Runner]:
    """The pre-LLM rows again, with vLLM generating from ptp's pruned embeddings (one vLLM for all of them;
    prefix caching off, so no row reuses another's prefill)."""
    from ptp_cli.run.vllm_engine import VLLMEngine, VLLMGenerator, view_key

    if config.model is not None:
        key = view_key(resolve_model(config.model), dtype)
    else:
        key = f"{config.source}-seed{config.seed}-{dtype_name(dtype)}"
    generator = VLLMGenerator(bench_model.model, view_dir=ptp_home() / "vllm" / key, seed=config.seed,
                              enforce_eager=device.type == "cpu", prefix_caching=False)
    runners: list[Runner] = []
    for name, prune in row_plan(config, bench_model.cfg):
        method = make_method(prune, bench_model.cfg)
        if method.prunes_in_llm:  # in-LLM methods run on ptp's engine only
            continue
        # vLLM numbers prompt embeddings 0..n-1: its rows run with contiguous positions (the cost is the same)
        method = make_method(dataclasses.replace(prune, positions="contiguous"), bench_model.cfg)
        engine = VLLMEngine(bench_model.model, image_token_id=bench_model.ids.image, method=method, generator=generator)
        rows = _retiled(config, bench_model, prune, dtype) if method.retiles else requests
        runners.append(PtpRunner(f"vllm {name}", engine, rows, device=device, own_weights=0,
                                 ratio=prune.ratio if method.uses_ratio else None))
    return runners


def plan_bench(config: BenchConfig) -> Plan:
    config.validate()
    device = config.resolved_device()
    dtype = config.resolved_dtype(device)
    cfg = model_config(config)
    rows = tuple(name for name, _ in row_plan(config, cfg))  # validates every method against the model
    if config.engine == "vllm":
        rows += tuple(f"vllm {name}" for name, p in row_plan(config, cfg)
                      if not method_class(p.method).prunes_in_llm)
    params = sum(math.prod(shape) for shape in canonical_shapes(cfg).values())
    tiles = TilingOptions.from_config(cfg, max_tiles=config.max_tiles).num_tiles(*config.image_size)
    visual = tiles * cfg.tokens_per_tile
    prompt = SyntheticEncoder(TokenIds.for_vocab(cfg.llm.vocab_size), question_tokens=config.question_tokens,
                              seed=config.seed)  # only the layout's length matters here
    prompt_tokens = len(prompt.encode(question="", num_image_tokens=visual).ids)
    flops = sample_flops(cfg, num_tiles=tiles, text_tokens=prompt_tokens - visual, kept_visual=visual,
                         generated=config.new_tokens).as_dict()
    return Plan(config=config, cfg=cfg, device=device, dtype=dtype, params=params, tiles=tiles,
                prompt_tokens=prompt_tokens, rows=((PEER,) if config.peer else ()) + rows, flops=flops)


def run_bench(config: BenchConfig, *, log: Callable[[str], None] | None = None) -> BenchReport:
    """Run every row of ``config`` in this process and return the report."""
    import transformers

    plan = plan_bench(config)
    say = log or (lambda _msg: None)
    device, dtype = plan.device, plan.dtype  # random weights and token ids come from generators seeded here

    say(f"building {config.source} ({dtype_name(dtype)} on {device})")
    bench_model = load_bench_model(config, dtype=dtype, device=device)
    cfg = bench_model.cfg
    workload = build_workload(config, cfg, bench_model.ids, dtype=dtype)
    requests, tiles = workload.requests, workload.tiles
    say(f"{plural(tiles, 'tile')} per image ({'with' if tiles > 1 else 'no'} thumbnail), "
        f"{workload.prompt_tokens} prompt tokens")

    matmul_before, matmul_n = matmul_tflops(device, dtype)
    say(f"dense matmul {matmul_n}^3: {si(1e12 * matmul_before, 'FLOP/s')}")
    ptp_weights = weights_bytes(bench_model.model)
    n_params = sum(p.numel() for p in bench_model.model.parameters())

    runners: list[Runner] = []
    share = config.peer and n_params <= SHARE_WEIGHTS_MAX_PARAMS
    if config.peer:
        peer = build_peer(bench_model, dtype=dtype, device=device, share_weights=share)
        runners.append(PeerRunner(
            peer, requests, pad=bench_model.ids.pad, new_tokens=config.new_tokens, device=device, dtype=dtype,
            own_weights=weights_bytes(peer), visual_tokens=tiles * cfg.tokens_per_tile, flops_per_sample=plan.flops,
        ))
    ptp_runners = []
    for name, prune in row_plan(config, cfg):
        method = make_method(prune, cfg)
        rows = _retiled(config, bench_model, prune, dtype) if method.retiles else requests
        ptp_runners.append(PtpRunner(
            name, Engine(bench_model.model, image_token_id=bench_model.ids.image, method=method), rows,
            device=device, own_weights=ptp_weights, ratio=prune.ratio if method.uses_ratio else None,
        ))
    runners += ptp_runners
    if config.engine == "vllm":
        runners += _vllm_runners(config, bench_model, requests, device=device, dtype=dtype)
    load_before = load_average()
    rounds = measure(runners, warmup=config.warmup, repeats=config.repeats, base=runners.index(ptp_runners[0]),
                     say=say)
    load_after = load_average()
    matmul_after, _ = matmul_tflops(device, dtype)  # again after the rows: the better of the two is the rate
    matmul = max(matmul_before, matmul_after)
    rows = [r.row(matmul=matmul) for r in runners]
    peer_match = None
    if share:
        peer_match = [r.tokens for r in ptp_runners[0].results] == runners[0].tokens

    none = next(r for r in rows if r.name == "none")
    vs_none = paired_ratios(rounds, base="none")
    vs_none["none"] = [1.0] * config.repeats
    for r in rows:
        r.paired_vs_none = Stat.of(vs_none[r.name])
        r.speedup_vs_none = r.paired_vs_none.median
        if config.peer:  # through the same rounds: (row / none) / (peer / none), round by round
            r.paired_vs_peer = Stat.of([a / b for a, b in zip(vs_none[r.name], vs_none[PEER], strict=True)])
            r.speedup_vs_peer = r.paired_vs_peer.median
        if r.flops_per_sample.get("total"):
            r.flops_ratio_vs_none = none.flops_per_sample["total"] / r.flops_per_sample["total"]

    vllm_peer = None
    if config.engine == "vllm" and config.peer:  # vLLM's own InternVL2 is no row: say why, and pair with its stand-in
        vllm_peer = {"row": VLLM_PEER, "measured": False, "reason": unavailable_reason(), "stand_in": STAND_IN,
                     "paired_vs_stand_in": paired_vs_stand_in(vs_none)}

    grid = tiles - 1 if tiles > 1 and cfg.use_thumbnail else tiles
    resolved = {**asdict(config), "source": config.source, "methods": list(config.resolved_methods()),
                "dtype": dtype_name(dtype), "device": str(device)}
    facts = {"source": config.source, "dtype": dtype_name(dtype), "device_type": device.type, "tiles": tiles,
             "batch_size": config.batch_size, "new_tokens": config.new_tokens}
    return BenchReport(
        config=resolved,
        device={"type": device.type, "name": device_name(device), "matmul_tflops": matmul, "matmul_size": matmul_n,
                "matmul_tflops_before_after": [matmul_before, matmul_after], "cpus": os.cpu_count(),
                "load_average_before": load_before, "load_average_after": load_after},
        versions={"torch": torch.__version__, "transformers": transformers.__version__, "ptp": ptp_cli.__version__,
                  "python": platform.python_version()},
        model={"name": cfg.name or config.source, "source": bench_model.source, "params": n_params,
               "weights_bytes": ptp_weights, "llm_arch": cfg.llm.arch, "llm_layers": cfg.llm.num_layers,
               "llm_hidden": cfg.llm.hidden_size, "vit_layers": cfg.vision.num_layers,
               "peer_weights": ("shared" if share else "random") if config.peer else None},
        workload={"image_size": list(config.image_size), "tiles": tiles, "grid_tiles": grid, "thumbnail": tiles > grid,
                  "visual_tokens": tiles * cfg.tokens_per_tile, "prompt_tokens": workload.prompt_tokens,
                  "question_tokens": config.question_tokens, "batch_size": config.batch_size,
                  "new_tokens": config.new_tokens},
        preprocess_s_per_sample=workload.preprocess_s,
        rows=rows,
        checks=evaluate(rows, facts),
        peer_tokens_match=peer_match,
        vllm_peer=vllm_peer,
        rounds=[[[name, wall] for name, wall in runs] for runs in rounds],
    )
