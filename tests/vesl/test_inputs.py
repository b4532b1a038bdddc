import io
import json
import tarfile

import pyarrow as pa
import pytest

from vesl.inputs import InputConfig, derive_image_id, detect_format, iter_webdataset, normalize_rows
from tests.conftest import encode, photo


def test_img2dataset_column_names_are_understood():
    table = pa.table({"key": ["000001", None], "url": ["http://x/a.jpg", "http://x/b.jpg"],
                      "caption": ["a dog", None]})
    out = normalize_rows(table.to_pylist(), [0, 1], InputConfig(), base="/data")
    assert out.column("image_id").to_pylist() == ["000001", derive_image_id("http://x/b.jpg", None)]
    assert out.column("alt_text").to_pylist() == ["a dog", None]


def test_relative_paths_resolve_against_the_manifest_folder():
    table = pa.table({"id": [1, 2, 3], "image": ["imgs/a.jpg", "/abs/b.jpg", "s3://bucket/c.jpg"]})
    out = normalize_rows(table.to_pylist(), [0, 1, 2], InputConfig(), base="s3://bucket/run")
    assert out.column("image_uri").to_pylist() == ["s3://bucket/run/imgs/a.jpg", "/abs/b.jpg", "s3://bucket/c.jpg"]
    assert out.column("image_id").to_pylist() == ["1", "2", "3"]  # integer ids become strings


def test_configured_column_names():
    table = pa.table({"uid": ["u"], "picture": ["p.jpg"], "desc": ["d"]})
    cfg = InputConfig(id_column=["uid"], image_column=["picture"], alt_text_column=["desc"])
    out = normalize_rows(table.to_pylist(), [0], cfg, base="/b")
    row = out.to_pylist()[0]
    assert (row["image_id"], row["image_uri"], row["alt_text"]) == ("u", "/b/p.jpg", "d")


def test_derived_ids_are_stable_and_distinct():
    assert derive_image_id("s3://a/b.jpg", None) == derive_image_id("s3://a/b.jpg", None)
    assert derive_image_id("s3://a/b.jpg", None) != derive_image_id("s3://a/c.jpg", None)
    assert derive_image_id(None, b"123") != derive_image_id(None, b"124")


def write_tar(path, samples):
    with tarfile.open(path, "w") as tar:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_webdataset_rows_pair_image_text_and_json(tmp_path):
    jpg = encode(photo(20, 10))
    write_tar(tmp_path / "00000.tar", [
        ("000000001.jpg", jpg), ("000000001.txt", b"a red car"),
        ("000000001.json", json.dumps({"key": "000000001", "url": "http://x/1.jpg"}).encode()),
        ("000000002.txt", b"orphan text"),
    ])
    rows = list(iter_webdataset(str(tmp_path / "00000.tar"), None))
    assert [r["image_id"] for r in rows] == ["000000001", "000000002"]
    assert rows[0]["image_bytes"] == jpg and rows[0]["alt_text"] == "a red car"
    assert rows[0]["image_uri"] == "http://x/1.jpg" and rows[0]["reject_stage"] is None
    assert (rows[1]["reject_stage"], rows[1]["reject_reason"]) == ("read", "missing_image")


def test_an_unreadable_tar_is_one_reject(tmp_path):
    (tmp_path / "bad.tar").write_bytes(b"not a tar at all" * 10)
    [row] = list(iter_webdataset(str(tmp_path / "bad.tar"), None))
    assert row["reject_reason"] == "unreadable_shard"


def test_format_detection(tmp_path):
    (tmp_path / "m.jsonl").write_text("{}\n")
    assert detect_format(str(tmp_path / "m.jsonl"), None)[0] == "manifest"
    (tmp_path / "shards").mkdir()
    write_tar(tmp_path / "shards" / "0.tar", [])
    assert detect_format(str(tmp_path / "shards"), None)[0] == "webdataset"
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(b"x")
    assert detect_format(str(tmp_path / "imgs"), None) == ("folder", [str(tmp_path / "imgs" / "a.jpg")])
    with pytest.raises(FileNotFoundError):
        detect_format(str(tmp_path / "nope"), None)


def test_csv_manifest_and_image_folder_through_ray_data(tmp_path, ray_local):
    from vesl.inputs import read_inputs

    (tmp_path / "imgs").mkdir()
    for name in ("a.jpg", "b.png"):
        (tmp_path / "imgs" / name).write_bytes(encode(photo(8, 8)))
    (tmp_path / "imgs" / "notes.md").write_text("ignored: not an image suffix")
    (tmp_path / "m.csv").write_text('id,image,alt_text\n7,imgs/a.jpg,"a dog, running ""fast"""\n8,imgs/b.png,\n')
    ds, kind = read_inputs(str(tmp_path / "m.csv"), InputConfig(), None)
    rows = sorted(ds.take_all(), key=lambda r: r["image_id"])
    assert kind == "manifest"
    assert [(r["image_id"], r["image_uri"], r["alt_text"]) for r in rows] == [
        ("7", str(tmp_path / "imgs" / "a.jpg"), 'a dog, running "fast"'), ("8", str(tmp_path / "imgs" / "b.png"), None)]

    ds, kind = read_inputs(str(tmp_path / "imgs"), InputConfig(), None)
    assert kind == "folder"
    assert sorted(r["image_uri"] for r in ds.take_all()) == [str(tmp_path / "imgs" / n) for n in ("a.jpg", "b.png")]


def test_a_tar_that_breaks_off_keeps_its_finished_samples(tmp_path):
    jpg = encode(photo(16, 16))
    write_tar(tmp_path / "full.tar", [(f"{k:04d}.{s}", d) for k in range(3) for s, d in (("jpg", jpg), ("txt", b"x"))])
    data = (tmp_path / "full.tar").read_bytes()
    with tarfile.open(tmp_path / "full.tar") as tar:
        third = tar.getmember("0002.jpg").offset_data
    (tmp_path / "cut.tar").write_bytes(data[: third + 100])  # breaks off inside the third sample's image
    rows = list(iter_webdataset(str(tmp_path / "cut.tar"), None))
    assert [(r["image_id"], r["reject_reason"]) for r in rows][:2] == [("0000", None), ("0001", None)]
    assert all(r["reject_reason"] == "unreadable_shard" for r in rows[2:]) and len(rows) >= 3
