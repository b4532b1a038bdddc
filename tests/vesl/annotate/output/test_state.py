import json

import pyarrow as pa
import pytest

from operators.registry import funnel, funnel_steps
from vesl.annotate.output.state import prepare_output
from vesl.annotate.units import Slice
from vesl.core.outdir import RUN_STATE, OutputDir
from vesl.errors import OutputConflictError


def test_output_policy(tmp_path):
    out = OutputDir(str(tmp_path / "out"))
    assert prepare_output(out, "in.jsonl", "h1", "resume") == "fresh"
    state = json.loads((tmp_path / "out" / RUN_STATE).read_text())
    assert state["input"] == "in.jsonl" and state["config_hash"] == "h1" and state["layout"] == 2
    assert prepare_output(out, "in.jsonl", "h1", "resume") == "resume"
    assert prepare_output(out, "in.jsonl", "h1", "resume", Slice(1, 3)) == "resume"
    with pytest.raises(OutputConflictError, match="refused with a slice"):
        prepare_output(out, "in.jsonl", "h1", "overwrite", Slice(1, 3))
    with pytest.raises(OutputConflictError, match="config hash h1"):
        prepare_output(out, "in.jsonl", "h2", "resume")
    with pytest.raises(OutputConflictError, match="on_existing=error"):
        prepare_output(out, "in.jsonl", "h1", "error")
    assert prepare_output(out, "other.jsonl", "h2", "overwrite") == "fresh"
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x.txt").write_text("not ours")
    with pytest.raises(OutputConflictError, match="holds no vesl run"):
        prepare_output(OutputDir(str(tmp_path / "foreign")), "in.jsonl", "h1", "resume")
    (tmp_path / "old").mkdir()  # an OUTPUT of another layout (its state file has no layout 2): refused
    (tmp_path / "old" / RUN_STATE).write_text(json.dumps({"input": "in.jsonl", "config_hash": "h1"}))
    with pytest.raises(OutputConflictError, match="layout None, which this vesl"):
        prepare_output(OutputDir(str(tmp_path / "old")), "in.jsonl", "h1", "resume")


def test_funnel_accounts_per_stage():
    stages = funnel(10, {"read": 1, "decode": 3, "detect": 1}, funnel_steps())
    assert [(s["stage"], s["entered"], s["rejected"], s["passed"]) for s in stages] == [
        ("read", 10, 1, 9), ("decode", 9, 3, 6), ("caption", 6, 0, 6), ("fuse", 6, 0, 6), ("phrases", 6, 0, 6),
        ("detect", 6, 1, 5)]


def test_funnel_keeps_a_stage_it_does_not_know_last():
    """An OUTPUT written with another stage list still adds up: unknown stages' rejects come last."""
    stages = funnel(4, {"read": 1, "retired": 2}, ["read", "decode"])
    assert [(s["stage"], s["passed"]) for s in stages] == [("read", 3), ("decode", 3), ("retired", 1)]


@pytest.mark.slow
def test_duplicates_are_found_by_a_distributed_group_by(ray_local):
    """The first occurrence by ordinal is kept; only repeated ids (and their occurrences) reach the driver."""
    import ray.data

    from vesl.annotate.units import UNITS_SCHEMA, find_duplicates

    rows = [{"image_id": i, "ordinal": o} for i, o in
            [("a", 5), ("b", 1), ("a", 2), ("c", 3), ("a", 9), ("b", 0), ("d", 4)]]
    units = pa.Table.from_pylist([{"unit": 0, "sources": "[]", "start": 0, "count": 5, "lo": 0, "hi": 4},
                                  {"unit": 1, "sources": "[]", "start": 5, "count": 5, "lo": 5, "hi": 9}],
                                 schema=UNITS_SCHEMA)
    found = find_duplicates(ray.data.from_items(rows, override_num_blocks=3), units).to_pylist()
    assert found == [{"image_id": "b", "ordinal": 1, "kept": 0, "unit": 0},
                     {"image_id": "a", "ordinal": 5, "kept": 2, "unit": 1},
                     {"image_id": "a", "ordinal": 9, "kept": 2, "unit": 1}]
    assert find_duplicates(ray.data.from_items(rows[3:4] + rows[6:]), units).num_rows == 0
