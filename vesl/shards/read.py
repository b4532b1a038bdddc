"""Region-text shards as pandas DataFrames, and DataFrames back as shards.

    import vesl
    regions = vesl.read_regions("out/run")                  # one row per region
    images = vesl.read_regions("out/run", explode=False)    # one row per image
    vesl.write_regions(images[images.num_regions > 0], "out/filtered")   # proper shards again

URI is an annotate OUTPUT (its `data/` folder is read), a folder of shards or one shard, local or
any fsspec URI (`s3://...`). Every file is checked against schema v1 first: by its footer, or, for
a file pandas or polars wrote back without vesl's footer, by its columns (cast to v1's types on
read). `read_regions(..., explode=False)` carries the image bytes the shards hold (only the images with
no other place to be read from, unless `decode.embed_images: true`); `with_images=False` leaves them out,
`with_images=True` reads every image.
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

log = logging.getLogger("vesl.shards.read")
FOOTER_ATTR = "vesl_footer"  # pandas df.attrs key: the footer entries read_regions found, for write_regions
IMAGE_COLUMNS = ["image_id", "image_uri", "image_location", "image_offset", "image_length", "width", "height",
                 "alt_text", "caption", "vlm_caption", "caption_source", "phrases", "regions"]
IMAGE_ERROR = "image_error"  # read_regions(with_images=True): why a row's image could not be read (else null)
REGION_COLUMNS = ["image_id", "image_uri", "width", "height", "region", "phrase", "score", "source", "spans",
                  "x0", "y0", "x1", "y1", "x0_px", "y0_px", "x1_px", "y1_px"]


def by_protocol(uri: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Storage options in vesl's by-protocol form ({"s3": {...}}). A flat dict (pandas' and
    fsspec's own form, e.g. {"anon": True}) is taken as the options of URI's protocol."""
    import fsspec

    from vesl.core.storage import protocol_of

    if not storage_options:
        return {}
    if set(storage_options) <= set(fsspec.available_protocols()) and all(
            isinstance(v, Mapping) for v in storage_options.values()):
        return dict(storage_options)
    return {protocol_of(uri): dict(storage_options)}


def shard_uris(uri: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    from vesl.core.outdir import find_shards

    return find_shards(uri, by_protocol(uri, storage_options), check=False)  # iter_tables checks each footer


def iter_tables(uris: list[str], columns: list[str], storage_options: Mapping[str, Any] | None) -> Iterator[
        tuple[str, pa.Table, dict[str, str]]]:
    """(uri, table with COLUMNS cast to schema v1, footer metadata) per shard, one file in memory at a
    time. A file is checked before its data is read: a vesl footer of another major version, or
    columns that do not cast to v1, raise SchemaVersionError (a ValueError) naming the file and column.
    Files without vesl's footer (written back by pandas or polars) are read by their columns; the
    first one is logged with the casts it needs."""
    from schemas.region_text import check_shard_schema, conform_table, describe_footerless
    from vesl.core.outdir import open_parquet, read_pages

    logged = False
    for uri in uris:
        with open_parquet(uri, storage_options) as pf:
            check = check_shard_schema(pf.schema_arrow, where=uri)
            meta = {k.decode(): v.decode() for k, v in (pf.schema_arrow.metadata or {}).items()}
            present = [c for c in columns if c in pf.schema_arrow.names]
            table = conform_table(read_pages(pf, uri, columns=present), where=uri, columns=columns)
        if check.version is None and not logged:
            log.warning("%s (later files are not reported again)", describe_footerless([(uri, check)]))
            logged = True
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
        "spans": flat.field("spans"),
        "x0": pa.array(box[:, 0]), "y0": pa.array(box[:, 1]), "x1": pa.array(box[:, 2]), "y1": pa.array(box[:, 3]),
        "x0_px": pa.array(box[:, 0] * width), "y0_px": pa.array(box[:, 1] * height),
        "x1_px": pa.array(box[:, 2] * width), "y1_px": pa.array(box[:, 3] * height),
    }
    return pa.table(columns)


def read_regions(uri: str, explode: bool = True, *, storage_options: Mapping[str, Any] | None = None,
                 with_images: bool | None = None, relocate: Mapping[str, str] | None = None):
    """Read region-text shards into a pandas DataFrame.

    explode=True: one row per region, columns image_id, image_uri, width, height, region (its index
    in the image's list), phrase, score, source ("caption"/"alt_text"), spans (where the phrase stands in
    that text: [start, end) pairs; null in shards older than schema 1.3), x0, y0, x1, y1 (normalised
    to [0, 1] of the original image) and x0_px, y0_px, x1_px, y1_px (pixels of the original image).
    Images with no region have no row; use explode=False to see them.
    explode=False: one row per image, the shard's columns (`regions` a list of dicts, the image's
    location: `image_location`, `image_offset`, `image_length`) plus num_regions. `image_bytes`: by
    default (WITH_IMAGES None) the bytes the shards carry, so that a filtered frame written back keeps
    the images that have no other place (null for the rest: they are read from their location);
    WITH_IMAGES False leaves the column out (a lean frame: written back, embedded images are lost);
    WITH_IMAGES True reads every image as the trainer reads it (the shard's bytes, else its location, a
    ranged read for a tar member, through RELOCATE's prefix map, else its original URI) and adds
    `image_error`: why a row's image could not be read (null when it was; a warning counts them).
    STORAGE_OPTIONS: fsspec options, flat ({"anon": True}) or by protocol ({"s3": {...}}).
    """
    options = by_protocol(uri, storage_options)
    uris = shard_uris(uri, options)
    if explode:
        parts, ids = [], []
        for _, t, _ in iter_tables(uris, ["image_id", "image_uri", "width", "height", "regions"], options):
            parts.append(explode_regions(t))
            ids.append(t.column("image_id"))
        warn_duplicates(uri, ids)
        table = pa.concat_tables(parts) if parts else pa.table({c: [] for c in REGION_COLUMNS})
        return table.to_pandas()
    columns = IMAGE_COLUMNS + ([] if with_images is False else ["image_bytes"])
    parts, footers = [], []
    for _, t, meta in iter_tables(uris, columns, options):
        parts.append(t)
        footers.append(meta)
    warn_duplicates(uri, [t.column("image_id") for t in parts])
    table = pa.concat_tables(parts)
    if with_images:
        table = load_images(table, options, relocate, uri)
    table = table.append_column("num_regions", pc.list_value_length(table.column("regions")).cast(pa.int32()))
    import pandas as pd

    df = table.to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get)  # image_offset/length: integers with nulls
    df.attrs[FOOTER_ATTR] = common_footer(footers)  # write_regions carries it over (models, thresholds)
    return df


class UnreadableImageWarning(UserWarning):
    """read_regions(with_images=True) could not read some rows' images (their `image_error` says why)."""


def load_images(table: pa.Table, options, relocate: Mapping[str, str] | None, where: str) -> pa.Table:
    """TABLE with `image_bytes` filled by `read_image` for every row and an `image_error` column."""
    import warnings

    from schemas.columns import LOCATION_COLUMNS
    from vesl.core.images import DEFAULT_FETCH_TIMEOUT_S, DEFAULT_MAX_BYTES, ImageRef, failure_text, read_image

    data, errors = [], []
    for row in table.select(["image_bytes", *LOCATION_COLUMNS, "image_uri"]).to_pylist():
        try:
            data.append(read_image(ImageRef.of(row), options, DEFAULT_MAX_BYTES, DEFAULT_FETCH_TIMEOUT_S, relocate))
            errors.append(None)
        except Exception as e:  # noqa: BLE001 - one unreadable image is that row's image_error
            data.append(None)
            errors.append(failure_text(e)[:500])
    table = table.set_column(table.schema.get_field_index("image_bytes"), "image_bytes",
                             pa.array(data, pa.large_binary()))
    failed = [e for e in errors if e]
    if failed:
        message = f"{where}: {len(failed)} of {len(errors)} image(s) could not be read (image_error), e.g. {failed[0]}"
        log.warning("%s", message)
        warnings.warn(message, UnreadableImageWarning, stacklevel=3)
    return table.append_column(IMAGE_ERROR, pa.array(errors, pa.string()))


class DuplicateImageIdWarning(UserWarning):
    """Shards hold an image_id in more than one row (two runs wrote one OUTPUT at once)."""


def warn_duplicates(uri: str, ids: list[pa.ChunkedArray | pa.Array]) -> int:
    """Warn loudly (a Python warning and a log line) when IDS repeat; returns how many rows repeat."""
    import warnings

    if not ids:
        return 0
    column = pa.chunked_array([c for part in ids for c in (part.chunks if hasattr(part, "chunks") else [part])],
                              type=pa.string())
    extra = len(column) - pc.count_distinct(column).as_py()
    if extra:
        counts = pc.value_counts(column)
        repeated = [v["values"] for v in counts.filter(pc.greater(counts.field("counts"), 1)).to_pylist()[:5]]
        message = (f"{uri}: {extra} row(s) repeat an image_id already in another row (e.g. {repeated}): a shard "
                   "that is no work unit's (copied in by hand?). `vesl annotate` with the "
                   "same INPUT and OUTPUT moves it aside; until then every such image counts twice")
        log.warning("%s", message)
        warnings.warn(message, DuplicateImageIdWarning, stacklevel=3)
    return extra


def common_footer(footers: list[Mapping[str, str]]) -> dict[str, str]:
    """The vesl.* footer entries every file agrees on (schema version and writer excepted)."""
    from schemas.region_text import META_PREFIX, META_SCHEMA_VERSION, META_VERSION, META_WRITTEN_BY

    keys = [k for k in (footers[0] if footers else {}) if k.startswith(META_PREFIX)
            and k not in (META_SCHEMA_VERSION, META_VERSION, META_WRITTEN_BY)]
    return {k: footers[0][k] for k in keys if all(f.get(k) == footers[0][k] for f in footers)}


def _to_arrow(data) -> tuple[pa.Table, dict[str, str]]:
    """(an Arrow table, the vesl footer it carries) of a pandas or polars DataFrame or an Arrow table."""
    from schemas.region_text import META_PREFIX

    if isinstance(data, pa.Table):
        meta = {k.decode(): v.decode() for k, v in (data.schema.metadata or {}).items()}
        return data, {k: v for k, v in meta.items() if k.startswith(META_PREFIX)}
    if hasattr(data, "to_arrow") and not hasattr(data, "attrs"):  # polars
        return data.to_arrow(), {}
    import pandas as pd

    if isinstance(data, pd.DataFrame):
        return pa.Table.from_pandas(data, preserve_index=False), dict(data.attrs.get(FOOTER_ATTR) or {})
    raise TypeError(f"write_regions takes a pandas or polars DataFrame or a pyarrow Table, not {type(data).__name__}")


def check_rows(table: pa.Table, where: str) -> None:
    """The invariants schema v1 states beyond types: one row per image_id, a tar member's byte range only
    whole and with its image_location, and every region's box normalised and proper (0 <= x0 < x1 <= 1,
    the same for y), its score in [0, 1], its source known."""
    from schemas.region_text import SchemaMismatchError

    ids = table.column("image_id")
    if pc.count_distinct(ids).as_py() != len(ids):
        counts = pc.value_counts(ids)
        repeated = [v["values"] for v in counts.to_pylist() if v["counts"] > 1]
        raise SchemaMismatchError(f"{where}: image_id must be unique; repeated: {repeated[:5]}")
    offset, length, location = (table.column(c) for c in ("image_offset", "image_length", "image_location"))
    ranged = pc.is_valid(offset)
    bad_range = pc.or_(pc.xor(ranged, pc.is_valid(length)), pc.and_(ranged, pc.is_null(location)))
    if pc.any(bad_range).as_py():
        first = ids.filter(bad_range)[0].as_py()
        raise SchemaMismatchError(f"{where}: {pc.sum(bad_range).as_py()} row(s) have an image_offset without an "
                                  f"image_length or an image_location (or the reverse); the first is {first!r}")
    regions = table.column("regions").combine_chunks()
    flat = pc.list_flatten(regions)
    if not len(flat):
        return
    owner = pc.take(ids, pc.list_parent_indices(regions))
    box = np.asarray(pc.list_flatten(flat.field("box")).to_numpy(zero_copy_only=False)).reshape(-1, 4)
    score = np.asarray(flat.field("score").to_numpy(zero_copy_only=False))
    source = np.isin(np.asarray(flat.field("source").to_pylist(), dtype=object), ["caption", "alt_text"])
    bad_box = ~((box[:, 0] >= 0) & (box[:, 0] < box[:, 2]) & (box[:, 2] <= 1)
                & (box[:, 1] >= 0) & (box[:, 1] < box[:, 3]) & (box[:, 3] <= 1))
    for bad, what in ((bad_box, "a box that is not 0 <= x0 < x1 <= 1, 0 <= y0 < y1 <= 1"),
                      (~((score >= 0) & (score <= 1)), "a score outside [0, 1]"),
                      (~source, "a source other than 'caption' or 'alt_text'")):
        if bad.any():
            i = int(np.argmax(bad))
            raise SchemaMismatchError(f"{where}: {int(bad.sum())} region(s) have {what}; the first is in image_id "
                                      f"{owner[i].as_py()!r}: {flat[i].as_py()}")


def write_regions(data, path: str, *, storage_options: Mapping[str, Any] | None = None, rows_per_shard: int = 2000,
                  row_group_rows: int = 500, compression: str = "zstd", metadata: Mapping[str, str] | None = None,
                  drop_extra: bool = False, overwrite: bool = False) -> list[str]:
    """Write DATA (one row per image: `read_regions(..., explode=False)` after any filtering) as
    region-text shards at PATH, the counterpart of `read_regions`.

    DATA is a pandas or polars DataFrame or a pyarrow Table with schema v1's columns (pandas' and
    polars' types are cast: double scores, variable-length boxes, large strings; absent nullable
    columns become nulls). `num_regions` and `image_error` are dropped; other extra columns are refused unless
    DROP_EXTRA.
    Rows are checked (unique image_id, proper boxes and scores) before anything is written. The footer
    carries schema 1.x, this vesl's version and the models/thresholds/config hash the data came with
    (pandas' `df.attrs`, kept by read_regions) plus METADATA. PATH ending in `.parquet` is one file;
    otherwise a folder of `part-NNNNN.parquet` of ROWS_PER_SHARD rows, row groups of ROW_GROUP_ROWS.
    Each file is written beside and moved into place whole. An existing PATH with shards is refused
    unless OVERWRITE. Returns the URIs written."""
    from vesl.core.outdir import OutputDir
    from vesl.core.storage import parent_uri

    table = _shard_table(data, drop_extra, metadata)
    single = path.rstrip("/").endswith(".parquet")
    out = OutputDir(parent_uri(path) if single else path, by_protocol(path, storage_options))
    existing = _shards_to_replace(out, path, posixpath.basename(path) if single else None, overwrite)
    step = max(1, table.num_rows if single else rows_per_shard)
    starts = range(0, max(1, table.num_rows), step)
    names_out = [posixpath.basename(path)] if single else [f"part-{i:05d}.parquet" for i in range(len(starts))]
    parts = {name: table.slice(start, step) for start, name in zip(starts, names_out)}
    _replace_shards(out, parts, existing, row_group_rows=row_group_rows, compression=compression)
    return [out.uri_of(name) for name in names_out]


def _shard_table(data, drop_extra: bool, metadata: Mapping[str, str] | None) -> pa.Table:
    """DATA as a checked schema-v1 table whose footer carries what the data came with plus METADATA."""
    from schemas.region_text import (
        META_SCHEMA_VERSION,
        META_VERSION,
        META_WRITTEN_BY,
        SCHEMA_VERSION,
        conform_table,
        region_text_schema,
    )
    from vesl import __version__

    table, carried = _to_arrow(data)
    names = table.column_names
    if "regions" not in names and {"phrase", "x0", "region"} <= set(names):
        raise ValueError("this is read_regions' exploded frame (one row per region); write_regions takes one row per "
                         "image: read with explode=False and filter each image's `regions` list")
    extra = [c for c in names if c not in region_text_schema().names and c not in ("num_regions", IMAGE_ERROR)]
    if extra and not drop_extra:
        raise ValueError(f"columns {extra} are not in region-text schema v1; drop them or pass drop_extra=True")
    table = conform_table(table, where="write_regions")
    check_rows(table, where="write_regions")
    footer = {**carried, **(metadata or {}), META_SCHEMA_VERSION: SCHEMA_VERSION, META_VERSION: __version__,
              META_WRITTEN_BY: "write_regions"}
    return table.replace_schema_metadata({k.encode(): str(v).encode() for k, v in footer.items()})


def _shards_to_replace(out, path: str, single: str | None, overwrite: bool) -> list[str]:
    """The names of the .parquet files PATH already holds (the folder's own, not its subfolders'; SINGLE:
    the one file's name); refused unless OVERWRITE."""
    from vesl.core.outdir import DATA_DIR

    if single is None and out.exists(DATA_DIR):
        raise FileExistsError(f"{path} holds a data/ folder (an annotate OUTPUT?): write the shards somewhere else")
    if single is not None:
        existing = [single] if out.exists(single) else []
    else:
        existing = [name for name in out.names() if name.endswith(".parquet")]
    if existing and not overwrite:
        raise FileExistsError(f"{path} already holds {len(existing)} .parquet file(s); "
                              "pass overwrite=True to replace them")
    return existing


def _replace_shards(out, parts: Mapping[str, pa.Table], existing: list[str], *, row_group_rows: int,
                    compression: str) -> None:
    """Write PARTS (file name: table) into OUT's folder in place of EXISTING. Every file is staged first,
    so a failure leaves what the folder held before."""
    staged: dict[str, str] = {}
    out.makedirs()
    try:
        for name, part in parts.items():
            staged[name] = out.staged_path(name)
            with out.fs.open(staged[name], "wb") as f:
                pq.write_table(part, f, row_group_size=row_group_rows, compression=compression)
        for name in existing:
            out.remove(name)
        for name in list(staged):
            out.commit_staged(staged.pop(name), name)
    finally:
        for tmp in staged.values():
            out.discard_staged(tmp)


__all__ = ["DuplicateImageIdWarning", "UnreadableImageWarning", "explode_regions", "iter_tables", "read_regions",
           "shard_uris", "write_regions"]
