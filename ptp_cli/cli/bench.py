"""``ptp bench``: parse the options, say what will run, run ``ptp_cli.bench.run_bench``, print the table,
write the JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from ptp_cli.errors import UsageError


def bench_command(
    model: Annotated[str | None, typer.Option(
        metavar="DIR|ID", help="Checkpoint directory, hub id (local HF cache), 'mini' or 'tiny' (random weights), loaded with its weights.")] = None,
    shape: Annotated[str | None, typer.Option(
        metavar="NAME", help="Full-size random weights: internvl2-1b, internvl2-2b, internvl2-4b or internvl2-8b. "
             "[default: internvl2-2b unless --model]")] = None,
    image_size: Annotated[str, typer.Option(metavar="WxH", help="Synthetic image, WIDTHxHEIGHT.")] = "1344x896",
    max_tiles: Annotated[int, typer.Option(help="Tile cap (1344x896 at 6: 3x2 tiles + thumbnail).")] = 6,
    batch_size: Annotated[int, typer.Option(help="Requests per batch.")] = 32,
    new_tokens: Annotated[int, typer.Option(help="Tokens generated per request (EOS ignored).")] = 16,
    question_tokens: Annotated[int, typer.Option(help="Synthetic question length in tokens.")] = 32,
    methods: Annotated[str | None, typer.Option(
        metavar="A,B,C", help="Comma-separated pruning methods, e.g. ptp,fastv. [default: all registered]")] = None,
    ratios: Annotated[str, typer.Option(metavar="R1,R2,...", help="Comma-separated pruned fractions.")] = "0.5,0.75",
    vit_prunes: Annotated[str | None, typer.Option(
        metavar="R1,R2,...", help="Also ptp, random and spatial (those in --methods) at each ratio with each of these "
        "--vit-prune values (pruning inside the ViT; values above the ratio skipped): rows 'ptp@0.5,vit=0.25'.")] = None,
    warmup: Annotated[int, typer.Option(help="Untimed runs per row.")] = 1,
    repeats: Annotated[int, typer.Option(help="Timed runs per row (median and min/max reported).")] = 5,
    dtype: Annotated[str, typer.Option(metavar="NAME", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16 or float16.")] = "auto",
    device: Annotated[str, typer.Option(metavar="NAME", help="auto, cpu, cuda or cuda:N.")] = "auto",
    peer: Annotated[bool, typer.Option("--peer/--no-peer", help="Include the transformers generate() row.")] = True,
    engine: Annotated[str, typer.Option(metavar="NAME", help="ptp, or vllm: every pre-LLM row also runs with vLLM "
                                        "generating from ptp's pruned embeddings ('vllm none', 'vllm ptp@0.5', ...).")] = "ptp",
    seed: Annotated[int, typer.Option(help="Seed of the synthetic image, token ids and random weights.")] = 0,
    json_out: Annotated[Path | None, typer.Option("--json", metavar="FILE", help="Write the report as JSON here.")] = None,
    targets: Annotated[bool, typer.Option(
        "--targets", help="Also print the project's performance targets and whether this run meets them.")] = False,
    force: Annotated[bool, typer.Option(
        "--force", help="Run a full-size model on a CPU anyway (hours; refused without it).")] = False,
) -> None:
    """Measure ptp (no pruning, and each method at each ratio) against transformers on the same requests."""
    from ptp_cli import bench  # imports torch: keep `ptp --help` fast

    if engine == "vllm":  # vLLM logs at info level (and warns with tracebacks) unless told
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    config = bench.BenchConfig(
        model=model, shape=shape, image_size=bench.parse_image_size(image_size), max_tiles=max_tiles,
        batch_size=batch_size, new_tokens=new_tokens, question_tokens=question_tokens,
        methods=bench.parse_methods(methods) if methods is not None else None, ratios=bench.parse_ratios(ratios),
        vit_prunes=bench.parse_ratios(vit_prunes, option="--vit-prunes") if vit_prunes is not None else (),
        warmup=warmup, repeats=repeats, dtype=dtype, device=device, peer=peer, seed=seed, engine=engine,
    ).validate()
    if json_out is not None and json_out.is_dir():
        raise UsageError(f"--json {json_out} is a directory; give a file name")
    plan = bench.plan_bench(config)
    plan.refuse_unless_forced(force=force)  # before anything else is printed: a usage error is one line
    typer.echo(plan.describe(), err=True)
    report = bench.run_bench(config, log=lambda msg: typer.echo(msg, err=True))
    typer.echo(bench.format_report(report, targets=targets))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
        typer.echo(f"wrote {json_out}", err=True)
