"""Region-text shard schema v1: one row per image, its caption, phrases and detected regions.

This module is the only place the columns and their types are written down. Writers cast to
`region_text_schema()`, readers call `check_schema_version` on the footer metadata and refuse a
major version they do not know.
"""

from __future__ import annotations

from typing import Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

SCHEMA_VERSION = "1.0"
MAJOR_VERSION = 1
# Footer metadata keys (bytes in Parquet); every value is a UTF-8 string, JSON where structured.
META_SCHEMA_VERSION = "vesl.schema_version"
META_PREFIX = "vesl."

REGION_TYPE = pa.struct(
    [
        # x0, y0, x1, y1 normalised to [0, 1] of the original (EXIF-oriented) image.
        pa.field("box", pa.list_(pa.float32(), 4), nullable=False),
        pa.field("phrase", pa.string(), nullable=False),
        pa.field("score", pa.float32(), nullable=False),
        # "caption" or "alt_text": which text the phrase came from.
        pa.field("source", pa.string(), nullable=False),
    ]
)


def region_text_schema(metadata: dict[str, str] | None = None) -> pa.Schema:
    """The Arrow schema of a region-text shard, optionally with footer metadata attached."""
    schema = pa.schema(
        [
            pa.field("image_id", pa.string(), nullable=False),
            pa.field("image_uri", pa.string()),
            pa.field("image_bytes", pa.large_binary()),
            pa.field("width", pa.int32(), nullable=False),
            pa.field("height", pa.int32(), nullable=False),
            pa.field("alt_text", pa.string()),
            pa.field("caption", pa.string(), nullable=False),
            pa.field("phrases", pa.list_(pa.string()), nullable=False),
            pa.field("regions", pa.list_(REGION_TYPE), nullable=False),
        ]
    )
    if metadata:
        schema = schema.with_metadata({k.encode(): v.encode() for k, v in metadata.items()})
    return schema


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


class Region(BaseModel):
    """One detected region: a normalised box and the phrase that labels it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    box: tuple[float, float, float, float] = Field(description="x0, y0, x1, y1 in [0, 1] of the original image")
    phrase: str = Field(min_length=1)
    score: float = Field(ge=0.0, le=1.0)
    source: Literal["caption", "alt_text"]

    @model_validator(mode="after")
    def _box_is_proper(self) -> "Region":
        x0, y0, x1, y1 = self.box
        if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
            raise ValueError(f"box {self.box} is not x0 < x1, y0 < y1 inside [0, 1]")
        return self


class RegionRow(BaseModel):
    """One row of a region-text shard (schema v1)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    image_id: str = Field(min_length=1)
    image_uri: str | None = None
    image_bytes: bytes | None = None
    width: int = Field(gt=0)
    height: int = Field(gt=0)
    alt_text: str | None = None
    caption: str
    phrases: list[str]
    regions: list[Region]


class RejectRow(BaseModel):
    """One input that did not become a row, and why."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    image_id: str
    image_uri: str | None = None
    stage: str
    reason: str
    message: str | None = None
    ordinal: int | None = None
