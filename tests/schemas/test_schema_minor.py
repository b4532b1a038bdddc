"""Schema 1.1, 1.2 and 1.3 are additive: a 1.0 shard (no vlm_caption, no caption_source, no image location, no
region spans, footer 1.0), a 1.1 shard (no image location) and a 1.2 shard (no spans) still read in inspect,
read_regions, write_regions and the trainer's data path; 1.3 readers see the new columns and fields as nulls,
and the trainer reads a 1.1 row's image from its image_uri."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from schemas.region_text import (
    META_SCHEMA_VERSION,
    REGION_TYPE,
    SCHEMA_VERSION,
    check_shard_schema,
    region_text_schema,
)

ROWS = [
    {"image_id": "a", "image_uri": None, "image_bytes": None, "width": 64, "height": 48, "alt_text": "a red circle",
     "caption": "a red circle on a gray background", "phrases": ["red circle"],
     "regions": [{"box": [0.1, 0.1, 0.5, 0.6], "phrase": "red circle", "score": 0.9, "source": "caption"}]},
    {"image_id": "b", "image_uri": None, "image_bytes": None, "width": 64, "height": 48, "alt_text": None,
     "caption": "a blue square", "phrases": [], "regions": []},
]


LOCATION = ("image_location", "image_offset", "image_length")


def write_v10_shard(folder, with_images: bytes | None = None, version: str = "1.0", uri: str | None = None):
    """A shard exactly as vesl 1.0 (or 1.1, 1.2) wrote it: its columns and its footer."""
    dropped = (LOCATION if version in ("1.0", "1.1") else ()) + (("vlm_caption", "caption_source")
                                                                 if version == "1.0" else ())
    old_region = pa.struct([f for f in REGION_TYPE if f.name != "spans"])  # spans came in 1.3
    fields = [f.with_type(pa.list_(old_region)) if f.name == "regions" else f
              for f in region_text_schema() if f.name not in dropped]
    schema = pa.schema(fields, metadata={META_SCHEMA_VERSION: version, "vesl.version": "0.1.0"})
    rows = [dict(r, image_bytes=with_images, image_uri=uri) for r in ROWS]
    (folder / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), folder / "data" / "part-0.parquet")
    return folder


def test_the_version_is_a_minor_step_of_major_1():
    assert SCHEMA_VERSION == "1.3"
    assert {"vlm_caption", "caption_source", *LOCATION} <= set(region_text_schema().names)
    assert "spans" in REGION_TYPE.names and REGION_TYPE.field("spans").nullable


def test_a_v10_shard_reads_in_inspect_and_read_regions(tmp_path):
    import vesl
    from vesl.shards.inspect import collect_stats

    out = write_v10_shard(tmp_path / "out")
    checked = check_shard_schema(pq.read_schema(out / "data" / "part-0.parquet"))
    assert checked.version == "1.0" and set(checked.filled) == {"vlm_caption", "caption_source", *LOCATION}
    assert "regions[].spans: missing -> nulls" in checked.casts
    assert list(vesl.read_regions(str(out))["phrase"]) == ["red circle"]
    df = vesl.read_regions(str(out), explode=False)
    assert list(df["image_id"]) == ["a", "b"] and df["vlm_caption"].isna().all() and df["caption_source"].isna().all()
    assert df["image_location"].isna().all() and df["image_offset"].isna().all()
    stats = collect_stats(str(out))
    assert stats["rows"] == 2 and stats["regions"]["total"] == 1 and stats["footer"]["schema_version"] == ["1.0"]


def test_a_v10_shard_feeds_the_trainer(tmp_path, tiny_dir):
    from tests.conftest import encode, photo
    from vesl.cloc.data import DataConfig, iter_prepared
    from vesl.core.outdir import find_shards

    out = write_v10_shard(tmp_path / "out", with_images=encode(photo(64, 48)))
    batches = list(iter_prepared(find_shards(str(out)), tokenizer=str(tiny_dir / "clip"), revision=None,
                                 image_size=32, caption_max_tokens=16, config=DataConfig(), batch_rows=8))
    assert sum(int(b["ok"].sum()) for b in batches) == 2
    assert sum(int(b["region_valid"].sum()) for b in batches) == 1
    from vesl.cloc.data import read_shard_files  # the Ray Data reader `vesl train` maps over the shard files

    tables = list(read_shard_files(pa.table({"uri": find_shards(str(out))}), None, batch_rows=8))
    assert sum(t.num_rows for t in tables) == 2 and tables[0].column("caption").to_pylist()[0].startswith("a red")


def test_a_v11_shard_without_locations_reads_its_images_from_image_uri(tmp_path, tiny_dir):
    """1.1 rows have no image_location: the trainer and read_regions(with_images=True) fall back to image_uri."""
    import vesl
    from tests.conftest import encode, photo
    from vesl.cloc.data import DataConfig, iter_prepared
    from vesl.core.outdir import find_shards

    data = encode(photo(64, 48))
    (tmp_path / "a.jpg").write_bytes(data)
    out = write_v10_shard(tmp_path / "out", version="1.1", uri=str(tmp_path / "a.jpg"))
    assert set(check_shard_schema(pq.read_schema(out / "data" / "part-0.parquet")).filled) == set(LOCATION)
    batches = list(iter_prepared(find_shards(str(out)), tokenizer=str(tiny_dir / "clip"), revision=None,
                                 image_size=32, caption_max_tokens=16, config=DataConfig(), batch_rows=8))
    assert sum(int(b["ok"].sum()) for b in batches) == 2
    df = vesl.read_regions(str(out), explode=False, with_images=True)
    assert list(df["image_bytes"]) == [data, data] and df["image_error"].isna().all()


def test_a_v12_shard_reads_with_null_spans_and_writes_back_as_13(tmp_path):
    import vesl

    out = write_v10_shard(tmp_path / "out", version="1.2")
    df = vesl.read_regions(str(out), explode=False)
    assert df["regions"][0][0]["spans"] is None and df["regions"][0][0]["phrase"] == "red circle"
    assert vesl.read_regions(str(out))["spans"].isna().all()
    [written] = vesl.write_regions(df, str(tmp_path / "back"))
    assert pq.read_schema(written).metadata[META_SCHEMA_VERSION.encode()] == b"1.3"
    assert pq.read_table(written).column("regions").to_pylist()[0][0]["spans"] is None
