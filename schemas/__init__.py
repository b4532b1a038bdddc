"""The data contract, versioned: the shard and reject schemas and footer keys (region_text), the
columns stages pass between them (columns), and every reject reason (rejects). Imports nothing of
the project."""

from schemas.region_text import (
    MAJOR_VERSION,
    REJECT_SCHEMA,
    SCHEMA_VERSION,
    Region,
    RegionRow,
    SchemaVersionError,
    check_schema_version,
    region_text_schema,
)
from schemas.rejects import RejectReason

__all__ = [
    "MAJOR_VERSION",
    "REJECT_SCHEMA",
    "SCHEMA_VERSION",
    "Region",
    "RegionRow",
    "RejectReason",
    "SchemaVersionError",
    "check_schema_version",
    "region_text_schema",
]
