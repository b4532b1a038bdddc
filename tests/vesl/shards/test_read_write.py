"""Shards after a round trip through pandas or polars: inspect and read_regions read them by their columns,
and `vesl.write_regions` writes a filtered DataFrame back as proper shards."""

from __future__ import annotations

import logging

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import vesl
from schemas.region_text import META_SCHEMA_VERSION, SCHEMA_VERSION, SchemaMismatchError, region_text_schema
from tests.vesl.shards.test_inspect import SCORES, SHARD_A, SHARD_B, write_known_output
from vesl.shards.inspect import collect_stats


def _rewrite(out, tool):
    """Replace OUTPUT's shards by what TOOL writes after reading them (no filter): no vesl footer, other types."""
    for path in sorted((out / "data").glob("*.parquet")):
        if tool == "pandas":
            import pandas as pd

            pd.read_parquet(path).to_parquet(path)
        else:
            import polars as pl

            pl.read_parquet(path).write_parquet(path)
        assert META_SCHEMA_VERSION.encode() not in (pq.read_schema(path).metadata or {})


@pytest.mark.parametrize("tool", ["pandas", "polars"])
def test_inspect_and_read_regions_take_shards_rewritten_by(tool, tmp_path, caplog):
    out = write_known_output(tmp_path / "out")
    want_stats = collect_stats(str(out))
    want_regions = vesl.read_regions(str(out))
    _rewrite(out, tool)
    with caplog.at_level(logging.WARNING, logger="vesl.shards.read"):
        stats = collect_stats(str(out))
    footerless = [r for r in caplog.records if "no vesl footer" in r.message]
    assert len(footerless) == 1  # said once, not once per file
    for key in ("rows", "rejects", "regions", "phrases", "words_per_region_phrase", "scores", "accounted"):
        assert stats[key] == want_stats[key], key
    regions = vesl.read_regions(str(out))
    assert regions.equals(want_regions)
    assert regions.score.tolist() == pytest.approx(SCORES)
    images = vesl.read_regions(str(out), explode=False)
    assert images.num_regions.tolist() == [3, 0, 1, 2, 1]


def test_write_regions_round_trip_after_a_pandas_filter(tmp_path):
    out = write_known_output(tmp_path / "out")
    images = vesl.read_regions(str(out), explode=False)
    kept = images[images.image_id != "b"].copy()  # drop an image, and the low-score regions of the others
    kept["regions"] = kept.regions.map(lambda rs: [r for r in rs if r["score"] >= 0.3])
    written = vesl.write_regions(kept, str(tmp_path / "filtered"), rows_per_shard=3, row_group_rows=2)
    assert [w.rsplit("/", 1)[-1] for w in written] == ["part-00000.parquet", "part-00001.parquet"]
    first = pq.ParquetFile(written[0])
    assert first.schema_arrow.equals(region_text_schema()) and first.metadata.num_row_groups == 2
    meta = {k.decode(): v.decode() for k, v in first.schema_arrow.metadata.items()}
    assert meta[META_SCHEMA_VERSION] == SCHEMA_VERSION and meta["vesl.written_by"] == "write_regions"
    assert meta["vesl.config_hash"] == "h1" and "captioner" in meta["vesl.models"]  # carried from the source
    back = vesl.read_regions(str(tmp_path / "filtered"), explode=False)
    assert back.image_id.tolist() == ["a", "c", "d", "e"]
    assert back.num_regions.tolist() == [2, 1, 1, 1]
    want = [r for row in SHARD_A + SHARD_B if row["image_id"] != "b" for r in row["regions"] if r["score"] >= 0.3]
    got = vesl.read_regions(str(tmp_path / "filtered"))
    assert got.phrase.tolist() == [r["phrase"] for r in want]
    assert got.score.tolist() == pytest.approx([r["score"] for r in want])
    assert stats_rows(tmp_path / "filtered") == 4
    # the same folder again is refused; overwrite replaces it
    with pytest.raises(FileExistsError, match="overwrite"):
        vesl.write_regions(kept, str(tmp_path / "filtered"))
    vesl.write_regions(kept.iloc[:1], str(tmp_path / "filtered"), overwrite=True)
    assert vesl.read_regions(str(tmp_path / "filtered"), explode=False).image_id.tolist() == ["a"]
    assert not list((tmp_path / "filtered").glob("_tmp*"))


def stats_rows(path):
    return collect_stats(str(path))["rows"]


def test_write_regions_takes_polars_and_arrow_and_one_file(tmp_path):
    import polars as pl

    out = write_known_output(tmp_path / "out")
    table = pq.read_table(out / "data" / "part-1.parquet")
    frame = pl.from_arrow(table)
    [one] = vesl.write_regions(frame, str(tmp_path / "one.parquet"))
    assert one == str(tmp_path / "one.parquet")
    assert pq.read_table(one).to_pylist() == table.to_pylist()
    [again] = vesl.write_regions(table, str(tmp_path / "arrow.parquet"))
    assert pq.read_schema(again).metadata[b"vesl.config_hash"] == b"h1"  # an Arrow table carries its footer


def test_write_regions_refuses_what_would_break_the_contract(tmp_path):
    out = write_known_output(tmp_path / "out")
    images = vesl.read_regions(str(out), explode=False)
    with pytest.raises(ValueError, match="exploded frame"):
        vesl.write_regions(vesl.read_regions(str(out)), str(tmp_path / "x"))
    extra = images.assign(mine=1)
    with pytest.raises(ValueError, match=r"columns \['mine'\] are not in region-text schema v1"):
        vesl.write_regions(extra, str(tmp_path / "x"))
    vesl.write_regions(extra, str(tmp_path / "x"), drop_extra=True)
    assert "mine" not in pq.read_schema(tmp_path / "x" / "part-00000.parquet").names
    doubled = pa.concat_tables([pa.Table.from_pandas(images.iloc[:2]), pa.Table.from_pandas(images.iloc[:1])])
    with pytest.raises(SchemaMismatchError, match=r"image_id must be unique; repeated: \['a'\]"):
        vesl.write_regions(doubled, str(tmp_path / "y"))
    for bad, message in (({"box": [0.5, 0.2, 0.4, 0.6]}, "not 0 <= x0 < x1"), ({"score": 1.5}, "score outside"),
                         ({"source": "ocr"}, "source other than")):
        broken = images.copy()
        broken["regions"] = broken.regions.map(lambda rs, bad=bad: [{**r, **bad} for r in rs])
        with pytest.raises(SchemaMismatchError, match=message + ".*image_id 'a'"):
            vesl.write_regions(broken, str(tmp_path / "z"))
    ranged = images.assign(image_offset=pd.array([512, None, None, None, None], dtype="Int64"))  # no length, no tar
    with pytest.raises(SchemaMismatchError, match="1 row.*image_offset without.*the first is 'a'"):
        vesl.write_regions(ranged, str(tmp_path / "z"))
    half = images.assign(image_offset=pd.array([0.5, None, None, None, None], dtype="Float64"),
                         image_length=pd.array([9, None, None, None, None], dtype="Int64"), image_location="x.tar")
    with pytest.raises(SchemaMismatchError, match="image_offset"):  # a fraction is no byte offset
        vesl.write_regions(half, str(tmp_path / "z"))
    missing = images.drop(columns=["caption"])
    with pytest.raises(SchemaMismatchError, match="'caption' is missing"):
        vesl.write_regions(missing, str(tmp_path / "z"))
    assert not (tmp_path / "y").exists() and not (tmp_path / "z").exists()  # refused before anything is written


def test_write_regions_never_writes_into_an_annotate_output(tmp_path):
    out = write_known_output(tmp_path / "out")
    images = vesl.read_regions(str(out), explode=False)
    with pytest.raises(FileExistsError, match="data/ folder"):
        vesl.write_regions(images, str(out), overwrite=True)
    assert len(list((out / "data").glob("*.parquet"))) == 2 and (out / "rejects" / "part-1.parquet").exists()
