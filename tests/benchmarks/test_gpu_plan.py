"""The arithmetic gpu_check.py derives its recommendations with: the batch it chooses and the node plan."""

from __future__ import annotations

import pytest

from benchmarks.gpu_check import GIB, choose_batch, node_plan, plans


def test_the_chosen_batch_is_the_smallest_near_the_best_that_fits_in_memory():
    points = {1: {"img_s": 10.0, "peak_gib": 5.0}, 8: {"img_s": 70.0, "peak_gib": 9.0},
              32: {"img_s": 96.0, "peak_gib": 20.0}, 64: {"img_s": 100.0, "peak_gib": 70.0}, 128: {"oom": True}}
    assert choose_batch(points, 80 * GIB) == 32  # 96 is within 5% of 100; 64 fits (70 <= 0.8 * 80) but is larger
    assert choose_batch(points, 60 * GIB) == 32  # 64 does not fit under 80% of 60 GiB: best that fits is 96
    assert choose_batch(points, 20 * GIB) == 8  # only 1 and 8 fit under 16 GiB
    assert choose_batch(points, None) == 32  # the CPU: rates alone
    assert choose_batch({4: {"oom": True}}, 80 * GIB) is None


def test_the_node_plan_balances_the_stages_and_costs_gpu_hours():
    rates = {"caption": 10.0, "fuse": 20.0, "detect": 40.0}
    plan = node_plan(rates, ("caption", "fuse", "detect"))
    per_image = 1 / 10 + 1 / 20 + 1 / 40
    assert plan["gpu_s_per_image"] == pytest.approx(per_image)
    assert plan["gpu_hours_per_million"] == pytest.approx(1e6 * per_image / 3600)  # 48.6 GPU-hours
    assert plan["fractional_img_s"] == pytest.approx(8 / per_image)
    assert plan["fractional"] == pytest.approx({"caption": 8 * 0.1 / per_image, "fuse": 8 * 0.05 / per_image,
                                                "detect": 8 * 0.025 / per_image})
    # whole GPUs: 4 + 2 + 2 gives min(40, 40, 80) = 40 img/s; no other split of 8 does better
    assert plan["whole_gpus"] == {"caption": 4, "fuse": 2, "detect": 2} and plan["whole_img_s"] == 40.0
    assert plan["whole_img_s"] <= plan["fractional_img_s"]


def test_plans_cover_the_presets_whose_stages_were_measured():
    def stage(rate):
        return {"chosen_batch": 8, "sweep": {"8": {"img_s": rate}}}  # as read back from the JSON (string keys)

    found = plans({"stages": {"detect": stage(40.0), "caption_fast": stage(20.0)}})
    assert set(found) == {"fast", "alt-ngram"}  # paper needs caption and fuse rates
    assert found["alt-ngram"]["whole_gpus"] == {"detect": 8} and found["alt-ngram"]["whole_img_s"] == 320.0
