"""`vesl serve --preset tiny` under a bounded load on loopback, beside the batch job on the same images, in one run.

    python benchmarks/serve_load.py [--requests 96] [--concurrency 1,4,16] [--json FILE]
    python benchmarks/serve_load.py --small       # 8 requests, concurrency 1 and 4 (a test runs it)

First the batch job (`vesl annotate --preset tiny`, in this process) runs over a manifest of REQUESTS rows (the
built-in sample's images, cycled, each under its own id): its rows/s over the whole job (model loads included, and
Ray's start unless the caller has a Ray running) and over its stages' own seconds. Then `vesl serve --preset
tiny` starts on 127.0.0.1 (a subprocess, its own Ray) and gets REQUESTS requests of one image each at every
concurrency C (C client threads, each sending its next request when the last one is answered): throughput,
p50/p95/p99 latency and the answers by status (503: backpressure).
The tiny models make the numbers the service's own overhead (HTTP, the hop between deployments, batching),
not a real model's speed.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "vesl" / "fixtures" / "sample"
VESL = [sys.executable, "-m", "vesl.cli"]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def sample_items(n: int) -> list[dict]:
    rows = [json.loads(line) for line in (SAMPLE / "manifest.jsonl").read_text().splitlines() if line.strip()]
    return [{"id": f"{rows[i % len(rows)]['id']}-{i}", "image": str(SAMPLE / rows[i % len(rows)]["image"]),
             "alt_text": rows[i % len(rows)]["alt_text"]} for i in range(n)]


def batch_job(items: list[dict], work: Path) -> dict:
    """The annotate job over ITEMS, in this process (on its Ray when it has one, else on a local Ray started for
    the job and stopped after it, so the service's figures share the machine with no idle Ray): rows/s over its
    wall time and over its stages' seconds."""
    import contextlib
    import io

    import ray

    from vesl.cli import main as vesl

    manifest = work / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(i) + "\n" for i in items))
    had_ray = ray.is_initialized()
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        code = vesl(["annotate", str(manifest), str(work / "out"), "--preset", "tiny", "--overwrite"])
    wall = time.perf_counter() - start
    if not had_ray:
        ray.shutdown()
    if code != 0:
        raise RuntimeError(f"vesl annotate failed with exit code {code}")
    done = json.loads((work / "out" / "manifest.json").read_text())
    stage_s = sum(s["seconds"] for s in done["stages"].values())
    rows = done["counts"]["rows"]
    return {"rows": rows, "wall_s": round(wall, 2), "rows_per_s_wall": round(rows / wall, 2),
            "stage_s": round(stage_s, 2), "rows_per_s_stages": round(rows / stage_s, 2) if stage_s else None}


def start_service(port: int) -> subprocess.Popen:
    import httpx

    proc = subprocess.Popen([*VESL, "serve", "--preset", "tiny", "--port", str(port)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vesl serve exited: {proc.stdout.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise RuntimeError("vesl serve did not answer /healthz within 300 s")


def load(url: str, bodies: list[dict], concurrency: int) -> dict:
    """BODIES posted by CONCURRENCY threads: throughput, latency quantiles, answers by status."""
    import httpx
    import numpy as np

    def post(body: dict) -> tuple[int, float]:
        t = time.perf_counter()
        status = client.post(f"{url}/v1/annotate", json=body).status_code
        return status, time.perf_counter() - t

    with httpx.Client(timeout=300, limits=httpx.Limits(max_connections=concurrency)) as client:
        client.post(f"{url}/v1/annotate", json=bodies[0])  # warm: the first batch of each deployment
        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            answers = list(pool.map(post, bodies))
        wall = time.perf_counter() - start
    ok = np.array([s for c, s in answers if c == 200]) * 1000
    statuses: dict[str, int] = {}
    for code, _ in answers:
        statuses[str(code)] = statuses.get(str(code), 0) + 1
    quantile = {f"p{q}_ms": round(float(np.percentile(ok, q)), 1) if len(ok) else None for q in (50, 95, 99)}
    return {"concurrency": concurrency, "requests": len(bodies), "wall_s": round(wall, 2),
            "rows_per_s": round(len(ok) / wall, 2), **quantile, "statuses": statuses}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=96)
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--small", action="store_true", help="8 requests, concurrency 1 and 4: checks the script")
    p.add_argument("--json", default=None, help="default: benchmarks/results/serve_load.json (--small: not written)")
    args = p.parse_args(argv)
    n, levels = (8, [1, 4]) if args.small else (args.requests, [int(c) for c in args.concurrency.split(",")])
    items = sample_items(n)
    with tempfile.TemporaryDirectory() as tmp:
        batch = batch_job(items, Path(tmp))
    bodies = [{"id": i["id"], "image_base64": base64.b64encode(Path(i["image"]).read_bytes()).decode(),
               "alt_text": i["alt_text"]} for i in items]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    service = start_service(port)
    exit_code = None
    try:
        runs = [load(f"http://127.0.0.1:{port}", bodies, c) for c in levels]
    finally:
        service.send_signal(signal.SIGTERM)  # as Kubernetes stops a pod: the service shuts Serve and Ray down
        try:
            exit_code = service.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(service.pid, signal.SIGKILL)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPUs", "preset": "tiny",
              "batch": batch, "served": runs, "service_exit_code": exit_code}
    path = args.json or (None if args.small else str(REPO / "benchmarks" / "results" / "serve_load.json"))
    if path:
        Path(path).write_text(json.dumps(result, indent=1) + "\n")
    print(table_text(result))
    return 0


def table_text(r: dict) -> str:
    b = r["batch"]
    lines = [f"vesl serve --preset tiny vs vesl annotate --preset tiny, {r['machine']}, {r['date']}",
             "| path | concurrency | requests | rows/s | p50 ms | p95 ms | p99 ms | answers |",
             "|---|---|---|---|---|---|---|---|",
             f"| batch job (whole run) | - | {b['rows']} | {b['rows_per_s_wall']} | - | - | - | - |",
             f"| batch job (stage seconds) | - | {b['rows']} | {b['rows_per_s_stages']} | - | - | - | - |"]
    for run in r["served"]:
        lines.append(f"| vesl serve | {run['concurrency']} | {run['requests']} | {run['rows_per_s']} | "
                     f"{run['p50_ms']} | {run['p95_ms']} | {run['p99_ms']} | {run['statuses']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
