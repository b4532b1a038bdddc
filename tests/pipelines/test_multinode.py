"""The annotate pipeline across a multi-node Ray cluster on this machine: model stages land on the
nodes their resources pin them to, and the output is complete (see multinode_job.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.pipelines.helpers import EXPECTED, assert_accounted, make_manifest, read_output

pytestmark = pytest.mark.slow


def test_annotate_on_a_three_node_cluster(tmp_path, tiny_dir):
    manifest = make_manifest(tmp_path / "in")
    out = tmp_path / "out"
    env = {**os.environ, "VESL_TINY_DIR": str(tiny_dir), "HF_HUB_OFFLINE": "1", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "tests.pipelines.multinode_job", str(manifest), str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["node_count"] == 3
    placement = report["placement"]
    assert set(placement["CaptionImages"]) == {report["caption_node"]}
    assert set(placement["FuseCaptions"]) == {report["caption_node"]}
    assert set(placement["DetectRegions"]) == {report["detect_node"]}
    assert set(placement["ExtractPhrases"]) == {report["head"]}
    assert len({report["head"], report["caption_node"], report["detect_node"]}) == 3
    assert report["pools"]["caption"]["resources"] == {"vesl_caption": 1.0}
    rows, rejects, manifest_json = read_output(out)
    assert_accounted(rows, rejects, manifest_json, EXPECTED)
    assert report["counts"]["accounted"] and report["counts"]["rows"] == len(rows)
