"""Image folders: each image with the .txt and .json beside it."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from schemas.columns import REJECT_MESSAGE, REJECT_REASON, REJECT_STAGE
from schemas.rejects import READ_STAGE
from schemas.rejects import RejectReason as R
from vesl.annotate.sources.config import InputConfig
from vesl.annotate.sources.rows import as_text, derive_image_id, first_present
from vesl.core.storage import filesystem, open_regular
from vesl.core.text import describe_error


def _read_sidecar(uri: str | None, storage_options) -> bytes | None:
    if not uri:
        return None
    fs, path = filesystem(uri, storage_options)
    with open_regular(fs, path) as f:
        return f.read(1 << 20)  # a caption, not a payload


def folder_row(unit: Mapping[str, Any], config: InputConfig, storage_options) -> dict[str, Any]:
    """One image of a folder: its .txt beside it is the alt-text, its .json's key/url/caption (as
    img2dataset's files layout writes them) the id, source URL and alt-text when present."""
    uri = unit["uri"]
    row = {"image_id": None, "image_uri": uri, "image_bytes": None, "image_location": uri, "image_offset": None,
           "image_length": None, "alt_text": None, "ordinal": unit["index"],
           REJECT_STAGE: None, REJECT_REASON: None, REJECT_MESSAGE: None}
    try:
        meta = json.loads(_read_sidecar(unit.get("json"), storage_options) or b"{}")
        meta = meta if isinstance(meta, dict) else {}
        text = _read_sidecar(unit.get("txt"), storage_options)
    except Exception as e:  # noqa: BLE001 - a broken sidecar is that image's reject, not a crash
        return {**row, "image_id": derive_image_id(uri, None), REJECT_STAGE: READ_STAGE,
                REJECT_REASON: R.BAD_SIDECAR.value,
                REJECT_MESSAGE: f"{unit.get('json') or unit.get('txt')}: {describe_error(e)}"[:500]}
    id_key = first_present(config.id_column, list(meta))
    key = as_text(meta.get(id_key)) if id_key else None
    row["image_id"] = (key or "").strip() or derive_image_id(uri, None)
    row["alt_text"] = text.decode("utf-8", errors="replace") if text is not None else as_text(meta.get("caption"))
    return row
