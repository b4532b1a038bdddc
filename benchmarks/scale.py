"""Run state at scale: what re-running a finished N-input job costs the driver (the least every
resume, and every run's start and end, pays).

    python benchmarks/scale.py [--inputs 1000000 4000000] [--unit-rows 10000] [--baseline COMMIT|none]
                               [--json FILE]
    python benchmarks/scale.py --small     # 2,000 and 4,000 inputs, units of 500, no baseline (a test runs it)

For each N it builds, by itself:
- a Parquet manifest of N inputs (id, image path, alt-text; the images need not exist);
- an OUTPUT already holding all of them, as a finished run leaves it: the plan made by the real
  planning pass (`vesl.annotate.units.make_plan` on Ray: its time is reported as the first run's planning),
  then per unit one shard and one completion record written by the real `stage_unit_parts` and
  `commit_unit` (rows without regions: no model runs).
Then the real job re-runs on it, `vesl annotate MANIFEST OUTPUT --preset tiny`, in its own process
attached to one local Ray started for the benchmark, by its address (as under `ray job submit`). Reported: its
wall time, its setup (all but the pipeline: load the plan, list and read the records, the manifest)
and the driver's peak RSS (ru_maxrss of that process).

With --baseline COMMIT (default: the last commit before work units) the same case runs on that vesl
too, from a git worktree, on an OUTPUT in its layout (the same rows as per-task shards, its run state
file), with the same manifest and cluster. `--baseline none` skips it.

Prints a table; --json FILE writes {"runs": [{"inputs", "total_s", "setup_s", "driver_peak_rss_mb", ...}]}
(`runs` holds this vesl's figures; `baseline_runs` the baseline's).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
BASELINE = "b2abc0e519632a096ad0249ab7715f54f9301d06"  # the last commit before work units
# The driver wrapper: runs `vesl annotate ...` and prints its own peak RSS (VmHWM, KiB) on stderr when it
# ends (not ru_maxrss: Linux keeps the forking parent's high-water mark across exec).
WRAPPER = ("import runpy, sys\n"
           "try:\n    runpy.run_module('vesl.cli', run_name='__main__')\n"
           "finally:\n    print('PEAK_RSS_KB', next(line.split()[1] for line in open('/proc/self/status')\n"
           "                                  if line.startswith('VmHWM:')), file=sys.stderr)\n")


def write_manifest(path: Path, n: int) -> None:
    """N inputs, in row groups of 100k: id img000000000.., image images/<id>.jpg, alt-text."""
    writer = None
    for start in range(0, n, 100_000):
        k = np.arange(start, min(n, start + 100_000))
        ids = np.char.add("img", np.char.zfill(k.astype(str), 9))
        table = pa.table({"id": ids, "image": np.char.add(np.char.add("images/", ids), ".jpg"),
                          "alt_text": np.char.add("a red car and a dog ", k.astype(str))})
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    writer.close()


def finished_rows(ids: pa.Array, ordinals: np.ndarray, unit: int) -> pa.Table:
    """What the stages would hand the writer for these inputs: every one a row (no regions)."""
    from operators.base import as_table

    n = len(ids)
    return as_table(pa.table({
        "image_id": ids, "image_uri": pa.compute.binary_join_element_wise("/data/", ids, ".jpg", ""),
        "image_bytes": pa.nulls(n, pa.large_binary()),
        "image_location": pa.compute.binary_join_element_wise("/data/", ids, ".jpg", ""),
        "image_offset": pa.nulls(n, pa.int64()), "image_length": pa.nulls(n, pa.int64()),
        "width": pa.array(np.full(n, 640, np.int32)),
        "height": pa.array(np.full(n, 480, np.int32)), "alt_text": pa.array(["a red car and a dog"] * n),
        "caption": pa.array(["a red car next to a dog on a street"] * n), "vlm_caption": pa.nulls(n, pa.string()),
        "caption_source": pa.array(["alt_text"] * n), "phrases": pa.array([["a red car", "a dog"]] * n),
        "regions": pa.array([[]] * n, pa.list_(pa.struct([("phrase", pa.string()), ("box", pa.list_(pa.float32())),
                                                          ("score", pa.float32()), ("source", pa.string())]))),
        "ordinal": pa.array(ordinals, pa.int64()), "unit": pa.array(np.full(n, unit, np.int64))}))


def build_output(manifest: Path, out: Path, unit_rows: int, config) -> dict:
    """OUTPUT of a finished run of MANIFEST (this vesl's layout); returns the planning figures."""
    from vesl.annotate.job import footer_metadata, model_provenance
    from vesl.annotate.output.state import prepare_output
    from vesl.annotate.output.writer import commit_unit, stage_unit_parts
    from vesl.annotate.sources.plan import plan_input
    from vesl.annotate.units import make_plan, save_plan
    from vesl.core.outdir import OutputDir

    t = time.perf_counter()
    plan = make_plan(str(manifest), plan_input(str(manifest), config.input, None), config.input, None)
    plan_s = time.perf_counter() - t
    target = OutputDir(str(out))
    prepare_output(target, str(manifest), config.label_hash(), "resume")
    save_plan(target, plan)
    footer = footer_metadata(config, model_provenance(config))
    ids = pq.read_table(manifest, columns=["id"]).column("id").combine_chunks()
    for unit in plan.units.to_pylist():
        rows = finished_rows(ids.slice(unit["start"], unit["count"]), np.arange(unit["lo"], unit["hi"] + 1),
                             unit["unit"])
        staged = stage_unit_parts(rows, target, footer).to_pylist()[0]
        commit_unit(target, unit["unit"], unit["count"], staged["parts"], footer, "zstd", run_id="bench")
    return {"plan_s": round(plan_s, 1), "plan_scan_s": plan.meta["timings_s"]["scan"],
            "plan_duplicates_s": plan.meta["timings_s"]["duplicates"], "units": plan.unit_count}


def build_baseline_output(out: Path, baseline_out: Path, manifest: Path, label_hash: str) -> None:
    """The same rows in the baseline's layout: data/part-<run>-<task>.parquet, and its run state file."""
    (baseline_out / "data").mkdir(parents=True)
    for k, shard in enumerate(sorted((out / "data").glob("*.parquet"))):
        os.link(shard, baseline_out / "data" / f"part-bench0000-{k:05d}.parquet")
    (baseline_out / "_vesl_run.json").write_text(json.dumps({"input": str(manifest), "config_hash": label_hash,
                                                             "run_id": "bench000", "created_at": "2026-01-01"}))


def rerun(code_dir: Path, manifest: Path, out: Path, env: dict) -> dict:
    """`vesl annotate MANIFEST OUT --preset tiny` from CODE_DIR in its own process: wall time, the
    manifest's timings, peak RSS."""
    env = {**env, "PYTHONPATH": str(code_dir)}
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", WRAPPER, "annotate", str(manifest), str(out), "--preset", "tiny"],
                          cwd=code_dir, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"re-run in {code_dir} failed ({proc.returncode}): {proc.stderr[-3000:]}")
    rss_kb = int(next(line for line in proc.stderr.splitlines()[::-1] if line.startswith("PEAK_RSS_KB")).split()[-1])
    result = json.loads((out / "manifest.json").read_text())
    timings = result["timings_s"]
    return {"total_s": round(wall, 1), "setup_s": round(timings["setup"], 1),
            "execute_s": timings["execute"], "driver_peak_rss_mb": round(rss_kb / 1024),
            "processed": result["this_run"]["inputs"], "accounted": result["counts"]["accounted"],
            "rows": result["counts"]["rows"]}


def baseline_worktree(commit: str, where: Path) -> Path | None:
    if commit == "none":
        return None
    proc = subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(where), commit],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"baseline {commit} unavailable ({proc.stderr.strip()}): reported without it", file=sys.stderr)
        return None
    return where


def start_ray(work: Path) -> bool:
    """One local Ray for the benchmark (or the caller's, when main() is called on a Ray already started), joined by
    each job by its own GCS address (as under `ray job submit`); "auto" could join another Ray running on this
    machine, and `ray stop` would stop that one too. Returns whether it started one."""
    import ray

    if ray.is_initialized():
        return False
    os.environ["RAY_AUTH_MODE"] = "disabled"  # the benchmark's cluster, joined by it and each job (README)
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             _temp_dir=str(work / "ray"))
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--inputs", type=int, nargs="+", default=[1_000_000, 4_000_000])
    p.add_argument("--unit-rows", type=int, default=10_000)
    p.add_argument("--baseline", default=BASELINE)
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--small", action="store_true", help="a quick check: 2,000 and 4,000 inputs, units of 500, "
                   "no baseline")
    args = p.parse_args(argv)
    if args.small:
        args.inputs, args.unit_rows, args.baseline = [2_000, 4_000], 500, "none"

    import ray

    from vesl.annotate.config import load_config

    work = Path(tempfile.mkdtemp(prefix="vesl-scale-"))
    own_ray = start_ray(work)
    env = {**os.environ}  # the jobs join as this process did
    try:
        env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
        config = load_config(preset_name="tiny", overrides=[f"input.unit_rows={args.unit_rows}"])
        old_code = baseline_worktree(args.baseline, work / "baseline")
        runs, baseline_runs = [], []
        for n in args.inputs:
            case = work / f"n{n}"
            case.mkdir()
            manifest = case / "manifest.parquet"
            write_manifest(manifest, n)
            t = time.perf_counter()
            built = build_output(manifest, case / "out", args.unit_rows, config)
            print(f"{n:,} inputs: plan {built['plan_s']} s, OUTPUT written in {time.perf_counter() - t:.0f} s",
                  file=sys.stderr)
            runs.append({"inputs": n, **built, **rerun(REPO, manifest, case / "out", env)})
            if old_code is not None:
                build_baseline_output(case / "out", case / "old", manifest, config.label_hash())
                baseline_runs.append({"inputs": n, **rerun(old_code, manifest, case / "old", env)})
            shutil.rmtree(case)
    except BaseException as e:
        print(f"benchmark failed: {e!r}", file=sys.stderr, flush=True)
        raise
    finally:
        if own_ray:
            ray.shutdown()
        if (work / "baseline").exists():
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(work / "baseline")],
                           capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    print_table(runs, baseline_runs, args)
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "baseline_runs": baseline_runs,
                                               "baseline_commit": args.baseline, "unit_rows": args.unit_rows,
                                               "cpus": os.cpu_count()}, indent=1))
    return 0


def print_table(runs: list[dict], baseline: list[dict], args) -> None:
    print(f"\nNo-op re-run of a finished job (every input already in OUTPUT), {os.cpu_count()} CPUs; "
          f"units of {args.unit_rows:,} inputs\n")
    print("| vesl | inputs | units | total | setup | driver peak RSS | first run's planning |")
    print("|---|---|---|---|---|---|---|")
    by_n = {r["inputs"]: r for r in baseline}
    for r in runs:
        if r["inputs"] in by_n:
            b = by_n[r["inputs"]]
            print(f"| before (per-task shards, {args.baseline[:8]}) | {b['inputs']:,} | - | {b['total_s']} s | "
                  f"{b['setup_s']} s | {b['driver_peak_rss_mb']:,} MB | - |")
        print(f"| work units | {r['inputs']:,} | {r['units']:,} | {r['total_s']} s | {r['setup_s']} s | "
              f"{r['driver_peak_rss_mb']:,} MB | {r['plan_s']} s |")
    if len(runs) >= 2:
        a, b = runs[0], runs[-1]
        growth = 100 * (b["driver_peak_rss_mb"] - a["driver_peak_rss_mb"]) / a["driver_peak_rss_mb"]
        line = f"\nDriver RSS {a['inputs']:,} -> {b['inputs']:,} inputs: {growth:+.1f}% (work units)"
        if len(baseline) >= 2:
            ba, bb = baseline[0], baseline[-1]
            line += f", {100 * (bb['driver_peak_rss_mb'] - ba['driver_peak_rss_mb']) / ba['driver_peak_rss_mb']:+.1f}% "
            line += "(before)"
        print(line)
    for r in runs + baseline:
        assert r["accounted"] and r["processed"] == 0 and r["rows"] == r["inputs"], r


if __name__ == "__main__":
    sys.exit(main())
