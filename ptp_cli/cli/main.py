"""The ``ptp`` command: assembles the subcommands and formats every error once.

Errors: a usage error (Click's, for bad options and values, or ours) -> one line, exit 2; any other
``PtpError`` (``ModelLoadError``, mostly) -> one line, exit 1; anything unexpected -> one line and a hint to
set PTP_DEBUG=1, which prints the traceback instead.
"""

from __future__ import annotations

import os
import re
import sys
import traceback
from typing import Annotated, Any

import typer
from typer.core import TyperCommand

from ptp_cli import __version__
from ptp_cli.cli.bench import bench_command
from ptp_cli.cli.console import EXIT_FATAL, EXIT_INTERRUPTED, EXIT_USAGE
from ptp_cli.cli.eval import eval_command
from ptp_cli.cli.infer import infer_command
from ptp_cli.cli.methods import methods_command
from ptp_cli.cli.show import show_command
from ptp_cli.cli.synth import synth_command
from ptp_cli.errors import PtpError, UsageError

# What an option's value is called in help when it names none itself (Typer would write <int>, <str>, ...).
READABLE_METAVARS = {"int": "N", "float": "NUMBER", "str": "TEXT", "path": "PATH", "list[Path]": "PATH"}
_TYPE_IN_HELP = re.compile(r" <([^<>]*)>(\.\.\.)?$")


class Command(TyperCommand):
    """A subcommand whose help names arguments and values plainly: ``INPUT`` (Typer writes ``{INPUT}`` in the
    usage line and ``INPUT <str>`` in the list), ``--seed N`` (Typer: ``--seed <int>``)."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        return [piece.removeprefix("{").removesuffix("}") for piece in super().collect_usage_pieces(ctx)]

    def format_options(self, ctx: Any, formatter: Any) -> None:
        sections: dict[str, list[tuple[str, str]]] = {"argument": [], "option": []}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None or param.param_type_name not in sections:
                continue
            name, text = record
            if param.param_type_name == "argument":
                name = _TYPE_IN_HELP.sub("", name)
            else:
                name = _TYPE_IN_HELP.sub(lambda m: " " + READABLE_METAVARS.get(m[1], "VALUE"), name)
            sections[param.param_type_name].append((name, text))
        for title, key in (("Arguments", "argument"), ("Options", "option")):
            if sections[key]:
                with formatter.section(title):
                    formatter.write_dl(sections[key])


app = typer.Typer(
    name="ptp",
    help="Batch inference for InternVL2 with Pyramid Token Pruning.",
    invoke_without_command=True,  # bare `ptp` prints the help (the root callback), as gh does
    rich_markup_mode=None,  # plain help: flags without a <bool> placeholder, [default: X] shown as written
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
    pretty_exceptions_enable=False,  # errors are formatted once, in main()
)
app.command("infer", cls=Command)(infer_command)
app.command("eval", cls=Command)(eval_command)
app.command("show", cls=Command)(show_command)
app.command("synth", cls=Command)(synth_command)
app.command("bench", cls=Command)(bench_command)
app.command("methods", cls=Command)(methods_command)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ptp {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """Batch inference for InternVL2 with Pyramid Token Pruning."""
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit()


def _debug() -> bool:
    return os.environ.get("PTP_DEBUG", "").strip().lower() in {"1", "true", "yes", "on"}


def _fail(message: str, code: int) -> None:
    print(f"ptp: error: {' '.join(message.split())}", file=sys.stderr)  # one line, always
    sys.exit(code)


def _bad_variable(param: Any) -> str | None:
    """The PTP_<NAME> variable a bad value came from: the option's variable is set and the option is not on the
    command line."""
    var = getattr(param, "envvar", None)
    if not isinstance(var, str) or var not in os.environ:
        return None
    given = any(arg == o or arg.startswith(o + "=") for o in (*param.opts, *param.secondary_opts) for arg in sys.argv[1:])
    return None if given else var


def _usage_message(e: Any) -> str:
    """Click's message (with its "did you mean" hint), the command it concerns, and where help is."""
    command = e.ctx.command_path if e.ctx is not None else "ptp"
    message = e.format_message().rstrip(".")
    if (var := _bad_variable(getattr(e, "param", None))) is not None:
        message += f" (from {var}={os.environ[var]})"
    hint = f" (see '{command} -h')" if e.ctx is not None else ""
    where = command.removeprefix("ptp").strip()
    return f"{where + ': ' if where else ''}{message[:1].lower()}{message[1:]}{hint}"


def main() -> None:
    """Console-script entry point."""
    try:
        code: Any = app(prog_name="ptp", standalone_mode=False)
    except typer.TyperException as e:  # Click's errors (Typer carries its own Click): bad options and values
        _fail(_usage_message(e), getattr(e, "exit_code", EXIT_USAGE))
    except typer.Abort:  # Ctrl-C outside the run loop (e.g. while the model loads)
        _fail("interrupted", EXIT_INTERRUPTED)
    except UsageError as e:
        _fail(str(e), EXIT_USAGE)
    except PtpError as e:  # ModelLoadError, mostly
        _fail(str(e), EXIT_FATAL)
    except Exception as e:
        if _debug():
            traceback.print_exc()
            sys.exit(EXIT_FATAL)
        _fail(f"unexpected {type(e).__name__}: {e} (set PTP_DEBUG=1 for the traceback)", EXIT_FATAL)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
