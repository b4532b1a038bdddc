"""`vesl inspect` statistics and `vesl.read_regions` on a small output whose every figure is known."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import vesl
from schemas.region_text import META_SCHEMA_VERSION, REJECT_SCHEMA, SCHEMA_VERSION, region_text_schema
from tests.conftest import encode, photo
from vesl.shards.inspect import HIST_CAP, collect_stats, format_summary, one_line, sample_key

MODELS = {"captioner": {"id": "Salesforce/blip-image-captioning-large", "revision": "abc", "class": "Blip"},
          "detector": {"id": "google/owlv2-base-patch16-ensemble", "revision": "def", "class": "Owlv2"}}
THRESHOLDS = {"detect_threshold": 0.1, "nms_iou": None}


def region(box, phrase, score, source="caption"):
    return {"box": list(box), "phrase": phrase, "score": score, "source": source}


# Two shard files: 5 images, 7 regions, 1 image without regions.
SHARD_A = [
    {"image_id": "a", "width": 200, "height": 100, "caption": "a red car and a small dog", "alt_text": "car",
     "phrases": ["red car", "small dog", "car"],
     "regions": [region((0.1, 0.2, 0.5, 0.6), "red car", 0.9), region((0.5, 0.5, 1.0, 1.0), "small dog", 0.4),
                 region((0.0, 0.0, 0.25, 0.5), "car", 0.15, "alt_text")]},
    {"image_id": "b", "width": 64, "height": 64, "caption": "an empty street", "alt_text": None,
     "phrases": ["empty street"], "regions": []},
    {"image_id": "c", "width": 50, "height": 80, "caption": "a red car", "alt_text": "Red car for sale",
     "phrases": ["red car"], "regions": [region((0.2, 0.2, 0.4, 0.9), "red car", 0.7)]},
]
SHARD_B = [
    {"image_id": "d", "width": 300, "height": 300, "caption": "a big old tree near a lake", "alt_text": "tree",
     "phrases": ["big old tree", "lake", "tree"],
     "regions": [region((0.3, 0.1, 0.7, 0.9), "big old tree", 0.55), region((0.0, 0.6, 1.0, 1.0), "lake", 0.25)]},
    {"image_id": "e", "width": 10, "height": 20, "caption": "<script>alert(1)</script> a red car",
     "alt_text": "red car", "phrases": ["red car"], "regions": [region((0.0, 0.0, 1.0, 1.0), "red car", 0.3)]},
]
REJECTS = [
    {"image_id": "x", "image_uri": "/nowhere/x.jpg", "stage": "decode", "reason": "not_found",
     "message": "FileNotFoundError: /nowhere/x.jpg", "ordinal": 5},
    {"image_id": "y", "image_uri": "/data/y.jpg", "stage": "decode", "reason": "corrupt_image",
     "message": "broken data stream", "ordinal": 6},
    {"image_id": "z", "image_uri": "/data/z.jpg", "stage": "decode", "reason": "not_found", "message": "gone",
     "ordinal": 7},
]
SCORES = [0.9, 0.4, 0.15, 0.7, 0.55, 0.25, 0.3]


def footer() -> dict[str, str]:
    return {META_SCHEMA_VERSION: SCHEMA_VERSION, "vesl.version": "0.1.0", "vesl.models": json.dumps(MODELS),
            "vesl.thresholds": json.dumps(THRESHOLDS), "vesl.config_hash": "h1"}


def write_known_output(root: Path, image_dir: Path | None = None) -> Path:
    """OUTPUT in annotate's layout: data/ (two shards), rejects/, manifest.json."""
    (root / "data").mkdir(parents=True)
    (root / "rejects").mkdir()
    for name, rows in (("part-1", SHARD_A), ("part-2", SHARD_B)):
        full = [{"image_uri": str(image_dir / f"{r['image_id']}.jpg") if image_dir else None, "image_bytes": None,
                 **r} for r in rows]
        table = pa.Table.from_pylist(full, schema=region_text_schema(footer()))
        pq.write_table(table, root / "data" / f"{name}.parquet")
    pq.write_table(pa.Table.from_pylist(REJECTS, schema=REJECT_SCHEMA), root / "rejects" / "part-1.parquet")
    (root / "manifest.json").write_text(json.dumps({"run_id": "r1", "input": "in.jsonl", "counts": {"inputs": 8}}))
    return root


def test_statistics_of_a_known_output(tmp_path):
    stats = collect_stats(str(write_known_output(tmp_path / "out")))
    assert (stats["images"], stats["rows"], stats["rejects"], stats["shards"]) == (8, 5, 3, 2)
    assert stats["accounted"] is True
    assert stats["by_reason"] == {"decode/corrupt_image": 1, "decode/not_found": 2}
    assert stats["by_stage"] == {"decode": 3}
    assert [s["passed"] for s in stats["funnel"]] == [8, 5, 5, 5, 5, 5]
    assert stats["reject_examples"]["decode/not_found"][0]["image_id"] == "x"
    reg = stats["regions"]
    assert reg["total"] == 7 and reg["images_without_regions"] == 1
    assert reg["per_image_mean"] == pytest.approx(7 / 5)
    assert reg["per_image_histogram"][:4] == [1, 2, 1, 1] and sum(reg["per_image_histogram"]) == 5
    assert len(reg["per_image_histogram"]) == HIST_CAP + 1
    assert stats["phrases"]["per_image_mean"] == pytest.approx(9 / 5)  # 3 + 1 + 1 + 3 + 1 candidates
    assert stats["phrases"]["distinct_region_phrases"] == 5
    # words per region phrase: red car 2, small dog 2, car 1, red car 2, big old tree 3, lake 1, red car 2
    assert stats["words_per_region_phrase"]["mean"] == pytest.approx(13 / 7)
    assert stats["words_per_region_phrase"]["histogram"] == {"1": 2, "2": 4, "3": 1}
    q = stats["scores"]["quantiles"]
    assert q["p0"] == pytest.approx(0.15) and q["p100"] == pytest.approx(0.9)
    assert q["p50"] == pytest.approx(float(np.quantile(np.float32(SCORES), 0.5)))
    assert sum(stats["scores"]["histogram"]) == 7 and stats["scores"]["histogram"][18] == 1  # 0.9 in [0.90, 0.95)
    assert stats["sources"] == {"caption": 6, "alt_text": 1}
    assert stats["top_phrases"][0] == ("red car", 3)
    assert stats["footer"]["models"] == [MODELS] and stats["footer"]["thresholds"] == [THRESHOLDS]
    assert stats["paper"] == {"regions_per_image": 11.5, "words_per_phrase": 2.1}
    text = format_summary(stats)
    assert "8 inputs -> 5 rows + 3 rejects" in text and "1.40 per image (paper: ~11.5)" in text
    assert "1.86 per region phrase (paper: ~2.1)" in text
    assert "decode/not_found 2" in text and "google/owlv2-base-patch16-ensemble" in text
    assert one_line(stats).startswith("vesl inspect: 8 images -> 5 rows, 3 rejects, 7 regions (1.40/image")


def test_unaccounted_output_is_flagged(tmp_path):
    out = write_known_output(tmp_path / "out")
    (out / "manifest.json").write_text(json.dumps({"counts": {"inputs": 9}}))
    stats = collect_stats(str(out))
    assert stats["accounted"] is False
    assert "NOT accounted" in format_summary(stats)


def test_sample_is_seeded_and_independent_of_file_order(tmp_path):
    out = write_known_output(tmp_path / "out")
    ids = [r["image_id"] for r in SHARD_A + SHARD_B]
    first = [r["image_id"] for r in collect_stats(str(out), sample=3, seed=7)["sample"]]
    assert first == sorted(ids, key=lambda i: sample_key(i, 7))[:3]
    assert [r["image_id"] for r in collect_stats(str(out), sample=3, seed=7)["sample"]] == first
    other = [r["image_id"] for r in collect_stats(str(out), sample=3, seed=8)["sample"]]
    assert other == sorted(ids, key=lambda i: sample_key(i, 8))[:3]
    assert len(collect_stats(str(out), sample=50)["sample"]) == 5


def test_read_regions_exploded(tmp_path):
    out = write_known_output(tmp_path / "out")
    df = vesl.read_regions(str(out))
    assert len(df) == 7
    assert list(df.columns) == ["image_id", "image_uri", "width", "height", "region", "phrase", "score", "source",
                                "spans", "x0", "y0", "x1", "y1", "x0_px", "y0_px", "x1_px", "y1_px"]
    assert df["image_id"].tolist() == ["a", "a", "a", "c", "d", "d", "e"]
    assert df["region"].tolist() == [0, 1, 2, 0, 0, 1, 0]
    assert "b" not in set(df["image_id"])  # no regions, no row
    row = df.iloc[1]  # image a (200 x 100), small dog at (0.5, 0.5, 1.0, 1.0)
    assert (row["phrase"], row["source"]) == ("small dog", "caption")
    assert row["score"] == pytest.approx(0.4)
    assert (row["x0"], row["y0"], row["x1"], row["y1"]) == pytest.approx((0.5, 0.5, 1.0, 1.0))
    assert (row["x0_px"], row["y0_px"], row["x1_px"], row["y1_px"]) == pytest.approx((100, 50, 200, 100))
    c = df[df["image_id"] == "c"].iloc[0]  # 50 x 80
    assert (c["x0_px"], c["y0_px"], c["x1_px"], c["y1_px"]) == pytest.approx((10, 16, 20, 72), abs=1e-4)
    assert df["score"].tolist() == pytest.approx(SCORES)
    # the same from one shard file, and the recipe's pandas operations work on it
    one = vesl.read_regions(str(out / "data" / "part-2.parquet"))
    assert one["image_id"].tolist() == ["d", "d", "e"]
    assert df.groupby("image_id").size().to_dict() == {"a": 3, "c": 1, "d": 2, "e": 1}


def test_read_regions_per_image(tmp_path):
    out = write_known_output(tmp_path / "out")
    df = vesl.read_regions(str(out), explode=False)
    assert df["image_id"].tolist() == ["a", "b", "c", "d", "e"]
    assert df["num_regions"].tolist() == [3, 0, 1, 2, 1]
    assert df["image_bytes"].isna().all()  # what the shards carry: here nothing
    assert "image_bytes" not in vesl.read_regions(str(out), explode=False, with_images=False).columns
    assert df.iloc[0]["regions"][0]["phrase"] == "red car"
    assert list(df.iloc[0]["phrases"]) == ["red car", "small dog", "car"]
    with pytest.warns(UserWarning, match="5 of 5 image"):  # no bytes, no location, no URI: each row says so
        read = vesl.read_regions(str(out), explode=False, with_images=True)
    assert read["image_bytes"].isna().all() and read["image_error"].str.startswith("missing_input").all()


def test_read_regions_refuses_what_is_not_a_shard(tmp_path):
    pq.write_table(pa.table({"x": [1]}), tmp_path / "other.parquet")
    with pytest.raises(ValueError, match="not a vesl region-text shard"):
        vesl.read_regions(str(tmp_path / "other.parquet"))
    with pytest.raises(FileNotFoundError):
        vesl.read_regions(str(tmp_path / "missing"))


@pytest.mark.slow
def test_inspect_command_writes_report_and_json(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for r in SHARD_A + SHARD_B:
        if r["image_id"] != "c":  # c's file is missing: its card says so, the report still renders
            (images / f"{r['image_id']}.jpg").write_bytes(encode(photo(r["width"], r["height"], seed=1)))
    out = write_known_output(tmp_path / "out", image_dir=images)
    result = subprocess.run([sys.executable, "-m", "vesl.cli", "inspect", str(out), "--out", str(tmp_path / "r.html"),
                             "--sample", "5", "--json", str(tmp_path / "s.json")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith("vesl inspect: 8 images -> 5 rows")
    page = (tmp_path / "r.html").read_text()
    assert page.count('class="card"') == 5 and page.count('class="box') == 7
    assert page.count("data:image/jpeg;base64,") == 4
    assert page.count("image not available: DecodeError: no such file") == 1
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")  # nothing fetched from a network
    assert json.loads((tmp_path / "s.json").read_text())["regions"]["total"] == 7
    missing = subprocess.run([sys.executable, "-m", "vesl.cli", "inspect", str(tmp_path / "nothing")],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "vesl inspect: error:" in missing.stderr


def test_report_cards_clip_long_texts_and_fit_pictures():
    from vesl.shards.report import FRAME_MAX, clip, frame_size

    assert clip("<b>" * 10, limit=1000) == "&lt;b&gt;" * 10
    long = clip("a red car " * 8000)  # an 80 KB alt-text
    assert len(long) < 1000 and "79600 more characters" in long
    assert clip(None) == ""
    for w, h in ((40, 30), (20, 60), (4000, 1000), (1, 1)):
        fw, fh = frame_size(w, h)
        assert fw / fh == pytest.approx(w / h) and fw <= FRAME_MAX[0] + 1e-9 and fh <= FRAME_MAX[1] + 1e-9
        assert fw == pytest.approx(FRAME_MAX[0]) or fh == pytest.approx(FRAME_MAX[1])
