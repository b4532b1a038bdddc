import pyarrow as pa
import pytest
from pydantic import ValidationError

from schemas.region_text import (
    META_SCHEMA_VERSION,
    Region,
    RegionRow,
    SchemaVersionError,
    check_schema_version,
    region_text_schema,
)


def test_schema_v1_columns_and_types():
    schema = region_text_schema()
    assert schema.names == ["image_id", "image_uri", "image_bytes", "image_location", "image_offset", "image_length",
                            "width", "height", "alt_text", "caption", "vlm_caption", "caption_source", "phrases",
                            "regions"]
    assert schema.field("vlm_caption").nullable and schema.field("caption_source").nullable  # 1.0 files read
    assert all(schema.field(c).nullable for c in ("image_location", "image_offset", "image_length"))  # 1.1 files read
    assert schema.field("image_offset").type == pa.int64() == schema.field("image_length").type
    assert schema.field("width").type == pa.int32()
    region = schema.field("regions").type.value_type
    assert region.field("box").type == pa.list_(pa.float32(), 4)
    assert region.field("score").type == pa.float32()
    assert [f.name for f in region] == ["box", "phrase", "score", "source", "spans"]
    assert region.field("spans").type == pa.list_(pa.list_(pa.int32(), 2)) and region.field("spans").nullable


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


def test_a_byte_range_needs_its_location_and_both_ends():
    row = dict(image_id="a", width=2, height=3, caption="c", phrases=[], regions=[])
    RegionRow(**row, image_location="s3://b/0.tar", image_offset=512, image_length=9)
    RegionRow(**row, image_location="/data/a.jpg")
    for bad in ({"image_offset": 512, "image_length": 9}, {"image_location": "x.tar", "image_offset": 512},
                {"image_location": "x.tar", "image_offset": -1, "image_length": 9}):
        with pytest.raises(ValidationError):
            RegionRow(**row, **bad)


# Shards rewritten by pandas or polars lose vesl's footer and change types; they are read by their columns.

def _v1_table(n=2):
    from schemas.region_text import META_SCHEMA_VERSION

    rows = [{"image_id": f"i{k}", "image_uri": None, "image_bytes": None, "width": 10, "height": 20, "alt_text": "a",
             "caption": "a dog", "phrases": ["dog"],
             "regions": [{"box": [0.1, 0.2, 0.5, 0.9], "phrase": "dog", "score": 0.5, "source": "caption"}]}
            for k in range(n)]
    return pa.Table.from_pylist(rows, schema=region_text_schema({META_SCHEMA_VERSION: "1.0"}))


@pytest.mark.parametrize("writer", ["pandas", "polars"])
def test_a_shard_written_back_by_pandas_or_polars_is_accepted_by_its_columns(tmp_path, writer):
    import pyarrow.parquet as pq

    from schemas.region_text import check_shard_schema, conform_table

    path = tmp_path / "shard.parquet"
    df = _v1_table().to_pandas()
    if writer == "pandas":
        df.to_parquet(path)
    else:
        import polars as pl

        pl.from_arrow(_v1_table()).write_parquet(path)
    schema = pq.read_schema(path)
    assert schema != region_text_schema()  # the types really changed on the way
    check = check_shard_schema(schema, str(path))
    assert check.version is None and check.casts
    if writer == "pandas":
        assert "regions[].score: double -> float" in check.casts
        assert "regions[].box: list -> fixed_size_list[4]" in check.casts
    else:
        assert "phrases: large_list -> list" in check.casts
    table = conform_table(pq.read_table(path), str(path))
    assert table.schema.equals(region_text_schema()) and table.to_pylist() == _v1_table().to_pylist()


def test_columns_missing_or_of_another_kind_are_refused_by_name():
    from schemas.region_text import SchemaMismatchError, check_shard_schema

    schema = _v1_table().schema
    with pytest.raises(SchemaMismatchError, match="column 'caption' .* is missing"):
        check_shard_schema(schema.remove(schema.get_field_index("caption")))
    # a nullable column may be absent: it reads as nulls
    assert check_shard_schema(schema.remove(schema.get_field_index("image_bytes"))).filled == ("image_bytes",)
    score_as_text = pa.list_(pa.struct([("box", pa.list_(pa.float32())), ("phrase", pa.string()),
                                        ("score", pa.string()), ("source", pa.string())]))
    with pytest.raises(SchemaMismatchError, match=r"regions\[\]\.score is string"):
        check_shard_schema(schema.set(schema.get_field_index("regions"), pa.field("regions", score_as_text)))
    no_source = pa.list_(pa.struct([("box", pa.list_(pa.float32(), 4)), ("phrase", pa.string()),
                                    ("score", pa.float32())]))
    with pytest.raises(SchemaMismatchError, match=r"regions\[\]\.source is missing"):
        check_shard_schema(schema.set(schema.get_field_index("regions"), pa.field("regions", no_source)))
    # a vesl footer of another major version is refused before the columns are looked at
    with pytest.raises(SchemaVersionError, match="major version 1 only"):
        check_shard_schema(schema.with_metadata({META_SCHEMA_VERSION: "2.0"}))


def test_values_that_do_not_fit_v1_are_refused_naming_the_column():
    from schemas.region_text import SchemaMismatchError, conform_table

    table = _v1_table().to_pandas()
    short_box = table.copy()
    short_box["regions"] = [[{"box": [0.1, 0.2, 0.5], "phrase": "dog", "score": 0.5, "source": "caption"}]] * 2
    with pytest.raises(SchemaMismatchError, match="column 'regions' does not fit"):
        conform_table(pa.Table.from_pandas(short_box), "t")
    no_caption = table.copy()
    no_caption.loc[1, "caption"] = None
    with pytest.raises(SchemaMismatchError, match=r"column 'caption' has 1 null"):
        conform_table(pa.Table.from_pandas(no_caption), "t")
