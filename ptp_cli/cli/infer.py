"""``ptp infer``: JSONL records in, one JSON result row per record out, in input order, resumable.

stdout (or --output) carries rows only; logs, warnings, the progress bar and the summary go to stderr.
Exit codes: 0 every record ok, 3 some records failed (each still has an error row), 2 usage error,
1 fatal error (the model cannot be loaded, or failures are systematic: see ``failures.py`` and
--max-errors), 130 interrupted (Ctrl-C), 141 output pipe closed.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from tqdm import tqdm

from ptp_cli.cli import options as opt
from ptp_cli.cli.console import EXIT_BROKEN_PIPE, EXIT_INTERRUPTED, EXIT_OK, EXIT_RECORDS_FAILED, Log
from ptp_cli.errors import ModelLoadError, RunAborted, UsageError
from ptp_cli.output import OrderedWriter
from ptp_cli.records import (
    BadRecord,
    Record,
    default_root,
    is_missing_image,
    iter_lines,
    iter_records,
    parse_line,
    parse_shard,
)
from ptp_cli.resume import scan_output

if TYPE_CHECKING:
    from ptp_cli.pipeline import RunConfig

T = TypeVar("T")

MAX_WARNINGS = 5  # failed records named on stderr; the rest are only counted

# The settings `ptp infer` reads from the environment and --config.
INFER_SETTINGS = tuple(opt.SETTINGS)


# ---------------------------------------------------------------------------------------------------------
# Helpers


@dataclass
class Stats:
    """Counts for the final summary."""

    ok: int = 0
    failed: int = 0
    generated_tokens: int = 0
    visual_before: int = 0
    visual_after: int = 0
    missing_relative: int = 0  # failed with "image not found" on a relative image path

    def add(self, row: dict[str, Any], *, relative: bool = False) -> None:
        if (err := row.get("error")) is not None:
            self.failed += 1
            self.missing_relative += relative and is_missing_image(err["type"], err["message"])
            return
        self.ok += 1
        tokens = row.get("tokens") or {}
        self.generated_tokens += tokens.get("generated") or 0
        self.visual_before += tokens.get("visual_before") or 0
        self.visual_after += tokens.get("visual_after") or 0

    def summary(self, elapsed: float) -> str:
        total = self.ok + self.failed
        rate = f"{self.ok / elapsed:.2f} samples/s, {self.generated_tokens / elapsed:.1f} tokens/s" if elapsed else ""
        text = f"{plural(total, 'record')} in {elapsed:.1f} s: {self.ok} ok, {self.failed} failed"
        if self.ok:
            before, after = self.visual_before / self.ok, self.visual_after / self.ok
            kept = f" ({100 * after / before:.0f}%)" if before else ""
            text += f" | {rate} | visual tokens kept {after:.1f} / {before:.1f} per sample{kept}"
        return text


def _count_records(path: str, shard: tuple[int, int] | None, skip: frozenset[int]) -> int | None:
    """How many rows the run will write (for the progress bar), by the rules of iter_records; None for stdin."""
    if path == "-":
        return None
    count, index = 0, -1
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            index += 1
            if (shard is None or index % shard[1] == shard[0]) and lineno not in skip:
                count += 1
    return count


def _check_paths(source: str, output: str | None) -> None:
    """Fail before the model loads: an unreadable input, an unwritable output, or an output that is the input."""
    if source != "-":
        try:
            with open(source, "rb"):
                pass
        except OSError as e:
            raise UsageError(f"cannot read input {source}: {e.strerror or e}") from None
    if output is None:
        return
    out = Path(output)
    if out.is_dir():
        raise UsageError(f"--output {output} is a directory")
    if not out.parent.is_dir():
        raise UsageError(f"--output {output}: the folder {out.parent} does not exist")
    if not os.access(out if out.exists() else out.parent, os.W_OK):
        raise UsageError(f"--output {output}: permission denied")
    if source != "-" and out.exists() and os.path.samefile(source, out):
        raise UsageError(f"--output {output} is the input file; choose another file")


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _explained(resolved: opt.Resolved, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``call(...)``, with the source of the option a usage error names (PTP_X=..., a YAML file) added."""
    try:
        return call(*args, **kwargs)
    except UsageError as e:
        raise resolved.explain(e) from None


def _image_root(value: str | None) -> str | None:
    if value is not None and not Path(value).expanduser().is_dir():
        raise UsageError(f"--image-root {value} is not a folder")
    return value


def _noting_relative(items: Iterator[Record | BadRecord], lines: set[int]) -> Iterator[Record | BadRecord]:
    """``items`` unchanged; the lines of records whose image path was relative are added to ``lines``."""
    for item in items:
        if isinstance(item, Record) and item.image_relative:
            lines.add(item.line)
        yield item


def _image_root_hint(missing: int, total: int, source: str, image_root: str | None) -> str | None:
    """When most records named a relative image that is not there: where such paths resolve, and the fix."""
    if not total or 2 * missing <= total:
        return None
    if image_root is not None:
        where = f"--image-root {image_root}"
    else:
        where = "the current folder (stdin)" if source == "-" else f"the folder of {source}"
    return (
        f"hint: {missing} of {plural(total, 'record')} name a relative image path that does not exist under "
        f"{where}; pass --image-root DIR, the folder those paths are relative to"
    )


def _silence_stdout() -> None:
    """After a closed pipe: point stdout at /dev/null so the interpreter's final flush stays quiet."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


# ---------------------------------------------------------------------------------------------------------
# The run


def run_infer(source: str, resolved: opt.Resolved) -> int:
    """Run every record of ``source`` with the resolved settings; return the exit code."""
    log = Log(quiet=bool(resolved.get("quiet", False)))
    if log.quiet:
        warnings.simplefilter("ignore")  # library warnings too: --quiet leaves stderr to errors
    output: str | None = resolved.get("output")
    output = None if output == "-" else output
    resume, force, retry = (bool(resolved.get(k, False)) for k in ("resume", "force_resume", "retry_errors"))
    if (force or retry) and not resume:
        raise UsageError("--force-resume and --retry-errors only apply with --resume")
    if resume and output is None:
        raise UsageError("--resume needs --output FILE: it continues the results already in that file")
    try:
        shard = parse_shard(resolved.get("shard")) if resolved.get("shard") is not None else None
    except UsageError as e:
        raise resolved.explain(e) from None
    _check_paths(source, output)
    config = opt.run_config(resolved)  # every check that needs no model, the value ranges before torch
    image_root = _image_root(resolved.get("image_root"))
    if resolved.get("check"):
        return run_check(source, config, resolved, shard=shard, image_root=image_root, log=log)
    from ptp_cli.chat_template import template_name
    from ptp_cli.pipeline import Pipeline, read_model_config, run_settings
    from ptp_cli.zoo import RANDOM_WEIGHTS

    # The checkpoint's config (no weights) decides the layer checks and the settings --resume compares.
    model_dir, model_cfg = _explained(resolved, read_model_config, config)
    settings = run_settings(config, model_cfg, dtype=config.resolved_dtype(config.resolved_device()),
                            template=template_name(model_dir, model_cfg))
    skip: frozenset[int] = frozenset()
    kept_errors = 0  # error rows an earlier run left in --output that this run does not redo
    if resume:
        state = _explained(resolved, scan_output, output, settings=settings, force=force, retry_errors=retry)
        skip = state.done
        kept_errors = 0 if retry else state.error_rows
        repaired = f", cut a torn last line ({state.torn_bytes} bytes)" if state.torn_bytes else ""
        retried = f", retrying {state.error_rows} failed" if retry and state.error_rows else ""
        log.info(f"resuming {output}: {len(skip)} records already done{retried}{repaired}")

    lines = _peeked(iter_lines(source, shard=shard, skip_lines=skip))
    if lines is None:  # nothing to run: say so, and load no model
        what = "stdin" if source == "-" else source
        shard_note = f" (shard {shard[0]}/{shard[1]})" if shard is not None else ""
        log.info(f"nothing left to do: every record of {what}{shard_note} already has a row in {output}" if skip
                 else f"no records in {what}{shard_note}")
        return _resumed_errors(kept_errors, output, log)
    relative: set[int] = set()  # lines of records with a relative image path whose row has not come yet
    if resolved.get("ray"):
        rows, window = _ray_rows(lines, source, config, resolved, image_root=image_root, log=log)
    else:
        t0 = time.perf_counter()
        if config.engine == "vllm":  # vLLM logs at info level (and warns with tracebacks) unless told: -v shows it
            os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO" if resolved.get("verbose") else "ERROR")
        pipeline = _explained(resolved, Pipeline.load, config)
        noise = "; random weights: its answers are noise" if pipeline.loaded.cfg.name in RANDOM_WEIGHTS else ""
        log.info(
            f"loaded {settings['model']} in {time.perf_counter() - t0:.1f} s ({pipeline.loaded.model.device}, "
            f"{settings['dtype']}); method {settings['method']}"
            f"{'; engine vllm' if config.engine == 'vllm' else ''}{noise}"
        )
        root = Path(image_root).expanduser().absolute() if image_root is not None else default_root(source)
        records = (parse_line(raw, line=lineno, root=root) for lineno, raw in lines)
        rows, window = pipeline.run(_noting_relative(records, relative)), pipeline.reorder_window
    show_bar = not log.quiet and sys.stderr.isatty()
    total = _count_records(source, shard, skip) if show_bar else None
    stats = Stats()
    with ExitStack() as stack:
        if output is None:
            stream: IO[Any] = sys.stdout
        else:
            try:
                stream = stack.enter_context(open(output, "ab" if resume else "wb"))
            except OSError as e:
                raise UsageError(f"cannot write --output {output}: {e.strerror or e}") from None
        bar = stack.enter_context(
            tqdm(total=total, disable=not show_bar, file=sys.stderr, unit="rec", dynamic_ncols=True)
        )
        writer = OrderedWriter(stream, window=window)
        stack.callback(rows.close)  # on any exit: stop the preprocessing threads first
        start = time.perf_counter()
        warned_input = False
        try:
            for seq, row in rows:
                writer.put(seq, row)
                stats.add(row, relative=row["line"] in relative)
                relative.discard(row["line"])
                bar.update()
                if "input" in row and not warned_input:
                    warned_input = True
                    log.warning(f"input field(s) {', '.join(row['input'])} share a name with output fields; "
                                "they are kept under \"input\" in the rows")
                if row.get("error") is not None and stats.failed <= MAX_WARNINGS:
                    err = row["error"]
                    more = "; further failures are only counted" if stats.failed == MAX_WARNINGS else ""
                    log.warning(f"line {row['line']} (id {row['id']!r}): {err['type']}: {err['message']}{more}")
            writer.close()
        except KeyboardInterrupt:
            # Rows written so far are whole lines, in order; rows waiting behind an unfinished one are dropped
            # (not written out of order), so --resume redoes exactly the records without a row.
            with contextlib.suppress(OSError):
                stream.flush()
            bar.close()
            hint = "; run again with --resume to finish" if output is not None else ""
            log.info(f"interrupted: {writer.written} row{'' if writer.written == 1 else 's'} written{hint}")
            return EXIT_INTERRUPTED
        except BrokenPipeError:
            _silence_stdout()
            return EXIT_BROKEN_PIPE
        except RunAborted as e:
            # As for Ctrl-C: whole rows in order are on disk; --resume redoes the records without one.
            bar.close()
            hint = "; fix the cause and run again with --resume" if output is not None else ""
            raise RunAborted(f"{e} ({writer.written} rows written{hint})") from None
        elapsed = time.perf_counter() - start
    log.info(stats.summary(elapsed))
    if hint := _image_root_hint(stats.missing_relative, stats.ok + stats.failed, source, image_root):
        log.info(hint)
    return max(EXIT_RECORDS_FAILED if stats.failed else EXIT_OK, _resumed_errors(kept_errors, output, log))


def _peeked(lines: Iterator[tuple[int, bytes]]) -> Iterator[tuple[int, bytes]] | None:
    """``lines`` unchanged, or None when it yields nothing (read up to its first line: stdin may block)."""
    first = next(lines, None)
    if first is None:
        return None
    return itertools.chain([first], lines)


def _resumed_errors(kept: int, output: str | None, log: Log) -> int:
    """A resumed output that still holds error rows exits 3, as the run that wrote them did, and says why."""
    if not kept:
        return EXIT_OK
    log.info(f"{output} holds {plural(kept, 'error row')} from an earlier run; --resume --retry-errors reruns them")
    return EXIT_RECORDS_FAILED


def _ray_rows(
    lines: Iterator[tuple[int, bytes]], source: str, config: RunConfig, resolved: opt.Resolved, *,
    image_root: str | None, log: Log,
) -> tuple[Iterator[tuple[int, dict[str, Any]]], int]:
    """``--ray``: the rows of a Ray Data job over the input's lines, in input order, and the writer's window."""
    if resolved.get("ray_workers") is not None and resolved.get("ray_workers") < 1:
        raise UsageError("--ray-workers must be at least 1")
    try:
        from ptp_cli.ray import run_ray  # imports Ray: only a run that asks for it pays for it
    except ImportError as e:
        raise UsageError(f"--ray needs Ray Data ({e}): pip install 'ptp-cli[ray]'") from None
    actors = resolved.get("ray_workers") or 1
    address = resolved.get("ray_address")
    log.info(f"running on Ray ({address or 'local'}): {actors} actor{'' if actors == 1 else 's'}")
    root = Path(image_root) if image_root is not None else default_root(source)
    rows = run_ray(lines, config, image_root=root, address=address, actors=actors,
                   verbose=bool(resolved.get("verbose", False)))
    return rows, 1 << 30  # rows come in input order; the window never fills


def run_check(
    source: str, config: RunConfig, resolved: opt.Resolved, *, shard: tuple[int, int] | None,
    image_root: str | None, log: Log,
) -> int:
    """``--check``: every record checked as a run would, without weights; the exit code a run would give."""
    from ptp_cli.config import ModelConfig
    from ptp_cli.dryrun import check_records
    from ptp_cli.run_config import read_model_config

    model_cfg = ModelConfig()  # InternVL2's tiling, when no model is given or found
    if "model" in resolved.values:
        try:  # offline: a dry run downloads nothing
            _, model_cfg = _explained(resolved, read_model_config, config, offline=True)
        except ModelLoadError as e:
            log.warning(f"{e}; checking with InternVL2's tiling (1..12 tiles of 448 px) instead")
    records = iter_records(source, base_dir=image_root, shard=shard)
    report = check_records(records, tiling=config.tiling(model_cfg), max_pixels=config.max_pixels)
    for line, rid, err in report.errors:
        log.info(f"line {line} (id {rid!r}): {err.kind}: {err}")
    if report.failed > len(report.errors):
        log.info(f"... and {report.failed - len(report.errors)} more records that would fail")
    tokens = report.tiles * model_cfg.tokens_per_tile
    log.info(
        f"checked {plural(report.records, 'record')}: {report.ok} ok, {report.failed} would fail; "
        f"{plural(report.tiles, 'tile')} ({tokens} visual tokens before pruning); no weights loaded"
    )
    if hint := _image_root_hint(report.missing_relative, report.records, source, image_root):
        log.info(hint)
    return EXIT_RECORDS_FAILED if report.failed else EXIT_OK


# ---------------------------------------------------------------------------------------------------------
# The command


def infer_command(
    input: Annotated[str, typer.Argument(
        metavar="INPUT", help="JSONL file of records (id, image, question), or - for stdin.")],
    output: opt.Output = None,
    resume: opt.Resume = None,
    force_resume: opt.ForceResume = None,
    retry_errors: opt.RetryErrors = None,
    shard: opt.Shard = None,
    image_root: opt.ImageRoot = None,
    check: opt.Check = None,
    ray: opt.Ray = None,
    ray_address: opt.RayAddress = None,
    ray_workers: opt.RayWorkers = None,
    model: opt.Model = None,
    engine: opt.Engine = None,
    dtype: opt.Dtype = None,
    device: opt.Device = None,
    preset: opt.Preset = None,
    method: opt.Method = None,
    ratio: opt.Ratio = None,
    alpha: opt.Alpha = None,
    vit_layer: opt.VitLayer = None,
    llm_layer: opt.LlmLayer = None,
    tau: opt.Tau = None,
    head_agg: opt.HeadAgg = None,
    instr_agg: opt.InstrAgg = None,
    region_budgets: opt.RegionBudgets = None,
    token_score: opt.TokenScore = None,
    fastv_layer: opt.FastvLayer = None,
    vtw_layer: opt.VtwLayer = None,
    pdrop_layers: opt.PdropLayers = None,
    pdrop_keep: opt.PdropKeep = None,
    positions: opt.Positions = None,
    max_new_tokens: opt.MaxNewTokens = None,
    temperature: opt.Temperature = None,
    seed: opt.Seed = None,
    logprobs: opt.Logprobs = None,
    kept: opt.Kept = None,
    system_message: opt.SystemMessage = None,
    max_tiles: opt.MaxTiles = None,
    min_tiles: opt.MinTiles = None,
    batch_size: opt.BatchSize = None,
    max_batch_tokens: opt.MaxBatchTokens = None,
    max_prompt_tokens: opt.MaxPromptTokens = None,
    workers: opt.Workers = None,
    max_errors: opt.MaxErrors = None,
    max_pixels: opt.MaxPixels = None,
    config: opt.Config = None,
    quiet: opt.Quiet = None,
    verbose: opt.Verbose = None,
) -> None:
    """Answer the question of every record of INPUT; write one JSON line per record, in input order.

    Settings come from the command line, then PTP_<OPTION> variables (PTP_RATIO=0.3), then --config FILE.yaml.
    Exit codes: 0 all ok, 3 some records failed (see their 'error' rows), 2 usage error, 1 fatal error,
    130 interrupted (rerun with --resume), 141 the reader of stdout went away.
    """
    given = {name: value for name, value in locals().items() if name not in ("input", "config")}
    resolved = opt.resolve(given, names=INFER_SETTINGS, config=config)
    with warnings.catch_warnings():  # --quiet silences warnings for this run only
        raise typer.Exit(run_infer(input, resolved))
