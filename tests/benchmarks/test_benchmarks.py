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


def test_real_size_runs_the_paper_job_with_the_tiny_models(tmp_path, tiny_dir):
    """The real-size benchmark's script, end to end on the tiny models: the paper preset's job, every
    stage's figures, the JSON keys its results are read by."""
    out = run_benchmark("real_size.py", "--tiny", "--images", "2", "--json", str(tmp_path / "real.json"),
                        "--models", str(tiny_dir))
    figures = json.loads((tmp_path / "real.json").read_text())
    assert (figures["rows"], figures["rejects"]) == (2, 0) and "rows 2, rejects 0" in out
    for stage in ("caption", "fuse", "detect"):
        assert figures["models"][stage]["parameters"] > 0
        assert figures["stages"][stage]["peak_rss_mb"] > 0
    assert figures["stages"]["caption"]["s_per_image"] > 0
    caption = figures["stages"]["caption"]  # counted by the stages: the tiny SmolVLM has 1 visual token per tile
    assert caption["visual_tokens_per_row"] >= 1 and caption["prompt_tokens_per_row"] > caption["visual_tokens_per_row"]
    assert 0 < caption["generated_tokens_per_row"] <= 160  # the paper preset's caption.max_new_tokens


def test_real_size_tokenizers_have_the_checkpoints_vocabularies():
    """The real-size tokenizers have the checkpoints' vocabulary sizes and special-token ids (checked without
    building the multi-GB models)."""
    from vesl.fixtures.real_size import QWEN_BASE_VOCAB, QWEN_SPECIALS, SMOLVLM_BASE_SPECIALS, padded_bpe

    smol = padded_bpe(49152, SMOLVLM_BASE_SPECIALS)
    assert smol.get_vocab_size() == 49152 and smol.token_to_id("<|im_start|>") == 1
    qwen = padded_bpe(QWEN_BASE_VOCAB, [])
    qwen.add_special_tokens(QWEN_SPECIALS)
    assert (qwen.token_to_id("<|endoftext|>"), qwen.token_to_id("<|im_end|>")) == (151643, 151645)
    assert len(qwen.decode(list(range(150000, 150010))).split()) == 10  # every filler id decodes to a word
