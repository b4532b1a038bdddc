"""A trained CLOC model as a library: images, boxes and texts into one embedding space.

    from vesl.cloc import RegionEncoder
    enc = RegionEncoder.from_pretrained("runs/cloc")              # a checkpoint, a training OUT, or s3://...
    regions = enc.embed_regions(image, [[10, 20, 200, 180]])      # boxes in pixels of IMAGE -> (1, E)
    texts = enc.embed_texts(["a red mug", "a laptop"])            # (2, E); regions @ texts.T: cosine similarity
    names, sims = enc.classify_regions(image, boxes, ["mug", "laptop", "cat"])
    where = enc.ground(image, ["the red mug"])                    # (1, 4) box in pixels of IMAGE

Images are PIL images or (H, W, 3) uint8 arrays. Each image is prepared exactly as training and `vesl
eval` prepare it (RGB, longer side scaled down to 1024, stretched to the model's square input), so a
box means the same region here as in the shards. Boxes are x0, y0, x1, y1 in pixels of the image
given, or in [0, 1] with `normalized=True`. Every embedding comes back L2-normalised, on the CPU.
Work is batched (`batch_size` images at a time) on the device chosen (`auto`: CUDA when there is one).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

DEFAULT_TEMPLATE = "a photo of a {}."


def _as_list(images) -> tuple[list, bool]:
    """(a list of images, whether one image was given alone)."""
    if isinstance(images, (list, tuple)):
        return list(images), False
    return [images], True


class RegionEncoder:
    """A CLOC checkpoint loaded for use: see the module doc."""

    def __init__(self, model, tokenizer, meta: dict[str, Any], device: str, batch_size: int = 32) -> None:
        self.model, self.tokenizer, self.meta, self.device = model, tokenizer, meta, device
        self.batch_size = batch_size
        self.image_size = model.clip.config.vision_config.image_size
        self.max_tokens = model.clip.config.text_config.max_position_embeddings

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_pretrained(cls, path_or_uri: str | Path, *, device: str = "auto", batch_size: int = 32,
                        storage_options: dict[str, Any] | None = None) -> "RegionEncoder":
        """Load a checkpoint directory, a training OUT (its final `model/`), local or `s3://...`."""
        from vesl.cloc.checkpoint import CLIP_DIR, fetch_checkpoint, load_cloc
        from vesl.cloc.data import load_tokenizer
        from vesl.core.models import resolve_device

        device = resolve_device(device)
        model, meta = load_cloc(fetch_checkpoint(str(path_or_uri), storage_options), device=device)
        return cls(model, load_tokenizer(f"{meta['path']}/{CLIP_DIR}"), meta, device, batch_size)

    def save_pretrained(self, path_or_uri: str | Path, storage_options: dict[str, Any] | None = None) -> str:
        """Write this model as a checkpoint directory (weights, tokenizer, image processor, its record),
        local or `s3://...`; `from_pretrained` reads it back."""
        import shutil
        import tempfile

        from transformers import AutoProcessor

        from vesl.cloc.checkpoint import CLIP_DIR, save_checkpoint
        from vesl.core.storage import filesystem

        processor = AutoProcessor.from_pretrained(f"{self.meta['path']}/{CLIP_DIR}")
        meta = {k: v for k, v in self.meta.items() if k not in ("path", "format", "format_version", "prompter",
                                                               "pixel_mean", "pixel_std")}
        target = str(path_or_uri)
        if "://" not in target or target.startswith("file://"):
            save_checkpoint(target.removeprefix("file://"), self.model, processor, meta)
            return target
        local = Path(tempfile.mkdtemp(prefix="vesl-save-"))
        try:
            save_checkpoint(local, self.model, processor, meta)
            fs, remote = filesystem(target, storage_options)
            fs.put(str(local) + "/", remote.rstrip("/") + "/", recursive=True)
        finally:
            shutil.rmtree(local, ignore_errors=True)
        return target

    # ------------------------------------------------------------------ inputs
    def pixels(self, image) -> tuple[np.ndarray, tuple[int, int]]:
        """(the model's (S, S, 3) uint8 input, the image's (width, height)) for a PIL image or an array."""
        from PIL import Image

        from vesl.cloc.data import WORKING_MAX_SIDE, square_pixels
        from vesl.core.images import scale_down, to_rgb

        if isinstance(image, np.ndarray):
            image = Image.fromarray(np.asarray(image, dtype=np.uint8))
        if not isinstance(image, Image.Image):
            raise TypeError(f"an image is a PIL image or an (H, W, 3) uint8 array, not {type(image).__name__}")
        size = image.size
        return square_pixels(scale_down(to_rgb(image), WORKING_MAX_SIDE), self.image_size), size

    def _normalised_boxes(self, boxes, size: tuple[int, int], normalized: bool) -> torch.Tensor:
        b = torch.as_tensor(np.asarray(boxes, dtype=np.float32).reshape(-1, 4))
        if not normalized:
            b = b / torch.tensor([size[0], size[1], size[0], size[1]], dtype=torch.float32)
        if len(b) and not ((b[:, 0] < b[:, 2]) & (b[:, 1] < b[:, 3])).all():
            raise ValueError("a box must be x0 < x1, y0 < y1")
        return b.clamp(0.0, 1.0)

    def _patches(self, pixels: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = torch.from_numpy(np.stack(pixels)).to(self.device)
        return self.model.encode_image(batch)

    # ------------------------------------------------------------------ embeddings
    @torch.no_grad()
    def embed_images(self, images) -> torch.Tensor:
        """(N, E): each image's CLIP embedding (one image alone: (1, E))."""
        from vesl.cloc.model import normalize

        images, _ = _as_list(images)
        out = []
        for i in range(0, len(images), self.batch_size):
            embeds, _ = self._patches([self.pixels(im)[0] for im in images[i:i + self.batch_size]])
            out.append(normalize(embeds).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.model.clip.config.projection_dim)

    def embed_texts(self, texts: Sequence[str] | str) -> torch.Tensor:
        """(T, E): each text's embedding, in the space of the image and region embeddings (as `vesl eval`
        embeds its class names)."""
        from vesl.cloc.evaluate import encode_texts

        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            return torch.zeros(0, self.model.clip.config.projection_dim)
        return encode_texts(self.model, self.tokenizer, texts, self.max_tokens, self.device)

    @torch.no_grad()
    def embed_regions(self, images, boxes, *, normalized: bool = False) -> torch.Tensor:
        """(R, E): the region embedding of every box, in order. IMAGES is one image with BOXES (k, 4), or
        a list of images with one (k_i, 4) list of boxes each (R = the sum of the k_i)."""
        from vesl.cloc.model import normalize

        images, alone = _as_list(images)
        per_image = [boxes] if alone else list(boxes)
        if len(per_image) != len(images):
            raise ValueError(f"{len(images)} image(s) but {len(per_image)} box list(s)")
        out = []
        for i in range(0, len(images), self.batch_size):
            chunk = [self.pixels(im) for im in images[i:i + self.batch_size]]
            norm = [self._normalised_boxes(b, size, normalized) for (_, size), b in
                    zip(chunk, per_image[i:i + self.batch_size])]
            if not sum(len(b) for b in norm):
                continue
            _, patches = self._patches([p for p, _ in chunk])
            index = torch.cat([torch.full((len(b),), k, dtype=torch.long) for k, b in enumerate(norm)])
            region = self.model.region_embeddings(patches, index.to(self.device), torch.cat(norm).to(self.device))
            out.append(normalize(region).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.model.clip.config.projection_dim)

    def classify_regions(self, images, boxes, class_names: Sequence[str], *, template: str = DEFAULT_TEMPLATE,
                         normalized: bool = False) -> tuple[list[str], torch.Tensor]:
        """(the most similar class name per box, the (R, C) cosine similarities), each class as TEMPLATE
        filled with its name (the paper's region recognition)."""
        regions = self.embed_regions(images, boxes, normalized=normalized)
        classes = self.embed_texts([template.format(name) for name in class_names])
        similarity = regions @ classes.T
        return [class_names[int(k)] for k in similarity.argmax(dim=1)] if len(regions) else [], similarity

    @torch.no_grad()
    def ground(self, images, texts) -> list[np.ndarray] | np.ndarray:
        """The box the grounding head predicts for each text, in pixels of its image (x0, y0, x1, y1).
        One image with a list of texts -> (k, 4); a list of images with a list of texts each -> a list."""
        images, alone = _as_list(images)
        per_image = [texts] if alone else list(texts)
        if len(per_image) != len(images):
            raise ValueError(f"{len(images)} image(s) but {len(per_image)} text list(s)")
        per_image = [[t] if isinstance(t, str) else list(t) for t in per_image]
        out: list[np.ndarray] = []
        for i in range(0, len(images), self.batch_size):
            chunk = [self.pixels(im) for im in images[i:i + self.batch_size]]
            queries = per_image[i:i + self.batch_size]
            flat = [t for q in queries for t in q]
            if not flat:
                out += [np.zeros((0, 4), np.float32) for _ in chunk]
                continue
            _, patches = self._patches([p for p, _ in chunk])
            index = torch.cat([torch.full((len(q),), k, dtype=torch.long) for k, q in enumerate(queries)])
            boxes = self.model.ground(patches, index.to(self.device), self._text_embeds(flat)).float().cpu().numpy()
            start = 0
            for (_, (w, h)), q in zip(chunk, queries):
                out.append(boxes[start:start + len(q)] * np.array([w, h, w, h], np.float32))
                start += len(q)
        return out[0] if alone else out

    def _text_embeds(self, texts: list[str]) -> torch.Tensor:
        """Raw (unnormalised) text embeddings on the device, as the grounding head was trained on them."""
        from vesl.cloc.data import DataConfig, tokenize

        limit = DataConfig.model_validate(self.meta.get("training", {}).get("data", {})).phrase_max_tokens
        ids, mask = tokenize(self.tokenizer, texts, limit)
        return self.model.encode_text(torch.from_numpy(ids).to(self.device), torch.from_numpy(mask).to(self.device))


__all__ = ["DEFAULT_TEMPLATE", "RegionEncoder"]
