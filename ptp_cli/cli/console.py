"""What every command shares on the console: the exit codes, and the ``ptp:`` messages on stderr."""

from __future__ import annotations

import os
import sys

from tqdm import tqdm

EXIT_OK, EXIT_FATAL, EXIT_USAGE, EXIT_RECORDS_FAILED = 0, 1, 2, 3
EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 130, 141  # 128 + SIGINT, 128 + SIGPIPE, as a shell reports them


class Log:
    """stderr messages, prefixed ``ptp:``; silent when quiet. Written through tqdm so a bar stays intact."""

    def __init__(self, *, quiet: bool) -> None:
        self.quiet = quiet

    def info(self, message: str) -> None:
        if not self.quiet:
            tqdm.write(f"ptp: {message}", file=sys.stderr)

    def warning(self, message: str) -> None:
        self.info(f"warning: {message}")

    __call__ = info  # a Log is also the plain message callback the library's long jobs take


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def silence_stdout() -> None:
    """After a closed pipe: point stdout at /dev/null so the interpreter's final flush stays quiet."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
