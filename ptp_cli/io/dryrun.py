"""A dry run (``ptp infer --check``): every record checked as a real run would, without a model.

Each record is parsed (JSON, fields, overrides), its image loaded in full (found, readable, within the pixel
cap) and tiled on paper (the tile count, not the pixels). Failures are the ``RecordError``s a real run would
write as error rows, so a clean check means no record fails before it reaches the model.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from ptp_cli.errors import RecordError
from ptp_cli.io.records import BadRecord, JsonScalar, Record, is_missing_image
from ptp_cli.preprocess.image import TilingOptions, load_image, record_tiling


def check_record(record: Record, *, tiling: TilingOptions, max_pixels: int) -> int:
    """The record's tile count (thumbnail included); raises the RecordError a real run would give it."""
    tiling = record_tiling(tiling, record.overrides)
    image = load_image(record.image, max_pixels=max_pixels)
    return tiling.num_tiles(*image.size)


@dataclass
class CheckReport:
    """What a dry run found."""

    records: int = 0  # non-blank input lines checked
    failed: int = 0  # of those, records a real run would fail before the model
    tiles: int = 0  # tiles of the good records, thumbnails included
    missing_relative: int = 0  # failed because a relative image path names no file (a wrong image root?)
    errors: list[tuple[int, JsonScalar, RecordError]] = field(default_factory=list)  # (line, id, error), first ones

    @property
    def ok(self) -> int:
        return self.records - self.failed


def check_records(
    items: Iterable[Record | BadRecord], *, tiling: TilingOptions, max_pixels: int, keep_errors: int = 10
) -> CheckReport:
    """Check every item (as ``iter_records`` yields them); keep the first ``keep_errors`` errors."""
    report = CheckReport()
    for item in items:
        report.records += 1
        try:
            if isinstance(item, BadRecord):
                raise item.error
            report.tiles += check_record(item, tiling=tiling, max_pixels=max_pixels)
        except RecordError as e:
            report.failed += 1
            relative = isinstance(item, Record) and item.image_relative
            report.missing_relative += relative and is_missing_image(e.kind, str(e))
            if len(report.errors) < keep_errors:
                report.errors.append((item.line, item.id, e))
    return report
