"""detect: OWLv2 finds a box for each phrase, or drops it.

The image's phrases are its text queries. Query lists are ragged across a batch: each distinct
phrase is encoded once, gathered into a (batch, slots) query tensor, and the padding slots are
masked out of the logits. Each kept box takes its most confident phrase. Boxes go back to the
ORIGINAL image: OWLv2 pads the image to a square (bottom/right) before resizing, so its normalised
boxes are fractions of max(width, height).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field

from operators.base import ModelStageConfig, Reject, Resources, Stage, image_from_row
from schemas.rejects import RejectReason as R

if TYPE_CHECKING:  # pyarrow is imported where a batch is handled, not at import time
    import pyarrow as pa


class DetectConfig(ModelStageConfig):
    model: str = Field(default="google/owlv2-base-patch16-ensemble", description="OWLv2 hub id or local path.")
    threshold: float = Field(default=0.1, ge=0.0, le=1.0, description="Keep boxes scoring above this (CLOC: 0.1).")
    nms_iou: float | None = Field(
        default=None, gt=0.0, le=1.0,
        description="Class-agnostic NMS IoU threshold; None disables NMS (CLOC uses none).",
    )
    top_k: int | None = Field(default=None, ge=1,
                              description="Keep at most this many regions per image; None keeps all.")
    min_box_pixels: float = Field(
        default=1.0, ge=0.0,
        description="Drop boxes with a side shorter than this, in pixels of the image the detector saw."
    )
    max_query_tokens: int = Field(default=16, ge=2, description="Tokens per text query (OWLv2 was trained with 16).")
    batch_size: int = Field(default=8, ge=1, description="Images per forward pass.")
    preprocess: Literal["torch", "hf"] = Field(
        default="torch", description="'torch': our OWLv2 preprocessing on the detector's device; 'hf': the "
        "processor's own (CPU, NumPy/SciPy).")
    text_cache_size: int = Field(default=4096, ge=0, description="Phrase embeddings kept across batches.")


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
    scores: np.ndarray, best: np.ndarray, boxes_cxcywh: np.ndarray, width: int, height: int,
    threshold: float, nms_iou: float | None = None, top_k: int | None = None, min_box_pixels: float = 0.0,
) -> list[tuple[np.ndarray, int, float]]:
    """From one image's per-patch best score (sigmoid), best query index and (patches, 4) box: the kept
    regions as (normalised xyxy box, query index, score), best first."""
    scores = scores.astype(np.float64)
    pixels = padded_square_boxes_to_original(boxes_cxcywh, width, height)
    boxes, valid = normalise_to_image(pixels, width, height, min_box_pixels)
    keep = np.flatnonzero((scores > threshold) & valid)
    keep = keep[np.argsort(-scores[keep], kind="stable")]
    if nms_iou is not None and keep.size:
        keep = keep[nms(boxes[keep], scores[keep], nms_iou)]
    if top_k is not None:
        keep = keep[:top_k]
    return [(boxes[k], int(best[k]), float(scores[k])) for k in keep]


class DetectRegions(Stage):
    """Adds `regions` (list of {box, phrase, score, source, spans}); each actor loads OWLv2 once.

    Hot path per batch: the images go to the device once as uint8 and are preprocessed there
    (`operators.owlv2_preprocess`); the vision tower runs once per image; each distinct phrase of the
    batch is encoded once (and kept in a small LRU cache across batches); the class and box heads
    run on the gathered query embeddings; only each patch's best score, query and box come back."""

    name = "detect"
    config_class = DetectConfig
    reads = ("pixels", "pixel_width", "pixel_height", "phrases", "phrase_sources", "phrase_spans")
    writes = ("regions",)
    reasons = (R.MODEL_ERROR,)
    resources = Resources(gpu=True)
    speed_settings = ("batch_size", "device", "text_cache_size")

    def __init__(self, config: DetectConfig | None = None, **kwargs: Any) -> None:
        import torch
        from transformers import Owlv2ForObjectDetection

        from operators.owlv2_preprocess import Owlv2Preprocess

        super().__init__(config, **kwargs)
        self.processor = self.config.load_processor()
        self.model, self.device, self.dtype = self.config.load_model(Owlv2ForObjectDetection)
        self.preprocess = None
        if self.config.preprocess == "torch":
            try:
                self.preprocess = Owlv2Preprocess(self.processor.image_processor, self.device, self.dtype)
            except ValueError:
                self.preprocess = None  # a processor we do not reproduce: HF's own path below
        self._torch = torch
        self._text_cache: OrderedDict[str, Any] = OrderedDict()

    def pixel_values(self, images: Sequence[np.ndarray]):
        """(B, 3, S, S) on the device in the model dtype, from (H, W, 3) uint8 arrays."""
        if self.preprocess is not None:
            return self.preprocess(images)
        out = self.processor.image_processor(images=list(images), return_tensors="pt",
                                             input_data_format="channels_last")["pixel_values"]
        return out.to(self.device, self.dtype)

    def query_index(self, queries: Sequence[Sequence[str]]) -> tuple[list[str], np.ndarray]:
        """The batch's distinct phrases, and for each image's query slot the phrase's index (-1: padding)."""
        unique = sorted({p for q in queries for p in q})
        row_of = {p: k for k, p in enumerate(unique)}
        index = np.full((len(queries), max(1, max((len(q) for q in queries), default=1))), -1, dtype=np.int64)
        for i, q in enumerate(queries):
            index[i, : len(q)] = [row_of[p] for p in q]
        return unique, index

    def text_embeddings(self, phrases: Sequence[str]):
        """(len(PHRASES), D) unit-norm OWLv2 text embeddings; each phrase is encoded at most once while
        it stays in the cache."""
        torch = self._torch
        cache = self._text_cache
        missing = [p for p in phrases if p not in cache]
        if missing:
            tok = self.processor.tokenizer(missing, padding="max_length", truncation=True,
                                           max_length=self.config.max_query_tokens, return_tensors="pt")
            with torch.inference_mode():
                out = self.model.owlv2.get_text_features(
                    input_ids=tok["input_ids"].to(self.device), attention_mask=tok["attention_mask"].to(self.device))
                emb = out.pooler_output if hasattr(out, "pooler_output") else out
                emb = emb / torch.linalg.norm(emb, ord=2, dim=-1, keepdim=True)
            for p, e in zip(missing, emb):
                cache[p] = e
        for p in phrases:
            cache.move_to_end(p)
        rows = torch.stack([cache[p] for p in phrases]) if phrases else None
        while len(cache) > self.config.text_cache_size:
            cache.popitem(last=False)
        return rows

    def detect(self, images: Sequence[np.ndarray],
               queries: list[list[str]]) -> list[list[tuple[np.ndarray, int, float]]]:
        """Regions for each (H, W, 3) uint8 image: (normalised box, query index, score), best first."""
        torch = self._torch
        model = self.model
        unique, index = self.query_index(queries)
        if not unique:
            return [[] for _ in images]
        with torch.inference_mode():
            pixel_values = self.pixel_values(images)
            feature_map = model.image_embedder(pixel_values=pixel_values)[0]
            b, h, w, d = feature_map.shape
            feats = feature_map.reshape(b, h * w, d)
            text = self.text_embeddings(unique)
            slot = torch.from_numpy(index).to(self.device)
            valid = slot >= 0
            query = text[slot.clamp(min=0)].to(feats.dtype) * valid[..., None]
            logits = model.class_predictor(feats, query, valid)[0]
            logits = logits.float().masked_fill(~valid[:, None, :], float("-inf"))
            top, best = logits.max(dim=-1)
            scores = torch.sigmoid(top)
            boxes = model.box_predictor(feats, feature_map).float()
        scores_np, best_np, boxes_np = scores.cpu().numpy(), best.cpu().numpy(), boxes.cpu().numpy()
        return [
            select_regions(scores_np[i], best_np[i], boxes_np[i], image.shape[1], image.shape[0],
                           self.config.threshold, self.config.nms_iou, self.config.top_k, self.config.min_box_pixels)
            if queries[i] else []
            for i, image in enumerate(images)
        ]

    @classmethod
    def describe_models(cls, config: DetectConfig) -> dict[str, Any]:
        return {"detector": config.describe()}

    @classmethod
    def thresholds(cls, config: DetectConfig) -> dict[str, Any]:
        return {"detect_threshold": config.threshold, "nms_iou": config.nms_iou, "top_k": config.top_k,
                "min_box_pixels": config.min_box_pixels}

    def process(self, batch: pa.Table) -> list[dict[str, Any] | Reject]:
        phrases = batch.column("phrases").to_pylist()
        sources = batch.column("phrase_sources").to_pylist()
        spans = batch.column("phrase_spans").to_pylist()
        out: list[dict[str, Any] | Reject] = [{"regions": []} for _ in phrases]  # no phrases: no regions, no reject
        work = [r for r, p in enumerate(phrases) if p]
        if work:
            found = self.detect([image_from_row(batch, r) for r in work], [phrases[r] for r in work])
            for r, dets in zip(work, found):
                out[r] = {"regions": [{"box": box.tolist(), "phrase": phrases[r][q], "score": score,
                                       "source": sources[r][q], "spans": spans[r][q]} for box, q, score in dets]}
        return out
