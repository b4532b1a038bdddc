"""Nothing silent, nothing doubled: one writer per OUTPUT, repair of doubled rows, state files that name
themselves when broken, and one clear line with its own exit code for every failure a user can act on. These
test the run machinery, not labels: they run the model-free stage chain (tests/pipelines/model_free.py), in
this process or, where the process boundary is the subject (two drivers, signals), as a process of its own."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO, settle_ray
from tests.pipelines.helpers import annotate_here, read_output
from tests.pipelines.model_free import job_command, job_env
from tests.pipelines.test_failures import many_images
from vesl.annotate.config import load_config
from vesl.annotate.job import main, run_annotate
from vesl.errors import EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_UNREACHABLE, EXIT_USAGE

pytestmark = pytest.mark.slow


def start(manifest: Path, out: Path, env: dict, *extra: str) -> subprocess.Popen:
    """The annotate job with the model-free chain, as a process of its own (its own local Ray)."""
    return subprocess.Popen(job_command(str(manifest), str(out), *extra), cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def error_line(err: str) -> str:
    """The one line the job ends with (Ray's own log lines may come before it)."""
    lines = [line for line in err.splitlines() if line.startswith("vesl annotate: error:")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def assert_complete(out: Path, n: int) -> None:
    rows, rejects, manifest = read_output(out)
    assert len(rows) == n and rows.image_id.is_unique and len(rejects) == 0
    assert manifest["counts"]["accounted"] and manifest["counts"]["rows"] == n


@pytest.fixture
def held_image():
    """An image URL whose server answers only once the test sets the event (or after 120 s): a run fetching it
    holds its lease until then, so the other run surely meets it there. Yields (url, event)."""
    import http.server

    from tests.conftest import encode, photo

    jpg = encode(photo(32, 32))
    release = threading.Event()

    class Held(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            release.wait(timeout=120)
            self.send_response(200)
            self.send_header("Content-Length", str(len(jpg)))
            self.end_headers()
            self.wfile.write(jpg)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Held)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/held.jpg", release
    release.set()
    server.shutdown()


@pytest.mark.parametrize("stagger", [False, True])
def test_two_runs_into_one_output_one_is_refused_nothing_doubled(tmp_path, held_image, stagger, model_free, ray_local,
                                                                 capfd):
    """Two real runs of the same command: at once (either may win: two processes, each with its own Ray), or the
    second (here, on the session's Ray) while the first writes. The winner's image server holds one answer until
    the other run has ended."""
    url, release = held_image
    manifest = many_images(tmp_path / "in", 119)
    with open(manifest, "a") as f:
        f.write(f'{{"id": "slow", "image": "{url}", "alt_text": "a red car"}}\n')
    out = tmp_path / "out"
    env = job_env()
    first = start(manifest, out, env)
    if stagger:  # the second starts once the first holds the lease (it then has its whole job ahead)
        deadline = time.time() + 120
        while not (out / "_lease").exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.2)
        assert (out / "_lease").exists() and first.poll() is None, first.communicate()[1][-2000:]
        code, _, refused = annotate_here(capfd, str(manifest), str(out))
        release.set()
        assert code == EXIT_USAGE, refused[-1500:]
        assert first.wait(timeout=400) == 0, first.communicate()[1][-1500:]  # the late one is refused, the first ends
    else:
        second = start(manifest, out, env)
        deadline = time.time() + 300
        while first.poll() is None and second.poll() is None and time.time() < deadline:
            time.sleep(0.2)  # the run refused ends; the one holding the lease waits on the image
        release.set()
        results = [(p.wait(timeout=400), *p.communicate()) for p in (first, second)]
        codes = sorted(code for code, _, _ in results)
        assert codes == [0, EXIT_USAGE], [r[2][-1500:] for r in results]
        refused = next(err for code, _, err in results if code == EXIT_USAGE)
    assert "is being written by run" in refused and "pid" in refused
    assert_complete(out, 120)


def test_a_doubled_output_is_repaired_and_readers_warn_until_then(tmp_path, model_free, ray_local, capfd):
    import vesl
    from vesl.shards.inspect import collect_stats, format_summary
    from vesl.shards.read import DuplicateImageIdWarning

    manifest = many_images(tmp_path / "in", 30)
    overrides = ["output.rows_per_part=10", "input.unit_rows=10"]
    run_annotate(str(manifest), str(tmp_path / "out"), load_config(overrides=overrides))
    # a shard copied in by hand: the same rows twice
    data = sorted((tmp_path / "out" / "data").glob("*.parquet"))
    (tmp_path / "out" / "data" / "part-zzzzzzzz-00000.parquet").write_bytes(data[0].read_bytes())
    doubled = pq.read_table(data[0]).num_rows
    with pytest.warns(DuplicateImageIdWarning, match=f"{doubled} row"):
        assert len(vesl.read_regions(str(tmp_path / "out"), explode=False)) == 30 + doubled
    stats = collect_stats(str(tmp_path / "out"))
    assert stats["repeated_image_id_rows"] == doubled and not stats["accounted"]
    assert "WARNING" in format_summary(stats)

    args = [str(manifest), str(tmp_path / "out")] + [a for o in overrides for a in ("--set", o)]
    assert main(args) == 0
    err = capfd.readouterr().err
    assert "repaired OUTPUT: moved 1 file(s) that are no unit's" in err
    assert not (tmp_path / "out" / "data" / "part-zzzzzzzz-00000.parquet").exists()  # moved aside, not deleted
    assert (tmp_path / "out" / "_vesl" / "stray" / "data" / "part-zzzzzzzz-00000.parquet").exists()
    rows, _, result = read_output(tmp_path / "out")
    assert rows.image_id.is_unique and len(rows) == 30 and result["counts"]["accounted"]
    assert result["repairs"][0]["stray_files"] == [str(tmp_path / "out" / "data" / "part-zzzzzzzz-00000.parquet")]
    assert result["this_run"]["inputs"] == 0  # nothing redone: every unit's own files were intact


def test_broken_state_and_damaged_files_are_named_or_redone(tmp_path, model_free, ray_local, capfd):
    manifest = many_images(tmp_path / "in", 12)
    out = tmp_path / "out"
    overrides = ["output.rows_per_part=4", "input.unit_rows=4"]
    run_annotate(str(manifest), str(out), load_config(overrides=overrides))
    args = [str(manifest), str(out)] + [a for o in overrides for a in ("--set", o)]
    state = (out / "_vesl_run.json").read_bytes()
    (out / "_vesl_run.json").write_bytes(b"")  # what a full disk left behind before state files were staged
    assert main(args) == EXIT_USAGE
    err = error_line(capfd.readouterr().err)
    assert "_vesl_run.json is empty" in err and "delete that file" in err
    (out / "_vesl_run.json").write_bytes(state)
    record = out / "_vesl" / "units" / "000000001.json"
    good = record.read_bytes()
    record.write_bytes(b"{half a rec")
    assert main(args) == EXIT_USAGE
    err = error_line(capfd.readouterr().err)
    assert str(record) in err and "Delete it and re-run" in err
    record.write_bytes(good)
    victim = out / "data" / "part-000000002.parquet"
    victim.write_bytes(b"PAR1 not really parquet")  # damaged after it committed: another size than its record says
    assert main(args) == 0
    assert "redid 1 unit(s) whose files did not match their completion record" in capfd.readouterr().err
    assert pq.read_metadata(victim).num_rows == 4
    assert_complete(out, 12)


def test_config_and_input_mistakes_stop_before_any_work(tmp_path, tiny_dir, capfd):
    manifest = many_images(tmp_path / "in", 3)
    (tmp_path / "bad.yaml").write_text("detect:\n  threshold: [0.1\n")
    cases = {
        "yaml": (["--config", str(tmp_path / "bad.yaml")], "config is not valid YAML"),
        "codec": (["--set", "output.compression=nosuchcodec"], "unknown or unavailable Parquet compression"),
        "pixels": (["--set", "decode.max_pixels=-1"], "max_pixels"),
        "bytes": (["--set", "decode.max_bytes=0"], "max_bytes"),
    }
    for name, (extra, message) in cases.items():
        assert main([str(manifest), str(tmp_path / name), "--preset", "tiny", *extra]) == EXIT_USAGE, name
        assert message in error_line(capfd.readouterr().err), name
        assert not (tmp_path / name).exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_full_disk_is_one_line_and_its_own_exit_code(tmp_path, model_free, ray_local, capfd):
    from vesl.errors import EXIT_DISK_FULL

    manifest = many_images(tmp_path / "in", 40)
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(disk)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        args = [str(manifest), str(disk / "out"), "--set", "decode.embed_images=true",
                "--set", "output.rows_per_part=5", "--set", "output.compression=none"]
        assert main(args) == EXIT_DISK_FULL  # fills up while shards are written
        assert error_line(capfd.readouterr().err).startswith("vesl annotate: error: no space left on the device")
        settle_ray()  # the failed pipeline's actors may hold the session's CPUs
        state = disk / "out" / "_vesl_run.json"
        assert state.stat().st_size > 0  # staged, then moved: never a 0-byte state file
        for f in (disk / "out" / "data").glob("*.parquet"):
            pq.read_metadata(f)  # what was committed is whole
        # room again: the same command again finishes the job and leaves no temporary file
        subprocess.run(["mount", "-o", "remount,size=4m", str(disk)], check=True)
        assert main(args) == 0, capfd.readouterr().err[-3000:]
        assert not list((disk / "out").rglob(".*")) and not (disk / "out" / "_vesl" / "staging").exists()
        rows, _, result = read_output(disk / "out")
        assert len(rows) == 40 and rows.image_id.is_unique and result["counts"]["accounted"]
        # full from the start: refused before anything runs, and no 0-byte state file appears
        other = disk / "other"
        try:
            with open(disk / "filler", "wb") as f:
                while True:
                    f.write(b"x" * 4096)
        except OSError:
            pass
        assert main([str(manifest), str(other)]) == EXIT_USAGE
        err = error_line(capfd.readouterr().err)
        assert "cannot write to OUTPUT" in err and "no space left" in err
        assert not (other / "_vesl_run.json").exists()
    finally:
        subprocess.run(["umount", "-l", str(disk)])


@pytest.fixture
def silent_endpoint():
    """A TCP server that accepts connections and never answers: a hung S3 endpoint."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held, stop = [], threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                pass

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    server.close()
    for conn in held:
        conn.close()


def test_a_hung_or_gone_endpoint_fails_in_seconds_with_its_own_exit_code(tmp_path, model_free, silent_endpoint,
                                                                          capfd):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        gone = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens once closed
    for endpoint, what in ((silent_endpoint, "hung"), (gone, "gone")):
        started = time.monotonic()
        code = main(["s3://bucket/manifest.jsonl", str(tmp_path / what),
                     "--set", f"storage.endpoint_url={endpoint}", "--set", "storage.key=k", "--set", "storage.secret=s",
                     "--set", "storage.read_timeout_s=1", "--set", "storage.connect_timeout_s=1",
                     "--set", "storage.max_attempts=1"])
        took = time.monotonic() - started
        err = error_line(capfd.readouterr().err)
        assert code == EXIT_UNREACHABLE, (what, err)
        assert err.startswith("vesl annotate: error: storage endpoint unreachable or not answering")
        assert took < 60, (what, took)


def _wait_for_data(out: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if list((out / "data").glob("*.parquet")) if (out / "data").exists() else []:
            return
        time.sleep(0.3)
    raise AssertionError(f"no shard appeared; exit {proc.poll()}: {proc.communicate()[1][-2000:]}")


def test_ctrl_c_and_sigterm_stop_cleanly(tmp_path, model_free, ray_local):
    """Two runs at once, each a process of its own (its own Ray instance): one gets Ctrl-C (SIGINT), the other
    SIGTERM, once each has written a shard. Each stops with its own exit code and one line, leaves no Ray process
    behind and nothing half-written where readers look, and its OUTPUT then resumes here, at full speed."""
    import shutil
    import tempfile

    units = ("--set", "output.rows_per_part=25", "--set", "input.unit_rows=25")
    runs = []
    for sig, code in ((signal.SIGINT, EXIT_INTERRUPTED), (signal.SIGTERM, EXIT_TERMINATED)):
        manifest = many_images(tmp_path / sig.name / "in", 300)
        out = tmp_path / sig.name / "out"
        # every process of this run's Ray instance has it on its command line (short: Ray's socket paths live in it)
        ray_tmp = Path(tempfile.mkdtemp(prefix="vr", dir="/tmp"))
        proc = start(manifest, out, job_env(RAY_TMPDIR=str(ray_tmp)), *units,
                     "--set", "label.delay_s=0.03")  # 9 s of labelling: signalled mid-way
        runs.append((sig, code, manifest, out, ray_tmp, proc))
    for sig, _, _, out, _, proc in runs:
        _wait_for_data(out, proc)
        proc.send_signal(sig)
    for sig, code, manifest, out, ray_tmp, proc in runs:
        assert proc.wait(timeout=60) == code, sig.name
        err = error_line(proc.communicate()[1])
        assert err.startswith(f"vesl annotate: error: {'interrupted' if sig == signal.SIGINT else 'terminated'}")
        deadline = time.time() + 15
        while time.time() < deadline and subprocess.run(["pgrep", "-f", str(ray_tmp)], capture_output=True).stdout:
            time.sleep(0.5)
        assert not subprocess.run(["pgrep", "-f", str(ray_tmp)], capture_output=True).stdout, \
            f"orphaned Ray processes after {sig.name}"
        for f in (out / "data").glob("*.parquet"):
            pq.read_metadata(f)  # nothing half-written where readers look
    for _, _, manifest, out, ray_tmp, _ in runs:
        assert main([str(manifest), str(out), *units]) == 0  # here, at full speed (a speed setting: the run resumes)
        assert_complete(out, 300)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_image_bytes_in_an_image_column_are_decoded_not_read_as_a_path(tmp_path, model_free, ray_local):
    from tests.conftest import encode, photo

    jpg = encode(photo(40, 30))
    pq.write_table(pa.table({"id": ["a", "b"], "image": pa.array([jpg, jpg], pa.binary()),
                             "alt_text": ["a dog", "a cat"]}), tmp_path / "m.parquet")
    run_annotate(str(tmp_path / "m.parquet"), str(tmp_path / "out"), load_config())
    rows, rejects, _ = read_output(tmp_path / "out")
    assert sorted(rows.image_id) == ["a", "b"] and len(rejects) == 0
    assert rows.width.tolist() == [40, 40] and rows.image_uri.isna().all()

