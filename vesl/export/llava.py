"""`llava`: grounding conversations in LLaVA's `conversations` form, one per image:

    {"id": ..., "image": "images/part-00000/a.jpg",
     "conversations": [{"from": "human", "value": "<image>\n...the caption..."},
                       {"from": "gpt", "value": "...the objects and their boxes..."}]}

`--style` picks how the boxes are written:
- `qwen2.5-vl`: a ```json list of {"bbox_2d": [x1, y1, x2, y2], "label": phrase}, in pixels of the image
  Qwen2.5-VL's processor feeds the model (each side rounded to a multiple of 28, the area within
  `--min-pixels`/`--max-pixels`: its `smart_resize`), which is what its grounding answers are in; with
  `--pixels original`, in pixels of the original image, for fine-tuning code that rescales boxes itself;
- `qwen3-vl`: the same list with coordinates relative to the image, integers 0-1000;
- `shikra`: the grounding text with each phrase followed by its boxes, normalised, 3 decimals:
  "a red car[0.120,0.300,0.480,0.710] beside a dog[0.500,0.420,0.800,0.900;0.010,0.400,0.200,0.800]".
Parts are JSONL; the merged `llava.json` is the JSON list LLaVA's loader reads."""

from __future__ import annotations

import json
from typing import BinaryIO, Iterable

from vesl.export.common import smart_resize
from vesl.export.merge import json_list
from vesl.export.part import Format, Item

QUESTIONS = {
    "qwen2.5-vl": "<image>\nLocate every object this caption mentions and output its bbox coordinates in JSON "
                  "format.\nCaption: {text}",
    "qwen3-vl": "<image>\nLocate every object this caption mentions and output its bbox coordinates in JSON "
                "format.\nCaption: {text}",
    "shikra": "<image>\nGround every object this caption mentions: repeat the caption with each object's boxes "
              "after it.\nCaption: {text}",
}


def json_answer(item: Item, options) -> str:
    w, h = item.row["width"], item.row["height"]
    if options.style == "qwen2.5-vl":
        rh, rw = smart_resize(h, w, options.min_pixels, options.max_pixels) if options.pixels == "resized" else (h, w)
        scale = (rw, rh, rw, rh)
    else:
        scale = (1000, 1000, 1000, 1000)
    boxes = [{"bbox_2d": [round(v * s) for v, s in zip(r["box"], scale)], "label": r["phrase"]} for r in item.regions]
    lines = ",\n".join("\t" + json.dumps(b, ensure_ascii=False) for b in boxes)  # one object a line, as Qwen answers
    return f"```json\n[\n{lines}\n]\n```"


def shikra_answer(item: Item) -> str:
    """The grounding text with every phrase's boxes after its first place in it."""
    boxes: dict[tuple[int, int], list[str]] = {}
    for r, spans in zip(item.regions, item.text_spans):
        boxes.setdefault(spans[0], []).append(",".join(f"{v:.3f}" for v in r["box"]))
    out, pos = [], 0
    for (start, end), found in sorted(boxes.items()):
        out += [item.text[pos:end], "[" + ";".join(found) + "]"]
        pos = end
    return "".join(out) + item.text[pos:]


class Llava(Format):
    name = "llava"
    wants_files = True
    merged = "llava.json"

    @property
    def needs_spans(self) -> bool:  # type: ignore[override]
        return self.options.style == "shikra"

    def write(self, f: BinaryIO, items: Iterable[Item]) -> None:
        style = self.options.style
        for item in items:
            answer = shikra_answer(item) if style == "shikra" else json_answer(item, self.options)
            record = {"id": item.row["image_id"], "image": item.file,
                      "conversations": [{"from": "human", "value": QUESTIONS[style].format(text=item.text)},
                                        {"from": "gpt", "value": answer}]}
            f.write((json.dumps(record, ensure_ascii=False) + "\n").encode())

    @classmethod
    def finish(cls, out, parts, options, context):
        return [json_list(out, parts, cls.merged)] if options.merge else []
