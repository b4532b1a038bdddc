"""One writer per OUTPUT: a lease with generations, on any fsspec filesystem (local disk, S3).

A run holds OUTPUT while the newest file of `OUTPUT/_lease/` is its own and fresh. Taking the lease
is an exclusive create of the next generation (`O_EXCL` locally, `If-None-Match: *` on S3), so of
two runs that start together exactly one gets a generation; the other is refused with the holder's
run id, host, pid and heartbeat age. The holder rewrites its file every `heartbeat_s`; a lease whose
file has not changed for `ttl_s` (its holder died: SIGKILL, a lost node) is taken over by creating
the next generation. Nothing is ever deleted or overwritten by a non-holder, so two takers of one
stale lease cannot both win.

The generation is also a fencing token: before each commit a writer checks that its generation is
still the newest (`Lease.fence()`), so a run that lost its lease (it looked dead and was taken over) stops
committing instead of writing beside its successor.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vesl.annotate.units import Slice
from vesl.core.outdir import LEASE_DIR, OutputDir
from vesl.core.storage import modified_time
from vesl.core.text import describe_error
from vesl.errors import LeaseLostError, OutputConflictError, storage_problem

log = logging.getLogger("vesl.annotate.output.lease")
TTL_S = 120.0  # a holder silent this long is taken for dead: generous for clock skew and slow stores
CLOCK_SLACK_S = 5.0  # a time this far ahead of this machine's clock is still believed (small skew, rounding)
HEARTBEAT_S = 15.0


class LeaseHeldError(RuntimeError):
    """Another live run holds OUTPUT."""


def _now() -> float:
    return time.time()


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="seconds")


class Lease:
    """The lease on OUTPUT (on one slice of it when NAME is given) for one run. `acquire()` takes it (or
    raises LeaseHeldError), `start()` keeps it fresh from a daemon thread, `release()` marks it free.
    `fence()` is the picklable check a worker runs before each commit."""

    def __init__(self, out: OutputDir, run_id: str | None = None, ttl_s: float = TTL_S,
                 heartbeat_s: float = HEARTBEAT_S, name: str | None = None) -> None:
        self.out = out
        self.name = name  # a slice's lease: _lease/NAME/ (the whole run's is _lease/ itself)
        self.folder = f"{LEASE_DIR}/{name}" if name else LEASE_DIR
        self.run_id = run_id or uuid.uuid4().hex[:8]
        self.ttl_s, self.heartbeat_s = ttl_s, heartbeat_s
        self.generation: int | None = None
        self.took_over: dict[str, Any] | None = None  # the stale holder this run replaced, if any
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None

    # ------------------------------------------------------------------ storage
    def _file(self, generation: int) -> str:
        return f"{self.folder}/{generation:08d}.json"

    def _generations(self) -> list[int]:
        return sorted(int(n[:-5]) for n in self.out.names(self.folder) if n.endswith(".json") and n[:-5].isdigit())

    def _read(self, generation: int) -> tuple[dict[str, Any], float | None]:
        """(the holder's record, or {} when unreadable, e.g. 0 bytes after a full disk; storage mtime)."""
        try:
            mtime = modified_time(self.out.fs, self.out.path(self._file(generation)))
        except FileNotFoundError:
            return {}, None
        try:
            record = json.loads(self.out.read_bytes(self._file(generation)) or b"{}")
        except (OSError, ValueError):
            record = {}
        return (record if isinstance(record, dict) else {}), mtime

    def _write(self, released: bool = False, exclusive: bool = False) -> None:
        now = _now()
        record = json.dumps({"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
                             "generation": self.generation, "heartbeat_at": _iso(now), "heartbeat_ts": now,
                             "ttl_s": self.ttl_s, "released": released}).encode()
        with self.out.fs.open(self.out.path(self._file(self.generation)), "xb" if exclusive else "wb") as f:
            f.write(record)

    @staticmethod
    def _holder_dead_here(record: Mapping[str, Any]) -> bool:
        """True when the holder ran on this host and its process is gone (a SIGKILLed driver re-run on
        the same machine need not wait out the TTL). Other hosts' holders go by the TTL alone."""
        pid = record.get("pid")
        if record.get("host") != socket.gethostname() or not isinstance(pid, int) or pid == os.getpid():
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, someone else's
            return False
        return False

    @staticmethod
    def _age(record: Mapping[str, Any], mtime: float | None) -> float:
        """Seconds since the holder last showed life, by this machine's clock: the newer of its own heartbeat
        time and the file's mtime, leaving out a time ahead of this clock (a holder whose clock runs fast
        would otherwise look alive for as long as its clock is ahead). -inf when every time is ahead."""
        marks = [t for t in (record.get("heartbeat_ts"), mtime) if isinstance(t, (int, float))]
        now = _now()
        sane = [t for t in marks if t <= now + CLOCK_SLACK_S]
        if marks and not sane:
            return -float("inf")
        return now - max(sane) if sane else float("inf")

    def _newest(self) -> tuple[int, dict[str, Any], float, bool]:
        """(the newest generation (0: none), its record, its holder's silence in s, whether it is live: not
        released, heard from within the TTL, not a dead process on this host). A holder whose every time
        is ahead of this clock counts as live: how long it has been silent cannot be told."""
        generations = self._generations()
        if not generations:
            return 0, {}, float("inf"), False
        record, mtime = self._read(generations[-1])
        age = self._age(record, mtime)
        live = not record.get("released") and age < self.ttl_s and not self._holder_dead_here(record)
        return generations[-1], record, age, live

    def _held_error(self, newest: int, record: Mapping[str, Any], age: float) -> LeaseHeldError:
        holder = (f"{self.out.uri} is being written by run {record.get('run_id', '?')} on host "
                  f"{record.get('host', '?')} (pid {record.get('pid', '?')})")
        if age == -float("inf"):
            return LeaseHeldError(
                f"{holder}, whose lease file is dated ahead of this machine's clock, so how long it has been silent "
                f"cannot be told: the clocks of this host, that run's host or the storage disagree. Fix the clocks "
                f"(NTP); if that run is dead, delete {self.out.uri_of(self._file(newest))} and re-run")
        return LeaseHeldError(
            f"{holder}, last heartbeat {age:.0f} s ago. One run writes an OUTPUT at a time: wait for it to finish, or, "
            f"if it is dead, re-run after {max(0.0, self.ttl_s - age):.0f} s more without a heartbeat, when its lease "
            "is taken over")

    def live_holder(self) -> dict[str, Any] | None:
        """The record of this lease's live holder, else None."""
        _, record, _, live = self._newest()
        return record if live else None

    # ------------------------------------------------------------------ holder
    def acquire(self) -> "Lease":
        self.out.makedirs(self.folder)
        for _ in range(5):  # a few rounds when another taker races us to the same generation
            newest, record, age, live = self._newest()
            if live:
                self.generation = None  # nothing held: release() and discard() then touch nothing
                raise self._held_error(newest, record, age)
            previous = {**record, "silent_s": round(age, 1)} if newest and not record.get("released") else None
            self.generation = newest + 1
            try:
                self._write(exclusive=True)
            except FileExistsError:
                continue  # another run took this generation first: look again
            if self._verify():
                self.took_over = previous
                for old in self._generations()[:-2]:  # superseded: keep ours and the one before
                    self.out.remove(self._file(old))
                return self
        self.generation = None
        raise LeaseHeldError(f"{self.out.uri}: could not take the lease (other runs keep taking it); try again")

    def _verify(self) -> bool:
        """Read our generation back: on a store that ignores If-None-Match the last writer wins, and the
        read-back tells the others they lost."""
        record, _ = self._read(self.generation)
        return record.get("run_id") == self.run_id and self._generations()[-1] == self.generation

    def heartbeat(self) -> None:
        newest = self._generations()
        if newest and newest[-1] != self.generation:
            self.lost = lost_to(self, newest[-1], self.generation)
            return
        self._write()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.heartbeat()
            except Exception as e:  # noqa: BLE001 - a missed beat is retried; the TTL spans several beats
                log.warning("lease heartbeat on %s failed (retried in %.0f s): %s", self.out.uri, self.heartbeat_s, e)
            if self.lost:
                log.error("%s", self.lost)
                return

    def start(self) -> "Lease":
        self._thread = threading.Thread(target=self._beat, name="vesl-lease", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        """Stop the heartbeat and mark the lease free (the next run takes the next generation at once)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.generation is None or self.lost:
            return
        try:
            self._write(released=True)
        except Exception:  # noqa: BLE001 - best effort: an unreleased lease goes stale after ttl_s
            pass

    def discard(self) -> None:
        """Release and delete this run's lease file (and `_lease/` when nothing else is in it): for a run
        refused before it wrote anything, so an OUTPUT it must not use is left as it found it."""
        self.release()
        if self.generation is None or self.lost:
            return
        try:
            self.out.remove(self._file(self.generation))
            if not self.out.names(self.folder):
                self.out.remove(self.folder, recursive=True)
        except Exception:  # noqa: BLE001 - best effort
            pass

    def __enter__(self) -> "Lease":
        return self.acquire().start()

    def __exit__(self, *exc) -> None:
        self.release()

    def fence(self) -> "LeaseFence":
        return LeaseFence(self.out, int(self.generation or 0), self.name, self.ttl_s)


@dataclass(frozen=True)
class LeaseFence:
    """The generation a run holds, as a picklable check: calling it raises LeaseLostError when a newer
    generation holds OUTPUT (a worker calls it just before it commits a file)."""

    out: OutputDir
    generation: int
    name: str | None = None
    ttl_s: float = TTL_S

    def __call__(self) -> None:
        lease = Lease(self.out, name=self.name, ttl_s=self.ttl_s)
        newest = lease._generations()
        if newest and newest[-1] != self.generation:
            raise LeaseLostError(lost_to(lease, newest[-1], self.generation))


def lost_to(lease: Lease, newest: int, ours: int | None) -> str:
    """The one line a run that lost LEASE (NEWEST generation > OURS) stops with: who holds OUTPUT now."""
    record, _ = lease._read(newest)
    return (f"lease lost to run {record.get('run_id', '?')} at {record.get('host', '?')}: it took {lease.out.uri} "
            f"over (generation {newest}, ours {ours}) while this run looked dead (stopped or cut off for longer than "
            f"the lease's {lease.ttl_s:.0f} s). This run stopped committing; what it committed stays, and that run "
            "finishes the rest")


def take_lease(out: OutputDir, part: Slice = Slice(), wait_s: float = 0.0, poll_s: float = 5.0,
               ttl_s: float = TTL_S) -> Lease:
    """This run's lease on OUTPUT (on its slice PART of it), heartbeating. A live holder of an
    overlapping slice (a whole run overlaps every slice) is a LeaseHeldError, after waiting up to WAIT_S
    for it to finish or go stale; an OUTPUT this run cannot write to is an OutputConflictError; both
    before any work."""
    deadline = time.monotonic() + wait_s
    try:
        while True:
            lease = Lease(out, name=part.lease_name, ttl_s=ttl_s, heartbeat_s=min(HEARTBEAT_S, ttl_s / 4))
            try:
                lease.acquire()  # raises before it holds anything
                try:
                    check_overlapping_leases(out, part, lease)
                except LeaseHeldError:
                    lease.discard()  # ours, taken a moment ago: given back untouched
                    raise
                break
            except LeaseHeldError as held:
                if time.monotonic() + poll_s > deadline:
                    raise
                log.info("waiting for the lease (output.lease_wait_s): %s", held)
                time.sleep(poll_s)
    except OSError as e:
        problem = storage_problem(e)
        raise OutputConflictError(f"cannot write to OUTPUT {out.uri}: "
                                  f"{problem[1] if problem else 'write failed'}: {describe_error(e)}") from e
    return lease.start()


def check_overlapping_leases(out: OutputDir, part: Slice, mine: Lease) -> None:
    """LeaseHeldError when a live run holds a slice of OUTPUT that overlaps PART (the whole-run lease
    overlaps everything). Every taker checks after taking its own lease, so of two overlapping runs
    that start together neither goes on unseen by the other."""
    others: list[Slice] = [Slice()]
    for entry in out.entries(LEASE_DIR):
        other = Slice.from_lease_name(entry["name"])
        if other is not None and entry["type"] == "directory":
            others.append(other)
    for other in others:
        if other.lease_name == mine.name or not other.overlaps(part):
            continue
        holder = Lease(out, name=other.lease_name, ttl_s=mine.ttl_s).live_holder()
        if holder:
            raise LeaseHeldError(
                f"{out.uri} is being written by run {holder.get('run_id', '?')} on host {holder.get('host', '?')} "
                f"(pid {holder.get('pid', '?')}) for {other.describe()}, which overlaps {part.describe()}: "
                "slices of one N never overlap; wait for it to finish")


__all__ = ["HEARTBEAT_S", "Lease", "LeaseFence", "LeaseHeldError", "LeaseLostError", "TTL_S", "take_lease"]
