"""Where a file really is (two spellings of one place are one place) and what tells its versions apart."""

from __future__ import annotations

import os

from vesl.core.storage import canonical_uri, describe_change, fingerprint, is_within


def test_one_place_is_one_location_however_it_is_spelled(tmp_path, monkeypatch):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "m.jsonl").write_text("{}\n")
    (tmp_path / "link").symlink_to(tmp_path / "in")
    monkeypatch.chdir(tmp_path)
    where = canonical_uri(str(tmp_path / "in" / "m.jsonl"))
    for spelling in ("in/m.jsonl", "./in//m.jsonl", "link/m.jsonl", f"file://{tmp_path}/in/m.jsonl",
                     f"{tmp_path}/in/../in/m.jsonl"):
        assert canonical_uri(spelling) == where, spelling
    os.chdir(tmp_path / "in")  # the same relative string from another folder is another file
    assert canonical_uri("in/m.jsonl") != where
    assert canonical_uri("s3a://bucket//data/") == canonical_uri("s3://bucket/data") == "s3://bucket/data"
    assert canonical_uri("S3://bucket/a") != canonical_uri("s3://bucket/b")


def test_within_is_by_path_components_not_by_prefix():
    assert is_within("/data/in", "/data/in") and is_within("/data/in/x.jpg", "/data/in")
    assert is_within("/data/in/x.jpg", "/")
    assert not is_within("/data/input/x.jpg", "/data/in")  # a sibling that shares a prefix
    assert not is_within("/data", "/data/in")
    assert is_within("s3://b/run/in", "s3://b/run") and not is_within("s3://b/runs", "s3://b/run")


def test_a_fingerprint_tells_growth_edits_and_rewrites_apart(tmp_path):
    from vesl.core.storage import filesystem

    path = tmp_path / "m.jsonl"
    path.write_text("a\n")
    fs, p = filesystem(str(path))
    first = fingerprint(fs.info(p))
    assert first["size"] == 2 and first["mtime"] and first["etag"] is None
    assert describe_change(first, fingerprint(fs.info(p))) is None
    path.write_text("ab\n")
    assert describe_change(first, fingerprint(fs.info(p))) == "grown: 2 -> 3 bytes"
    path.write_text("b\n")
    os.utime(path, (1_000_000_000, 1_000_000_000))
    assert describe_change(first, fingerprint(fs.info(p))).startswith("modified at 2001-09-09T01:46:40+00:00")
    s3 = {"size": 10, "ETag": '"abc"', "LastModified": None}
    assert fingerprint(s3) == {"size": 10, "mtime": None, "etag": "abc"}
    assert describe_change(fingerprint(s3), fingerprint({**s3, "ETag": '"def"'})) == "rewritten: ETag abc -> def"
    assert describe_change(fingerprint(s3), fingerprint(s3)) is None
