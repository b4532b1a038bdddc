"""Region-text shard schema v1 (1.3): one row per image, its caption, phrases and detected regions.

This module is the only place the shard's columns, types and footer keys are written down (the
columns stages pass between them are in `schemas.columns`, reject reasons in `schemas.rejects`).
Writers cast to `region_text_schema()`; readers call `check_shard_schema` (the footer's version,
else the columns) and refuse a major version they do not know.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

# 1.1 adds vlm_caption and caption_source; 1.2 adds image_location, image_offset and image_length; 1.3 adds
# each region's spans. Every addition is nullable: older files read as 1.3, with nulls there.
SCHEMA_VERSION = "1.3"
MAJOR_VERSION = 1
# Footer metadata keys (bytes in Parquet); every value is a UTF-8 string, JSON where structured.
META_PREFIX = "vesl."
META_SCHEMA_VERSION = "vesl.schema_version"  # "1.0"
META_VERSION = "vesl.version"  # the vesl that wrote the file
META_MODELS = "vesl.models"  # JSON: {"captioner": {id, revision, class}, "detector": {...}, "spacy": {id}}
META_THRESHOLDS = "vesl.thresholds"  # JSON: the detection and phrase settings that shaped the regions
META_CONFIG_HASH = "vesl.config_hash"  # hash of every label-affecting setting (AnnotateConfig.label_hash)
META_WRITTEN_BY = "vesl.written_by"  # "write_regions" on shards written back from a DataFrame

# [start, end) character offsets (Python str indexing, i.e. Unicode code points) into a row's text.
SPAN_TYPE = pa.list_(pa.int32(), 2)
SPANS_TYPE = pa.list_(SPAN_TYPE)

REGION_TYPE = pa.struct(
    [
        # x0, y0, x1, y1 normalised to [0, 1] of the original (EXIF-oriented) image.
        pa.field("box", pa.list_(pa.float32(), 4), nullable=False),
        pa.field("phrase", pa.string(), nullable=False),
        pa.field("score", pa.float32(), nullable=False),
        # "caption" or "alt_text": which text the phrase came from.
        pa.field("source", pa.string(), nullable=False),
        # 1.3: where the phrase stands in the text named by `source` (the row's caption or alt_text): every
        # place spaCy found it, as [start, end) with phrase_of_text(text[start:end]) == phrase (plain text:
        # text[start:end].lower() == phrase). Null in files older than 1.3.
        pa.field("spans", SPANS_TYPE),
    ]
)


def region_text_schema(metadata: dict[str, str] | None = None) -> pa.Schema:
    """The Arrow schema of a region-text shard, optionally with footer metadata attached."""
    schema = pa.schema(
        [
            pa.field("image_id", pa.string(), nullable=False),
            pa.field("image_uri", pa.string()),
            pa.field("image_bytes", pa.large_binary()),
            # 1.2: where the image can be read now (`image_uri` stays where it came from): a file, or the tar
            # that holds it, local or any fsspec URI; null when the input had no such place (bytes given
            # inline, a fetch over http(s), a compressed tar): then `image_bytes` holds it unless turned off.
            pa.field("image_location", pa.string()),
            # 1.2: for a tar member, its data's byte offset in image_location and its length (a ranged read);
            # null for a whole file
            pa.field("image_offset", pa.int64()),
            pa.field("image_length", pa.int64()),
            pa.field("width", pa.int32(), nullable=False),
            pa.field("height", pa.int32(), nullable=False),
            pa.field("alt_text", pa.string()),
            # the final caption: the VLM's, fused with the alt-text where fusion ran (caption_source)
            pa.field("caption", pa.string(), nullable=False),
            # 1.1: the captioner's own caption, before fusion (null in 1.0 files)
            pa.field("vlm_caption", pa.string()),
            # 1.1: how `caption` was made, a CaptionSource (null in 1.0 files)
            pa.field("caption_source", pa.string()),
            pa.field("phrases", pa.list_(pa.string()), nullable=False),
            pa.field("regions", pa.list_(REGION_TYPE), nullable=False),
        ]
    )
    if metadata:
        schema = schema.with_metadata({k.encode(): v.encode() for k, v in metadata.items()})
    return schema


# One row per rejected input: `reason` is a `schemas.rejects.RejectReason` (or, for an input
# img2dataset already failed, img2dataset's own status).
REJECT_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("image_uri", pa.string()),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("message", pa.string()),
        # where the input was: (manifest/tar file index << 32) + row in that file, or the index in a
        # folder listing. Lets a user find the row, and a resumed run tell duplicate inputs apart.
        pa.field("ordinal", pa.int64()),
    ]
)


class SchemaVersionError(ValueError):
    """A shard was written with a schema major version this reader does not understand."""


def check_schema_version(metadata: dict[bytes, bytes] | dict[str, str] | None, where: str = "shard") -> str:
    """Return the shard's schema version, or raise SchemaVersionError for an unknown major."""
    meta = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in (metadata or {}).items()}
    version = meta.get(META_SCHEMA_VERSION)
    if version is None:
        raise SchemaVersionError(f"{where} has no '{META_SCHEMA_VERSION}' footer key: not a vesl region-text shard")
    try:
        major = int(version.split(".")[0])
    except ValueError:
        raise SchemaVersionError(f"{where} has an unreadable schema version {version!r}") from None
    if major != MAJOR_VERSION:
        raise SchemaVersionError(
            f"{where} uses region-text schema {version}; this vesl reads major version {MAJOR_VERSION} only"
        )
    return version


class SchemaMismatchError(SchemaVersionError):
    """A shard's columns do not cast to schema v1: one is missing, of another kind, or holds values
    (a null, a box of 3 numbers) that v1 does not allow."""


@dataclass(frozen=True)
class ShardSchema:
    """How a file's schema relates to schema v1 (`check_shard_schema`)."""

    version: str | None  # the footer's schema version; None: no vesl footer (a shard pandas or polars rewrote)
    casts: tuple[str, ...] = ()  # "regions.score: double -> float" for every column that needs a cast
    filled: tuple[str, ...] = ()  # nullable v1 columns the file lacks, read as nulls

    @property
    def exact(self) -> bool:
        return not (self.casts or self.filled)


_STRINGS = (pa.types.is_string, pa.types.is_large_string, pa.types.is_string_view)
_BINARIES = (pa.types.is_binary, pa.types.is_large_binary, pa.types.is_binary_view, pa.types.is_fixed_size_binary)
_LISTS = (pa.types.is_list, pa.types.is_large_list, pa.types.is_list_view, pa.types.is_large_list_view,
          pa.types.is_fixed_size_list)


def _is(kinds, t: pa.DataType) -> bool:
    return any(k(t) for k in kinds)


def _short(t: pa.DataType) -> str:
    """A type's name without its children: large_list, fixed_size_list[4], struct, double."""
    if _is(_LISTS, t):
        return str(t).split("<", 1)[0] + (f"[{t.list_size}]" if pa.types.is_fixed_size_list(t) else "")
    return "struct" if pa.types.is_struct(t) else str(t)


def _type_changes(src: pa.DataType, dst: pa.DataType, path: str) -> list[str]:
    """The casts that take SRC to DST, as "path: src -> dst" lines; raises SchemaMismatchError when no
    safe cast exists. Safe means: the same kind of value in another width or container (large_string ->
    string, double -> float, int64 -> int32 with an overflow check, a list -> a fixed-size list of 4), or a
    double holding whole numbers where v1 has an integer (pandas' nullable int64).
    Value-level failures (a null, an overflow, a box of 3 numbers) surface when the data is cast."""
    if src == dst:
        return []
    change = [f"{path}: {_short(src)} -> {_short(dst)}"]
    if pa.types.is_null(src):
        return change  # an all-null column (pandas writes None-only columns so); nulls are checked on data
    if pa.types.is_struct(dst) and pa.types.is_struct(src):
        names = [src.field(i).name for i in range(src.num_fields)]
        out = []
        for field in dst:
            if field.name not in names:
                if not field.nullable:
                    raise SchemaMismatchError(f"column {path}.{field.name} is missing")
                out.append(f"{path}.{field.name}: missing -> nulls")  # a field a later minor version added
                continue
            out += _type_changes(src.field(field.name).type, field.type, f"{path}.{field.name}")
        extra = [n for n in names if n not in dst.names]
        if extra:
            out.append(f"{path}: fields {extra} dropped")
        return out
    if _is(_LISTS, dst) and _is(_LISTS, src):
        inner = _type_changes(src.value_type, dst.value_type, f"{path}[]")
        return inner if type(src) is type(dst) and getattr(src, "list_size", None) == getattr(dst, "list_size", None) \
            else change + inner
    for family in (_STRINGS, _BINARIES, (pa.types.is_integer,), (pa.types.is_floating,)):
        if _is(family, dst) and _is(family, src):
            return change
    if pa.types.is_integer(dst) and pa.types.is_floating(src):
        return change  # pandas keeps a nullable integer as a double: whole values cast, any fraction is refused
    raise SchemaMismatchError(f"column {path} is {src}, which does not cast safely to schema v1's {dst}")


def check_shard_schema(schema: pa.Schema, where: str = "shard") -> ShardSchema:
    """Check a file's Arrow schema against schema v1 before reading its data.

    With vesl's footer the major version must be 1. Without it (pandas, polars and most tools drop
    custom footer metadata when they write a file back) the file is still a shard when its columns
    cast safely to v1: SchemaMismatchError names the first column that is missing or of another kind."""
    meta = schema.metadata or {}
    version = check_schema_version(meta, where) if META_SCHEMA_VERSION.encode() in meta else None
    casts: list[str] = []
    filled: list[str] = []
    lead = f"{where}: " if version else f"{where} is not a vesl region-text shard (no '{META_SCHEMA_VERSION}' footer): "
    for field in region_text_schema():
        if field.name not in schema.names:
            if not field.nullable:
                raise SchemaMismatchError(f"{lead}column {field.name!r} ({field.type}) is missing; "
                                          "region-text schema v1 needs it")
            filled.append(field.name)
            continue
        try:
            casts += _type_changes(schema.field(field.name).type, field.type, field.name)
        except SchemaMismatchError as e:
            raise SchemaMismatchError(f"{lead}{e}") from None
    return ShardSchema(version, tuple(casts), tuple(filled))


def conform_table(table: pa.Table, where: str = "shard", columns: list[str] | None = None) -> pa.Table:
    """TABLE's COLUMNS (default: all of v1) cast to schema v1, nullable columns it lacks filled with
    nulls. Raises SchemaMismatchError naming the column when a value does not fit (a null where v1
    has none, a box that is not 4 numbers, an integer out of range)."""
    target = region_text_schema()
    fields = [target.field(c) for c in (columns or target.names)]
    arrays = []
    for field in fields:
        if field.name not in table.column_names:
            if not field.nullable:
                raise SchemaMismatchError(f"{where}: column {field.name!r} is missing")
            arrays.append(pa.nulls(table.num_rows, field.type))
            continue
        column = table.column(field.name)
        if not field.nullable and column.null_count:
            raise SchemaMismatchError(f"{where}: column {field.name!r} has {column.null_count} null value(s); "
                                      "region-text schema v1 allows none")
        try:
            arrays.append(column if column.type == field.type else column.cast(field.type, safe=True))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
            raise SchemaMismatchError(f"{where}: column {field.name!r} does not fit schema v1's {field.type}: "
                                      f"{str(e).splitlines()[0]}") from None
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata=table.schema.metadata))


def describe_footerless(checked: list[tuple[str, ShardSchema]]) -> str | None:
    """One log line for the files of CHECKED (uri, check) that had no vesl footer, or None."""
    footerless = [(uri, c) for uri, c in checked if c.version is None]
    if not footerless:
        return None
    casts = sorted({cast for _, c in footerless for cast in c.casts} | {f"{n}: missing -> nulls"
                                                                        for _, c in footerless for n in c.filled})
    return (f"{len(footerless)} of {len(checked)} shard file(s) have no vesl footer (rewritten by pandas, polars or "
            f"another tool?) and are read by their columns as schema v1, e.g. {footerless[0][0]}; casts: "
            + ("; ".join(casts) or "none"))


class CaptionSource(StrEnum):
    """How a row's `caption` was made."""

    FUSED = "fused"  # the fusion LLM merged the VLM caption with the alt-text
    VLM = "vlm"  # the captioner's caption as it is (no fusion stage ran)
    ALT_SKIPPED = "alt_skipped"  # fusion ran, but the alt-text was missing, boilerplate or a repeat: the VLM caption
    ALT_TEXT = "alt_text"  # no captioner: the alt-text itself (the alt-ngram ablation)


class Region(BaseModel):
    """One detected region: a normalised box and the phrase that labels it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    box: tuple[float, float, float, float] = Field(description="x0, y0, x1, y1 in [0, 1] of the original image")
    phrase: str = Field(min_length=1)
    score: float = Field(ge=0.0, le=1.0)
    source: Literal["caption", "alt_text"]
    spans: list[tuple[int, int]] | None = Field(default=None, description="[start, end) of the phrase in the source "
                                                "text, every place it was found; None before schema 1.3")

    @model_validator(mode="after")
    def _box_is_proper(self) -> "Region":
        x0, y0, x1, y1 = self.box
        if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
            raise ValueError(f"box {self.box} is not x0 < x1, y0 < y1 inside [0, 1]")
        if any(not 0 <= start < end for start, end in self.spans or ()):
            raise ValueError(f"spans {self.spans} are not 0 <= start < end")
        return self


class RegionRow(BaseModel):
    """One row of a region-text shard (schema v1)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    image_id: str = Field(min_length=1)
    image_uri: str | None = None
    image_bytes: bytes | None = None
    image_location: str | None = None
    image_offset: int | None = Field(default=None, ge=0)
    image_length: int | None = Field(default=None, ge=0)
    width: int = Field(gt=0)
    height: int = Field(gt=0)
    alt_text: str | None = None
    caption: str
    vlm_caption: str | None = None
    caption_source: CaptionSource | None = None
    phrases: list[str]
    regions: list[Region]

    @model_validator(mode="after")
    def _byte_range_has_a_place(self) -> RegionRow:
        if (self.image_offset is None) != (self.image_length is None) or (
                self.image_offset is not None and not self.image_location):
            raise ValueError("image_offset and image_length come together, and only with an image_location")
        for region in self.regions:
            text = self.caption if region.source == "caption" else self.alt_text or ""
            if any(end > len(text) for _, end in region.spans or ()):
                raise ValueError(f"region {region.phrase!r}: spans {region.spans} reach past its {region.source} "
                                 f"({len(text)} characters)")
        return self
