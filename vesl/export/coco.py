"""`coco`: `instances.json` plus the image files, as pycocotools, detectron2, mmdet and `vesl eval --coco` read
it. The categories are the distinct exported phrases with at least `--min-phrase-count` regions, most
frequent first (ids from 1); a region whose phrase is not a category is left out (counted). Each annotation
has `bbox` [x, y, w, h] and `area` in pixels, `iscrowd` 0, and vesl's `score`, `phrase` and `source`.
Each shard gives a part (`parts/<shard>.json`, a COCO file of its own with the same categories); the parts
are merged with image and annotation ids renumbered."""

from __future__ import annotations

import json
from typing import BinaryIO, Iterable

from vesl.export.common import xywh
from vesl.export.merge import coco_instances
from vesl.export.part import Format, Item


def category_list(counts: dict[str, int], min_count: int) -> list[dict]:
    """COCO categories of the phrases with at least MIN_COUNT regions: most regions first, then by name."""
    kept = sorted((p for p, n in counts.items() if n >= min_count), key=lambda p: (-counts[p], p))
    return [{"id": i, "name": p, "supercategory": "phrase", "regions": counts[p]} for i, p in enumerate(kept, 1)]


class Coco(Format):
    name = "coco"
    wants_files = True
    keeps_empty = True
    part_suffix = ".json"
    merged = "instances.json"

    def write(self, f: BinaryIO, items: Iterable[Item]) -> None:
        images, annotations = [], []
        for item in items:
            row = item.row
            images.append({"id": len(images) + 1, "file_name": item.file, "width": row["width"],
                           "height": row["height"], "vesl_image_id": row["image_id"]})
            for r in item.regions:
                box = xywh(r["box"], row["width"], row["height"])
                annotations.append({"id": len(annotations) + 1, "image_id": len(images),
                                    "category_id": self.categories[r["phrase"]], "bbox": box,
                                    "area": round(box[2] * box[3], 2), "iscrowd": 0, "score": round(r["score"], 6),
                                    "phrase": r["phrase"], "source": r["source"]})
        categories = [{"id": i, "name": p, "supercategory": "phrase"}
                      for p, i in sorted(self.categories.items(), key=lambda c: c[1])]
        f.write(json.dumps({"images": images, "annotations": annotations, "categories": categories},
                           ensure_ascii=False).encode())

    @classmethod
    def finish(cls, out, parts, options, context):
        return [coco_instances(out, parts, cls.merged, context["categories"])] if options.merge else []
