"""Nothing lost, nothing doubled: hostile input, a killed driver, a killed model actor."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, encode, photo
from tests.pipelines.helpers import annotate_here, read_output
from vesl.annotate.config import load_config
from vesl.annotate.job import run_annotate
from vesl.fixtures.hostile import EXTRA_REJECTS, write_hostile_sample

pytestmark = pytest.mark.slow
SCRIPT = str(REPO / "pipelines" / "annotate.py")


def script_env(tiny_dir) -> dict:
    return {**os.environ, "VESL_TINY_DIR": str(tiny_dir), "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": ""}


def many_images(root: Path, n: int) -> Path:
    (root / "images").mkdir(parents=True)
    lines = []
    for i in range(n):
        (root / "images" / f"{i:03d}.jpg").write_bytes(encode(photo(48 + i % 5 * 8, 40, seed=i)))
        lines.append(f'{{"id": "img{i:03d}", "image": "images/{i:03d}.jpg", "alt_text": "a red car and a dog {i}"}}')
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return root / "manifest.jsonl"


def test_hostile_manifest_every_valid_image_a_row_every_broken_one_a_specific_reject(tmp_path, tiny_dir, ray_local):
    """The hostile sample through the tiny models (a 2000x3 image through OWLv2's padding, an 80,000-character
    alt-text through the fuser and spaCy)."""
    manifest, expected = write_hostile_sample(tmp_path / "in")
    out = tmp_path / "out"
    run_annotate(str(manifest), str(out), load_config(preset_name="tiny"))
    rows, rejects, result = read_output(out)
    valid = {k for k, v in expected.items() if v is None}
    assert set(rows["image_id"]) == valid and len(rows) == len(valid)
    reasons = rejects.groupby("image_id")["reason"].apply(list).to_dict()
    for key, reason in expected.items():
        if reason is not None:
            assert reasons.pop(key) == [reason], key
    # what is left: the duplicate 'plain' and the two manifest lines that are not JSON objects
    leftover = sorted(r for rs in reasons.values() for r in rs)
    assert leftover == sorted(r for r, n in EXTRA_REJECTS.items() for _ in range(n))
    assert reasons.get("plain") == ["duplicate"]
    counts = result["counts"]
    assert counts["inputs"] == len(expected) + sum(EXTRA_REJECTS.values()) == counts["rows"] + counts["rejects"]
    assert counts["accounted"] and counts["duplicate_ids"] == 1
    sizes = rows.set_index("image_id")[["width", "height"]].T.to_dict("list")
    assert sizes["exif_rotated"] == [20, 60] and sizes["wide_2000x3"] == [2000, 3] and sizes["one_by_one"] == [1, 1]
    alts = dict(zip(rows["image_id"], rows["alt_text"]))
    assert len(alts["palette_alpha"]) == 80_000 and "🐈" in alts["grayscale"]
    # ids and URIs never steer where files go: every file is vesl's own, inside OUTPUT
    own = {"plan": ("plan.json", "units.parquet", "duplicates.parquet", "files.parquet")}
    for path in out.rglob("*"):
        assert path.resolve().is_relative_to(out.resolve())
        if path.is_file():
            assert (path.name in ("manifest.json", "_vesl_run.json")
                    or path.parent.name in ("data", "rejects") and re.fullmatch(r"part-\d{9}\.parquet", path.name)
                    or path.parent.name == "units" and re.fullmatch(r"\d{9}\.json", path.name)
                    or path.name in own.get(path.parent.name, ())
                    or path.parent.name == "_lease" and path.name[:8].isdigit()), path
    assert not (tmp_path / "etc").exists()


def records(out: Path) -> dict[int, dict]:
    return {int(p.stem): json.loads(p.read_text()) for p in (out / "_vesl" / "units").glob("*.json")}


def staged(out: Path) -> set[int]:
    """Units with parts under the staging folder."""
    staging = out / "_vesl" / "staging"
    return {int(d.name) for d in staging.iterdir() if d.is_dir() and any(d.iterdir())} if staging.exists() else set()


def in_flight(out: Path) -> set[int]:
    """Units with staged parts but no completion record yet (a commit removes the parts just after the record)."""
    return staged(out) - set(records(out))


def pids_where(test) -> set[int]:
    """Live processes whose /proc folder passes TEST (one that vanishes or is unreadable meanwhile does not)."""
    pids = set()
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and test(proc):
                pids.add(int(proc.name))
        except (OSError, IndexError, ValueError):
            continue
    return pids


def session_pids(sid: int) -> set[int]:
    """Processes in session SID: the driver started with start_new_session, its local Ray and every worker
    (Ray puts each worker in a process group of its own, so a process-group signal would miss them)."""
    return pids_where(lambda proc: int((proc / "stat").read_text().rsplit(")", 1)[1].split()[3]) == sid)


def signal_session(sid: int, sig: int) -> None:
    """SIG to every process in session SID, again until no new one appeared meanwhile."""
    done: set[int] = set()
    while todo := session_pids(sid) - done:
        for pid in todo:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        done |= todo


def freeze_when(proc: subprocess.Popen, ready, timeout: float = 300) -> None:
    """Poll until READY() holds, then stop PROC's whole session (the driver, its local Ray and the workers,
    which run the commit tasks) and check again: while it is stopped nothing can commit, so what READY()
    saw is what the kill that follows leaves behind."""
    deadline = time.time() + timeout
    while True:
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline, "never saw a committed unit beside two in flight"
        if ready():
            signal_session(proc.pid, signal.SIGSTOP)
            if ready():
                return
            signal_session(proc.pid, signal.SIGCONT)
        time.sleep(0.02)


def test_kill_the_run_with_units_in_flight_then_rerun_redoes_only_those(tmp_path, tiny_dir, ray_local, capfd):
    """The killed run is a process of its own (its driver, Ray and workers die at once); the rerun, at full speed
    (batch sizes are speed settings: the same run resumes), runs here on the session's Ray."""
    manifest = many_images(tmp_path / "in", 40)
    out = tmp_path / "out"
    args = [str(manifest), str(out), "--preset", "tiny", "--set", "input.unit_rows=5"]
    stages = ("decode", "caption", "fuse", "phrases", "detect")
    slow = ["--set", "output.rows_per_part=1", "--set", "input.block_rows=1",  # a row at a time: units in flight
            *(x for stage in stages for x in ("--set", f"{stage}.batch_size=1"))]
    first = subprocess.Popen([sys.executable, SCRIPT, *args, *slow], env=script_env(tiny_dir),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    freeze_when(first, lambda: records(out) and len(in_flight(out)) >= 2)  # some units committed, several in flight
    frozen = records(out), in_flight(out)
    signal_session(first.pid, signal.SIGKILL)  # the driver, its Ray and every worker die at once, mid-write
    first.wait()
    time.sleep(2)
    assert (records(out), in_flight(out)) == frozen  # nothing survived the kill to change the output
    assert not (out / "manifest.json").exists()
    done_before, flying = frozen
    assert done_before and len(flying) >= 2
    shards_before = {p.name: p.stat().st_mtime_ns for p in (out / "data").glob("*.parquet")
                     if int(p.stem[5:]) in done_before}

    code, printed, err = annotate_here(capfd, *args)
    assert code == 0, err[-3000:]
    rows, rejects, result = read_output(out)
    assert len(rejects) == 0 and sorted(rows["image_id"]) == [f"img{i:03d}" for i in range(40)]
    assert result["mode"] == "resume" and result["counts"]["accounted"]
    after = records(out)
    redone = {u for u, r in after.items() if r["run_id"] == result["run_id"]}
    assert redone == set(range(8)) - set(done_before)  # exactly the units without a record: in flight or not begun
    assert flying <= redone and all(after[u] == r for u, r in done_before.items())
    assert result["this_run"]["units"] == len(redone) and result["this_run"]["inputs"] == 5 * len(redone)
    assert f"resumed: {5 * len(redone)} processed now" in printed
    assert {p.name: p.stat().st_mtime_ns for p in (out / "data").glob("*.parquet")
            if p.name in shards_before} == shards_before  # committed shards untouched
    assert not staged(out)  # staged parts of the killed run were discarded, none left


def _model_actor_pids(name: str) -> set[int]:
    return pids_where(lambda proc: name.encode() in (proc / "cmdline").read_bytes())


def test_a_killed_model_actor_is_restarted_and_the_run_completes(tmp_path, model_free, ray_local):
    """The labelling stage's actor (the model-free chain's, its rows taking 0.2 s each as a model's would) is
    killed once a shard is written: Ray restarts it and every input is still accounted for once."""
    manifest = many_images(tmp_path / "in", 24)
    out = tmp_path / "out"
    config = load_config(overrides=["output.rows_per_part=2", "decode.batch_size=2", "label.batch_size=2",
                                    "label.delay_s=0.2", "input.block_rows=2"])
    killed: list[int] = []

    def kill_detector_once():
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            pids = _model_actor_pids("MapBatches(LabelFromPixels)")
            if pids and list((out / "data").glob("*.parquet")):
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.2)

    killer = threading.Thread(target=kill_detector_once, daemon=True)
    killer.start()
    result = run_annotate(str(manifest), str(out), config)
    killer.join(timeout=5)
    assert killed, "the detector actor was never seen"
    rows, rejects, written = read_output(out)
    assert sorted(rows["image_id"]) == [f"img{i:03d}" for i in range(24)] and len(rejects) == 0
    assert result["counts"]["accounted"]
