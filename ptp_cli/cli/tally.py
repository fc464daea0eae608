"""What ``ptp infer`` counts while rows stream by, and what it says at the end: the summary, and the hint when
most records named a relative image path that is not there."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ptp_cli.cli.console import plural
from ptp_cli.io.records import BadRecord, Record, is_missing_image


@dataclass
class Stats:
    """Counts for the final summary."""

    ok: int = 0
    failed: int = 0
    generated_tokens: int = 0
    visual_before: int = 0
    visual_after: int = 0
    missing_relative: int = 0  # failed with "image not found" on a relative image path

    def add(self, row: dict[str, Any], *, relative: bool = False) -> None:
        if (err := row.get("error")) is not None:
            self.failed += 1
            self.missing_relative += relative and is_missing_image(err["type"], err["message"])
            return
        self.ok += 1
        tokens = row.get("tokens") or {}
        self.generated_tokens += tokens.get("generated") or 0
        self.visual_before += tokens.get("visual_before") or 0
        self.visual_after += tokens.get("visual_after") or 0

    def summary(self, elapsed: float) -> str:
        total = self.ok + self.failed
        rate = f"{self.ok / elapsed:.2f} samples/s, {self.generated_tokens / elapsed:.1f} tokens/s" if elapsed else ""
        text = f"{plural(total, 'record')} in {elapsed:.1f} s: {self.ok} ok, {self.failed} failed"
        if self.ok:
            before, after = self.visual_before / self.ok, self.visual_after / self.ok
            kept = f" ({100 * after / before:.0f}%)" if before else ""
            text += f" | {rate} | visual tokens kept {after:.1f} / {before:.1f} per sample{kept}"
        return text


def noting_relative(items: Iterator[Record | BadRecord], lines: set[int]) -> Iterator[Record | BadRecord]:
    """``items`` unchanged; the lines of records whose image path was relative are added to ``lines``."""
    for item in items:
        if isinstance(item, Record) and item.image_relative:
            lines.add(item.line)
        yield item


def image_root_hint(missing: int, total: int, source: str, image_root: str | None) -> str | None:
    """When most records named a relative image that is not there: where such paths resolve, and the fix."""
    if not total or 2 * missing <= total:
        return None
    if image_root is not None:
        where = f"--image-root {image_root}"
    else:
        where = "the current folder (stdin)" if source == "-" else f"the folder of {source}"
    return (
        f"hint: {missing} of {plural(total, 'record')} name a relative image path that does not exist under "
        f"{where}; pass --image-root DIR, the folder those paths are relative to"
    )
