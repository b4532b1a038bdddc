"""`vesl serve`: the annotate stages as an online service on Ray Serve, until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from typing import Any

APP_NAME = "vesl"


def parser() -> argparse.ArgumentParser:
    from vesl.annotate.config import PRESET_HELP, preset_names

    p = argparse.ArgumentParser(prog="vesl serve", description="Serve labels online: POST /v1/annotate answers with "
                                "the row `vesl annotate` writes for the same image and config (Ray Serve).")
    p.add_argument("--preset", choices=preset_names(), help=PRESET_HELP)
    p.add_argument("--config", help="YAML config file (the annotate job's; its serve: section sets the service)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--host", help="listen on this address (serve.host; 0.0.0.0 in a cluster)")
    p.add_argument("--port", type=int, help="listen on this port (serve.port)")
    return p


def start(config, wait_s: float = 600.0) -> str:
    """Start the service of CONFIG on the Ray this process joins (RAY_ADDRESS) or starts; its base URL."""
    import ray
    from ray import serve

    from vesl.core.ray import init_ray
    from vesl.serve.app import build_app

    init_ray()
    serve.start(http_options={"host": config.serve.host, "port": config.serve.port,
                              "request_timeout_s": config.serve.request_timeout_s})
    serve.run(build_app(config, ray.cluster_resources()), name=APP_NAME, route_prefix="/", blocking=False)
    host = "127.0.0.1" if config.serve.host in ("0.0.0.0", "::") else config.serve.host
    return f"http://{host}:{config.serve.port}"


def main(argv: list[str] | None = None) -> int:
    from pydantic import ValidationError

    from vesl.annotate.config import load_config

    args = parser().parse_args(argv)
    overrides = list(args.overrides) + ([f"serve.host={args.host}"] if args.host else []) + (
        [f"serve.port={args.port}"] if args.port else [])
    try:
        config = load_config(args.config, args.preset, overrides)
    except (ValidationError, ValueError, FileNotFoundError) as e:
        print(f"vesl serve: error: {e}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM (a pod stopping) ends it as Ctrl-C does, at any point
    try:
        url = start(config)
        signal.signal(signal.SIGTERM, _interrupt)  # again: ray.init installs a handler of its own
        print(f"vesl serve: {url}/v1/annotate (label hash {config.label_hash()}); GET {url}/healthz, {url}/v1/config. "
              "Ctrl-C stops it.", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("vesl serve: stopping", file=sys.stderr, flush=True)
    finally:
        shutdown()
    return 0


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


def shutdown(*_: Any) -> None:
    from ray import serve

    from vesl.core.ray import stop_ray

    try:
        serve.shutdown()
    finally:
        stop_ray()
