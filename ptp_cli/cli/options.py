"""The settings table (``ptp_cli/settings.py``) as Typer options, and the configs built from what they give.

A setting can come from four places; the first that gives it wins:

    command line  >  environment (PTP_RATIO, PTP_BATCH_SIZE, ...)  >  YAML config (--config / PTP_CONFIG)
                  >  preset (--preset, pruning settings only)  >  the declared defaults

Click does the precedence: each option has ``envvar=PTP_<NAME>``, and ``--config`` is an eager option whose
callback reads the YAML file into the context's default map. Every option defaults to ``None`` ("not given"),
so the preset can sit under what is given. ``gather`` collects the values and where each came from; ``run_config``
builds the frozen configs, whose construction is the one check of every value.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
import yaml

from ptp_cli import settings as declared
from ptp_cli.errors import UsageError
from ptp_cli.settings import SETTINGS, Setting, describe_kind, from_yaml_value, parse_text

if TYPE_CHECKING:
    from ptp_cli.pruning import PruneConfig
    from ptp_cli.run_config import RunConfig

COMMAND_LINE = "command line"
_CONFIG_META = "ptp.config"  # ctx.meta key: the YAML file the default map came from
_TYPES: dict[str, type] = {"str": str, "int": int, "float": float, "bool": bool, "ints": str, "float_or_auto": str}


# ---------------------------------------------------------------------------------------------------------
# Typer options, derived from the table


def _option(setting: Setting) -> Any:
    """The ``Annotated[... | None, typer.Option(...)]`` of one setting (default None: not given)."""
    names = [f"{setting.flag}/--no-{setting.flag[2:]}"] if setting.kind == "bool" else [setting.flag]
    if setting.short:
        names.append(setting.short)
    shown = setting.shown_default()
    text = setting.help + (f" [default: {shown}]" if shown is not None else "")
    info = typer.Option(*names, help=text, envvar=setting.env, show_envvar=False, rich_help_panel=setting.panel,
                        **({"metavar": setting.value_name} if setting.kind != "bool" else {}))
    return Annotated[_TYPES[setting.kind] | None, info]


def _read_config(ctx: typer.Context, value: Path | None) -> Path | None:
    """``--config FILE`` (or PTP_CONFIG): its settings become the defaults of every option of the command."""
    if value is not None:
        ctx.default_map = {**(ctx.default_map or {}), **read_yaml(value)}
        ctx.meta[_CONFIG_META] = str(value)
    return value


Config = Annotated[Path | None, typer.Option(
    metavar="FILE", envvar="PTP_CONFIG", is_eager=True, callback=_read_config,
    help="YAML file of settings (keys: option names, - or _). Also PTP_CONFIG.", rich_help_panel="Run")]


def with_settings(names: Iterable[str]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command that takes ``**settings`` the Typer options of ``names``, as the table declares them."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.kind != p.VAR_KEYWORD]
        shared = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=_option(SETTINGS[n]))
                  for n in names]
        command.__signature__ = inspect.Signature([*own, *shared])  # type: ignore[attr-defined]
        return command

    return decorate


# ---------------------------------------------------------------------------------------------------------
# YAML


def read_yaml(path: Path) -> dict[str, Any]:
    """The settings a YAML mapping gives, as option values; unknown keys and wrong types are usage errors.
    ``null`` = not given."""
    try:
        text = path.expanduser().read_text(encoding="utf-8")
    except OSError as e:
        raise UsageError(f"--config: cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise UsageError(f"--config: {path} is not UTF-8 text") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" (line {where.line + 1})" if where is not None else ""
        raise UsageError(f"--config: {path} is not valid YAML{at}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"--config: {path} must hold a mapping of option: value")
    values: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in SETTINGS:
            raise UsageError(
                f"--config: {path}: unknown key {key!r} (keys are option names, e.g. ratio, max-new-tokens)"
            )
        if value is None:
            continue
        setting = SETTINGS[name]
        try:
            typed = from_yaml_value(setting.kind, value)
        except ValueError:
            raise UsageError(f"--config: {path}: {key}: {setting.flag} must be {describe_kind(setting.kind)}, "
                             f"not {value!r}") from None
        # As the option takes it: the kinds Typer reads as text go back to text, parsed again in gather.
        values[name] = ",".join(map(str, typed)) if setting.kind == "ints" else (
            str(typed) if setting.kind == "float_or_auto" else typed)
    return values


# ---------------------------------------------------------------------------------------------------------
# What was given, and where from


@dataclass(frozen=True)
class Resolved:
    """Every setting some source gave, after precedence, and where each came from."""

    values: dict[str, Any]  # setting name -> value
    sources: dict[str, str]  # setting name -> "command line", "PTP_RATIO=0.3", or "cfg.yaml"

    def get(self, name: str, default: Any = None) -> Any:
        return self.values.get(name, default)

    def explain(self, err: UsageError) -> UsageError:
        """``err`` with the source of the option it names appended, when that was not the command line."""
        message = str(err)
        for name, source in self.sources.items():
            if source != COMMAND_LINE and source not in message and _names(message, SETTINGS[name].flag):
                return UsageError(f"{message} (from {source})")
        return err


def _names(message: str, flag: str) -> bool:
    """Whether ``message`` names ``flag`` (or its --no- form) as a whole option."""
    for form in (flag, "--no-" + flag[2:]):
        at = message.find(form)
        while at >= 0:
            end = at + len(form)
            if end == len(message) or not (message[end].isalnum() or message[end] == "-"):
                return True
            at = message.find(form, end)
    return False


def gather(ctx: typer.Context, given: dict[str, Any]) -> Resolved:
    """The options of a command call that some source gave (not None), typed, with their sources."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name, value in given.items():
        if value is None:
            continue
        setting = SETTINGS[name]
        where = _source(ctx, setting, os.environ)
        if isinstance(value, str) and setting.kind in ("ints", "float_or_auto"):
            try:
                value = parse_text(setting.kind, value)
            except ValueError:
                err = UsageError(f"{setting.flag} must be {describe_kind(setting.kind)}, got {value!r}")
                raise Resolved({}, {name: where}).explain(err) from None
        values[name], sources[name] = value, where
    return Resolved(values, sources)


def _source(ctx: typer.Context, setting: Setting, environ: Any) -> str:
    source = ctx.get_parameter_source(setting.name)
    kind = getattr(source, "name", "")
    if kind == "ENVIRONMENT":
        return f"{setting.env}={environ.get(setting.env, '')}"
    if kind == "DEFAULT_MAP":
        return str(ctx.meta.get(_CONFIG_META, "--config"))
    return COMMAND_LINE


def describe(resolved: Resolved) -> str:
    """The settings given, each with where it came from: what ``--check`` reports (defaults: docs/settings.md)."""
    parts = []
    for name, value in resolved.values.items():
        setting = SETTINGS[name]
        if setting.kind == "bool":
            shown = setting.flag if value else "--no-" + setting.flag[2:]
        else:
            shown = f"{setting.flag} {','.join(map(str, value)) if isinstance(value, tuple) else value}"
        source = resolved.sources.get(name, COMMAND_LINE)
        parts.append(shown if source == COMMAND_LINE else f"{shown} ({source})")
    return ", ".join(parts) if parts else "none (every setting at its default)"


# ---------------------------------------------------------------------------------------------------------
# The configs


def prune_config(resolved: Resolved) -> PruneConfig:
    """The PruneConfig: the preset (or the defaults), then every pruning setting given on top."""
    from ptp_cli.pruning import PRESETS  # no torch; loaded only by the commands that prune

    base = PRESETS[resolved.get("preset", "default")]
    fields = {s.field_name: resolved.values[n] for n, s in SETTINGS.items()
              if s.target == "prune" and n in resolved.values}
    return dataclasses.replace(base, **fields) if fields else base


def run_config(resolved: Resolved) -> RunConfig:
    """The RunConfig of a run. Building it checks every value once (no model needed, no torch imported)."""
    from ptp_cli.run_config import RunConfig

    fields = {n: v for n, v in resolved.values.items() if SETTINGS[n].target == "run"}
    try:
        _check_cli(resolved)
        return RunConfig(prune=prune_config(resolved), **fields)
    except UsageError as e:
        raise resolved.explain(e) from None


def _check_cli(resolved: Resolved) -> None:
    """The values of the command's own settings (--preset, --ray-workers, ...): the configs check the rest."""
    for name, value in resolved.values.items():
        if SETTINGS[name].target == "cli":
            declared.check_value(SETTINGS[name], value)
