"""Accounting across runs: duplicate ids, resume after a kill, counts read back from the output.

Resume is an anti-join against the output itself: every shard and rejects file is complete (written
under OUTPUT/_tmp/ and moved into place whole), so the files already in OUTPUT are the checkpoint.
A re-run of the same input with the same label config skips what they hold and processes the rest.

- Rows sharing an image_id: the first (lowest `ordinal`, its position in the input) is kept, every
  other one is rejected as `duplicate`. The rule depends on input positions only, so every run
  (and every resumed run) picks the same row.
- Done on resume: an input whose ordinal is in a rejects file, or whose image_id is in a shard and
  which is not a duplicate occurrence.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import uuid
from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from operators.base import mark_rejects
from schemas.rejects import READ_STAGE, RejectReason
from vesl.core.storage import filesystem, join_uri, modified_time
from vesl.core.text import describe_error
from vesl.writer import DATA_DIR, MANIFEST, REJECTS_DIR, TMP_DIR, stage_totals

log = logging.getLogger("vesl.runstate")
RUN_STATE = "_vesl_run.json"


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


def take_lease(output: str, storage_options, wait_s: float = 0.0, poll_s: float = 5.0):
    """This run's lease on OUTPUT, heartbeating (vesl.lease). A live holder is a LeaseHeldError (after
    waiting up to WAIT_S for it to finish or go stale); an OUTPUT this run cannot write to is an
    OutputConflictError; both before any work."""
    import time

    from vesl.errors import storage_problem
    from vesl.lease import Lease, LeaseHeldError

    lease = Lease(output, storage_options)
    deadline = time.monotonic() + wait_s
    try:
        while True:
            try:
                lease.acquire()
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


def write_state_file(fs, root: str, name: str, state: Mapping[str, Any]) -> None:
    """Write OUTPUT/NAME whole or not at all: staged under _tmp/, then moved into place."""
    tmp = f"{root}/{TMP_DIR}/{name}.{uuid.uuid4().hex}"
    fs.makedirs(f"{root}/{TMP_DIR}", exist_ok=True)
    with fs.open(tmp, "w") as f:
        json.dump(state, f, indent=1, default=str)
    fs.mv(tmp, f"{root}/{name}")


def prepare_output(output: str, input_uri: str, label_hash: str, on_existing: str,
                   storage_options: Mapping[str, Any] | None) -> str:
    """Decide 'fresh' or 'resume' for OUTPUT, clear stale staging files, record the run state. The
    caller holds OUTPUT's lease (vesl.lease), whose folder is never counted or deleted here."""
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
            mode = "resume"
            if fs.exists(f"{root}/{TMP_DIR}"):
                fs.rm(f"{root}/{TMP_DIR}", recursive=True)  # half-written files of a killed run
    if mode == "fresh":
        fs.makedirs(root, exist_ok=True)
        write_state_file(fs, root, RUN_STATE, {"input": input_uri, "config_hash": label_hash,
                                               "run_id": uuid.uuid4().hex[:8],
                                               "created_at": dt.datetime.now(dt.timezone.utc).isoformat()})
    return mode


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


def _read_columns(fs, path: str, columns: list[str]) -> pa.Table:
    try:
        with fs.open(path, "rb") as f:
            return pq.read_table(f, columns=columns)
    except (pa.ArrowInvalid, pa.ArrowException, ValueError) as e:
        raise CorruptOutputError(
            f"{path} cannot be read ({describe_error(e)}). Move it out of OUTPUT and re-run the same command: "
            "the inputs it held are processed again") from None


def completed(output: str, storage_options) -> tuple[np.ndarray, np.ndarray]:
    """(image_ids in shards, ordinals in rejects files), each sorted, for the resume anti-join."""
    ids = [_read_columns(fs, p, ["image_id"]).column("image_id")
           for fs, p in parquet_files(output, DATA_DIR, storage_options)]
    ords = [_read_columns(fs, p, ["ordinal"]).column("ordinal")
            for fs, p in parquet_files(output, REJECTS_DIR, storage_options)]
    # object arrays: fixed-width numpy strings would truncate longer ids when compared
    id_array = np.array(sorted(i for chunk in ids for i in chunk.to_pylist()), dtype=object)
    ord_array = np.sort(np.array([o for chunk in ords for o in chunk.to_pylist() if o is not None], dtype=np.int64))
    return id_array, ord_array


def hash_ids(ids: np.ndarray) -> np.ndarray:
    import pandas as pd

    return pd.util.hash_array(ids.astype(object), categorize=False).view(np.int64)


def id_hashes(table: pa.Table, keep: np.ndarray | None = None, hasher=hash_ids) -> pa.Table:
    """64-bit hashes of TABLE's image_ids (column `h`); with KEEP (sorted hashes), the rows whose
    hash is in KEEP, with their image_id and ordinal."""
    hashes = hasher(table.column("image_id").to_numpy(zero_copy_only=False))
    if keep is None:
        return pa.table({"h": hashes})
    return table.select(["image_id", "ordinal"]).filter(pa.array(is_in(list(hashes), keep)))


def find_duplicates(inputs, hasher=hash_ids) -> tuple[int, dict[str, int]]:
    """(number of inputs, {image_id: ordinal kept} for the ids that occur more than once).

    Two light passes instead of a distributed group-by (whose hash shuffle is slow to start; README,
    Performance): tasks hash the ids, the driver finds repeated hashes (8 bytes per input), and
    only the rows with a repeated hash come back with their ids (a hash collision is resolved there)."""
    chunks = [np.asarray(b["h"]) for b in inputs.map_batches(
        id_hashes, fn_kwargs={"hasher": hasher}, batch_format="pyarrow").iter_batches(batch_format="numpy",
                                                                                      batch_size=None)]
    hashes = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)
    values, counts = np.unique(hashes, return_counts=True)
    repeated = values[counts > 1]
    if not len(repeated):
        return len(hashes), {}
    seen: Counter = Counter()
    first: dict[str, int] = {}
    for batch in inputs.map_batches(id_hashes, fn_kwargs={"keep": repeated, "hasher": hasher},
                                    batch_format="pyarrow").iter_batches(batch_format="pyarrow", batch_size=None):
        for image_id, ordinal in zip(batch.column("image_id").to_pylist(), batch.column("ordinal").to_pylist()):
            seen[image_id] += 1
            first[image_id] = min(ordinal, first.get(image_id, ordinal))
    return len(hashes), {i: first[i] for i, n in seen.items() if n > 1}


def is_in(values: list, value_set: np.ndarray) -> np.ndarray:
    """Which of VALUES are in VALUE_SET, as a bool array (pyarrow's hash-based is_in)."""
    if not len(value_set) or not len(values):
        return np.zeros(len(values), dtype=bool)
    return pc.is_in(pa.array(values), value_set=pa.array(value_set)).to_numpy(zero_copy_only=False)


def plan_batch(table: pa.Table, duplicates: Mapping[str, int], done_ids: np.ndarray,
               done_ordinals: np.ndarray) -> pa.Table:
    """Mark duplicate occurrences as rejects and drop the inputs a previous run already finished."""
    ids = table.column("image_id").to_pylist()
    ordinals = table.column("ordinal").to_pylist()
    is_duplicate = [i in duplicates and o != duplicates[i] for i, o in zip(ids, ordinals)]
    table = mark_rejects(table, READ_STAGE, {
        k: (RejectReason.DUPLICATE.value,
            f"image_id {ids[k]!r} already appears at input ordinal {duplicates[ids[k]]}, which is kept")
        for k, dup in enumerate(is_duplicate) if dup})
    done = is_in(ordinals, done_ordinals) | (is_in(ids, done_ids) & ~np.asarray(is_duplicate, dtype=bool))
    return table.filter(pa.array(~done)) if done.any() else table


def _dedupe_files(output: str, subdir: str, key: str, storage_options) -> tuple[int, list[Any], list[str]]:
    """Remove from OUTPUT/SUBDIR every row whose KEY an earlier-committed row already has (commit time,
    then file name, then row order). Each changed file is rewritten whole (staged, then moved; a file
    left empty is deleted). Returns (rows removed, their keys, the files changed)."""
    files = sorted(parquet_files(output, subdir, storage_options), key=lambda fp: (modified_time(*fp) or 0.0, fp[1]))
    seen: set = set()
    removed, keys, changed = 0, [], []
    for fs, path in files:
        values = _read_columns(fs, path, [key]).column(key).to_pylist()
        drop = []
        for i, v in enumerate(values):
            if v is None:
                continue
            if v in seen:
                drop.append(i)
            else:
                seen.add(v)
        if not drop:
            continue
        removed += len(drop)
        keys += [values[i] for i in drop]
        changed.append(path)
        if len(drop) == len(values):
            fs.rm(path)
            continue
        with fs.open(path, "rb") as f:
            table = pq.read_table(f)
        mask = np.ones(len(values), dtype=bool)
        mask[drop] = False
        root = filesystem(output, storage_options)[1].rstrip("/")
        tmp = f"{root}/{TMP_DIR}/repair-{uuid.uuid4().hex}.parquet"
        fs.makedirs(f"{root}/{TMP_DIR}", exist_ok=True)
        with fs.open(tmp, "wb") as f:
            pq.write_table(table.filter(pa.array(mask)), f, compression="zstd")
        fs.mv(tmp, path)
    return removed, keys, changed


def repair_duplicates(output: str, storage_options) -> dict[str, Any] | None:
    """Make OUTPUT hold each image_id in one row and each input ordinal in one reject, keeping the
    first committed copy. Duplicates only arise when two runs wrote into one OUTPUT at once (the lease
    forbids it; this repairs an OUTPUT from before the lease, or one whose lease was broken). Returns
    what was removed, or None when nothing was."""
    rows, ids, row_files = _dedupe_files(output, DATA_DIR, "image_id", storage_options)
    rejects, ordinals, reject_files = _dedupe_files(output, REJECTS_DIR, "ordinal", storage_options)
    if not rows and not rejects:
        return None
    return {"rows_removed": rows, "image_ids": sorted(set(ids))[:20], "distinct_image_ids": len(set(ids)),
            "rejects_removed": rejects, "ordinals": sorted(set(ordinals))[:20],
            "files_changed": [join_uri(output, p.rsplit("/", 2)[-2], p.rsplit("/", 1)[-1])
                              for p in row_files + reject_files]}


def count_outputs(output: str, storage_options) -> dict[str, Any]:
    """Counts read back from every shard and rejects file in OUTPUT (all runs that wrote there)."""
    rows = regions = phrases = 0
    ids: set[str] = set()
    for fs, path in parquet_files(output, DATA_DIR, storage_options):
        table = _read_columns(fs, path, ["image_id", "phrases", "regions"])
        rows += table.num_rows
        ids.update(table.column("image_id").to_pylist())
        regions += int(pc.sum(pc.list_value_length(table.column("regions"))).as_py() or 0)
        phrases += int(pc.sum(pc.list_value_length(table.column("phrases"))).as_py() or 0)
    by_reason: Counter = Counter()
    for fs, path in parquet_files(output, REJECTS_DIR, storage_options):
        table = _read_columns(fs, path, ["stage", "reason"])
        stages, reasons = table.column("stage").to_pylist(), table.column("reason").to_pylist()
        by_reason.update(f"{s}/{r}" for s, r in zip(stages, reasons))
    return {"rows": rows, "unique_row_ids": len(ids), "rejects": sum(by_reason.values()), "regions": regions,
            "phrases": phrases, "by_stage": stage_totals(by_reason), "by_reason": dict(sorted(by_reason.items()))}


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


def output_files(output: str, storage_options) -> list[str]:
    return [join_uri(output, sub, p.rsplit("/", 1)[-1]) for sub in (DATA_DIR, REJECTS_DIR)
            for _, p in parquet_files(output, sub, storage_options)]


__all__ = ["CorruptOutputError", "MANIFEST", "OutputConflictError", "RUN_STATE", "check_output_target", "completed",
           "count_outputs", "find_duplicates", "funnel", "output_files", "parquet_files", "plan_batch",
           "prepare_output", "repair_duplicates", "take_lease", "is_in"]
