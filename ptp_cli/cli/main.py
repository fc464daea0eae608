"""The ``ptp`` command: assembles the subcommands and formats every error once.

Errors: ``UsageError`` -> one line, exit 2; ``ModelLoadError`` (any other ``PtpError``) -> one line, exit 1; anything unexpected ->
one line and a hint to set PTP_DEBUG=1, which prints the traceback instead.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Annotated

import typer

from ptp_cli import __version__
from ptp_cli.cli.bench import bench_command
from ptp_cli.cli.infer import EXIT_FATAL, EXIT_USAGE, infer_command
from ptp_cli.cli.synth import synth_command
from ptp_cli.errors import PtpError, UsageError

app = typer.Typer(
    name="ptp",
    help="Batch inference for InternVL2 with Pyramid Token Pruning.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,  # errors are formatted once, in main()
)
app.command("infer")(infer_command)
app.command("bench")(bench_command)
app.command("synth")(synth_command)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ptp {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """Batch inference for InternVL2 with Pyramid Token Pruning."""


def _debug() -> bool:
    return os.environ.get("PTP_DEBUG", "").strip().lower() in {"1", "true", "yes", "on"}


def _fail(message: str, code: int) -> None:
    print(f"ptp: error: {' '.join(message.split())}", file=sys.stderr)  # one line, always
    sys.exit(code)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except UsageError as e:
        _fail(str(e), EXIT_USAGE)
    except PtpError as e:  # ModelLoadError, mostly
        _fail(str(e), EXIT_FATAL)
    except Exception as e:
        if _debug():
            traceback.print_exc()
            sys.exit(EXIT_FATAL)
        _fail(f"unexpected {type(e).__name__}: {e} (set PTP_DEBUG=1 for the traceback)", EXIT_FATAL)


if __name__ == "__main__":
    main()
