"""write: region-text shards and rejects, as Parquet, one shard per work unit (layout: `vesl.core.outdir`).

A unit's batches are first written as parts under OUTPUT/_vesl/staging/<unit>/ (`stage_unit_parts`,
the last Ray Data step); once all its inputs are staged, `commit_unit` checks rows + rejects ==
inputs, writes the unit's shard and rejects file (each staged and moved into place whole, only while
the run holds its lease), then its completion record. A unit without a record is not done: a resume
redoes it whole.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from operators.base import METRIC_PREFIX, SECONDS_PREFIX
from schemas.columns import REJECT_MESSAGE, REJECT_REASON, REJECT_STAGE
from schemas.region_text import REJECT_SCHEMA, region_text_schema
from vesl.annotate.output.ledger import add_stage_figures, empty_stage_figures
from vesl.annotate.units import UNIT
from vesl.core.outdir import DATA_DIR, MANIFEST, REJECTS_DIR, STAGING_DIR, Fence, OutputDir, record_file, unit_file


class MissingColumnError(ValueError):
    """A finished batch lacks a column the shard or reject schema needs: a stage (or the reader) did not
    write what the contract says it writes."""


class UnitAccountingError(RuntimeError):
    """A unit's staged rows + rejects are not its planned inputs: it is not committed."""


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


def stage_seconds(table: pa.Table) -> dict[str, dict[str, Any]]:
    """Per stage of a finished batch: the rows it handled, the seconds it spent on them and the sums of its
    counts (each stage leaves its time per handled row in a `SECONDS_PREFIX<stage>` column, and each count
    it declares in a `METRIC_PREFIX<stage>.<metric>` column; see operators.base)."""
    out: dict[str, dict[str, Any]] = {}
    for name in table.column_names:
        if name.startswith(SECONDS_PREFIX):
            column = table.column(name)
            out.setdefault(name[len(SECONDS_PREFIX):], {}).update(
                rows=len(column) - column.null_count, seconds=float(pc.sum(column).as_py() or 0.0))
    for name in table.column_names:
        if name.startswith(METRIC_PREFIX):
            stage, _, metric = name[len(METRIC_PREFIX):].partition(".")
            column = table.column(name)
            if stage in out and column.null_count < len(column):  # a count no row has (served: visual tokens)
                out[stage].setdefault("metrics", {})[metric] = float(pc.sum(column).as_py() or 0.0)
    return out


STAGED_SCHEMA = pa.schema([("unit", pa.int64()), ("inputs", pa.int64()), ("parts", pa.list_(pa.string())),
                           ("stage", pa.list_(pa.string())), ("stage_rows", pa.list_(pa.int64())),
                           ("stage_seconds", pa.list_(pa.float64())), ("stage_metrics", pa.list_(pa.string()))])


def stage_unit_parts(table: pa.Table, out: OutputDir, footer: Mapping[str, str]) -> pa.Table:
    """Ray Data UDF, the last step of the chain: a finished batch in; per unit, its rows and rejects
    written as parts under OUTPUT/_vesl/staging/<unit>/; out, one small row per unit: (unit, inputs, the
    parts, per stage its rows and seconds). Only parts a finished task reports are ever committed (a
    failed attempt's are not)."""
    schema = region_text_schema(dict(footer))
    units = table.column(UNIT).to_numpy()
    out_rows: list[dict[str, Any]] = []
    for unit in np.unique(units):
        part = table.filter(pa.array(units == unit))
        rows, rejects = split_rows_and_rejects(part, schema)
        name, parts = uuid.uuid4().hex, []
        for kind, piece in (("rows", rows), ("rejects", rejects)):
            if piece.num_rows:
                rel = f"{STAGING_DIR}/{int(unit):09d}/{name}-{kind}.parquet"
                with out.open(rel, mode="wb") as f:
                    pq.write_table(piece, f, compression="none")
                parts.append(out.path(rel))
        seconds = stage_seconds(part)
        out_rows.append({"unit": int(unit), "inputs": part.num_rows, "parts": parts, "stage": list(seconds),
                         "stage_rows": [s["rows"] for s in seconds.values()],
                         "stage_seconds": [s["seconds"] for s in seconds.values()],
                         "stage_metrics": [json.dumps(s.get("metrics") or {}) for s in seconds.values()]})
    return pa.Table.from_pylist(out_rows, schema=STAGED_SCHEMA)


def _read_parts(out: OutputDir, paths: list[str], schema: pa.Schema) -> pa.Table:
    tables = []
    for path in paths:
        with out.fs.open(path, "rb") as f:
            tables.append(pq.read_table(f))
    return pa.concat_tables(tables).cast(schema) if tables else schema.empty_table()


def _commit_file(out: OutputDir, table: pa.Table, rel: str, compression: str, fence: Fence | None) -> int | None:
    """TABLE as OUTPUT/REL, staged and moved into place; no rows: any earlier file there (of a killed
    attempt) is removed. Returns the size of the file there now (None: none)."""
    if not table.num_rows:
        if out.exists(rel):
            if fence is not None:
                fence()
            out.remove(rel)
        return None
    return out.write_parquet(table, rel, fence=fence, compression=compression)


def stage_report(stages: Mapping[str, Mapping[str, Any]], by_reason: Mapping[str, int]) -> dict[str, dict[str, Any]]:
    """Per stage: rows in, rejects by reason (from BY_REASON's "stage/reason" keys), seconds."""
    out = {name: add_stage_figures(empty_stage_figures(), figures) for name, figures in stages.items()}
    for key, n in by_reason.items():
        stage, _, reason = key.partition("/")
        if stage in out:
            out[stage]["rejects"][reason] = out[stage]["rejects"].get(reason, 0) + n
    return out


def commit_unit(out: OutputDir, unit: int, inputs: int, parts: list[str], footer: Mapping[str, str],
                compression: str, fence: Fence | None = None, run_id: str = "",
                stages: Mapping[str, Mapping[str, Any]] | None = None, key: str | None = None) -> dict[str, Any]:
    """Commit one unit whose INPUTS are all staged in PARTS: check rows + rejects == INPUTS and one row
    per image_id, write its shard and rejects file, then its completion record (with STAGES, each
    stage's rows and seconds on the unit, and KEY, the plan's key of the unit); remove its staging.
    Returns the record. Raises UnitAccountingError (nothing committed) when the counts disagree, and
    LeaseLostError when FENCE says another run holds OUTPUT now (its staged parts may be gone)."""
    schema = region_text_schema(dict(footer))
    try:
        rows = _read_parts(out, [p for p in parts if p.endswith("-rows.parquet")], schema)
        rejects = _read_parts(out, [p for p in parts if p.endswith("-rejects.parquet")], REJECT_SCHEMA)
    except FileNotFoundError:
        if fence is not None:
            fence()  # the run that took OUTPUT over cleared the staging: that is the error to report
        raise
    if rows.num_rows + rejects.num_rows != inputs:
        raise UnitAccountingError(f"unit {unit}: {rows.num_rows} rows + {rejects.num_rows} rejects != {inputs} "
                                  "planned inputs; not committed")
    if rows.num_rows and pc.count_distinct(rows.column("image_id")).as_py() != rows.num_rows:
        raise UnitAccountingError(f"unit {unit}: an image_id appears in two rows; not committed")
    name = unit_file(unit)
    sizes = {f"{sub}/{name}": _commit_file(out, table, f"{sub}/{name}", compression, fence)
             for sub, table in ((DATA_DIR, rows), (REJECTS_DIR, rejects))}
    sizes = {k: v for k, v in sizes.items() if v is not None}
    by_reason = Counter(f"{s}/{r}" for s, r in zip(rejects.column("stage").to_pylist(),
                                                   rejects.column("reason").to_pylist()))
    record = {"unit": unit, "inputs": inputs, "rows": rows.num_rows, "rejects": rejects.num_rows,
              "regions": int(pc.sum(pc.list_value_length(rows.column("regions"))).as_py() or 0),
              "phrases": int(pc.sum(pc.list_value_length(rows.column("phrases"))).as_py() or 0),
              "by_reason": dict(sorted(by_reason.items())), "stages": stage_report(stages or {}, by_reason),
              "files": [out.uri_of(name) for name in sizes], "sizes": sizes, "run_id": run_id, "unit_key": key,
              "committed_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    out.write_json(record, record_file(unit), fence=fence)
    out.remove(STAGING_DIR, f"{unit:09d}", recursive=True)
    return record


def write_manifest(manifest: Mapping[str, Any], out: OutputDir) -> str:
    out.write_json(manifest, MANIFEST)
    return out.uri_of(MANIFEST)


__all__ = ["MissingColumnError", "UnitAccountingError", "commit_unit", "split_rows_and_rejects", "stage_unit_parts",
           "write_manifest"]
