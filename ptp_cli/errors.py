"""The project's exception types.

Two families: errors that end a run (``UsageError``, ``ModelLoadError``), formatted once by the CLI, and
``RecordError``s, which belong to one input record and become an error row in the output.
"""

from __future__ import annotations

from typing import Any


class PtpError(Exception):
    """Base class of every error ptp raises on purpose."""


class UsageError(PtpError):
    """A bad option or argument. The CLI prints one line and exits 2."""


class ModelLoadError(PtpError):
    """The model or its tokenizer cannot be loaded. The CLI prints the message and exits 1."""


class RecordError(PtpError):
    """A problem with one input record; the run goes on and the record gets an error row.

    ``kind`` is the machine-readable ``error.type`` of that row; ``details`` are more fields of its ``error``
    object (numbers a program may act on, e.g. a prompt's length and the limit it broke).
    """

    kind = "record_error"

    def __init__(self, message: str, *, kind: str | None = None, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        if kind is not None:
            self.kind = kind
        self.details: dict[str, Any] = dict(details or {})


class InvalidRecordError(RecordError):
    """The line is not a usable record (bad JSON, not UTF-8, no question, ...)."""

    kind = "invalid_record"


class ImageError(RecordError):
    """The record's image is missing, unreadable, too large or degenerate."""

    kind = "image_error"


class PromptError(RecordError, ValueError):
    """The record's prompt cannot be built (a question spelling an image token, a blank question, ...)."""

    kind = "prompt_error"


class PromptTooLongError(RecordError):
    """The record's prompt has more tokens than the model's positions (or --max-prompt-tokens) allow."""

    kind = "prompt_too_long"


class OutOfMemoryError(RecordError):
    """The device (GPU or host) ran out of memory on a batch; alone in its batch, the record gets this row.

    ``stage`` is the engine stage that failed (vit, probe, prefill, decode; None when not known); the message
    keeps the original error's first line.
    """

    kind = "out_of_memory"

    def __init__(self, message: str, *, stage: str | None) -> None:
        super().__init__(message, details={"stage": stage} if stage else None)
        self.stage = stage


class RunAborted(PtpError):
    """Failures are systematic: the run stops after the rows already yielded. The CLI exits 1."""
