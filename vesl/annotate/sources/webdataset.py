"""WebDataset tars: KEY.jpg (or png/webp) + KEY.txt + KEY.json, streamed one sample at a time."""

from __future__ import annotations

import json
import posixpath
import tarfile
from collections.abc import Iterator, Mapping
from typing import Any

from schemas.columns import REJECT_MESSAGE, REJECT_REASON, REJECT_STAGE
from schemas.rejects import READ_STAGE
from schemas.rejects import RejectReason as R
from vesl.annotate.sources.config import IMAGE_SUFFIXES
from vesl.annotate.sources.rows import as_text, derive_image_id, no_location
from vesl.core.storage import filesystem, open_regular
from vesl.core.text import describe_error


def _webdataset_row(tar_uri: str, key: str, parts: Mapping[str, bytes], image_suffixes: tuple[str, ...],
                    spans: Mapping[str, tuple[int, int]] | None = None) -> dict[str, Any]:
    """One sample's row. SPANS (suffix -> the member's data offset and length in the tar file; None for a
    compressed tar, where offsets are not file offsets) give the image's location for a ranged read."""
    meta: dict[str, Any] = {}
    if "json" in parts:
        try:
            meta = json.loads(parts["json"])
        except ValueError:
            meta = {}
        meta = meta if isinstance(meta, dict) else {}
    image_suffix = next((s.lstrip(".") for s in image_suffixes if s.lstrip(".") in parts), None)
    alt = parts["txt"].decode("utf-8", errors="replace") if "txt" in parts else as_text(meta.get("caption"))
    row = {"image_id": as_text(meta.get("key")) or posixpath.basename(key),
           "image_uri": as_text(meta.get("url")) or f"{tar_uri}#{key}.{image_suffix or 'jpg'}",
           "image_bytes": parts.get(image_suffix) if image_suffix else None, "alt_text": alt,
           **no_location(), REJECT_STAGE: None, REJECT_REASON: None, REJECT_MESSAGE: None}
    if image_suffix is not None and spans and image_suffix in spans:
        offset, length = spans[image_suffix]
        row.update(image_location=tar_uri, image_offset=offset, image_length=length)
    if image_suffix is None:
        row.update({REJECT_STAGE: READ_STAGE, REJECT_REASON: R.MISSING_IMAGE.value,
                    REJECT_MESSAGE: f"sample {key!r} in {tar_uri} has no image member"})
    return row


def iter_webdataset(tar_uri: str, storage_options: Mapping[str, Mapping[str, Any]] | None,
                    image_suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> Iterator[dict[str, Any]]:
    """Rows of an img2dataset tar: KEY.jpg (or another image suffix) + KEY.txt + KEY.json.

    The tar is streamed, one sample at a time (a sample's members are consecutive, as img2dataset
    and webdataset write them). A key with no image becomes a 'missing_image' reject. A tar that
    breaks off becomes an 'unreadable_shard' reject for the shard, and one for the sample it broke in.
    An uncompressed tar's rows carry their image member's byte range (`image_location`, `image_offset`,
    `image_length`), so the image is read again by one ranged read."""
    key, parts, spans = None, {}, {}
    try:
        fs, path = filesystem(tar_uri, storage_options)
        with open_regular(fs, path) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            plain = getattr(tar.fileobj, "comptype", None) == "tar"  # offsets in a compressed tar are not file offsets
            for member in tar:
                name_key, _, suffix = member.name.rpartition(".")
                if not member.isfile() or not name_key:
                    continue
                if name_key != key:
                    if key is not None:
                        yield _webdataset_row(tar_uri, key, parts, image_suffixes, spans if plain else None)
                    key, parts, spans = name_key, {}, {}
                parts[suffix.lower()] = tar.extractfile(member).read()
                spans[suffix.lower()] = (member.offset_data, member.size)
        if key is not None:
            yield _webdataset_row(tar_uri, key, parts, image_suffixes, spans if plain else None)
    except Exception as e:  # noqa: BLE001 - an unreadable shard is a reject, not a crash
        message = describe_error(e)[:500]
        if key is not None:
            row = _webdataset_row(tar_uri, key, parts, image_suffixes)
            row.update({REJECT_STAGE: READ_STAGE, REJECT_REASON: R.UNREADABLE_SHARD.value,
                        REJECT_MESSAGE: f"{tar_uri} broke off in this sample: {message}"})
            yield row
        yield {"image_id": derive_image_id(tar_uri, None), "image_uri": tar_uri, "image_bytes": None,
               **no_location(), "alt_text": None, REJECT_STAGE: READ_STAGE, REJECT_REASON: R.UNREADABLE_SHARD.value,
               REJECT_MESSAGE: message}
