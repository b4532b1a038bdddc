"""Evaluate a CLOC checkpoint on region-text shards with ground-truth boxes.

- Region recognition (the paper's COCO/LVIS protocol): each region's embedding, from its given box,
  is compared with the text embeddings of every class name; the prediction is the most similar
  class. mAcc is the mean over classes of per-class accuracy.
- Region <-> text retrieval: region -> text ranks the distinct phrases of the set for each region;
  text -> region ranks every region for each distinct phrase. A hit is a phrase identical (after
  normalising case and spaces) to the region's own. Recall@1 and @10.
- `baseline=True` swaps the Prompter for RoI pooling of the patch tokens inside the box.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from vesl.cloc.data import DataConfig, iter_prepared, tokenize
from vesl.core.outdir import find_shards


def normalise_phrase(text: str) -> str:
    return " ".join(str(text).lower().split())


def load_classes(path: str) -> dict[str, str]:
    """CLASSES.json -> {normalised phrase: class name}. Either a list of class names, or a mapping of
    class name -> list of phrases that mean it (the name itself always does)."""
    with open(path) as f:
        data = json.load(f)
    if isinstance(data, list):
        data = {name: [] for name in data}
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}: expected a non-empty list of class names or a mapping name -> [phrases]")
    lookup: dict[str, str] = {}
    for name, synonyms in data.items():
        for phrase in [name, *(synonyms or [])]:
            lookup.setdefault(normalise_phrase(phrase), name)
    return lookup


def class_accuracy(true: np.ndarray, pred: np.ndarray, n_classes: int) -> tuple[float, dict[int, float]]:
    """Mean over the classes present in TRUE of the fraction of their regions predicted right."""
    per_class = {int(c): float((pred[true == c] == c).mean()) for c in np.unique(true)}
    return (float(np.mean(list(per_class.values()))) if per_class else float("nan")), per_class


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise IoU of (N, 4) boxes x0, y0, x1, y1."""
    lt = np.maximum(a[:, :2], b[:, :2])
    rb = np.minimum(a[:, 2:], b[:, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=1)
    area = lambda x: np.clip(x[:, 2:] - x[:, :2], 0, None).prod(axis=1)  # noqa: E731
    union = area(a) + area(b) - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def recall_at(similarity: np.ndarray, relevant: np.ndarray, ks: tuple[int, ...] = (1, 10)) -> dict[str, float]:
    """SIMILARITY (Q, G) and RELEVANT (Q, G) bool: the share of queries with a relevant item in the top k."""
    order = np.argsort(-similarity, axis=1, kind="stable")
    ranked = np.take_along_axis(relevant, order, axis=1)
    return {f"R@{k}": float(ranked[:, :k].any(axis=1).mean()) for k in ks}


@torch.no_grad()
def encode_texts(model, tokenizer, texts: list[str], max_tokens: int, device: str, batch: int = 256) -> torch.Tensor:
    from vesl.cloc.model import normalize

    out = []
    for i in range(0, len(texts), batch):
        ids, mask = tokenize(tokenizer, texts[i:i + batch], max_tokens)
        out.append(normalize(model.encode_text(torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device))))
    return torch.cat(out).cpu()


@torch.no_grad()
def embed_regions(model, batches, device: str, baseline: bool, limit: int | None) -> dict[str, Any]:
    """Region embeddings (unit norm), their phrases, and the grounding IoUs of the prepared BATCHES."""
    from vesl.cloc.model import normalize, roi_pool_embeddings

    embeds, phrases, ious, images, skipped = [], [], [], 0, 0
    for batch in batches:
        ok = batch["ok"]
        skipped += int((~ok).sum())
        images += int(ok.sum())
        valid = batch["region_valid"]
        if not valid.any():
            continue
        _, patches = model.encode_image(torch.from_numpy(batch["pixels"]).to(device))
        image_index, _ = (torch.from_numpy(a) for a in np.nonzero(valid))
        image_index = image_index.to(device)
        boxes = torch.from_numpy(batch["region_boxes"][valid]).to(device)
        if baseline:
            region = roi_pool_embeddings(model, patches, image_index, boxes)
        else:
            region = model.region_embeddings(patches, image_index, boxes)
            # grounding: the phrase's box predicted from the text-conditioned Prompter
            ids = torch.from_numpy(batch["phrase_ids"][valid]).to(device)
            mask = torch.from_numpy(batch["phrase_mask"][valid]).to(device)
            pred = model.ground(patches, image_index, model.encode_text(ids, mask))
            ious.append(box_iou(pred.float().cpu().numpy(), batch["region_boxes"][valid]))
        embeds.append(normalize(region).cpu())
        phrases.extend(normalise_phrase(p) for p in batch["region_phrases"][valid])
        if limit and images >= limit:
            break
    return {"embeds": torch.cat(embeds) if embeds else None, "phrases": phrases, "ious": ious, "images": images,
            "skipped": skipped}


def recognition(regions: torch.Tensor, phrases: list[str], lookup: dict[str, str], class_names: list[str],
                class_embeds: torch.Tensor) -> dict[str, Any]:
    """Region recognition (mAcc) over the regions whose phrase names a class."""
    labelled = [i for i, p in enumerate(phrases) if p in lookup]
    if not labelled:
        return {"classes": len(class_names), "regions_with_class": 0, "mAcc": None}
    index = {name: k for k, name in enumerate(class_names)}
    true = np.array([index[lookup[phrases[i]]] for i in labelled], dtype=np.int64)
    logits = (regions[labelled] @ class_embeds.t()).numpy()
    macc, per_class = class_accuracy(true, logits.argmax(axis=1), len(class_names))
    return {"classes": len(class_names), "classes_present": len(per_class), "regions_with_class": len(labelled),
            "chance_mAcc": 1.0 / len(class_names), "mAcc": macc,
            "per_class_acc": {class_names[c]: a for c, a in per_class.items()}}


def retrieval(regions: torch.Tensor, phrases: list[str], text_embeds: torch.Tensor,
              distinct: list[str]) -> dict[str, Any]:
    """Region <-> text recall against the DISTINCT phrases."""
    similarity = (regions @ text_embeds.t()).numpy()
    position = {p: k for k, p in enumerate(distinct)}
    relevant = np.zeros(similarity.shape, bool)
    relevant[np.arange(len(phrases)), [position[p] for p in phrases]] = True
    return {"region_to_text": recall_at(similarity, relevant), "text_to_region": recall_at(similarity.T, relevant.T),
            "distinct_phrases": len(distinct)}


@torch.no_grad()
def evaluate(shards: str, checkpoint: str, classes_path: str, *, baseline: bool = False, template: str = "{}",
             batch_rows: int = 64, device: str = "auto", storage_options: Mapping[str, Any] | None = None,
             limit: int | None = None, relocate: Mapping[str, str] | None = None) -> dict[str, Any]:
    from vesl.cloc.checkpoint import CLIP_DIR, fetch_checkpoint, load_cloc
    from vesl.cloc.data import load_tokenizer
    from vesl.core.models import resolve_device

    device = resolve_device(device)
    model, meta = load_cloc(fetch_checkpoint(checkpoint, storage_options), device=device)
    tokenizer_path = f"{meta['path']}/{CLIP_DIR}"
    tokenizer = load_tokenizer(tokenizer_path)
    clip_config = model.clip.config
    max_tokens = clip_config.text_config.max_position_embeddings
    data_config = DataConfig.model_validate(meta.get("training", {}).get("data", {}))
    if relocate:  # where the images are now (the training run's own map is the default)
        data_config = data_config.model_copy(update={"relocate": dict(relocate)})
    lookup = load_classes(classes_path)
    class_names = list(dict.fromkeys(lookup.values()))
    class_embeds = encode_texts(model, tokenizer, [template.format(c) for c in class_names], max_tokens, device)
    batches = iter_prepared(find_shards(shards, storage_options), tokenizer=tokenizer_path, revision=None,
                            image_size=clip_config.vision_config.image_size, caption_max_tokens=max_tokens,
                            config=data_config, storage_options=storage_options, batch_rows=batch_rows)
    found = embed_regions(model, batches, device, baseline, limit)
    if found["embeds"] is None:
        raise ValueError(f"no regions in {shards}")
    regions, phrases = found["embeds"], found["phrases"]
    result: dict[str, Any] = {
        "checkpoint": str(checkpoint), "step": meta.get("step"), "mode": "roi_pool" if baseline else "prompter",
        "images": found["images"], "rows_skipped": found["skipped"], "regions": int(regions.shape[0]),
    }
    result.update(recognition(regions, phrases, lookup, class_names, class_embeds))
    distinct = list(dict.fromkeys(phrases))
    result.update(retrieval(regions, phrases, encode_texts(model, tokenizer, distinct, data_config.phrase_max_tokens,
                                                           device), distinct))
    if found["ious"]:
        iou = np.concatenate(found["ious"])
        result["grounding"] = {"mean_iou": float(iou.mean()), "iou>0.5": float((iou > 0.5).mean())}
    return result
