"""The project's exception types.

Two families: errors that end a run (``UsageError``, ``ModelLoadError``), formatted once by the CLI, and
``RecordError``s, which belong to one input record and become an error row in the output.
"""

from __future__ import annotations


class PtpError(Exception):
    """Base class of every error ptp raises on purpose."""


class UsageError(PtpError):
    """A bad option or argument. The CLI prints one line and exits 2."""


class ModelLoadError(PtpError):
    """The model or its tokenizer cannot be loaded. The CLI prints the message and exits 1."""


class RecordError(PtpError):
    """A problem with one input record; the run goes on and the record gets an error row.

    ``kind`` is the machine-readable ``error.type`` of that row.
    """

    kind = "record_error"

    def __init__(self, message: str, *, kind: str | None = None) -> None:
        super().__init__(message)
        if kind is not None:
            self.kind = kind


class InvalidRecordError(RecordError):
    """The line is not a usable record (bad JSON, not UTF-8, no question, ...)."""

    kind = "invalid_record"


class ImageError(RecordError):
    """The record's image is missing, unreadable, too large or degenerate."""

    kind = "image_error"


class PromptError(RecordError, ValueError):
    """The record's prompt cannot be built (a question spelling an image token, a blank question, ...)."""

    kind = "prompt_error"


class RunAborted(PtpError):
    """Failures are systematic: the run stops after the rows already yielded. The CLI exits 1."""
