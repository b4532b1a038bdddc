"""Input and output on s3:// against a moto server on loopback; credentials from config, never logged. The first
test runs the tiny models end to end on S3; the others test S3 layout, resume and reads, with the model-free stage
chain (tests/pipelines/model_free.py)."""

from __future__ import annotations

import json

import pytest

from tests.pipelines.helpers import EXPECTED, assert_accounted, make_manifest, read_output
from vesl.annotate.config import load_config
from vesl.annotate.job import run_annotate

pytestmark = pytest.mark.slow
KEY, SECRET = "AKIAVESLTEST", "vesl-super-secret-value"


@pytest.fixture(scope="module")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def test_annotate_reads_and_writes_s3(tmp_path, tiny_dir, ray_local, s3_endpoint, caplog):
    import s3fs

    fs = s3fs.S3FileSystem(key=KEY, secret=SECRET, client_kwargs={"endpoint_url": s3_endpoint})
    fs.mkdir("vesl-in")
    fs.mkdir("vesl-out")
    local = make_manifest(tmp_path / "in")
    fs.put(str(local.parent) + "/", "vesl-in/run1/", recursive=True)
    assert fs.exists("vesl-in/run1/manifest.jsonl") and fs.exists("vesl-in/run1/images/wide.jpg")

    config = load_config(preset_name="tiny", overrides=[
        f"storage.endpoint_url={s3_endpoint}", f"storage.key={KEY}", f"storage.secret={SECRET}",
        "storage.region=us-east-1"])
    result = run_annotate("s3://vesl-in/run1/manifest.jsonl", "s3://vesl-out/labels", config)

    fs.invalidate_cache()
    rows, rejects, manifest = read_output("s3://vesl-out/labels", filesystem=fs)
    assert_accounted(rows, rejects, manifest, EXPECTED)
    assert all(f.startswith("s3://vesl-out/labels/") for f in manifest["files"])
    assert rows["image_uri"].str.startswith("s3://vesl-in/run1/images/").all()
    assert (rows["image_location"] == rows["image_uri"]).all()  # an S3 object is where the image is read again
    text = json.dumps(result, default=str) + fs.cat("vesl-out/labels/manifest.json").decode() + caplog.text
    assert SECRET not in text and KEY not in text
    assert manifest["config"]["storage"]["secret"] == "**********"

    # inspect and read_regions straight from S3 (flat fsspec options, and vesl's by-protocol form)
    import vesl
    from vesl.shards.inspect import collect_stats
    from vesl.shards.report import write_report

    options = {"key": KEY, "secret": SECRET, "client_kwargs": {"endpoint_url": s3_endpoint}}
    regions = vesl.read_regions("s3://vesl-out/labels", storage_options=options)
    assert len(regions) == manifest["counts"]["regions"]
    images = vesl.read_regions("s3://vesl-out/labels", explode=False, storage_options={"s3": options})
    assert sorted(images["image_id"]) == sorted(rows["image_id"])
    stats = collect_stats("s3://vesl-out/labels", {"s3": options}, sample=3)
    assert (stats["rows"], stats["rejects"], stats["images"]) == (len(rows), len(rejects), manifest["counts"]["inputs"])
    assert stats["accounted"] and len(stats["sample"]) == 3
    write_report(stats, "s3://vesl-out/report.html", {"s3": options})
    page = fs.cat("vesl-out/report.html").decode()
    assert page.count("data:image/jpeg;base64,") == 3  # images fetched from S3 and embedded

    # filtered with pandas and written back to S3 as proper shards, then read again
    kept = images[images.num_regions > 0]
    written = vesl.write_regions(kept, "s3://vesl-out/filtered", storage_options=options, rows_per_shard=2)
    assert all(w.startswith("s3://vesl-out/filtered/part-") for w in written)
    back = vesl.read_regions("s3://vesl-out/filtered", explode=False, storage_options=options)
    assert sorted(back.image_id) == sorted(kept.image_id) and not fs.glob("vesl-out/filtered/_tmp*")


def test_credentials_from_the_environment_through_the_script(tmp_path, s3_endpoint):
    """The usual AWS variables, nothing in the config; the secret never appears in output or logs. (A process of its
    own: its Ray workers must get the variables from the job's environment, as on a cluster.)"""
    import subprocess

    import s3fs

    from tests.conftest import REPO
    from tests.pipelines.model_free import job_command, job_env

    fs = s3fs.S3FileSystem(key=KEY, secret=SECRET, client_kwargs={"endpoint_url": s3_endpoint})
    fs.mkdir("vesl-env-in")
    local = make_manifest(tmp_path / "in")
    fs.put(str(local.parent) + "/", "vesl-env-in/run/", recursive=True)
    env = job_env(AWS_ACCESS_KEY_ID=KEY, AWS_SECRET_ACCESS_KEY=SECRET, AWS_ENDPOINT_URL=s3_endpoint,
                  AWS_DEFAULT_REGION="us-east-1")
    proc = subprocess.run(job_command("s3://vesl-env-in/run/manifest.jsonl", "s3://vesl-env-in/out"), cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fs.invalidate_cache()
    rows, rejects, manifest = read_output("s3://vesl-env-in/out", filesystem=fs)
    assert_accounted(rows, rejects, manifest, EXPECTED)
    assert SECRET not in proc.stdout + proc.stderr + json.dumps(manifest)


def test_train_reads_shards_and_writes_checkpoints_on_s3(tmp_path, tiny_dir, ray_local, s3_endpoint, capsys):
    """CLOC training from shards on S3 (images embedded and fetched by s3:// URI) into an S3 OUT;
    `vesl eval` takes the S3 checkpoint."""
    import pyarrow.parquet as pq
    import s3fs

    from vesl.cli import main as cli
    from vesl.cloc.config import load_train_config
    from vesl.cloc.synthetic import write_shapes_dataset
    from vesl.cloc.train import run_training

    fs = s3fs.S3FileSystem(key=KEY, secret=SECRET, client_kwargs={"endpoint_url": s3_endpoint})
    fs.mkdir("vesl-train")
    local = tmp_path / "shapes"
    write_shapes_dataset(local, 40, seed=2, shard_rows=20, embed_images=False)
    first = pq.read_table(local / "data" / "shard-00000.parquet")  # these rows fetch their image from S3
    uris = [f"s3://vesl-train/shapes/images/{u.rsplit('/', 1)[1]}" for u in first.column("image_uri").to_pylist()]
    first = first.set_column(first.schema.get_field_index("image_uri"), "image_uri", [uris])
    first = first.set_column(first.schema.get_field_index("image_location"), "image_location", [uris])
    pq.write_table(first, local / "data" / "shard-00000.parquet")
    write_shapes_dataset(tmp_path / "embedded", 40, seed=2, shard_rows=20)  # the second shard: bytes inside
    (tmp_path / "embedded" / "data" / "shard-00001.parquet").replace(local / "data" / "shard-00001.parquet")
    fs.put(str(local) + "/", "vesl-train/shapes/", recursive=True)

    options = [f"storage.endpoint_url={s3_endpoint}", f"storage.key={KEY}", f"storage.secret={SECRET}",
               "storage.region=us-east-1"]
    config = load_train_config(None, "tiny", ["optim.batch_size=8", "optim.max_steps=2", "run.log_every_steps=1",
                                              *options])
    summary = run_training("s3://vesl-train/shapes", "s3://vesl-train/out", config)
    assert summary["steps"] == 2 and summary["rows"] == 40
    assert summary["final"]["rows_skipped"] == 0  # every S3 image was fetched
    fs.invalidate_cache()
    assert fs.exists("vesl-train/out/model/cloc.json") and fs.exists("vesl-train/out/model/clip/model.safetensors")
    assert fs.exists("vesl-train/out/train_summary.json")
    assert any("checkpoint_" in p for p in fs.ls("vesl-train/out/run"))
    capsys.readouterr()
    import os

    env = {"AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_ENDPOINT_URL": s3_endpoint}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        assert cli(["eval", "s3://vesl-train/shapes", "--checkpoint", "s3://vesl-train/out",
                    "--classes", str(local / "classes.json")]) == 0
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 40 and result["step"] == 2


def test_an_s3_resume_that_writes_new_shards_counts_them(tmp_path, model_free, ray_local, s3_endpoint):
    """The driver's cached s3fs listing went stale while the run's tasks wrote: counts came out short
    (rows 192 of 400) and the run exited 1 although S3 held everything."""
    import s3fs

    from tests.pipelines.test_failures import many_images

    fs = s3fs.S3FileSystem(key=KEY, secret=SECRET, client_kwargs={"endpoint_url": s3_endpoint},
                           skip_instance_cache=True)
    fs.mkdir("vesl-resume")
    local = many_images(tmp_path / "in", 40)
    fs.put(str(local.parent) + "/", "vesl-resume/in/", recursive=True)
    config = load_config(overrides=[
        f"storage.endpoint_url={s3_endpoint}", f"storage.key={KEY}", f"storage.secret={SECRET}",
        "storage.region=us-east-1", "output.rows_per_part=8", "input.block_rows=8", "input.unit_rows=8"])
    first = run_annotate("s3://vesl-resume/in/manifest.jsonl", "s3://vesl-resume/out", config)
    assert first["counts"]["rows"] == 40 and first["counts"]["accounted"]
    shards = sorted(fs.ls("vesl-resume/out/data"))
    assert len(shards) >= 3
    for path in shards[:2]:  # another process deletes shards: their units are redone (their records name them)
        fs.rm(path)
    again = run_annotate("s3://vesl-resume/in/manifest.jsonl", "s3://vesl-resume/out", config)
    assert again["mode"] == "resume" and again["this_run"]["rows"] == 16 and again["this_run"]["units"] == 2
    assert [r["unit"] for r in again["repairs"][0]["redone_units"]] == [0, 1]
    assert again["counts"]["rows"] == 40 and again["counts"]["accounted"]
    fs.invalidate_cache()
    assert len(again["files"]) == len(fs.ls("vesl-resume/out/data"))


def test_a_missing_output_bucket_is_refused_not_created(tmp_path, model_free, s3_endpoint, capfd):
    import s3fs

    from vesl.annotate.job import main

    manifest = make_manifest(tmp_path / "in")
    code = main([str(manifest), "s3://no-such-bucket-vesl/out",
                 "--set", f"storage.endpoint_url={s3_endpoint}", "--set", f"storage.key={KEY}",
                 "--set", f"storage.secret={SECRET}", "--set", "storage.region=us-east-1"])
    assert code == 2
    assert "bucket 'no-such-bucket-vesl' does not exist" in capfd.readouterr().err
    fs = s3fs.S3FileSystem(key=KEY, secret=SECRET, client_kwargs={"endpoint_url": s3_endpoint},
                           skip_instance_cache=True)
    assert not fs.exists("no-such-bucket-vesl")


@pytest.fixture()
def logging_proxy(s3_endpoint):
    """An HTTP proxy in front of the moto server that logs (method, path, Range header) of every request."""
    import http.client
    import http.server
    import threading
    from urllib.parse import urlsplit

    target = urlsplit(s3_endpoint)
    log: list[tuple[str, str, str | None]] = []

    class Forward(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def forward(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            log.append((self.command, self.path.split("?")[0], self.headers.get("Range")))
            conn = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
            conn.request(self.command, self.path, body=body, headers=dict(self.headers.items()))
            answer = conn.getresponse()
            data = answer.read()
            self.send_response(answer.status)
            for name, value in answer.getheaders():
                if name.lower() not in ("transfer-encoding", "content-length", "connection"):
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            conn.close()

        do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = forward

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Forward)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", log
    server.shutdown()


def _write_webdataset(folder, images: list[bytes], per_tar: int) -> None:
    """WebDataset tars as img2dataset writes them: KEY.jpg, KEY.txt, KEY.json, uncompressed."""
    import io
    import tarfile

    folder.mkdir(parents=True)
    for start in range(0, len(images), per_tar):
        with tarfile.open(folder / f"{start // per_tar:05d}.tar", "w") as tar:
            for i, data in enumerate(images[start:start + per_tar], start):
                key = f"{i:09d}"
                meta = json.dumps({"key": key, "url": f"http://gone.invalid/{key}.jpg"}).encode()
                for suffix, payload in (("jpg", data), ("txt", f"picture number {i}".encode()), ("json", meta)):
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))


def test_a_webdataset_on_s3_trains_by_ranged_reads_of_its_members(tmp_path, tiny_dir, model_free, ray_local,
                                                                  s3_endpoint, logging_proxy):
    """A WebDataset folder on S3 -> `vesl annotate` -> a pandas filter -> `write_regions` -> `vesl train`:
    every image the trainer reads is one ranged GET of its tar member (the byte range the shard recorded),
    never a download of a whole tar, never a request to the source URL."""
    import s3fs

    import vesl
    from tests.conftest import encode, photo
    from vesl.cloc.config import load_train_config
    from vesl.cloc.train import run_training

    fs = s3fs.S3FileSystem(key=KEY, secret=SECRET, client_kwargs={"endpoint_url": s3_endpoint})
    fs.mkdir("vesl-wds")
    _write_webdataset(tmp_path / "wds", [encode(photo(96, 64 + 8 * i, seed=i)) for i in range(10)], per_tar=5)
    fs.put(str(tmp_path / "wds") + "/", "vesl-wds/shards/", recursive=True)
    creds = [f"storage.key={KEY}", f"storage.secret={SECRET}", "storage.region=us-east-1"]
    run_annotate("s3://vesl-wds/shards", str(tmp_path / "out"),  # the model-free chain: its images are the subject
                 load_config(overrides=[f"storage.endpoint_url={s3_endpoint}", *creds]))
    df = vesl.read_regions(str(tmp_path / "out"), explode=False)
    assert len(df) == 10 and df["image_location"].str.match(r"s3://vesl-wds/shards/0000[01]\.tar$").all()
    assert df["image_bytes"].isna().all()  # the tars are the images' place: the shards carry no copy
    kept = df[df["image_id"] != "000000003"]
    vesl.write_regions(kept, str(tmp_path / "filtered"))

    proxy, log = logging_proxy
    config = load_train_config(None, "tiny", ["optim.batch_size=3", "optim.max_steps=2", "run.log_every_steps=1",
                                              f"storage.endpoint_url={proxy}", *creds])
    summary = run_training(str(tmp_path / "filtered"), str(tmp_path / "train"), config)
    assert summary["rows"] == 9 and summary["steps"] == 2 and summary["final"]["rows_skipped"] == 0
    members = {f"bytes={o}-{o + n - 1}" for o, n in zip(kept["image_offset"], kept["image_length"])}
    tar_gets = [(path, ranged) for method, path, ranged in log if method == "GET" and path.endswith(".tar")]
    assert len(tar_gets) >= 9  # the probe and the training pass read every image they take
    assert all(ranged in members for _, ranged in tar_gets)  # each one exactly a member's bytes
    assert {ranged for _, ranged in tar_gets} == members  # every kept image was read, the dropped one never


def test_export_reads_shards_and_writes_its_parts_and_images_on_s3(tmp_path, ray_local, s3_endpoint):
    """`vesl export` from shards on S3 to a DEST on S3: the parts, the image files beside them (read from the
    shard's image_location, itself on S3) and the merged file, all through fsspec."""
    import pyarrow as pa
    import s3fs

    import vesl
    from tests.conftest import encode, photo
    from vesl.export.common import ExportOptions
    from vesl.export.job import run_export

    fs = s3fs.S3FileSystem(key=KEY, secret=SECRET, client_kwargs={"endpoint_url": s3_endpoint})
    fs.mkdir("vesl-export")
    fs.pipe("vesl-export/img/a.png", encode(photo(64, 48, seed=2), "PNG"))
    options = {"s3": {"key": KEY, "secret": SECRET, "client_kwargs": {"endpoint_url": s3_endpoint}}}
    row = {"image_id": "a", "image_location": "s3://vesl-export/img/a.png", "width": 64, "height": 48,
           "caption": "A Red Car on a road.", "alt_text": None, "phrases": ["red car", "road"],
           "regions": [{"box": [0.1, 0.2, 0.5, 0.6], "phrase": "red car", "score": 0.8, "source": "caption",
                        "spans": [[2, 9]]}]}
    vesl.write_regions(pa.Table.from_pylist([row]), "s3://vesl-export/shards", storage_options=options)
    summary = run_export("s3://vesl-export/shards", "s3://vesl-export/odvg", ExportOptions(format="odvg"),
                         storage=options)
    fs.invalidate_cache()
    assert summary["counts"]["exported"] == 1 and fs.exists("vesl-export/odvg/export.json")
    [record] = [json.loads(line) for line in fs.cat("vesl-export/odvg/odvg.jsonl").decode().splitlines()]
    assert record["filename"] == "images/part-00000/a.png"
    assert fs.cat(f"vesl-export/odvg/{record['filename']}") == fs.cat("vesl-export/img/a.png")
    [region] = record["grounding"]["regions"]
    assert record["grounding"]["caption"][slice(*region["tokens_positive"][0])] == "Red Car"
