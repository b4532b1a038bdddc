"""Work units without Ray: planning cuts, reading a unit alone, slices, commit and its record."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from operators.base import as_table
from schemas.region_text import SCHEMA_VERSION
from vesl.annotate.sources.config import InputConfig
from vesl.annotate.sources.manifest import iter_manifest_records
from vesl.annotate.sources.plan import plan_input
from vesl.annotate.units import Slice, build_units, scan_manifest, scan_sources, todo_units, unit_of, unit_tables

N = 23


def manifests(root: Path) -> dict[str, Path]:
    """The same 23 inputs as CSV (a record over two lines, a line of invalid UTF-8), JSONL (a blank
    line, a line that is not JSON) and Parquet (row groups of 4)."""
    root.mkdir(parents=True, exist_ok=True)
    lines = [b"id,image,alt_text\n"] + [b'%d,%d.jpg,"a dog, %d"\n' % (i, i, i) for i in range(N)]
    lines[5] = b'4,4.jpg,"two\nlines"\n'
    lines[9] = b'8,bad\xff.jpg,"x"\n'
    (root / "m.csv").write_bytes(b"".join(lines))
    jl = [json.dumps({"id": str(i), "image": f"{i}.jpg"}).encode() + b"\n" for i in range(N)]
    jl[3] += b"\n"
    jl[7] = b"{not json\n"
    (root / "m.jsonl").write_bytes(b"".join(jl))
    pq.write_table(pa.table({"id": [str(i) for i in range(N)], "image": [f"{i}.jpg" for i in range(N)]}),
                   root / "m.parquet", row_group_size=4)
    return {p.suffix: p for p in root.iterdir()}


def scans_of(meta: dict) -> pa.Table:
    return pa.table({"source": [0], "count": [meta["count"]], "marks_line": [meta["marks_line"]],
                     "marks_offset": [meta["marks_offset"]], "error": pa.array([meta["error"]], pa.string())})


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
@pytest.mark.parametrize("unit_rows", [1, 3, 7, 100])
def test_each_unit_read_alone_gives_exactly_its_share_of_the_whole_read(tmp_path, suffix, unit_rows):
    path = manifests(tmp_path)[suffix]
    config = InputConfig()
    plan = plan_input(str(path), config, None)
    meta, tables = scan_manifest(plan.sources[0], config, None, unit_rows)
    assert meta["count"] == N == sum(len(c) for c in iter_manifest_records(str(path), None))
    units = build_units(plan, scans_of(meta), unit_rows, None)
    assert units.num_rows == -(-N // unit_rows)
    assert units.column("count").to_pylist() == [min(unit_rows, N - s) for s in range(0, N, unit_rows)]
    alone = [pa.concat_tables(list(unit_tables(u, "manifest", config, None))) for u in units.to_pylist()]
    whole = pa.concat_tables(tables)
    assert pa.concat_tables(alone).equals(whole)  # same ids, ordinals, rejects and messages, in order
    assert [t.num_rows for t in alone] == units.column("count").to_pylist()
    rejects = [m for m in whole.column("reject_message").to_pylist() if m]
    assert len(rejects) == (0 if suffix == ".parquet" else 1)  # the broken line is a reject wherever it falls


def test_input_limit_cuts_the_last_unit(tmp_path):
    path = manifests(tmp_path)[".jsonl"]
    plan = plan_input(str(path), InputConfig(), None)
    meta, _ = scan_manifest(plan.sources[0], InputConfig(), None, 5)
    units = build_units(plan, scans_of(meta), 5, 12)
    assert units.column("count").to_pylist() == [5, 5, 2]
    assert units.column("hi").to_pylist()[-1] - units.column("lo").to_pylist()[-1] == 1
    assert sum(t.num_rows for t in unit_tables(units.to_pylist()[-1], "manifest", InputConfig(), None)) == 2


def test_an_unreadable_manifest_is_one_reject_replayed_not_reopened(tmp_path):
    path = tmp_path / "m.parquet"
    path.write_bytes(b"PAR1 this is no parquet file PAR1")
    plan = plan_input(str(path), InputConfig(), None)
    meta, tables = scan_manifest(plan.sources[0], InputConfig(), None, 10)
    assert meta["count"] == 1 and meta["error"]
    units = build_units(plan, scans_of(meta), 10, None)
    path.unlink()  # the unit does not open it again: the planned reject, with the planned message
    got = pa.concat_tables(list(unit_tables(units.to_pylist()[0], "manifest", InputConfig(), None)))
    assert got.equals(pa.concat_tables(tables))
    assert got.column("reject_reason").to_pylist() == ["unreadable_manifest"]


def test_a_folder_is_cut_into_runs_of_images_and_tars_are_one_unit_each(tmp_path):
    from tests.conftest import encode, photo

    (tmp_path / "imgs").mkdir()
    for i in range(7):
        (tmp_path / "imgs" / f"{i}.jpg").write_bytes(encode(photo(16, 16, seed=i)))
    plan = plan_input(str(tmp_path / "imgs"), InputConfig(), None)
    scans = scan_sources(pa.Table.from_pylist(plan.sources), "folder", InputConfig(), None, 3)
    meta = scans.filter(pa.compute.is_null(scans.column("image_id")))
    units = build_units(plan, meta, 3, None)
    assert units.column("count").to_pylist() == [3, 3, 1]
    assert [len(json.loads(s)) for s in units.column("sources").to_pylist()] == [3, 3, 1]
    assert unit_of(units, [0, 2, 3, 6, 7]).tolist() == [0, 0, 1, 2, -1]
    ids = [t.column("image_id").to_pylist() for u in units.to_pylist()
           for t in unit_tables(u, "folder", InputConfig(), None)]
    assert sum(len(i) for i in ids) == 7 and scans.filter(pa.compute.is_valid(scans.column("image_id"))).num_rows == 7


def test_slices_partition_the_units_and_know_what_overlaps():
    for n in (1, 2, 3, 7):
        spans = [Slice(i, n).bounds(10) for i in range(n)]
        assert spans[0][0] == 0 and spans[-1][1] == 10
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert Slice.parse("2/4") == Slice(2, 4) and Slice.parse(None).whole
    assert Slice(0, 2).overlaps(Slice(1, 4)) and not Slice(0, 2).overlaps(Slice(2, 4))
    assert Slice().overlaps(Slice(3, 4))
    for bad in ("4/4", "1/0", "x/2", "3"):
        with pytest.raises(ValueError):
            Slice.parse(bad)


def test_todo_skips_done_units_and_units_of_other_slices_and_carries_duplicates(tmp_path):
    from vesl.annotate.units import DUPLICATES_SCHEMA, UNITS_SCHEMA, Plan

    units = pa.Table.from_pylist([{"unit": u, "sources": "[]", "start": 0, "count": 2, "lo": 2 * u, "hi": 2 * u + 1}
                                  for u in range(6)], schema=UNITS_SCHEMA)
    dups = pa.Table.from_pylist([{"image_id": "a", "ordinal": 5, "kept": 0, "unit": 2}], schema=DUPLICATES_SCHEMA)
    plan = Plan({"inputs": 12}, units, dups)
    todo = todo_units(plan, {1, 4}, Slice(0, 2).bounds(6))
    assert todo.column("unit").to_pylist() == [0, 2]
    assert todo.column("dups").to_pylist() == [None, "[[5, 0]]"]


def finished(ids: list[str], unit: int, rejected: set[str] = frozenset()) -> pa.Table:
    n = len(ids)
    table = as_table(pa.table({
        "image_id": ids, "image_uri": [f"{i}.jpg" for i in ids], "width": pa.array([8] * n, pa.int32()),
        "height": pa.array([8] * n, pa.int32()), "alt_text": ["a dog"] * n, "caption": ["a dog"] * n,
        "image_bytes": pa.nulls(n, pa.large_binary()), "vlm_caption": ["a dog"] * n, "caption_source": ["vlm"] * n,
        "image_location": [f"{i}.jpg" for i in ids], "image_offset": pa.nulls(n, pa.int64()),
        "image_length": pa.nulls(n, pa.int64()), "phrases": [["a dog"]] * n,
        "regions": [[{"phrase": "a dog", "box": [0.1, 0.1, 0.5, 0.5], "score": 0.5, "source": "caption"}]] * n,
        "ordinal": pa.array(range(n), pa.int64()), "unit": pa.array([unit] * n, pa.int64())}))
    from operators.base import mark_rejects

    return mark_rejects(table, "decode", {k: ("not_found", "gone") for k, i in enumerate(ids) if i in rejected})


def test_a_unit_commits_whole_with_its_record_and_only_when_its_counts_add_up(tmp_path):
    from vesl.annotate.output.ledger import read_ledger
    from vesl.annotate.output.writer import UnitAccountingError, commit_unit, stage_unit_parts
    from vesl.core.outdir import OutputDir

    out = OutputDir(str(tmp_path / "out"))
    footer = {"vesl.schema_version": SCHEMA_VERSION}
    a = stage_unit_parts(finished(["a", "b", "c"], 0, {"b"}), out, footer).to_pylist()
    b = stage_unit_parts(pa.concat_tables([finished(["d"], 0), finished(["e", "f"], 1)]), out, footer)
    b = {r["unit"]: r for r in b.to_pylist()}
    assert a[0]["inputs"] == 3 and b[0]["inputs"] == 1 and b[1]["inputs"] == 2
    with pytest.raises(UnitAccountingError, match="3 rows \\+ 1 rejects != 5 planned"):
        commit_unit(out, 0, 5, a[0]["parts"] + b[0]["parts"], footer, "zstd")
    assert not (tmp_path / "out" / "data").exists()  # nothing committed
    record = commit_unit(out, 0, 4, a[0]["parts"] + b[0]["parts"], footer, "zstd", run_id="r1")
    assert (record["inputs"], record["rows"], record["rejects"], record["regions"]) == (4, 3, 1, 3)
    assert record["by_reason"] == {"decode/not_found": 1}
    assert pq.read_table(tmp_path / "out" / "data" / "part-000000000.parquet").column("image_id").to_pylist() == [
        "a", "c", "d"]
    assert not (tmp_path / "out" / "_vesl" / "staging" / "000000000").exists()
    assert json.loads((tmp_path / "out" / "_vesl" / "units" / "000000000.json").read_text()) == record
    commit_unit(out, 1, 2, b[1]["parts"], footer, "zstd")
    assert read_ledger(out, (0, 2))[0].done == {0, 1}
    shard = tmp_path / "out" / "data" / "part-000000001.parquet"
    shard.write_bytes(shard.read_bytes()[:-10])  # truncated after it committed
    ledger, redo = read_ledger(out, (0, 1))
    assert ledger.done == {0, 1} and redo == []  # not this run's unit: left alone
    ledger, redo = read_ledger(out, (0, 2))
    assert ledger.done == {0} and redo[0]["unit"] == 1
    assert not (tmp_path / "out" / "_vesl" / "units" / "000000001.json").exists()


@pytest.mark.slow
def test_a_limited_plan_scans_the_first_files_only_and_keeps_the_first_n_inputs(tmp_path, ray_local):
    from vesl.annotate.units import LIMIT_WAVE_SOURCES, make_plan

    (tmp_path / "in").mkdir()
    for f in range(3 * LIMIT_WAVE_SOURCES):
        (tmp_path / "in" / f"{f:03d}.jsonl").write_text(
            "".join(json.dumps({"id": f"{f}-{k}", "image": f"{f}-{k}.jpg"}) + "\n" for k in range(3)))
    config = InputConfig(limit=3 * LIMIT_WAVE_SOURCES + 1, unit_rows=2)  # one into the 17th file: its unit cut
    plan = make_plan(str(tmp_path / "in"), plan_input(str(tmp_path / "in"), config, None), config, None)
    assert plan.meta["sources"] == 3 * LIMIT_WAVE_SOURCES and plan.meta["sources_scanned"] == 2 * LIMIT_WAVE_SOURCES
    assert plan.inputs == config.limit  # the first N, in input order
    last = plan.units.to_pylist()[-1]
    assert json.loads(last["sources"])[0]["index"] == LIMIT_WAVE_SOURCES and last["count"] == 1
    whole = make_plan(str(tmp_path / "in"), plan_input(str(tmp_path / "in"), InputConfig(), None), InputConfig(), None)
    assert whole.inputs == 9 * LIMIT_WAVE_SOURCES and whole.meta["sources_scanned"] == 3 * LIMIT_WAVE_SOURCES
