"""Caption and fuse in process against the same stages on an inference server, side by side in one run.

    python benchmarks/serving.py [--rows 48] [--concurrency 1,4,16] [--json FILE]
    python benchmarks/serving.py --small       # 8 rows, concurrency 1 and 4 (a test runs it)

The same rows (the built-in sample's images, cycled; their alt-texts) go through the caption and fuse stages'
own `process` with `backend: local` (the model in this process) and with `backend: openai` against a
`transformers serve` started on 127.0.0.1 for the run, hosting the same tiny weights (the tiny SmolVLM and
fuser: the demo's models, so the numbers show the client's overhead and the concurrency's effect, not a real
model's speed). The served backend is swept over `max_concurrency`. Reported per stage and setting: rows/s,
this process's CPU seconds per row (for local: the model's work; for served: the client's own, JPEG encoding,
HTTP and JSON) and the server process's CPU seconds per row. Both run on the same machine's cores, so the
rates here compare the two paths' costs, not a GPU server's speed. `transformers serve` without
`--continuous-batching` answers one request at a time (its continuous-batching path drops images); vLLM and
SGLang batch the concurrent requests.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def sample_rows(n: int):
    """N rows (decoded pixels, alt-text, and a caption for the fuser) as the stages' batch table."""
    import numpy as np
    import pyarrow as pa
    from PIL import Image

    sample = REPO / "vesl" / "fixtures" / "sample"
    rows = [json.loads(line) for line in (sample / "manifest.jsonl").read_text().splitlines() if line.strip()]
    pixels, widths, heights, alts = [], [], [], []
    for i in range(n):
        row = rows[i % len(rows)]
        image = np.asarray(Image.open(sample / row["image"]).convert("RGB"))
        pixels.append(image.tobytes())
        heights.append(image.shape[0])
        widths.append(image.shape[1])
        alts.append(row["alt_text"])
    return pa.table({"pixels": pa.array(pixels, pa.binary()), "pixel_width": widths, "pixel_height": heights,
                     "alt_text": alts, "caption": [f"a photo of something, view {i}" for i in range(n)],
                     "vlm_caption": [f"a photo of something, view {i}" for i in range(n)],
                     "caption_source": ["vlm"] * n})


def start_server(cache: Path) -> tuple[subprocess.Popen, str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).parent / "transformers"
    proc = subprocess.Popen([str(exe), "serve", "--host", "127.0.0.1", "--port", str(port)],
                            env={**os.environ, "HF_HUB_CACHE": str(cache)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("serving: transformers serve did not start")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process PID so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(stage, table, server_pid: int | None) -> dict:
    """One pass of STAGE over TABLE after a warm-up row: rows/s, this process's and the server's CPU s/row."""
    from schemas.columns import REJECT_REASON

    stage(table.slice(0, 1))
    server_before = cpu_s(server_pid) if server_pid else 0.0
    cpu_before, started = time.process_time(), time.perf_counter()
    out = stage(table)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_before
    server = (cpu_s(server_pid) - server_before) if server_pid else None
    rejected = sum(1 for r in out.column(REJECT_REASON).to_pylist() if r) if REJECT_REASON in out.column_names else 0
    n = table.num_rows
    return {"rows": n, "rows_s": n / wall, "client_cpu_ms_per_row": 1000 * cpu / n,
            "server_cpu_ms_per_row": None if server is None else 1000 * server / n, "rejected": rejected}


def stages(tiny: Path, backend: str, endpoint: str | None, concurrency: int) -> dict:
    from operators.caption import CaptionConfig, CaptionImages
    from operators.fuse import FuseCaptions, FuseConfig

    common = {"repetition_penalty": 1.0, "max_new_tokens": 12, "min_new_tokens": 0, "device": "cpu"}
    served = {"backend": "openai", "endpoint": endpoint, "max_concurrency": concurrency} if backend == "openai" else {}
    caption = CaptionImages(CaptionConfig(model=str(tiny / "smolvlm"), prompt_style="chat", processor_kwargs={},
                                          **common, **served))
    fuse = FuseCaptions(FuseConfig(model=str(tiny / "fuser"), **common, **served))
    return {"caption": caption, "fuse": fuse}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=48)
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--small", action="store_true", help="8 rows, concurrency 1 and 4: checks the script")
    p.add_argument("--json", default=None, help="default: benchmarks/results/serving.json (--small: not written)")
    args = p.parse_args(argv)
    if args.small:
        args.rows, args.concurrency = 8, "1,4"
    from vesl.fixtures.tiny import build_tiny_models, tiny_models_dir

    tiny = tiny_models_dir()
    build_tiny_models(tiny)
    table = sample_rows(args.rows)
    results: dict = {"rows": args.rows, "machine": f"{os.cpu_count()} cores", "runs": []}
    for name, stage in stages(tiny, "local", None, 1).items():
        results["runs"].append({"stage": name, "backend": "local", "concurrency": None,
                                **measure(stage, table, None)})
    with tempfile.TemporaryDirectory(prefix="vesl-serving-") as cache:
        server, url = start_server(Path(cache))
        try:
            for concurrency in (int(c) for c in args.concurrency.split(",")):
                for name, stage in stages(tiny, "openai", url, concurrency).items():
                    results["runs"].append({"stage": name, "backend": "openai", "concurrency": concurrency,
                                            **measure(stage, table, server.pid)})
        finally:
            server.kill()
    print(table_text(results))
    path = args.json or (None if args.small else str(REPO / "benchmarks" / "results" / "serving.json"))
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(results, indent=2) + "\n")
    return 1 if any(r["rejected"] for r in results["runs"]) else 0


def table_text(r: dict) -> str:
    lines = [f"{r['rows']} rows, tiny SmolVLM (caption) and tiny Qwen2 (fuse), {r['machine']}; served: transformers "
             "serve on 127.0.0.1", "",
             f"{'stage':8} {'backend':8} {'in flight':>9} {'rows/s':>8} {'client CPU ms/row':>18} "
             f"{'server CPU ms/row':>18}"]
    for run in r["runs"]:
        server = "" if run["server_cpu_ms_per_row"] is None else f"{run['server_cpu_ms_per_row']:.1f}"
        lines.append(f"{run['stage']:8} {run['backend']:8} {run['concurrency'] or '':>9} {run['rows_s']:8.2f} "
                     f"{run['client_cpu_ms_per_row']:18.1f} {server:>18}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
