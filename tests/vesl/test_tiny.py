"""The tiny models: several processes may build them into one folder at once."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

BUILD = "import sys; from vesl.tiny import build_tiny_models; build_tiny_models(sys.argv[1])"


def test_two_processes_building_into_one_folder_both_succeed_and_leave_one_copy(tmp_path):
    root = tmp_path / "tiny"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", BUILD, str(root)], cwd=REPO, env=env, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    from vesl.tiny import TINY_MODELS, TINY_VERSION, VERSION_FILE

    assert sorted(p.name for p in root.iterdir()) == sorted(TINY_MODELS)  # no partial build left behind
    for name in TINY_MODELS:
        assert (root / name / VERSION_FILE).read_text() == TINY_VERSION
    from transformers import CLIPModel

    CLIPModel.from_pretrained(root / "clip")  # a whole model, loadable
