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
import uuid
from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from operators.base import mark_rejects
from vesl.storage import filesystem, join_uri
from vesl.writer import DATA_DIR, MANIFEST, REJECTS_DIR, TMP_DIR, stage_totals

RUN_STATE = "_vesl_run.json"
STAGES = ("read", "decode", "caption", "phrases", "detect")


class OutputConflictError(RuntimeError):
    """OUTPUT holds something a run must not write into or resume."""


def prepare_output(output: str, input_uri: str, label_hash: str, on_existing: str,
                   storage_options: Mapping[str, Any] | None) -> str:
    """Decide 'fresh' or 'resume' for OUTPUT, clear stale staging files, record the run state."""
    fs, root = filesystem(output, storage_options)
    root = root.rstrip("/")
    state_path = f"{root}/{RUN_STATE}"
    mode = "fresh"
    if fs.exists(root) and fs.ls(root):
        if on_existing == "overwrite":
            fs.rm(root, recursive=True)
        elif on_existing == "error":
            raise OutputConflictError(f"output {output} is not empty (output.on_existing=error)")
        elif not fs.exists(state_path):
            raise OutputConflictError(
                f"output {output} is not empty and holds no vesl run ({RUN_STATE} missing); "
                "choose another OUTPUT or pass --overwrite to delete what is there")
        else:
            with fs.open(state_path, "r") as f:
                state = json.load(f)
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
        with fs.open(state_path, "w") as f:
            json.dump({"input": input_uri, "config_hash": label_hash, "run_id": uuid.uuid4().hex[:8],
                       "created_at": dt.datetime.now(dt.timezone.utc).isoformat()}, f)
    return mode


def parquet_files(output: str, subdir: str, storage_options) -> list[tuple[Any, str]]:
    fs, root = filesystem(output, storage_options)
    folder = f"{root.rstrip('/')}/{subdir}"
    if not fs.exists(folder):
        return []
    return [(fs, p) for p in sorted(fs.ls(folder, detail=False)) if p.endswith(".parquet")]


def _read_columns(fs, path: str, columns: list[str]) -> pa.Table:
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns)


def completed(output: str, storage_options) -> tuple[np.ndarray, np.ndarray]:
    """(image_ids in shards, ordinals in rejects files), each sorted, for the resume anti-join."""
    ids = [_read_columns(fs, p, ["image_id"]).column("image_id") for fs, p in parquet_files(output, DATA_DIR, storage_options)]
    ords = [_read_columns(fs, p, ["ordinal"]).column("ordinal") for fs, p in parquet_files(output, REJECTS_DIR, storage_options)]
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
    return table.select(["image_id", "ordinal"]).filter(pa.array(_isin(list(hashes), keep)))


def find_duplicates(inputs, hasher=hash_ids) -> tuple[int, dict[str, int]]:
    """(number of inputs, {image_id: ordinal kept} for the ids that occur more than once).

    Two light passes instead of a distributed group-by (whose hash shuffle alone took 7-14 s to start
    on a small cluster): tasks hash the ids, the driver finds repeated hashes (8 bytes per input), and
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


def _isin(values: list, sorted_array: np.ndarray) -> np.ndarray:
    if not len(sorted_array) or not values:
        return np.zeros(len(values), dtype=bool)
    values_array = np.empty(len(values), dtype=sorted_array.dtype)
    values_array[:] = values
    pos = np.clip(np.searchsorted(sorted_array, values_array), 0, len(sorted_array) - 1)
    return sorted_array[pos] == values_array


def plan_batch(table: pa.Table, duplicates: Mapping[str, int], done_ids: np.ndarray,
               done_ordinals: np.ndarray) -> pa.Table:
    """Mark duplicate occurrences as rejects and drop the inputs a previous run already finished."""
    ids = table.column("image_id").to_pylist()
    ordinals = table.column("ordinal").to_pylist()
    is_duplicate = [i in duplicates and o != duplicates[i] for i, o in zip(ids, ordinals)]
    table = mark_rejects(table, "read", {
        k: ("duplicate", f"image_id {ids[k]!r} already appears at input ordinal {duplicates[ids[k]]}, which is kept")
        for k, dup in enumerate(is_duplicate) if dup})
    done = _isin(ordinals, done_ordinals) | (_isin(ids, done_ids) & ~np.asarray(is_duplicate, dtype=bool))
    return table.filter(pa.array(~done)) if done.any() else table


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
        by_reason.update(f"{s}/{r}" for s, r in zip(table.column("stage").to_pylist(), table.column("reason").to_pylist()))
    return {"rows": rows, "unique_row_ids": len(ids), "rejects": sum(by_reason.values()), "regions": regions,
            "phrases": phrases, "by_stage": stage_totals(by_reason), "by_reason": dict(sorted(by_reason.items()))}


def funnel(inputs: int, by_stage: Mapping[str, int]) -> list[dict[str, Any]]:
    """Per stage, in order: how many inputs entered it, how many it rejected, how many went on.
    The last stage's `passed` must equal the number of output rows."""
    out, entered = [], inputs
    for stage in STAGES:
        rejected = int(by_stage.get(stage, 0))
        out.append({"stage": stage, "entered": entered, "rejected": rejected, "passed": entered - rejected})
        entered -= rejected
    return out


def output_files(output: str, storage_options) -> list[str]:
    return [join_uri(output, sub, p.rsplit("/", 1)[-1]) for sub in (DATA_DIR, REJECTS_DIR)
            for _, p in parquet_files(output, sub, storage_options)]


__all__ = ["MANIFEST", "OutputConflictError", "RUN_STATE", "completed", "count_outputs", "find_duplicates", "funnel",
           "output_files", "parquet_files", "plan_batch", "prepare_output"]
