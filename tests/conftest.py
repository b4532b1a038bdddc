"""Shared fixtures: tiny offline models (built once per session), a local Ray instance, images."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "vesl" / "fixtures" / "sample"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """Tiny random-weight models, built offline into a session folder (and exported for presets)."""
    from vesl.fixtures.tiny import build_tiny_models

    root = tmp_path_factory.mktemp("tiny-models")
    build_tiny_models(root)
    os.environ["VESL_TINY_DIR"] = str(root)
    return root


FAST = os.environ.get("VESL_FAST") == "1"  # scripts/test.sh --fast: no Ray, no subprocess, no browser


def pytest_collection_modifyitems(config, items):
    """A test that starts Ray (the ray_local fixture) is `slow`: it is left out of the fast loop."""
    for item in items:
        if "ray_local" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


if FAST:  # a test that starts Ray without saying so fails loudly in the fast loop instead of slowing it
    import ray

    def _no_ray(*args, **kwargs):
        raise RuntimeError("the fast loop (VESL_FAST=1) starts no Ray: mark this test slow")

    ray.init = _no_ray


@pytest.fixture(scope="session")
def ray_local():
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def photo(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A real-looking test image (vesl.fixtures.hostile's generator) in MODE."""
    from vesl.fixtures.hostile import photo as rgb_photo

    return rgb_photo(width, height, seed).convert(mode)


def encode(image: Image.Image, fmt: str = "JPEG", **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()
