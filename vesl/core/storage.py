"""Where bytes live: local paths, s3:// and any other fsspec URI, with credentials kept secret.

Credentials come from the config or the usual AWS environment (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_ENDPOINT_URL, AWS_DEFAULT_REGION), which s3fs and
botocore read themselves. Secrets are `SecretStr`: they print as '**********' in logs, errors and
the run manifest.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import stat
from collections.abc import Mapping
from typing import Any

from pydantic import Field, SecretStr

from vesl.core.settings import Settings


class StorageConfig(Settings):
    endpoint_url: str | None = Field(default=None, description="S3 endpoint (MinIO, moto, a non-AWS store).")
    region: str | None = Field(default=None, description="S3 region.")
    key: SecretStr | None = Field(default=None, description="S3 access key id; else from the environment.")
    secret: SecretStr | None = Field(default=None, description="S3 secret access key; else from the environment.")
    token: SecretStr | None = Field(default=None, description="S3 session token.")
    anon: bool = Field(default=False, description="Anonymous access to public buckets.")
    connect_timeout_s: float = Field(default=10.0, gt=0, description="S3: give up connecting after this long.")
    read_timeout_s: float = Field(default=30.0, gt=0, description="S3: give up on a request whose connection sends "
                                  "nothing for this long (an endpoint that hangs).")
    max_attempts: int = Field(default=3, ge=1, description="S3: attempts per request, retries included (botocore's "
                              "standard retry mode with backoff); s3fs adds one more round on a timeout. A hung "
                              "endpoint fails a request after about 2 x max_attempts x read_timeout_s (3 minutes), "
                              "where botocore's and s3fs's defaults take about 14.")

    def options(self) -> dict[str, dict[str, Any]]:
        """fsspec storage options by protocol (plain data: safe to pickle to workers, never logged)."""
        s3: dict[str, Any] = {"config_kwargs": {
            "connect_timeout": self.connect_timeout_s, "read_timeout": self.read_timeout_s,
            "retries": {"total_max_attempts": self.max_attempts, "mode": "standard"}},
            S3FS_RETRIES: 2}
        if self.anon:
            s3["anon"] = True
        for name in ("key", "secret", "token"):
            value = getattr(self, name)
            if value is not None:
                s3[name] = value.get_secret_value()
        client: dict[str, Any] = {}
        if self.endpoint_url:
            client["endpoint_url"] = self.endpoint_url
        if self.region:
            client["region_name"] = self.region
        if client:
            s3["client_kwargs"] = client
        return {"s3": s3, "s3a": s3}


def protocol_of(uri: str) -> str:
    """'s3' for s3://..., 'file' for a local path (fsspec's own reading of a URI)."""
    from fsspec.utils import get_protocol

    return get_protocol(uri)


def uri_prefix(uri: str) -> str:
    """What turns a path inside URI's filesystem back into a URI: 's3://' for s3://..., '' locally."""
    proto = protocol_of(uri)
    return "" if proto == "file" else f"{proto}://"


def options_for(uri: str, storage_options: Mapping[str, Mapping[str, Any]] | None) -> dict[str, Any]:
    return dict((storage_options or {}).get(protocol_of(uri), {}))


S3FS_RETRIES = "vesl_s3fs_retries"  # our key: s3fs's own retry rounds (a class attribute, not an argument)


def filesystem(uri: str, storage_options: Mapping[str, Mapping[str, Any]] | None = None):
    """(fsspec filesystem, path inside it) for URI."""
    import fsspec

    options = options_for(uri, storage_options)
    retries = options.pop(S3FS_RETRIES, None)
    fs, path = fsspec.core.url_to_fs(uri, **options)
    if retries is not None and hasattr(fs, "retries"):
        fs.retries = int(retries)
    return fs, path


def modified_time(fs, path: str) -> float | None:
    """PATH's last-modified time as a POSIX timestamp (local mtime, S3 LastModified), None if unknown."""
    return info_mtime(fs.info(path))


def info_mtime(info: Mapping[str, Any]) -> float | None:
    """The last-modified time of an fsspec info or listing entry as a POSIX timestamp, None if unknown."""
    t = info.get("mtime") or info.get("LastModified") or info.get("created")
    if t is None:
        return None
    try:
        return t.timestamp() if hasattr(t, "timestamp") else float(t)
    except (TypeError, ValueError):
        return None


VERSION_KEYS = ("ETag", "etag", "VersionId", "generation", "md5Hash")  # what a store says changes with the content


def fingerprint(info: Mapping[str, Any]) -> dict[str, Any]:
    """What tells one version of a file from another, from an fsspec info or listing entry: its size and,
    where the store gives one, its ETag (version, generation); else its modification time."""
    tag = next((str(info[k]).strip('"') for k in VERSION_KEYS if info.get(k)), None)
    size = info.get("size")
    return {"size": int(size) if size is not None else None, "mtime": info_mtime(info), "etag": tag}


def describe_change(planned: Mapping[str, Any], now: Mapping[str, Any]) -> str | None:
    """How a file changed between two fingerprints (`fingerprint`), None when it did not."""
    if planned.get("size") != now.get("size"):
        grew = (now.get("size") or 0) > (planned.get("size") or 0)
        return f"{'grown' if grew else 'shrunk'}: {planned.get('size')} -> {now.get('size')} bytes"
    if planned.get("etag") or now.get("etag"):
        if planned.get("etag") != now.get("etag"):
            return f"rewritten: ETag {planned.get('etag')} -> {now.get('etag')}"
        return None
    if planned.get("mtime") != now.get("mtime"):
        return f"modified at {_iso(now.get('mtime'))} (planned: {_iso(planned.get('mtime'))}), same size"
    return None


def _iso(t: float | None) -> str:
    import datetime as dt

    return "?" if t is None else dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="seconds")


def canonical_uri(uri: str) -> str:
    """Where URI really is, so that two spellings of one place compare equal: a local path made absolute
    with its symlinks resolved (`./in/x.jsonl`, `in//x.jsonl` and a link to it are one file); any other URI
    as its protocol (fsspec's first name for the store) and path, without repeated or trailing slashes (`s3a://b//k/` is
    `s3://b/k`). Nothing is read or listed."""
    if protocol_of(uri) == "file":
        return os.path.realpath(os.path.expanduser(uri.removeprefix("file://")))
    protocol, _, rest = uri.partition("://")
    protocol = SAME_PROTOCOL.get(protocol.lower(), protocol.lower())
    return f"{protocol}://{re.sub('/{2,}', '/', rest).rstrip('/')}"


SAME_PROTOCOL = {"s3a": "s3", "gcs": "gs", "az": "abfs"}  # fsspec's other names for one store


def is_within(inner: str, outer: str) -> bool:
    """Whether the canonical location INNER is OUTER or lies under it (both from `canonical_uri`)."""
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


class NotAFileError(OSError):
    """A local path that is not a regular file (a FIFO, a socket, a device): reading it could block for
    ever, or never end."""


def is_local(fs) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def open_regular(fs, path: str):
    """PATH of FS opened for binary reading. A local path must be a regular file (a symlink to one is
    fine): it is opened without blocking and checked before a byte is read, so a FIFO named `x.jpg`, a
    socket or `/dev/zero` is a NotAFileError instead of a read that never returns."""
    if not is_local(fs):
        return fs.open(path, "rb")
    fd = os.open(fs._strip_protocol(path), os.O_RDONLY | os.O_NONBLOCK)  # a FIFO opens at once, unread
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                    else "a directory" if stat.S_ISDIR(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                    else "not a regular file")
            raise NotAFileError(f"{path} is {kind}, not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def join_uri(base: str, *parts: str) -> str:
    if "://" in base:
        scheme, rest = base.split("://", 1)
        return f"{scheme}://{posixpath.join(rest, *parts)}"
    return posixpath.join(base, *parts)


def parent_uri(uri: str) -> str:
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://{posixpath.dirname(rest.rstrip('/'))}"
    return posixpath.dirname(uri.rstrip("/")) or "."


def ray_job_working_dir() -> str | None:
    """The `--working-dir` of the `ray job submit` this process is the entrypoint of, else None. Ray
    runs such an entrypoint inside a temporary copy of that directory, deleted with the job."""
    try:
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    except ValueError:
        return None
    return (job.get("runtime_env") or {}).get("working_dir") if isinstance(job, dict) else None


def resolve_output(uri: str, what: str = "OUTPUT") -> str:
    """URI with a local path made absolute. A relative local path is refused inside a `ray job submit`
    with a working dir: it would resolve into Ray's temporary copy of that dir and be lost."""
    if "://" in uri and not uri.startswith("file://"):
        return uri
    path = uri.removeprefix("file://")
    if not os.path.isabs(path) and ray_job_working_dir():
        raise ValueError(
            f"{what} {uri!r} is a relative path, and this Ray job runs in Ray's temporary copy of its working dir "
            f"({os.getcwd()}), which Ray deletes when the job ends: the result would be lost. Give an absolute path "
            "(on a multi-node cluster, one every node can reach) or an s3:// URI")
    return os.path.abspath(path)
