"""Every benchmark's small mode runs end to end and prints its table, so a change underneath one fails
here rather than the next time someone measures (the figures of a small run mean nothing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def run_benchmark(script: str, *args: str, timeout: int = 900) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=timeout)
    assert done.returncode == 0, f"{script} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done.stdout


def test_speed_small(tmp_path, tiny_dir):
    out = run_benchmark("speed.py", "--small", "--work", str(tmp_path))
    for heading in ("1. OWLv2 preprocessing", "2. phrase stage", "3. whole pipeline", "4. peak memory"):
        assert heading in out
    figures = json.loads((tmp_path / "speed.json").read_text())
    assert figures["pipeline"]["sequential"]["rows"] == figures["pipeline"]["images"] == 48
    assert figures["phrases"]["naive_texts_s"] > 0 and figures["preprocess"]["640x480"]["max_abs_diff"] < 1e-5


def test_scale_small(tmp_path, tiny_dir):
    out = run_benchmark("scale.py", "--small", "--json", str(tmp_path / "scale.json"))
    assert "No-op re-run of a finished job" in out
    runs = json.loads((tmp_path / "scale.json").read_text())["runs"]
    assert [(r["inputs"], r["units"], r["processed"], r["rows"]) for r in runs] == [(2000, 4, 0, 2000),
                                                                                   (4000, 8, 0, 4000)]


def test_cloc_synthetic_small(tmp_path, tiny_dir):
    out = run_benchmark("cloc_synthetic.py", "--small", "--work", str(tmp_path))
    assert "CLOC (lambda=1), Prompter" in out and "CLOC (lambda=1), RoI pooling" in out
    results = json.loads((tmp_path / "cloc_synthetic.json").read_text())["results"]
    assert all(0.0 <= r["eval"]["mAcc"] <= 1.0 for r in results)


def test_gpu_models_tiny_on_the_cpu(tmp_path, tiny_dir):
    out = run_benchmark("gpu_models.py", "--tiny", "--json", str(tmp_path / "gpu.json"))
    assert json.loads((tmp_path / "gpu.json").read_text()) and out.strip()
