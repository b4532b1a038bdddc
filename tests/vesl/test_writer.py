"""The writer keeps the contract: a finished batch missing a column is an error, never a column of nulls."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas.columns import INPUT_SCHEMA
from schemas.region_text import REGION_TYPE
from vesl.writer import MissingColumnError, write_batch


def finished_batch(drop: str | None = None) -> pa.Table:
    table = pa.table({
        "image_id": ["a", "b"], "image_uri": ["/x/a.jpg", "/x/b.jpg"], "image_bytes": pa.nulls(2, pa.large_binary()),
        "alt_text": ["a cat", None], "ordinal": [0, 1],
        "reject_stage": [None, "decode"], "reject_reason": [None, "not_found"], "reject_message": [None, "gone"],
        "width": pa.array([4, None], pa.int32()), "height": pa.array([3, None], pa.int32()),
        "caption": ["a cat on a mat", None], "vlm_caption": ["a cat", None], "caption_source": ["fused", None],
        "phrases": [["cat", "mat"], None],
        "regions": pa.array([[{"box": [0.1, 0.1, 0.5, 0.5], "phrase": "cat", "score": 0.4, "source": "caption"}],
                             None], pa.list_(REGION_TYPE)),
    })
    assert set(INPUT_SCHEMA.names) <= set(table.column_names)
    return table.drop_columns([drop]) if drop else table


def test_a_finished_batch_becomes_one_row_and_one_reject(tmp_path):
    footer = {"vesl.schema_version": "1.0"}
    counts = write_batch(finished_batch(), str(tmp_path), "part-0.parquet", footer, None, "zstd")
    assert (counts["rows"], counts["rejects"], counts["regions"]) == (1, 1, 1)
    assert pq.read_table(tmp_path / "data" / "part-0.parquet").column("caption").to_pylist() == ["a cat on a mat"]
    assert pq.read_table(tmp_path / "rejects" / "part-0.parquet").column("reason").to_pylist() == ["not_found"]


@pytest.mark.parametrize("column", ["caption", "alt_text", "regions", "ordinal", "reject_message"])
def test_a_missing_column_is_an_error_not_nulls(tmp_path, column):
    with pytest.raises(MissingColumnError, match=column):
        write_batch(finished_batch(drop=column), str(tmp_path), "part-0.parquet", {}, None, "zstd")
    assert not (tmp_path / "data").exists()
