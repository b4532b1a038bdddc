"""Speed and memory of the annotate pipeline on this machine's CPU, each figure measured side by side.

    python benchmarks/speed.py [--sections preprocess,phrases,pipeline,memory] [--json FILE]
    python benchmarks/speed.py --small    # every section on a few images (under a minute; a test runs it)

1. preprocess: our torch OWLv2 preprocessing vs HF's processor (the PIL/SciPy path), one thread
   each, the same images; images/s, ratio, and the largest difference of any output value.
2. phrases: our phrase stage (nlp.pipe, tagger + matcher only) vs the naive loop (`nlp(text)` with
   the full pipeline, `doc.noun_chunks`); texts/s and ratio.
3. pipeline: the Ray Data job (`vesl annotate --preset tiny`) vs a plain sequential loop over the
   same stages in one process (the tiny preset's, in registry order, then the writer's split), tiny models,
   N images. Startup (Ray, actors, model loading) is reported apart: the Ray job is also run on
   N/4 images and the difference of the two runs gives its steady rate.
4. memory: peak memory of the Ray job's whole process tree (driver, GCS, raylet, workers) at two
   sizes; PSS counts shared pages (the object store) once, RSS counts them in every process.

Prints a table and writes the figures to benchmarks/results/speed.json (--small: into its scratch folder).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

PREPROCESS_SIZES = [(640, 480), (480, 640), (1024, 683), (800, 800), (320, 240), (1024, 200)]
SUBJECTS = ["cat", "dog", "man", "woman", "car", "bicycle", "tree", "house", "boat", "horse", "cup", "table",
            "chair", "bird", "flower", "plate of pasta", "red sofa", "street", "mountain", "lake", "child",
            "laptop", "window", "guitar", "airplane", "train", "bench", "umbrella", "clock", "book"]
ADJECTIVES = ["red", "small", "old", "white", "wooden", "large", "green", "black", "shiny", "tall", "blue", "young"]
PLACES = ["on a wooden table", "in a park", "next to a window", "on the beach at sunset", "in a busy city street",
          "under a blue sky", "in a kitchen", "near a lake", "on a snowy mountain", "in front of a house"]


def caption_like(rng: random.Random) -> str:
    a, b = rng.sample(SUBJECTS, 2)
    return (f"a {rng.choice(ADJECTIVES)} {a} {rng.choice(['sitting', 'standing', 'lying', 'parked'])} "
            f"{rng.choice(PLACES)} with a {rng.choice(ADJECTIVES)} {b} and {rng.choice(ADJECTIVES)} "
            f"{rng.choice(SUBJECTS)}s")


def alt_like(rng: random.Random) -> str:
    return rng.choice([f"{rng.choice(SUBJECTS).title()} photo",
                       f"Buy {rng.choice(ADJECTIVES)} {rng.choice(SUBJECTS)} online",
                       f"IMG_{rng.randint(1000, 9999)}.jpg", f"{rng.choice(ADJECTIVES)} {rng.choice(SUBJECTS)} "
                       f"{rng.choice(PLACES)}"])


def timed(fn, repeat: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


# 1. preprocessing ------------------------------------------------------------------------------

def bench_preprocess(images_per_size: int, side: int = 960) -> dict:
    import torch
    from transformers import Owlv2ImageProcessorPil

    from operators.owlv2_preprocess import Owlv2Preprocess
    from vesl.fixtures.hostile import photo

    torch.set_num_threads(1)  # HF's path is single-threaded NumPy/SciPy: compare one core with one core
    processor = Owlv2ImageProcessorPil(size={"height": side, "width": side})
    ours = Owlv2Preprocess(processor)
    results = {}
    groups = {"640x480": [(640, 480)], "mixed sizes": PREPROCESS_SIZES}
    for name, sizes in groups.items():
        images = [np.asarray(photo(w, h, seed=i)) for i, (w, h) in
                  enumerate(sizes[k % len(sizes)] for k in range(images_per_size))]
        batches = [images[i:i + 8] for i in range(0, len(images), 8)]
        ours(batches[0])  # warm: index plans and work buffers
        max_diff = 0.0
        for batch in batches[:2]:
            ref = processor(images=batch, return_tensors="pt", input_data_format="channels_last")["pixel_values"]
            max_diff = max(max_diff, float((ours(batch) - ref).abs().max()))
        t_ours = timed(lambda: [ours(b) for b in batches])
        t_hf = timed(lambda: [processor(images=b, return_tensors="pt", input_data_format="channels_last")
                              for b in batches])
        results[name] = {"images": len(images), "ours_img_s": len(images) / t_ours, "hf_img_s": len(images) / t_hf,
                         "ratio": t_hf / t_ours, "max_abs_diff": max_diff, "side": side}
    return results


# 2. phrases ------------------------------------------------------------------------------------

def bench_phrases(n: int) -> dict:
    from operators.phrases import UNUSED_COMPONENTS, ExtractPhrases, PhraseConfig, resolve_spacy_model

    rng = random.Random(0)
    captions = [caption_like(rng) for _ in range(n)]
    alts = [alt_like(rng) for _ in range(n)]
    stage = ExtractPhrases(PhraseConfig())
    stage.extract(captions[:50], alts[:50])  # warm
    t_ours = timed(lambda: stage.extract(captions, alts))
    nlp = resolve_spacy_model(PhraseConfig().spacy_model, keep=UNUSED_COMPONENTS)  # the full pipeline: parser too

    naive_subset = max(200, n // 4)  # the naive loop is slow: time a quarter of the texts
    texts = (captions + alts)[: 2 * naive_subset]
    t_naive = timed(lambda: [[c.text for c in nlp(t.lower()).noun_chunks] for t in texts])
    ours_rate = 2 * n / t_ours
    naive_rate = len(texts) / t_naive
    return {"texts": 2 * n, "ours_texts_s": ours_rate, "naive_texts_s": naive_rate, "ratio": ours_rate / naive_rate,
            "naive_texts_timed": len(texts), "pipeline_components": stage.nlp.pipe_names,
            "ours_pipes": stage.nlp.pipe_names}


# 3 and 4. the pipeline -------------------------------------------------------------------------

def make_manifest(work: Path, n: int, distinct: int = 64) -> Path:
    """N manifest rows over DISTINCT real-looking 640x480 JPEGs (ids differ, so every row is work)."""
    from vesl.fixtures.hostile import photo

    images = work / "images"
    if not images.exists():
        images.mkdir(parents=True)
        for i in range(distinct):
            photo(640, 480, seed=i).save(images / f"{i:04d}.jpg", quality=90)
    rng = random.Random(n)
    manifest = work / f"manifest-{n}.jsonl"
    with open(manifest, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"img{i:07d}", "image": f"images/{i % distinct:04d}.jpg",
                                "alt_text": alt_like(rng)}) + "\n")
    return manifest


def proc_tree(root: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                parents.setdefault(ppid, []).append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(parents.get(pid, []))
    return tree


def tree_memory(root: int) -> tuple[int, int]:
    """(RSS, PSS) in bytes summed over ROOT and its descendants."""
    rss = pss = 0
    for pid in proc_tree(root):
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1]) * 1024
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
        except OSError:
            continue
    return rss, pss


def run_sampled(cmd: list[str], sample, interval_s: float, merge_stderr: bool = False):
    """Run CMD in REPO to its end, calling SAMPLE(pid) every INTERVAL_S seconds meanwhile; returns
    (the finished process, its stdout, its stderr)."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True,
                            stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE)
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            sample(proc.pid)
            stop.wait(interval_s)

    sampler = threading.Thread(target=loop, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    stop.set()
    sampler.join()
    return proc, stdout, stderr


JOBS: dict[Path, dict] = {}  # manifest -> its run: a section that needs the same run again reuses it


def run_job(manifest: Path, out: Path, extra: list[str] | None = None) -> dict:
    """`vesl annotate --preset tiny` in a child process; peak memory of its whole tree sampled meanwhile."""
    if manifest in JOBS and not extra:
        return JOBS[manifest]
    cmd = [sys.executable, "-m", "vesl.cli", "annotate", str(manifest), str(out), "--preset", "tiny",
           "--overwrite", *(extra or [])]
    peak = {"rss": 0, "pss": 0}
    started = time.perf_counter()

    def sample(pid: int) -> None:
        rss, pss = tree_memory(pid)
        peak["rss"], peak["pss"] = max(peak["rss"], rss), max(peak["pss"], pss)

    proc, stdout, stderr = run_sampled(cmd, sample, 0.5)
    if proc.returncode != 0:
        sys.stderr.write(stdout[-3000:] + stderr[-3000:])
        raise SystemExit(f"annotate failed with exit code {proc.returncode}")
    manifest_json = json.loads((out / "manifest.json").read_text())
    JOBS[manifest] = {"wall_s": time.perf_counter() - started, "timings_s": manifest_json["timings_s"],
                      "rows": manifest_json["counts"]["rows"], "rejects": manifest_json["counts"]["rejects"],
                      "peak_rss": peak["rss"], "peak_pss": peak["pss"]}
    return JOBS[manifest]


def sequential(manifest: Path, out: Path, block_rows: int) -> dict:
    """The same stages (the tiny preset's active ones, in registry order) in a plain loop in this
    process, no Ray: manifest records -> stages -> one shard per block, written as the job's writer
    splits a finished batch."""
    import pyarrow.parquet as pq
    import torch

    from schemas.region_text import META_SCHEMA_VERSION, SCHEMA_VERSION, region_text_schema
    from vesl.annotate.config import load_config
    from vesl.annotate.output.writer import split_rows_and_rejects
    from vesl.annotate.sources.manifest import iter_manifest_records
    from vesl.annotate.sources.rows import normalize_rows

    torch.set_num_threads(os.cpu_count() or 1)
    config = load_config(None, "tiny", [])
    start = time.perf_counter()
    stages = [stage(config.stage_config(stage)) for stage in config.active_stages()]
    load_s = time.perf_counter() - start
    schema = region_text_schema({META_SCHEMA_VERSION: SCHEMA_VERSION})
    (out / "data").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows = regions = ordinal = 0
    for chunk in iter_manifest_records(str(manifest), None):
        records = [row for _, _, row in chunk]
        table = normalize_rows(records, list(range(ordinal, ordinal + len(records))), config.input,
                               str(manifest.parent))
        ordinal += len(records)
        for offset in range(0, table.num_rows, block_rows):
            batch = table.slice(offset, block_rows)
            for stage in stages:
                batch = stage(batch)
            done, _ = split_rows_and_rejects(batch, schema)
            pq.write_table(done, out / "data" / f"part-seq-{ordinal + offset:09d}.parquet", compression="zstd")
            rows += done.num_rows
            regions += sum(len(r) for r in done.column("regions").to_pylist())
    loop_s = time.perf_counter() - start
    return {"load_s": load_s, "loop_s": loop_s, "rows": rows, "regions": regions}


def bench_pipeline(work: Path, n: int) -> dict:
    """Ray's fixed cost (Ray and actor start, model loads, planning passes) is taken out by running
    the job at two sizes: the steady rate is the extra images over the extra time. (The output
    files' write times cannot be used: Ray Data runs most write tasks at the end.)"""
    from vesl.annotate.config import load_config

    block_rows = load_config(None, "tiny", []).input.block_rows
    small = n // 4
    manifest, manifest_small = make_manifest(work, n), make_manifest(work, small)
    seq = sequential(manifest, work / "out-seq", block_rows)
    job_small = run_job(manifest_small, work / "out-ray-small")
    job = run_job(manifest, work / "out-ray")
    total, total_small = job["timings_s"]["total"], job_small["timings_s"]["total"]
    steady = (n - small) / max(1e-9, total - total_small)
    seq_rate = n / seq["loop_s"]
    return {"images": n, "small_run_images": small, "sequential": {**seq, "img_s": seq_rate},
            "ray": {**job, "small_run_total_s": total_small, "img_s_steady": steady,
                    "startup_s": total_small - small / steady, "img_s_end_to_end": n / total},
            "ratio_steady": steady / seq_rate,
            "ratio_end_to_end": (n / total) / (n / (seq["load_s"] + seq["loop_s"]))}


def bench_memory(work: Path, sizes: list[int]) -> dict:
    out = {}
    for n in sizes:
        job = run_job(make_manifest(work, n), work / f"out-mem-{n}")
        out[str(n)] = {"rows": job["rows"], "rejects": job["rejects"], "total_s": job["timings_s"]["total"],
                       "peak_rss_mib": job["peak_rss"] / 2**20, "peak_pss_mib": job["peak_pss"] / 2**20}
    first, last = out[str(sizes[0])], out[str(sizes[-1])]
    out["pss_growth"] = last["peak_pss_mib"] / first["peak_pss_mib"] - 1
    out["rss_growth"] = last["peak_rss_mib"] / first["peak_rss_mib"] - 1
    return out


# report ----------------------------------------------------------------------------------------

def table(results: dict) -> str:
    lines = []
    add = lines.append
    add(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, no GPU; torch {__import__('torch').__version__}")
    if "preprocess" in results:
        add("")
        add("1. OWLv2 preprocessing to 960x960, one thread each   ours img/s   HF img/s   ratio   max |diff|")
        for name, r in results["preprocess"].items():
            add(f"   {name:<50} {r['ours_img_s']:10.1f} {r['hf_img_s']:10.2f} {r['ratio']:6.1f}x   "
                f"{r['max_abs_diff']:.1e}")
    if "phrases" in results:
        r = results["phrases"]
        add("")
        add("2. phrase stage (captions + alt-texts)              ours texts/s   naive texts/s   ratio")
        add(f"   nlp.pipe, tagger+matcher  vs  nlp(text) loop, full {r['ours_texts_s']:10.0f} "
            f"{r['naive_texts_s']:15.0f} {r['ratio']:6.1f}x")
    if "pipeline" in results:
        r = results["pipeline"]
        s, j = r["sequential"], r["ray"]
        add("")
        add(f"3. whole pipeline, tiny models, {r['images']} images (640x480)    img/s   startup s   total s")
        add(f"   sequential loop, same operators, one process   {s['img_s']:9.1f} {s['load_s']:10.1f} "
            f"{s['load_s'] + s['loop_s']:9.1f}")
        add(f"   Ray Data job (vesl annotate --preset tiny)      {j['img_s_steady']:9.1f} {j['startup_s']:10.1f} "
            f"{j['timings_s']['total']:9.1f}")
        add(f"   ratio Ray / sequential: {r['ratio_steady']:.2f}x steady state, "
            f"{r['ratio_end_to_end']:.2f}x end to end")
    if "memory" in results:
        r = results["memory"]
        add("")
        add("4. peak memory of the Ray job's process tree     images   rows   total s   peak PSS MiB   peak RSS MiB")
        for n, m in r.items():
            if isinstance(m, dict):
                add(f"   {'':44} {int(n):7d} {m['rows']:6d} {m['total_s']:9.1f} {m['peak_pss_mib']:14.0f} "
                    f"{m['peak_rss_mib']:14.0f}")
        add(f"   growth from the smallest to the largest run: PSS {100 * r['pss_growth']:+.1f}%, "
            f"RSS {100 * r['rss_growth']:+.1f}%")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sections", default="preprocess,phrases,pipeline,memory")
    p.add_argument("--preprocess-images", type=int, default=48)
    p.add_argument("--phrase-texts", type=int, default=2000, help="captions (each with an alt-text)")
    p.add_argument("--pipeline-images", type=int, default=4800,
                   help="the Ray job also runs on a quarter of them (the difference gives its steady rate)")
    p.add_argument("--memory-images", default="1000,10000")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--json", default=None, help="default: benchmarks/results/speed.json (--small: in --work)")
    p.add_argument("--small", action="store_true", help="every section on a few images: a quick check that the "
                   "benchmark runs, not a measurement")
    args = p.parse_args(argv)
    if args.small:
        # the memory runs are the pipeline's own two runs (4 and 16 images), not two more
        args.preprocess_images, args.phrase_texts, args.pipeline_images, args.memory_images = 2, 100, 16, "4,16"
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    work = Path(args.work or tempfile.mkdtemp(prefix="vesl-bench-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.json is None:
        args.json = str(work / "speed.json" if args.small else REPO / "benchmarks" / "results" / "speed.json")
    results: dict = {}
    for section in sections:
        started = time.perf_counter()
        if section == "preprocess":
            results[section] = bench_preprocess(args.preprocess_images)
        elif section == "phrases":
            results[section] = bench_phrases(args.phrase_texts)
        elif section == "pipeline":
            results[section] = bench_pipeline(work, args.pipeline_images)
        elif section == "memory":
            results[section] = bench_memory(work, [int(x) for x in args.memory_images.split(",")])
        else:
            raise SystemExit(f"unknown section {section!r}")
        print(f"[speed] {section} done in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    print(table(results))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(Path(args.json).read_text()) if Path(args.json).exists() else {}
    Path(args.json).write_text(json.dumps({**previous, **results}, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
