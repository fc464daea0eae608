"""The evaluation grid: every (method, ratio[, positions]) over one gold file, with one loaded model, resumable.

Runs are ``none`` (once), then each method at each ratio; a method that ignores the ratio (vtw,
pdrop) runs once. Each run writes its rows, in input order, to ``OUT_DIR/<run>.jsonl`` (``none.jsonl``,
``ptp@0.5.jsonl``). A run whose file already holds a row for every record is not redone; a partial one
continues with the records it lacks (``scan_output`` repairs a torn last line first). A file written with
other settings is refused rather than mixed. Grids may share an output folder (parallel processes over
parts of one grid): a run's file is written under an exclusive lock, so a second process that reaches the
same run waits, then finds it done, instead of appending the same rows again.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ptp_cli.errors import UsageError
from ptp_cli.io.formats import open_input
from ptp_cli.io.output import OrderedWriter
from ptp_cli.io.resume import scan_output
from ptp_cli.pruning import PruneConfig, make_method, plan_grid
from ptp_cli.pruning.base import PruningMethod
from ptp_cli.run.engine import Engine
from ptp_cli.run.pipeline import Pipeline, RunConfig, start_vllm
from ptp_cli.run.vision_cache import VisionCache
from ptp_cli.run.vllm_engine import VLLMEngine, free_unused_layers


@dataclass(frozen=True)
class RunSpec:
    """One run of the grid."""

    name: str  # "none", "ptp@0.5", "vtw": also the predictions file's stem
    prune: PruneConfig  # the run's pruning settings


def plan_runs(base: PruneConfig, pipeline: Pipeline, methods: tuple[str, ...], ratios: tuple[float, ...], *,
              positions: tuple[str, ...] = (), vit_prunes: tuple[float, ...] = ()) -> list[RunSpec]:
    """The grid's runs, with ``base`` (preset, alpha, layers, ...) under each method and ratio, each pre-LLM method
    in each of ``positions`` (``ptp@0.5,positions=original``), and each ``--vit-prunes`` value for the methods that
    prune inside the ViT (``ptp@0.5,vit=0.25``)."""
    return [RunSpec(name, prune) for name, prune in plan_grid(base, methods, ratios, pipeline.cfg,
                                                              positions=positions, vit_prunes=vit_prunes)]


def ptp_variants(base: PruneConfig, ratios: tuple[float, ...], *, alphas: tuple[float | str, ...] = (),
                 ablations: bool = False) -> list[RunSpec]:
    """PTP beside the grid, at each ratio: one run per alpha in ``alphas`` (0: s only, 1: c only, "auto"),
    and with ``ablations`` the run with uniform instead of CLS-similarity region budgets."""
    ptp = dataclasses.replace(base, method="ptp")
    specs = [RunSpec(f"ptp@{r:g},alpha={a:g}" if isinstance(a, float) else f"ptp@{r:g},alpha={a}",
                     dataclasses.replace(ptp, ratio=r, alpha=a)) for r in ratios for a in alphas]
    if ablations:
        specs += [RunSpec(f"ptp@{r:g},uniform", dataclasses.replace(ptp, ratio=r, region_budgets=False))
                  for r in ratios]
    return specs


def _count_records(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for raw in f if raw.strip())


@contextlib.contextmanager
def _exclusive(out: Path, *, log: Callable[[str], None], name: str) -> Iterator[None]:
    """Hold an exclusive lock on ``out``'s sibling ``.lock`` file (POSIX; elsewhere no lock)."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): one process per output folder, as before
        yield
        return
    with (out.parent / f"{out.name}.lock").open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"{name}: waiting for another process writing {out}")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run_one(pipeline: Pipeline, gold: Path, out: Path, *, log: Callable[[str], None], name: str) -> None:
    """Write the rows ``out`` lacks, appending; a finished file is left alone. Under the run's lock: what is
    done is read only once no other process is writing the file."""
    with _exclusive(out, log=log, name=name):
        _write_missing(pipeline, gold, out, log=log, name=name)


def _write_missing(pipeline: Pipeline, gold: Path, out: Path, *, log: Callable[[str], None], name: str) -> None:
    try:  # repairs a torn last line; refuses a file of other settings, naming what differs
        state = scan_output(out, settings=pipeline.settings())
    except UsageError as e:
        raise UsageError(f"run {name}: {e}; delete it or choose another --out-dir") from None
    total = _count_records(gold)
    todo = total - len(state.done)
    if todo <= 0:
        log(f"{name}: done ({total} records in {out})")
        return
    log(f"{name}: {todo} of {total} records to run" + (f" ({len(state.done)} done before)" if state.done else ""))
    records = open_input(str(gold)).records(skip=state.done)
    with out.open("ab") as stream, contextlib.closing(pipeline.run(records)) as rows:
        writer = OrderedWriter(stream, window=pipeline.reorder_window)
        for seq, row in rows:
            writer.put(seq, row)
        # Not reached on Ctrl-C: rows already written are whole and in order; the rest is redone next time.
        writer.close()

def run_grid(
    gold: str | Path,
    config: RunConfig,
    *,
    methods: tuple[str, ...],
    ratios: tuple[float, ...],
    positions: tuple[str, ...] = (),
    out_dir: str | Path,
    extra: tuple[RunSpec, ...] = (),
    vit_prunes: tuple[float, ...] = (),
    log: Callable[[str], None] = lambda _msg: None,
) -> Iterator[tuple[RunSpec, Path]]:
    """Run the grid (loading the model once) and yield each run with its predictions file as it finishes.

    Every run's settings are validated against the model before the first record runs.
    """
    gold, out_dir = Path(gold), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The first pipeline only loads the model and plans: vLLM, if asked for, starts once below for every run.
    first = Pipeline.load(dataclasses.replace(config, engine="ptp", prune=dataclasses.replace(config.prune, method="none")))
    specs = plan_runs(config.prune, first, methods, ratios, positions=positions, vit_prunes=vit_prunes) + list(extra)
    for spec in extra:  # the grid's own runs are valid by construction; these are checked before any runs
        spec.prune.check_layers(first.cfg)
    cache = VisionCache()  # every run reads the same images: the ViT runs once per image and score layer
    generator = start_vllm(first.loaded, config) if config.engine == "vllm" else None
    methods = {s.name: make_method(s.prune, first.cfg) for s in specs}
    if generator is not None:  # vLLM generates: ptp keeps only the layers the grid's probes read
        free_unused_layers(first.loaded.model, list(methods.values()))

    def engine(method: PruningMethod) -> Engine | VLLMEngine:
        if generator is not None:
            return VLLMEngine(first.loaded.model, image_token_id=first.loaded.image_token_id, method=method,
                              generator=generator, vision_cache=cache)
        return Engine(first.loaded.model, image_token_id=first.loaded.image_token_id, method=method,
                      vision_cache=cache)

    pipelines = [Pipeline(first.loaded, dataclasses.replace(config, prune=s.prune), engine=engine(methods[s.name]),
                          checked=True)
                 for s in specs]
    log(f"loaded {first.settings()['model']}; {len(specs)} runs: {', '.join(s.name for s in specs)}")
    for spec, pipeline in zip(specs, pipelines, strict=True):
        out = out_dir / f"{spec.name}.jsonl"
        _run_one(pipeline, gold, out, log=log, name=spec.name)
        yield spec, out
