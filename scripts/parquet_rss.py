"""Peak memory of reading a Parquet file of images through ptp's reader (is it flat in the row count?).

    python scripts/parquet_rss.py write ROWS FILE [ROW_GROUP]   # ROWS distinct 640x480 JPEGs (~60 KB each)
    python scripts/parquet_rss.py read FILE                     # every record read and its image decoded

``read`` prints the rows read, the seconds taken and the process's peak RSS (MiB). Run each size in its own
process, so one peak does not hide another.
"""

from __future__ import annotations

import io
import resource
import sys
import time

import numpy as np
from PIL import Image


def write(rows: int, path: str, row_group: int = 100) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    schema = pa.schema([("id", pa.int64()), ("question", pa.string()),
                        ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())]))])
    with pq.ParquetWriter(path, schema) as out:
        for start in range(0, rows, row_group):
            n = min(row_group, rows - start)
            images = []
            for _ in range(n):
                pixels = rng.integers(0, 255, (480 // 8, 640 // 8, 3), dtype=np.uint8)  # blocky noise: ~60 KB
                buf = io.BytesIO()
                Image.fromarray(pixels).resize((640, 480), Image.NEAREST).save(buf, format="JPEG", quality=90)
                images.append({"bytes": buf.getvalue(), "path": None})
            out.write_table(pa.table({"id": list(range(start, start + n)), "question": ["What is this?"] * n,
                                      "image": images}, schema=schema))


def read(path: str) -> None:
    from ptp_cli.io.formats import open_input
    from ptp_cli.io.records import Record
    from ptp_cli.preprocess.image import load_image

    t0 = time.perf_counter()
    n = 0
    for item in open_input(path).records():
        assert isinstance(item, Record)
        load_image(item.image)
        n += 1
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{n} rows in {time.perf_counter() - t0:.1f} s, peak RSS {peak:.0f} MiB")


if __name__ == "__main__":
    if sys.argv[1] == "write":
        write(int(sys.argv[2]), sys.argv[3], *(int(a) for a in sys.argv[4:]))
    else:
        read(sys.argv[2])
