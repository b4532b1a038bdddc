"""write: region-text shards (schema v1) and rejects, as Parquet, through a Ray Data Datasink.

Layout of OUTPUT:
    data/part-<run>-<task>.parquet     region-text shards, one row per image
    rejects/part-<run>-<task>.parquet  one row per rejected input
    manifest.json                      the run manifest, written last (its presence = run complete)
Files are written under OUTPUT/_tmp/ and moved into place whole, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas.columns import REJECT_MESSAGE, REJECT_REASON, REJECT_STAGE
from schemas.region_text import REJECT_SCHEMA, region_text_schema
from vesl.core.storage import filesystem, join_uri

DATA_DIR, REJECTS_DIR, TMP_DIR, MANIFEST = "data", "rejects", "_tmp", "manifest.json"


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


def write_parquet_atomic(table: pa.Table, output: str, subdir: str, name: str,
                         storage_options: Mapping[str, Any] | None, compression: str, lease_token=None) -> str:
    """Write TABLE to OUTPUT/SUBDIR/NAME via OUTPUT/_tmp/, so the final path appears only when whole.
    With LEASE_TOKEN the move happens only while this run still holds OUTPUT's lease (a run whose lease
    was taken over raises LeaseLostError instead of committing beside its successor)."""
    from vesl.lease import check_token

    fs, root = filesystem(output, storage_options)
    tmp = f"{root.rstrip('/')}/{TMP_DIR}/{uuid.uuid4().hex}-{name}"
    final = f"{root.rstrip('/')}/{subdir}/{name}"
    fs.makedirs(f"{root.rstrip('/')}/{TMP_DIR}", exist_ok=True)
    fs.makedirs(f"{root.rstrip('/')}/{subdir}", exist_ok=True)
    with fs.open(tmp, "wb") as f:
        pq.write_table(table, f, compression=compression)
    check_token(lease_token)
    fs.mv(tmp, final)
    return join_uri(output, subdir, name)


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


def merge_counts(parts: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {"inputs": 0, "rows": 0, "rejects": 0, "regions": 0, "phrases": 0}
    by_reason: Counter = Counter()
    for part in parts:
        for key in total:
            total[key] += part.get(key, 0)
        by_reason.update(part.get("by_reason", {}))
    total["by_reason"] = dict(sorted(by_reason.items()))
    total["by_stage"] = stage_totals(by_reason)
    return total


def stage_totals(by_reason: Mapping[str, int]) -> dict[str, int]:
    """{'decode/not_found': 2, 'decode/empty_file': 1} -> {'decode': 3}."""
    by_stage: Counter = Counter()
    for key, n in by_reason.items():
        by_stage[key.split("/", 1)[0]] += n
    return dict(sorted(by_stage.items()))


def make_datasink(output: str, run_id: str, footer: Mapping[str, str], storage_options: Mapping[str, Any] | None,
                  rows_per_shard: int, compression: str, lease_token=None):
    """A Ray Data Datasink writing shards + rejects; each write task returns its counts and files."""
    from ray.data import Datasink

    class RegionShardDatasink(Datasink):
        def __init__(self) -> None:
            self.results: list[dict[str, Any]] = []

        @property
        def min_rows_per_write(self) -> int:
            return rows_per_shard

        def write(self, blocks, ctx) -> dict[str, Any]:
            from ray.data.block import BlockAccessor

            tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
            tables = [t for t in tables if t.num_rows]
            if not tables:
                return {"inputs": 0, "files": []}
            table = pa.concat_tables(tables, promote_options="permissive")
            return write_batch(table, output, f"part-{run_id}-{ctx.task_idx:05d}.parquet", footer,
                               storage_options, compression, lease_token)

        def on_write_complete(self, write_result) -> None:
            self.results = list(write_result.write_returns)

    return RegionShardDatasink()


def write_batch(table: pa.Table, output: str, name: str, footer: Mapping[str, str],
                storage_options: Mapping[str, Any] | None, compression: str, lease_token=None) -> dict[str, Any]:
    """Write one finished batch's rows and rejects; return its counts and files (no Ray needed)."""
    rows, rejects = split_rows_and_rejects(table, region_text_schema(dict(footer)))
    counts = summarize(table)
    files = []
    if rows.num_rows:
        files.append(write_parquet_atomic(rows, output, DATA_DIR, name, storage_options, compression, lease_token))
    if rejects.num_rows:
        files.append(write_parquet_atomic(rejects, output, REJECTS_DIR, name, storage_options, compression,
                                          lease_token))
    counts["files"] = files
    return counts


def write_manifest(manifest: Mapping[str, Any], output: str, storage_options: Mapping[str, Any] | None) -> str:
    fs, root = filesystem(output, storage_options)
    tmp = f"{root.rstrip('/')}/{TMP_DIR}/{MANIFEST}.{uuid.uuid4().hex}"
    fs.makedirs(f"{root.rstrip('/')}/{TMP_DIR}", exist_ok=True)
    with fs.open(tmp, "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=False, default=str)
    fs.mv(tmp, f"{root.rstrip('/')}/{MANIFEST}")
    try:
        fs.rm(f"{root.rstrip('/')}/{TMP_DIR}", recursive=True)
    except FileNotFoundError:
        pass
    return join_uri(output, MANIFEST)
