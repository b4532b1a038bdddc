"""The model-free stage chain for the tests of the run machinery (plan, units, lease, resume, slices, input
changes, integrity, S3 layout, exit codes): the real decode stage, then two small deterministic labelling stages
with no model, `LabelFromPixels` (the caption) and `BoxesFromPixels` (phrases and regions). They are real stages
through the real base class, Ray Data actor pools, writer and ledger; only the labels are cheap (no torch,
transformers or spaCy in their actors), which is all those tests need. The tests of labels, models and backends
keep the tiny models (`--preset tiny`).

In process: the `model_free` fixture puts the chain in the stage registry, the way
tests/operators/test_registry.py registers a stage, so `main([...])` and `run_annotate` run it. As a script
(for the tests whose subject is the process boundary: signals, two drivers), `python -m
tests.pipelines.model_free INPUT OUTPUT ...` is `pipelines/annotate.py` with this chain registered.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np
from pydantic import Field

from operators.base import Reject, Stage, StageConfig, image_from_row
from operators.decode import DecodeImages
from schemas.region_text import CaptionSource
from schemas.rejects import RejectReason as R

TONES = ("dark", "bright")
SHAPES = ("wide", "tall", "square")


class LabelConfig(StageConfig):
    batch_size: int = Field(default=16, ge=1, description="Rows per call.")
    refuse: str = Field(default="", description="Reject a row whose alt-text holds this word (empty: none), as a "
                        "model stage rejects a row it cannot label.")
    delay_s: float = Field(default=0.0, ge=0, description="Seconds each row takes, as a model's would: a run "
                           "that lasts long enough to be signalled, stopped or raced mid-way.")


class LabelFromPixels(Stage):
    """The caption, from the decoded pixels alone: 'a bright wide image'. The same pixels, the same caption."""

    name = "label"
    config_class = LabelConfig
    reads = ("pixels", "pixel_width", "pixel_height", "alt_text")
    writes = ("caption", "vlm_caption", "caption_source")
    reasons = (R.MODEL_ERROR, R.EMPTY_CAPTION)
    speed_settings = ("batch_size", "delay_s")

    def process(self, batch) -> list[dict[str, Any] | Reject]:
        time.sleep(self.config.delay_s * batch.num_rows)
        out: list[dict[str, Any] | Reject] = []
        for row, alt in enumerate(batch.column("alt_text").to_pylist()):
            if self.config.refuse and self.config.refuse in (alt or "").split():
                out.append(Reject(R.EMPTY_CAPTION, f"refused: the alt-text holds {self.config.refuse!r}"))
                continue
            caption = f"a {describe(image_from_row(batch, row))}"
            out.append({"caption": caption, "vlm_caption": caption, "caption_source": CaptionSource.VLM.value})
        return out


class BoxesConfig(StageConfig):
    batch_size: int = Field(default=16, ge=1, description="Rows per call.")


class BoxesFromPixels(Stage):
    """The caption's phrase (all of it but the article) and one region for it: the box around the pixels brighter
    than the image's mean."""

    name = "boxes"
    config_class = BoxesConfig
    reads = ("pixels", "pixel_width", "pixel_height", "caption")
    writes = ("phrases", "regions")
    reasons = (R.MODEL_ERROR,)

    def process(self, batch) -> list[dict[str, Any] | Reject]:
        out: list[dict[str, Any] | Reject] = []
        for row, caption in enumerate(batch.column("caption").to_pylist()):
            phrase = caption.split(" ", 1)[1]
            box, score = bright_box(image_from_row(batch, row))
            region = {"box": box, "phrase": phrase, "score": score, "source": "caption",
                      "spans": [[len(caption) - len(phrase), len(caption)]]}
            out.append({"phrases": [phrase], "regions": [region]})
        return out


def describe(pixels: np.ndarray) -> str:
    """'bright wide image': the tone and the shape of an (H, W, 3) uint8 image."""
    h, w = pixels.shape[:2]
    tone = TONES[int(pixels.mean() > 127)]
    shape = SHAPES[0] if w > h else SHAPES[1] if h > w else SHAPES[2]
    return f"{tone} {shape} image"


def bright_box(pixels: np.ndarray) -> tuple[list[float], float]:
    """The normalised box around the pixels brighter than the mean (the whole image when none is), and their
    share of the image."""
    h, w = pixels.shape[:2]
    gray = pixels.astype(np.float32).mean(axis=2)
    bright = gray > gray.mean()
    ys, xs = np.nonzero(bright) if bright.any() else (np.array([0, h - 1]), np.array([0, w - 1]))
    box = [float(xs.min() / w), float(ys.min() / h), float((xs.max() + 1) / w), float((ys.max() + 1) / h)]
    return box, round(float(bright.mean()), 4)


MODEL_FREE = [DecodeImages, LabelFromPixels, BoxesFromPixels]


def job_command(*args: str) -> list[str]:
    """The command line of the annotate job with this chain, as its own process (run it with `job_env()`)."""
    return [sys.executable, "-m", "tests.pipelines.model_free", *args]


def job_env(**extra: str) -> dict[str, str]:
    """The environment of `job_command`: its own local Ray, the repository importable (by its Ray workers too)."""
    import os

    from tests.conftest import REPO

    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": "", "PYTHONPATH": path, **extra}


def register() -> None:
    """Make the registry's stages the model-free chain (for the rest of this process)."""
    from operators import registry

    registry.STAGES[:] = MODEL_FREE


if __name__ == "__main__":  # `python -m tests.pipelines.model_free INPUT OUTPUT ...`: the annotate job, this chain
    register()
    from vesl.annotate.job import main

    sys.exit(main())
