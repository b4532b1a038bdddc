"""Nothing destroyed, nothing silently lost, end to end: an OUTPUT that is the input, an input changed
under a finished run, a FIFO among the images, a damaged plan or record, leftovers of interrupted
writes, a run that lost its lease, and a read that hangs. These test the run machinery, not labels: they
run the model-free stage chain (tests/pipelines/model_free.py)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO, encode, photo
from tests.pipelines.helpers import annotate_here, read_output
from tests.pipelines.model_free import job_command, job_env
from tests.pipelines.test_failures import many_images
from vesl.errors import EXIT_FAILED, EXIT_LEASE_LOST, EXIT_OK, EXIT_USAGE


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("vesl annotate: error:")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def test_an_output_that_is_the_input_is_refused_before_anything_is_deleted(tmp_path, model_free, capfd):
    images = tmp_path / "photos"
    images.mkdir()
    for k in range(3):
        (images / f"{k}.jpg").write_bytes(encode(photo(20, 16, seed=k)))
    before = sorted(p.name for p in images.iterdir())
    for output in (str(images), str(images) + "/", str(tmp_path)):
        code, _, err = annotate_here(capfd, str(images), output, "--overwrite")
        assert code == EXIT_USAGE, err[-2000:]
        assert "Choose an OUTPUT outside the input" in error_line(err)
        assert sorted(p.name for p in images.iterdir()) == before  # nothing deleted, nothing written


def test_a_changed_manifest_is_refused_and_overwrite_labels_it_as_it_is(tmp_path, model_free, ray_local, capfd,
                                                                         monkeypatch):
    manifest = many_images(tmp_path / "in", 8)
    out = str(tmp_path / "out")
    monkeypatch.chdir(tmp_path)
    unit_rows = ("--set", "input.unit_rows=3")
    assert annotate_here(capfd, "in/manifest.jsonl", out, *unit_rows)[0] == EXIT_OK
    # the same file by another spelling is the same input: a resume with nothing to do
    code, stdout, err = annotate_here(capfd, str(manifest), out, *unit_rows)
    assert code == EXIT_OK and "resumed: 0 processed now" in stdout, err[-2000:]
    original = manifest.read_bytes()
    stat = manifest.stat()
    lines = original.decode().splitlines(keepends=True)
    edits = {"prepend and delete": ['{"id": "new", "image": "images/000.jpg"}\n'] + lines[:3] + lines[5:],
             "append": lines + [line.replace('"img', '"more') for line in lines[:5]]}
    for name, edited in edits.items():
        manifest.write_text("".join(edited))
        code, _, err = annotate_here(capfd, "in/manifest.jsonl", out, *unit_rows)
        line = error_line(err)
        assert code == EXIT_USAGE, (name, line)
        assert f"{manifest}: " in line and ("shrunk" in line or "grown" in line) and "--overwrite" in line, line
    manifest.unlink()
    code, _, err = annotate_here(capfd, "in/manifest.jsonl", out, *unit_rows)
    assert code == EXIT_USAGE and "in/manifest.jsonl is gone: OUTPUT's plan was made from it" in error_line(err)
    manifest.write_bytes(original)  # restored as it was, with its time: resumes
    os.utime(manifest, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert annotate_here(capfd, "in/manifest.jsonl", out, *unit_rows)[0] == EXIT_OK
    (tmp_path / "elsewhere" / "in").mkdir(parents=True)  # the same string from another folder: another file
    shutil.copy(manifest, tmp_path / "elsewhere" / "in" / "manifest.jsonl")
    monkeypatch.chdir(tmp_path / "elsewhere")
    code, _, err = annotate_here(capfd, "in/manifest.jsonl", out, *unit_rows)
    assert code == EXIT_USAGE and "was made for input" in error_line(err)
    monkeypatch.chdir(tmp_path)
    manifest.write_text("".join(edits["prepend and delete"]))
    assert annotate_here(capfd, "in/manifest.jsonl", out, *unit_rows, "--overwrite")[0] == EXIT_OK
    rows, rejects, result = read_output(out)
    assert sorted(rows.image_id) == sorted(["new"] + [f"img{k:03d}" for k in (0, 1, 2, 5, 6, 7)])
    assert len(rejects) == 0 and result["counts"]["accounted"]


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_an_edited_csv_or_parquet_manifest_is_refused(tmp_path, model_free, ray_local, capfd, suffix):
    jsonl = many_images(tmp_path / "in", 6)
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    manifest = tmp_path / "in" / f"manifest{suffix}"
    jsonl.unlink()
    table = pa.Table.from_pylist(rows)
    write = (lambda t: t.to_pandas().to_csv(manifest, index=False)) if suffix == ".csv" else (
        lambda t: pq.write_table(t, manifest))
    write(table)
    assert annotate_here(capfd, str(manifest), str(tmp_path / "out"))[0] == EXIT_OK
    write(table.slice(1))  # the first record deleted
    code, _, err = annotate_here(capfd, str(manifest), str(tmp_path / "out"))
    assert code == EXIT_USAGE and f"{manifest}: shrunk" in error_line(err)


def test_a_fifo_among_the_images_is_a_reject_and_the_rest_is_written(tmp_path, model_free, ray_local, capfd):
    images = tmp_path / "photos"
    images.mkdir()
    for k in range(3):
        (images / f"{k}.jpg").write_bytes(encode(photo(24, 16, seed=k)))
    os.mkfifo(images / "x.jpg")  # nobody writes to it: a plain read blocks for ever
    os.mkfifo(images / "1.txt")  # a FIFO sidecar too
    code, _, err = annotate_here(capfd, str(images), str(tmp_path / "out"), "--set", "ray.no_progress_timeout_s=60")
    assert code == EXIT_OK, err[-2000:]
    rows, rejects, result = read_output(tmp_path / "out")
    assert len(rows) == 2 and result["counts"]["inputs"] == 4
    assert sorted(zip(rejects.reason, rejects.image_uri.map(lambda u: Path(u).name))) == [
        ("bad_sidecar", "1.jpg"), ("not_a_file", "x.jpg")]
    assert "is a FIFO, not a regular file" in " ".join(rejects.message)


def test_a_damaged_plan_or_record_is_named_and_a_replan_must_match_the_records(tmp_path, model_free, ray_local,
                                                                             capfd):
    manifest = many_images(tmp_path / "in", 8)
    out = tmp_path / "out"
    args = (str(manifest), str(out), "--set", "input.unit_rows=2")
    assert annotate_here(capfd, *args)[0] == EXIT_OK
    plan = out / "_vesl" / "plan"
    (plan / "plan.json").unlink()  # ... and re-run with other units: refused, nothing lost
    code, _, err = annotate_here(capfd, str(manifest), str(out), "--set", "input.unit_rows=3")
    line = error_line(err)
    assert code == EXIT_USAGE and "plan.json is missing, and the plan made again (3 units" in line
    assert len(list((out / "data").glob("*.parquet"))) == 4
    code, stdout, err = annotate_here(capfd, *args)  # the same units: the plan stands again, nothing redone
    assert code == EXIT_OK and "resumed: 0 processed now" in stdout, err[-2000:]
    units = (plan / "units.parquet").read_bytes()
    (plan / "units.parquet").write_bytes(b"garbage" * 10)
    code, _, err = annotate_here(capfd, *args)
    assert code == EXIT_USAGE and f"{plan / 'units.parquet'} (the plan's units) is not a readable" in error_line(err)
    (plan / "units.parquet").write_bytes(units)
    records = out / "_vesl" / "units"
    good = (records / "000000001.json").read_text()
    for text, name, says in (("{}", "000000001.json", "is not a completion record"),
                             (good, "000000009.json", "is named for unit 9 but records unit 1")):
        (records / name).write_text(text)
        code, _, err = annotate_here(capfd, *args)
        assert code == EXIT_USAGE and f"{records / name} {says}" in error_line(err)
        assert "Delete it and re-run" in error_line(err)
        (records / name).unlink()
    (records / "000000001.json").write_text(good)
    # leftovers of interrupted writes: removed on the next run, an empty staging folder too
    (out / "data" / ".part-000000001.parquet.0a1b2c3d").write_bytes(b"half a shard")
    (out / "_vesl" / "staging").mkdir()
    shutil.rmtree(plan)  # the documented fix for a damaged plan: made again, checked against the records
    code, stdout, err = annotate_here(capfd, *args)
    assert code == EXIT_OK and "resumed: 0 processed now" in stdout, err[-2000:]
    assert "removed 1 temporary file(s) that interrupted writes left" in err
    assert not (out / "data" / ".part-000000001.parquet.0a1b2c3d").exists()
    assert not (out / "_vesl" / "staging").exists()
    rows, _, result = read_output(out)
    assert len(rows) == 8 and rows.image_id.is_unique and result["counts"]["accounted"]


def session_pids(sid: int) -> list[int]:
    """The processes of session SID (a run started with start_new_session: its driver, its Ray, its workers)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


def wake(pids: list[int]) -> None:
    """SIGCONT to each of PIDS that still runs."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


@pytest.mark.slow
def test_a_run_stopped_past_its_lease_stops_with_one_line_and_its_own_exit_code(tmp_path, model_free, ray_local,
                                                                                 capfd):
    """SIGSTOP a run mid-way for longer than its lease's TTL; another run (here, on the session's Ray) takes OUTPUT
    over; SIGCONT: the first stops with 'lease lost to RUN at HOST' and exit 7, the second finishes, every id once."""
    import threading

    manifest = many_images(tmp_path / "in", 60)
    out = tmp_path / "out"
    args = [str(manifest), str(out), "--set", "input.unit_rows=4", "--set", "output.lease_ttl_s=3",
            "--set", "label.delay_s=0.1", "--set", "label.batch_size=1",  # a run of some seconds
            "--set", "input.block_rows=4", "--set", "output.rows_per_part=4"]  # whose units commit one by one
    first = subprocess.Popen(job_command(*args), cwd=REPO, env=job_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and first.poll() is None and not list((out / "_vesl" / "units").glob("*.json")):
        time.sleep(0.1)
    assert first.poll() is None, first.communicate()[1][-2000:]
    frozen = session_pids(first.pid)
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    successor_lease = out / "_lease" / "00000002.json"

    def wake_the_first() -> None:  # once the second run holds OUTPUT
        while time.time() < deadline and not successor_lease.exists():
            time.sleep(0.1)
        wake(frozen)

    waker = threading.Thread(target=wake_the_first, daemon=True)
    try:
        time.sleep(4)  # silent for longer than its TTL
        waker.start()
        code, _, err_second = annotate_here(capfd, *args, "--set", "label.delay_s=0")  # full speed: a speed setting
    finally:
        waker.join(timeout=60)
        wake(frozen)
    assert successor_lease.exists()
    assert code == EXIT_OK, err_second[-3000:]
    code, err = first.wait(timeout=300), first.communicate()[1]
    assert code == EXIT_LEASE_LOST, err[-3000:]
    successor = json.loads(successor_lease.read_text())
    assert error_line(err).startswith(f"vesl annotate: error: lease lost to run {successor['run_id']} at "
                                      f"{successor['host']}")
    assert "Traceback" not in err.split("vesl annotate: error:")[-1]
    rows, rejects, result = read_output(out)
    assert len(rows) == 60 and rows.image_id.is_unique and len(rejects) == 0 and result["counts"]["accounted"]


@pytest.mark.slow
def test_the_watchdog_stops_a_read_that_hangs_and_says_where(tmp_path):
    """An image server that accepts and never answers, a fetch timeout far longer than the watchdog's: the
    run stops after ray.no_progress_timeout_s with the step that is stuck, not never. (A process of its own: the
    hung read would hold a CPU of the session's Ray long after the job stopped.)"""
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    manifest = many_images(tmp_path / "in", 3)
    with open(manifest, "a") as f:
        f.write(json.dumps({"id": "hangs", "image": f"http://127.0.0.1:{silent.getsockname()[1]}/x.jpg"}) + "\n")
    try:
        started = time.monotonic()
        proc = subprocess.run(job_command(str(manifest), str(tmp_path / "out"), "--set", "decode.fetch_timeout_s=600",
                                          "--set", "ray.no_progress_timeout_s=6"),
                              cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=300)
        took = time.monotonic() - started
    finally:
        silent.close()
    assert proc.returncode == EXIT_FAILED, proc.stderr[-3000:]
    line = error_line(proc.stderr)
    assert "no progress for 6 s (ray.no_progress_timeout_s)" in line
    assert "Still running: MapBatches(DecodeImages): 1 active task(s)" in line, line
    assert took < 150, took
