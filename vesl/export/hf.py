"""`hf`: a Hugging Face `datasets` dataset as `save_to_disk` writes it, so `datasets.load_from_disk(DEST)`
gives typed features: an `Image` column, and `objects` as HF's object-detection sets have them (`bbox`
[x, y, w, h] in pixels, `category` the phrase, `score`, `source`, `span` the phrase's first [start, end) in
the text `source` names, null when it was not found). Each shard gives one Arrow file
(`data-<shard>.arrow`); `dataset_info.json` and `state.json` list them once every part is done."""

from __future__ import annotations

import json
from typing import BinaryIO, Iterable

import pyarrow as pa

from vesl.export.common import xywh
from vesl.export.part import Format, Item

BATCH_ROWS = 64  # rows per record batch: a shard's images are never all in memory


def features():
    from datasets import Features, Image, List, Value

    return Features({
        "image_id": Value("string"), "image": Image(), "width": Value("int32"), "height": Value("int32"),
        "caption": Value("string"), "alt_text": Value("string"), "image_uri": Value("string"),
        "objects": {"bbox": List(List(Value("float32"), length=4)), "category": List(Value("string")),
                    "score": List(Value("float32")), "source": List(Value("string")),
                    "span": List(List(Value("int32"), length=2))},
    })


def hf_record(item: Item) -> dict:
    row, regions = item.row, item.regions
    return {"image_id": row["image_id"], "image": {"bytes": item.data, "path": item.file},
            "width": row["width"], "height": row["height"], "caption": row["caption"],
            "alt_text": row.get("alt_text"), "image_uri": row.get("image_uri"),
            "objects": {"bbox": [xywh(r["box"], row["width"], row["height"]) for r in regions],
                        "category": [r["phrase"] for r in regions], "score": [r["score"] for r in regions],
                        "source": [r["source"] for r in regions],
                        "span": [list(r["spans"][0]) if r["spans"] else None for r in regions]}}


class Hf(Format):
    name = "hf"
    embeds_images = True
    keeps_empty = True
    part_suffix = ".arrow"

    def write(self, f: BinaryIO, items: Iterable[Item]) -> None:
        schema = features().arrow_schema
        with pa.ipc.new_stream(f, schema) as writer:
            batch: list[dict] = []
            for item in items:
                batch.append(hf_record(item))
                if len(batch) >= BATCH_ROWS:
                    writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                    batch = []
            if batch:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))

    @classmethod
    def finish(cls, out, parts, options, context):
        from dataclasses import asdict

        from datasets import DatasetInfo

        info = DatasetInfo(description="vesl export: region-text shards as an object-detection dataset",
                           features=features())
        state = {"_data_files": [{"filename": p} for p in parts], "_fingerprint": context["fingerprint"],
                 "_format_columns": None, "_format_kwargs": {}, "_format_type": None,
                 "_output_all_columns": False, "_split": None}
        with out.staged("dataset_info.json", mode="w") as f:
            json.dump(asdict(info), f, indent=2, default=str)
        with out.staged("state.json", mode="w") as f:
            json.dump(state, f, indent=2)
        return ["dataset_info.json", "state.json"]
