"""A plan knows the files it was made from: real edits of JSONL, CSV and Parquet manifests (prepend,
delete, append, replace), deleted and added files, and a folder input with its OUTPUT inside it."""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import encode, photo
from vesl.annotate.sources.config import InputConfig
from vesl.annotate.sources.plan import files_table, plan_input
from vesl.annotate.units import DUPLICATES_SCHEMA, UNITS_SCHEMA, InputChangedError, Plan, check_input_unchanged

ROWS = [{"id": f"img{k}", "image": f"images/{k}.jpg", "alt_text": f"a dog {k}"} for k in range(6)]


def write(path: Path, rows: list[dict]) -> None:
    """ROWS as the manifest PATH (its suffix says the format)."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".csv":
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)


def planned(uri: str, exclude: str | None = None) -> Plan:
    """What a plan records of the input at URI (its fingerprints), without scanning it on Ray."""
    listing = plan_input(uri, InputConfig(), None, exclude=exclude)
    meta = {"kind": listing.kind, "created_at": "2026-12-06T10:00:00+00:00"}
    return Plan(meta, UNITS_SCHEMA.empty_table(), DUPLICATES_SCHEMA.empty_table(), files_table(listing.files))


def refusal(plan: Plan, uri: str, exclude: str | None = None) -> str:
    with pytest.raises(InputChangedError) as e:
        check_input_unchanged(plan, uri, InputConfig(), None, exclude=exclude)
    return str(e.value)


def later(path: Path) -> None:
    """Make sure an edit of PATH gets another modification time than the plan saw."""
    t = path.stat().st_mtime + 2
    os.utime(path, (t, t))


EDITS = {
    "prepend and delete": lambda rows: [{**rows[0], "id": "new"}] + rows[:2] + rows[4:],
    "append": lambda rows: rows + [{**rows[0], "id": f"more{k}"} for k in range(5)],
    "replace, same size": lambda rows: [{**r, "alt_text": r["alt_text"].replace("dog", "cat")} for r in rows],
}


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
@pytest.mark.parametrize("edit", list(EDITS))
def test_an_edited_manifest_is_named_with_what_changed(tmp_path, suffix, edit):
    manifest = tmp_path / f"manifest{suffix}"
    write(manifest, ROWS)
    plan = planned(str(manifest))
    check_input_unchanged(plan, str(manifest), InputConfig(), None)  # unchanged: resumes
    before = manifest.stat().st_size
    write(manifest, EDITS[edit](ROWS))
    later(manifest)
    message = refusal(plan, str(manifest))
    assert f"{manifest}: " in message and "1 of its files differ" in message
    after = manifest.stat().st_size
    if after > before:
        assert f"grown: {before} -> {after} bytes" in message
    elif after < before:
        assert f"shrunk: {before} -> {after} bytes" in message
    else:
        assert "modified at" in message and "same size" in message
    assert "new OUTPUT" in message and "--overwrite" in message


def test_a_deleted_manifest_and_a_deleted_input_folder_are_named(tmp_path):
    folder = tmp_path / "manifests"
    folder.mkdir()
    for k in range(3):
        write(folder / f"part{k}.jsonl", ROWS)
    plan = planned(str(folder))
    (folder / "part1.jsonl").unlink()
    assert f"{folder}/part1.jsonl: missing" in refusal(plan, str(folder))
    write(folder / "part1.jsonl", ROWS)
    write(folder / "part3.jsonl", ROWS)  # a file that was not planned
    message = refusal(plan, str(folder))
    assert f"{folder}/part3.jsonl: new (not in the plan)" in message and "part1.jsonl: modified at" in message
    single = tmp_path / "one.jsonl"
    write(single, ROWS)
    plan = planned(str(single))
    single.unlink()
    assert refusal(plan, str(single)).startswith(f"input {single} is gone: OUTPUT's plan was made from it")


def test_a_folder_input_knows_its_images_and_sidecars_and_leaves_its_output_out(tmp_path):
    images = tmp_path / "photos"
    images.mkdir()
    for k in range(3):
        (images / f"{k}.jpg").write_bytes(encode(photo(16, 12, seed=k)))
    (images / "1.txt").write_text("a red car")
    out = images / "out"  # OUTPUT inside the folder input: never read as input, never a change
    listing = plan_input(str(images), InputConfig(), None, exclude=str(out))
    assert sorted(Path(f).name for f in listing.files) == ["0.jpg", "1.jpg", "1.txt", "2.jpg"]
    plan = planned(str(images), exclude=str(out))
    (out / "data").mkdir(parents=True)
    (out / "data" / "part-000000000.parquet").write_bytes(b"PAR1")
    (out / "report.png").write_bytes(encode(photo(8, 8), "PNG"))  # an image in OUTPUT is not an input either
    check_input_unchanged(plan, str(images), InputConfig(), None, exclude=str(out))
    assert "out/report.png" not in str(plan_input(str(images), InputConfig(), None, exclude=str(out)).sources)
    (images / "1.txt").write_text("a blue car, longer")
    (images / "3.jpg").write_bytes(encode(photo(16, 12, seed=3)))
    message = refusal(plan, str(images), exclude=str(out))
    assert "2 of its files differ" in message and "1.txt: grown" in message
    assert "3.jpg: new (not in the plan)" in message


def test_a_file_rewritten_with_the_same_bytes_and_time_is_unchanged(tmp_path):
    manifest = tmp_path / "m.jsonl"
    write(manifest, ROWS)
    stat = manifest.stat()
    plan = planned(str(manifest))
    time.sleep(0.01)
    write(manifest, ROWS)  # e.g. restored from a backup with its time (cp -p, rsync -t)
    os.utime(manifest, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    check_input_unchanged(plan, str(manifest), InputConfig(), None)
