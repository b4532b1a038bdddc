"""Exit codes: each failure a user can act on has its own, found through Ray's and s3fs's wrapping."""

import errno

import pytest

from vesl.errors import (
    EXIT_DISK_FULL,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_LEASE_LOST,
    EXIT_PERMISSION,
    EXIT_TERMINATED,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    LeaseLostError,
    Terminated,
    classify,
)


def _wrapped(inner: BaseException) -> BaseException:
    """INNER as a Ray task error would carry it: raised from inside another exception, with `.cause`."""
    outer = RuntimeError("ray.exceptions.RayTaskError(UserCodeException): the write task failed")
    outer.cause = inner
    return outer


def _client_error(code: str):
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": code}}, "PutObject")


@pytest.mark.parametrize("error, code, words", [
    (OSError(errno.ENOSPC, "No space left on device"), EXIT_DISK_FULL, "no space left"),
    (PermissionError(errno.EACCES, "Permission denied"), EXIT_PERMISSION, "permission denied"),
    (_client_error("AccessDenied"), EXIT_PERMISSION, "permission denied"),
    (_client_error("InvalidAccessKeyId"), EXIT_PERMISSION, "credentials refused"),
    (_client_error("SignatureDoesNotMatch"), EXIT_PERMISSION, "credentials refused"),
    (ConnectionRefusedError(111, "Connection refused"), EXIT_UNREACHABLE, "unreachable"),
    (TimeoutError("read timed out"), EXIT_UNREACHABLE, "unreachable"),
    (ValueError("bad value"), EXIT_USAGE, "bad value"),
    (RuntimeError("an actor died 4 times"), EXIT_FAILED, "the job failed"),
    (KeyboardInterrupt(), EXIT_INTERRUPTED, "interrupted"),
    (Terminated(), EXIT_TERMINATED, "terminated"),
    (LeaseLostError("lease lost to run abcd1234 at host-7: it took OUTPUT over"), EXIT_LEASE_LOST,
     "lease lost to run abcd1234 at host-7"),
])
def test_each_failure_has_its_exit_code_even_when_wrapped(error, code, words):
    got, message = classify(error, (ValueError,))
    assert got == code and words in message and "\n" not in message
    if code not in (EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED):  # storage failures are found inside Ray's errors
        assert classify(_wrapped(error), (ValueError,))[0] == code
    if code == EXIT_USAGE:  # a ValueError raised inside a task is a failed job, not a usage mistake
        assert classify(_wrapped(error), (ValueError,))[0] == EXIT_FAILED
    assert 1 not in (EXIT_DISK_FULL, EXIT_PERMISSION, EXIT_UNREACHABLE, EXIT_USAGE, EXIT_FAILED)  # 1: accounting


def test_a_lost_lease_is_the_reason_whatever_it_broke_on_the_way():
    """The run that took OUTPUT over cleared the staging: the commit fails on a missing part, but the line
    says the lease was lost, not 'no such file'."""
    try:
        try:
            raise FileNotFoundError(2, "No such file or directory: '/out/_vesl/staging/000000003/x-rows.parquet'")
        except FileNotFoundError:  # commit_unit asks the fence again, which raises
            raise LeaseLostError("lease lost to run abcd1234 at host-7") from None
    except LeaseLostError as e:
        lost = e
    assert classify(_wrapped(lost), (ValueError,)) == (EXIT_LEASE_LOST, "lease lost to run abcd1234 at host-7")


def test_botocore_connection_errors_are_unreachable():
    from botocore.exceptions import EndpointConnectionError, ReadTimeoutError

    assert classify(EndpointConnectionError(endpoint_url="http://x"), ())[0] == EXIT_UNREACHABLE
    assert classify(_wrapped(ReadTimeoutError(endpoint_url="http://x")), ())[0] == EXIT_UNREACHABLE
