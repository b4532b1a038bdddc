"""Exit codes and one-line error messages for the job entrypoints.

Every failure a user can act on ends in one line, `vesl annotate: error: ...`, and its own exit code:

    0    every input accounted for
    1    the accounting check failed (inputs != rows + rejects, or an image_id twice): see the manifest
    2    the command cannot run as given: arguments, config (YAML, values), input (missing, empty,
         unreadable), OUTPUT (another run holds it, it belongs to another input or config, a file in it
         is corrupt, its bucket is missing or cannot be written to), all found before any model loads
    3    no space left on the device (disk full) during the run
    4    permission denied or credentials refused during the run
    5    the storage endpoint is unreachable or stopped answering (storage.*_timeout_s) during the run
    6    the job itself failed (a stage crashed beyond its retries, no progress for ray.no_progress_timeout_s)
    7    the run lost OUTPUT's lease to another run (it was stopped or cut off longer than the lease's TTL,
         and another run took OUTPUT over): it stopped committing; what it committed before stays
    8    an inference server (caption/fuse backend: openai) stayed unreachable or overloaded through every
         retry: the run stopped, what it committed stays, and a re-run once the server is back finishes it
    130  interrupted (Ctrl-C); 143: terminated (SIGTERM). Nothing half-written is left in data/ or rejects/.
"""

from __future__ import annotations

import errno
import signal
import threading
from collections.abc import Iterator

EXIT_OK, EXIT_ACCOUNTING, EXIT_USAGE, EXIT_DISK_FULL, EXIT_PERMISSION, EXIT_UNREACHABLE, EXIT_FAILED = range(7)
EXIT_LEASE_LOST = 7
EXIT_ENDPOINT_DOWN = 8
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143


class OutputConflictError(RuntimeError):
    """OUTPUT holds something a run must not write into or resume (exit 2, before any work)."""


class CorruptStateError(OutputConflictError):
    """A file of OUTPUT's own state (run state, plan, completion record) or a shard cannot be read."""


class LeaseLostError(RuntimeError):
    """This run's lease on OUTPUT was taken over by another run: it must not commit anything more."""


class EndpointUnavailableError(RuntimeError):
    """An inference server stayed unreachable (or answered 429/5xx) through every retry of a request. Never a
    row's fault: it is not turned into a reject, it stops the job (exit 8) and a re-run finishes it."""


class EndpointCheckError(ValueError):
    """An inference server refused the job before any work: unreachable, the model not served, the key or the
    request's shape refused (exit 2)."""


class EndpointAuthError(PermissionError):
    """An inference server refused the API key during the run (HTTP 401/403): no row's fault (exit 4)."""


# errors of a stage's server that no row caused: raised through a stage's per-row isolation, never a reject
NOT_A_ROWS_FAULT = (EndpointUnavailableError, EndpointCheckError, EndpointAuthError)


class UnreadableFileError(ValueError):
    """A file a reader needs (a shard, a rejects file) cannot be read as what it should be; names the file."""


class Terminated(BaseException):
    """SIGTERM, raised in the main thread like KeyboardInterrupt is for SIGINT."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def install_stop_handlers() -> None:
    """SIGTERM raises Terminated in the main thread, so the job stops the way Ctrl-C stops it (the
    lease released, Ray shut down, exit 143) instead of dying inside Ray's own handler. Call it after
    ray.init, which installs a handler of its own."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)


def causes(error: BaseException) -> Iterator[BaseException]:
    """ERROR and what it wraps: __cause__/__context__ and Ray's RayTaskError.cause, at most 20 deep."""
    seen: set[int] = set()
    todo = [error]
    while todo and len(seen) < 20:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]


DISK_FULL = (EXIT_DISK_FULL, "no space left on the device")
PERMISSION = (EXIT_PERMISSION, "permission denied")
CREDENTIALS = (EXIT_PERMISSION, "credentials refused")
UNREACHABLE = (EXIT_UNREACHABLE, "storage endpoint unreachable or not answering")
_S3_CODES = {"AccessDenied": PERMISSION, "AllAccessDisabled": PERMISSION, "InvalidAccessKeyId": CREDENTIALS,
             "SignatureDoesNotMatch": CREDENTIALS, "ExpiredToken": CREDENTIALS, "InvalidToken": CREDENTIALS}
_UNREACHABLE_TYPES = ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
                      "ClientConnectorError", "ServerDisconnectedError", "ServerTimeoutError")


def storage_problem(error: BaseException) -> tuple[int, str] | None:
    """(exit code, what) when ERROR, or what it wraps, is a storage failure: disk full, permission or
    credentials, an endpoint that is gone or hangs. None otherwise."""
    for e in causes(error):
        response = getattr(e, "response", None)
        code = response.get("Error", {}).get("Code") if isinstance(response, dict) else None
        if code in _S3_CODES:
            return _S3_CODES[code]
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return DISK_FULL
        if isinstance(e, PermissionError) or (isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM)):
            return PERMISSION
        if type(e).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
            return CREDENTIALS
        if type(e).__name__ in _UNREACHABLE_TYPES or isinstance(e, (ConnectionError, TimeoutError)):
            return UNREACHABLE
    return None


def classify(error: BaseException, usage_errors: tuple[type[BaseException], ...]) -> tuple[int, str]:
    """(exit code, one-line message) for an exception that ended a job."""
    import yaml

    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "interrupted (Ctrl-C): stopped; re-run the same command to resume"
    if isinstance(error, Terminated):
        return EXIT_TERMINATED, "terminated (SIGTERM): stopped; re-run the same command to resume"
    if isinstance(error, yaml.YAMLError):
        return EXIT_USAGE, f"config is not valid YAML: {' '.join(str(error).split())}"
    if isinstance(error, usage_errors):  # refused before the run (an unwritable OUTPUT included): exit 2
        return EXIT_USAGE, one_line(error)
    lost = [e for e in causes(error) if isinstance(e, LeaseLostError)]
    if lost:  # whatever it broke on the way (a staged part the new holder cleared), this is why
        own = [e for e in lost if type(e) is LeaseLostError]  # not Ray's copy, whose text holds the task's traceback
        return EXIT_LEASE_LOST, one_line((own or lost)[0])
    down = [e for e in causes(error) if isinstance(e, EndpointUnavailableError)]
    if down:
        own = [e for e in down if type(e) is EndpointUnavailableError]  # not Ray's copy with the task's traceback
        return EXIT_ENDPOINT_DOWN, one_line((own or down)[0])
    problem = storage_problem(error)
    if problem:
        detail = next((e for e in causes(error) if not type(e).__name__.startswith(("Ray", "UserCode"))), error)
        return problem[0], f"{problem[1]}: {one_line(detail)}"
    return EXIT_FAILED, f"the job failed: {one_line(error)}"


def one_line(error: BaseException, limit: int = 600) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


__all__ = ["CorruptStateError", "EXIT_ACCOUNTING", "EXIT_DISK_FULL", "EXIT_ENDPOINT_DOWN", "EXIT_FAILED",
           "EXIT_INTERRUPTED", "EndpointAuthError", "EndpointCheckError", "EndpointUnavailableError",
           "NOT_A_ROWS_FAULT",
           "EXIT_LEASE_LOST", "EXIT_OK", "EXIT_PERMISSION", "EXIT_TERMINATED", "EXIT_UNREACHABLE", "EXIT_USAGE",
           "LeaseLostError", "OutputConflictError", "Terminated", "UnreadableFileError", "causes", "classify",
           "install_stop_handlers", "one_line", "storage_problem"]
