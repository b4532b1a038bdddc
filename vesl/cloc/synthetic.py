"""Synthetic region-text shards: coloured shapes with exact boxes, for trainer tests and benchmarks.

Each image holds several shapes (2 to 4 by default), so one whole-image embedding cannot say which
shape is where; the caption names them all ("a red circle, a blue square and a green triangle"),
each shape is a region labelled with its class ("red circle"). Written as schema-v1 shards (the
same columns and footer as annotate writes) plus `classes.json`, the class list `vesl eval` takes.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from schemas.region_text import META_MODELS, META_SCHEMA_VERSION, SCHEMA_VERSION, region_text_schema

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 80, 230), "yellow": (235, 205, 35)}
SHAPES = ("circle", "square", "triangle")
CLASSES = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], colour: tuple[int, int, int]):
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=colour)
    elif shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=colour)
    else:
        draw.polygon([((x0 + x1 - 1) / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=colour)


def _caption(names: list[str]) -> str:
    items = [f"a {n}" for n in names]
    return (", ".join(items[:-1]) + " and " + items[-1] if len(items) > 1 else items[0]) + "."


def shapes_row(rng: np.random.Generator, index: int, size: int = 64, min_shapes: int = 2, max_shapes: int = 4,
               min_side: float = 0.22, max_side: float = 0.4) -> tuple[dict, Image.Image]:
    """One synthetic image and its schema-v1 row (image_bytes filled in by the caller)."""
    background = rng.integers(90, 150, size=3)
    noise = rng.normal(0, 8, size=(size, size, 3))
    image = Image.fromarray(np.clip(background + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    placed: list[tuple[int, int, int, int]] = []
    regions, names = [], []
    for _ in range(int(rng.integers(min_shapes, max_shapes + 1))):
        for _attempt in range(50):  # rejection sampling of a free spot; fewer shapes if none is found
            side = int(rng.uniform(min_side, max_side) * size)
            x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, size=2))
            box = (x0, y0, x0 + side, y0 + side)
            if all(box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1] for b in placed):
                break
        else:
            continue
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        _draw(draw, shape, box, COLOURS[colour])
        placed.append(box)
        name = f"{colour} {shape}"
        names.append(name)
        regions.append({"box": [v / size for v in box], "phrase": name, "score": 1.0, "source": "caption"})
    row = {
        "image_id": f"shape-{index:07d}", "image_uri": None, "image_bytes": None, "width": size, "height": size,
        "alt_text": "synthetic shapes", "caption": _caption(names),
        "phrases": list(dict.fromkeys(names)), "regions": regions,
    }
    return row, image


def write_shapes_dataset(out: str | Path, images: int, seed: int = 0, size: int = 64, shard_rows: int = 1000,
                         embed_images: bool = True) -> dict[str, object]:
    """Write IMAGES synthetic rows as shards under OUT/data and the class list as OUT/classes.json.
    With embed_images off, images are PNG files under OUT/images and rows carry their path (image_location,
    and image_uri)."""
    out = Path(out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    if not embed_images:
        (out / "images").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    footer = {META_SCHEMA_VERSION: SCHEMA_VERSION, META_MODELS: json.dumps({"synthetic": {"seed": seed}})}
    schema = region_text_schema(footer)
    rows, shard, regions = [], 0, 0
    for i in range(images):
        row, image = shapes_row(rng, i, size)
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        if embed_images:
            row["image_bytes"] = buf.getvalue()
        else:
            path = out / "images" / f"{row['image_id']}.png"
            path.write_bytes(buf.getvalue())
            row["image_uri"] = row["image_location"] = str(path.resolve())
        regions += len(row["regions"])
        rows.append(row)
        if len(rows) == shard_rows or i == images - 1:
            pq.write_table(pa.Table.from_pylist(rows, schema=schema), out / "data" / f"shard-{shard:05d}.parquet")
            rows, shard = [], shard + 1
    (out / "classes.json").write_text(json.dumps(CLASSES, indent=1) + "\n")
    return {"images": images, "regions": regions, "shards": shard, "classes": len(CLASSES), "path": str(out)}
