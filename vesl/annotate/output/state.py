"""Run state: which input and label config an OUTPUT holds, and putting OUTPUT right before a run.

`_vesl_run.json` records the input and the label config's hash; a run resumes only the same pair.
Before a slice's units are run, what a killed run left is cleaned up: the staged parts of its units in
flight are dropped (those units are redone whole) and files in data/ or rejects/ that are no unit's are
moved aside to `_vesl/stray/`, so readers of data/ see each image once. The caller holds OUTPUT's lease.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import time
import uuid
from typing import Any

from vesl.annotate.units import Slice
from vesl.core.outdir import (
    DATA_DIR,
    LEASE_DIR,
    MANIFEST,
    PLAN_DIR,
    REJECTS_DIR,
    RUN_STATE,
    STAGING_DIR,
    STATE_DIR,
    STRAY_DIR,
    UNITS_DIR,
    OutputDir,
    unit_file,
)
from vesl.core.storage import canonical_uri, info_mtime, is_within, protocol_of
from vesl.core.text import describe_error
from vesl.errors import CorruptStateError, OutputConflictError

log = logging.getLogger("vesl.annotate.output.state")
LAYOUT = 2  # OUTPUT's layout: work units with completion records
BUCKET_PROTOCOLS = ("s3", "s3a", "gs", "gcs", "abfs", "az")


def check_output_target(out: OutputDir) -> None:
    """Refuse an OUTPUT in a bucket that does not exist: fsspec would create it (s3fs's makedirs makes
    buckets), so a typo in a bucket name would silently become a new bucket."""
    if protocol_of(out.uri) not in BUCKET_PROTOCOLS:
        return
    bucket = out.root.strip("/").split("/", 1)[0]
    out.fs.invalidate_cache(bucket)
    try:
        exists = out.fs.exists(bucket)
    except Exception as e:  # noqa: BLE001 - any failure to look is a refusal before the run, with its reason
        raise OutputConflictError(f"cannot check OUTPUT's bucket {bucket!r}: {describe_error(e)}") from e
    if not exists:
        raise OutputConflictError(f"OUTPUT's bucket {bucket!r} does not exist (or these credentials cannot see it); "
                                  "vesl does not create buckets: create it, or fix the name")


def check_apart(out: OutputDir, input_uri: str) -> None:
    """Refuse an OUTPUT that is INPUT or holds it: a run writes into OUTPUT and `--overwrite` deletes what
    a run wrote there, so the input would be read from a folder the run changes. Real locations are
    compared (`canonical_uri`: absolute, symlinks resolved), not the strings given. An OUTPUT inside a
    folder input is fine: the input's listing leaves it out."""
    where, inside = canonical_uri(input_uri), canonical_uri(out.uri)
    if is_within(where, inside):
        relation = "is" if where == inside else "contains"
        raise OutputConflictError(
            f"OUTPUT {out.uri} {relation} the input {input_uri} ({where}): a run writes into OUTPUT (and "
            "--overwrite deletes what a run wrote there). Choose an OUTPUT outside the input")


OURS = (DATA_DIR, REJECTS_DIR, MANIFEST, RUN_STATE, STATE_DIR)  # what a run writes at OUTPUT's top (and _lease/)
STAGED_NAME = re.compile(r"^\.(.+)\.[0-9a-f]{8}$")  # `OutputDir.staged_path`: a write that never landed


def run_entries(names: list[str]) -> list[str]:
    """Which of NAMES (OUTPUT's top level, _lease/ excepted) a vesl run wrote: its folders and files, and
    staged copies of its files that an interrupted write left."""
    def ours(name: str) -> bool:
        staged = STAGED_NAME.match(name)
        return name in OURS or (staged is not None and staged.group(1) in OURS)

    return [n for n in names if ours(n)]


def read_run_state(out: OutputDir) -> dict[str, Any]:
    """OUTPUT's `_vesl_run.json`; an error naming it, with what to do, when it cannot be read."""
    try:
        return out.read_json(RUN_STATE, what="run state file")
    except CorruptStateError as e:
        raise CorruptStateError(
            f"{e}. It records which input and label config OUTPUT holds. If OUTPUT holds a run of this same input "
            "and config, delete that file and re-run to resume; otherwise use --overwrite or another OUTPUT") from None


def prepare_output(out: OutputDir, input_uri: str, label_hash: str, on_existing: str, part: Slice = Slice()) -> str:
    """Decide 'fresh' or 'resume' for OUTPUT and record the run state. The caller holds OUTPUT's lease
    for PART, whose folder is never counted or deleted here."""
    entries = [name for name in out.names() if name != LEASE_DIR]
    if entries and on_existing == "overwrite":
        overwrite(out, entries, part)
    elif entries:
        check_resumable(out, input_uri, label_hash, on_existing)
        return "resume"
    out.makedirs()
    out.write_json({"input": input_uri, "config_hash": label_hash, "layout": LAYOUT, "run_id": uuid.uuid4().hex[:8],
                    "created_at": dt.datetime.now(dt.timezone.utc).isoformat()}, RUN_STATE)
    return "fresh"


def overwrite(out: OutputDir, entries: list[str], part: Slice) -> None:
    """`--overwrite`: delete what a vesl run wrote in OUTPUT (ENTRIES: its top level), and nothing else. An
    OUTPUT that holds no vesl run is refused: what it holds is somebody else's."""
    if not part.whole:
        raise OutputConflictError(f"--overwrite deletes all of OUTPUT {out.uri}, every slice's work: it is "
                                  "refused with a slice. Clear OUTPUT once before starting the slices")
    if RUN_STATE not in entries and STATE_DIR not in entries:
        raise OutputConflictError(
            f"output {out.uri} is not empty and holds no vesl run ({RUN_STATE} missing): it holds "
            f"{', '.join(entries[:5])}{', ...' if len(entries) > 5 else ''}. --overwrite deletes only what a vesl run "
            "wrote: choose a new or empty OUTPUT")
    ours = run_entries(entries)
    for name in ours:
        out.remove(name, recursive=True)
    kept = sorted(set(entries) - set(ours))
    if kept:
        log.warning("--overwrite kept what no vesl run wrote in OUTPUT %s: %s", out.uri, kept[:10])


def check_resumable(out: OutputDir, input_uri: str, label_hash: str, on_existing: str) -> None:
    """Refuse to resume an OUTPUT that is not empty unless it holds a run of this input and label config."""
    if on_existing == "error":
        raise OutputConflictError(f"output {out.uri} is not empty (output.on_existing=error)")
    if not out.exists(RUN_STATE):
        raise OutputConflictError(f"output {out.uri} is not empty and holds no vesl run ({RUN_STATE} missing); "
                                  "choose another OUTPUT or pass --overwrite to delete what is there")
    state = read_run_state(out)
    if canonical_uri(str(state.get("input"))) != canonical_uri(input_uri) or state.get("config_hash") != label_hash:
        raise OutputConflictError(
            f"output {out.uri} holds a run of {state.get('input')} with config hash {state.get('config_hash')}; "
            f"this run is {input_uri} with config hash {label_hash}. Resuming would mix labels: "
            "use the same input and config, another OUTPUT, or --overwrite")
    if state.get("layout") != LAYOUT:
        raise OutputConflictError(
            f"output {out.uri} has OUTPUT layout {state.get('layout')!r}, which this vesl (layout {LAYOUT}: work "
            "units with completion records) cannot resume. Use --overwrite or another OUTPUT")


def clean_staging(out: OutputDir, bounds: tuple[int, int]) -> int:
    """Remove the staged parts of the units in [BOUNDS) (this run's own: no other run owns them while
    it holds their lease). Returns how many units had some."""
    cleaned = 0
    for name in out.names(STAGING_DIR):
        if name.isdigit() and bounds[0] <= int(name) < bounds[1]:
            out.remove(STAGING_DIR, name, recursive=True)
            cleaned += 1
    return cleaned


UNIT_TEMP = re.compile(r"^\.(?:part-)?(\d{9})\.(?:parquet|json)\.[0-9a-f]{8}$")  # a unit's shard / record, staged
TEMP_FOLDERS = ("", DATA_DIR, REJECTS_DIR, UNITS_DIR, PLAN_DIR)


def remove_leftovers(out: OutputDir, bounds: tuple[int, int], stale_s: float) -> list[str]:
    """Remove the temporary files that interrupted writes left (`.NAME.<hex>`, `OutputDir.staged_path`): a
    unit's in [BOUNDS) (this run holds their lease: nobody else writes them), any other once older than
    STALE_S (a write in flight, e.g. another slice's manifest, is never that old). Returns their URIs."""
    now, removed = time.time(), []
    for folder in TEMP_FOLDERS:
        for entry in out.entries(folder):
            name = entry["name"]
            if entry.get("type") == "directory" or not STAGED_NAME.match(name):
                continue
            unit = UNIT_TEMP.match(name)
            mtime = info_mtime(entry)
            ours = unit is not None and bounds[0] <= int(unit.group(1)) < bounds[1]
            if ours or (unit is None and mtime is not None and now - mtime > stale_s):
                out.remove(folder, name)
                removed.append(out.uri_of(folder, name))
    return removed


def drop_empty_staging(out: OutputDir) -> None:
    """Remove `_vesl/staging/` when no unit has parts there (after a run, so a finished OUTPUT has none)."""
    try:
        if out.exists(STAGING_DIR) and not out.names(STAGING_DIR):
            out.remove(STAGING_DIR, recursive=True)
    except OSError:  # another slice staged a part meanwhile: it stays
        pass


def move_strays(out: OutputDir, units: int) -> dict[str, Any] | None:
    """Move out of data/ and rejects/ every Parquet file that is not a unit's (`part-<unit>.parquet` of a
    unit of the plan), e.g. a file copied in by hand. They go to `_vesl/stray/`, so readers of data/ see
    each image once. Returns what moved, or None."""
    moved = []
    for sub in (DATA_DIR, REJECTS_DIR):
        for path in out.parquet_files(sub):
            name = path.rsplit("/", 1)[-1]
            if _is_unit_file(name, units):
                continue
            out.move(f"{sub}/{name}", f"{STRAY_DIR}/{sub}/{name}")
            moved.append(out.uri_of(sub, name))
    if not moved:
        return None
    return {"stray_files": moved, "moved_to": out.uri_of(STRAY_DIR)}


def _is_unit_file(name: str, units: int) -> bool:
    """Whether NAME is the file of one of the plan's UNITS (`unit_file`)."""
    stem = name.removeprefix("part-").removesuffix(".parquet")
    return stem.isdigit() and int(stem) < units and name == unit_file(int(stem))


__all__ = ["LAYOUT", "check_apart", "check_output_target", "clean_staging", "drop_empty_staging", "move_strays",
           "prepare_output", "read_run_state", "remove_leftovers"]
