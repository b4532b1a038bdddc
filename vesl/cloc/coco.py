"""Region recognition on a COCO-format dataset (COCO, LVIS: `instances_*.json` and an image folder).

The paper's protocol: every ground-truth box is given, its region embedding is compared with the text
embedding of every category name (through the prompt template), and the most similar category is the
prediction; mAcc is the mean over the categories present of their per-category accuracy.

Conventions, as COCO's own evaluation has them:
- an annotation with `iscrowd: 1` (a group of objects under one box), or with `ignore: 1` (the flag
  some COCO-style sets use), is not a region: it is left out, counted under `annotations_ignored`;
- a box with no area (w or h <= 0) is left out too, counted the same way;
- a category's prompt is its `name` with underscores as spaces (LVIS names are `baseball_bat`);
- LVIS's per-image `neg_category_ids` / `not_exhaustive_category_ids` concern detection, not recognition
  with given boxes: they are not used.
Images are read from IMAGES/`file_name` (local or any fsspec URI), prepared as training prepares them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

import pyarrow as pa


def load_instances(path: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    from vesl.core.storage import filesystem

    fs, p = filesystem(path, storage_options)
    with fs.open(p, "rb") as f:
        data = json.load(f)
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{path}: not a COCO instances file (no '{key}' list)")
    return data


def category_prompt_name(name: str) -> str:
    return " ".join(str(name).replace("_", " ").split())


def coco_rows(data: Mapping[str, Any], images_dir: str, max_images: int | None = None) -> tuple[
        list[dict[str, Any]], dict[str, int]]:
    """(shard-like rows, one per image with at least one region: image_uri and regions with
    normalised boxes whose phrase is the category's name; counts of what was left out)."""
    from vesl.core.storage import join_uri

    names = {c["id"]: category_prompt_name(c["name"]) for c in data["categories"]}
    by_image: dict[Any, list[dict]] = {}
    ignored = 0
    for ann in data["annotations"]:
        x, y, w, h = (float(v) for v in ann["bbox"])
        if ann.get("iscrowd", 0) or ann.get("ignore", 0) or w <= 0 or h <= 0:
            ignored += 1
            continue
        by_image.setdefault(ann["image_id"], []).append({"category_id": ann["category_id"], "box": (x, y, w, h)})
    rows = []
    for image in sorted(data["images"], key=lambda i: i["id"]):
        anns = by_image.get(image["id"])
        if not anns:
            continue
        width, height = float(image["width"]), float(image["height"])
        regions = []
        for a in anns:
            x, y, w, h = a["box"]
            box = [max(0.0, x / width), max(0.0, y / height), min(1.0, (x + w) / width), min(1.0, (y + h) / height)]
            regions.append({"phrase": names[a["category_id"]], "box": box, "score": 1.0, "source": "caption"})
        rows.append({"image_id": str(image["id"]), "image_uri": join_uri(images_dir, image["file_name"]),
                     "image_bytes": None, "caption": "", "regions": regions})
        if max_images and len(rows) >= max_images:
            break
    return rows, {"annotations_ignored": ignored}


def iter_coco_batches(rows: list[dict[str, Any]], batch_rows: int, **prepare) -> Iterator[dict[str, Any]]:
    from vesl.cloc.data import prepare_batch

    for start in range(0, len(rows), batch_rows):
        yield prepare_batch(pa.Table.from_pylist(rows[start:start + batch_rows]), **prepare)


def evaluate_coco(instances: str, images_dir: str, checkpoint: str, *, template: str = "{}", baseline: bool = False,
                  max_images: int | None = None, batch_rows: int = 64, device: str = "auto",
                  storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`vesl eval --coco INSTANCES --images DIR`: region recognition mAcc over the file's categories
    (the JSON of `vesl eval`, without retrieval: COCO has no phrases)."""
    import torch

    from vesl.cloc.checkpoint import CLIP_DIR, fetch_checkpoint, load_cloc
    from vesl.cloc.data import DataConfig, load_tokenizer
    from vesl.cloc.evaluate import embed_regions, encode_texts, normalise_phrase, recognition
    from vesl.core.models import resolve_device

    data = load_instances(instances, storage_options)
    rows, left_out = coco_rows(data, images_dir, max_images)
    if not rows:
        raise ValueError(f"{instances}: no image with a usable annotation")
    device = resolve_device(device)
    model, meta = load_cloc(fetch_checkpoint(checkpoint, storage_options), device=device)
    tokenizer_path = f"{meta['path']}/{CLIP_DIR}"
    max_tokens = model.clip.config.text_config.max_position_embeddings
    class_names = list(dict.fromkeys(category_prompt_name(c["name"]) for c in data["categories"]))
    lookup = {normalise_phrase(n): n for n in class_names}
    data_config = DataConfig.model_validate({**meta.get("training", {}).get("data", {}),
                                             "max_regions": max(len(r["regions"]) for r in rows)})
    with torch.no_grad():
        class_embeds = encode_texts(model, load_tokenizer(tokenizer_path), [template.format(c) for c in class_names],
                                    max_tokens, device)
        batches = iter_coco_batches(rows, batch_rows, tokenizer=tokenizer_path, revision=None,
                                    image_size=model.clip.config.vision_config.image_size,
                                    caption_max_tokens=max_tokens, config=data_config,
                                    storage_options=storage_options)
        found = embed_regions(model, batches, device, baseline, None)
    if found["embeds"] is None:
        raise ValueError(f"{instances}: no image could be read from {images_dir}")
    result: dict[str, Any] = {
        "checkpoint": str(checkpoint), "step": meta.get("step"), "mode": "roi_pool" if baseline else "prompter",
        "dataset": {"instances": instances, "images_dir": images_dir, "images_used": len(rows), **left_out},
        "images": found["images"], "rows_skipped": found["skipped"], "regions": int(found["embeds"].shape[0]),
    }
    result.update(recognition(found["embeds"], found["phrases"], lookup, class_names, class_embeds))
    return result


__all__ = ["category_prompt_name", "coco_rows", "evaluate_coco", "load_instances"]
