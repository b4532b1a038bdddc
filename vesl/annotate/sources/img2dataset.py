"""img2dataset's output as it wrote it: the per-shard status tables beside its tars (webdataset layout)
or its image folders (files layout). Its failures become rejects with its status and error."""

from __future__ import annotations

import posixpath
from collections.abc import Iterator, Mapping
from typing import Any

from schemas.columns import REJECT_MESSAGE, REJECT_REASON, REJECT_STAGE
from schemas.rejects import READ_STAGE
from schemas.rejects import RejectReason as R
from vesl.annotate.sources.config import InputConfig
from vesl.annotate.sources.folder import folder_row
from vesl.annotate.sources.rows import ORDINAL_FILE_SHIFT, as_text, derive_image_id, reject_row, upstream_failure
from vesl.annotate.sources.webdataset import iter_webdataset
from vesl.core.storage import filesystem, open_regular, uri_prefix
from vesl.core.text import describe_error

STATS_SUFFIX = "_stats.json"  # img2dataset's per-shard summary, beside NNNNN.parquet
IMG2DATASET_LAYOUTS = {"webdataset": "webdataset", "manifest": "parquet", "folder": "files"}  # its output_format


def read_status_table(uri: str, config: InputConfig, storage_options) -> list[dict[str, Any]]:
    """img2dataset's per-shard status table (key, url, caption, status, error), in file order, without
    its image bytes (the parquet layout's `jpg` column is read by the manifest reader instead)."""
    import pyarrow.parquet as pq

    fs, path = filesystem(uri, storage_options)
    with open_regular(fs, path) as f:
        pf = pq.ParquetFile(f)
        columns = ("key", "url", "caption", config.status_column, config.error_column)
        return pf.read(columns=[c for c in columns if c in pf.schema_arrow.names]).to_pylist()


def _status_rows(status_uri: str, base: int, config: InputConfig,
                 storage_options) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(the status table's rows, []), or ([], [one reject]) when the table cannot be read."""
    try:
        return read_status_table(status_uri, config, storage_options), []
    except Exception as e:  # noqa: BLE001 - an unreadable status table is a reject, not a crash
        return [], [reject_row(derive_image_id(status_uri, None), status_uri, base + (1 << ORDINAL_FILE_SHIFT) - 1,
                                R.UNREADABLE_MANIFEST.value, f"{status_uri}: {describe_error(e)}")]


def _by_key(rows: list[dict[str, Any]]) -> dict[str | None, tuple[int, dict[str, Any]]]:
    return {as_text(r.get("key")): (k, r) for k, r in enumerate(rows)}


def _status_rejects(rows: list[dict[str, Any]], seen: set[str], base: int, config: InputConfig, where: str):
    """The status table's rows that did not become inputs: img2dataset's failures (its status as the
    reason, its error as the message), and successes whose image is not in the shard."""
    for k, row in enumerate(rows):
        key = as_text(row.get("key")) or ""
        if key in seen:
            continue
        message, reason = upstream_failure(row.get(config.status_column), row.get(config.error_column))
        if message is None:
            reason = R.MISSING_IMAGE.value
            message = f"img2dataset recorded key {key!r} as a success, but {where} has no image for it"
        yield reject_row(key or derive_image_id(f"{where}#{k}", None), as_text(row.get("url")), base + k, reason,
                          message, as_text(row.get("caption")))


def iter_img2dataset_tar(tar_uri: str, status_uri: str, base: int, config: InputConfig,
                         storage_options) -> Iterator[dict[str, Any]]:
    """Rows of one img2dataset webdataset shard: its tar's samples (ordinal: the key's position in the
    status table), then one reject per status row without a sample (failures keep img2dataset's error)."""
    rows, unreadable = _status_rows(status_uri, base, config, storage_options)
    yield from unreadable
    by_key = _by_key(rows)
    seen: set[str] = set()
    extra = len(rows)
    for sample in iter_webdataset(tar_uri, storage_options):
        key = sample["image_id"]
        if key in by_key and key not in seen:
            position = by_key[key][0]
        else:
            position, extra = extra, extra + 1
        seen.add(key)
        yield {**sample, "ordinal": base + position}
    yield from _status_rejects(rows, seen, base, config, tar_uri)


def iter_img2dataset_files(unit: Mapping[str, Any], config: InputConfig, storage_options) -> Iterator[dict[str, Any]]:
    """Rows of one shard of img2dataset's files layout: NNNNN.parquet (the status table: key, url,
    caption, status) and NNNNN/KEY.jpg. Successes point at their image file (alt-text from the table,
    the same text as KEY.txt, without a read per image); failures and missing files are rejects;
    images the table does not list are read with their sidecars."""
    base = unit["index"] << ORDINAL_FILE_SHIFT
    rows, unreadable = _status_rows(unit["status"], base, config, storage_options)
    yield from unreadable
    by_key = _by_key(rows)
    fs, folder = filesystem(unit["folder"], storage_options)
    prefix = uri_prefix(unit["folder"])
    listing = sorted(fs.find(folder)) if fs.exists(folder) else []
    by_stem: dict[str, dict[str, str]] = {}
    for path in listing:
        stem, suffix = posixpath.splitext(posixpath.basename(path))
        by_stem.setdefault(stem, {})[suffix.lower()] = prefix + path
    exts = tuple(e.lower() for e in config.image_extensions)
    seen: set[str] = set()
    for key, (position, row) in by_key.items():
        files = by_stem.get(key or "", {})
        image = next((files[e] for e in exts if e in files), None)
        if image is None or upstream_failure(row.get(config.status_column), row.get(config.error_column))[0]:
            continue  # a reject below
        seen.add(key)
        out = {"image_id": key, "image_uri": as_text(row.get("url")) or image, "image_bytes": None,
               "image_location": image, "image_offset": None, "image_length": None,
               "alt_text": as_text(row.get("caption")), "ordinal": base + position,
               REJECT_STAGE: None, REJECT_REASON: None, REJECT_MESSAGE: None}
        try:  # read here, like the tar and parquet layouts, so image_uri can keep the source URL
            fs_image, image_path = filesystem(image, storage_options)
            with open_regular(fs_image, image_path) as f:
                out["image_bytes"] = f.read()
        except Exception as e:  # noqa: BLE001 - one unreadable file is that image's reject
            out.update({REJECT_STAGE: READ_STAGE, REJECT_REASON: R.UNREADABLE_FILE.value,
                        REJECT_MESSAGE: f"{image}: {describe_error(e)}"[:500]})
        yield out
    extra = len(rows)
    for stem, files in by_stem.items():
        image = next((files[e] for e in exts if e in files), None)
        if image is None or stem in by_key:
            continue
        yield folder_row({"uri": image, "txt": files.get(".txt"), "json": files.get(".json"), "index": base + extra},
                          config, storage_options)
        extra += 1
    yield from _status_rejects(rows, seen, base, config, unit["folder"])
