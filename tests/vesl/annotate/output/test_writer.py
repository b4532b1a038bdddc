"""The job's writer keeps the contract: a finished batch is staged per unit, a unit commits whole with its
record (the stages' figures included), and a batch missing a column is an error, never a column of nulls."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from operators.base import METRIC_PREFIX, SECONDS_PREFIX
from schemas.columns import INPUT_SCHEMA
from schemas.region_text import REGION_TYPE
from vesl.annotate.output.writer import MissingColumnError, commit_unit, stage_unit_parts
from vesl.core.outdir import OutputDir

FOOTER = {"vesl.schema_version": "1.3"}


def finished_batch(drop: str | None = None) -> pa.Table:
    table = pa.table({
        "image_id": ["a", "b"], "image_uri": ["/x/a.jpg", "/x/b.jpg"], "image_bytes": pa.nulls(2, pa.large_binary()),
        "image_location": ["/x/a.jpg", "/x/b.jpg"], "image_offset": pa.nulls(2, pa.int64()),
        "image_length": pa.nulls(2, pa.int64()), "alt_text": ["a cat", None], "ordinal": [0, 1],
        "reject_stage": [None, "decode"], "reject_reason": [None, "not_found"], "reject_message": [None, "gone"],
        "width": pa.array([4, None], pa.int32()), "height": pa.array([3, None], pa.int32()),
        "caption": ["a cat on a mat", None], "vlm_caption": ["a cat", None], "caption_source": ["fused", None],
        "phrases": [["cat", "mat"], None],
        "regions": pa.array([[{"box": [0.1, 0.1, 0.5, 0.5], "phrase": "cat", "score": 0.4, "source": "caption"}],
                             None], pa.list_(REGION_TYPE)),
        "unit": pa.array([0, 0], pa.int64()),
        SECONDS_PREFIX + "decode": pa.array([0.25, 0.25]), SECONDS_PREFIX + "caption": pa.array([1.5, None]),
        METRIC_PREFIX + "caption.generated_tokens": pa.array([12.0, None]),
        # a count no row has (a served captioner counts no visual tokens): left out, not summed to 0
        METRIC_PREFIX + "caption.visual_tokens": pa.array([None, None], pa.float64()),
    })
    assert set(INPUT_SCHEMA.names) <= set(table.column_names)
    return table.drop_columns([drop]) if drop else table


def test_a_finished_batch_commits_as_one_row_and_one_reject_with_the_stages_figures(tmp_path):
    out = OutputDir(str(tmp_path))
    staged = stage_unit_parts(finished_batch(), out, FOOTER).to_pylist()
    assert [(s["unit"], s["inputs"], len(s["parts"])) for s in staged] == [(0, 2, 2)]
    assert dict(zip(staged[0]["stage"], zip(staged[0]["stage_rows"], staged[0]["stage_seconds"],
                                            staged[0]["stage_metrics"]))) == {
        "decode": (2, 0.5, "{}"), "caption": (1, 1.5, '{"generated_tokens": 12.0}')}
    figures = {"decode": {"rows": 2, "seconds": 0.5}, "caption": {"rows": 1, "seconds": 1.5,
                                                                "metrics": {"generated_tokens": 12.0}}}
    record = commit_unit(out, 0, 2, staged[0]["parts"], FOOTER, "zstd", stages=figures)
    assert (record["rows"], record["rejects"], record["regions"]) == (1, 1, 1)
    assert record["stages"] == {"decode": {"rows": 2, "seconds": 0.5, "rejects": {"not_found": 1}},
                                "caption": {"rows": 1, "seconds": 1.5, "rejects": {},
                                            "metrics": {"generated_tokens": 12.0}}}
    assert json.loads((tmp_path / "_vesl" / "units" / "000000000.json").read_text()) == record
    assert pq.read_table(tmp_path / "data" / "part-000000000.parquet").column("caption").to_pylist() == [
        "a cat on a mat"]
    assert pq.read_table(tmp_path / "rejects" / "part-000000000.parquet").column("reason").to_pylist() == ["not_found"]
    assert not (tmp_path / "_vesl" / "staging" / "000000000").exists()
    assert not [p for p in tmp_path.rglob(".*")]  # no staged temporary file left


@pytest.mark.parametrize("column", ["caption", "alt_text", "regions", "ordinal", "reject_message"])
def test_a_missing_column_is_an_error_not_nulls(tmp_path, column):
    with pytest.raises(MissingColumnError, match=column):
        stage_unit_parts(finished_batch(drop=column), OutputDir(str(tmp_path)), FOOTER)
    assert not (tmp_path / "_vesl").exists() and not (tmp_path / "data").exists()
