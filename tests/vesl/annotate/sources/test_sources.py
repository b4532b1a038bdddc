import io
import json
import tarfile

import pyarrow as pa
import pytest

from tests.conftest import encode, photo
from vesl.annotate.sources.config import InputConfig
from vesl.annotate.sources.plan import plan_input
from vesl.annotate.sources.rows import derive_image_id, normalize_rows
from vesl.annotate.sources.webdataset import iter_webdataset


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


def test_webdataset_rows_locate_their_image_member_by_byte_range(tmp_path):
    """A plain tar's rows carry the member's offset and length: those bytes are the image. A compressed
    tar's offsets are not file offsets: no location (the decode stage then keeps the bytes)."""
    jpgs = [encode(photo(20 + i, 10, seed=i)) for i in range(3)]
    samples = [(f"{i:09d}.{suffix}", data) for i, jpg in enumerate(jpgs)
               for suffix, data in (("txt", b"text"), ("jpg", jpg), ("json", b"{}"))]
    write_tar(tmp_path / "plain.tar", samples)
    blob = (tmp_path / "plain.tar").read_bytes()
    rows = list(iter_webdataset(str(tmp_path / "plain.tar"), None))
    assert [r["image_location"] for r in rows] == [str(tmp_path / "plain.tar")] * 3
    assert [blob[r["image_offset"]:r["image_offset"] + r["image_length"]] for r in rows] == jpgs
    with tarfile.open(tmp_path / "packed.tar.gz", "w:gz") as tar:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    packed = list(iter_webdataset(str(tmp_path / "packed.tar.gz"), None))
    assert [r["image_bytes"] for r in packed] == jpgs
    assert all(r["image_location"] is None and r["image_offset"] is None for r in packed)


def test_manifest_rows_locate_files_not_web_urls():
    rows = [{"image": "images/a.jpg"}, {"image": "s3://b/a.jpg"}, {"image": "https://x/a.jpg"},
            {"image_bytes": b"\xff\xd8"}]
    table = normalize_rows(rows, [0, 1, 2, 3], InputConfig(), "/data/m")
    assert table.column("image_location").to_pylist() == ["/data/m/images/a.jpg", "s3://b/a.jpg", None, None]


def test_an_unreadable_tar_is_one_reject(tmp_path):
    (tmp_path / "bad.tar").write_bytes(b"not a tar at all" * 10)
    [row] = list(iter_webdataset(str(tmp_path / "bad.tar"), None))
    assert row["reject_reason"] == "unreadable_shard"


def test_format_detection(tmp_path):
    (tmp_path / "m.jsonl").write_text("{}\n")
    assert plan_input(str(tmp_path / "m.jsonl"), InputConfig(), None).kind == "manifest"
    (tmp_path / "shards").mkdir()
    write_tar(tmp_path / "shards" / "0.tar", [])
    assert plan_input(str(tmp_path / "shards"), InputConfig(), None).kind == "webdataset"
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(b"x")
    plan = plan_input(str(tmp_path / "imgs"), InputConfig(), None)
    assert (plan.kind, [u["uri"] for u in plan.sources]) == ("folder", [str(tmp_path / "imgs" / "a.jpg")])
    with pytest.raises(FileNotFoundError):
        plan_input(str(tmp_path / "nope"), InputConfig(), None)


def read_through_units(uri, config):
    """(INPUT_SCHEMA rows, the input plan) of URI read as the annotate job reads it: planned into work units
    on Ray, each unit read by `read_units`."""
    import ray

    from vesl.annotate.units import make_plan, read_units, todo_units

    plan = plan_input(uri, config, None)
    units = make_plan(uri, plan, config, None)
    todo = todo_units(units, set(), (0, units.unit_count))
    kwargs = {"kind": plan.kind, "config": config, "storage_options": None}
    ds = ray.data.from_arrow(todo).map_batches(read_units, batch_size=1, batch_format="pyarrow", fn_kwargs=kwargs)
    return ds.take_all(), plan


def test_csv_manifest_and_image_folder_through_ray_data(tmp_path, ray_local):
    (tmp_path / "imgs").mkdir()
    for name in ("a.jpg", "b.png"):
        (tmp_path / "imgs" / name).write_bytes(encode(photo(8, 8)))
    (tmp_path / "imgs" / "notes.md").write_text("ignored: not an image suffix")
    (tmp_path / "m.csv").write_text('id,image,alt_text\n7,imgs/a.jpg,"a dog, running ""fast"""\n8,imgs/b.png,\n')
    rows, plan = read_through_units(str(tmp_path / "m.csv"), InputConfig())
    rows = sorted(rows, key=lambda r: r["image_id"])
    assert plan.kind == "manifest"
    assert [(r["image_id"], r["image_uri"], r["alt_text"]) for r in rows] == [
        ("7", str(tmp_path / "imgs" / "a.jpg"), 'a dog, running "fast"'), ("8", str(tmp_path / "imgs" / "b.png"), None)]

    rows, plan = read_through_units(str(tmp_path / "imgs"), InputConfig())
    assert plan.kind == "folder"
    assert sorted(r["image_uri"] for r in rows) == [str(tmp_path / "imgs" / n) for n in ("a.jpg", "b.png")]


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


# img2dataset's output folders, laid out as img2dataset 1.47 writes them (measured; the real tool runs in
# tests/pipelines/test_img2dataset.py): NNNNN.parquet is a status table of every row it tried, success or not.

def _status_table(path, rows, with_jpg=None):
    cols = {"caption": [r[2] for r in rows], "url": [f"http://h/{r[0]}.jpg" for r in rows],
            "key": [r[0] for r in rows], "status": [r[1] for r in rows],
            "error_message": [None if r[1] == "success" else "HTTP Error 404: File not found" for r in rows]}
    if with_jpg is not None:
        cols["jpg"] = pa.array([with_jpg if r[1] == "success" else None for r in rows], pa.binary())
    import pyarrow.parquet as pq

    pq.write_table(pa.table(cols), path)


STATUS = [("000000000", "success", "a dog"), ("000000001", "failed_to_download", "a cat"),
          ("000000002", "success", "a cow"), ("000000003", "failed_to_resize", None)]


def _read_plan(plan, config=None):
    from vesl.annotate.sources.read import read_folder_files, read_webdataset_files

    config = config or InputConfig()
    batch = pa.Table.from_pylist(plan.sources)
    if plan.kind == "manifest":
        tables = [manifest_table(u["uri"], u["index"], config) for u in plan.sources]
    elif plan.kind == "webdataset":
        tables = read_webdataset_files(batch, config, None)
    else:
        tables = read_folder_files(batch, config, None)
    return sorted(pa.concat_tables(list(tables)).to_pylist(), key=lambda r: r["ordinal"])


def _summary(rows):
    return [(r["image_id"], r["alt_text"], r["reject_reason"]) for r in rows]


WANT = [("000000000", "a dog", None), ("000000001", "a cat", "failed_to_download"), ("000000002", "a cow", None),
        ("000000003", None, "failed_to_resize")]


def test_img2dataset_webdataset_layout_reads_tar_samples_and_status_failures(tmp_path):

    jpg = encode(photo(12, 8))
    write_tar(tmp_path / "00000.tar", [x for key, status, cap in STATUS if status == "success" for x in (
        (f"{key}.jpg", jpg), (f"{key}.txt", cap.encode()),
        (f"{key}.json", json.dumps({"key": key, "url": f"http://h/{key}.jpg", "status": "success"}).encode()))])
    _status_table(tmp_path / "00000.parquet", STATUS)
    (tmp_path / "00000_stats.json").write_text('{"count": 4}')
    plan = plan_input(str(tmp_path), InputConfig(), None)
    assert (plan.kind, plan.img2dataset) == ("webdataset", True)
    assert plan.found == {".json": 1, ".parquet": 1, ".tar": 1}
    rows = _read_plan(plan)
    assert _summary(rows) == WANT
    assert rows[0]["image_bytes"] == jpg and rows[0]["image_uri"] == "http://h/000000000.jpg"
    assert rows[1]["reject_message"] == "img2dataset failed_to_download: HTTP Error 404: File not found"
    assert [r["ordinal"] for r in rows] == [0, 1, 2, 3]
    # forcing webdataset reads the same; forcing a folder finds no images and says what is there
    assert _summary(_read_plan(plan_input(str(tmp_path), InputConfig(format="webdataset"), None))) == WANT
    from vesl.annotate.sources.plan import EmptyInputError

    with pytest.raises(EmptyInputError, match=r"no image files.*1 \.json, 1 \.parquet, 1 \.tar"):
        plan_input(str(tmp_path), InputConfig(format="folder"), None)


def test_img2dataset_success_missing_from_its_tar_is_a_reject_not_a_silent_loss(tmp_path):

    write_tar(tmp_path / "00000.tar", [("000000000.jpg", encode(photo(8, 8)))])
    _status_table(tmp_path / "00000.parquet", STATUS)
    rows = _read_plan(plan_input(str(tmp_path), InputConfig(), None))
    assert [(r["image_id"], r["reject_reason"]) for r in rows] == [
        ("000000000", None), ("000000001", "failed_to_download"), ("000000002", "missing_image"),
        ("000000003", "failed_to_resize")]


def test_img2dataset_parquet_layout_is_a_manifest_with_statuses(tmp_path):

    jpg = encode(photo(8, 8))
    _status_table(tmp_path / "00000.parquet", STATUS, with_jpg=jpg)
    (tmp_path / "00000_stats.json").write_text('{"count": 4}')  # not a second manifest format
    plan = plan_input(str(tmp_path), InputConfig(), None)
    assert (plan.kind, plan.img2dataset, len(plan.sources)) == ("manifest", True, 1)
    rows = _read_plan(plan)
    assert _summary(rows) == WANT
    assert rows[0]["image_bytes"] == jpg and rows[1]["image_bytes"] is None


def test_img2dataset_files_layout_reads_images_beside_the_status_table(tmp_path):

    jpg = encode(photo(8, 8))
    (tmp_path / "00000").mkdir()
    for key, status, cap in STATUS:
        if status == "success":
            (tmp_path / "00000" / f"{key}.jpg").write_bytes(jpg)
            (tmp_path / "00000" / f"{key}.txt").write_text(cap)
            (tmp_path / "00000" / f"{key}.json").write_text(json.dumps({"key": key}))
    (tmp_path / "00000" / "000000009.jpg").write_bytes(jpg)  # an image the table does not list
    (tmp_path / "00000" / "000000009.txt").write_text("an extra")
    _status_table(tmp_path / "00000.parquet", STATUS)
    (tmp_path / "00000_stats.json").write_text("{}")
    plan = plan_input(str(tmp_path), InputConfig(), None)
    assert (plan.kind, plan.img2dataset) == ("folder", True)
    rows = _read_plan(plan)
    got = {r["image_id"]: r for r in rows}
    assert _summary([got[k] for k, *_ in STATUS]) == WANT
    assert got["000000000"]["image_bytes"] == jpg and got["000000000"]["image_uri"] == "http://h/000000000.jpg"
    extra = [r for r in rows if r["image_id"] not in {k for k, *_ in STATUS}]
    assert [(r["alt_text"], r["image_uri"], r["reject_reason"]) for r in extra] == [
        ("an extra", str(tmp_path / "00000" / "000000009.jpg"), None)]
    assert len({r["ordinal"] for r in rows}) == len(rows) == 5
    # the success whose file is gone is a reject
    (tmp_path / "00000" / "000000002.jpg").unlink()
    got = {r["image_id"]: r for r in _read_plan(plan_input(str(tmp_path), InputConfig(), None))}
    assert got["000000002"]["reject_reason"] == "missing_image"


def test_an_image_folder_takes_alt_text_and_id_from_sidecars(tmp_path):

    (tmp_path / "a.jpg").write_bytes(encode(photo(8, 8)))
    (tmp_path / "a.txt").write_text("a red kite")
    (tmp_path / "b.png").write_bytes(encode(photo(8, 8), "PNG"))
    (tmp_path / "b.json").write_text(json.dumps({"key": "bee", "caption": "a bee"}))
    (tmp_path / "c.webp").write_bytes(b"x")
    rows = _read_plan(plan_input(str(tmp_path), InputConfig(), None))
    assert [(r["image_id"], r["alt_text"]) for r in rows] == [
        (derive_image_id(str(tmp_path / "a.jpg"), None), "a red kite"), ("bee", "a bee"),
        (derive_image_id(str(tmp_path / "c.webp"), None), None)]


@pytest.mark.parametrize("files, config, message", [
    ({"notes.md": "x", "data.bin": "y"}, {}, r"no image files .*1 \.bin, 1 \.md"),
    ({}, {}, r"no image files .*holds nothing"),
    ({"a.jpg": "x"}, {"format": "webdataset"}, r"no \.tar files.*1 \.jpg"),
])
def test_an_input_with_nothing_to_read_is_an_error_naming_what_it_holds(tmp_path, files, config, message):
    from vesl.annotate.sources.plan import EmptyInputError, plan_input

    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(EmptyInputError, match=message):
        plan_input(str(tmp_path), InputConfig(**config), None)
    assert plan_input(str(tmp_path), InputConfig(allow_empty=True, **config), None).sources == []


def test_a_forced_format_that_does_not_fit_one_file_is_refused(tmp_path):

    (tmp_path / "m.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match="input.format=webdataset needs a .tar"):
        plan_input(str(tmp_path / "m.jsonl"), InputConfig(format="webdataset"), None)


def test_an_unreadable_img2dataset_status_table_is_a_reject_and_the_tar_still_reads(tmp_path):

    write_tar(tmp_path / "00000.tar", [("000000000.jpg", encode(photo(8, 8))), ("000000000.txt", b"a dog")])
    (tmp_path / "00000.parquet").write_bytes(b"PAR1 broken")
    (tmp_path / "00000_stats.json").write_text("{}")
    rows = _read_plan(plan_input(str(tmp_path), InputConfig(), None))
    assert [(r["image_id"], r["alt_text"], r["reject_reason"]) for r in rows] == [
        ("000000000", "a dog", None), (derive_image_id(str(tmp_path / "00000.parquet"), None), None,
                                       "unreadable_manifest")]
    assert rows[1]["reject_message"].startswith(str(tmp_path / "00000.parquet"))


# Every manifest row is counted: a row that cannot be read is one `read` reject naming its line, and
# the rest of the file is read (before: one bad byte in a CSV dropped every row after it, silently).

def manifest_table(uri, index=0, config=None, chunk_rows=2048):
    """One manifest file's INPUT_SCHEMA rows as the work units read them (iter_manifest_records, normalize_rows)."""
    from vesl.annotate.sources.manifest import iter_manifest_records
    from vesl.annotate.sources.rows import ORDINAL_FILE_SHIFT, normalize_rows
    from vesl.core.storage import parent_uri

    tables, n = [], 0
    for chunk in iter_manifest_records(str(uri), None, chunk_rows=chunk_rows):
        rows = [row for _, _, row in chunk]
        ordinals = [(index << ORDINAL_FILE_SHIFT) + n + k for k in range(len(rows))]
        tables.append(normalize_rows(rows, ordinals, config or InputConfig(), parent_uri(str(uri))))
        n += len(rows)
    return pa.concat_tables(tables)


def _manifest_rows(path):
    return manifest_table(path, chunk_rows=7).to_pylist()


def _write_manifest(path, kind, n, bad_at):
    """N rows (id i, image i.jpg); the row at BAD_AT is broken in the way KIND allows."""
    import pyarrow.parquet as pq

    if kind == "csv":
        lines = [b"id,image,alt_text\n"] + [b'%d,%d.jpg,"a dog, %d"\n' % (i, i, i) for i in range(n)]
        lines[1 + bad_at] = b'%d,bad\xff\xfe.jpg,"x"\n' % bad_at
        path.write_bytes(b"".join(lines))
    elif kind == "csv-quote":
        lines = [b"id,image,alt_text\n"] + [b'%d,%d.jpg,"a dog, %d"\n' % (i, i, i) for i in range(n)]
        lines[1 + bad_at] = b'%d,%d.jpg,"an open quote\n' % (bad_at, bad_at)
        path.write_bytes(b"".join(lines))
    elif kind == "jsonl":
        lines = [json.dumps({"id": str(i), "image": f"{i}.jpg"}).encode() + b"\n" for i in range(n)]
        lines[bad_at] = b'{"id": "' + str(bad_at).encode() + b'", "image": "\xff.jpg"}\n'
        path.write_bytes(b"".join(lines))
    else:  # parquet: a string column holding invalid UTF-8
        raw = [f"{i}.jpg".encode() for i in range(n)]
        raw[bad_at] = b"\xff\xfe.jpg"
        image = pa.array(raw, pa.binary()).view(pa.string())
        pq.write_table(pa.table({"id": [str(i) for i in range(n)], "image": image}), path, row_group_size=8)


@pytest.mark.parametrize("kind", ["csv", "csv-quote", "jsonl", "parquet"])
@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_a_row_that_cannot_be_read_is_one_reject_and_the_rest_is_read(tmp_path, kind, where):
    n = 30
    bad_at = {"start": 0, "middle": n // 2, "end": n - 1}[where]
    path = tmp_path / ("m.parquet" if kind == "parquet" else "m.jsonl" if kind == "jsonl" else "m.csv")
    _write_manifest(path, kind, n, bad_at)
    rows = _manifest_rows(path)
    assert len(rows) == n  # every row counted
    bad = [r for r in rows if r["reject_reason"] is not None]
    assert [r["reject_reason"] for r in bad] == ["bad_manifest_row"]
    assert str(path) in bad[0]["reject_message"]
    if kind != "parquet":
        assert f"line {bad_at + (2 if kind.startswith('csv') else 1)}" in bad[0]["reject_message"]
    good = [r["image_id"] for r in rows if r["reject_reason"] is None]
    assert good == [str(i) for i in range(n) if i != bad_at]
