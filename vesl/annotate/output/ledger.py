"""The ledger: what OUTPUT's completion records add up to.

Each committed unit has one record (`_vesl/units/<unit>.json`: its inputs, rows, rejects by reason,
regions, files and their sizes), written last, after its shard and rejects file. Resume skips the
units the records name; the manifest's counts are summed from them. No row of a finished output is
ever read for either, and the driver keeps only unit ids and running sums.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from operators.registry import stage_totals
from vesl.annotate.units import Plan
from vesl.core.outdir import DATA_DIR, REJECTS_DIR, UNITS_DIR, OutputDir, record_file
from vesl.errors import CorruptStateError

log = logging.getLogger("vesl.annotate.output.ledger")
RECORD_BATCH = 1000  # records read per fsspec `cat` (concurrent GETs on S3)
FILES_LISTED = 10_000  # the manifest lists every file up to this many units (the records always do)
COUNTS = ("inputs", "rows", "rejects", "regions", "phrases")


def records_of(out: OutputDir, skip: set[int] | frozenset = frozenset()) -> Iterator[tuple[str, dict[str, Any]]]:
    """(URI, record) of each completion record of OUTPUT (but those of the units in SKIP), read in batches
    and checked to be a record (`check_record`) of the unit its name says."""
    names = [n for n in out.names(UNITS_DIR) if n.endswith(".json") and n[:-5].isdigit() and int(n[:-5]) not in skip]
    paths = [out.path(UNITS_DIR, n) for n in names]
    for start in range(0, len(paths), RECORD_BATCH):
        batch = paths[start:start + RECORD_BATCH]
        for path, data in sorted(out.fs.cat(batch).items()):
            uri = out.uri_of(out.rel_of(path))
            try:
                record = json.loads(data)
            except ValueError as e:
                raise CorruptStateError(f"{uri}: a completion record that is not JSON ({e}). {REDO}") from None
            check_record(uri, record, int(path.rsplit("/", 1)[-1][:-5]))
            yield uri, record


REDO = "Delete it and re-run: its unit is redone"
RECORD_FIELDS = {"unit": int, "inputs": int, "rows": int, "rejects": int, "by_reason": dict, "files": list,
                 "sizes": dict}


def check_record(uri: str, record: Any, unit: int) -> None:
    """CorruptStateError naming URI unless RECORD is a completion record of UNIT (its file name's number)."""
    if not isinstance(record, dict):
        raise CorruptStateError(f"{uri}: a completion record must be a JSON object, not a {type(record).__name__}. "
                                f"{REDO}")
    wrong = [k for k, kind in RECORD_FIELDS.items()
             if not isinstance(record.get(k), kind) or (kind is int and isinstance(record.get(k), bool))]
    if wrong:
        raise CorruptStateError(f"{uri} is not a completion record (no valid {', '.join(wrong)}). {REDO}")
    if record["unit"] != unit:
        raise CorruptStateError(f"{uri} is named for unit {unit} but records unit {record['unit']} (a copy of "
                                f"another unit's record?). {REDO}")


def check_against_plan(uri: str, record: Mapping[str, Any], plan: Plan, keys: list[str]) -> str | None:
    """What makes RECORD no record of a unit of PLAN (KEYS: its `unit_keys`), or None."""
    unit = record["unit"]
    if not 0 <= unit < plan.unit_count:
        return f"{uri} records unit {unit}, which the plan ({plan.unit_count} units) does not have"
    count = plan.units.column("count")[unit].as_py()
    if record["inputs"] != count:
        return f"{uri} records {record['inputs']} inputs for unit {unit}, which the plan gives {count}"
    if record.get("unit_key") and record["unit_key"] != keys[unit]:
        return f"{uri} was committed for another plan's unit {unit} (other sources or records)"
    return None


@dataclass
class Ledger:
    """Running totals of OUTPUT's completion records: the driver keeps the unit ids and sums, never the
    records (and the file list only up to FILES_LISTED units)."""

    done: set[int] = field(default_factory=set)
    totals: Counter = field(default_factory=Counter)
    by_reason: Counter = field(default_factory=Counter)
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)  # per stage: rows, rejects by reason, seconds
    unbalanced: list[int] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def add(self, record: Mapping[str, Any]) -> None:
        self.done.add(int(record["unit"]))
        for key in COUNTS:
            self.totals[key] += int(record.get(key, 0))
        self.by_reason.update(record.get("by_reason", {}))
        for name, figures in (record.get("stages") or {}).items():
            add_stage_figures(self.stages.setdefault(name, empty_stage_figures()), figures)
        if record.get("rows", 0) + record.get("rejects", 0) != record.get("inputs"):
            self.unbalanced.append(int(record["unit"]))
        if len(self.done) <= FILES_LISTED:
            self.files += record.get("files", [])

    def catch_up(self, out: OutputDir) -> "Ledger":
        """Add the records committed since this ledger was read (this run's, other slices')."""
        for _, record in records_of(out, skip=self.done):
            self.add(record)
        return self


def empty_stage_figures() -> dict[str, Any]:
    return {"rows": 0, "rejects": {}, "seconds": 0.0}


def add_stage_figures(total: dict[str, Any], figures: Mapping[str, Any]) -> dict[str, Any]:
    """Add one stage's FIGURES (rows in, rejects by reason, seconds, and the sums of its counts when it
    keeps any: `metrics`) to TOTAL, in place; returns TOTAL."""
    total["rows"] += int(figures.get("rows", 0))
    total["seconds"] = round(total["seconds"] + float(figures.get("seconds", 0.0)), 6)
    rejects = total["rejects"]
    for reason, n in (figures.get("rejects") or {}).items():
        rejects[reason] = rejects.get(reason, 0) + int(n)
    for metric, n in (figures.get("metrics") or {}).items():
        sums = total.setdefault("metrics", {})
        sums[metric] = round(sums.get(metric, 0.0) + float(n), 6)
    return total


def read_ledger(out: OutputDir, bounds: tuple[int, int] | None = None, plan: Plan | None = None,
                replanned: bool = False) -> tuple[Ledger, list[dict]]:
    """(OUTPUT's ledger, the units to redo because their files do not match their record). Every record is
    checked first: one that is not a record, or (given PLAN) is no record of a unit of PLAN, is a
    CorruptStateError naming it, before anything is changed (REPLANNED: PLAN was just made again, for a
    plan.json that was missing, and the records decide whether it stands). Then a record whose shard or
    rejects file is missing, or of another size than it committed (truncated, replaced), is removed when
    its unit is in [BOUNDS) (this run's): the unit is then redone whole. One listing of data/ and rejects/
    and one read of each record; no rows are read."""
    keys = plan.unit_keys() if plan is not None else []
    sizes = {f"{sub}/{e['name']}": e["size"] for sub in (DATA_DIR, REJECTS_DIR) for e in out.entries(sub)}
    ledger, redo, seen, foreign, first_foreign = Ledger(), [], 0, 0, ""
    for uri, record in records_of(out):
        seen += 1
        problem = check_against_plan(uri, record, plan, keys) if plan is not None else None
        if problem:
            foreign, first_foreign = foreign + 1, first_foreign or problem  # the first is named, the rest counted
            continue
        unit = record["unit"]
        wrong = {k: (v, sizes.get(k)) for k, v in record.get("sizes", {}).items() if sizes.get(k) != v}
        if not wrong or bounds is None or not bounds[0] <= unit < bounds[1]:
            ledger.add(record)
            continue
        redo.append({"unit": unit, "files": {k: {"committed_bytes": v, "found_bytes": found}
                                             for k, (v, found) in wrong.items()}})
    if foreign:
        raise foreign_records(first_foreign, foreign, seen, plan, replanned)
    for damaged in redo:
        out.remove(record_file(damaged["unit"]))
    return ledger, redo


def foreign_records(first: str, count: int, seen: int, plan: Plan, replanned: bool) -> CorruptStateError:
    """The error for COUNT of SEEN records that are no record of a unit of PLAN (FIRST: what is wrong with one)."""
    if replanned:
        return CorruptStateError(
            f"OUTPUT's plan.json is missing, and the plan made again ({plan.unit_count} units of input.unit_rows="
            f"{plan.meta['unit_rows']}) does not match {count} of its {seen} completion records (e.g. {first}): the "
            "records were committed under another plan. Re-run with the input, input.unit_rows and input.limit of "
            "the run that made them, or use --overwrite to start again")
    return CorruptStateError(f"{first}{f' (and {count - 1} more records)' if count > 1 else ''}. {REDO}")


def account(ledger: Ledger, plan_inputs: int, units: int) -> dict[str, Any]:
    """The manifest's counts from LEDGER (every unit committed in OUTPUT, by any run or slice): each
    unit's rows + rejects == its inputs, and, once every unit is done, the units' inputs == the plan's."""
    done = len(ledger.done)
    return {**{k: ledger.totals[k] for k in COUNTS},
            "by_reason": dict(sorted(ledger.by_reason.items())), "by_stage": stage_totals(ledger.by_reason),
            "units": {"total": units, "done": done, "unbalanced": ledger.unbalanced[:20]},
            "planned_inputs": plan_inputs, "complete": done == units,
            "files": ledger.files if done <= FILES_LISTED else None}


__all__ = ["FILES_LISTED", "Ledger", "account", "add_stage_figures", "check_record", "read_ledger", "records_of"]
