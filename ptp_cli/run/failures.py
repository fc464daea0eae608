"""Which failures belong to one record, and when failed records mean that the run itself is broken.

A record can cause only a few failures: an unreadable or oversized image (``ImageError``), a prompt that
cannot be built (``PromptError``) or is longer than the model takes (``PromptTooLongError``), a bad field
(``InvalidRecordError``): all ``RecordError``s; and running out of memory (on any device: CUDA, the CPU allocator,
MPS) even alone in its batch (``OutOfMemoryError``, an ``out_of_memory`` row naming the stage). Those become
error rows. Anything else raised while
preparing or running a record is a bug or a broken set-up and ends the run, never an error row.

Error rows can still betray a broken set-up (every record out of memory, say): ``FailureGuard`` watches the
rows and raises ``RunAborted`` when failures look systematic, so an unattended job fails loudly instead of
writing a night of error rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ptp_cli.errors import OutOfMemoryError, RecordError, RunAborted
from ptp_cli.run.devices import is_out_of_memory

INFERENCE_ERROR = "inference_error"  # error.type of a record the engine failed on, alone in its batch
ENGINE_FAILURES = frozenset({INFERENCE_ERROR, OutOfMemoryError.kind})  # error types that count as the engine's
MAX_CONSECUTIVE_INFERENCE_ERRORS = 20  # this many in a row end the run, whatever --max-errors says
ALL_FAILED_MINIMUM = 5  # a run whose first this-many rows all are inference errors ends at once


@dataclass(frozen=True)
class BatchFailure:
    """Why the engine failed on a batch, as plain data (holding the exception would keep its tensors alive)."""

    kind: str  # the error row's type if the batch is one record: out_of_memory or inference_error
    message: str
    details: dict[str, Any]

    def error(self) -> RecordError:
        return RecordError(self.message, kind=self.kind, details=self.details)


def batch_failure(error: BaseException) -> BatchFailure | None:
    """What a failure of the engine on a batch means for its records, or None when no record can have caused it
    (a bug or a broken set-up, which must end the run). Out of memory on any device counts as the batch's."""
    if isinstance(error, OutOfMemoryError):
        return BatchFailure(error.kind, str(error), dict(error.details))
    if is_out_of_memory(error):  # raised outside the engine's stages (an engine of the caller's)
        first_line = (str(error).strip().splitlines() or [""])[0][:300]
        return BatchFailure(OutOfMemoryError.kind, f"out of memory: {type(error).__name__}: {first_line}", {})
    if isinstance(error, RecordError):
        return BatchFailure(INFERENCE_ERROR, f"{type(error).__name__}: {error}", dict(error.details))
    return None


@dataclass
class FailureGuard:
    """Counts the rows of a run and raises ``RunAborted`` when failures look systematic."""

    max_errors: int | None = None  # failed records (any kind) that end the run; None: no cap
    rows: int = 0  # rows seen
    failed: int = 0  # error rows seen
    inference_failed: int = 0  # rows the engine failed on (inference_error, out_of_memory) seen
    consecutive: int = 0  # such rows since the last row of another kind
    last: dict[str, Any] = field(default_factory=dict)  # the last error object, to name in the message

    def observe(self, row: dict[str, Any]) -> None:
        self.rows += 1
        error = row.get("error")
        if error is None:
            self.consecutive = 0
            return
        self.failed += 1
        self.last = error
        if error.get("type") in ENGINE_FAILURES:
            self.inference_failed += 1
            self.consecutive += 1
        else:
            self.consecutive = 0
        if self.max_errors is not None and self.failed >= self.max_errors:
            self._abort(f"{self.failed} records failed (--max-errors {self.max_errors})")
        if self.consecutive >= MAX_CONSECUTIVE_INFERENCE_ERRORS:
            self._abort(f"{self.consecutive} records in a row failed in the engine")
        if self.inference_failed == self.rows >= ALL_FAILED_MINIMUM:
            self._abort(f"every record so far ({self.rows}) failed in the engine")

    def _abort(self, what: str) -> None:
        raise RunAborted(f"stopping: {what}; last: {self.last.get('type')}: {self.last.get('message')}")
