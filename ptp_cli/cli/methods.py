"""``ptp methods``: the registered pruning methods and the presets, with their settings."""

from __future__ import annotations

import dataclasses
import json
from typing import Annotated, Any

import typer

from ptp_cli.pruning import METHODS, PRESETS  # the registry by name and the settings: no torch
from ptp_cli.pruning.catalog import POSITION_MODES
from ptp_cli.settings import SETTINGS


def position_note(name: str) -> str:
    """How method ``name`` numbers the kept visual tokens for RoPE: what ``--positions`` does to it."""
    caps = METHODS[name].capabilities
    if caps.prunes_in_llm:
        return "keeps original positions (in the LLM: --positions does not apply)"
    if not caps.uses_ratio:
        return "every token at its own position"
    return f"--positions {'|'.join(POSITION_MODES)}"


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return "auto" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def methods_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")] = False,
) -> None:
    """List the pruning methods (--method) and the presets (--preset) with their settings."""
    option = {s.field_name: n for n, s in SETTINGS.items() if s.target == "prune"}  # field -> option name
    methods = {name: entry.summary for name, entry in sorted(METHODS.items())}
    presets = {name: {option.get(k, k): v for k, v in dataclasses.asdict(cfg).items()} for name, cfg in PRESETS.items()}
    in_vit = [name for name, entry in sorted(METHODS.items()) if entry.capabilities.prunes_in_vit]
    if as_json:
        positions = {name: position_note(name) for name in methods}
        typer.echo(json.dumps({"methods": methods, "vit_prune": in_vit, "positions": positions, "presets": presets},
                              indent=2))
        return
    width = max(map(len, [*methods, *presets]))
    lines = ["Pruning methods (--method NAME):"]
    lines += [f"  {name:<{width}}  {text} [{position_note(name)}]" for name, text in methods.items()]
    lines += ["", f"Also inside the ViT (--vit-prune R: after --vit-layer, drop a fraction R of each tile's 2x2 patch "
              f"blocks, then prune the survivors to --ratio): {', '.join(in_vit)}"]
    lines += ["", "Presets (--preset NAME; options given explicitly win; 'auto': set from the model's depth):"]
    default = presets.get("default", {})
    for name, settings in presets.items():
        shown = settings if name == "default" else {k: v for k, v in settings.items() if v != default.get(k)}
        text = " ".join(f"{k.replace('_', '-')}={_show(v)}" for k, v in shown.items())
        lines.append(f"  {name:<{width}}  {text if name == 'default' else text + '  (the rest as default)'}")
    typer.echo("\n".join(lines))
