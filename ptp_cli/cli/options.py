"""Option plumbing shared by the commands: one table of settings, their Typer options, and precedence.

A setting can come from four places; the first that gives it wins:

    command line  >  environment (PTP_RATIO, PTP_BATCH_SIZE, ...)  >  YAML config (--config / PTP_CONFIG)
                  >  preset (--preset, pruning settings only)  >  the dataclass defaults

Every Typer option defaults to ``None`` ("not given"), so each source is a plain dict of the values it
explicitly gives; ``resolve`` merges them and builds ``RunConfig``/``PruneConfig`` once. A value of the wrong
type is a ``UsageError`` naming the option and where the value came from.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer
import yaml

from ptp_cli.config import MAX_TILES
from ptp_cli.errors import UsageError
from ptp_cli.limits import AUTO, check_values

if TYPE_CHECKING:
    from ptp_cli.pruning import PruneConfig
    from ptp_cli.run_config import RunConfig

Target = Literal["run", "prune", "cli"]
COMMAND_LINE = "command line"


@dataclass(frozen=True)
class Setting:
    """One user-facing setting: its value type and the config it feeds."""

    # "ints": comma-separated integers, e.g. 6,12,18; "float_or_auto": a number or the word auto (--alpha auto)
    kind: Literal["str", "int", "float", "bool", "ints", "float_or_auto"]
    target: Target  # RunConfig field, PruneConfig field, or a CLI-only setting
    field: str | None = None  # the dataclass field, when it is not named like the setting

    def field_name(self, name: str) -> str:
        return self.field or name


# Every setting the environment and YAML may give (the name is the option's, with _ for -).
SETTINGS: dict[str, Setting] = {
    # model and run
    "model": Setting("str", "run"),
    "engine": Setting("str", "run"),
    "dtype": Setting("str", "run"),
    "device": Setting("str", "run"),
    "batch_size": Setting("int", "run"),
    "max_batch_tokens": Setting("int", "run"),
    "max_prompt_tokens": Setting("int", "run"),
    "workers": Setting("int", "run"),
    "max_pixels": Setting("int", "run"),
    "max_tiles": Setting("int", "run"),
    "max_errors": Setting("int", "run"),
    "min_tiles": Setting("int", "run"),
    # generation
    "max_new_tokens": Setting("int", "run"),
    "temperature": Setting("float", "run"),
    "seed": Setting("int", "run"),
    "logprobs": Setting("bool", "run"),
    "kept": Setting("bool", "run"),
    "system_message": Setting("str", "run"),
    # pruning
    "preset": Setting("str", "cli"),
    "method": Setting("str", "prune"),
    "ratio": Setting("float", "prune"),
    "alpha": Setting("float_or_auto", "prune"),
    "vit_layer": Setting("int", "prune"),
    "llm_layer": Setting("int", "prune"),
    "tau": Setting("float", "prune"),
    "head_agg": Setting("str", "prune"),
    "instr_agg": Setting("str", "prune"),
    "region_budgets": Setting("bool", "prune"),
    "token_score": Setting("bool", "prune", field="use_token_score"),
    "fastv_layer": Setting("int", "prune"),
    "vtw_layer": Setting("int", "prune"),
    "pdrop_layers": Setting("ints", "prune"),
    "pdrop_keep": Setting("float", "prune"),
    "positions": Setting("str", "prune"),
    # input/output (ptp infer)
    "output": Setting("str", "cli"),
    "resume": Setting("bool", "cli"),
    "force_resume": Setting("bool", "cli"),
    "retry_errors": Setting("bool", "cli"),
    "shard": Setting("str", "cli"),
    "quiet": Setting("bool", "cli"),
    "verbose": Setting("bool", "cli"),
    "image_root": Setting("str", "cli"),
    "check": Setting("bool", "cli"),
    # Ray Data (ptp infer --ray)
    "ray": Setting("bool", "cli"),
    "ray_address": Setting("str", "cli"),
    "ray_workers": Setting("int", "cli"),
}

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})
_WHAT = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false",
         "ints": "comma-separated integers (e.g. 6,12,18)", "float_or_auto": f"a number or {AUTO}"}
# Kinds Typer takes as text, parsed here as the environment's values are (Typer has no type for them).
_PARSED_FROM_TEXT = frozenset({"ints", "float_or_auto"})
_OPTION_IN_MESSAGE = re.compile(r"--(?:no-)?([a-z][a-z0-9-]*)")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_var(name: str) -> str:
    return "PTP_" + name.upper()


# ---------------------------------------------------------------------------------------------------------
# Typer options (``None`` default = not given). Commands take the ones they need.

_MODEL, _PRUNE, _GEN, _IO, _RUN = "Model", "Pruning", "Generation", "Input and output", "Run"

Engine = Annotated[str | None, typer.Option(
    metavar="NAME", help="ptp (ptp's own engine: every method) or vllm (ptp prunes, vLLM generates: pre-LLM "
                         "methods; needs vLLM installed, see README 'Engines'). [default: ptp]", rich_help_panel=_MODEL)]
Model = Annotated[str | None, typer.Option(
    metavar="DIR|ID", help="Checkpoint directory, hub id (from the local HF cache), 'mini' (ptp-mini: trained, "
    "shipped with ptp) or 'tiny' (random weights, for tests: its answers are noise). [default: OpenGVLab/InternVL2-2B]",
    rich_help_panel=_MODEL)]
Dtype = Annotated[str | None, typer.Option(
    metavar="NAME", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16 or float16. [default: auto]", rich_help_panel=_MODEL)]
Device = Annotated[str | None, typer.Option(metavar="NAME", help="auto, cpu, cuda or cuda:N. [default: auto]", rich_help_panel=_MODEL)]
BatchSize = Annotated[int | None, typer.Option(help="Most records per engine batch. [default: 8]", rich_help_panel=_RUN)]
MaxBatchTokens = Annotated[int | None, typer.Option(
    help="Most prompt tokens (before pruning) per batch. [default: no cap]", rich_help_panel=_RUN)]
MaxPromptTokens = Annotated[int | None, typer.Option(
    help="Longest prompt (before pruning, image tokens included) a record may have; a longer one gets a "
         "prompt_too_long error row. [default: what the model's positions allow]", rich_help_panel=_RUN)]
Workers = Annotated[int | None, typer.Option(
    help="Threads loading and tiling images. [default: 2]", rich_help_panel=_RUN)]
MaxPixels = Annotated[int | None, typer.Option(
    help="Refuse images with more pixels (decompression-bomb guard). [default: 89478485]", rich_help_panel=_RUN)]
MaxTiles = Annotated[int | None, typer.Option(
    help=f"Most 448-px tiles per image, 1..{MAX_TILES}. [default: the checkpoint's, 12 for InternVL2]", rich_help_panel=_RUN)]
MinTiles = Annotated[int | None, typer.Option(
    help=f"Fewest tiles per image, 1..{MAX_TILES}. [default: the checkpoint's]", rich_help_panel=_RUN)]
MaxNewTokens = Annotated[int | None, typer.Option(help="Generation length cap. [default: 64]", rich_help_panel=_GEN)]
Temperature = Annotated[float | None, typer.Option(help="0 = greedy. [default: 0]", rich_help_panel=_GEN)]
Seed = Annotated[int | None, typer.Option(
    help="Seed of sampling and random pruning (a record's 'seed' overrides it). [default: 0]", rich_help_panel=_GEN)]
Logprobs = Annotated[bool | None, typer.Option(
    "--logprobs/--no-logprobs", help="Add generated token ids and log-probabilities to each row.",
    rich_help_panel=_GEN)]
Kept = Annotated[bool | None, typer.Option(
    "--kept/--no-kept", help="Add the kept visual token indices (tile t, token i -> 256*t + i) to each row.",
    rich_help_panel=_GEN)]
SystemMessage = Annotated[str | None, typer.Option(
    help="System message of the prompt. [default: the checkpoint's; none for a -hf checkpoint's own chat "
    "template, as in transformers]", rich_help_panel=_GEN)]
MaxErrors = Annotated[int | None, typer.Option(
    help="Stop (exit 1) once this many records have failed; --resume continues. Whatever this says, 20 "
    "engine failures in a row, or engine failures on every one of the first 5 records, stop the run. "
    "[default: no cap]", rich_help_panel=_RUN)]
Preset = Annotated[str | None, typer.Option(
    metavar="NAME", help="Starting pruning settings: default, ocr or scene ('ptp methods' shows them). [default: default]",
    rich_help_panel=_PRUNE)]
Method = Annotated[str | None, typer.Option(
    metavar="NAME", help="Pruning method: none, ptp, random, spatial, pool, tiles, fastv, vtw or pdrop ('ptp methods' "
         "says what each does). [default: ptp]", rich_help_panel=_PRUNE)]
Ratio = Annotated[float | None, typer.Option(
    help="Fraction of visual tokens pruned, in [0, 1). [default: 0.5]", rich_help_panel=_PRUNE)]
Alpha = Annotated[str | None, typer.Option(
    metavar="NUMBER|auto", help="PTP weight of the instruction score, in [0, 1], or 'auto': chosen per sample "
    "from how concentrated the two scores are. [default: 0.5]", rich_help_panel=_PRUNE)]
VitLayer = Annotated[int | None, typer.Option(
    help="0-based ViT layer whose CLS attention scores tokens. [default: 11]", rich_help_panel=_PRUNE)]
LlmLayer = Annotated[int | None, typer.Option(
    help="0-based LLM layer of the instruction probe. [default: 1]", rich_help_panel=_PRUNE)]
Tau = Annotated[float | None, typer.Option(
    help="Softmax temperature of the region importance, > 0. [default: 1]", rich_help_panel=_PRUNE)]
HeadAgg = Annotated[str | None, typer.Option(
    metavar="NAME", help="Attention reduction over heads: mean or max. [default: mean]", rich_help_panel=_PRUNE)]
InstrAgg = Annotated[str | None, typer.Option(
    metavar="NAME", help="Probe reduction over instruction tokens: max or mean. [default: max]", rich_help_panel=_PRUNE)]
RegionBudgets = Annotated[bool | None, typer.Option(
    "--region-budgets/--no-region-budgets", help="Per-region budgets from CLS similarity (off: uniform). [default: on]",
    rich_help_panel=_PRUNE)]
TokenScore = Annotated[bool | None, typer.Option(
    "--token-score/--no-token-score", help="Use PTP's ViT token score (off: the 'without s' ablation). [default: on]",
    rich_help_panel=_PRUNE)]
FastvLayer = Annotated[int | None, typer.Option(help="FastV: drop after this LLM layer. [default: 2]",
                                                rich_help_panel=_PRUNE)]
VtwLayer = Annotated[int | None, typer.Option(
    help="VTW: withdraw visual tokens after this LLM layer. [default: half the layers]", rich_help_panel=_PRUNE)]
PdropLayers = Annotated[str | None, typer.Option(
    metavar="K1,K2,...", help="PyramidDrop stage ends, e.g. 6,12,18. [default: 1/4, 2/4, 3/4 of the layers]", rich_help_panel=_PRUNE)]
PdropKeep = Annotated[float | None, typer.Option(
    help="Fraction each PyramidDrop stage keeps, in (0, 1]. [default: 0.5]", rich_help_panel=_PRUNE)]
Positions = Annotated[str | None, typer.Option(
    metavar="MODE", help="RoPE positions after pre-LLM pruning: original (each kept token, and the text after the "
    "image, keeps its unpruned position) or contiguous (renumbered 0..n-1: the paper's reading; what --engine vllm "
    "needs). In-LLM methods always keep positions. ptp eval: original,contiguous runs both, a grid axis. "
    "[default: original]", rich_help_panel=_PRUNE)]
Output = Annotated[str | None, typer.Option(
    "--output", "-o", metavar="FILE", help="Write rows to this file (truncated unless --resume) instead of stdout.",
    rich_help_panel=_IO)]
Resume = Annotated[bool | None, typer.Option(
    "--resume/--no-resume", help="Skip the records already in --output (a torn last line is repaired).", rich_help_panel=_IO)]
ForceResume = Annotated[bool | None, typer.Option(
    "--force-resume/--no-force-resume", help="Resume even if --output holds results of other settings.", rich_help_panel=_IO)]
RetryErrors = Annotated[bool | None, typer.Option(
    "--retry-errors/--no-retry-errors", help="With --resume: redo the records that have an error row.", rich_help_panel=_IO)]
Shard = Annotated[str | None, typer.Option(
    metavar="I/N", help="Process only shard I of N (0-based, e.g. 0/4); the N outputs cover every record once.",
    rich_help_panel=_IO)]
ImageRoot = Annotated[str | None, typer.Option(
    metavar="DIR", help="Folder that relative image paths resolve against. "
         "[default: the input file's folder; the current folder for stdin]", rich_help_panel=_IO)]
Check = Annotated[bool | None, typer.Option(
    "--check/--no-check", help="Dry run: check the options and every record (JSON, fields, image, tiles) "
    "without loading the model; report on stderr, write no rows.", rich_help_panel=_IO)]
_RAY = "Ray Data"
Ray = Annotated[bool | None, typer.Option(
    "--ray/--no-ray", help="Run as a Ray Data job: one model per actor, rows as from one process. "
    "Needs the extra: pip install 'ptp-cli[ray]'.", rich_help_panel=_RAY)]
RayAddress = Annotated[str | None, typer.Option(
    metavar="ADDR", help="With --ray: the cluster ('auto', 'ray://host:10001'). [default: a local Ray]",
    rich_help_panel=_RAY)]
RayWorkers = Annotated[int | None, typer.Option(
    metavar="N", help="With --ray: actors, each loading the model once (one GPU each where the cluster has "
    "GPUs). --workers stays the image-loading threads of each actor. [default: 1]", rich_help_panel=_RAY)]
Config = Annotated[Path | None, typer.Option(
    metavar="FILE", help="YAML file of settings (keys: option names, - or _). Also PTP_CONFIG.", rich_help_panel=_RUN)]
Quiet = Annotated[bool | None, typer.Option(
    "--quiet/--no-quiet", "-q", help="Nothing on stderr but errors.", rich_help_panel=_RUN)]
Verbose = Annotated[bool | None, typer.Option(
    "--verbose/--no-verbose", "-v", help="With --ray or --engine vllm: their own log lines too (info level, Ray's workers' output).",
    rich_help_panel=_RUN)]


# ---------------------------------------------------------------------------------------------------------
# Parsing values from text (environment) and YAML


def _parse_text(kind: str, raw: str) -> Any:
    """A setting's value from an environment string; ValueError when it does not parse."""
    text = raw.strip()
    if kind == "str":
        if not text:
            raise ValueError
        return text
    if kind == "int":
        return int(text)
    if kind == "float":
        value = float(text)
        if not math.isfinite(value):
            raise ValueError
        return value
    if kind == "float_or_auto":
        return AUTO if text.lower() == AUTO else _parse_text("float", text)
    if kind == "bool":
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ValueError
    return tuple(int(part) for part in text.split(","))  # "ints"


def _check_yaml(kind: str, value: Any) -> Any:
    """A setting's value from YAML (already typed); ValueError when it has the wrong type."""
    if kind == "str" and isinstance(value, str | int | float) and not isinstance(value, bool):
        return str(value)
    if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind == "float" and isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ValueError
        return float(value)
    if kind == "float_or_auto":
        return _parse_text(kind, value) if isinstance(value, str) else _check_yaml("float", value)
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind == "ints":
        if isinstance(value, str):
            return _parse_text("ints", value)
        if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return tuple(value)
    raise ValueError


def from_environment(environ: Mapping[str, str], names: Iterable[str]) -> dict[str, Any]:
    """The settings among ``names`` that ``PTP_<NAME>`` variables give (empty variables are ignored)."""
    values: dict[str, Any] = {}
    for name in names:
        var = env_var(name)
        raw = environ.get(var)
        if raw is None or (not raw.strip() and SETTINGS[name].kind != "bool"):
            continue
        kind = SETTINGS[name].kind
        try:
            values[name] = _parse_text(kind, raw)
        except ValueError:
            raise UsageError(f"{var}={raw}: {flag(name)} must be {_WHAT[kind]}") from None
    return values


def from_yaml(path: Path, names: Iterable[str]) -> dict[str, Any]:
    """The settings a YAML mapping gives; unknown keys and wrong types are usage errors. ``null`` = not given."""
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
    allowed = set(names)
    values: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in allowed:
            raise UsageError(
                f"--config: {path}: unknown key {key!r} (keys are option names, e.g. ratio, max-new-tokens)"
            )
        if value is None:
            continue
        kind = SETTINGS[name].kind
        try:
            values[name] = _check_yaml(kind, value)
        except ValueError:
            raise UsageError(f"--config: {path}: {key}: {flag(name)} must be {_WHAT[kind]}, not {value!r}") from None
    return values


# ---------------------------------------------------------------------------------------------------------
# Merging


@dataclass(frozen=True)
class Resolved:
    """Every setting after precedence, and where each came from."""

    values: dict[str, Any]  # setting name -> value, for every setting some source gave
    sources: dict[str, str]  # setting name -> "command line", "PTP_RATIO=0.3", or "cfg.yaml"

    def get(self, name: str, default: Any = None) -> Any:
        return self.values.get(name, default)

    def explain(self, err: UsageError) -> UsageError:
        """``err`` with the source of the option it names appended, when that was not the command line."""
        message = str(err)
        m = _OPTION_IN_MESSAGE.search(message)
        name = m[1].replace("-", "_") if m else None
        source = self.sources.get(name or "")
        if source is None or source == COMMAND_LINE or source in message:
            return err
        return UsageError(f"{message} (from {source})")


def resolve(
    given: Mapping[str, Any],
    *,
    names: Iterable[str],
    environ: Mapping[str, str] | None = None,
    config: Path | None = None,
) -> Resolved:
    """Merge command line (``given``: the options not None), environment and YAML for the settings ``names``.

    ``config`` is the --config value (None: $PTP_CONFIG, if set).
    """
    names = list(names)
    environ = os.environ if environ is None else environ
    if config is None and environ.get("PTP_CONFIG", "").strip():
        config = Path(environ["PTP_CONFIG"].strip())
    layers: list[tuple[dict[str, Any], Callable[[str], str]]] = []
    if config is not None:
        layers.append((from_yaml(config, names), lambda _name: str(config)))
    layers.append((from_environment(environ, names), lambda name: f"{env_var(name)}={environ[env_var(name)]}"))
    cli = {k: v for k, v in given.items() if v is not None}
    for name, value in cli.items():
        kind = SETTINGS[name].kind
        if kind in _PARSED_FROM_TEXT and isinstance(value, str):
            try:
                cli[name] = _parse_text(kind, value)
            except ValueError:
                raise UsageError(f"{flag(name)} must be {_WHAT[kind]}, got {value!r}") from None
    layers.append((cli, lambda _name: COMMAND_LINE))
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for layer, where in layers:  # lowest precedence first
        for name, value in layer.items():
            values[name] = value
            sources[name] = where(name)
    return Resolved(values, sources)


def prune_config(resolved: Resolved) -> PruneConfig:
    """The PruneConfig: the preset (or the defaults), then every pruning setting given on top."""
    from ptp_cli.pruning import PRESETS  # no torch; loaded only by the commands that prune

    preset = resolved.get("preset", "default")
    if preset not in PRESETS:
        err = UsageError(f"--preset: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        raise resolved.explain(err)
    base = PRESETS[preset]
    fields = {s.field_name(n): resolved.values[n] for n, s in SETTINGS.items()
              if s.target == "prune" and n in resolved.values}
    return dataclasses.replace(base, **fields)


def check_limits(resolved: Resolved) -> None:
    """The value ranges of the run and pruning settings given, before torch is imported (a fast failure)."""
    values = {SETTINGS[n].field_name(n): v for n, v in resolved.values.items()
              if SETTINGS[n].target != "cli" or n == "preset"}
    try:
        check_values(values)
    except UsageError as e:
        raise resolved.explain(e) from None


def run_config(resolved: Resolved) -> RunConfig:
    """The RunConfig of a run, validated as far as possible without the model."""
    check_limits(resolved)
    from ptp_cli.run_config import RunConfig  # no torch, but Pillow and numpy: keep `ptp --help` fast

    fields = {n: v for n, v in resolved.values.items() if SETTINGS[n].target == "run"}
    config = RunConfig(prune=prune_config(resolved), **fields)
    try:
        config.validate()
    except UsageError as e:
        raise resolved.explain(e) from None
    return config
