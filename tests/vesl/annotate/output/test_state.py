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


def test_an_output_that_is_or_holds_the_input_is_refused_however_spelled(tmp_path, monkeypatch):
    from vesl.annotate.output.state import check_apart

    (tmp_path / "in" / "images").mkdir(parents=True)
    (tmp_path / "in" / "m.jsonl").write_text("{}\n")
    (tmp_path / "alias").symlink_to(tmp_path / "in")
    monkeypatch.chdir(tmp_path)
    refused = {("in", "in"): "is the input", ("in/", "./in"): "is the input", ("in", "alias"): "is the input",
               ("in/m.jsonl", "."): "contains the input", ("alias/images", str(tmp_path / "in")): "contains the input",
               (str(tmp_path / "in" / "m.jsonl"), "in"): "contains the input"}
    for (input_uri, output), says in refused.items():
        with pytest.raises(OutputConflictError, match=f"OUTPUT .* {says} {input_uri}"):
            check_apart(OutputDir(output), input_uri)
    for input_uri, output in (("in", "in/out"), ("in", "input-out"), ("in/m.jsonl", "in/out"), ("in", "in2")):
        check_apart(OutputDir(output), input_uri)  # beside, or inside a folder input: fine


def test_overwrite_deletes_only_what_a_run_wrote(tmp_path):
    out = OutputDir(str(tmp_path / "out"))
    assert prepare_output(out, "in.jsonl", "h1", "resume") == "fresh"
    for folder in ("data", "rejects", "_vesl/units", "_vesl/plan"):
        (tmp_path / "out" / folder).mkdir(parents=True, exist_ok=True)
        (tmp_path / "out" / folder / "x.parquet").write_bytes(b"x")
    (tmp_path / "out" / "manifest.json").write_text("{}")
    (tmp_path / "out" / ".manifest.json.0123abcd").write_text("{")  # an interrupted write of the manifest
    (tmp_path / "out" / "notes.txt").write_text("the user's own")
    (tmp_path / "out" / "images").mkdir()
    (tmp_path / "out" / "images" / "a.jpg").write_bytes(b"jpg")
    assert prepare_output(out, "in.jsonl", "h1", "overwrite") == "fresh"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["_vesl_run.json", "images", "notes.txt"]
    assert (tmp_path / "out" / "images" / "a.jpg").read_bytes() == b"jpg"
    (tmp_path / "folder").mkdir()  # no vesl run in it: --overwrite deletes nothing at all
    (tmp_path / "folder" / "data").mkdir()
    (tmp_path / "folder" / "data" / "mine.csv").write_text("1,2")
    with pytest.raises(OutputConflictError, match="holds no vesl run .* --overwrite deletes only what a vesl run"):
        prepare_output(OutputDir(str(tmp_path / "folder")), "in.jsonl", "h1", "overwrite")
    assert (tmp_path / "folder" / "data" / "mine.csv").read_text() == "1,2"


def test_an_input_is_one_input_however_it_is_spelled(tmp_path, monkeypatch):
    from vesl.core.storage import canonical_uri

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "m.jsonl").write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    out = OutputDir(str(tmp_path / "out"))
    prepare_output(out, canonical_uri("./in/m.jsonl"), "h1", "resume")
    assert prepare_output(out, canonical_uri(str(tmp_path / "in" / "m.jsonl")), "h1", "resume") == "resume"
    assert prepare_output(out, "in//m.jsonl", "h1", "resume") == "resume"
    (tmp_path / "other" / "in").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "other")  # the same string, another file
    with pytest.raises(OutputConflictError, match="Resuming would mix labels"):
        prepare_output(out, "./in/m.jsonl", "h1", "resume")


def test_leftover_temporary_files_are_removed_and_live_ones_kept(tmp_path):
    import os
    import time

    from vesl.annotate.output.state import remove_leftovers

    out = OutputDir(str(tmp_path / "out"))
    leftovers = {"data/.part-000000001.parquet.0a1b2c3d": True,  # a unit of this run: whatever its age
                 "rejects/.part-000000002.parquet.deadbeef": True,
                 "_vesl/units/.000000001.json.12345678": True,
                 "data/.part-000000007.parquet.0a1b2c3d": False,  # another slice's unit, maybe in flight now
                 ".manifest.json.aaaaaaaa": False,  # fresh: maybe a write in flight (another slice's manifest)
                 "_vesl/plan/.units.parquet.bbbbbbbb": True,  # old: a dead write
                 "data/part-000000001.parquet": False}  # not a temporary file
    for rel in leftovers:
        (tmp_path / "out" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "out" / rel).write_bytes(b"x")
    old = time.time() - 600
    os.utime(tmp_path / "out" / "_vesl/plan/.units.parquet.bbbbbbbb", (old, old))
    removed = remove_leftovers(out, (0, 5), stale_s=120)
    assert sorted(removed) == sorted(str(tmp_path / "out" / r) for r, gone in leftovers.items() if gone)
    for rel, gone in leftovers.items():
        assert (tmp_path / "out" / rel).exists() != gone, rel
