"""Every benchmark's small mode runs end to end and prints its table, so a change underneath one fails
here rather than the next time someone measures (the figures of a small run mean nothing). The small modes
run in this process (their `main`), on the session's Ray where they use one; each script's command line is
checked once (`--help`), and gpu_check's whole small mode runs as the GPU machine runs it, through its shell
wrapper without Ray."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow
BENCHMARKS = ("speed", "scale", "cloc_synthetic", "gpu_check", "serving", "real_size", "serve_load")


def run_benchmark(name: str, capsys, *args: str) -> str:
    """benchmarks/NAME.py's main(ARGS) in this process: what it printed."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    capsys.readouterr()
    code = module.main(list(args))
    printed = capsys.readouterr()
    assert code == 0, f"{name} failed ({code}):\n{printed.out[-3000:]}\n{printed.err[-5000:]}"
    return printed.out


@pytest.mark.parametrize("name", BENCHMARKS)
def test_every_benchmark_script_answers_on_its_command_line(name):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / f"{name}.py"), "--help"], cwd=REPO,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("usage: ") and "--help" in done.stdout


def test_speed_small(tmp_path, tiny_dir, capsys):
    out = run_benchmark("speed", capsys, "--small", "--work", str(tmp_path))
    for heading in ("1. OWLv2 preprocessing", "2. phrase stage", "3. whole pipeline", "4. peak memory"):
        assert heading in out
    figures = json.loads((tmp_path / "speed.json").read_text())
    assert figures["pipeline"]["sequential"]["rows"] == figures["pipeline"]["images"] == 16
    assert figures["phrases"]["naive_texts_s"] > 0 and figures["preprocess"]["640x480"]["max_abs_diff"] < 1e-5


def test_scale_small(tmp_path, tiny_dir, ray_local, capsys):
    out = run_benchmark("scale", capsys, "--small", "--json", str(tmp_path / "scale.json"))
    assert "No-op re-run of a finished job" in out
    runs = json.loads((tmp_path / "scale.json").read_text())["runs"]
    assert [(r["inputs"], r["units"], r["processed"], r["rows"]) for r in runs] == [(2000, 4, 0, 2000),
                                                                                   (4000, 8, 0, 4000)]


def test_cloc_synthetic_small(tmp_path, tiny_dir, ray_local, capsys):
    out = run_benchmark("cloc_synthetic", capsys, "--small", "--work", str(tmp_path))
    assert "CLOC (lambda=1), Prompter" in out and "CLOC (lambda=1), RoI pooling" in out
    results = json.loads((tmp_path / "cloc_synthetic.json").read_text())["results"]
    assert all(0.0 <= r["eval"]["mAcc"] <= 1.0 for r in results)


# what the GPU machine lacks: gpu_check must run without it (a sitecustomize on PYTHONPATH refuses the import)
_NOT_ON_THE_GPU_MACHINE = """
import sys


class _NotThere:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("ray", "spacy", "s3fs"):
            raise ImportError(f"{name} is not on the GPU machine")
        return None


sys.meta_path.insert(0, _NotThere())
"""


def test_gpu_check_runs_end_to_end_on_the_cpu_without_ray(tmp_path, tiny_dir):
    """benchmarks/gpu_check.sh with --tiny: the script the GPU machine runs, through its shell wrapper, with Ray,
    spaCy and s3fs made unimportable; every stage's sweep, naive loop and extra, and every preset's plan."""
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text(_NOT_ON_THE_GPU_MACHINE)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHON": sys.executable, "PYTHONPATH": str(block),
           "OUT": str(tmp_path), "VESL_GPU_WHEELS": str(tmp_path / "no-wheels")}
    blocked = subprocess.run([sys.executable, "-c", "import ray"], env=env, capture_output=True, text=True)
    assert "ray is not on the GPU machine" in blocked.stderr
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--tiny", "--models", str(tiny_dir)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    [written] = tmp_path.glob("gpu_check-*.json")
    r = json.loads(written.read_text())
    assert r["errors"] == {} and r["models"] == "tiny" and r["matmul_peak_flops"] > 0
    assert set(r["stages"]) == {"detect", "fuse", "caption", "caption_fast"}
    for stage, s in r["stages"].items():
        assert [p["items"] for p in s["sweep"].values()] == [4, 4], stage
        assert all(p["img_s"] > 0 for p in s["sweep"].values()) and s["chosen_batch"] in (1, 2)
        assert s["naive_img_s"] > 0 and s["speedup_vs_naive"] > 0 and s["parameters"] > 0
    assert 0 < r["stages"]["detect"]["of_matmul_peak"] and r["stages"]["detect"]["flops_per_image"] > 0
    batching = r["stages"]["fuse"]["batching"]
    assert batching["prompts"] == 4 and batching["static"]["generated_tokens"] == 4 * 6  # forced full length
    assert batching["continuous"]["generated_tokens"] > 0 and batching["continuous_over_static"] > 0
    assert r["stages"]["caption"]["visual_tokens_per_image"] >= 1
    assert set(r["plans"]) == {"paper", "fast", "alt-ngram"}
    paper = r["plans"]["paper"]
    assert sum(paper["whole_gpus"].values()) == 8 and abs(sum(paper["fractional"].values()) - 8) < 1e-6
    assert paper["gpu_hours_per_million"] > r["plans"]["alt-ngram"]["gpu_hours_per_million"] > 0
    assert "one 8-GPU node" in done.stdout and "naive HF loop" in done.stdout


def test_serving_small(tmp_path, tiny_dir, capsys):
    """benchmarks/serving.py's small mode: both backends on the same rows, the served one at two concurrencies."""
    out = run_benchmark("serving", capsys, "--small", "--json", str(tmp_path / "serving.json"))
    runs = json.loads((tmp_path / "serving.json").read_text())["runs"]
    assert [(r["stage"], r["backend"], r["concurrency"]) for r in runs] == [
        ("caption", "local", None), ("fuse", "local", None), ("caption", "openai", 1), ("fuse", "openai", 1),
        ("caption", "openai", 4), ("fuse", "openai", 4)]
    assert all(r["rows"] == 8 and r["rows_s"] > 0 and r["rejected"] == 0 for r in runs)
    assert all(r["server_cpu_ms_per_row"] > 0 for r in runs if r["backend"] == "openai")
    assert "client CPU ms/row" in out


def test_real_size_runs_the_paper_job_with_the_tiny_models(tmp_path, tiny_dir, capsys):
    """The real-size benchmark's script, end to end on the tiny models: the paper preset's job, every
    stage's figures, the JSON keys its results are read by."""
    out = run_benchmark("real_size", capsys, "--tiny", "--images", "2", "--json", str(tmp_path / "real.json"),
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


def test_real_size_tokenizers_cost_english_prompts_about_what_real_ones_do():
    """English costs ~1.2-1.5 tokens a word with the real checkpoints' tokenizers; the real-size ones must not
    split the stages' prompts and the sample's alt-texts into many more pieces (the fuse prompt was 3x too
    long when they did), or the benchmarks time prompts the real models never see."""
    from operators.fuse import SYSTEM_PROMPT
    from vesl.fixtures.real_size import QWEN_BASE_VOCAB, padded_bpe

    qwen = padded_bpe(QWEN_BASE_VOCAB, [])
    sample = (REPO / "vesl" / "fixtures" / "sample" / "manifest.jsonl").read_text().splitlines()
    alts = " ".join(json.loads(line)["alt_text"] for line in sample)
    for text in (SYSTEM_PROMPT, "Describe this image in detail.", alts):
        assert len(qwen.encode(text).ids) <= 1.5 * len(text.split()), text
    assert len(qwen.decode(list(range(150000, 150010))).split()) == 10  # every filler id decodes to a word


def test_serve_load_small(tmp_path, tiny_dir, ray_local, capsys):
    """benchmarks/serve_load.py's small mode: the batch job (on the session's Ray) and `vesl serve` (a real
    subprocess on loopback) on the same 8 images, the service at two concurrencies, every request answered 200."""
    out = run_benchmark("serve_load", capsys, "--small", "--json", str(tmp_path / "serve_load.json"))
    result = json.loads((tmp_path / "serve_load.json").read_text())
    assert result["batch"]["rows"] == 8 and result["batch"]["rows_per_s_wall"] > 0
    assert [r["concurrency"] for r in result["served"]] == [1, 4]
    assert all(r["statuses"] == {"200": 8} and r["rows_per_s"] > 0 and r["p50_ms"] <= r["p99_ms"]
               for r in result["served"])
    assert "| vesl serve | 4 | 8 |" in out
    assert result["service_exit_code"] == 0  # SIGTERM stopped the service cleanly
