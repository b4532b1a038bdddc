"""Finding region-text shards: an annotate OUTPUT (its data/ folder), a folder of shards, or one file."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import pyarrow.parquet as pq

from schemas.region_text import check_shard_schema, describe_footerless
from vesl.core.storage import filesystem, uri_prefix

log = logging.getLogger("vesl.shards")


def find_shards(uri: str, storage_options: Mapping[str, Any] | None = None, check: bool = True) -> list[str]:
    """Parquet files of a region-text dataset: an annotate OUTPUT (its data/ folder), a folder of
    shards, or one file. Returns full URIs, sorted, each checked for a v1 schema footer (CHECK False:
    not opened here, for a caller that reads every footer anyway and checks it then). A file without
    vesl's footer passes when its columns cast to v1 (see `schemas.region_text.check_shard_schema`)."""
    fs, path = filesystem(uri, storage_options)
    if fs.isdir(path) and fs.isdir(path.rstrip("/") + "/data"):
        path = path.rstrip("/") + "/data"
    if fs.isdir(path):
        files = sorted(p for p in fs.find(path) if p.endswith(".parquet") and "/_tmp/" not in p
                       and "/rejects/" not in p)
    elif fs.exists(path):
        files = [path]
    else:
        raise FileNotFoundError(f"no region-text shards at {uri}")
    if not files:
        raise FileNotFoundError(f"no .parquet shards under {uri}")
    uris = [uri_prefix(uri) + p for p in files]
    if check:
        checked = []
        for file_uri, path in zip(uris, files):
            with fs.open(path, "rb") as f:
                checked.append((file_uri, check_shard_schema(pq.read_schema(f), where=file_uri)))
        note = describe_footerless(checked)
        if note:
            log.warning("%s", note)
    return uris


def count_rows(uris: list[str], storage_options: Mapping[str, Any] | None = None) -> int:
    """Rows of the Parquet files URIS, read from their footers."""
    total = 0
    for uri in uris:
        fs, path = filesystem(uri, storage_options)
        with fs.open(path, "rb") as f:
            total += pq.ParquetFile(f).metadata.num_rows
    return total
