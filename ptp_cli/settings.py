"""Every user-facing setting of a run, declared once; no torch.

A ``Setting`` says everything about one setting: its value type, default, allowed values, help text, the config
it feeds and the commands that take it. The rest is derived from this table: the dataclass defaults of
``RunConfig`` and ``PruneConfig`` (``default``), the checks those dataclasses run when they are built
(``check_value``), the Typer options of ``ptp infer`` and ``ptp eval`` and their ``PTP_<NAME>`` variables and
YAML keys (``ptp_cli/cli/options.py``), and the settings table of the docs (``markdown_table``, written to
docs/settings.md; a test keeps the two equal).

Adding a setting: one ``Setting(...)`` here, a field in the config it feeds, and the code that uses it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from ptp_cli.config import MAX_TILES
from ptp_cli.errors import UsageError
from ptp_cli.preprocess.image import DEFAULT_MAX_PIXELS

AUTO = "auto"  # the one word a number setting may take instead of a number: alpha chosen per sample
AGGREGATIONS = ("mean", "max")  # reductions over attention heads / instruction tokens
DTYPE_NAMES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")
ENGINE_NAMES = ("ptp", "vllm")  # ptp's own engine; vLLM generating from ptp's pruned embeddings
INPUT_FORMATS = ("jsonl", "parquet", "arrow", "webdataset", "openai")  # what ptp infer reads (io/formats)
OUTPUT_FORMATS = ("jsonl", "parquet", "openai")  # what it writes

Kind = Literal["str", "int", "float", "bool", "ints", "float_or_auto"]
Target = Literal["run", "prune", "cli"]  # RunConfig field, PruneConfig field, or read by the command itself
INFER, EVAL = "infer", "eval"
BOTH = (INFER, EVAL)

# Help panels
MODEL, PRUNING, GENERATION, IO, RUN, RAY = "Model", "Pruning", "Generation", "Input and output", "Run", "Ray Data"


def method_names() -> tuple[str, ...]:
    """The registered methods (the torch-free catalog: a typo fails before torch loads)."""
    from ptp_cli.pruning.catalog import METHODS  # at call time: the pruning package imports this module

    return tuple(sorted(METHODS))


def preset_names() -> tuple[str, ...]:
    from ptp_cli.pruning.catalog import PRESETS

    return tuple(PRESETS)


def position_modes() -> tuple[str, ...]:
    from ptp_cli.pruning.catalog import POSITION_MODES

    return POSITION_MODES


@dataclass(frozen=True)
class Rule:
    """What a setting's value must satisfy, and how to say it."""

    ok: Callable[[Any], bool]  # True when the value is allowed
    says: str | Callable[[], str]  # completes "--name ...", e.g. "must be in [0, 1)"; a callable: read when needed

    @property
    def text(self) -> str:
        return self.says if isinstance(self.says, str) else self.says()


@dataclass(frozen=True)
class Setting:
    """One user-facing setting, declared once."""

    name: str  # the option's name with _ for -: --max-new-tokens is max_new_tokens, PTP_MAX_NEW_TOKENS
    kind: Kind  # "ints": comma-separated integers (6,12,18); "float_or_auto": a number or the word auto
    default: Any  # the value when nothing sets it (None: not set, or decided by the model: see default_text)
    help: str
    panel: str  # the help section it is listed in
    target: Target
    field: str | None = None  # the config field, when it is not named like the setting
    rule: Rule | None = None  # allowed values (None: any value of the kind); None always passes for an optional
    metavar: str | None = None  # what --help calls the value; derived from the kind when None
    default_text: str | None = None  # what --help and the docs show as the default, when ``default`` does not say
    short: str | None = None  # a one-letter alias, e.g. -o
    commands: tuple[str, ...] = BOTH  # the commands that take it

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "PTP_" + self.name.upper()

    @property
    def field_name(self) -> str:
        return self.field or self.name

    def shown_default(self) -> str | None:
        """The default as --help and the docs write it; None when there is nothing to say."""
        if self.default_text is not None:
            return self.default_text
        if self.kind == "bool":
            return "on" if self.default else None
        return None if self.default is None else str(self.default)

    @property
    def value_name(self) -> str:
        return self.metavar or {"int": "N", "float": "NUMBER", "str": "TEXT", "ints": "K1,K2,...",
                                "float_or_auto": f"NUMBER|{AUTO}", "bool": ""}[self.kind]


def _one_of(names: tuple[str, ...]) -> Rule:
    return Rule(lambda v: v in names, f"must be one of {', '.join(names)}")


def _one_of_registered(names: Callable[[], tuple[str, ...]]) -> Rule:
    return Rule(lambda v: v in names(), lambda: f"must be one of {', '.join(names())}")


def _or_auto(rule: Rule) -> Rule:
    """``rule`` for a number, or the word ``auto``; any other string fails (rather than raising TypeError)."""
    return Rule(lambda v: v == AUTO or (not isinstance(v, str) and rule.ok(v)), f"{rule.text} or {AUTO}")


_AT_LEAST_1 = Rule(lambda v: v >= 1, "must be at least 1")
_LAYER = Rule(lambda v: v >= 0, "must be >= 0")
_TILES = Rule(lambda v: 1 <= v <= MAX_TILES, f"must be in 1..{MAX_TILES}")


def _s(name: str, kind: Kind, default: Any, help: str, panel: str, target: Target, **kw: Any) -> Setting:
    return Setting(name, kind, default, help, panel, target, **kw)


_TABLE: tuple[Setting, ...] = (
    # --- model and run
    _s("model", "str", "OpenGVLab/InternVL2-2B", "Checkpoint directory, hub id (from the local HF cache), 'mini' "
       "(ptp-mini: trained, shipped with ptp) or 'tiny' (random weights, for tests: its answers are noise).",
       MODEL, "run", metavar="DIR|ID"),
    _s("engine", "str", "ptp", "ptp (ptp's own engine: every method) or vllm (ptp prunes, vLLM generates: pre-LLM "
       "methods; needs vLLM installed, see README 'Engines').", MODEL, "run", rule=_one_of(ENGINE_NAMES),
       metavar="NAME"),
    _s("vllm_memory", "float", 0.7, "--engine vllm on a GPU: the fraction of its memory vLLM takes (weights, KV "
       "cache, its activations); the rest stays for ptp's ViT, probe and batches.", MODEL, "run",
       rule=Rule(lambda v: 0.0 < v < 1.0, "must be in (0, 1)"), metavar="F"),
    _s("dtype", "str", "auto", "auto (bf16 on GPU, fp32 on CPU), float32, bfloat16 or float16.", MODEL, "run",
       rule=_one_of(DTYPE_NAMES), metavar="NAME"),
    _s("device", "str", "auto", "auto, cpu, cuda or cuda:N.", MODEL, "run", metavar="NAME"),
    _s("batch_size", "int", 8, "Most records per engine batch.", RUN, "run", rule=_AT_LEAST_1),
    _s("max_batch_tokens", "int", None, "Most prompt tokens (before pruning) per batch.", RUN, "run",
       rule=_AT_LEAST_1, default_text="no cap"),
    _s("max_prompt_tokens", "int", None, "Longest prompt (before pruning, image tokens included) a record may "
       "have; a longer one gets a prompt_too_long error row.", RUN, "run", rule=_AT_LEAST_1,
       default_text="what the model's positions allow"),
    _s("workers", "int", 2, "Threads loading and tiling images.", RUN, "run", rule=_AT_LEAST_1),
    _s("max_pixels", "int", DEFAULT_MAX_PIXELS, "Refuse images with more pixels (decompression-bomb guard).", RUN,
       "run", rule=_AT_LEAST_1),
    _s("max_tiles", "int", None, f"Most 448-px tiles per image, 1..{MAX_TILES}.", RUN, "run", rule=_TILES,
       default_text="the checkpoint's, 12 for InternVL2"),
    _s("min_tiles", "int", None, f"Fewest tiles per image, 1..{MAX_TILES}.", RUN, "run", rule=_TILES,
       default_text="the checkpoint's"),
    _s("max_errors", "int", None, "Stop (exit 1) once this many records have failed; --resume continues. Whatever "
       "this says, 20 engine failures in a row, or engine failures on every one of the first 5 records, stop the "
       "run.", RUN, "run", rule=_AT_LEAST_1, default_text="no cap", commands=(INFER,)),
    # --- generation
    _s("max_new_tokens", "int", 64, "Generation length cap.", GENERATION, "run", rule=_AT_LEAST_1),
    _s("temperature", "float", 0.0, "0 = greedy.", GENERATION, "run", rule=Rule(lambda v: v >= 0, "must be >= 0"),
       default_text="0"),
    _s("seed", "int", 0, "Seed of sampling and random pruning (a record's 'seed' overrides it).", GENERATION, "run"),
    _s("logprobs", "bool", False, "Add generated token ids and log-probabilities to each row.", GENERATION, "run",
       commands=(INFER,)),
    _s("kept", "bool", False, "Add the kept visual token indices (tile t, token i -> 256*t + i) to each row.",
       GENERATION, "run"),
    _s("system_message", "str", None, "System message of the prompt.", GENERATION, "run",
       default_text="the checkpoint's; none for a -hf checkpoint's own chat template, as in transformers",
       commands=(INFER,)),
    # --- pruning
    _s("preset", "str", "default", "Starting pruning settings: default, ocr or scene ('ptp methods' shows them).",
       PRUNING, "cli", rule=_one_of_registered(preset_names), metavar="NAME"),
    _s("method", "str", "ptp", "Pruning method, e.g. none, ptp or random ('ptp methods' lists them all and says "
       "what each does).", PRUNING, "prune", rule=_one_of_registered(method_names), metavar="NAME", commands=(INFER,)),
    _s("ratio", "float", 0.5, "Fraction of visual tokens pruned, in [0, 1).", PRUNING, "prune",
       rule=Rule(lambda v: 0.0 <= v < 1.0, "must be in [0, 1)"), commands=(INFER,)),
    _s("alpha", "float_or_auto", 0.5, "PTP weight of the instruction score, in [0, 1], or 'auto': chosen per "
       "sample from how concentrated the two scores are.", PRUNING, "prune",
       rule=_or_auto(Rule(lambda v: 0.0 <= v <= 1.0, "must be in [0, 1]"))),
    _s("vit_layer", "int", 11, "0-based ViT layer whose CLS attention scores tokens.", PRUNING, "prune",
       rule=_LAYER),
    _s("llm_layer", "int", 1, "0-based LLM layer of the instruction probe.", PRUNING, "prune", rule=_LAYER),
    _s("tau", "float", 1.0, "Softmax temperature of the region importance, > 0.", PRUNING, "prune",
       rule=Rule(lambda v: v > 0, "must be > 0"), default_text="1"),
    _s("head_agg", "str", "mean", "Attention reduction over heads: mean or max.", PRUNING, "prune",
       rule=_one_of(AGGREGATIONS), metavar="NAME"),
    _s("instr_agg", "str", "max", "Probe reduction over instruction tokens: max or mean.", PRUNING, "prune",
       rule=_one_of(AGGREGATIONS), metavar="NAME"),
    _s("region_budgets", "bool", True, "Per-region budgets from CLS similarity (off: uniform).", PRUNING, "prune"),
    _s("token_score", "bool", True, "Use PTP's ViT token score (off: the 'without s' ablation).", PRUNING, "prune",
       field="use_token_score"),
    _s("fastv_layer", "int", 2, "FastV: drop after this LLM layer.", PRUNING, "prune"),
    _s("vtw_layer", "int", None, "VTW: withdraw visual tokens after this LLM layer.", PRUNING, "prune",
       default_text="half the layers"),
    _s("pdrop_layers", "ints", None, "PyramidDrop stage ends, e.g. 6,12,18.", PRUNING, "prune",
       default_text="1/4, 2/4, 3/4 of the layers"),
    _s("pdrop_keep", "float", 0.5, "Fraction each PyramidDrop stage keeps, in (0, 1].", PRUNING, "prune",
       rule=Rule(lambda v: 0.0 < v <= 1.0, "must be in (0, 1]")),
    _s("positions", "str", None, "RoPE positions after pre-LLM pruning: original (each kept token, and the "
       "text after the image, keeps its unpruned position) or contiguous (renumbered 0..n-1: the paper's reading; "
       "what --engine vllm needs, and its default there). In-LLM methods always keep positions. ptp eval: "
       "original,contiguous runs both, a grid axis.", PRUNING, "prune", rule=_one_of_registered(position_modes),
       metavar="MODE", default_text="original; contiguous with --engine vllm"),
    _s("vit_prune", "float", 0.0, "ptp, random, spatial: also prune inside the ViT: after --vit-layer drop this "
       "fraction of each tile's 2x2 patch blocks and run the later ViT layers on the rest; in [0, --ratio], 0 = off.",
       PRUNING, "prune", rule=Rule(lambda v: 0.0 <= v < 1.0, "must be in [0, 1)"), metavar="R", default_text="0"),
    _s("vit_prune_thumbnail", "bool", True, "With --vit-prune: prune the thumbnail inside the ViT too (off: it runs "
       "every ViT layer whole).", PRUNING, "prune"),
    # --- input and output (ptp infer)
    _s("output", "str", None, "Write rows to this file (truncated unless --resume) instead of stdout.", IO, "cli",
       metavar="FILE", short="-o", default_text="stdout", commands=(INFER,)),
    _s("resume", "bool", False, "Skip the records already in --output (a torn last line is repaired).", IO, "cli",
       commands=(INFER,)),
    _s("force_resume", "bool", False, "Resume even if --output holds results of other settings.", IO, "cli",
       commands=(INFER,)),
    _s("retry_errors", "bool", False, "With --resume: redo the records that have an error row.", IO, "cli",
       commands=(INFER,)),
    _s("shard", "str", None, "Process only shard I of N (0-based, e.g. 0/4); the N outputs cover every record "
       "once.", IO, "cli", metavar="I/N", commands=(INFER,)),
    _s("image_root", "str", None, "Folder that relative image paths resolve against.", IO, "cli", metavar="DIR",
       default_text="the input file's folder; the current folder for stdin", commands=(INFER,)),
    _s("check", "bool", False, "Dry run: check the options and every record (JSON, fields, image, tiles) without "
       "loading the model; report on stderr, write no rows.", IO, "cli", commands=(INFER,)),
    # --- input and output formats (ptp infer; ptp_cli.io.formats)
    _s("input_format", "str", None, "jsonl, parquet (a file, a folder of parts or a glob), arrow (a datasets "
       "save_to_disk folder or an .arrow file), webdataset (.tar shards; shard-{000..009}.tar patterns too) or "
       "openai (a batch file).", IO, "cli", rule=_one_of(INPUT_FORMATS), metavar="NAME",
       default_text="from INPUT's name; a .jsonl of batch requests is openai", commands=(INFER,)),
    _s("output_format", "str", None, "jsonl, parquet (a folder of part files) or openai (batch output lines).", IO,
       "cli", rule=_one_of(OUTPUT_FORMATS), metavar="NAME",
       default_text="parquet for an --output ending .parquet; openai for an openai input; else jsonl",
       commands=(INFER,)),
    _s("image_column", "str", None, "Parquet/Arrow: the image column (bytes, a path, or a datasets Image struct). "
       "WebDataset: the image member's extension.", IO, "cli", metavar="NAME",
       default_text="image, img, ...; WebDataset: jpg, png, ...", commands=(INFER,)),
    _s("question_column", "str", None, "Parquet/Arrow: the question column. WebDataset: the .json field, or txt "
       "for the .txt member.", IO, "cli", metavar="NAME", default_text="question, then prompt", commands=(INFER,)),
    _s("id_column", "str", None, "Parquet/Arrow/WebDataset: the id column (JSON field).", IO, "cli",
       metavar="NAME", default_text="id if there; else the row number, or the WebDataset key", commands=(INFER,)),
    # --- Ray Data (ptp infer --ray)
    _s("ray", "bool", False, "Run as a Ray Data job: one model per actor, rows as from one process. Needs the "
       "extra: pip install 'ptp-cli[ray]'.", RAY, "cli", commands=(INFER,)),
    _s("ray_address", "str", None, "With --ray: the cluster ('auto', 'ray://host:10001').", RAY, "cli",
       metavar="ADDR", default_text="a local Ray", commands=(INFER,)),
    _s("ray_workers", "int", None, "With --ray: actors, each loading the model once (one GPU each where the "
       "cluster has GPUs). --workers stays the image-loading threads of each actor.", RAY, "cli", metavar="N",
       rule=_AT_LEAST_1, default_text="1", commands=(INFER,)),
    # --- console
    _s("quiet", "bool", False, "Nothing on stderr but errors.", RUN, "cli", short="-q"),
    _s("verbose", "bool", False, "With --ray or --engine vllm: their own log lines too (info level, Ray's workers' "
       "output).", RUN, "cli", short="-v", commands=(INFER,)),
)

SETTINGS: dict[str, Setting] = {s.name: s for s in _TABLE}
BY_FIELD: dict[tuple[Target, str], Setting] = {(s.target, s.field_name): s for s in _TABLE}


def names_for(command: str) -> tuple[str, ...]:
    """The settings ``command`` takes, in the table's order."""
    return tuple(s.name for s in _TABLE if command in s.commands)


def default(name: str) -> Any:
    """The declared default of a setting (what its config field defaults to)."""
    return SETTINGS[name].default


# ---------------------------------------------------------------------------------------------------------
# Checking values


_WHAT = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false",
         "ints": "comma-separated integers (e.g. 6,12,18)", "float_or_auto": f"a number or {AUTO}"}


def describe_kind(kind: Kind) -> str:
    return _WHAT[kind]


def check_value(setting: Setting, value: Any) -> None:
    """Raise ``UsageError`` naming the option when ``value`` is not allowed (None: not set, always allowed)."""
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise UsageError(f"{setting.flag} must be a finite number, got {value!r}")
    if setting.rule is not None and not setting.rule.ok(value):
        raise UsageError(f"{setting.flag} {setting.rule.text}, got {value!r}")


def check_fields(target: Target, values: dict[str, Any]) -> None:
    """Check each field of a config of ``target`` that a setting feeds (fields without one pass)."""
    for field_name, value in values.items():
        setting = BY_FIELD.get((target, field_name))
        if setting is not None:
            check_value(setting, value)


def parse_text(kind: Kind, raw: str) -> Any:
    """A value from text (an environment variable, or an option Typer takes as text); ValueError if it does not
    parse."""
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
        return AUTO if text.lower() == AUTO else parse_text("float", text)
    if kind == "bool":
        if text.lower() in {"1", "true", "yes", "on"}:
            return True
        if text.lower() in {"0", "false", "no", "off", ""}:
            return False
        raise ValueError
    return tuple(int(part) for part in text.split(","))  # "ints"


def from_yaml_value(kind: Kind, value: Any) -> Any:
    """A value from YAML (already typed); ValueError when it has the wrong type."""
    if kind == "str" and isinstance(value, str | int | float) and not isinstance(value, bool):
        return str(value)
    if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind == "float" and isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ValueError
        return float(value)
    if kind == "float_or_auto":
        return parse_text(kind, value) if isinstance(value, str) else from_yaml_value("float", value)
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind == "ints":
        if isinstance(value, str):
            return parse_text("ints", value)
        if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return tuple(value)
    raise ValueError


# ---------------------------------------------------------------------------------------------------------
# The docs' table


def markdown_table() -> str:
    """docs/settings.md: every setting, its option, variable, default, rule and help (generated; a test checks)."""
    lines = [
        "# Settings",
        "",
        "Generated from `ptp_cli/settings.py` (`python -m ptp_cli.settings > docs/settings.md`); do not edit by hand.",
        "",
        "Every setting can be given on the command line, as an environment variable, or as a key of the YAML file",
        "given with `--config FILE` (or `PTP_CONFIG`; keys are option names, `-` or `_`). The command line wins",
        "over the environment, the environment over the YAML file, and the YAML file over `--preset` and the",
        "defaults. `ptp eval` takes the settings marked eval, and reads the same variables and YAML file.",
        "",
        "| option | variable | default | allowed | commands | what it does |",
        "|---|---|---|---|---|---|",
    ]
    for s in _TABLE:
        option = f"`{s.flag}`" if s.kind != "bool" else f"`{s.flag}` / `--no-{s.flag[2:]}`"
        if s.short:
            option += f", `{s.short}`"
        allowed = s.rule.text.removeprefix("must be ") if s.rule is not None else describe_kind(s.kind)
        shown = s.shown_default()
        lines.append(f"| {option} | `{s.env}` | {shown if shown is not None else 'off' if s.kind == 'bool' else '-'} "
                     f"| {allowed} | {', '.join(s.commands)} | {s.help} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
