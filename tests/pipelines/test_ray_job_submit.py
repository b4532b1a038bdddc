"""`ray job submit --working-dir . -- .venv/bin/python pipelines/annotate.py ...` against a local head
started as README says (`.venv/bin/ray start --head`, without the virtualenv on PATH).

Ray 2.60 turns token auth on for `ray start` once ~/.ray/auth_token exists (it is written on first
use), after which a plain `ray job submit` is refused; this local test cluster runs with
RAY_AUTH_MODE=disabled on both sides, as the README documents.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.pipelines.helpers import EXPECTED, assert_accounted, make_manifest, read_output

pytestmark = pytest.mark.slow
RAY = str(REPO / ".venv" / "bin" / "ray")


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture
def ray_head(tmp_path):
    gcs, dash, client, agent, agent_grpc, env_agent, metrics = free_ports(7)
    # the virtualenv is NOT on the head's PATH: a plain `python` entrypoint would be some other interpreter
    path = ":".join(p for p in os.environ["PATH"].split(":") if not p.startswith(str(REPO / ".venv")))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": path}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dash}", "--include-dashboard=true",
         "--num-cpus=2", "--disable-usage-stats", f"--ray-client-server-port={client}",
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--runtime-env-agent-port={env_agent}", f"--metrics-export-port={metrics}"],
        env=env, stdout=open(tmp_path / "ray-start.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("ray start --head did not come up:\n" + (tmp_path / "ray-start.log").read_text()[-3000:])
            time.sleep(1)
    yield address, env, gcs
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=2)  # `ray start --block` takes about 30 s to stop gracefully: the rest is killed
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    forget_head(gcs)


def forget_head(gcs_port: int) -> None:
    """Remove /tmp/ray/ray_current_cluster when it names the head this test started (`ray stop` would; a killed
    head leaves it). Ray's state API finds its cluster through that file: a dead address there costs every later
    Ray Train run on this machine 12 s (its placement-group cleaner waits on the state API, then gives up)."""
    current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    if current.exists() and current.read_text().strip().endswith(f":{gcs_port}"):
        current.unlink()


def submit(address, env, tiny_dir, *entrypoint):
    runtime_env = {"env_vars": {"VESL_TINY_DIR": str(tiny_dir), "HF_HUB_OFFLINE": "1"}}
    return subprocess.run(
        [RAY, "job", "submit", f"--address={address}", "--working-dir", ".", "--runtime-env-json",
         json.dumps(runtime_env), "--", *entrypoint], cwd=REPO, env=env, capture_output=True, text=True, timeout=400)


def test_ray_job_submit_runs_the_annotate_entrypoint(tmp_path, tiny_dir, ray_head):
    address, env, gcs_port = ray_head
    manifest = make_manifest(tmp_path / "in")
    # README's recipe: the entrypoint names vesl's interpreter, so it holds however the head was started
    proc = submit(address, env, tiny_dir, str(REPO / ".venv" / "bin" / "python"), "pipelines/annotate.py",
                  str(manifest), str(tmp_path / "out"), "--preset", "tiny")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout + proc.stderr
    assert f"manifest: {tmp_path / 'out'}/manifest.json" in proc.stdout  # the real location
    rows, rejects, manifest_json = read_output(tmp_path / "out")
    assert_accounted(rows, rejects, manifest_json, EXPECTED)
    # the job joined the cluster started above, not a fresh local instance
    assert manifest_json["resources"]["gcs_address"].endswith(f":{gcs_port}")

    # the two refusals below are submitted at once (two jobs on the head, each failing on its own)
    base = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    bare = subprocess.run([base, "-c", "import PIL"], capture_output=True).returncode != 0
    with ThreadPoolExecutor(2) as pool:
        relative = pool.submit(submit, address, env, tiny_dir, str(REPO / ".venv" / "bin" / "python"),
                               "pipelines/annotate.py", str(manifest), "out/relative-run", "--preset", "tiny")
        without_deps = pool.submit(submit, address, env, tiny_dir, base, "pipelines/annotate.py", str(manifest),
                                   str(tmp_path / "o2")) if bare else None
    # a relative OUTPUT would land in Ray's temporary copy of the working dir: refused, saying why
    proc = relative.result()
    assert proc.returncode != 0
    assert "OUTPUT 'out/relative-run' is a relative path" in proc.stdout + proc.stderr
    assert "Ray deletes when the job ends" in proc.stdout + proc.stderr
    assert not (REPO / "out" / "relative-run").exists()

    # an interpreter without vesl's dependencies says what to do instead of `No module named 'PIL'`
    if not bare:
        pytest.skip(f"{base} has PIL: cannot show the message for an interpreter without vesl's dependencies")
    proc = without_deps.result()
    assert proc.returncode != 0
    assert "cannot import PIL" in proc.stdout + proc.stderr and ".venv/bin/python pipelines/annotate.py" in proc.stdout
