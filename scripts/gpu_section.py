"""Write a GPU check's bench table into a Markdown doc: ``gpu_section.py DOC DEVICE TABLE_FILE``.

The section between the gpu-check markers is replaced (appended the first time), so reruns do not pile up.
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

START, END = "<!-- gpu-check:start -->", "<!-- gpu-check:end -->"


def section(device: str, table: str, *, versions: str) -> str:
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (f"{START}\n## GPU check: {device}\n\n`scripts/gpu-check.sh` on {when}, {versions}:\n\n"
            f"```\n{table.rstrip()}\n```\n{END}")


def write(doc: Path, text: str) -> None:
    old = doc.read_text() if doc.exists() else ""
    if START in old and END in old:
        new = old[: old.index(START)] + text + old[old.index(END) + len(END) :]
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    doc.write_text(new)


def main() -> None:
    import torch

    import ptp_cli

    doc, device, table = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]).read_text()
    versions = f"ptp {ptp_cli.__version__}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    write(doc, section(device, table, versions=versions))
    print(f"gpu-check: wrote the table into {doc}", file=sys.stderr)


if __name__ == "__main__":
    main()
