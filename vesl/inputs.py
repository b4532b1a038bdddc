"""Readers: a manifest (Parquet, JSONL, CSV), img2dataset WebDataset tars, or a folder of images,
local or on any fsspec URI, into rows of INPUT_SCHEMA: image_id, image_uri, image_bytes, alt_text
(plus the reject columns, set when an input cannot even be read)."""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import tarfile
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field

from operators.base import REJECT_MESSAGE, REJECT_REASON, REJECT_STAGE, StageConfig, describe_error
from vesl.storage import filesystem, join_uri, parent_uri, protocol_of, pyarrow_filesystem

INPUT_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string()),
        pa.field("image_uri", pa.string()),
        pa.field("image_bytes", pa.large_binary()),
        pa.field("alt_text", pa.string()),
        pa.field(REJECT_STAGE, pa.string()),
        pa.field(REJECT_REASON, pa.string()),
        pa.field(REJECT_MESSAGE, pa.string()),
    ]
)
MANIFEST_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


class InputConfig(StageConfig):
    format: Literal["auto", "manifest", "webdataset", "folder"] = Field(
        default="auto",
        description="'auto': a .parquet/.jsonl/.json/.csv file (or a folder of them) is a manifest, "
        ".tar files are WebDataset shards, any other folder is a folder of images.",
    )
    id_column: list[str] = Field(default=["id", "key", "image_id"], description="Id column names, first found wins.")
    image_column: list[str] = Field(default=["image", "url", "path", "image_uri", "image_path"],
                                    description="Image path/URI column names (img2dataset: url).")
    bytes_column: list[str] = Field(default=["image_bytes", "jpg", "png", "webp", "bytes"],
                                    description="Encoded image column names (img2dataset: jpg).")
    alt_text_column: list[str] = Field(default=["alt_text", "caption", "text", "txt"],
                                       description="Alt-text column names (img2dataset: caption).")
    image_extensions: list[str] = Field(default=list(IMAGE_SUFFIXES), description="Files a folder input reads.")
    limit: int | None = Field(default=None, ge=1, description="Read only the first N inputs (smoke runs).")


def derive_image_id(uri: str | None, data: bytes | None, row: Mapping[str, Any] | None = None) -> str:
    """A stable id when the input has none: a hash of the source URI, else of the bytes."""
    if uri:
        payload = b"uri:" + uri.encode()
    elif data:
        payload = b"bytes:" + data
    else:
        payload = b"row:" + json.dumps(row or {}, sort_keys=True, default=str).encode()
    return hashlib.sha256(payload).hexdigest()[:32]


def _first(names: list[str], available: list[str]) -> str | None:
    return next((n for n in names if n in available), None)


def _text(value: Any) -> str | None:
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


def normalize_manifest_batch(table: pa.Table, config: InputConfig, base: str) -> pa.Table:
    """Map a manifest batch's columns (whatever their names and types) onto INPUT_SCHEMA."""
    names = table.column_names
    id_col, image_col = _first(config.id_column, names), _first(config.image_column, names)
    bytes_col, alt_col = _first(config.bytes_column, names), _first(config.alt_text_column, names)
    n = table.num_rows
    ids, images, blobs, alts = (table.column(c).to_pylist() if c else [None] * n
                                for c in (id_col, image_col, bytes_col, alt_col))
    out: dict[str, list] = {f.name: [] for f in INPUT_SCHEMA}
    for i in range(n):
        uri = resolve_image_uri(_text(images[i]), base)
        data = blobs[i] if isinstance(blobs[i], (bytes, bytearray)) else None
        given = _text(ids[i])
        out["image_id"].append(given.strip() if given and given.strip() else derive_image_id(uri, data))
        out["image_uri"].append(uri)
        out["image_bytes"].append(bytes(data) if data is not None else None)
        out["alt_text"].append(_text(alts[i]))
        for name in (REJECT_STAGE, REJECT_REASON, REJECT_MESSAGE):
            out[name].append(None)
    return pa.table(out, schema=INPUT_SCHEMA)


def iter_webdataset(tar_uri: str, storage_options: Mapping[str, Mapping[str, Any]] | None,
                    image_suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> Iterator[dict[str, Any]]:
    """Rows of an img2dataset tar: KEY.jpg (or another image suffix) + KEY.txt + KEY.json.

    A tar that cannot be read becomes one row rejected at stage 'read'; a key with text but no
    image becomes a 'missing_image' reject."""
    samples: dict[str, dict[str, bytes]] = {}
    order: list[str] = []
    try:
        fs, path = filesystem(tar_uri, storage_options)
        with fs.open(path, "rb") as f, tarfile.open(fileobj=io.BytesIO(f.read()), mode="r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, suffix = member.name.rpartition(".")
                if not key:
                    continue
                if key not in samples:
                    samples[key] = {}
                    order.append(key)
                samples[key][suffix.lower()] = tar.extractfile(member).read()
    except Exception as e:  # noqa: BLE001 - an unreadable shard is a reject, not a crash
        yield {"image_id": derive_image_id(tar_uri, None), "image_uri": tar_uri, "image_bytes": None,
               "alt_text": None, REJECT_STAGE: "read", REJECT_REASON: "unreadable_shard",
               REJECT_MESSAGE: describe_error(e)}
        if not order:
            return
    for key in order:
        parts = samples[key]
        meta: dict[str, Any] = {}
        if "json" in parts:
            try:
                meta = json.loads(parts["json"])
            except ValueError:
                meta = {}
        image_suffix = next((s.lstrip(".") for s in image_suffixes if s.lstrip(".") in parts), None)
        alt = parts["txt"].decode("utf-8", errors="replace") if "txt" in parts else _text(meta.get("caption"))
        row = {"image_id": _text(meta.get("key")) or posixpath.basename(key),
               "image_uri": _text(meta.get("url")) or f"{tar_uri}#{key}.{image_suffix or 'jpg'}",
               "image_bytes": parts.get(image_suffix) if image_suffix else None, "alt_text": alt,
               REJECT_STAGE: None, REJECT_REASON: None, REJECT_MESSAGE: None}
        if image_suffix is None:
            row.update({REJECT_STAGE: "read", REJECT_REASON: "missing_image",
                        REJECT_MESSAGE: f"sample {key!r} in {tar_uri} has no image member"})
        yield row


def detect_format(uri: str, storage_options: Mapping[str, Mapping[str, Any]] | None) -> tuple[str, list[str]]:
    """('manifest' | 'webdataset' | 'folder', the files it covers)."""
    fs, path = filesystem(uri, storage_options)
    if not fs.exists(path):
        raise FileNotFoundError(f"input {uri} does not exist")
    proto = protocol_of(uri)
    prefix = "" if proto == "file" else f"{proto}://"
    if fs.isdir(path):
        files = sorted(f for f in fs.find(path) if not posixpath.basename(f).startswith((".", "_")))
    else:
        files = [path]
    suffixes = {posixpath.splitext(f)[1].lower() for f in files}
    uris = [prefix + f for f in files]
    if suffixes and suffixes <= {".tar"}:
        return "webdataset", uris
    if suffixes and suffixes <= set(MANIFEST_SUFFIXES):
        if len({MANIFEST_SUFFIXES[s] for s in suffixes}) > 1:
            raise ValueError(f"input {uri} mixes manifest formats {sorted(suffixes)}: use one")
        return "manifest", uris
    if not fs.isdir(path):
        raise ValueError(f"input {uri}: cannot tell its format from the suffix; expected one of "
                         f"{sorted(MANIFEST_SUFFIXES)} or .tar, or a folder")
    return "folder", uris


def read_inputs(uri: str, config: InputConfig, storage_options: Mapping[str, Mapping[str, Any]] | None):
    """A Ray Dataset of INPUT_SCHEMA rows for URI. (Ray is imported here, not at module import.)"""
    import ray.data

    kind, files = detect_format(uri, storage_options)
    if config.format != "auto" and config.format != kind:
        if config.format == "folder":
            kind = "folder"
        else:
            raise ValueError(f"input {uri} looks like a {kind}, but the config says {config.format}")
    if kind == "manifest":
        reader = {"parquet": ray.data.read_parquet, "json": ray.data.read_json, "csv": ray.data.read_csv}[
            MANIFEST_SUFFIXES[posixpath.splitext(files[0])[1].lower()]]
        fs, _ = pyarrow_filesystem(files[0], storage_options)
        paths = [f.split("://", 1)[-1] if fs is not None else f for f in files]
        kwargs: dict[str, Any] = {"filesystem": fs} if fs is not None else {}
        # read_json parses newline-delimited JSON with pyarrow (its `lines=True` pandas path
        # cannot take a filesystem): .json and .jsonl manifests hold one object per line.
        ds = reader(paths, **kwargs)
        base = parent_uri(files[0]) if len(files) == 1 else (uri.rstrip("/"))
        ds = ds.map_batches(normalize_manifest_batch, batch_format="pyarrow",
                            fn_kwargs={"config": config, "base": base})
    elif kind == "webdataset":
        ds = ray.data.from_items([{"tar": f} for f in files])
        ds = ds.flat_map(lambda row: iter_webdataset(row["tar"], storage_options))
        ds = ds.map_batches(_cast_input, batch_format="pyarrow")
    else:
        exts = tuple(e.lower() for e in config.image_extensions)
        images = [f for f in files if f.lower().endswith(exts)]
        ds = ray.data.from_items([{"image": f} for f in images] or [])
        ds = ds.map_batches(normalize_manifest_batch, batch_format="pyarrow",
                            fn_kwargs={"config": config, "base": uri})
    if config.limit:
        ds = ds.limit(config.limit)
    return ds, kind


def _cast_input(table: pa.Table) -> pa.Table:
    return pa.table({f.name: table.column(f.name).cast(f.type) if f.name in table.column_names
                     else pa.nulls(table.num_rows, f.type) for f in INPUT_SCHEMA}, schema=INPUT_SCHEMA)
