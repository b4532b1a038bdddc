"""Input and output on s3:// against a moto server on loopback; credentials from config, never logged."""

from __future__ import annotations

import json

import pytest

from pipelines.annotate import run_annotate
from tests.pipelines.helpers import EXPECTED, assert_accounted, make_manifest, read_output
from vesl.config import load_config

pytestmark = pytest.mark.slow
KEY, SECRET = "AKIAVESLTEST", "vesl-super-secret-value"


@pytest.fixture(scope="module")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def test_annotate_reads_and_writes_s3(tmp_path, tiny_dir, ray_local, s3_endpoint, caplog):
    import s3fs

    fs = s3fs.S3FileSystem(key=KEY, secret=SECRET, client_kwargs={"endpoint_url": s3_endpoint})
    fs.mkdir("vesl-in")
    fs.mkdir("vesl-out")
    local = make_manifest(tmp_path / "in")
    fs.put(str(local.parent) + "/", "vesl-in/run1/", recursive=True)
    assert fs.exists("vesl-in/run1/manifest.jsonl") and fs.exists("vesl-in/run1/images/wide.jpg")

    config = load_config(preset_name="tiny", overrides=[
        f"storage.endpoint_url={s3_endpoint}", f"storage.key={KEY}", f"storage.secret={SECRET}",
        "storage.region=us-east-1"])
    result = run_annotate("s3://vesl-in/run1/manifest.jsonl", "s3://vesl-out/labels", config)

    fs.invalidate_cache()
    rows, rejects, manifest = read_output("s3://vesl-out/labels", filesystem=fs)
    assert_accounted(rows, rejects, manifest, EXPECTED)
    assert all(f.startswith("s3://vesl-out/labels/") for f in manifest["files"])
    assert rows["image_uri"].str.startswith("s3://vesl-in/run1/images/").all()
    text = json.dumps(result, default=str) + fs.cat("vesl-out/labels/manifest.json").decode() + caplog.text
    assert SECRET not in text and KEY not in text
    assert manifest["config"]["storage"]["secret"] == "**********"


def test_credentials_from_the_environment_through_the_script(tmp_path, tiny_dir, s3_endpoint):
    """The usual AWS variables, nothing in the config; the secret never appears in output or logs."""
    import os
    import subprocess
    import sys

    import s3fs

    from tests.conftest import REPO

    fs = s3fs.S3FileSystem(key=KEY, secret=SECRET, client_kwargs={"endpoint_url": s3_endpoint})
    fs.mkdir("vesl-env-in")
    local = make_manifest(tmp_path / "in")
    fs.put(str(local.parent) + "/", "vesl-env-in/run/", recursive=True)
    env = {**os.environ, "VESL_TINY_DIR": str(tiny_dir), "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": "",
           "AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_ENDPOINT_URL": s3_endpoint,
           "AWS_DEFAULT_REGION": "us-east-1"}
    proc = subprocess.run([sys.executable, str(REPO / "pipelines" / "annotate.py"),
                           "s3://vesl-env-in/run/manifest.jsonl", "s3://vesl-env-in/out", "--preset", "tiny"],
                          env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fs.invalidate_cache()
    rows, rejects, manifest = read_output("s3://vesl-env-in/out", filesystem=fs)
    assert_accounted(rows, rejects, manifest, EXPECTED)
    assert SECRET not in proc.stdout + proc.stderr + json.dumps(manifest)
