"""`grit`: GRIT's layout (Kosmos-2's grounded image-text pairs), one Parquet part per shard:
`key`, `url`, `caption`, `width`, `height`, `noun_chunks` (one [start, end, x1, y1, x2, y2, score] per region:
its phrase's first place in `caption`, its box normalised to [0, 1]), plus `image_location`, `image_offset`
and `image_length` so the image can be read without fetching `url` again."""

from __future__ import annotations

from typing import BinaryIO, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from vesl.export.part import Format, Item

GRIT_SCHEMA = pa.schema([
    ("key", pa.string()), ("url", pa.string()), ("caption", pa.string()), ("width", pa.int32()),
    ("height", pa.int32()), ("noun_chunks", pa.list_(pa.list_(pa.float64()))),
    ("image_location", pa.string()), ("image_offset", pa.int64()), ("image_length", pa.int64()),
])


def grit_record(item: Item) -> dict:
    chunks = [[float(spans[0][0]), float(spans[0][1]), *(round(float(v), 6) for v in r["box"]), round(r["score"], 6)]
              for r, spans in zip(item.regions, item.text_spans)]
    row = item.row
    return {"key": row["image_id"], "url": row.get("image_uri"), "caption": item.text, "width": row["width"],
            "height": row["height"], "noun_chunks": chunks, "image_location": row.get("image_location"),
            "image_offset": row.get("image_offset"), "image_length": row.get("image_length")}


class Grit(Format):
    name = "grit"
    needs_spans = True
    part_suffix = ".parquet"

    def write(self, f: BinaryIO, items: Iterable[Item]) -> None:
        table = pa.Table.from_pylist([grit_record(item) for item in items], schema=GRIT_SCHEMA)
        pq.write_table(table, f, compression="zstd")
