"""write: region-text shards (schema v1) and rejects, as Parquet, one shard per work unit.

Layout of OUTPUT:
    data/part-<unit>.parquet      region-text shards, one row per image (a unit's rows)
    rejects/part-<unit>.parquet   one row per rejected input (a unit's rejects)
    _vesl/units/<unit>.json       the unit's completion record: inputs, rows, rejects by reason, files
    manifest.json                 the run manifest, written last by every run
A unit's batches are first written as parts under OUTPUT/_vesl/staging/<unit>/ (`stage_unit_parts`,
the last Ray Data step); once all its inputs are staged, `commit_unit` checks rows + rejects ==
inputs, writes the unit's shard and rejects file (each staged and moved into place whole), then its
record. A unit without a record is not done: a resume redoes it whole.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Mapping
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas.columns import REJECT_MESSAGE, REJECT_REASON, REJECT_STAGE
from schemas.region_text import REJECT_SCHEMA, region_text_schema
from vesl.core.storage import filesystem, join_uri

DATA_DIR, REJECTS_DIR, MANIFEST = "data", "rejects", "manifest.json"


class MissingColumnError(ValueError):
    """A finished batch lacks a column the shard or reject schema needs: a stage (or the reader) did not
    write what the contract says it writes."""


REJECT_SOURCES = {"image_id": "image_id", "image_uri": "image_uri", "stage": REJECT_STAGE, "reason": REJECT_REASON,
                  "message": REJECT_MESSAGE, "ordinal": "ordinal"}


def split_rows_and_rejects(table: pa.Table, schema: pa.Schema) -> tuple[pa.Table, pa.Table]:
    """(rows cast to SCHEMA, rejects in REJECT_SCHEMA) of a finished batch. A column either needs is
    an error, never a column of nulls."""
    missing = [f.name for f in schema if f.name not in table.column_names]
    missing += [src for src in REJECT_SOURCES.values() if src not in table.column_names and src not in missing]
    if missing:
        raise MissingColumnError(f"a finished batch lacks the column(s) {missing}; it has {table.column_names}")
    rejected = pc.is_valid(table.column(REJECT_STAGE))
    ok = table.filter(pc.invert(rejected))
    bad = table.filter(rejected)
    rows = pa.Table.from_arrays([ok.column(f.name).cast(f.type) for f in schema], schema=schema)
    rejects = pa.Table.from_arrays([bad.column(REJECT_SOURCES[f.name]).cast(f.type) for f in REJECT_SCHEMA],
                                   schema=REJECT_SCHEMA)
    return rows, rejects


def summarize(table: pa.Table) -> dict[str, Any]:
    """Counts of a finished batch for the run manifest."""
    stages = table.column(REJECT_STAGE).to_pylist()
    reasons = table.column(REJECT_REASON).to_pylist()
    by_reason = Counter(f"{s}/{r}" for s, r in zip(stages, reasons) if s is not None)
    ok = [s is None for s in stages]
    regions = table.column("regions").to_pylist() if "regions" in table.column_names else [None] * len(ok)
    phrases = table.column("phrases").to_pylist() if "phrases" in table.column_names else [None] * len(ok)
    return {
        "inputs": table.num_rows,
        "rows": sum(ok),
        "rejects": table.num_rows - sum(ok),
        "regions": sum(len(r or []) for r, good in zip(regions, ok) if good),
        "phrases": sum(len(p or []) for p, good in zip(phrases, ok) if good),
        "by_reason": dict(by_reason),
    }


def stage_totals(by_reason: Mapping[str, int]) -> dict[str, int]:
    """{'decode/not_found': 2, 'decode/empty_file': 1} -> {'decode': 3}."""
    by_stage: Counter = Counter()
    for key, n in by_reason.items():
        by_stage[key.split("/", 1)[0]] += n
    return dict(sorted(by_stage.items()))


def unit_file(unit: int) -> str:
    return f"part-{unit:09d}.parquet"


def stage_unit_parts(table: pa.Table, output: str, footer: Mapping[str, str],
                     storage_options: Mapping[str, Any] | None) -> pa.Table:
    """Ray Data UDF, the last step of the chain: a finished batch in; per unit, its rows and rejects
    written as parts under OUTPUT/_vesl/staging/<unit>/; out, one small row per unit: (unit, inputs,
    the parts). Only parts a finished task reports are ever committed (a failed attempt's are not)."""
    import numpy as np

    from vesl.units import STAGING_DIR, UNIT

    schema = region_text_schema(dict(footer))
    fs, root = filesystem(output, storage_options)
    units = table.column(UNIT).to_numpy()
    out: dict[str, list] = {"unit": [], "inputs": [], "parts": []}
    for unit in np.unique(units):
        rows, rejects = split_rows_and_rejects(table.filter(pa.array(units == unit)), schema)
        folder = f"{root.rstrip('/')}/{STAGING_DIR}/{int(unit):09d}"
        fs.makedirs(folder, exist_ok=True)
        name, parts = uuid.uuid4().hex, []
        for kind, part in (("rows", rows), ("rejects", rejects)):
            if part.num_rows:
                path = f"{folder}/{name}-{kind}.parquet"
                with fs.open(path, "wb") as f:
                    pq.write_table(part, f, compression="none")
                parts.append(path)
        out["unit"].append(int(unit))
        out["inputs"].append(rows.num_rows + rejects.num_rows)
        out["parts"].append(parts)
    return pa.table({"unit": pa.array(out["unit"], pa.int64()), "inputs": pa.array(out["inputs"], pa.int64()),
                     "parts": pa.array(out["parts"], pa.list_(pa.string()))})


class UnitAccountingError(RuntimeError):
    """A unit's staged rows + rejects are not its planned inputs: it is not committed."""


def _read_parts(fs, paths: list[str], schema: pa.Schema) -> pa.Table:
    tables = []
    for path in paths:
        with fs.open(path, "rb") as f:
            tables.append(pq.read_table(f))
    return pa.concat_tables(tables).cast(schema) if tables else schema.empty_table()


def _commit_file(fs, root: str, table: pa.Table, subdir: str, name: str, compression: str, lease_token) -> int | None:
    """TABLE as ROOT/SUBDIR/NAME, staged and moved into place; no rows: any earlier file there (of a
    killed attempt) is removed. Returns the size of the file there now (None: none)."""
    from vesl.lease import check_token

    final = f"{root}/{subdir}/{name}"
    if not table.num_rows:
        if fs.exists(final):
            check_token(lease_token)
            fs.rm(final)
        return None
    tmp = f"{root}/{subdir}/.{name}.{uuid.uuid4().hex[:8]}"
    fs.makedirs(f"{root}/{subdir}", exist_ok=True)
    with fs.open(tmp, "wb") as f:
        pq.write_table(table, f, compression=compression)
    size = fs.size(tmp)
    check_token(lease_token)
    fs.mv(tmp, final)
    return size


def commit_unit(output: str, unit: int, inputs: int, parts: list[str], footer: Mapping[str, str],
                storage_options: Mapping[str, Any] | None, compression: str, lease_token=None,
                run_id: str = "") -> dict[str, Any]:
    """Commit one unit whose INPUTS are all staged in PARTS: check rows + rejects == INPUTS and one row
    per image_id, write its shard and rejects file, then its completion record; remove its staging.
    Returns the record. Raises UnitAccountingError (nothing committed) when the counts disagree."""
    import datetime as dt

    from vesl.units import STAGING_DIR, UNITS_DIR

    fs, root = filesystem(output, storage_options)
    root = root.rstrip("/")
    schema = region_text_schema(dict(footer))
    rows = _read_parts(fs, [p for p in parts if p.endswith("-rows.parquet")], schema)
    rejects = _read_parts(fs, [p for p in parts if p.endswith("-rejects.parquet")], REJECT_SCHEMA)
    if rows.num_rows + rejects.num_rows != inputs:
        raise UnitAccountingError(f"unit {unit}: {rows.num_rows} rows + {rejects.num_rows} rejects != {inputs} "
                                  "planned inputs; not committed")
    if rows.num_rows and pc.count_distinct(rows.column("image_id")).as_py() != rows.num_rows:
        raise UnitAccountingError(f"unit {unit}: an image_id appears in two rows; not committed")
    name = unit_file(unit)
    sizes = {f"{sub}/{name}": _commit_file(fs, root, table, sub, name, compression, lease_token)
             for sub, table in ((DATA_DIR, rows), (REJECTS_DIR, rejects))}
    sizes = {k: v for k, v in sizes.items() if v is not None}
    files = [join_uri(output, *key.split("/")) for key in sizes]
    by_reason = Counter(f"{s}/{r}" for s, r in zip(rejects.column("stage").to_pylist(),
                                                   rejects.column("reason").to_pylist()))
    record = {"unit": unit, "inputs": inputs, "rows": rows.num_rows, "rejects": rejects.num_rows,
              "regions": int(pc.sum(pc.list_value_length(rows.column("regions"))).as_py() or 0),
              "phrases": int(pc.sum(pc.list_value_length(rows.column("phrases"))).as_py() or 0),
              "by_reason": dict(sorted(by_reason.items())), "files": files, "sizes": sizes, "run_id": run_id,
              "committed_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    write_json_atomic(fs, f"{root}/{UNITS_DIR}/{unit:09d}.json", record, lease_token)
    try:
        fs.rm(f"{root}/{STAGING_DIR}/{unit:09d}", recursive=True)
    except FileNotFoundError:
        pass
    return record


def write_json_atomic(fs, path: str, data: Mapping[str, Any], lease_token=None) -> None:
    """DATA as JSON at PATH, written beside it and moved into place (with LEASE_TOKEN: only while the
    lease is still this run's)."""
    from vesl.lease import check_token

    folder, name = path.rsplit("/", 1)
    tmp = f"{folder}/.{name}.{uuid.uuid4().hex[:8]}"
    fs.makedirs(folder, exist_ok=True)
    with fs.open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
    check_token(lease_token)
    fs.mv(tmp, path)


def write_batch(table: pa.Table, output: str, name: str, footer: Mapping[str, str],
                storage_options: Mapping[str, Any] | None, compression: str, lease_token=None) -> dict[str, Any]:
    """Write one finished batch's rows and rejects; return its counts and files (no Ray needed)."""
    rows, rejects = split_rows_and_rejects(table, region_text_schema(dict(footer)))
    counts = summarize(table)
    fs, root = filesystem(output, storage_options)
    counts["files"] = [join_uri(output, sub, name) for sub, part in ((DATA_DIR, rows), (REJECTS_DIR, rejects))
                       if _commit_file(fs, root.rstrip("/"), part, sub, name, compression, lease_token) is not None]
    return counts


def write_manifest(manifest: Mapping[str, Any], output: str, storage_options: Mapping[str, Any] | None) -> str:
    fs, root = filesystem(output, storage_options)
    write_json_atomic(fs, f"{root.rstrip('/')}/{MANIFEST}", manifest)
    return join_uri(output, MANIFEST)
