"""The OUTPUT lease: one holder at a time, refusal naming the holder, takeover of a dead holder's lease,
and the generation as a fencing token."""

from __future__ import annotations

import json
import threading
import time

import pytest

from vesl.annotate.output.lease import Lease, LeaseHeldError, LeaseLostError, take_lease
from vesl.annotate.units import Slice
from vesl.core.outdir import LEASE_DIR, OutputDir


def test_one_holder_and_a_refusal_that_names_it(tmp_path):
    out = OutputDir(str(tmp_path / "out"))
    first = Lease(out, run_id="aaaa1111").acquire()
    assert first.generation == 1 and first.took_over is None
    with pytest.raises(LeaseHeldError, match=r"run aaaa1111 on host .* \(pid \d+\), last heartbeat \d+ s ago"):
        Lease(out, run_id="bbbb2222").acquire()
    first.release()
    second = Lease(out, run_id="bbbb2222").acquire()
    assert second.generation == 2 and second.took_over is None  # a released lease is free at once
    record = json.loads((tmp_path / "out" / LEASE_DIR / "00000002.json").read_text())
    assert record["run_id"] == "bbbb2222" and record["released"] is False


def test_runs_that_start_together_get_one_lease(tmp_path):
    out = OutputDir(str(tmp_path / "out"))
    won, refused = [], []
    start = threading.Barrier(8)

    def race(k):
        start.wait()
        try:
            won.append(Lease(out, run_id=f"run{k}").acquire())
        except LeaseHeldError:
            refused.append(k)

    threads = [threading.Thread(target=race, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 7


def test_a_dead_holder_is_taken_over_and_fenced_off(tmp_path):
    out = OutputDir(str(tmp_path / "out"))
    dead = Lease(out, run_id="dead0000", ttl_s=0.5).acquire()  # never beats again: SIGKILLed, say
    with pytest.raises(LeaseHeldError):
        Lease(out, run_id="next0000", ttl_s=0.5).acquire()
    time.sleep(0.7)
    successor = Lease(out, run_id="next0000", ttl_s=0.5).acquire()
    assert successor.generation == 2 and successor.took_over["run_id"] == "dead0000"
    successor.fence()()  # the holder may commit
    with pytest.raises(LeaseLostError, match="lease lost to run next0000 at .*generation 2, ours 1"):
        dead.fence()()  # the old one may not
    dead.heartbeat()
    assert dead.lost and dead.lost.startswith("lease lost to run next0000 at ")
    assert json.loads((tmp_path / "out" / LEASE_DIR / "00000002.json").read_text())["run_id"] == "next0000"


def test_a_heartbeat_keeps_the_lease(tmp_path):
    out = OutputDir(str(tmp_path / "out"))
    with Lease(out, run_id="alive000", ttl_s=0.6, heartbeat_s=0.1):
        time.sleep(1.0)  # longer than the TTL: only the heartbeat keeps it
        with pytest.raises(LeaseHeldError, match="alive000"):
            Lease(out, ttl_s=0.6).acquire()
    assert Lease(out).acquire().generation == 2  # released on exit


def test_an_unreadable_lease_file_counts_by_its_age(tmp_path):
    """A 0-byte lease (a full disk) is held while fresh and taken over when old, never a crash."""
    folder = tmp_path / "out" / LEASE_DIR
    folder.mkdir(parents=True)
    (folder / "00000001.json").write_bytes(b"")
    with pytest.raises(LeaseHeldError, match=r"run \? on host \?"):
        Lease(OutputDir(str(tmp_path / "out")), ttl_s=0.3).acquire()
    time.sleep(0.4)
    assert Lease(OutputDir(str(tmp_path / "out")), ttl_s=0.3).acquire().generation == 2


def test_a_run_told_to_wait_takes_the_lease_once_the_holder_releases_it(tmp_path):
    out = OutputDir(str(tmp_path / "out"))
    holder = Lease(out, run_id="holder00").acquire()
    threading.Timer(1.0, holder.release).start()
    with pytest.raises(LeaseHeldError):
        take_lease(out, wait_s=0.3, poll_s=0.1)
    lease = take_lease(out, wait_s=10, poll_s=0.1)
    assert lease.generation == 2
    lease.release()


def test_a_discarded_lease_leaves_no_trace(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("someone else's folder")
    lease = Lease(OutputDir(str(tmp_path / "out"))).acquire()
    lease.discard()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["notes.txt"]


@pytest.mark.slow
def test_a_dead_holder_on_this_host_is_taken_over_at_once(tmp_path):
    """A SIGKILLed driver re-run on the same machine resumes without waiting out the TTL."""
    import subprocess
    import sys

    out = OutputDir(str(tmp_path / "out"))
    code = ("from vesl.annotate.output.lease import Lease; from vesl.core.outdir import OutputDir; "
            f"Lease(OutputDir({out.uri!r}), run_id='killed00').acquire()")
    subprocess.run([sys.executable, "-c", code], check=True)  # holds the lease, exits without releasing it
    lease = Lease(out).acquire()  # fresh heartbeat, but its pid is gone
    assert lease.generation == 2 and lease.took_over["run_id"] == "killed00"
    with pytest.raises(LeaseHeldError):  # a live holder on this host is still respected
        Lease(out).acquire()


def test_slices_hold_leases_side_by_side_and_overlapping_runs_are_refused(tmp_path):

    out = OutputDir(str(tmp_path / "out"))
    first, second = take_lease(out, Slice(0, 2)), take_lease(out, Slice(1, 2))
    try:
        with pytest.raises(LeaseHeldError, match="for slice 0/2, which overlaps the whole input"):
            take_lease(out)
        with pytest.raises(LeaseHeldError, match="for slice 1/2, which overlaps slice 3/4"):
            take_lease(out, Slice(3, 4))
        with pytest.raises(LeaseHeldError, match="is being written by run"):
            take_lease(out, Slice(1, 2))  # the same slice twice
    finally:
        first.release()
    again = take_lease(out, Slice(0, 4))  # inside the released half: free
    again.release()
    second.release()
    whole = take_lease(out)
    try:
        with pytest.raises(LeaseHeldError, match="for the whole input, which overlaps slice 1/2"):
            take_lease(out, Slice(1, 2))
    finally:
        whole.release()


def test_a_heartbeat_from_the_future_does_not_hold_the_lease_for_the_whole_skew(tmp_path):
    """A holder whose clock runs an hour fast: its heartbeat time is ignored, the file's time (this clock)
    counts, and the advice says how long is really left."""
    import os

    out = OutputDir(str(tmp_path / "out"))
    skewed = Lease(out, run_id="skewed00", ttl_s=1.0).acquire()
    path = tmp_path / "out" / LEASE_DIR / "00000001.json"
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "heartbeat_ts": record["heartbeat_ts"] + 3600, "host": "elsewhere"}))
    with pytest.raises(LeaseHeldError) as e:
        Lease(out, ttl_s=1.0).acquire()
    assert "last heartbeat 0 s ago" in str(e.value) and "heartbeat -" not in str(e.value)
    assert "re-run after 1 s more" in str(e.value)
    time.sleep(1.2)  # the TTL by this machine's clock, not 3600 s
    successor = Lease(out, run_id="next0000", ttl_s=1.0).acquire()
    assert successor.generation == 2 and successor.took_over["run_id"] == "skewed00"
    with pytest.raises(LeaseLostError, match="lease lost to run next0000"):
        skewed.fence()()
    # every time ahead of this clock (the storage's clock too): nothing tells its age, and the advice says so
    ahead = time.time() + 3600
    path2 = tmp_path / "out" / LEASE_DIR / "00000002.json"
    path2.write_text(json.dumps({**json.loads(path2.read_text()), "heartbeat_ts": ahead, "host": "elsewhere"}))
    os.utime(path2, (ahead, ahead))
    with pytest.raises(LeaseHeldError) as e:
        Lease(out, ttl_s=1.0).acquire()
    assert "dated ahead of this machine's clock" in str(e.value) and str(path2) in str(e.value)
    assert "Fix the clocks" in str(e.value)
