"""The annotate job end to end on local Ray with tiny models."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO, SAMPLE, encode, photo
from tests.pipelines.helpers import EXPECTED, annotate_here, assert_accounted, make_manifest, read_output
from vesl.annotate.config import load_config
from vesl.annotate.job import run_annotate
from vesl.errors import OutputConflictError

pytestmark = pytest.mark.slow


def assert_stage_figures_add_up_to_the_funnel(manifest, config):
    """`stages.<name>` (summed on the workers, per unit, then over the records) has rows, rejects and seconds
    for every active stage, and they are the funnel's: rows in = entered, rejects = rejected."""
    from vesl.shards.inspect import collect_stats, format_summary

    stages, steps = manifest["stages"], {s["stage"]: s for s in manifest["counts"]["funnel"]}
    assert list(stages) == [s.name for s in config.active_stages()] == list(steps)[1:]
    for name, figures in stages.items():
        assert figures["rows"] == steps[name]["entered"], name
        assert sum(figures["rejects"].values()) == steps[name]["rejected"], name
        assert {f"{name}/{r}": n for r, n in figures["rejects"].items()} == {
            k: n for k, n in manifest["counts"]["by_reason"].items() if k.startswith(f"{name}/")}
        assert figures["seconds"] > 0 and figures["rows_per_s"] == pytest.approx(figures["rows"] / figures["seconds"],
                                                                                  rel=0.01)  # seconds are rounded
    stats = collect_stats(manifest["output"])
    assert stats["stages"] == stages
    assert "rows/s" in format_summary(stats) and "decode" in format_summary(stats)


def test_pandas_reads_the_shards_with_schema_v1_types(sample_output):
    """The shared sample OUTPUT (tiny models, images embedded: tests/conftest.py SAMPLE_SETTINGS)."""
    df = pd.read_parquet(sample_output / "data")
    assert list(df.columns) == ["image_id", "image_uri", "image_bytes", "image_location", "image_offset",
                                "image_length", "width", "height", "alt_text", "caption", "vlm_caption",
                                "caption_source", "phrases", "regions"]
    assert (df["image_location"] == df["image_uri"]).all() and df["image_offset"].isna().all()  # local files
    assert str(df["width"].dtype) == "int32" and len(df) == 6
    assert df["image_bytes"].map(lambda b: b[:2] == b"\xff\xd8").all()  # JPEG bytes, trainer-ready
    box = df["regions"].map(list).explode().dropna().iloc[0]["box"]
    assert box.dtype.name == "float32" and len(box) == 4


def test_img2dataset_parquet_with_embedded_bytes_and_webdataset_tars(tmp_path, model_free, ray_local):
    """The readers (the model-free chain: tests/pipelines/test_img2dataset.py runs these layouts, as the real
    img2dataset writes them, through the tiny models)."""
    images = [encode(photo(40 + i * 7, 30, seed=i)) for i in range(3)]
    pq.write_table(pa.table({"key": ["k0", "k1", "k2"], "jpg": images, "caption": ["a dog", "", None]}),
                   tmp_path / "shard.parquet")
    config = load_config()
    run_annotate(str(tmp_path / "shard.parquet"), str(tmp_path / "out1"), config)
    rows, rejects, manifest = read_output(tmp_path / "out1")
    assert_accounted(rows, rejects, manifest, {"k0": None, "k1": None, "k2": None})
    alts = dict(zip(rows["image_id"], rows["alt_text"]))
    assert (alts["k0"], alts["k1"]) == ("a dog", "") and pd.isna(alts["k2"])

    shards = tmp_path / "tars"
    shards.mkdir()
    for n in range(2):
        with tarfile.open(shards / f"{n:05d}.tar", "w") as tar:
            for i in range(2):
                key = f"{n:05d}{i:04d}"
                for suffix, data in (("jpg", images[i]), ("txt", b"a small red car")):
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    run_annotate(str(shards), str(tmp_path / "out2"), config)
    rows, rejects, manifest = read_output(tmp_path / "out2")
    assert manifest["input_format"] == "webdataset"
    assert_accounted(rows, rejects, manifest, {k: None for k in ("000000000", "000000001", "000010000", "000010001")})


def test_an_existing_output_is_refused_unless_overwrite(tmp_path, model_free, ray_local):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(OutputConflictError, match="holds no vesl run"):
        run_annotate(str(SAMPLE / "manifest.jsonl"), str(tmp_path / "out"), load_config())
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]  # as it was: not even a lease left


def test_the_script_entry_point_on_a_manifest_with_broken_inputs(tmp_path, tiny_dir, ray_local, capfd):
    """`python pipelines/annotate.py MANIFEST OUT --preset tiny`, as a user runs it (own Ray instance), on valid and
    broken inputs: every input a row or a specific reject, the labels traceable to their models and text. Then the
    same command line again, here on the session's Ray: it resumes, nothing is left to do, nothing is doubled."""
    manifest = make_manifest(tmp_path / "in")
    flags = ["--preset", "tiny", "--set", "output.rows_per_part=4"]
    config = load_config(preset_name="tiny", overrides=["output.rows_per_part=4"])
    env = {**os.environ, "VESL_TINY_DIR": str(tiny_dir), "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": ""}
    proc = subprocess.run([sys.executable, str(REPO / "pipelines" / "annotate.py"), str(manifest),
                           str(tmp_path / "out"), *flags],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "9 inputs -> 5 rows" in proc.stdout, proc.stdout
    rows, rejects, written = read_output(tmp_path / "out")
    assert_accounted(rows, rejects, written, EXPECTED)
    assert set(rejects["stage"]) == {"decode"}
    sizes = rows.set_index("image_id")[["width", "height"]].to_dict("index")
    assert sizes["wide"] == {"width": 120, "height": 60} and sizes["tall"] == {"width": 50, "height": 140}
    assert all(len(p) > 0 for p in rows["phrases"])  # alt-text phrases at least
    assert rows["regions"].map(len).sum() == written["counts"]["regions"] > 0
    assert all(r["source"] in ("caption", "alt_text") and r["phrase"] in set(p)
               for regions, p in zip(rows["regions"], rows["phrases"]) for r in regions)
    from operators.phrases import phrase_of_text

    spans = [(row[r["source"]], r["phrase"], s) for row in rows.to_dict("records") for r in row["regions"]
             for s in r["spans"]]  # schema 1.3: every region says where its phrase stands in its text
    assert spans and all(phrase_of_text(text[a:b]) == phrase for text, phrase, (a, b) in spans)
    assert all(len(r["spans"]) >= 1 for regions in rows["regions"] for r in regions)
    meta = pq.read_schema(written["files"][0]).metadata
    models = json.loads(meta[b"vesl.models"])
    assert models["detector"]["id"] == str(tiny_dir / "detector")
    assert json.loads(meta[b"vesl.thresholds"])["detect_threshold"] == 0.1
    assert meta[b"vesl.config_hash"].decode() == config.label_hash()
    assert not [p for p in (tmp_path / "out" / "_vesl").rglob("*") if "staging" in p.parts and p.is_file()]
    record = json.loads((tmp_path / "out" / "_vesl" / "units" / "000000000.json").read_text())
    assert (record["inputs"], record["rows"], record["rejects"]) == (9, 5, 4)  # the unit's own check, recorded
    assert_stage_figures_add_up_to_the_funnel(written, config)

    code, printed, err = annotate_here(capfd, str(manifest), str(tmp_path / "out"), *flags)
    # the same command again resumes: nothing is left to do, nothing is doubled
    assert code == 0, err[-3000:]
    assert "resumed: 0 processed now" in printed
    rows, rejects, manifest_json = read_output(tmp_path / "out")
    assert_accounted(rows, rejects, manifest_json, EXPECTED)
    result = run_annotate(str(manifest), str(tmp_path / "out"), config)  # what the job returns is what it wrote
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == json.loads(json.dumps(result, default=str))


def test_a_missing_input_leaves_output_untouched(tmp_path, model_free, ray_local):
    with pytest.raises(FileNotFoundError):
        run_annotate(str(tmp_path / "no-such-manifest.jsonl"), str(tmp_path / "out"), load_config())
    assert not (tmp_path / "out").exists()
