"""Region-text shards as pandas DataFrames.

    import vesl
    regions = vesl.read_regions("out/run")                  # one row per region
    images = vesl.read_regions("out/run", explode=False)    # one row per image

URI is an annotate OUTPUT (its `data/` folder is read), a folder of shards or one shard, local or
any fsspec URI (`s3://...`). Every file's footer is checked for schema v1 first. Image bytes are
left out unless asked for: they are most of a shard's size when `embed_images` was on.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

IMAGE_COLUMNS = ["image_id", "image_uri", "width", "height", "alt_text", "caption", "phrases", "regions"]
REGION_COLUMNS = ["image_id", "image_uri", "width", "height", "region", "phrase", "score", "source",
                  "x0", "y0", "x1", "y1", "x0_px", "y0_px", "x1_px", "y1_px"]


def by_protocol(uri: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Storage options in vesl's by-protocol form ({"s3": {...}}). A flat dict (pandas' and
    fsspec's own form, e.g. {"anon": True}) is taken as the options of URI's protocol."""
    import fsspec

    from vesl.storage import protocol_of

    if not storage_options:
        return {}
    if set(storage_options) <= set(fsspec.available_protocols()) and all(
            isinstance(v, Mapping) for v in storage_options.values()):
        return dict(storage_options)
    return {protocol_of(uri): dict(storage_options)}


def shard_uris(uri: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    from vesl.cloc.data import find_shards

    return find_shards(uri, by_protocol(uri, storage_options), check=False)  # iter_tables checks each footer


def iter_tables(uris: list[str], columns: list[str], storage_options: Mapping[str, Any] | None) -> Iterator[
        tuple[str, pa.Table, dict[str, str]]]:
    """(uri, table with COLUMNS, footer metadata) per shard, one file in memory at a time. A file
    whose footer is not schema v1 raises SchemaVersionError (a ValueError) before it is read."""
    from schemas.region_text import check_schema_version
    from vesl.storage import filesystem

    for uri in uris:
        fs, path = filesystem(uri, storage_options)
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            check_schema_version(pf.schema_arrow.metadata, where=uri)
            meta = {k.decode(): v.decode() for k, v in (pf.schema_arrow.metadata or {}).items()}
            table = pf.read(columns=columns)
        yield uri, table, meta


def explode_regions(table: pa.Table) -> pa.Table:
    """One row per region of TABLE (shard rows with image_id, width, height, regions): the box
    normalised (x0..y1) and in pixels of the original image (x0_px..y1_px). Images without
    regions have no row here."""
    regions = table.column("regions").combine_chunks()
    parents = pc.list_parent_indices(regions)
    flat = pc.list_flatten(regions)
    n = len(flat)
    box = np.asarray(pc.list_flatten(flat.field("box")).to_numpy(zero_copy_only=False), dtype=np.float32)
    box = box.reshape(n, 4) if n else np.zeros((0, 4), dtype=np.float32)
    offsets = regions.offsets.to_numpy()
    parent_np = parents.to_numpy(zero_copy_only=False) if n else np.zeros(0, dtype=np.int64)
    index_in_image = np.arange(n, dtype=np.int32) - offsets[parent_np].astype(np.int32) if n else np.zeros(0, np.int32)
    width = table.column("width").to_numpy().astype(np.float64)[parent_np]
    height = table.column("height").to_numpy().astype(np.float64)[parent_np]
    columns = {
        "image_id": pc.take(table.column("image_id"), parents),
        "image_uri": pc.take(table.column("image_uri"), parents) if "image_uri" in table.column_names
        else pa.nulls(n, pa.string()),
        "width": pc.take(table.column("width"), parents),
        "height": pc.take(table.column("height"), parents),
        "region": pa.array(index_in_image, pa.int32()),
        "phrase": flat.field("phrase"),
        "score": flat.field("score"),
        "source": flat.field("source"),
        "x0": pa.array(box[:, 0]), "y0": pa.array(box[:, 1]), "x1": pa.array(box[:, 2]), "y1": pa.array(box[:, 3]),
        "x0_px": pa.array(box[:, 0] * width), "y0_px": pa.array(box[:, 1] * height),
        "x1_px": pa.array(box[:, 2] * width), "y1_px": pa.array(box[:, 3] * height),
    }
    return pa.table(columns)


def read_regions(uri: str, explode: bool = True, *, storage_options: Mapping[str, Any] | None = None,
                 with_images: bool = False):
    """Read region-text shards into a pandas DataFrame.

    explode=True: one row per region, columns image_id, image_uri, width, height, region (its index
    in the image's list), phrase, score, source ("caption"/"alt_text"), x0, y0, x1, y1 (normalised
    to [0, 1] of the original image) and x0_px, y0_px, x1_px, y1_px (pixels of the original image).
    Images with no region have no row; use explode=False to see them.
    explode=False: one row per image, the shard's columns (`regions` a list of dicts) plus
    num_regions; `image_bytes` only with WITH_IMAGES.
    STORAGE_OPTIONS: fsspec options, flat ({"anon": True}) or by protocol ({"s3": {...}}).
    """
    import pandas as pd

    options = by_protocol(uri, storage_options)
    uris = shard_uris(uri, options)
    if explode:
        parts = [explode_regions(t) for _, t, _ in iter_tables(
            uris, ["image_id", "image_uri", "width", "height", "regions"], options)]
        table = pa.concat_tables(parts) if parts else pa.table({c: [] for c in REGION_COLUMNS})
        return table.to_pandas()
    columns = IMAGE_COLUMNS + (["image_bytes"] if with_images else [])
    parts = [t for _, t, _ in iter_tables(uris, columns, options)]
    table = pa.concat_tables(parts)
    table = table.append_column("num_regions", pc.list_value_length(table.column("regions")).cast(pa.int32()))
    return table.to_pandas()


__all__ = ["explode_regions", "iter_tables", "read_regions", "shard_uris"]
