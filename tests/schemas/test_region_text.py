import pyarrow as pa
import pytest
from pydantic import ValidationError

from schemas.region_text import (
    META_SCHEMA_VERSION, Region, RegionRow, SchemaVersionError, check_schema_version, region_text_schema,
)


def test_schema_v1_columns_and_types():
    schema = region_text_schema()
    assert schema.names == ["image_id", "image_uri", "image_bytes", "width", "height", "alt_text", "caption",
                            "phrases", "regions"]
    assert schema.field("width").type == pa.int32()
    region = schema.field("regions").type.value_type
    assert region.field("box").type == pa.list_(pa.float32(), 4)
    assert region.field("score").type == pa.float32()
    assert [f.name for f in region] == ["box", "phrase", "score", "source"]


def test_metadata_rides_on_the_schema():
    schema = region_text_schema({META_SCHEMA_VERSION: "1.0", "vesl.config_hash": "abc"})
    assert check_schema_version(schema.metadata) == "1.0"


@pytest.mark.parametrize("meta, message", [
    ({META_SCHEMA_VERSION: "2.0"}, "major version 1 only"),
    ({}, "not a vesl region-text shard"),
    ({META_SCHEMA_VERSION: "x"}, "unreadable"),
])
def test_unknown_versions_are_refused_clearly(meta, message):
    with pytest.raises(SchemaVersionError, match=message):
        check_schema_version(meta)


def test_minor_versions_of_major_1_are_read():
    assert check_schema_version({b"vesl.schema_version": b"1.7"}) == "1.7"


def test_region_box_must_be_ordered_and_normalised():
    Region(box=(0.1, 0.2, 0.3, 0.4), phrase="cat", score=0.5, source="caption")
    for box in [(0.3, 0.2, 0.1, 0.4), (0.1, 0.2, 0.3, 1.2), (0.1, 0.4, 0.3, 0.4)]:
        with pytest.raises(ValidationError):
            Region(box=box, phrase="cat", score=0.5, source="caption")
    with pytest.raises(ValidationError):
        Region(box=(0.1, 0.2, 0.3, 0.4), phrase="cat", score=0.5, source="ocr")


def test_row_model_refuses_unknown_fields():
    row = dict(image_id="a", width=2, height=3, caption="c", phrases=[], regions=[])
    RegionRow(**row)
    with pytest.raises(ValidationError):
        RegionRow(**row, extra_column=1)
