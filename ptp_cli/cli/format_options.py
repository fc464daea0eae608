"""The Typer options of ``ptp infer``'s input and output formats (``ptp_cli.formats``); their settings are in
``options.SETTINGS`` like every other (environment, --config)."""

from __future__ import annotations

from typing import Annotated

import typer

_FORMATS = "Formats"
InputFormat = Annotated[str | None, typer.Option(
    metavar="NAME", help="jsonl, parquet (a file, a folder of parts or a glob), arrow (a datasets save_to_disk "
    "folder or an .arrow file), webdataset (.tar shards; shard-{000..009}.tar patterns too) or openai (a batch "
    "file). [default: from INPUT's name; a .jsonl of batch requests is openai]", rich_help_panel=_FORMATS)]
OutputFormat = Annotated[str | None, typer.Option(
    metavar="NAME", help="jsonl, parquet (a folder of part files) or openai (batch output lines). "
    "[default: parquet for an --output ending .parquet; openai for an openai input; else jsonl]",
    rich_help_panel=_FORMATS)]
ImageColumn = Annotated[str | None, typer.Option(
    metavar="NAME", help="Parquet/Arrow: the image column (bytes, a path, or a datasets Image struct). "
    "WebDataset: the image member's extension. [default: image, img, ...; WebDataset: jpg, png, ...]",
    rich_help_panel=_FORMATS)]
QuestionColumn = Annotated[str | None, typer.Option(
    metavar="NAME", help="Parquet/Arrow: the question column. WebDataset: the .json field, or txt for the .txt "
    "member. [default: question, then prompt]", rich_help_panel=_FORMATS)]
IdColumn = Annotated[str | None, typer.Option(
    metavar="NAME", help="Parquet/Arrow/WebDataset: the id column (JSON field). [default: id if there; else the "
    "row number, or the WebDataset key]", rich_help_panel=_FORMATS)]
