"""The real img2dataset (1.47, in its own venv made by scripts/setup-img2dataset.sh) downloads images
served on 127.0.0.1 into its three output layouts; `vesl annotate` reads each folder as img2dataset
wrote it: one row per image it saved, key -> image_id, caption -> alt_text, url -> image_uri, and one
reject per row it failed, with img2dataset's own status and error."""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import socket
import subprocess
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO, SAMPLE, encode, photo
from tests.pipelines.helpers import read_output
from vesl.annotate.config import load_config
from vesl.annotate.job import run_annotate

pytestmark = pytest.mark.slow
IMG2DATASET = REPO / ".venv-img2dataset" / "bin" / "img2dataset"


SERVER = {"requests": 0, "stopped": False}  # the image server's request count; stopped: it answers nothing


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """An HTTP server on 127.0.0.1 over a folder of images (and one file that is not an image)."""
    root = tmp_path_factory.mktemp("www")
    for image in sorted((SAMPLE / "images").glob("*.jpg")):
        shutil.copy(image, root / image.name)
    (root / "wide.png").write_bytes(encode(photo(300, 100, seed=3), "PNG"))
    (root / "fake.jpg").write_text("<html>not an image</html>")
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # no access log in the test output
            pass

        def do_GET(self):  # noqa: N802 - http.server's name
            SERVER["requests"] += 1
            if SERVER["stopped"]:  # "stopped": every request is counted and refused
                self.send_error(503, "stopped")
                return
            super().do_GET()

    handler = functools.partial(Quiet, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with socket.socket() as s:  # a port nothing listens on: connection refused
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    base = f"http://127.0.0.1:{server.server_address[1]}"
    urls = [(f"{base}/{p.name}", f"photo of {p.stem}") for p in sorted((SAMPLE / "images").glob("*.jpg"))]
    urls += [(f"{base}/wide.png", "a wide picture"), (f"{base}/missing.jpg", "a missing one"),
             (f"{base}/fake.jpg", "a page, not a picture"), (f"http://127.0.0.1:{closed}/x.jpg", "nobody home")]
    yield urls
    server.shutdown()


@pytest.fixture(scope="module")
def img2dataset_outputs(served, tmp_path_factory):
    if not IMG2DATASET.exists():
        pytest.fail(f"{IMG2DATASET} is missing: run scripts/setup-img2dataset.sh (scripts/test.sh does)")
    root = tmp_path_factory.mktemp("img2dataset")
    pq.write_table(pa.table({"url": [u for u, _ in served], "caption": [c for _, c in served]}), root / "urls.parquet")
    outputs = {}
    for layout in ("webdataset", "parquet", "files"):
        out = root / layout
        proc = subprocess.run(
            [str(IMG2DATASET), "--url_list", str(root / "urls.parquet"), "--input_format", "parquet",
             "--url_col", "url", "--caption_col", "caption", "--output_format", layout, "--output_folder", str(out),
             "--enable_wandb", "False", "--distributor", "multiprocessing", "--processes_count", "1",
             "--thread_count", "4", "--image_size", "128", "--number_sample_per_shard", "6", "--timeout", "5"],
            env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        outputs[layout] = out
    return outputs


def _statuses(folder):
    """img2dataset's own record of every row it tried: its status tables, all shards."""
    tables = [pq.read_table(p, columns=["key", "url", "caption", "status", "error_message"])
              for p in sorted(folder.glob("*.parquet"))]
    return pa.concat_tables(tables).to_pylist()


@pytest.mark.parametrize("layout", ["webdataset", "parquet", "files"])
def test_annotate_reads_img2dataset_output_as_written(layout, img2dataset_outputs, served, tiny_dir, ray_local,
                                                      tmp_path):
    folder = img2dataset_outputs[layout]
    expected_files = {"webdataset": {".tar", ".parquet", ".json"}, "parquet": {".parquet", ".json"},
                      "files": {".parquet", ".json", ""}}[layout]
    assert {p.suffix for p in folder.iterdir()} == expected_files  # as img2dataset writes it, sidecars included
    assert len(list(folder.glob("*_stats.json"))) == 2  # 10 urls, 6 per shard
    statuses = _statuses(folder)
    assert len(statuses) == len(served)
    ok = {r["key"]: r for r in statuses if r["status"] == "success"}
    failed = {r["key"]: r for r in statuses if r["status"] != "success"}
    assert len(ok) == 7 and {r["status"] for r in failed.values()} == {"failed_to_download", "failed_to_resize"}

    manifest = run_annotate(str(folder), str(tmp_path / "out"), load_config(preset_name="tiny"))
    rows, rejects, written = read_output(tmp_path / "out")
    assert written["input_format"].startswith(
        {"webdataset": "webdataset", "parquet": "manifest", "files": "folder"}[layout])
    assert "img2dataset" in written["input_format"]
    # one row per image img2dataset wrote, carrying its key, caption and url
    assert sorted(rows.image_id) == sorted(ok)
    for row in rows.itertuples():
        assert (row.alt_text, row.image_uri) == (ok[row.image_id]["caption"], ok[row.image_id]["url"])
        assert max(row.width, row.height) == 128  # img2dataset's resized image, not a re-download
    where = {"webdataset": ".tar", "parquet": None, "files": ".jpg"}[layout]  # where each image can be read again
    shard = pq.read_table(next((tmp_path / "out" / "data").glob("*.parquet")))
    locations = shard.column("image_location").to_pylist()
    assert all(loc is None for loc in locations) if where is None else all(loc.endswith(where) for loc in locations)
    assert (shard.column("image_offset").null_count == 0) == (layout == "webdataset")
    # one reject per row it failed, with img2dataset's status and error, not a second download
    assert sorted(rejects.image_id) == sorted(failed)
    for reject in rejects.itertuples():
        source = failed[reject.image_id]
        assert (reject.stage, reject.reason) == ("read", source["status"])
        assert reject.message == f"img2dataset {source['status']}: {source['error_message']}"
        assert reject.image_uri == source["url"]
    counts = manifest["counts"]
    assert counts["inputs"] == len(served) == counts["rows"] + counts["rejects"] and counts["accounted"]
    stats = [json.loads(p.read_text()) for p in folder.glob("*_stats.json")]
    assert counts["rows"] == sum(s["successes"] for s in stats)


def test_an_input_that_yields_nothing_is_an_error_before_output_is_touched(tmp_path, tiny_dir):
    """The failure this replaces: a folder with no images was read as 0 inputs, exit 0, `accounted: true`."""
    from vesl.cli import main

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "00000.tar.bak").write_bytes(b"")
    (tmp_path / "in" / "notes.md").write_text("nothing to see")
    code = main(["annotate", str(tmp_path / "in"), str(tmp_path / "out"), "--preset", "tiny"])
    assert code == 2 and not (tmp_path / "out").exists()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["annotate", str(empty), str(tmp_path / "out"), "--preset", "tiny"]) == 2
    assert not (tmp_path / "out").exists()
    assert main(["annotate", str(empty), str(tmp_path / "out"), "--preset", "tiny",
                 "--set", "input.allow_empty=true"]) == 0
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["counts"]["inputs"] == 0


@pytest.mark.parametrize("layout", ["webdataset", "parquet"])
def test_annotate_filter_write_train_without_the_image_server(layout, img2dataset_outputs, served, tiny_dir,
                                                              model_free, ray_local, tmp_path):
    """img2dataset output -> `vesl annotate` -> a pandas filter -> `write_regions` -> `vesl train`, with the
    image server stopped: every image is read where img2dataset stored it (a tar member by its byte range, an
    image file, or the bytes the shard carries for the parquet layout), and no request reaches the server.
    (The files layout's image files are its rows' locations: the test above checks them. The annotate run is the
    model-free chain's: where each image is read from is the run machinery's, and the test above runs each layout
    with the tiny models.)"""
    import vesl
    from vesl.cloc.config import load_train_config
    from vesl.cloc.train import run_training

    SERVER["stopped"] = True
    before = SERVER["requests"]
    folder = img2dataset_outputs[layout]
    run_annotate(str(folder), str(tmp_path / "out"), load_config())
    df = vesl.read_regions(str(tmp_path / "out"), explode=False)
    assert len(df) == 7 and df["image_uri"].str.startswith("http://127.0.0.1").all()  # provenance kept
    shard = pq.read_table(next((tmp_path / "out" / "data").glob("*.parquet")))
    if layout == "webdataset":  # a ranged read of the member; the shard carries no copy
        assert df["image_location"].str.endswith(".tar").all() and df["image_offset"].notna().all()
        assert shard.column("image_bytes").null_count == shard.num_rows
        first = df.iloc[0]
        with open(first["image_location"], "rb") as f:
            f.seek(int(first["image_offset"]))
            assert f.read(int(first["image_length"]))[:2] == b"\xff\xd8"  # the member's JPEG bytes
    else:  # bytes inline in img2dataset's parquet: no place to read them again, so the shard keeps them
        assert df["image_location"].isna().all() and shard.column("image_bytes").null_count == 0
    kept = df[df["image_id"] != df["image_id"].iloc[0]]  # a pandas filter
    vesl.write_regions(kept, str(tmp_path / "filtered"))
    with_images = vesl.read_regions(str(tmp_path / "filtered"), explode=False, with_images=True)
    assert with_images["image_error"].isna().all() and with_images["image_bytes"].map(len).min() > 100
    config = load_train_config(None, "tiny", ["optim.batch_size=4", "optim.max_steps=2", "run.log_every_steps=1"])
    summary = run_training(str(tmp_path / "filtered"), str(tmp_path / "train"), config)
    assert summary["rows"] == 6 and summary["steps"] == 2 and summary["final"]["rows_skipped"] == 0
    assert SERVER["requests"] == before  # not one request reached the image server
