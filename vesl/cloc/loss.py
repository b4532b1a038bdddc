"""CLOC's loss: L = L_CLIP + lambda * (L_CLOC + L_grounding).

Shaped like open_clip's ClipLoss: the distributed gather lives in `gather_features`, the pieces are
pure functions over embeddings, `ClocLoss` adds them up. Every worker gathers every worker's
features (with gradient) and computes the loss over the global batch, so region negatives span
every sampled region of every image in the global batch.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from vesl.core.settings import Settings

DEFAULT_GROUNDING_WEIGHT = {"l1_giou": 0.25, "l2": 1.0}  # by grounding_loss, when loss.grounding_weight is None


class LossConfig(Settings):
    region_weight: float = Field(default=1.0, ge=0, description="lambda: weight of L_CLOC + L_grounding; 0 trains "
                                 "plain CLIP (the paper's baseline).")
    regions_per_image: int = Field(default=4, ge=1, description="M: regions sampled per image per step.")
    temperature: float | None = Field(default=None, gt=0, description="Initial softmax temperature; None keeps the "
                                      "model's own (0.07 for a new CLIP, the learned one for a pretrained CLIP).")
    learn_temperature: bool = Field(default=True, description="Learn the temperature, as CLIP does.")
    max_logit_scale: float = Field(default=100.0, gt=0, description="Clamp of the learned 1/temperature (CLIP's).")
    duplicate_cosine: float = Field(default=0.9, gt=-1, le=1, description="Two region texts whose text embeddings "
                                    "have a cosine above this (or that are identical) are not negatives of each other.")
    cosine_mask_from_step: int = Field(default=0, ge=0, description="Apply the cosine test from this step on; "
                                       "before it only identical phrases are masked. A text encoder trained from "
                                       "scratch starts with nearly parallel text embeddings (cosine > 0.9), which "
                                       "would mask every negative and leave L_CLOC without signal.")
    grounding_weight: float | None = Field(
        default=None, ge=0, description="Weight of L_grounding inside the lambda term. None: 0.25 with l1_giou "
        "(its loss is about five times L2's; at 1.0 it held L_CLOC on its plateau for twice as many steps on "
        "some seeds), 1.0 with l2 (the paper's).")
    grounding_loss: Literal["l1_giou", "l2"] = Field(
        default="l1_giou", description="'l1_giou': L1 distance of the corners plus generalized IoU loss (as DETR "
        "and OWL-ViT train boxes; 2 x L1 + GIoU). 'l2': the paper's squared L2 distance of the corners, whose "
        "gradient vanishes as boxes get close and which does not care about the box's scale.")

    def grounding_weight_used(self) -> float:
        if self.grounding_weight is not None:
            return self.grounding_weight
        return DEFAULT_GROUNDING_WEIGHT[self.grounding_loss]


def gather_features(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Concatenate each tensor's rows from every worker, keeping the gradient to this worker's rows.

    Row counts may differ between workers (ragged regions): rows are padded to the largest count,
    gathered, and the padding dropped again. A single process returns the tensors unchanged.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensors
    from torch.distributed.nn.functional import all_gather

    n = torch.tensor([tensors[0].shape[0]], device=tensors[0].device)
    counts = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, n)
    counts = [int(c) for c in counts]
    longest = max(counts)
    out = []
    for t in tensors:
        padded = F.pad(t, [0, 0] * (t.dim() - 1) + [0, longest - t.shape[0]])
        parts = all_gather(padded)
        out.append(torch.cat([p[:c] for p, c in zip(parts, counts)]))
    return tuple(out)


def info_nce(logits: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE: row i's positive is column i, in both directions."""
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """L_CLIP over normalised (B, E) image and caption embeddings."""
    return info_nce(logit_scale * image @ text.t())


def duplicate_text_mask(text: torch.Tensor, keys: torch.Tensor, threshold: float) -> torch.Tensor:
    """(R, R) True where regions i != j have near-duplicate texts: the same text key (identical
    normalised phrase) or text-embedding cosine above THRESHOLD. No gradient goes through it."""
    with torch.no_grad():
        similar = (text @ text.t()) > threshold
        same = keys[:, None] == keys[None, :]
        mask = similar | same
        mask.fill_diagonal_(False)
    return mask


def cloc_loss(region: torch.Tensor, phrase: torch.Tensor, keys: torch.Tensor, logit_scale: torch.Tensor,
              threshold: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """L_CLOC: symmetric InfoNCE between normalised (R, E) region and phrase embeddings, near-duplicate
    texts masked out of each other's negatives (their logits set to -inf, both directions)."""
    logits = logit_scale * region @ phrase.t()
    if mask is None:
        mask = duplicate_text_mask(phrase, keys, threshold)
    return info_nce(logits.masked_fill(mask, float("-inf")))


def grounding_loss(pred: torch.Tensor, true: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """L_grounding, mean over regions. 'l2': squared L2 distance of the normalised corners (the paper's);
    'l1_giou': 2 x L1 distance + (1 - generalized IoU)."""
    pred, true = pred.float(), true.float()
    if kind == "l2":
        return ((pred - true) ** 2).sum(dim=-1).mean()
    return 2.0 * (pred - true).abs().sum(dim=-1).mean() + (1.0 - generalized_iou(pred, true)).mean()


def generalized_iou(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Row-wise generalized IoU of (R, 4) boxes x0, y0, x1, y1 (Rezatofighi et al. 2019), in [-1, 1]."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt, rb = torch.max(a[:, :2], b[:, :2]), torch.min(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=1)
    union = area_a + area_b - inter
    iou = inter / (union + eps)
    hull = (torch.max(a[:, 2:], b[:, 2:]) - torch.min(a[:, :2], b[:, :2])).clamp(min=0).prod(dim=1)
    return iou - (hull - union) / (hull + eps)


class ClocLoss:
    """L_CLIP + lambda * (L_CLOC + L_grounding) over the global batch; returns the total and its parts."""

    def __init__(self, config: LossConfig) -> None:
        self.config = config

    def __call__(self, out: dict[str, torch.Tensor], boxes: torch.Tensor | None = None,
                 keys: torch.Tensor | None = None, step: int | None = None) -> dict[str, torch.Tensor]:
        from vesl.cloc.model import normalize

        scale = out["logit_scale"].exp().clamp(max=self.config.max_logit_scale)
        image, text = gather_features(normalize(out["image"]), normalize(out["text"]))
        parts = {"clip": clip_loss(image, text, scale)}
        total = parts["clip"]
        if self.config.region_weight > 0 and "region" in out:
            region, phrase, pred, true, key = gather_features(
                normalize(out["region"]), normalize(out["phrase"]), out["pred_box"].float(), boxes.float(), keys)
            if region.shape[0]:
                threshold = self.config.duplicate_cosine
                if step is not None and step < self.config.cosine_mask_from_step:
                    threshold = float("inf")
                mask = duplicate_text_mask(phrase, key, threshold)
                n = mask.shape[0]
                parts["masked_negatives"] = mask.sum() / max(1, n * (n - 1))  # a diagnostic, no gradient
                parts["cloc"] = cloc_loss(region, phrase, key, scale, threshold, mask)
                parts["grounding"] = grounding_loss(pred, true, self.config.grounding_loss)
            else:  # no region in the whole global batch: zero, still attached to the graph
                parts["cloc"] = parts["grounding"] = (region.sum() + phrase.sum() + pred.sum()) * 0.0
            regions = parts["cloc"] + self.config.grounding_weight_used() * parts["grounding"]
            total = total + self.config.region_weight * regions
        parts["loss"] = total
        return parts
