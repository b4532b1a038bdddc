"""Work units: the input split once into deterministic pieces, each processed and committed whole.

The first run on an OUTPUT makes the plan and saves it in OUTPUT/_vesl/plan/; every later run (a
resume, another slice) reads it back instead of listing and scanning the input again:

    plan.json          what was planned (written last: its presence means the plan is whole)
    units.parquet      one row per unit: its sources, its records [start, start + count), where the
                       first of them begins in the file (line, byte offset), its ordinal range
    duplicates.parquet every repeated occurrence of an image_id (not the kept one): its ordinal and unit

How the input splits (`input.unit_rows`, default 10,000 inputs):
- a manifest file (Parquet, JSONL, CSV): every `unit_rows` records; JSONL and CSV units start at a
  record's byte offset, so reading one does not read the file before it;
- a WebDataset tar, an img2dataset shard: one unit each;
- a folder of images: consecutive images of the listing, `unit_rows` to a unit.

The planning pass runs the real readers on Ray (one task per source), so it sees every input the
run will see. Each input's (image_id, ordinal) stays in Ray's object store; the driver receives only
per-source counts and unit starts. Duplicates are then found by a Ray Data group-by over those ids;
the driver receives only the ids that repeat. Rule: the first occurrence by input
position (`ordinal`) is kept, every other one is a `duplicate` reject, the same on every run.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from operators.base import mark_rejects
from schemas.rejects import READ_STAGE, RejectReason
from vesl.annotate.sources.config import InputConfig
from vesl.annotate.sources.manifest import iter_manifest_records
from vesl.annotate.sources.plan import (
    FILES_SCHEMA,
    InputPlan,
    changed_files,
    describe_changes,
    files_table,
    plan_input,
)
from vesl.annotate.sources.read import source_reader
from vesl.annotate.sources.rows import ORDINAL_FILE_SHIFT, READ_ERROR, READ_REASON, SOURCE, normalize_rows
from vesl.core.outdir import PLAN_DIR, OutputDir
from vesl.core.storage import canonical_uri, parent_uri
from vesl.core.text import describe_error
from vesl.errors import CorruptStateError

log = logging.getLogger("vesl.annotate.units")
UNIT = "unit"  # the column that carries a row's unit through the stages
SOURCE_SPAN = 1 << ORDINAL_FILE_SHIFT
PLAN_VERSION = 2  # 2: files.parquet, the fingerprints of the input's files
LIMIT_WAVE_SOURCES = 16  # sources scanned at a time when input.limit is set


class PlanMismatchError(RuntimeError):
    """OUTPUT's saved plan was made for other settings than this run's."""


# ---------------------------------------------------------------------------------------- slices
@dataclass(frozen=True)
class Slice:
    """Slice INDEX of COUNT: a contiguous run of the plan's units (`--slice I/N`)."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str | None) -> "Slice":
        if not text:
            return cls()
        try:
            i, n = (int(p) for p in str(text).split("/"))
        except ValueError:
            raise ValueError(f"a slice is I/N (e.g. 0/4: the first of four), not {text!r}") from None
        if n < 1 or not 0 <= i < n:
            raise ValueError(f"slice {text!r}: need N >= 1 and 0 <= I < N")
        return cls(i, n)

    @property
    def whole(self) -> bool:
        return self.count == 1

    @property
    def label(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def lease_name(self) -> str | None:
        """The folder of this slice's lease under `_lease/` (the whole input's lease is `_lease/` itself)."""
        return None if self.whole else f"slice-{self.index}-of-{self.count}"

    @classmethod
    def from_lease_name(cls, name: str) -> "Slice | None":
        """The slice whose lease folder is NAME, else None."""
        i, sep, n = name.removeprefix("slice-").partition("-of-")
        if not name.startswith("slice-") or not sep or not i.isdigit() or not n.isdigit() or int(i) >= int(n):
            return None
        return cls(int(i), int(n))

    def describe(self) -> str:
        return "the whole input" if self.whole else f"slice {self.label}"

    def bounds(self, units: int) -> tuple[int, int]:
        """[first, end) of this slice's units among UNITS."""
        return units * self.index // self.count, units * (self.index + 1) // self.count

    def overlaps(self, other: "Slice") -> bool:
        lo, hi = Fraction(self.index, self.count), Fraction(self.index + 1, self.count)
        olo, ohi = Fraction(other.index, other.count), Fraction(other.index + 1, other.count)
        return lo < ohi and olo < hi


# ---------------------------------------------------------------------------------------- scan
def _id_table(tables: list[pa.Table]) -> pa.Table:
    if not tables:
        return pa.table({"image_id": pa.array([], pa.string()), "ordinal": pa.array([], pa.int64())})
    return pa.concat_tables([t.select(["image_id", "ordinal"]) for t in tables])


def scan_manifest(source: Mapping[str, Any], config: InputConfig, storage_options,
                  unit_rows: int) -> tuple[dict[str, Any], list[pa.Table]]:
    """(count, unit starts, error) of one manifest file, and its inputs' ids."""
    uri, base = source["uri"], (source["index"] << ORDINAL_FILE_SHIFT)
    marks_line, marks_offset, ids, n, error = [], [], [], 0, None
    for chunk in iter_manifest_records(uri, storage_options):
        for k, (line, offset, row) in enumerate(chunk):
            if (n + k) % unit_rows == 0:
                marks_line.append(line)
                marks_offset.append(offset)
            if n == 0 and k == 0 and len(chunk) == 1 and row.get(SOURCE) == uri and READ_REASON in row:
                error = row[READ_ERROR]  # the file could not be opened: the unit replays this error
        rows = [row for _, _, row in chunk]
        ids.append(normalize_rows(rows, list(range(base + n, base + n + len(rows))), config, parent_uri(uri)))
        n += len(rows)
    if n != 1:
        error = None
    return {"count": n, "marks_line": marks_line, "marks_offset": marks_offset, "error": error}, ids


SCAN_SCHEMA = pa.schema([("image_id", pa.string()), ("ordinal", pa.int64()), ("source", pa.int64()),
                         ("count", pa.int64()), ("marks_line", pa.list_(pa.int64())),
                         ("marks_offset", pa.list_(pa.int64())), ("error", pa.string())])


def scan_sources(batch: pa.Table, kind: str, config: InputConfig, storage_options, unit_rows: int) -> pa.Table:
    """Ray Data UDF of the planning pass: a batch of sources in; out, one row per input (image_id,
    ordinal) and one row per source (source, count, unit starts, error; image_id null)."""
    meta: dict[str, list] = {"source": [], "count": [], "marks_line": [], "marks_offset": [], "error": []}
    ids: list[pa.Table] = []
    for source in batch.to_pylist():
        if kind == "manifest":
            scanned, tables = scan_manifest(source, config, storage_options, unit_rows)
        else:
            one = pa.Table.from_pylist([source])
            tables = list(source_reader(kind)(one, config, storage_options))
            scanned = {"count": sum(t.num_rows for t in tables), "marks_line": [], "marks_offset": [], "error": None}
        ids += tables
        meta["source"].append(source["index"])
        for key, value in scanned.items():
            meta[key].append(value)
    id_rows = _id_table(ids)
    n = id_rows.num_rows
    id_part = pa.table({"image_id": id_rows.column("image_id"), "ordinal": id_rows.column("ordinal"),
                        **{f.name: pa.nulls(n, f.type) for f in SCAN_SCHEMA if f.name not in ("image_id", "ordinal")}},
                       schema=SCAN_SCHEMA)
    k = len(meta["source"])
    meta_part = pa.table({"image_id": pa.nulls(k, pa.string()), "ordinal": pa.nulls(k, pa.int64()), **meta},
                         schema=SCAN_SCHEMA)
    return pa.concat_tables([meta_part, id_part])


def _meta_rows(table: pa.Table) -> pa.Table:
    return table.filter(pc.is_null(table.column("image_id"))).drop_columns(["image_id", "ordinal"])


def _id_rows(table: pa.Table) -> pa.Table:
    return table.filter(pc.is_valid(table.column("image_id"))).select(["image_id", "ordinal"])


def build_units(plan: InputPlan, scans: pa.Table, unit_rows: int, limit: int | None) -> pa.Table:
    """The units table of PLAN from the planning pass's per-source SCANS (see the module doc)."""
    by_source = {row["source"]: row for row in scans.to_pylist()}
    units: list[dict[str, Any]] = []

    def add(sources: list[dict], start: int, count: int, line=None, offset=None, error=None, lo=0, hi=0) -> None:
        units.append({"unit": len(units), "sources": json.dumps(sources), "start": start, "count": count,
                      "line": line, "offset": offset, "error": error, "lo": lo, "hi": hi})

    group: list[dict] = []  # consecutive images of a folder

    def flush() -> None:
        if group:
            add(list(group), 0, len(group), lo=group[0]["index"], hi=group[-1]["index"])
            group.clear()

    for source in plan.sources:
        if source["index"] not in by_source:  # not scanned: past input.limit
            break
        scan = by_source[source["index"]]
        count, base = scan["count"], source["index"] << ORDINAL_FILE_SHIFT
        if plan.kind == "folder" and not source.get("status"):
            group.append(source)
            if len(group) >= unit_rows:
                flush()
            continue
        flush()
        if not count:
            continue
        if plan.kind == "manifest":
            for j, start in enumerate(range(0, count, unit_rows)):
                n = min(unit_rows, count - start)
                add([source], start, n, scan["marks_line"][j], scan["marks_offset"][j], scan["error"],
                    base + start, base + start + n - 1)
        else:  # a tar or an img2dataset shard: one unit, ordinals anywhere in its span
            add([source], 0, count, lo=base, hi=base + SOURCE_SPAN - 1)
    flush()
    table = pa.Table.from_pylist(units, schema=UNITS_SCHEMA) if units else UNITS_SCHEMA.empty_table()
    if limit is not None:
        counts = table.column("count").to_numpy()
        before = np.concatenate([[0], np.cumsum(counts)[:-1]]) if len(counts) else counts
        keep = before < limit
        table = table.filter(pa.array(keep))
        if table.num_rows:
            counts = np.minimum(table.column("count").to_numpy(), limit - before[keep])
            table = table.set_column(table.schema.get_field_index("count"), "count", pa.array(counts, pa.int64()))
            if plan.kind == "manifest":  # a manifest unit's ordinals are exactly its records
                hi = table.column("lo").to_numpy() + counts - 1
                table = table.set_column(table.schema.get_field_index("hi"), "hi", pa.array(hi, pa.int64()))
    return table


UNITS_SCHEMA = pa.schema([("unit", pa.int64()), ("sources", pa.string()), ("start", pa.int64()),
                          ("count", pa.int64()), ("line", pa.int64()), ("offset", pa.int64()),
                          ("error", pa.string()), ("lo", pa.int64()), ("hi", pa.int64())])
DUPLICATES_SCHEMA = pa.schema([("image_id", pa.string()), ("ordinal", pa.int64()), ("kept", pa.int64()),
                               ("unit", pa.int64())])


def unit_of(units: pa.Table, ordinals: np.ndarray) -> np.ndarray:
    """The unit holding each of ORDINALS (units are disjoint ordinal ranges [lo, hi], in order); -1
    for an ordinal no unit holds (cut off by input.limit)."""
    lo, hi = units.column("lo").to_numpy(), units.column("hi").to_numpy()
    at = np.searchsorted(lo, ordinals, side="right") - 1
    ok = (at >= 0) & (hi[np.clip(at, 0, None)] >= ordinals) if len(lo) else np.zeros(len(ordinals), bool)
    return np.where(ok, units.column("unit").to_numpy()[np.clip(at, 0, None)] if len(lo) else -1, -1)


# Below this many ids the group-by runs Ray Data's sort-based shuffle, on tasks: it starts in a fraction of a
# second, where Ray's default shuffle (actors) took 6 to 9 s to start here for a handful of ids. Above it, Ray's
# default, which is built for large shuffles.
SORT_SHUFFLE_MAX_IDS = 1_000_000


def find_duplicates(ids, units: pa.Table, count: int | None = None) -> pa.Table:
    """Every repeated occurrence of an image_id in IDS (a Ray Dataset of image_id, ordinal; COUNT rows when
    known) but the first by ordinal, with the ordinal kept and the occurrence's unit. A distributed group-by:
    what reaches the driver is only the ids that repeat, and then their occurrences."""
    from ray.data.aggregate import Count, Min
    from ray.data.context import ShuffleStrategy
    from ray.data.expressions import col

    if count is not None and count <= SORT_SHUFFLE_MAX_IDS:
        ids.context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED  # this dataset's own context
    repeated = (ids.groupby("image_id").aggregate(Count(alias_name="n"), Min("ordinal", alias_name="kept"))
                .filter(expr=col("n") > 1))
    kept = [b for b in repeated.iter_batches(batch_format="pyarrow", batch_size=None) if b.num_rows]
    if not kept:
        return DUPLICATES_SCHEMA.empty_table()
    kept_table = pa.concat_tables(kept)
    wanted = kept_table.column("image_id").combine_chunks()
    found = pa.concat_tables([b for b in ids.map_batches(_occurrences_of, fn_kwargs={"wanted": wanted},
                                                         batch_format="pyarrow").iter_batches(
        batch_format="pyarrow", batch_size=None)])
    kept_of = dict(zip(kept_table.column("image_id").to_pylist(), kept_table.column("kept").to_pylist()))
    first = np.array([kept_of[i] for i in found.column("image_id").to_pylist()], dtype=np.int64)
    ordinals = found.column("ordinal").to_numpy()
    extra = ordinals != first
    table = pa.table({"image_id": found.column("image_id").filter(pa.array(extra)),
                      "ordinal": pa.array(ordinals[extra], pa.int64()), "kept": pa.array(first[extra], pa.int64())})
    table = table.append_column("unit", pa.array(unit_of(units, table.column("ordinal").to_numpy()), pa.int64()))
    return table.sort_by([("ordinal", "ascending")])


def _occurrences_of(table: pa.Table, wanted: pa.Array) -> pa.Table:
    return table.filter(pc.is_in(table.column("image_id"), value_set=wanted))


# ---------------------------------------------------------------------------------------- plan
@dataclass
class Plan:
    """A saved plan: what it was made from, its units, the repeated occurrences, and the fingerprints of the
    input's files (None in a plan made by a vesl that did not record them)."""

    meta: dict[str, Any]
    units: pa.Table
    duplicates: pa.Table
    files: pa.Table | None = None

    @property
    def inputs(self) -> int:
        return int(self.meta["inputs"])

    @property
    def unit_count(self) -> int:
        return self.units.num_rows

    def unit_keys(self) -> list[str]:
        """Per unit, a hash of what it covers (its sources, record range and ordinals). A completion record
        carries its unit's key, so a record of another plan (other settings, another input) is told apart."""
        rows = self.units.select(KEY_COLUMNS).to_pylist()
        return [hashlib.sha256(json.dumps(r, sort_keys=True).encode()).hexdigest()[:16] for r in rows]


KEY_COLUMNS = ["sources", "start", "count", "line", "offset", "lo", "hi"]
PLAN_TABLES = {"units.parquet": "units", "duplicates.parquet": "repeated ids", "files.parquet": "input fingerprints"}
PLAN_META = {"plan_version": int, "input": str, "kind": str, "inputs": int, "units": int, "unit_rows": int}
DAMAGED_PLAN = ("the plan is damaged: delete OUTPUT's _vesl/plan/ folder and re-run (the plan is made again from the "
                "input and checked against the units already done), or use --overwrite")


def load_plan(out: OutputDir) -> Plan | None:
    """OUTPUT's saved plan, or None when no whole plan is there (plan.json is written last). A plan file
    that is missing, unreadable or not vesl's is a CorruptStateError naming it."""
    if not out.exists(PLAN_DIR, "plan.json"):
        return None
    try:
        meta = out.read_json(PLAN_DIR, "plan.json", what="plan")
    except CorruptStateError as e:
        raise CorruptStateError(f"{e}: {DAMAGED_PLAN}") from None
    wrong = [k for k, kind in PLAN_META.items() if not isinstance(meta.get(k), kind)]
    if wrong:
        raise CorruptStateError(f"{out.uri_of(PLAN_DIR, 'plan.json')} is not a vesl plan (no valid "
                                f"{', '.join(wrong)}): {DAMAGED_PLAN}")
    schemas = {"units.parquet": UNITS_SCHEMA, "duplicates.parquet": DUPLICATES_SCHEMA, "files.parquet": FILES_SCHEMA}
    names = list(schemas) if meta["plan_version"] >= 2 else list(schemas)[:2]
    tables = [_plan_table(out, name, schemas[name]) for name in names]
    plan = Plan(meta, *tables)
    if plan.unit_count != meta["units"] or int(pc.sum(plan.units.column("count")).as_py() or 0) != meta["inputs"]:
        raise CorruptStateError(f"{out.uri_of(PLAN_DIR, 'units.parquet')} holds {plan.unit_count} units, plan.json "
                                f"says {meta['units']} units of {meta['inputs']} inputs: {DAMAGED_PLAN}")
    return plan


def _plan_table(out: OutputDir, name: str, schema: pa.Schema) -> pa.Table:
    """The plan file NAME, checked to hold SCHEMA's columns; CorruptStateError naming it otherwise."""
    where = f"{out.uri_of(PLAN_DIR, name)} (the plan's {PLAN_TABLES[name]})"
    try:
        with out.open(PLAN_DIR, name) as f:
            table = pq.read_table(f)
    except FileNotFoundError:
        raise CorruptStateError(f"{where} is missing: {DAMAGED_PLAN}") from None
    except (pa.ArrowException, OSError, ValueError) as e:
        raise CorruptStateError(f"{where} is not a readable Parquet file ({describe_error(e)}): "
                                f"{DAMAGED_PLAN}") from None
    missing = [f.name for f in schema if f.name not in table.column_names]
    if missing:
        raise CorruptStateError(f"{where} is not a vesl plan file (no column {', '.join(missing)}): {DAMAGED_PLAN}")
    try:
        return table.select(schema.names).cast(schema)
    except (pa.ArrowException, ValueError) as e:
        raise CorruptStateError(f"{where} has columns of other types ({describe_error(e)}): {DAMAGED_PLAN}") from None


def save_plan(out: OutputDir, plan: Plan) -> None:
    """Write the plan's tables, then plan.json (each staged and moved into place)."""
    tables = {"units.parquet": plan.units, "duplicates.parquet": plan.duplicates, "files.parquet": plan.files}
    for name, table in tables.items():
        if table is not None:
            out.write_parquet(table, PLAN_DIR, name)
    out.write_json(plan.meta, PLAN_DIR, "plan.json")


def make_plan(input_uri: str, input_plan: InputPlan, config: InputConfig, storage_options,
              num_cpus: float = 1.0) -> Plan:
    """Scan the input on Ray (the real readers, one task per source), cut it into units, find the
    repeated ids. Nothing is written: the scan's rows stay in Ray's object store (spilled to disk
    when large) and the driver receives per-source counts and the repeated ids only."""
    import time

    import ray.data

    unit_rows = config.unit_rows
    started = time.perf_counter()
    batch = 1 if input_plan.kind != "folder" else max(1, min(256, unit_rows))
    kwargs = {"kind": input_plan.kind, "config": config, "storage_options": storage_options, "unit_rows": unit_rows}
    # with input.limit, sources are scanned a wave at a time until the limit is reached (a smoke run of a
    # huge input reads its first files only); otherwise all at once
    wave = LIMIT_WAVE_SOURCES if config.limit else max(1, len(input_plan.sources))
    parts, metas, seen = [], [], 0
    for first in range(0, len(input_plan.sources), wave):
        chunk = input_plan.sources[first:first + wave]
        sources = ray.data.from_items(chunk, override_num_blocks=max(1, min(len(chunk), 256)))
        scans = sources.map_batches(scan_sources, batch_size=batch, batch_format="pyarrow", num_cpus=num_cpus,
                                    fn_kwargs=kwargs).materialize()
        parts.append(scans)
        metas += [b for b in scans.map_batches(_meta_rows, batch_format="pyarrow").iter_batches(
            batch_format="pyarrow", batch_size=None)]
        seen = sum(int(pc.sum(m.column("count")).as_py() or 0) for m in metas)
        if config.limit and seen >= config.limit:
            break
    scanned = pa.concat_tables(metas) if metas else _meta_rows(SCAN_SCHEMA.empty_table())
    scans = (parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])) if parts else None
    units = build_units(input_plan, scanned, unit_rows, config.limit)
    scan_s = time.perf_counter() - started
    duplicates = DUPLICATES_SCHEMA.empty_table()
    if scans is not None and units.num_rows:
        duplicates = find_duplicates(scans.map_batches(_id_rows, batch_format="pyarrow"), units, seen)
        duplicates = duplicates.filter(pc.greater_equal(duplicates.column("unit"), 0))  # beyond input.limit
    meta = {"plan_version": PLAN_VERSION, "input": input_uri, "kind": input_plan.kind, "label": input_plan.label,
            "found": input_plan.found, "sources": len(input_plan.sources), "sources_scanned": scanned.num_rows,
            "inputs": int(pc.sum(units.column("count")).as_py() or 0), "units": units.num_rows,
            "unit_rows": unit_rows, "limit": config.limit, "duplicates": duplicates.num_rows,
            "duplicate_ids": len(set(duplicates.column("image_id").to_pylist())),
            "timings_s": {"scan": round(scan_s, 3), "duplicates": round(time.perf_counter() - started - scan_s, 3)},
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat()}
    return Plan(meta, units, duplicates, files_table(input_plan.files))


def check_plan(plan: Plan, input_uri: str, config: InputConfig) -> None:
    """Refuse a saved plan made from another input or with another input.limit (which inputs the
    run covers); another unit_rows is only logged (the saved units stay)."""
    if canonical_uri(str(plan.meta.get("input"))) != canonical_uri(input_uri):
        raise PlanMismatchError(f"OUTPUT's plan was made for input {plan.meta.get('input')}, not {input_uri}")
    if plan.meta.get("limit") != config.limit:
        raise PlanMismatchError(f"OUTPUT's plan covers input.limit={plan.meta.get('limit')}; this run asks for "
                                f"input.limit={config.limit}. Use the same limit, or --overwrite to plan again")
    if plan.meta.get("unit_rows") != config.unit_rows:
        log.info("OUTPUT's plan has units of %s inputs (input.unit_rows=%s is used only when planning)",
                 plan.meta.get("unit_rows"), config.unit_rows)


class InputChangedError(PlanMismatchError):
    """The input's files are not those OUTPUT's plan was made from (edited, grown, deleted, added)."""


def check_input_unchanged(plan: Plan, input_uri: str, config: InputConfig, storage_options,
                          exclude: str | None = None) -> None:
    """Refuse to resume PLAN when the input's files changed since it was made: list the input again (no
    file is read) and compare each file's fingerprint (size, and ETag or modification time) with the
    plan's. A unit reads its records where the plan says they are, so an edited manifest would lose rows
    or read fragments of lines, and a new file would be left out without a word."""
    if plan.files is None:
        log.warning("OUTPUT's plan was made by an older vesl that did not record the input's files: a change to "
                    "the input since then is not detected")
        return
    made = plan.meta.get("created_at", "?")
    fix = ("Resuming would lose or mix inputs. Restore the input as it was, write to a new OUTPUT, or use "
           "--overwrite to plan and label the input as it is now")
    try:
        now = plan_input(input_uri, config, storage_options, exclude=exclude, allow_empty=True)
    except FileNotFoundError:
        raise InputChangedError(f"input {input_uri} is gone: OUTPUT's plan was made from it ({made}, "
                                f"{plan.files.num_rows} file(s)). {fix}") from None
    changed = changed_files(plan.files, files_table(now.files))
    if changed.num_rows:
        kind = "" if now.kind == plan.meta["kind"] else f" (it now reads as {now.kind}, not {plan.meta['kind']})"
        raise InputChangedError(f"input {input_uri} changed since OUTPUT's plan was made ({made}){kind}: "
                                f"{changed.num_rows} of its files differ: {describe_changes(changed)}. {fix}")


# ---------------------------------------------------------------------------------------- read
def _limited(tables: Iterator[pa.Table], count: int) -> Iterator[pa.Table]:
    """The first COUNT rows of TABLES."""
    left = count
    for table in tables:
        if left <= 0:
            return
        if table.num_rows > left:
            table = table.slice(0, left)
        left -= table.num_rows
        yield table


def unit_tables(unit: Mapping[str, Any], kind: str, config: InputConfig, storage_options) -> Iterator[pa.Table]:
    """INPUT_SCHEMA tables of one unit's inputs, exactly as the planning pass read them."""
    sources = json.loads(unit["sources"])
    if kind == "manifest":
        source = sources[0]
        uri, base = source["uri"], (source["index"] << ORDINAL_FILE_SHIFT) + unit["start"]
        if unit["error"]:  # the file could not be opened when planned: the same reject, without a second try
            rows = [{READ_ERROR: unit["error"], READ_REASON: RejectReason.UNREADABLE_MANIFEST.value, SOURCE: uri}]
            yield normalize_rows(rows, [base], config, parent_uri(uri))
            return
        n = 0
        for chunk in iter_manifest_records(uri, storage_options, start=(unit["line"], unit["offset"])):
            rows = [row for _, _, row in chunk[: unit["count"] - n]]
            yield normalize_rows(rows, list(range(base + n, base + n + len(rows))), config, parent_uri(uri))
            n += len(rows)
            if n >= unit["count"]:
                return
        return
    yield from _limited(source_reader(kind)(pa.Table.from_pylist(sources), config, storage_options), unit["count"])


def read_units(batch: pa.Table, kind: str, config: InputConfig, storage_options) -> Iterator[pa.Table]:
    """Ray Data generator UDF: units in (rows of `todo_units`); their inputs out (INPUT_SCHEMA plus
    `unit`), the repeated occurrences already marked `duplicate` rejects."""
    for unit in batch.to_pylist():
        dups = {o: k for o, k in json.loads(unit.get("dups") or "[]")}
        for table in unit_tables(unit, kind, config, storage_options):
            if dups:
                table = mark_duplicates(table, dups)
            yield table.append_column(UNIT, pa.array(np.full(table.num_rows, unit["unit"], np.int64)))


def mark_duplicates(table: pa.Table, kept: Mapping[int, int]) -> pa.Table:
    """Mark TABLE's rows whose ordinal is a repeated occurrence (KEPT: its ordinal -> the ordinal kept)
    as `duplicate` rejects."""
    ids, ordinals = table.column("image_id").to_pylist(), table.column("ordinal").to_pylist()
    return mark_rejects(table, READ_STAGE, {
        k: (RejectReason.DUPLICATE.value, f"image_id {ids[k]!r} already appears at input ordinal {kept[o]}, "
                                          "which is kept")
        for k, o in enumerate(ordinals) if o in kept})


def todo_units(plan: Plan, done: set[int], bounds: tuple[int, int]) -> pa.Table:
    """The units of PLAN in [BOUNDS) not in DONE, each with its key (`Plan.unit_keys`) and its repeated
    occurrences (`dups`, JSON)."""
    ids = plan.units.column("unit").to_numpy()
    keep = (ids >= bounds[0]) & (ids < bounds[1])
    if done:
        keep &= ~np.isin(ids, np.fromiter(done, np.int64, len(done)))
    table = plan.units.filter(pa.array(keep))
    table = table.append_column("key", pa.array(plan.unit_keys(), pa.string()).filter(pa.array(keep)))
    dups: dict[int, list] = {}
    if plan.duplicates.num_rows:
        d = plan.duplicates.filter(pc.is_in(plan.duplicates.column("unit"), value_set=table.column("unit")))
        for unit, ordinal, kept in zip(d.column("unit").to_pylist(), d.column("ordinal").to_pylist(),
                                       d.column("kept").to_pylist()):
            dups.setdefault(unit, []).append([ordinal, kept])
    return table.append_column("dups", pa.array([json.dumps(dups[u]) if u in dups else None
                                                 for u in table.column("unit").to_pylist()], pa.string()))


__all__ = ["InputChangedError", "Plan", "PlanMismatchError", "check_input_unchanged", "Slice", "UNIT", "build_units",
           "check_plan", "find_duplicates", "load_plan", "make_plan", "read_units", "save_plan", "scan_sources",
           "todo_units", "unit_of", "unit_tables"]
