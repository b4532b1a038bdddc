"""Run state: one OUTPUT, its lease, its saved plan and its units' completion records.

OUTPUT holds its own state (see vesl.units and vesl.writer): `_vesl_run.json` (which input and label
config it holds), `_vesl/plan/` (the units, made once), `_vesl/units/<unit>.json` (one record per
committed unit). Nothing here reads the rows of finished outputs:

- Resume lists `_vesl/units/` and skips the units it names; a unit without a record (in flight when
  a run was killed) is redone whole, its staged parts discarded.
- Accounting (`manifest.json`: counts, the funnel, `accounted`) is summed from the records; each
  unit checked its own rows + rejects == inputs before it committed.
- Repeated image_ids were found once, when the plan was made (first occurrence by input position kept).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from vesl.core.storage import filesystem, join_uri
from vesl.core.text import describe_error
from vesl.units import STAGING_DIR, STATE_DIR, UNITS_DIR, Slice
from vesl.writer import DATA_DIR, MANIFEST, REJECTS_DIR, stage_totals, write_json_atomic

log = logging.getLogger("vesl.runstate")
RUN_STATE = "_vesl_run.json"
STRAY_DIR = f"{STATE_DIR}/stray"
LAYOUT = 2  # 1: shards per write task, resumed by reading every id back; 2: work units with completion records


class OutputConflictError(RuntimeError):
    """OUTPUT holds something a run must not write into or resume."""


BUCKET_PROTOCOLS = ("s3", "s3a", "gs", "gcs", "abfs", "az")


def check_output_target(output: str, storage_options) -> None:
    """Refuse an OUTPUT in a bucket that does not exist: fsspec would create it (s3fs's makedirs makes
    buckets), so a typo in a bucket name would silently become a new bucket."""
    from vesl.core.storage import protocol_of

    if protocol_of(output) not in BUCKET_PROTOCOLS:
        return
    fs, root = filesystem(output, storage_options)
    bucket = root.strip("/").split("/", 1)[0]
    fs.invalidate_cache(bucket)
    try:
        exists = fs.exists(bucket)
    except Exception as e:  # noqa: BLE001 - any failure to look is a refusal before the run, with its reason
        raise OutputConflictError(f"cannot check OUTPUT's bucket {bucket!r}: {describe_error(e)}") from e
    if not exists:
        raise OutputConflictError(f"OUTPUT's bucket {bucket!r} does not exist (or these credentials cannot see it); "
                                  "vesl does not create buckets: create it, or fix the name")


def take_lease(output: str, storage_options, wait_s: float = 0.0, poll_s: float = 5.0, part: Slice = Slice()):
    """This run's lease on OUTPUT (on its slice PART of it), heartbeating (vesl.lease). A live holder of
    an overlapping slice (a whole run overlaps every slice) is a LeaseHeldError, after waiting up to
    WAIT_S for it to finish or go stale; an OUTPUT this run cannot write to is an OutputConflictError;
    both before any work."""
    import time

    from vesl.errors import storage_problem
    from vesl.lease import Lease, LeaseHeldError

    deadline = time.monotonic() + wait_s
    try:
        while True:
            lease = Lease(output, storage_options, name=None if part.whole else slice_lease_name(part))
            try:
                lease.acquire()  # raises before it holds anything
                try:
                    check_overlapping_leases(output, storage_options, part, lease)
                except LeaseHeldError:
                    lease.discard()  # ours, taken a moment ago: given back untouched
                    raise
                break
            except LeaseHeldError as held:
                if time.monotonic() + poll_s > deadline:
                    raise
                log.info("waiting for the lease (output.lease_wait_s): %s", held)
                time.sleep(poll_s)
    except OSError as e:
        problem = storage_problem(e)
        raise OutputConflictError(f"cannot write to OUTPUT {output}: "
                                  f"{problem[1] if problem else 'write failed'}: {describe_error(e)}") from e
    return lease.start()


def slice_lease_name(part: Slice) -> str:
    return f"slice-{part.index}-of-{part.count}"


def check_overlapping_leases(output: str, storage_options, part: Slice, mine) -> None:
    """LeaseHeldError when a live run holds a slice of OUTPUT that overlaps PART (the whole-run lease
    overlaps everything). Every taker checks after taking its own lease, so of two overlapping runs
    that start together neither goes on unseen by the other."""
    from vesl.lease import LEASE_DIR, Lease, LeaseHeldError

    fs, root = filesystem(output, storage_options)
    folder = f"{root.rstrip('/')}/{LEASE_DIR}"
    fs.invalidate_cache(folder)
    others: list[tuple[Slice, str | None]] = [(Slice(), None)]
    for path in fs.ls(folder, detail=False) if fs.exists(folder) else []:
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("slice-") and fs.isdir(path):
            i, _, n = name[len("slice-"):].partition("-of-")
            if i.isdigit() and n.isdigit():
                others.append((Slice(int(i), int(n)), name))
    for other, name in others:
        if name == mine.name or not other.overlaps(part):
            continue
        holder = Lease(output, storage_options, name=name).live_holder()
        if holder:
            raise LeaseHeldError(
                f"{output} is being written by run {holder.get('run_id', '?')} on host {holder.get('host', '?')} "
                f"(pid {holder.get('pid', '?')}) for {'the whole input' if other.whole else 'slice ' + other.label}, "
                f"which overlaps {'the whole input' if part.whole else 'slice ' + part.label}: slices of one N never "
                "overlap; wait for it to finish")


def read_state_file(fs, path: str, uri: str) -> dict[str, Any]:
    """A JSON state file of OUTPUT; OutputConflictError naming it when it is empty or corrupt (a disk
    that filled up while it was written by an older vesl, a hand edit)."""
    try:
        with fs.open(path, "rb") as f:
            data = f.read()
        state = json.loads(data)
        if not isinstance(state, dict):
            raise ValueError(f"a JSON {type(state).__name__}, not an object")
        return state
    except (ValueError, UnicodeDecodeError) as e:
        raise OutputConflictError(
            f"{uri} is {'empty' if not data else 'corrupt'} ({e}). It records which input and label config OUTPUT "
            "holds. If OUTPUT holds a run of this same input and config, delete that file and re-run to resume; "
            "otherwise use --overwrite or another OUTPUT") from None


def prepare_output(output: str, input_uri: str, label_hash: str, on_existing: str,
                   storage_options: Mapping[str, Any] | None, part: Slice = Slice()) -> str:
    """Decide 'fresh' or 'resume' for OUTPUT and record the run state. The caller holds OUTPUT's lease
    (vesl.lease) for PART, whose folder is never counted or deleted here."""
    from vesl.lease import LEASE_DIR

    fs, root = filesystem(output, storage_options)
    root = root.rstrip("/")
    state_path = f"{root}/{RUN_STATE}"
    fs.invalidate_cache(root)
    entries = [p for p in (fs.ls(root, detail=False) if fs.exists(root) else [])
               if p.rstrip("/").rsplit("/", 1)[-1] != LEASE_DIR]
    mode = "fresh"
    if entries:
        if on_existing == "overwrite":
            if not part.whole:
                raise OutputConflictError(f"--overwrite deletes all of OUTPUT {output}, every slice's work: it is "
                                          "refused with a slice. Clear OUTPUT once before starting the slices")
            for path in entries:
                fs.rm(path, recursive=True)
        elif on_existing == "error":
            raise OutputConflictError(f"output {output} is not empty (output.on_existing=error)")
        elif not fs.exists(state_path):
            raise OutputConflictError(
                f"output {output} is not empty and holds no vesl run ({RUN_STATE} missing); "
                "choose another OUTPUT or pass --overwrite to delete what is there")
        else:
            state = read_state_file(fs, state_path, join_uri(output, RUN_STATE))
            if state.get("input") != input_uri or state.get("config_hash") != label_hash:
                raise OutputConflictError(
                    f"output {output} holds a run of {state.get('input')} with config hash {state.get('config_hash')}; "
                    f"this run is {input_uri} with config hash {label_hash}. Resuming would mix labels: "
                    "use the same input and config, another OUTPUT, or --overwrite")
            if state.get("layout", 1) != LAYOUT:
                raise OutputConflictError(
                    f"output {output} was written by a vesl older than work units (shards per write task, no "
                    "completion records); this vesl cannot resume it. Finish it with the vesl that started it, or "
                    "use --overwrite or another OUTPUT")
            mode = "resume"
    if mode == "fresh":
        fs.makedirs(root, exist_ok=True)
        write_json_atomic(fs, f"{root}/{RUN_STATE}", {"input": input_uri, "config_hash": label_hash, "layout": LAYOUT,
                                                      "run_id": uuid.uuid4().hex[:8],
                                                      "created_at": dt.datetime.now(dt.timezone.utc).isoformat()})
    return mode


def records_of(output: str, storage_options, skip: set[int] | frozenset = frozenset()) -> Iterator[dict[str, Any]]:
    """The completion records of OUTPUT (but those of the units in SKIP), read in batches (fsspec's `cat`
    of many paths: concurrent GETs on S3)."""
    fs, root = filesystem(output, storage_options)
    folder = f"{root.rstrip('/')}/{UNITS_DIR}"
    fs.invalidate_cache(folder)
    if not fs.exists(folder):
        return
    names = (p.rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False))
    paths = sorted(f"{folder}/{n}" for n in names if n.endswith(".json") and n[:-5].isdigit()
                   and int(n[:-5]) not in skip)
    for start in range(0, len(paths), RECORD_BATCH):
        batch = paths[start:start + RECORD_BATCH]
        for path, data in sorted(fs.cat(batch).items()):
            try:
                yield json.loads(data)
            except ValueError as e:
                raise CorruptOutputError(f"{path}: a completion record that is not JSON ({e}). Delete it and re-run: "
                                         "its unit is redone") from None


RECORD_BATCH = 1000
FILES_LISTED = 10_000  # the manifest lists every file up to this many units (the records always do)


@dataclass
class Ledger:
    """What OUTPUT's completion records add up to, as running totals: the driver keeps the unit ids and
    sums, never the records (and the file list only up to FILES_LISTED units)."""

    done: set[int] = field(default_factory=set)
    totals: Counter = field(default_factory=Counter)
    by_reason: Counter = field(default_factory=Counter)
    unbalanced: list[int] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def add(self, record: Mapping[str, Any]) -> None:
        self.done.add(int(record["unit"]))
        for key in ("inputs", "rows", "rejects", "regions", "phrases"):
            self.totals[key] += int(record.get(key, 0))
        self.by_reason.update(record.get("by_reason", {}))
        if record.get("rows", 0) + record.get("rejects", 0) != record.get("inputs"):
            self.unbalanced.append(int(record["unit"]))
        if len(self.done) <= FILES_LISTED:
            self.files += record.get("files", [])

    def catch_up(self, output: str, storage_options) -> "Ledger":
        """Add the records committed since this ledger was read (this run's, other slices')."""
        for record in records_of(output, storage_options, skip=self.done):
            self.add(record)
        return self


def read_ledger(output: str, storage_options, bounds: tuple[int, int] | None = None) -> tuple[Ledger, list[dict]]:
    """(OUTPUT's ledger, the units to redo because their files do not match their record). A record
    whose shard or rejects file is missing, or of another size than it committed (truncated, replaced),
    is removed when its unit is in [BOUNDS) (this run's): the unit is then redone whole. One listing of
    data/ and rejects/ and one read of each record; no rows are read."""
    fs, root = filesystem(output, storage_options)
    root = root.rstrip("/")
    sizes: dict[str, int] = {}
    for sub in (DATA_DIR, REJECTS_DIR):
        fs.invalidate_cache(f"{root}/{sub}")
        if fs.exists(f"{root}/{sub}"):
            sizes.update({f"{sub}/{e['name'].rstrip('/').rsplit('/', 1)[-1]}": e["size"]
                          for e in fs.ls(f"{root}/{sub}", detail=True)})
    ledger, redo = Ledger(), []
    for record in records_of(output, storage_options):
        unit = int(record["unit"])
        wrong = {k: (v, sizes.get(k)) for k, v in record.get("sizes", {}).items() if sizes.get(k) != v}
        if not wrong or bounds is None or not bounds[0] <= unit < bounds[1]:
            ledger.add(record)
            continue
        fs.rm(f"{root}/{UNITS_DIR}/{unit:09d}.json")
        redo.append({"unit": unit, "files": {k: {"committed_bytes": v, "found_bytes": found}
                                             for k, (v, found) in wrong.items()}})
    return ledger, redo


def clean_staging(output: str, storage_options, bounds: tuple[int, int]) -> int:
    """Remove the staged parts of the units in [BOUNDS) (this run's own: no other run owns them while
    it holds their lease). Returns how many units had some."""
    fs, root = filesystem(output, storage_options)
    folder = f"{root.rstrip('/')}/{STAGING_DIR}"
    fs.invalidate_cache(folder)
    if not fs.exists(folder):
        return 0
    cleaned = 0
    for path in fs.ls(folder, detail=False):
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if name.isdigit() and bounds[0] <= int(name) < bounds[1]:
            fs.rm(path, recursive=True)
            cleaned += 1
    return cleaned


def drop_empty_staging(output: str, storage_options) -> None:
    """Remove `_vesl/staging/` when no unit has parts there (after a run, so a finished OUTPUT has none)."""
    fs, root = filesystem(output, storage_options)
    folder = f"{root.rstrip('/')}/{STAGING_DIR}"
    fs.invalidate_cache(folder)
    try:
        if fs.exists(folder) and not fs.ls(folder, detail=False):
            fs.rm(folder, recursive=True)
    except OSError:  # another slice staged a part meanwhile: it stays
        pass


def move_strays(output: str, storage_options, units: int) -> dict[str, Any] | None:
    """Move out of data/ and rejects/ every Parquet file that is not a unit's (`part-<unit>.parquet`
    of a unit of the plan): a file copied in by hand, or left by a vesl older than work units. They go
    to `_vesl/stray/`, so readers of data/ see each image once. Returns what moved, or None."""
    fs, root = filesystem(output, storage_options)
    root = root.rstrip("/")
    moved = []
    for sub in (DATA_DIR, REJECTS_DIR):
        for fs_, path in parquet_files(output, sub, storage_options):
            name = path.rsplit("/", 1)[-1]
            stem = name[len("part-"):-len(".parquet")] if name.startswith("part-") else ""
            if stem.isdigit() and len(stem) == 9 and int(stem) < units:
                continue
            target = f"{root}/{STRAY_DIR}/{sub}/{name}"
            fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            fs.mv(path, target)
            moved.append(join_uri(output, sub, name))
    if not moved:
        return None
    return {"stray_files": moved, "moved_to": join_uri(output, STRAY_DIR)}


class CorruptOutputError(OutputConflictError):
    """A file in OUTPUT's data/ or rejects/ cannot be read."""


def parquet_files(output: str, subdir: str, storage_options) -> list[tuple[Any, str]]:
    """(filesystem, path) of OUTPUT/SUBDIR's Parquet files, sorted, from a fresh listing: fsspec
    filesystems (s3fs) cache listings per instance, and other processes (this run's write tasks, an
    earlier run) have written since."""
    fs, root = filesystem(output, storage_options)
    folder = f"{root.rstrip('/')}/{subdir}"
    fs.invalidate_cache(folder)
    if not fs.exists(folder):
        return []
    return [(fs, p) for p in sorted(fs.ls(folder, detail=False)) if p.endswith(".parquet")]


def account(ledger: Ledger, plan_inputs: int, units: int) -> dict[str, Any]:
    """The manifest's counts from LEDGER (every unit committed in OUTPUT, by any run or slice): each
    unit's rows + rejects == its inputs, and, once every unit is done, the units' inputs == the plan's."""
    done = len(ledger.done)
    return {**{k: ledger.totals[k] for k in ("inputs", "rows", "rejects", "regions", "phrases")},
            "by_reason": dict(sorted(ledger.by_reason.items())), "by_stage": stage_totals(ledger.by_reason),
            "units": {"total": units, "done": done, "unbalanced": ledger.unbalanced[:20]},
            "planned_inputs": plan_inputs, "complete": done == units,
            "files": ledger.files if done <= FILES_LISTED else None}


def funnel(inputs: int, by_stage: Mapping[str, int], stages: list[str]) -> list[dict[str, Any]]:
    """Per stage of STAGES (the reader first), in order: how many inputs entered it, how many it
    rejected, how many went on. The last stage's `passed` must equal the number of output rows. A
    stage that rejected inputs but is not in STAGES (an OUTPUT written with other stages) comes last."""
    out, entered = [], inputs
    for stage in list(stages) + sorted(set(by_stage) - set(stages)):
        rejected = int(by_stage.get(stage, 0))
        out.append({"stage": stage, "entered": entered, "rejected": rejected, "passed": entered - rejected})
        entered -= rejected
    return out


def hash_ids(ids):
    """64-bit hashes of image ids (vesl inspect counts repeated ids from these)."""
    import numpy as np
    import pandas as pd

    return pd.util.hash_array(np.asarray(ids).astype(object), categorize=False).view(np.int64)


__all__ = ["CorruptOutputError", "MANIFEST", "OutputConflictError", "RUN_STATE", "account", "check_output_target",
           "clean_staging", "drop_empty_staging", "funnel", "move_strays",
           "parquet_files", "prepare_output", "read_ledger", "records_of", "take_lease", "Ledger"]
