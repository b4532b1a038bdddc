"""The parts of an export as the one file a consumer reads, streamed: one part in memory at a time."""

from __future__ import annotations

import json

COPY_CHUNK = 1 << 20


def concat_lines(out, parts: list[str], name: str) -> str:
    """The JSONL PARTS concatenated into NAME (staged, so NAME is whole or absent)."""
    with out.staged(name) as f:
        for part in parts:
            with out.open(part) as src:
                while chunk := src.read(COPY_CHUNK):
                    f.write(chunk)
    return name


def json_list(out, parts: list[str], name: str) -> str:
    """The JSONL PARTS as one JSON list NAME (LLaVA's loaders read a list)."""
    with out.staged(name) as f:
        f.write(b"[")
        first = True
        for part in parts:
            with out.open(part) as src:
                for line in src:
                    if line.strip():
                        f.write((b"" if first else b",\n") + line.rstrip(b"\n"))
                        first = False
        f.write(b"]\n")
    return name


def coco_instances(out, parts: list[str], name: str, categories: list[dict]) -> str:
    """The COCO PARTS (each with ids from 1) as one instances file NAME, image and annotation ids renumbered
    to run on across parts. The categories go last, each with the number of annotations it has; one that
    no written annotation has (its rows' images could not be read) is left out."""
    used: dict[int, int] = {}
    with out.staged(name, mode="w") as f:
        f.write('{"info": {"description": "vesl export"}, "licenses": []')
        for key in ("images", "annotations"):
            f.write(f', "{key}": [')
            first = True
            image_base = annotation_base = 0
            for part in parts:
                data = json.loads(out.read_bytes(part))
                for entry in data[key]:
                    entry = dict(entry, id=entry["id"] + (image_base if key == "images" else annotation_base))
                    if key == "annotations":
                        entry["image_id"] += image_base
                        used[entry["category_id"]] = used.get(entry["category_id"], 0) + 1
                    f.write(("" if first else ",\n") + json.dumps(entry, ensure_ascii=False))
                    first = False
                image_base += len(data["images"])
                annotation_base += len(data["annotations"])
            f.write("]")
        kept = [dict(c, regions=used[c["id"]]) for c in categories if c["id"] in used]
        f.write(', "categories": ' + json.dumps(kept, ensure_ascii=False) + "}\n")
    return name
