"""Batch plumbing every stage shares: columnar batches, reject marking, per-row fault isolation.

pyarrow is imported where a batch is handled, not at import time, so the model operators can be
driven directly (`detect`, `caption_images`) on a machine with only torch and transformers.

A batch is a `pyarrow.Table` (Ray Data's `batch_format="pyarrow"`) or a dict of numpy arrays
(converted on entry). A stage never raises on a bad row: it writes the row's `reject_stage`,
`reject_reason` and `reject_message`, and later stages pass rejected rows through untouched.
"""

from __future__ import annotations

import re
import time
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:  # pyarrow is imported where a batch is handled, not at import time
    import pyarrow as pa

REJECT_STAGE, REJECT_REASON, REJECT_MESSAGE = "reject_stage", "reject_reason", "reject_message"
REJECT_COLUMNS = (REJECT_STAGE, REJECT_REASON, REJECT_MESSAGE)
# Reject messages are capped so one hostile input cannot bloat the rejects file.
MAX_MESSAGE_CHARS = 500


class StageConfig(BaseModel):
    """Base of every stage config: frozen, unknown keys refused."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())


def as_table(batch: pa.Table | Mapping[str, Any]) -> pa.Table:
    """Accept a pyarrow Table or a dict of columns (numpy arrays or lists)."""
    import pyarrow as pa

    if isinstance(batch, pa.Table):
        table = batch
    else:
        table = pa.table({k: (v.tolist() if isinstance(v, np.ndarray) and v.dtype == object else v)
                          for k, v in batch.items()})
    for name in REJECT_COLUMNS:
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows, pa.string()))
    return table


def put_column(table: pa.Table, name: str, values: Sequence[Any] | pa.Array, type: pa.DataType) -> pa.Table:
    """Set column NAME (replacing it if present) with an explicit Arrow type."""
    import pyarrow as pa

    array = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values, type=type)
    if array.type != type:
        array = array.cast(type)
    index = table.schema.get_field_index(name)
    if index >= 0:
        return table.set_column(index, name, array)
    return table.append_column(name, array)


def pending_rows(table: pa.Table) -> list[int]:
    """Indices of the rows no stage has rejected yet."""
    return [i for i, stage in enumerate(table.column(REJECT_STAGE).to_pylist()) if stage is None]


def mark_rejects(table: pa.Table, stage: str, rejects: Mapping[int, tuple[str, str]]) -> pa.Table:
    """Reject rows: {row index: (reason, message)}; rows already rejected keep their first reason."""
    import pyarrow as pa

    if not rejects:
        return table
    stages = table.column(REJECT_STAGE).to_pylist()
    reasons = table.column(REJECT_REASON).to_pylist()
    messages = table.column(REJECT_MESSAGE).to_pylist()
    for i, (reason, message) in rejects.items():
        if stages[i] is None:
            stages[i], reasons[i], messages[i] = stage, reason, (message or "")[:MAX_MESSAGE_CHARS]
    for name, values in ((REJECT_STAGE, stages), (REJECT_REASON, reasons), (REJECT_MESSAGE, messages)):
        table = put_column(table, name, values, pa.string())
    return table


_SPACE = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """Control and format characters (NUL, bidi overrides, ...) become spaces; whitespace runs collapse."""
    text = "".join(" " if unicodedata.category(c)[0] == "C" else c for c in text)
    return _SPACE.sub(" ", text).strip()


_OBJECT_REPR = re.compile(r"\s*<[\w.]+ object at 0x[0-9a-fA-F]+>")


def describe_error(error: BaseException) -> str:
    """'Type: message' for a reject or a log line, without object reprs ('<_io.BytesIO object at
    0x7f...>' says nothing to a reader and differs on every run)."""
    return f"{type(error).__name__}: {_OBJECT_REPR.sub('', str(error))}"


def run_isolating_rows(
    rows: Sequence[int],
    fn: Callable[[Sequence[int]], dict[int, Any]],
) -> tuple[dict[int, Any], dict[int, tuple[str, str]]]:
    """Run FN on all ROWS at once; if it raises, run it on each row alone.

    Returns (results by row, rejects by row): one bad row costs one reject, never the batch.
    """
    if not rows:
        return {}, {}
    try:
        return fn(rows), {}
    except Exception as batch_error:  # noqa: BLE001 - any model failure falls back to per-row
        if len(rows) == 1:
            return {}, {rows[0]: ("model_error", describe_error(batch_error))}
    results: dict[int, Any] = {}
    rejects: dict[int, tuple[str, str]] = {}
    for row in rows:
        try:
            results.update(fn([row]))
        except Exception as row_error:  # noqa: BLE001
            rejects[row] = ("model_error", describe_error(row_error))
    return results, rejects


class StageTimer:
    """Accumulates wall time and row counts of a stage instance (reported by benchmarks)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.rows = 0

    def __enter__(self) -> "StageTimer":
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds += time.perf_counter() - self._start


def resolve_device(device: str) -> str:
    """'auto' picks CUDA when present; anything else is passed to torch as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str, device: str):
    """'auto' is bfloat16 on CUDA and float32 elsewhere (CPU bf16 matmuls are slow here)."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def image_from_row(table: pa.Table, row: int) -> np.ndarray:
    """The decoded RGB working copy of ROW as an (H, W, 3) uint8 array (zero-copy)."""
    data = table.column("pixels")[row].as_buffer()
    h = table.column("pixel_height")[row].as_py()
    w = table.column("pixel_width")[row].as_py()
    return np.frombuffer(data, dtype=np.uint8).reshape(h, w, 3)
