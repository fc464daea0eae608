"""``ptp eval``: score predictions against gold records, or run a (method, ratio) grid and score every run.

The table goes to stdout; ``--json`` and ``--plot`` write files. The run options (model, tiling, generation,
pruning settings other than method and ratio) are ``ptp infer``'s own, taken from ``options.py``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ptp_cli.cli import options as opt
from ptp_cli.cli.console import EXIT_INTERRUPTED, Log
from ptp_cli.errors import UsageError
from ptp_cli.settings import EVAL, SETTINGS, names_for

if TYPE_CHECKING:
    from ptp_cli.eval.gold import Gold
    from ptp_cli.eval.score import RunScore

def _check_output(path: Path | None, option: str) -> None:
    if path is None:
        return
    if path.is_dir():
        raise UsageError(f"{option} {path} is a directory; give a file name")
    if not path.parent.is_dir():
        raise UsageError(f"{option} {path}: the folder {path.parent} does not exist")


def _fractions(text: str, option: str) -> tuple[float, ...]:
    """``"0.5,0.75"`` -> (0.5, 0.75), each once; UsageError naming ``option`` unless every value is in [0, 1)."""
    try:
        values = tuple(dict.fromkeys(float(v) for v in text.split(",") if v.strip()))
    except ValueError:
        values = ()
    if not values or not all(0.0 <= v < 1.0 for v in values):
        raise UsageError(f"{option} must be comma-separated numbers in [0, 1), got {text!r}")
    return values


def parse_grid(methods: str, ratios: str) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """``"ptp,none"``, ``"0.5,0.75"`` -> method names (none first) and ratios, each once; UsageError if bad."""
    values = _fractions(ratios, "--ratios")
    from ptp_cli.pruning import METHODS  # the registry by name: no torch

    names = tuple(sorted(dict.fromkeys(m.strip() for m in methods.split(",") if m.strip()), key=lambda m: m != "none"))
    if unknown := [m for m in names if m not in METHODS]:
        raise UsageError(f"--methods: unknown method {unknown[0]!r}; choose from {', '.join(sorted(METHODS))}")
    if not names:
        raise UsageError("--methods needs at least one method")
    return names, values


def parse_alphas(text: str | None) -> tuple[float | str, ...]:
    """``"0,0.25,auto"`` -> (0.0, 0.25, "auto"), each once; UsageError if a value is not a number in [0, 1] or
    auto."""
    if text is None:
        return ()
    values: list[float | str] = []
    for part in (p.strip().lower() for p in text.split(",") if p.strip()):
        try:
            value: float | str = part if part == "auto" else float(part)
        except ValueError:
            value = -1.0
        if value != "auto" and not 0.0 <= float(value) <= 1.0:
            raise UsageError(f"--alphas must be comma-separated numbers in [0, 1] or auto, got {text!r}")
        values.append(value)
    return tuple(dict.fromkeys(values))


def parse_vit_prunes(text: str | None) -> tuple[float, ...]:
    """``"0.25,0.5"`` -> (0.25, 0.5); UsageError unless every value is a number in [0, 1)."""
    return () if text is None else _fractions(text, "--vit-prunes")


def parse_positions(text: str | None) -> tuple[str, ...]:
    """``"original,contiguous"`` -> a grid axis of position modes, each once; one mode or none given: ``()``
    (every run takes the one setting). UsageError for an unknown mode."""
    from ptp_cli.pruning.catalog import POSITION_MODES

    modes = tuple(dict.fromkeys(p.strip() for p in (text or "").split(",") if p.strip()))
    if bad := [m for m in modes if m not in POSITION_MODES]:
        raise UsageError(f"--positions must be {' or '.join(POSITION_MODES)} (comma-separated for a grid axis), "
                         f"got {bad[0]!r}")
    return modes if len(modes) > 1 else ()


def _grid_runs(gold: Path, resolved: opt.Resolved, *, methods: str, ratios: str, out_dir: Path | None,
               log: Log, alphas: str | None = None, ablations: bool = False,
               vit_prunes: str | None = None) -> list[tuple[str, Path]]:
    if out_dir is None:
        raise UsageError("running models needs --out-dir DIR: each run's predictions are kept there "
                         "(one JSONL per run), so an interrupted grid continues where it stopped")
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out-dir {out_dir} is a file")
    names, values = parse_grid(methods, ratios)
    stage1 = parse_vit_prunes(vit_prunes)
    alpha_values = parse_alphas(alphas)
    modes = parse_positions(resolved.get("positions"))
    if modes:  # the axis: each run sets its own mode; the base config takes the first
        resolved = dataclasses.replace(resolved, values={**resolved.values, "positions": modes[0]})
    config = opt.run_config(resolved)
    if config.engine == "vllm":  # vLLM logs at info level (and warns with tracebacks) unless told, as in infer
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    from ptp_cli.eval.grid import ptp_variants, run_grid

    extra = tuple(ptp_variants(config.prune, values, alphas=alpha_values, ablations=ablations))
    try:
        return [(spec.name, path) for spec, path in
                run_grid(gold, config, methods=names, ratios=values, positions=modes, out_dir=out_dir, extra=extra,
                         vit_prunes=stage1, log=log)]
    except UsageError as e:
        raise resolved.explain(e) from None


@opt.with_settings(names_for(EVAL))
def eval_command(
    ctx: typer.Context,
    gold: Annotated[Path, typer.Argument(
        metavar="GOLD", help="Gold records (JSONL, or Parquet, a datasets folder, WebDataset shards): answer or answers, optional choices and metric.")],
    predictions: Annotated[list[Path] | None, typer.Option(
        "--predictions", "-p", metavar="FILE", help="Score this ptp infer output (repeatable: one run each); no model runs.")] = None,
    methods: Annotated[str | None, typer.Option(
        metavar="A,B,C", help="Methods of the grid, comma-separated. [default: none,ptp]")] = None,
    ratios: Annotated[str | None, typer.Option(
        metavar="R1,R2,...", help="Pruned fractions of the grid, comma-separated. [default: 0.5]")] = None,
    out_dir: Annotated[Path | None, typer.Option(
        metavar="DIR", help="Folder of the grid's predictions, one JSONL per run (resumable).")] = None,
    alphas: Annotated[str | None, typer.Option(
        metavar="A1,A2,...", help="Also PTP at each ratio with each of these alphas, comma-separated (0: s only, 1: c only, auto).")] = None,
    ablations: Annotated[bool, typer.Option(
        "--ablations", help="Also PTP at each ratio with uniform region budgets.")] = False,
    vit_prunes: Annotated[str | None, typer.Option(
        metavar="R1,R2,...", help="Also each of ptp, random and spatial in --methods at each ratio with each of "
        "these --vit-prune values (those above the ratio skipped), comma-separated.")] = None,
    metric: Annotated[str | None, typer.Option(
        metavar="NAME", help="Metric of records that name none: exact, vqa, anls, relaxed, mc or yesno. [default: inferred]")] = None,
    by: Annotated[str | None, typer.Option(metavar="FIELD", help="Also score per value of this gold field (e.g. type).")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", metavar="FILE", help="Write the report as JSON here.")] = None,
    plot: Annotated[Path | None, typer.Option(metavar="FILE", help="Draw score vs. visual tokens kept into this PNG.")] = None,
    config: opt.Config = None,
    **settings: Any,
) -> None:
    """Score answers against GOLD: an existing output (--predictions), or each (method, ratio) run now.

    Prints one row per run: scores, retention (score / unpruned score), visual tokens, TFLOPs and throughput.
    """
    from ptp_cli.eval.gold import read_gold
    from ptp_cli.eval.report import Report, draw_plot, format_markdown

    # The environment and --config may hold any ptp infer setting (one run.yaml serves both commands); eval
    # reads those it takes (names_for(EVAL)): the grid sets method and ratio per run.
    resolved = opt.gather(ctx, settings)
    log = Log(quiet=bool(resolved.get("quiet", False)))
    golds = read_gold(gold, metric=metric)
    if by is not None and not any(by in g.fields for g in golds):
        raise UsageError(f"--by {by}: no gold record has a field {by!r}")
    for path, option in ((json_out, "--json"), (plot, "--plot")):
        _check_output(path, option)
    if predictions:
        grid_given = [flag for flag, v in (("--methods", methods), ("--ratios", ratios), ("--out-dir", out_dir),
                                           ("--alphas", alphas), ("--ablations", ablations or None),
                                           ("--vit-prunes", vit_prunes)) if v is not None]
        grid_given += [SETTINGS[n].flag for n, source in resolved.sources.items()
                       if source == opt.COMMAND_LINE and n != "quiet"]
        if grid_given:
            raise UsageError(f"{grid_given[0]} runs a model; it does not go with --predictions")
        runs = [(p.stem, p) for p in predictions]
    else:
        try:
            runs = _grid_runs(gold, resolved, methods=methods or "none,ptp", ratios=ratios or "0.5",
                              out_dir=out_dir, log=log, alphas=alphas, ablations=ablations, vit_prunes=vit_prunes)
        except KeyboardInterrupt:
            log("interrupted; run the same command again to continue where it stopped")
            raise typer.Exit(EXIT_INTERRUPTED) from None
    scored = _score(golds, runs, log)
    model = next((r.model for r in scored if r.model), None) or resolved.get("model")
    title = f"{model or 'model unknown'}, n = {len(golds)}, {gold}"
    report = Report(scored, by=by, title=title)
    typer.echo(format_markdown(report), nl=False)
    if json_out is not None:
        json_out.write_bytes(report.to_json())
        log(f"wrote {json_out}")
    if plot is not None:
        try:
            draw_plot(report, plot)
        except ValueError as e:
            raise UsageError(f"--plot: {e}") from None
        log(f"wrote {plot}")


def _score(golds: list[Gold], runs: list[tuple[str, Path]], log: Log) -> list[RunScore]:
    from ptp_cli.eval.score import read_predictions, score_run

    scored = []
    for name, path in runs:
        run = score_run(golds, read_predictions(path), name=name, source=str(path))
        if run.n_missing:
            log(f"warning: {name}: {run.n_missing} gold records have no prediction (each scores 0)")
        if run.n_unmatched:
            log(f"warning: {name}: {run.n_unmatched} prediction rows match no gold record (not scored)")
        scored.append(run)
    return scored

