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
# Ray Train polls its workers every 2 s by default: each short test run waits up to that long at every
# step of its life (start, report, end) for nothing. Polled more often, the same runs take seconds less.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "vesl" / "fixtures" / "sample"


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    """Tiny random-weight models, built offline once per machine into the user cache (keyed by their
    builder's source: a changed builder builds them again), and exported for presets and subprocesses."""
    from vesl.fixtures.tiny import build_tiny_models, tiny_models_dir

    root = tiny_models_dir()
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


@pytest.fixture
def model_free(monkeypatch):
    """The stage registry holds the model-free chain (decode + a deterministic labelling stage,
    tests/pipelines/model_free.py) for this test: for the run machinery, where labels do not matter."""
    from operators import registry
    from tests.pipelines.model_free import MODEL_FREE

    monkeypatch.setattr(registry, "STAGES", list(MODEL_FREE))
    return tuple(MODEL_FREE)


def _start_ray():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)


@pytest.fixture(scope="session")
def ray_local():
    import ray

    if not ray.is_initialized():
        _start_ray()
    yield ray
    ray.shutdown()


def settle_ray(wait_s: float = 3.0) -> bool:
    """After a pipeline that failed in this process: wait until the session's Ray has every CPU free again, and
    restart it when it does not within WAIT_S (returns whether it did). A Ray Data pipeline that fails is shut down
    without killing its actors; one whose task waits on an output nobody will take keeps its CPU, and the next
    run on this Ray would wait for that CPU for ever."""
    import time

    import ray

    deadline = time.monotonic() + wait_s
    while ray.available_resources().get("CPU", 0.0) < ray.cluster_resources().get("CPU", 0.0):
        if time.monotonic() > deadline:
            ray.shutdown()
            _start_ray()
            return True
        time.sleep(0.2)
    return False


SAMPLE_SETTINGS = ["decode.embed_images=true"]  # the shared sample OUTPUT's settings beside --preset tiny


def _digest(root: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def sample_output(ray_local, tiny_dir, tmp_path_factory) -> Path:
    """The built-in sample annotated once per session with the tiny models (`--preset tiny`, SAMPLE_SETTINGS), on
    the session's Ray: its OUTPUT folder. Read-only: a test that changes it works on a copy. Every file is
    checked unchanged when the session ends."""
    from vesl.annotate.config import load_config
    from vesl.annotate.job import run_annotate

    out = tmp_path_factory.mktemp("sample") / "out"
    run_annotate(str(SAMPLE / "manifest.jsonl"), str(out), load_config(preset_name="tiny", overrides=SAMPLE_SETTINGS))
    before = _digest(out)
    yield out
    assert _digest(out) == before, "a test changed the shared sample OUTPUT: work on a copy (shutil.copytree)"


def photo(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A real-looking test image (vesl.fixtures.hostile's generator) in MODE."""
    from vesl.fixtures.hostile import photo as rgb_photo

    return rgb_photo(width, height, seed).convert(mode)


def encode(image: Image.Image, fmt: str = "JPEG", **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()
