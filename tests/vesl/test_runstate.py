import json

import numpy as np
import pyarrow as pa
import pytest

from operators.base import as_table
from operators.registry import funnel_steps
from schemas.columns import REJECT_REASON
from vesl.runstate import RUN_STATE, OutputConflictError, funnel, is_in, plan_batch, prepare_output


def batch(ids, ordinals):
    return as_table(pa.table({"image_id": ids, "ordinal": pa.array(ordinals, pa.int64())}))


def test_first_occurrence_of_an_id_is_kept_the_others_rejected():
    out = plan_batch(batch(["a", "b", "a", "a"], [0, 1, 2, 3]), {"a": 0}, np.array([], dtype=object),
                     np.array([], dtype=np.int64))
    assert out.column(REJECT_REASON).to_pylist() == [None, None, "duplicate", "duplicate"]
    assert "ordinal 0" in out.column("reject_message")[2].as_py()


def test_resume_skips_finished_rows_but_not_unfinished_duplicates():
    done_ids = np.array(sorted(["a", "c"]), dtype=object)   # a and c have output rows
    done_ordinals = np.array([4], dtype=np.int64)           # ordinal 4 is in a rejects file
    out = plan_batch(batch(["a", "b", "a", "c", "d"], [0, 1, 2, 3, 4]), {"a": 0}, done_ids, done_ordinals)
    # a@0 and c@3 have rows, d@4 was rejected; a@2 is a duplicate whose reject was never written
    assert out.column("image_id").to_pylist() == ["b", "a"]
    assert out.column(REJECT_REASON).to_pylist() == [None, "duplicate"]


def test_membership_does_not_truncate_long_ids():
    done = np.array(sorted(["abc"]), dtype=object)
    assert is_in(["abcdef", "abc", "ab"], done).tolist() == [False, True, False]


def test_output_policy(tmp_path):
    out = str(tmp_path / "out")
    assert prepare_output(out, "in.jsonl", "h1", "resume", None) == "fresh"
    state = json.loads((tmp_path / "out" / RUN_STATE).read_text())
    assert state["input"] == "in.jsonl" and state["config_hash"] == "h1"
    (tmp_path / "out" / "_tmp").mkdir(exist_ok=True)  # staging (the run state itself was staged there)
    (tmp_path / "out" / "_tmp" / "half-written.parquet").write_bytes(b"PAR1 garbage")
    assert prepare_output(out, "in.jsonl", "h1", "resume", None) == "resume"
    assert not (tmp_path / "out" / "_tmp").exists()  # staging of a killed run is never read
    with pytest.raises(OutputConflictError, match="config hash h1"):
        prepare_output(out, "in.jsonl", "h2", "resume", None)
    with pytest.raises(OutputConflictError, match="on_existing=error"):
        prepare_output(out, "in.jsonl", "h1", "error", None)
    assert prepare_output(out, "other.jsonl", "h2", "overwrite", None) == "fresh"
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x.txt").write_text("not ours")
    with pytest.raises(OutputConflictError, match="holds no vesl run"):
        prepare_output(str(tmp_path / "foreign"), "in.jsonl", "h1", "resume", None)


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
def test_find_duplicates_resolves_hash_collisions(ray_local):
    """Repeated ids are found from 64-bit hashes; rows whose hashes collide are told apart by id."""
    import ray.data

    from vesl import runstate

    rows = [{"image_id": i, "ordinal": o} for i, o in
            [("a", 5), ("b", 1), ("a", 2), ("c", 3), ("a", 9), ("b", 0), ("d", 4)]]
    ds = ray.data.from_items(rows, override_num_blocks=3)
    assert runstate.find_duplicates(ds) == (7, {"a": 2, "b": 0})
    assert runstate.find_duplicates(ray.data.from_items(rows[3:4] + rows[6:])) == (2, {})
    # every id hashes alike: all rows come back for the exact check, and the answer is the same
    def collide(ids):
        return np.zeros(len(ids), np.int64)

    assert runstate.find_duplicates(ray.data.from_items(rows, override_num_blocks=3), hasher=collide) == (
        7, {"a": 2, "b": 0})
    unique = [r for r in rows if r["image_id"] in ("c", "d")]
    assert runstate.find_duplicates(ray.data.from_items(unique), hasher=collide) == (2, {})
