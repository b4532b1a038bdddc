"""detect: OWLv2 finds a box for each phrase, or drops it.

The image's phrases are its text queries. Query lists are ragged across a batch, so each image's
queries are padded to the batch maximum with all-zero token rows: OWLv2 masks a query whose first
token id is 0, and we also mask those logits ourselves. Each kept box takes its most confident
phrase. Boxes go back to the ORIGINAL image: OWLv2 pads the image to a square (bottom/right) before
resizing, so its normalised boxes are fractions of max(width, height).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from PIL import Image
from pydantic import Field

from operators.base import (
    StageConfig, StageTimer, as_table, image_from_row, mark_rejects, pending_rows, put_column,
    resolve_device, resolve_dtype, run_isolating_rows,
)
from schemas.region_text import REGION_TYPE

STAGE = "detect"


class DetectConfig(StageConfig):
    model: str = Field(default="google/owlv2-base-patch16-ensemble", description="OWLv2 hub id or local path.")
    revision: str | None = Field(default=None, description="Hub revision (branch, tag or commit) to pin.")
    trust_remote_code: bool = Field(default=False)
    threshold: float = Field(default=0.1, ge=0.0, le=1.0, description="Keep boxes scoring above this (CLOC: 0.1).")
    nms_iou: float | None = Field(
        default=None, gt=0.0, le=1.0,
        description="Class-agnostic NMS IoU threshold; None disables NMS (CLOC uses none).",
    )
    top_k: int | None = Field(default=None, ge=1, description="Keep at most this many regions per image; None keeps all.")
    min_box_pixels: float = Field(
        default=1.0, ge=0.0, description="Drop boxes with a side shorter than this, in pixels of the image the detector saw."
    )
    max_query_tokens: int = Field(default=16, ge=2, description="Tokens per text query (OWLv2 was trained with 16).")
    batch_size: int = Field(default=8, ge=1, description="Images per forward pass.")
    device: str = Field(default="auto", description="'auto' (CUDA if present), 'cpu', 'cuda', ...")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


def padded_square_boxes_to_original(
    boxes_cxcywh: np.ndarray, width: int, height: int
) -> np.ndarray:
    """OWLv2's (cx, cy, w, h) boxes, fractions of the padded square, to (x0, y0, x1, y1) pixels of a
    WIDTH x HEIGHT image (not clipped). This is what HF's post-processing computes with
    target_sizes=(height, width)."""
    side = float(max(width, height))
    cx, cy, w, h = (boxes_cxcywh[..., k].astype(np.float64) for k in range(4))
    return np.stack([(cx - w / 2) * side, (cy - h / 2) * side, (cx + w / 2) * side, (cy + h / 2) * side], axis=-1)


def normalise_to_image(
    boxes_xyxy: np.ndarray, width: int, height: int, min_box_pixels: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Clip pixel boxes to the image and scale to [0, 1] float32. Returns (boxes, valid): a box whose
    centre lies in the padding, or with a side under MIN_BOX_PIXELS (or empty) after clipping, is
    not valid."""
    centre_x = (boxes_xyxy[:, 0] + boxes_xyxy[:, 2]) / 2
    centre_y = (boxes_xyxy[:, 1] + boxes_xyxy[:, 3]) / 2
    scale = np.array([width, height, width, height], dtype=np.float64)
    pixels = np.clip(boxes_xyxy, 0.0, scale)
    normalised = (pixels / scale).astype(np.float32)
    valid = (
        (centre_x < width) & (centre_y < height) & (centre_x >= 0) & (centre_y >= 0)
        & (pixels[:, 2] - pixels[:, 0] >= min_box_pixels) & (pixels[:, 3] - pixels[:, 1] >= min_box_pixels)
        # checked after the float32 cast: the stored box itself must satisfy x0 < x1, y0 < y1
        & (normalised[:, 2] > normalised[:, 0]) & (normalised[:, 3] > normalised[:, 1])
    )
    return normalised, valid


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of (N, 4) and (M, 4) xyxy boxes."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=-1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=-1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Greedy class-agnostic non-maximum suppression; indices kept, best score first."""
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size:
        best = order[0]
        keep.append(int(best))
        if order.size == 1:
            break
        overlaps = box_iou(boxes[best:best + 1], boxes[order[1:]])[0]
        order = order[1:][overlaps <= iou]
    return np.asarray(keep, dtype=np.int64)


def select_regions(
    logits: np.ndarray, boxes_cxcywh: np.ndarray, num_queries: int, width: int, height: int,
    threshold: float, nms_iou: float | None = None, top_k: int | None = None, min_box_pixels: float = 0.0,
) -> list[tuple[np.ndarray, int, float]]:
    """From one image's (patches, queries) logits and (patches, 4) boxes: the kept regions as
    (normalised xyxy box, query index, score), best first. Queries past NUM_QUERIES are padding."""
    if num_queries == 0:
        return []
    logits = logits[:, :num_queries].astype(np.float64)
    best = logits.argmax(axis=1)
    scores = 1.0 / (1.0 + np.exp(-logits[np.arange(len(best)), best]))
    pixels = padded_square_boxes_to_original(boxes_cxcywh, width, height)
    boxes, valid = normalise_to_image(pixels, width, height, min_box_pixels)
    keep = np.flatnonzero((scores > threshold) & valid)
    keep = keep[np.argsort(-scores[keep], kind="stable")]
    if nms_iou is not None and keep.size:
        keep = keep[nms(boxes[keep], scores[keep], nms_iou)]
    if top_k is not None:
        keep = keep[:top_k]
    return [(boxes[k], int(best[k]), float(scores[k])) for k in keep]


class DetectRegions:
    """Callable stage: adds `regions` (list of {box, phrase, score, source}); loads OWLv2 once."""

    def __init__(self, config: DetectConfig | None = None) -> None:
        import torch
        from transformers import Owlv2ForObjectDetection

        from vesl.models import load_pretrained, load_processor, provenance

        self.config = config or DetectConfig()
        self.device = resolve_device(self.config.device)
        self.dtype = resolve_dtype(self.config.dtype, self.device)
        self.processor = load_processor(
            self.config.model, revision=self.config.revision, trust_remote_code=self.config.trust_remote_code
        )
        self.model = load_pretrained(
            Owlv2ForObjectDetection, self.config.model, revision=self.config.revision,
            trust_remote_code=self.config.trust_remote_code, device=self.device, dtype=self.dtype,
        )
        self.provenance = provenance(self.model, self.config.model, self.config.revision)
        self._torch = torch
        self.timer = StageTimer()

    def query_tensors(self, queries: Sequence[Sequence[str]]):
        """(input_ids, attention_mask, valid) for ragged per-image QUERIES, padded with all-zero rows.

        Each distinct phrase in the batch is tokenized once."""
        torch = self._torch
        width = max(1, max((len(q) for q in queries), default=1))
        unique = sorted({p for q in queries for p in q})
        length = self.config.max_query_tokens
        ids = torch.zeros((len(queries), width, length), dtype=torch.long)
        mask = torch.zeros((len(queries), width, length), dtype=torch.long)
        mask[..., 0] = 1  # keep attention well defined on padding rows; their logits are masked
        valid = torch.zeros((len(queries), width), dtype=torch.bool)
        if unique:
            tok = self.processor.tokenizer(unique, padding="max_length", truncation=True, max_length=length,
                                           return_tensors="pt")
            row_of = {p: k for k, p in enumerate(unique)}
            for i, q in enumerate(queries):
                for j, phrase in enumerate(q):
                    ids[i, j] = tok["input_ids"][row_of[phrase]]
                    mask[i, j] = tok["attention_mask"][row_of[phrase]]
                    valid[i, j] = True
        return ids.view(-1, length), mask.view(-1, length), valid

    def detect(self, images: list[Image.Image], queries: list[list[str]]) -> list[list[tuple[np.ndarray, int, float]]]:
        """Regions for each image: (normalised box, query index, score), best first."""
        torch = self._torch
        pixel_values = self.processor.image_processor(
            images=images, return_tensors="pt", input_data_format="channels_last")["pixel_values"]
        input_ids, attention_mask, valid = self.query_tensors(queries)
        with torch.inference_mode():
            out = self.model(
                input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                pixel_values=pixel_values.to(self.device, self.dtype),
            )
            logits = out.logits.float().masked_fill(~valid.to(self.device)[:, None, :], float("-inf"))
        logits_np = logits.cpu().numpy()
        boxes_np = out.pred_boxes.float().cpu().numpy()
        return [
            select_regions(logits_np[i], boxes_np[i], len(queries[i]), image.width, image.height,
                           self.config.threshold, self.config.nms_iou, self.config.top_k, self.config.min_box_pixels)
            for i, image in enumerate(images)
        ]

    def __call__(self, batch: pa.Table | Mapping[str, Any]) -> pa.Table:
        with self.timer:
            table = as_table(batch)
            phrases = table.column("phrases").to_pylist()
            sources = table.column("phrase_sources").to_pylist()
            regions: list[list[dict] | None] = [None] * table.num_rows
            rows = []
            for r in pending_rows(table):
                if phrases[r]:
                    rows.append(r)
                else:
                    regions[r] = []  # nothing to look for: a row with no regions, not a reject

            def run(chunk):
                images = [Image.fromarray(image_from_row(table, r)) for r in chunk]
                found = self.detect(images, [phrases[r] for r in chunk])
                return {
                    r: [{"box": box.tolist(), "phrase": phrases[r][q], "score": score, "source": sources[r][q]}
                        for box, q, score in dets]
                    for r, dets in zip(chunk, found)
                }

            rejects: dict[int, tuple[str, str]] = {}
            for start in range(0, len(rows), self.config.batch_size):
                done, failed = run_isolating_rows(rows[start:start + self.config.batch_size], run)
                for r, value in done.items():
                    regions[r] = value
                rejects.update(failed)
            table = put_column(table, "regions", regions, pa.list_(REGION_TYPE))
            self.timer.rows += table.num_rows
            return mark_rejects(table, STAGE, rejects)
