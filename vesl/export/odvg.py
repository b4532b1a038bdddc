"""`odvg`: one JSON line per image, as Open-GroundingDino and MM-Grounding-DINO read grounding data.

    {"filename": "images/part-00000/a.jpg", "height": 480, "width": 640,
     "grounding": {"caption": "A red car beside a dog.",
                   "regions": [{"bbox": [x1, y1, x2, y2], "phrase": "red car", "tokens_positive": [[2, 9]]}]}}

`bbox` is in pixels of the image file, `tokens_positive` every [start, end) of the phrase in `caption`.
A region whose phrase came from the alt-text points into the alt-text appended to the caption (see
`vesl.export.common.grounding_text`). Open-GroundingDino's config takes DEST as `root` and `odvg.jsonl`
as `anno`.
"""

from __future__ import annotations

import json
from typing import BinaryIO, Iterable

from vesl.export.common import pixel_box
from vesl.export.merge import concat_lines
from vesl.export.part import Format, Item


def odvg_record(item: Item) -> dict:
    w, h = item.row["width"], item.row["height"]
    regions = [{"bbox": pixel_box(r["box"], w, h), "phrase": r["phrase"], "tokens_positive": [list(s) for s in spans]}
               for r, spans in zip(item.regions, item.text_spans)]
    return {"filename": item.file, "height": h, "width": w, "grounding": {"caption": item.text, "regions": regions}}


class Odvg(Format):
    name = "odvg"
    wants_files = True
    needs_spans = True
    merged = "odvg.jsonl"

    def write(self, f: BinaryIO, items: Iterable[Item]) -> None:
        for item in items:
            f.write((json.dumps(odvg_record(item), ensure_ascii=False) + "\n").encode())

    @classmethod
    def finish(cls, out, parts, options, context):
        return [concat_lines(out, parts, cls.merged)] if options.merge else []
