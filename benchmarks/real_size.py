"""The paper preset at its real model sizes, measured: `vesl annotate --preset paper` on N images of the
built-in sample, with SmolVLM-Instruct, Qwen2.5-1.5B-Instruct and OWLv2 B/16 built at their real sizes
with random weights (`vesl.fixtures.real_size`; the hub cannot be reached, and speed, memory and shapes
do not depend on the weights' values).

    python benchmarks/real_size.py --device cpu --images 4 --json FILE
    python benchmarks/real_size.py --tiny --images 2     # the tiny preset's models: checks the script (a test runs it)

The job is the real one (Ray, the actor pools, the preset) with local model paths. Reported per stage:
seconds per image (the stage's own time, from the run's manifest), the peak RSS of its worker processes
(sampled every 0.2 s), and for the model stages their parameter count and their token counts per row
(the prompt, its visual tokens, the generated tokens: what the stages count and the job sums into the
run manifest's stage `metrics`). Exits non-zero when the job fails, any row is rejected, or a stage
handled fewer rows than it should.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

from benchmarks.speed import proc_tree, run_sampled  # noqa: E402

STAGE_CLASSES = {"decode": "DecodeImages", "caption": "CaptionImages", "fuse": "FuseCaptions",
                 "phrases": "ExtractPhrases", "detect": "DetectRegions"}
MODEL_STAGES = ("caption", "fuse", "detect")


def sample_manifest(work: Path, n: int) -> Path:
    """The first N images of the built-in sample (cycled past its six), as a manifest of absolute paths."""
    sample = REPO / "vesl" / "fixtures" / "sample"
    rows = [json.loads(line) for line in (sample / "manifest.jsonl").read_text().splitlines() if line.strip()]
    manifest = work / "manifest.jsonl"
    with manifest.open("w") as f:
        for i in range(n):
            row = rows[i % len(rows)]
            f.write(json.dumps({"id": f"{row['id']}-{i}", "image": str(sample / row["image"]),
                                "alt_text": row["alt_text"]}) + "\n")
    return manifest


def stage_rss(root: int) -> dict[str, int]:
    """RSS in bytes of the worker processes of each stage under ROOT (by the stage's class in the title)."""
    out: dict[str, int] = {}
    for pid in proc_tree(root):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            rss = next(int(line.split()[1]) * 1024 for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                       if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            continue
        for stage, cls in STAGE_CLASSES.items():
            if cls in title:
                out[stage] = out.get(stage, 0) + rss
    return out


def run_annotate(manifest: Path, out: Path, args: list[str]) -> tuple[dict, dict[str, int], float]:
    """The annotate job in a child process: (its manifest.json, peak RSS per stage, wall seconds)."""
    cmd = [sys.executable, str(REPO / "pipelines" / "annotate.py"), str(manifest), str(out), "--overwrite", *args]
    peak: dict[str, int] = {}
    started = time.perf_counter()

    def sample(pid: int) -> None:
        for stage, rss in stage_rss(pid).items():
            peak[stage] = max(peak.get(stage, 0), rss)

    proc, log, _ = run_sampled(cmd, sample, 0.2, merge_stderr=True)
    if proc.returncode != 0:
        sys.stderr.write(log[-6000:])
        raise SystemExit(f"real_size: the annotate job failed with exit code {proc.returncode}")
    return json.loads((out / "manifest.json").read_text()), peak, time.perf_counter() - started


def parameters(path: Path) -> int:
    """Parameters of a saved model, from its safetensors headers (nothing loaded)."""
    from safetensors import safe_open

    total = 0
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for name in f.keys():
                shape = f.get_slice(name).get_shape()
                count = 1
                for d in shape:
                    count *= d
                total += count
    return total


def tokens_per_row(out: Path, run: dict) -> dict[str, dict[str, float]]:
    """Per model stage, its token counts (summed by the job into the manifest's stage `metrics`) per row it
    generated for: every captioned row, and for the fuser the rows it fused."""
    import pandas as pd

    fused = int((pd.read_parquet(out / "data", columns=["caption_source"])["caption_source"] == "fused").sum())
    found = {}
    for stage, rows in (("caption", (run["stages"].get("caption") or {}).get("rows") or 0), ("fuse", fused)):
        metrics = (run["stages"].get(stage) or {}).get("metrics") or {}
        found[stage] = {f"{name}_per_row": round(total / rows, 1) for name, total in metrics.items() if rows}
        found[stage]["rows_generated_for"] = rows
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="the model stages' device (cpu, cuda, auto)")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--json", default=None, help="write the figures here")
    p.add_argument("--models", default=None, help="folder of the built models (kept between runs; default "
                   "~/.cache/vesl/real-size-models)")
    p.add_argument("--tiny", action="store_true", help="the tiny preset's models instead: checks the script")
    args = p.parse_args(argv)
    from vesl.annotate.config import load_config

    started = time.perf_counter()
    if args.tiny:
        from vesl.fixtures.tiny import build_tiny_models, tiny_models_dir

        tiny = build_tiny_models(Path(args.models) if args.models else tiny_models_dir())
        models = {"caption": tiny["smolvlm"], "fuse": tiny["fuser"], "detect": tiny["detector"]}
    else:  # built in a child process, so that none of the build's memory stays in this one
        root = Path(args.models or Path.home() / ".cache" / "vesl" / "real-size-models")
        code = ("import json, sys; from vesl.fixtures.real_size import build_real_size_models; "
                "print(json.dumps({k: str(v) for k, v in build_real_size_models(sys.argv[1]).items()}))")
        built = subprocess.run([sys.executable, "-c", code, str(root)], cwd=REPO, check=True, capture_output=True,
                               text=True)
        models = {k: Path(v) for k, v in json.loads(built.stdout.strip().splitlines()[-1]).items()}
    build_s = time.perf_counter() - started
    overrides = [f"{stage}.model={path}" for stage, path in models.items()]
    overrides += [f"{stage}.device={args.device}" for stage in MODEL_STAGES]
    if args.tiny:  # the tiny SmolVLM's processor tiles at 32 px: the preset's 768 px would make 576 tiles
        overrides.append("caption.processor_kwargs.size.longest_edge=64")
    load_config(None, "paper", overrides)  # a bad override is refused here, before the job starts
    with tempfile.TemporaryDirectory(prefix="vesl-real-size-") as tmp:
        work = Path(tmp)
        manifest = sample_manifest(work, args.images)
        flags = ["--preset", "paper"] + [x for o in overrides for x in ("--set", o)]
        run, peak, wall = run_annotate(manifest, work / "out", flags)
        tokens = tokens_per_row(work / "out", run)
    results = figures(args, run, peak, wall, build_s, models, tokens)
    print(table(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return check(results, args.images)


def figures(args, run: dict, peak: dict[str, int], wall: float, build_s: float, models: dict[str, Path],
            tokens: dict) -> dict:
    import platform

    import torch

    stages = {}
    for stage, s in (run.get("stages") or {}).items():
        rows = s.get("rows") or 0
        stages[stage] = {"rows": rows, "seconds": round(s.get("seconds") or 0.0, 2),
                         "s_per_image": round(s["seconds"] / rows, 2) if rows else None,
                         "peak_rss_mb": round(peak[stage] / 2**20) if stage in peak else None,
                         **tokens.get(stage, {})}
    return {
        "device": args.device, "machine": f"{platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__,
        "images": args.images, "models_kind": "tiny" if args.tiny else "real size, random weights",
        "models": {stage: {"path": str(path), "parameters": parameters(path)} for stage, path in models.items()},
        "build_s": round(build_s, 1), "wall_s": round(wall, 1), "timings_s": run.get("timings_s"),
        "rows": run["counts"]["rows"], "rejects": run["counts"]["rejects"],
        "by_reason": run["counts"].get("by_reason"), "stages": stages,
    }


def table(r: dict) -> str:
    lines = [f"vesl annotate --preset paper, {r['images']} images, {r['models_kind']}, device {r['device']} "
             f"({r['machine']}, torch {r['torch']})",
             f"rows {r['rows']}, rejects {r['rejects']}; job {r['wall_s']} s; model build {r['build_s']} s", "",
             f"{'stage':8} {'parameters':>12} {'s/image':>8} {'peak RSS MB':>12} {'visual tok':>10} "
             f"{'prompt tok':>10} {'gen tok':>8}"]
    for stage, s in r["stages"].items():
        params = r["models"].get(stage, {}).get("parameters")
        cells = [f"{params / 1e6:,.0f}M" if params else "", s["s_per_image"], s["peak_rss_mb"],
                 s.get("visual_tokens_per_row"), s.get("prompt_tokens_per_row"), s.get("generated_tokens_per_row")]
        lines.append(f"{stage:8} {cells[0]:>12} " + " ".join(f"{'' if c is None else c:>{w}}" for c, w in
                                                            zip(cells[1:], (8, 12, 10, 10, 8))))
    return "\n".join(lines)


def check(r: dict, images: int) -> int:
    problems = []
    if r["rows"] != images or r["rejects"]:
        problems.append(f"{r['rows']} rows and {r['rejects']} rejects for {images} images ({r['by_reason']})")
    for stage in ("decode", "caption", "phrases", "detect"):
        if (r["stages"].get(stage) or {}).get("rows") != images:
            problems.append(f"stage {stage} handled {(r['stages'].get(stage) or {}).get('rows')} of {images} rows")
    for problem in problems:
        print(f"real_size: FAILED: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
