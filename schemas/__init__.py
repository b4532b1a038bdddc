"""The region-text data contract: Arrow schemas and pydantic row models, versioned."""

from schemas.region_text import (
    MAJOR_VERSION,
    REJECT_SCHEMA,
    SCHEMA_VERSION,
    Region,
    RegionRow,
    RejectRow,
    SchemaVersionError,
    check_schema_version,
    region_text_schema,
)

__all__ = [
    "MAJOR_VERSION",
    "REJECT_SCHEMA",
    "SCHEMA_VERSION",
    "Region",
    "RegionRow",
    "RejectRow",
    "SchemaVersionError",
    "check_schema_version",
    "region_text_schema",
]
