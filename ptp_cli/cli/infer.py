"""``ptp infer``: records in (JSONL, Parquet, Arrow, WebDataset, OpenAI batch), one result row per record out
(JSONL, Parquet or the batch output format; ``ptp_cli.io.formats``), in input order, resumable.

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
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from tqdm import tqdm

from ptp_cli.cli import options as opt
from ptp_cli.cli.console import (
    EXIT_BROKEN_PIPE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_RECORDS_FAILED,
    Log,
    plural,
    silence_stdout,
)
from ptp_cli.cli.tally import Stats, image_root_hint, noting_relative
from ptp_cli.errors import ModelLoadError, RunAborted, UsageError
from ptp_cli.io import formats
from ptp_cli.io.output import OrderedWriter
from ptp_cli.io.records import BadRecord, Record, default_root, iter_lines, parse_shard
from ptp_cli.settings import INFER, names_for

if TYPE_CHECKING:
    from ptp_cli.run.pipeline import RunConfig

T = TypeVar("T")

MAX_WARNINGS = 5  # failed records named on stderr; the rest are only counted


# ---------------------------------------------------------------------------------------------------------
# Helpers


def _open_io(source: str, output: str | None, resolved: opt.Resolved) -> tuple[formats.Reader, str]:
    """The input opened and checked (its format from its name or --input-format) and the output's format, before
    the model loads; then the output path checked."""
    columns = formats.Columns(image=resolved.get("image_column"), question=resolved.get("question_column"),
                              id=resolved.get("id_column"))
    reader = _explained(resolved, formats.open_input, source, format=resolved.get("input_format"), columns=columns,
                        base_dir=_image_root(resolved.get("image_root")))
    out_format = _explained(resolved, formats.output_format, output, given=resolved.get("output_format"),
                            input_format=reader.format)
    _check_paths(source, output, folder=out_format == "parquet")
    return reader, out_format


def _check_paths(source: str, output: str | None, *, folder: bool = False) -> None:
    """Fail before the model loads: an unwritable output, or an output that is the input (``folder``: the
    output is a folder of Parquet parts)."""
    if output is None:
        return
    out = Path(output)
    if out.is_dir() and not folder:
        raise UsageError(f"--output {output} is a directory")
    if not out.parent.is_dir():
        raise UsageError(f"--output {output}: the folder {out.parent} does not exist")
    if not os.access(out if out.exists() else out.parent, os.W_OK):
        raise UsageError(f"--output {output}: permission denied")
    if source != "-" and out.exists() and Path(source).exists() and os.path.samefile(source, out):
        raise UsageError(f"--output {output} is the input file; choose another file")


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


# ---------------------------------------------------------------------------------------------------------
# The run


@dataclass
class Job:
    """One ``ptp infer`` call with its options read: where records come from and rows go, and what to skip."""

    source: str  # what INPUT named: a file, a folder, a shard pattern, or - for stdin
    config: RunConfig
    resolved: opt.Resolved
    output: str | None  # None: stdout
    shard: tuple[int, int] | None
    image_root: str | None
    reader: formats.Reader  # the input, opened and checked
    out_format: str  # jsonl, parquet or openai
    resume: bool = False
    force: bool = False
    retry: bool = False
    skip: frozenset[int] = frozenset()  # lines that already have a row in --output
    kept_errors: int = 0  # error rows an earlier run left in --output that this run does not redo


def run_infer(source: str, resolved: opt.Resolved) -> int:
    """Run every record of ``source`` with the resolved settings; return the exit code."""
    log = Log(quiet=bool(resolved.get("quiet", False)))
    if log.quiet:
        warnings.simplefilter("ignore")  # library warnings too: --quiet leaves stderr to errors
    job = _read_options(source, resolved)
    if resolved.get("check"):
        return run_check(job, log=log)
    settings = _model_settings(job)
    if job.resume:
        _resume(job, settings, log)
    if resolved.get("ray") and job.reader.format != "jsonl":
        raise UsageError(f"--ray reads JSONL input; run {job.reader.format} input without --ray")
    lines = _peeked(iter_lines(source, shard=job.shard, skip_lines=job.skip) if resolved.get("ray")
                    else job.reader.records(shard=job.shard, skip=job.skip))  # Ray's actors parse lines themselves
    if lines is None:  # nothing to run: say so, and load no model
        return _nothing_to_do(job, log)
    relative: set[int] = set()  # lines of records with a relative image path whose row has not come yet
    if resolved.get("ray"):
        rows, window = _ray_rows(lines, job, log=log)
    else:
        rows, window = _local_rows(lines, job, settings, relative, log=log)
    stats = Stats()
    if (code := _write_rows(rows, window, job, stats, relative, log=log)) is not None:
        return code
    if hint := image_root_hint(stats.missing_relative, stats.ok + stats.failed, source, job.image_root):
        log.info(hint)
    return max(EXIT_RECORDS_FAILED if stats.failed else EXIT_OK, _resumed_errors(job.kept_errors, job.output, log))


def _read_options(source: str, resolved: opt.Resolved) -> Job:
    """The options that say where records come from and rows go, checked with the paths; the RunConfig."""
    output: str | None = resolved.get("output")
    output = None if output == "-" else output
    resume, force, retry = (bool(resolved.get(k, False)) for k in ("resume", "force_resume", "retry_errors"))
    if (force or retry) and not resume:
        raise UsageError("--force-resume and --retry-errors only apply with --resume")
    if resume and output is None:
        raise UsageError("--resume needs --output FILE: it continues the results already in that file")
    shard = _explained(resolved, parse_shard, resolved.get("shard")) if resolved.get("shard") is not None else None
    reader, out_format = _open_io(source, output, resolved)
    config = opt.run_config(resolved)  # every check that needs no model, the value ranges before torch
    return Job(source, config, resolved, output, shard, _image_root(resolved.get("image_root")), reader, out_format,
               resume=resume, force=force, retry=retry)


def _model_settings(job: Job) -> dict[str, Any]:
    """The checkpoint's config (no weights) checks the settings against the model and gives the settings every
    row echoes and --resume compares."""
    from ptp_cli.run.pipeline import read_model_config, run_settings
    from ptp_cli.text.chat_template import template_name

    config = job.config
    model_dir, model_cfg = _explained(job.resolved, read_model_config, config)
    return run_settings(config, model_cfg, dtype=config.resolved_dtype(config.resolved_device()),
                        template=template_name(model_dir, model_cfg))


def _resume(job: Job, settings: dict[str, Any], log: Log) -> None:
    state = _explained(job.resolved, formats.scan, job.output, format=job.out_format, settings=settings,
                       force=job.force, retry_errors=job.retry)
    job.skip = state.done
    job.kept_errors = 0 if job.retry else state.error_rows
    repaired = f", cut a torn last line ({state.torn_bytes} bytes)" if state.torn_bytes else ""
    retried = f", retrying {state.error_rows} failed" if job.retry and state.error_rows else ""
    log.info(f"resuming {job.output}: {len(job.skip)} records already done{retried}{repaired}")


def _nothing_to_do(job: Job, log: Log) -> int:
    what = "stdin" if job.source == "-" else job.source
    shard_note = f" (shard {job.shard[0]}/{job.shard[1]})" if job.shard is not None else ""
    log.info(f"nothing left to do: every record of {what}{shard_note} already has a row in {job.output}" if job.skip
             else f"no records in {what}{shard_note}")
    return _resumed_errors(job.kept_errors, job.output, log)


def _local_rows(
    records: Iterator[Record | BadRecord], job: Job, settings: dict[str, Any], relative: set[int], *, log: Log,
) -> tuple[Iterator[tuple[int, dict[str, Any]]], int]:
    """The rows of a pipeline in this process, in completion order, and the writer's reorder window."""
    from ptp_cli.run.pipeline import Pipeline
    from ptp_cli.zoo import RANDOM_WEIGHTS

    t0, config = time.perf_counter(), job.config
    if config.engine == "vllm":  # vLLM logs at info level (and warns with tracebacks) unless told: -v shows it
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO" if job.resolved.get("verbose") else "ERROR")
    pipeline = _explained(job.resolved, Pipeline.load, config, checked=True)  # _model_settings checked it
    noise = "; random weights: its answers are noise" if pipeline.loaded.cfg.name in RANDOM_WEIGHTS else ""
    log.info(
        f"loaded {settings['model']} in {time.perf_counter() - t0:.1f} s ({pipeline.loaded.model.device}, "
        f"{settings['dtype']}); method {settings['method']}"
        f"{'; engine vllm' if config.engine == 'vllm' else ''}{noise}"
    )
    return pipeline.run(noting_relative(records, relative)), pipeline.reorder_window


def _write_rows(
    rows: Iterator[tuple[int, dict[str, Any]]], window: int, job: Job, stats: Stats, relative: set[int], *, log: Log,
) -> int | None:
    """Write the rows in input order, counting them; None when every row is written, else the exit code."""
    show_bar = not log.quiet and sys.stderr.isatty()
    total = job.reader.count(shard=job.shard, skip=job.skip) if show_bar else None
    with ExitStack() as stack:
        stream = formats.output_sink(job.output, format=job.out_format, resume=job.resume, stdout=sys.stdout)
        if job.output is not None:  # whatever happens, the rows handed to a file's sink are made durable
            stack.callback(_close_quietly, stream)
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
            hint = "; run again with --resume to finish" if job.output is not None else ""
            log.info(f"interrupted: {writer.written} row{'' if writer.written == 1 else 's'} written{hint}")
            return EXIT_INTERRUPTED
        except BrokenPipeError:
            silence_stdout()
            return EXIT_BROKEN_PIPE
        except RunAborted as e:
            # As for Ctrl-C: whole rows in order are on disk; --resume redoes the records without one.
            bar.close()
            hint = "; fix the cause and run again with --resume" if job.output is not None else ""
            raise RunAborted(f"{e} ({writer.written} rows written{hint})") from None
        elapsed = time.perf_counter() - start
    log.info(stats.summary(elapsed))
    return None


def _close_quietly(sink: Any) -> None:
    with contextlib.suppress(OSError, ValueError):
        sink.close()


def _peeked(lines: Iterator[T]) -> Iterator[T] | None:
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
    lines: Iterator[tuple[int, bytes]], job: Job, *, log: Log,
) -> tuple[Iterator[tuple[int, dict[str, Any]]], int]:
    """``--ray``: the rows of a Ray Data job over the input's lines, in input order, and the writer's window."""
    try:
        from ptp_cli.run.ray import run_ray  # imports Ray: only a run that asks for it pays for it
    except ImportError as e:
        raise UsageError(f"--ray needs Ray Data ({e}): pip install 'ptp-cli[ray]'") from None
    actors = job.resolved.get("ray_workers") or 1
    address = job.resolved.get("ray_address")
    log.info(f"running on Ray ({address or 'local'}): {actors} actor{'' if actors == 1 else 's'}")
    root = Path(job.image_root) if job.image_root is not None else default_root(job.source)
    rows = run_ray(lines, job.config, image_root=root, address=address, actors=actors,
                   verbose=bool(job.resolved.get("verbose", False)))
    return rows, 1 << 30  # rows come in input order; the window never fills


def run_check(job: Job, *, log: Log) -> int:
    """``--check``: every record checked as a run would, without weights; the exit code a run would give."""
    from ptp_cli.config import ModelConfig
    from ptp_cli.io.dryrun import check_records
    from ptp_cli.run_config import read_model_config

    source, config, resolved = job.source, job.config, job.resolved
    model_cfg = ModelConfig()  # InternVL2's tiling, when no model is given or found
    if "model" in resolved.values:
        try:  # offline: a dry run downloads nothing
            _, model_cfg = _explained(resolved, read_model_config, config, offline=True)
        except ModelLoadError as e:
            log.warning(f"{e}; checking with InternVL2's tiling (1..12 tiles of 448 px) instead")
    records = job.reader.records(shard=job.shard)
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
    if hint := image_root_hint(report.missing_relative, report.records, source, job.image_root):
        log.info(hint)
    log.info(f"settings given: {opt.describe(resolved)}")
    return EXIT_RECORDS_FAILED if report.failed else EXIT_OK


# ---------------------------------------------------------------------------------------------------------
# The command


@opt.with_settings(names_for(INFER))
def infer_command(
    ctx: typer.Context,
    input: Annotated[str, typer.Argument(
        metavar="INPUT", help="JSONL file of records (id, image, question), or - for stdin; or a Parquet "
        "file or folder, a datasets save_to_disk folder, WebDataset .tar shards, an OpenAI batch file (see --input-format).")],
    config: opt.Config = None,
    **settings: Any,
) -> None:
    """Answer the question of every record of INPUT; write one row per record, in input order.

    Rows are JSON lines, or Parquet (-o results.parquet), or OpenAI batch output lines for a batch file.

    Settings come from the command line, then PTP_<OPTION> variables (PTP_RATIO=0.3), then --config FILE.yaml.
    Exit codes: 0 all ok, 3 some records failed (see their 'error' rows), 2 usage error, 1 fatal error,
    130 interrupted (rerun with --resume), 141 the reader of stdout went away.
    """
    resolved = opt.gather(ctx, settings)
    with warnings.catch_warnings():  # --quiet silences warnings for this run only
        raise typer.Exit(run_infer(input, resolved))
