"""Several jobs, one dataset: slices of one input into one OUTPUT give what one whole run gives (the run
machinery, with the model-free stage chain: tests/pipelines/model_free.py)."""

from __future__ import annotations

import json

import pytest

from tests.pipelines.helpers import read_output
from tests.pipelines.test_failures import many_images
from vesl.annotate.config import load_config
from vesl.annotate.job import main, run_annotate

pytestmark = pytest.mark.slow


def test_two_slices_into_one_output_give_the_rows_of_one_whole_run(tmp_path, model_free, ray_local, capfd):
    manifest = many_images(tmp_path / "in", 24)
    with open(manifest, "a") as f:  # img002 again, in the second half: a duplicate across the slices
        f.write(json.dumps({"id": "img002", "image": "images/002.jpg", "alt_text": "again"}) + "\n")
    overrides = ["input.unit_rows=5"]
    whole = run_annotate(str(manifest), str(tmp_path / "whole"), load_config(overrides=overrides))
    assert whole["counts"]["units"] == {"total": 5, "done": 5, "unbalanced": []}

    args = [str(manifest), str(tmp_path / "sliced"), "--set", "input.unit_rows=5"]
    assert main(args + ["--slice", "1/2"]) == 0  # either order: the second half first
    half = json.loads((tmp_path / "sliced" / "manifest.json").read_text())
    assert half["slice"] == "1/2" and half["this_run"]["units_range"] == [2, 5]
    assert not half["counts"]["complete"] and half["counts"]["units"]["done"] == 3 and half["counts"]["accounted"]
    assert "slice 1/2: 3 unit(s) committed now; dataset: 3/5 units done" in capfd.readouterr().out
    from vesl.shards.inspect import collect_stats, format_summary

    assert "3 of 5 work units done" in format_summary(collect_stats(str(tmp_path / "sliced")))
    assert main(args + ["--slice", "0/2"]) == 0
    sliced = json.loads((tmp_path / "sliced" / "manifest.json").read_text())
    assert sliced["counts"]["complete"] and sliced["this_run"]["units_range"] == [0, 2]

    rows_w, rejects_w, _ = read_output(tmp_path / "whole")
    rows_s, rejects_s, _ = read_output(tmp_path / "sliced")
    def frame(rows):
        return rows.sort_values("image_id").reset_index(drop=True).to_json()

    assert len(rows_s) == 24 and frame(rows_s) == frame(rows_w)
    assert rejects_s[["image_id", "reason", "ordinal"]].values.tolist() == \
        rejects_w[["image_id", "reason", "ordinal"]].values.tolist() == [["img002", "duplicate", 24]]
    for k in ("inputs", "rows", "rejects", "regions", "by_reason", "funnel", "accounted", "duplicate_ids"):
        assert sliced["counts"][k] == whole["counts"][k], k
