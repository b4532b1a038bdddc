"""The plan and the completion records are checked, and damage is named: a missing, truncated or foreign
plan file, a record that is no record, a record copied under another unit's name, a record of another
plan's unit."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vesl.annotate.output.ledger import read_ledger
from vesl.annotate.units import DUPLICATES_SCHEMA, UNITS_SCHEMA, Plan, load_plan, save_plan
from vesl.core.outdir import PLAN_DIR, OutputDir, record_file
from vesl.errors import CorruptStateError


def small_plan(unit_rows: int = 2, inputs: int = 6) -> Plan:
    source = json.dumps([{"uri": "/in/m.jsonl", "index": 0}])
    units = [{"unit": u, "sources": source, "start": s, "count": min(unit_rows, inputs - s), "line": s + 1,
              "offset": 10 * s, "error": None, "lo": s, "hi": min(s + unit_rows, inputs) - 1}
             for u, s in enumerate(range(0, inputs, unit_rows))]
    meta = {"plan_version": 2, "input": "/in/m.jsonl", "kind": "manifest", "inputs": inputs, "units": len(units),
            "unit_rows": unit_rows, "limit": None, "created_at": "2026-12-06T10:00:00+00:00"}
    files = pa.table({"uri": ["/in/m.jsonl"], "size": [60], "mtime": [1.5], "etag": pa.nulls(1, pa.string())})
    return Plan(meta, pa.Table.from_pylist(units, schema=UNITS_SCHEMA), DUPLICATES_SCHEMA.empty_table(), files)


def commit_records(out: OutputDir, plan: Plan) -> None:
    """A completion record per unit of PLAN, as commit_unit writes them (no files: every input rejected)."""
    for unit, key in enumerate(plan.unit_keys()):
        n = plan.units.column("count")[unit].as_py()
        out.write_json({"unit": unit, "inputs": n, "rows": 0, "rejects": n, "regions": 0, "phrases": 0,
                        "by_reason": {"decode/not_found": n}, "files": [], "sizes": {}, "unit_key": key},
                       record_file(unit))


def test_a_saved_plan_loads_back_whole(tmp_path):
    out = OutputDir(str(tmp_path))
    plan = small_plan()
    save_plan(out, plan)
    loaded = load_plan(out)
    assert loaded.meta == plan.meta and loaded.units.equals(plan.units) and loaded.files.equals(plan.files)
    assert loaded.unit_keys() == plan.unit_keys() and len(set(plan.unit_keys())) == 3
    assert small_plan(unit_rows=3).unit_keys()[0] != plan.unit_keys()[0]  # other units: other keys


@pytest.mark.parametrize("damage, says", [
    (lambda d: (d / "plan.json").write_text((d / "plan.json").read_text()[:40]), "plan.json is not JSON"),
    (lambda d: (d / "plan.json").write_text("[]"), "plan.json is a JSON list, not an object"),
    (lambda d: (d / "plan.json").write_text('{"hello": 1}'), "plan.json is not a vesl plan (no valid plan_version"),
    (lambda d: (d / "units.parquet").write_bytes(b"garbage"),
     "units.parquet (the plan's units) is not a readable Parquet file"),
    (lambda d: (d / "units.parquet").unlink(), "units.parquet (the plan's units) is missing"),
    (lambda d: pq.write_table(pa.table({"image_id": ["a"]}), d / "units.parquet"),
     "units.parquet (the plan's units) is not a vesl plan file (no column unit"),
    (lambda d: pq.write_table(small_plan(inputs=4).units, d / "units.parquet"),
     "units.parquet holds 2 units, plan.json says 3 units of 6 inputs"),
    (lambda d: (d / "files.parquet").write_bytes(b"PAR1xxxxPAR1"),
     "files.parquet (the plan's input fingerprints) is not a readable Parquet file"),
])
def test_a_damaged_plan_is_named_with_what_to_do(tmp_path, damage, says):
    out = OutputDir(str(tmp_path))
    save_plan(out, small_plan())
    damage(tmp_path / PLAN_DIR)
    with pytest.raises(CorruptStateError) as e:
        load_plan(out)
    assert says in str(e.value) and str(tmp_path / PLAN_DIR) in str(e.value)
    assert "delete OUTPUT's _vesl/plan/ folder and re-run" in str(e.value)


def test_records_are_checked_against_the_plan_and_named(tmp_path):
    out = OutputDir(str(tmp_path))
    plan = small_plan()
    commit_records(out, plan)
    ledger, redo = read_ledger(out, (0, 3), plan)
    assert ledger.done == {0, 1, 2} and redo == []
    units = tmp_path / "_vesl" / "units"
    good = (units / "000000001.json").read_text()
    cases = {
        "{}": "000000001.json is not a completion record (no valid unit, inputs, rows, rejects",
        "[1]": "000000001.json: a completion record must be a JSON object, not a list",
        good.replace('"unit": 1', '"unit": 2'): "000000001.json is named for unit 1 but records unit 2",
        good.replace('"unit_key": "', '"unit_key": "x'): "000000001.json was committed for another plan's unit 1",
        good.replace('"inputs": 2', '"inputs": 5'):
            "000000001.json records 5 inputs for unit 1, which the plan gives 2",
    }
    for text, says in cases.items():
        (units / "000000001.json").write_text(text)
        with pytest.raises(CorruptStateError) as e:
            read_ledger(out, (0, 3), plan)
        assert says in str(e.value) and str(units) in str(e.value), str(e.value)
        assert "Delete it and re-run" in str(e.value)
    (units / "000000001.json").write_text(good)
    (units / "000000007.json").write_text(good)  # a copy under another unit's number
    with pytest.raises(CorruptStateError, match="000000007.json is named for unit 7 but records unit 1"):
        read_ledger(out, (0, 3), plan)
    (units / "000000007.json").write_text(good.replace('"unit": 1', '"unit": 7'))
    with pytest.raises(CorruptStateError, match="000000007.json records unit 7, which the plan \\(3 units\\)"):
        read_ledger(out, (0, 3), plan)
    (units / "000000007.json").unlink()
    assert read_ledger(out, (0, 3), plan)[0].done == {0, 1, 2}


def test_a_plan_made_again_stands_only_when_the_records_match_it(tmp_path):
    """plan.json missing: the plan is made again; records of other units refuse it before anything changes."""
    out = OutputDir(str(tmp_path))
    commit_records(out, small_plan(unit_rows=2))
    assert read_ledger(out, (0, 3), small_plan(unit_rows=2), replanned=True)[0].done == {0, 1, 2}
    with pytest.raises(CorruptStateError) as e:
        read_ledger(out, (0, 2), small_plan(unit_rows=4), replanned=True)
    message = str(e.value)
    assert message.startswith("OUTPUT's plan.json is missing, and the plan made again (2 units of "
                              "input.unit_rows=4) does not match 3 of its 3 completion records")
    assert "--overwrite" in message and len(list((tmp_path / "_vesl" / "units").iterdir())) == 3  # nothing removed
