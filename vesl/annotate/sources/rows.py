"""Rows of INPUT_SCHEMA: image_id, image_uri, image_bytes, the image's location, alt_text, ordinal (plus the
reject columns, set when an input cannot even be read), from whatever names and types a source gives."""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from collections.abc import Iterator, Mapping
from typing import Any

import pyarrow as pa

from schemas.columns import INPUT_SCHEMA, LOCATION_COLUMNS, REJECT_MESSAGE, REJECT_REASON, REJECT_STAGE
from schemas.rejects import READ_STAGE
from schemas.rejects import RejectReason as R
from vesl.annotate.sources.config import InputConfig
from vesl.core.storage import join_uri, protocol_of

ORDINAL_FILE_SHIFT = 32
MAX_URI_CHARS = 8192  # longer "URIs" are data pasted into the wrong column, not places to fetch from
READ_ERROR, READ_REASON, SOURCE = "__vesl_read_error__", "__vesl_read_reason__", "__vesl_source__"


def derive_image_id(uri: str | None, data: bytes | None, row: Mapping[str, Any] | None = None) -> str:
    """A stable id when the input has none: a hash of the source URI, else of the bytes."""
    if uri:
        payload = b"uri:" + uri.encode()
    elif data:
        payload = b"bytes:" + data
    else:
        payload = b"row:" + json.dumps(row or {}, sort_keys=True, default=str).encode()
    return hashlib.sha256(payload).hexdigest()[:32]


def first_present(names: list[str], available: list[str]) -> str | None:
    return next((n for n in names if n in available), None)


def as_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def resolve_image_uri(value: str | None, base: str) -> str | None:
    """Manifest paths without a scheme are relative to the manifest's folder."""
    if not value:
        return None
    value = value.strip()
    if "://" in value or posixpath.isabs(value):
        return value
    return join_uri(base, value)


def no_location() -> dict[str, None]:
    """The location columns of a row whose image has no place to be read again from (yet)."""
    return dict.fromkeys(LOCATION_COLUMNS)


def location_of(uri: str | None) -> str | None:
    """URI as an image location: a file on any storage (local, s3://, gs://, ...); a web URL is where the
    image came from, not a place vesl can trust to read it again (null: the decode stage embeds it)."""
    if not uri or protocol_of(uri) in ("http", "https"):
        return None
    return uri


def upstream_failure(status: Any, message: Any) -> tuple[str | None, str | None]:
    """(reject message, reason) for an img2dataset status that is not a success, else (None, None).
    The reason is img2dataset's own status (failed_to_download, failed_to_resize, ...)."""
    status = as_text(status)
    if status is None or status.strip() in ("", "success"):
        return None, None
    reason = re.sub(r"[^a-z0-9_]+", "_", status.strip().lower())[:48] or "upstream_failed"
    return f"img2dataset {status}: {as_text(message) or 'no error message'}"[:500], reason


def normalize_rows(rows: list[Mapping[str, Any]], ordinals: list[int], config: InputConfig, base: str) -> pa.Table:
    """Map manifest rows (whatever their column names and value types) onto INPUT_SCHEMA.

    A row given as {READ_ERROR: message} (a line that is not JSON, say) becomes a 'read' reject."""
    out: dict[str, list] = {f.name: [] for f in INPUT_SCHEMA}
    for row, ordinal in zip(rows, ordinals):
        names = list(row)
        error = row.get(READ_ERROR)
        image_col, bytes_col = first_present(config.image_column, names), first_present(config.bytes_column, names)
        id_col, alt_col = first_present(config.id_column, names), first_present(config.alt_text_column, names)
        image = row.get(image_col) if image_col else None
        data = row.get(bytes_col) if bytes_col else None
        if isinstance(image, (bytes, bytearray, memoryview)):  # an `image` column of encoded bytes, not a path
            data, image = (data if data is not None else image), None
        uri = resolve_image_uri(as_text(image), base)
        data = bytes(data) if isinstance(data, (bytes, bytearray, memoryview)) else None
        given = as_text(row.get(id_col)) if id_col else None
        given = given.strip() if given else ""
        if error is None and config.status_column in row and config.error_column in row:
            error, reason = upstream_failure(row.get(config.status_column), row.get(config.error_column))
            row = {**row, READ_REASON: reason} if error is not None else row
        if error is None and uri is not None and len(uri) > MAX_URI_CHARS:
            error, row = (f"an image URI of {len(uri)} characters (more than {MAX_URI_CHARS}): {uri[:200]}…",
                          {**row, READ_REASON: R.BAD_URI.value})
            uri = uri[:MAX_URI_CHARS]
        if error is not None:
            uri = uri or row.get(SOURCE)
            given = given or derive_image_id(f"{row.get(SOURCE)}#{ordinal}", None)
        out["image_id"].append(given or derive_image_id(uri, data, {k: v for k, v in row.items() if k != bytes_col}))
        out["image_uri"].append(uri)
        out["image_bytes"].append(data)
        out["image_location"].append(location_of(uri) if error is None else None)
        out["image_offset"].append(None)
        out["image_length"].append(None)
        out["alt_text"].append(as_text(row.get(alt_col)) if alt_col else None)
        out["ordinal"].append(ordinal)
        out[REJECT_STAGE].append(READ_STAGE if error is not None else None)
        out[REJECT_REASON].append(row.get(READ_REASON, R.BAD_MANIFEST_ROW.value) if error is not None else None)
        out[REJECT_MESSAGE].append(error)
    return pa.table(out, schema=INPUT_SCHEMA)


def bad_row(uri: str, where: str, error: Any) -> dict[str, Any]:
    return {READ_ERROR: f"{uri} {where}: {error}"[:500], SOURCE: uri}


def chunk_tables(rows: Iterator[dict[str, Any]], chunk_rows: int) -> Iterator[pa.Table]:
    chunk: list[dict[str, Any]] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= chunk_rows:
            yield pa.Table.from_pylist(chunk, schema=INPUT_SCHEMA)
            chunk = []
    if chunk:
        yield pa.Table.from_pylist(chunk, schema=INPUT_SCHEMA)


def reject_row(image_id: str, uri: str | None, ordinal: int, reason: str, message: str,
                alt_text: str | None = None) -> dict[str, Any]:
    return {"image_id": image_id, "image_uri": uri, "image_bytes": None, **no_location(), "alt_text": alt_text,
            "ordinal": ordinal,
            REJECT_STAGE: READ_STAGE, REJECT_REASON: reason, REJECT_MESSAGE: message[:500]}
