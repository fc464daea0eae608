"""ptp on Ray Data: a callable class that loads the model once per actor and maps records to result rows.

    import ray
    from ptp_cli.run.pipeline import RunConfig
    from ptp_cli.pruning import PruneConfig
    from ptp_cli.run.ray import PTPPredictor

    ds = ray.data.read_json("questions.jsonl")  # or any dataset with the columns `ptp infer` reads
    rows = ds.map_batches(
        PTPPredictor,
        fn_constructor_kwargs={"config": RunConfig(model="OpenGVLab/InternVL2-2B", prune=PruneConfig(ratio=0.5)),
                               "image_root": "/data/images"},
        concurrency=4, num_gpus=1, batch_size=32,
    )

Every input row gives exactly one output row (an error row for a bad record), so Ray's own retries of a lost
actor's batch neither lose nor duplicate a record. Images are read inside the actor, from a path or from the
raw bytes of the file, never shipped as pixels. ``run_ray`` is what ``ptp infer --ray`` runs.

Nothing else in ptp imports this module, so ptp never imports Ray unless asked to.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import ray

from ptp_cli.errors import RunAborted
from ptp_cli.io.records import BadRecord, Record, parse_line
from ptp_cli.run.failures import FailureGuard
from ptp_cli.run.pipeline import Pipeline, RunConfig

# Output columns: scalar columns for filtering in Ray, plus the whole row as ptp infer writes it.
COLUMNS = ("line", "id", "answer", "error", "row")


def _plain(value: Any) -> Any:
    """A Ray/numpy/Arrow cell as plain Python (numpy scalars and arrays included), for JSON."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


class PTPPredictor:
    """Ray Data ``map_batches`` class: a batch of input records (columns) -> a batch of result rows (columns).

    Input columns: either the record fields ``ptp infer`` reads (``id``, ``image``, ``question``, overrides,
    extras; ``image`` a path or the image file's bytes) with an optional ``line`` column (1-based; default:
    the row's position in the batch), or ``raw`` (a JSONL line, bytes) with ``line``, as ``run_ray`` sends.
    Output columns: ``line``, ``id`` (as text), ``answer`` (None for an error row), ``error`` ("type: message"
    or None) and ``row``, the full result row as JSON text, exactly as ``ptp infer`` would write it.
    """

    def __init__(self, config: RunConfig, *, image_root: str | None = None) -> None:
        # --max-errors counts over the whole job, so the driver (``run_ray``) applies it, not each batch.
        self.pipeline = Pipeline.load(replace(config, max_errors=None))
        self.root = Path(image_root).expanduser().absolute() if image_root else Path.cwd()

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, list[Any]]:
        n = len(next(iter(batch.values()))) if batch else 0
        items = [self._record({k: col[i] for k, col in batch.items()}, position=i + 1) for i in range(n)]
        out: dict[str, list[Any]] = {c: [] for c in COLUMNS}
        for row in self.pipeline.infer(items):
            err = row.get("error")
            out["line"].append(row["line"])
            out["id"].append(str(row["id"]))
            out["answer"].append(row.get("answer"))
            out["error"].append(f"{err['type']}: {err['message']}" if err else None)
            out["row"].append(orjson.dumps(row).decode())
        return out

    def _record(self, cells: dict[str, Any], *, position: int) -> Record | BadRecord:
        line = int(cells["line"]) if cells.get("line") is not None else position
        if "raw" in cells:
            return parse_line(bytes(cells["raw"]), line=line, root=self.root)
        fields = {k: _plain(v) for k, v in cells.items() if k != "line" and v is not None}
        image = fields.get("image")
        if isinstance(image, bytes | bytearray):  # the file's bytes: validated as a record with a stand-in path
            fields["image"] = "<bytes>"
        record = parse_line(orjson.dumps(fields), line=line, root=self.root)
        if isinstance(image, bytes | bytearray) and isinstance(record, Record):
            record = replace(record, image=bytes(image))
        return record


# Ray's loggers that report on ptp's own choices (progress bars off, the plan printed), not on the run.
_NOTICE_LOGGERS = ("ray.data._internal.progress", "ray.data._internal.execution.streaming_executor")


def _start(address: str | None, *, verbose: bool) -> bool:
    """Connect to (or start) Ray; True when this call started it (and so should shut it down).

    Unless ``verbose``: Ray's Python logging at warning level, its workers' output not forwarded, and the C++
    core's own log lines (one on every actor start with Ray Data, "constructor arguments in the object store
    and max_restarts > 0", a known Ray issue, #53727) kept to its log files.
    """
    started = not ray.is_initialized()
    if started:
        saved = os.environ.get("RAY_BACKEND_LOG_LEVEL")
        if not verbose and saved is None:
            os.environ["RAY_BACKEND_LOG_LEVEL"] = "fatal"  # read by Ray's C++ side when ray.init starts it
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=verbose,
                     logging_level=logging.INFO if verbose else logging.WARNING)
        finally:
            if saved is None:
                os.environ.pop("RAY_BACKEND_LOG_LEVEL", None)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # rows come back in input order, as from one process
    ctx.enable_progress_bars = False  # ptp prints its own progress and summary
    # Start every actor (each loads the model) before any block goes out: otherwise the first actor up can take
    # every block of a small input while the others are still loading.
    ctx.wait_for_min_actors_s = 600
    ctx.print_on_execution_start = False
    return started


@contextmanager
def _ray_logging(*, verbose: bool) -> Iterator[None]:
    """While ptp's job runs: Ray Data at warning level, and its notices about ptp's own settings dropped
    (unless ``verbose``); the levels are restored afterwards."""
    loggers = [logging.getLogger(name) for name in ("ray.data", *_NOTICE_LOGGERS)]
    saved = [logger.level for logger in loggers]
    if not verbose:
        for logger, level in zip(loggers, [logging.WARNING] + [logging.ERROR] * len(_NOTICE_LOGGERS), strict=True):
            logger.setLevel(level)
    try:
        yield
    finally:
        for logger, level in zip(loggers, saved, strict=True):
            logger.setLevel(level)


def block_size(records: int, *, actors: int, batch_size: int) -> int:
    """Records per Ray Data batch: every actor gets records even on a small input, and no batch is larger than
    four engine batches (so an actor streams rows while the next batch waits)."""
    return max(1, min(4 * batch_size, math.ceil(records / max(actors, 1))))


def run_ray(
    lines: Iterable[tuple[int, bytes]],
    config: RunConfig,
    *,
    image_root: Path,
    address: str | None = None,
    actors: int = 1,
    batch_size: int | None = None,
    num_gpus: float | None = None,
    predictor: type[PTPPredictor] = PTPPredictor,
    verbose: bool = False,
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Rows for ``lines`` (``(line number, raw JSONL bytes)``, e.g. from ``records.iter_lines``) as ``(seq, row)``
    in input order, computed by ``actors`` Ray actors of ``predictor`` (one model each).

    ``address``: a running cluster (``"auto"``, ``"ray://host:10001"``) or None for a local one. ``num_gpus`` per
    actor: None gives each actor one GPU when the cluster has GPUs and the run is not pinned to the CPU.
    ``batch_size``: records per Ray Data batch (None: ``block_size``'s, so that every actor gets records).
    A Ray this call starts is shut down when the rows are done (or the caller stops reading them).
    """
    items = [{"seq": seq, "line": line, "raw": raw} for seq, (line, raw) in enumerate(lines)]
    if not items:
        return
    started = _start(address, verbose=verbose)
    try:
        with _ray_logging(verbose=verbose):
            yield from _rows(items, config, image_root=image_root, actors=actors, batch_size=batch_size,
                             num_gpus=num_gpus, predictor=predictor)
    finally:
        if started:
            ray.shutdown()


def _rows(
    items: list[dict[str, Any]], config: RunConfig, *, image_root: Path, actors: int, batch_size: int | None,
    num_gpus: float | None, predictor: type[PTPPredictor],
) -> Iterator[tuple[int, dict[str, Any]]]:
    if num_gpus is None:
        has_gpus = ray.cluster_resources().get("GPU", 0) > 0
        num_gpus = 1.0 if has_gpus and not config.device.startswith("cpu") else 0.0
    size = batch_size or block_size(len(items), actors=actors, batch_size=config.batch_size)
    ds = ray.data.from_items(items, override_num_blocks=math.ceil(len(items) / size)).map_batches(
        predictor,
        fn_constructor_kwargs={"config": config, "image_root": str(image_root)},
        compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1),
        batch_size=size,
        num_gpus=num_gpus,
        num_cpus=0 if num_gpus else 1,
    )
    seq_of = {item["line"]: item["seq"] for item in items}
    guard = FailureGuard(max_errors=config.max_errors)  # the same stop rules as one process
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for line, text in zip(batch["line"].tolist(), batch["row"].tolist(), strict=True):
                row = orjson.loads(text)
                yield seq_of[line], row
                guard.observe(row)
    except Exception as e:
        aborted = _cause(e, RunAborted)  # an actor stopped on systematic failures: one line, as one process
        if aborted is None:
            raise
        raise RunAborted(str(aborted)) from None


def _cause(error: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The first exception of type ``kind`` in ``error``'s chain (Ray wraps a task's own exception)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, kind):
            return error
        seen.add(id(error))
        error = getattr(error, "cause", None) or error.__cause__ or error.__context__
    return None
