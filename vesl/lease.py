"""One writer per OUTPUT: a lease with generations, on any fsspec filesystem (local disk, S3).

A run holds OUTPUT while the newest file of `OUTPUT/_lease/` is its own and fresh. Taking the lease
is an exclusive create of the next generation (`O_EXCL` locally, `If-None-Match: *` on S3), so of
two runs that start together exactly one gets a generation; the other is refused with the holder's
run id, host, pid and heartbeat age. The holder rewrites its file every `heartbeat_s`; a lease whose
file has not changed for `ttl_s` (its holder died: SIGKILL, a lost node) is taken over by creating
the next generation. Nothing is ever deleted or overwritten by a non-holder, so two takers of one
stale lease cannot both win.

The generation is also a fencing token: before each commit a writer checks that its generation is
still the newest (`check`), so a run that lost its lease (it looked dead and was taken over) stops
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
from typing import Any

log = logging.getLogger("vesl.lease")
LEASE_DIR = "_lease"
TTL_S = 120.0  # a holder silent this long is taken for dead: generous for clock skew and slow stores
HEARTBEAT_S = 15.0


class LeaseHeldError(RuntimeError):
    """Another live run holds OUTPUT."""


class LeaseLostError(RuntimeError):
    """This run's lease was taken over: it must not commit anything more."""


def _now() -> float:
    return time.time()


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="seconds")


class Lease:
    """The lease on OUTPUT for one run. `acquire()` takes it (or raises LeaseHeldError), `start()`
    keeps it fresh from a daemon thread, `release()` marks it free. Picklable state for workers:
    `token()` -> (output, generation, options), checked with `check_token`."""

    def __init__(self, output: str, storage_options: Mapping[str, Any] | None = None, run_id: str | None = None,
                 ttl_s: float = TTL_S, heartbeat_s: float = HEARTBEAT_S, name: str | None = None) -> None:
        self.output, self.options = output.rstrip("/"), storage_options
        self.name = name  # a slice's lease: _lease/NAME/ (the whole run's is _lease/ itself)
        self.run_id = run_id or uuid.uuid4().hex[:8]
        self.ttl_s, self.heartbeat_s = ttl_s, heartbeat_s
        self.generation: int | None = None
        self.took_over: dict[str, Any] | None = None  # the stale holder this run replaced, if any
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None

    # ------------------------------------------------------------------ storage
    def _fs(self):
        from vesl.core.storage import filesystem

        fs, root = filesystem(self.output, self.options)
        return fs, f"{root.rstrip('/')}/{LEASE_DIR}" + (f"/{self.name}" if self.name else "")

    def _generations(self, fs, folder: str) -> list[int]:
        fs.invalidate_cache(folder)
        if not fs.exists(folder):
            return []
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False)]
        return sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())

    def _read(self, fs, path: str) -> tuple[dict[str, Any], float | None]:
        """(the holder's record, or {} when unreadable, e.g. 0 bytes after a full disk; storage mtime)."""
        from vesl.core.storage import modified_time

        try:
            mtime = modified_time(fs, path)
        except FileNotFoundError:
            return {}, None
        try:
            with fs.open(path, "rb") as f:
                record = json.loads(f.read() or b"{}")
        except (OSError, ValueError):
            record = {}
        return (record if isinstance(record, dict) else {}), mtime

    def _record(self, released: bool = False) -> bytes:
        now = _now()
        return json.dumps({"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
                           "generation": self.generation, "heartbeat_at": _iso(now), "heartbeat_ts": now,
                           "ttl_s": self.ttl_s, "released": released}).encode()

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

    def _age(self, record: Mapping[str, Any], mtime: float | None) -> float:
        """Seconds since the holder last showed life: the newer of its own heartbeat and the file's mtime."""
        marks = [t for t in (record.get("heartbeat_ts"), mtime) if isinstance(t, (int, float))]
        return _now() - max(marks) if marks else float("inf")

    def live_holder(self) -> dict[str, Any] | None:
        """The record of this lease's live holder (not released, heartbeat within the TTL), else None."""
        fs, folder = self._fs()
        generations = self._generations(fs, folder)
        if not generations:
            return None
        record, mtime = self._read(fs, f"{folder}/{generations[-1]:08d}.json")
        if record.get("released") or self._age(record, mtime) >= self.ttl_s or self._holder_dead_here(record):
            return None
        return record

    # ------------------------------------------------------------------ holder
    def acquire(self) -> "Lease":
        fs, folder = self._fs()
        fs.makedirs(folder, exist_ok=True)
        for _ in range(5):  # a few rounds when another taker races us to the same generation
            generations = self._generations(fs, folder)
            if generations:
                newest = generations[-1]
                record, mtime = self._read(fs, f"{folder}/{newest:08d}.json")
                age = self._age(record, mtime)
                if not record.get("released") and age < self.ttl_s and not self._holder_dead_here(record):
                    self.generation = None  # nothing held: release() and discard() then touch nothing
                    raise LeaseHeldError(
                        f"{self.output} is being written by run {record.get('run_id', '?')} on host "
                        f"{record.get('host', '?')} (pid {record.get('pid', '?')}), last heartbeat {age:.0f} s ago. "
                        f"One run writes an OUTPUT at a time: wait for it to finish, or, if it is dead, re-run "
                        f"after {self.ttl_s:.0f} s without a heartbeat, when its lease is taken over")
                previous = None if record.get("released") else {**record, "silent_s": round(age, 1)}
            else:
                newest, previous = 0, None
            self.generation = newest + 1
            try:
                with fs.open(f"{folder}/{self.generation:08d}.json", "xb") as f:
                    f.write(self._record())
            except FileExistsError:
                continue  # another run took this generation first: look again
            if self._verify(fs, folder):
                self.took_over = previous
                for old in self._generations(fs, folder)[:-2]:  # superseded: keep ours and the one before
                    try:
                        fs.rm(f"{folder}/{old:08d}.json")
                    except FileNotFoundError:
                        pass
                return self
        self.generation = None
        raise LeaseHeldError(f"{self.output}: could not take the lease (other runs keep taking it); try again")

    def _verify(self, fs, folder: str) -> bool:
        """Read our generation back: on a store that ignores If-None-Match the last writer wins, and the
        read-back tells the others they lost."""
        record, _ = self._read(fs, f"{folder}/{self.generation:08d}.json")
        return record.get("run_id") == self.run_id and self._generations(fs, folder)[-1] == self.generation

    def heartbeat(self) -> None:
        fs, folder = self._fs()
        newest = self._generations(fs, folder)
        if newest and newest[-1] != self.generation:
            self.lost = (f"lease of {self.output} taken over (generation {newest[-1]} > ours, {self.generation}): "
                         "this run looked dead to another one")
            return
        with fs.open(f"{folder}/{self.generation:08d}.json", "wb") as f:
            f.write(self._record())

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.heartbeat()
            except Exception as e:  # noqa: BLE001 - a missed beat is retried; the TTL spans several beats
                log.warning("lease heartbeat on %s failed (retried in %.0f s): %s", self.output, self.heartbeat_s, e)
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
            fs, folder = self._fs()
            with fs.open(f"{folder}/{self.generation:08d}.json", "wb") as f:
                f.write(self._record(released=True))
        except Exception:  # noqa: BLE001 - best effort: an unreleased lease goes stale after ttl_s
            pass

    def discard(self) -> None:
        """Release and delete this run's lease file (and `_lease/` when nothing else is in it): for a run
        refused before it wrote anything, so an OUTPUT it must not use is left as it found it."""
        self.release()
        if self.generation is None or self.lost:
            return
        try:
            fs, folder = self._fs()
            fs.rm(f"{folder}/{self.generation:08d}.json")
            if not fs.ls(folder, detail=False):
                fs.rm(folder, recursive=True)
        except Exception:  # noqa: BLE001 - best effort
            pass

    def __enter__(self) -> "Lease":
        return self.acquire().start()

    def __exit__(self, *exc) -> None:
        self.release()

    def token(self) -> tuple[str, int, Mapping[str, Any] | None, str | None]:
        return self.output, int(self.generation or 0), self.options, self.name


def check_token(token: tuple[str, int, Mapping[str, Any] | None, str | None] | None) -> None:
    """Raise LeaseLostError when a newer generation than TOKEN's holds OUTPUT (a worker calls this
    just before it commits a file). TOKEN None: no lease in use (plain-Python callers)."""
    if token is None:
        return
    output, generation, options, name = token
    probe = Lease(output, options, name=name)
    fs, folder = probe._fs()
    newest = probe._generations(fs, folder)
    if newest and newest[-1] != generation:
        raise LeaseLostError(f"{output}: the lease passed to generation {newest[-1]} (ours: {generation}); "
                             "this run stops committing")


__all__ = ["HEARTBEAT_S", "LEASE_DIR", "Lease", "LeaseHeldError", "LeaseLostError", "TTL_S", "check_token"]
