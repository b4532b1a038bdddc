"""OUTPUT on disk: where each file of an annotate run lives, fresh listings of its folders, atomic staged
writes checked against the run's lease, and finding the region-text shards of an OUTPUT, a folder or a file.

    OUTPUT/
      data/part-<unit>.parquet       region-text shards, one per work unit
      rejects/part-<unit>.parquet    one row per rejected input of the unit
      manifest.json                  the run manifest, written last by every run
      _vesl_run.json                 which input and label config OUTPUT holds
      _vesl/plan/                    the work units, planned once (plan.json written last)
      _vesl/units/<unit>.json        a committed unit's completion record
      _vesl/staging/<unit>/          parts of units in flight
      _vesl/stray/                   files found in data/ or rejects/ that are no unit's, moved aside
      _lease/                        who writes OUTPUT now (generations; `vesl.annotate.output.lease`)

Every writer and reader of OUTPUT goes through `OutputDir`: one filesystem per OUTPUT, paths relative to
its root, listings that never come from a stale cache (s3fs caches listings per instance, and other
processes write meanwhile), and writes that land whole or not at all.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from schemas.region_text import check_shard_schema, describe_footerless
from vesl.core.storage import filesystem, join_uri, uri_prefix
from vesl.core.text import describe_error
from vesl.errors import CorruptStateError, UnreadableFileError

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger("vesl.core.outdir")

DATA_DIR, REJECTS_DIR, MANIFEST, RUN_STATE = "data", "rejects", "manifest.json", "_vesl_run.json"
STATE_DIR = "_vesl"  # the run's own files
PLAN_DIR, UNITS_DIR = f"{STATE_DIR}/plan", f"{STATE_DIR}/units"
STAGING_DIR, STRAY_DIR = f"{STATE_DIR}/staging", f"{STATE_DIR}/stray"
LEASE_DIR = "_lease"

Fence = Callable[[], None]  # raises when this run may no longer write (its lease was taken over)


def unit_file(unit: int) -> str:
    """The shard / rejects file name of work unit UNIT."""
    return f"part-{unit:09d}.parquet"


def record_file(unit: int) -> str:
    return f"{UNITS_DIR}/{unit:09d}.json"


def _rel(parts: tuple[str, ...]) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


class OutputDir:
    """A folder vesl writes (an annotate OUTPUT), on any fsspec filesystem. Paths are relative to it:
    `out.path("data", name)` is the filesystem path, `out.uri_of(...)` the URI users see. Pickles as
    its URI and options (a Ray task rebuilds the filesystem)."""

    def __init__(self, uri: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.uri = uri.rstrip("/") or uri
        self.options = storage_options
        self.fs, root = filesystem(uri, storage_options)
        self.root = root.rstrip("/") or root

    def __getstate__(self) -> dict[str, Any]:
        return {"uri": self.uri, "options": self.options}

    def __setstate__(self, state: Mapping[str, Any]) -> None:
        self.__init__(state["uri"], state["options"])

    def __repr__(self) -> str:
        return f"OutputDir({self.uri!r})"

    # ------------------------------------------------------------------ where
    def path(self, *parts: str) -> str:
        rel = _rel(parts)
        return f"{self.root}/{rel}" if rel else self.root

    def uri_of(self, *parts: str) -> str:
        rel = _rel(parts)
        return join_uri(self.uri, rel) if rel else self.uri

    def rel_of(self, path: str) -> str:
        """PATH (a filesystem path inside OUTPUT, as a listing gives it) relative to the root."""
        return path.rstrip("/")[len(self.root) + 1:]

    # ------------------------------------------------------------------ look
    def exists(self, *parts: str) -> bool:
        """Whether PARTS exists now (the cached listing of its folder dropped first)."""
        path = self.path(*parts)
        self.fs.invalidate_cache(path.rsplit("/", 1)[0])
        self.fs.invalidate_cache(path)
        return self.fs.exists(path)

    def entries(self, *parts: str) -> list[dict[str, Any]]:
        """The entries of folder PARTS from a fresh listing, sorted by name, each {'name' (base name),
        'path', 'size', 'type'}; [] when the folder does not exist."""
        if not self.exists(*parts):
            return []
        out = [{**e, "path": e["name"].rstrip("/"), "name": e["name"].rstrip("/").rsplit("/", 1)[-1]}
               for e in self.fs.ls(self.path(*parts), detail=True)]
        return sorted(out, key=lambda e: e["name"])

    def names(self, *parts: str) -> list[str]:
        """Base names in folder PARTS (fresh listing, sorted); [] when it does not exist."""
        return [e["name"] for e in self.entries(*parts)]

    def parquet_files(self, *parts: str) -> list[str]:
        """Filesystem paths of the .parquet files of folder PARTS (fresh listing, sorted; staged
        temporary files are hidden and never listed)."""
        return [e["path"] for e in self.entries(*parts) if e["name"].endswith(".parquet")
                and not e["name"].startswith(".")]

    def open(self, *parts: str, mode: str = "rb"):
        """PARTS opened as a file (not staged: for files only this run knows of, like staged parts)."""
        if "w" in mode:
            self.fs.makedirs(self.path(*parts).rsplit("/", 1)[0], exist_ok=True)
        return self.fs.open(self.path(*parts), mode)

    def read_bytes(self, *parts: str) -> bytes:
        with self.fs.open(self.path(*parts), "rb") as f:
            return f.read()

    def read_json(self, *parts: str, what: str = "state file") -> dict[str, Any]:
        """A JSON object of OUTPUT; CorruptStateError naming the file when it is empty, not JSON or not an
        object (a disk that filled up while an older run wrote it, a hand edit)."""
        data = self.read_bytes(*parts)
        try:
            value = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise CorruptStateError(f"{self.uri_of(*parts)} is {'empty' if not data else 'not JSON'} (the {what}: "
                                    f"{e})") from None
        if not isinstance(value, dict):
            raise CorruptStateError(f"{self.uri_of(*parts)} is a JSON {type(value).__name__}, not an object (the "
                                    f"{what})")
        return value

    # ------------------------------------------------------------------ write
    def makedirs(self, *parts: str) -> None:
        self.fs.makedirs(self.path(*parts), exist_ok=True)

    def remove(self, *parts: str, recursive: bool = False) -> bool:
        """Remove PARTS; False when it was not there."""
        try:
            self.fs.rm(self.path(*parts), recursive=recursive)
        except FileNotFoundError:
            return False
        return True

    def move(self, src: str, dst: str) -> None:
        """Move SRC to DST (both relative), making DST's folder."""
        target = self.path(dst)
        self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        self.fs.mv(self.path(src), target)

    def staged_path(self, *parts: str) -> str:
        """A hidden temporary path beside PARTS (`.NAME.<hex>`: no listing of shards or records shows it)."""
        folder, _, name = self.path(*parts).rpartition("/")
        return f"{folder}/.{name}.{uuid.uuid4().hex[:8]}"

    def commit_staged(self, tmp: str, *parts: str, fence: Fence | None = None) -> None:
        """Move the staged file TMP into place as PARTS, once FENCE (the lease check) lets this run write."""
        if fence is not None:
            fence()
        self.fs.mv(tmp, self.path(*parts))

    def discard_staged(self, tmp: str) -> None:
        """Remove the staged file TMP (a write that failed, or was not committed), if it is there."""
        try:
            self.fs.rm(tmp)
        except (FileNotFoundError, OSError):
            pass

    @contextmanager
    def staged(self, *parts: str, fence: Fence | None = None, mode: str = "wb") -> Iterator[Any]:
        """Write PARTS whole or not at all: the body writes a file beside it, which then replaces PARTS
        (after FENCE); on any failure the temporary file is removed and PARTS is left as it was."""
        tmp = self.staged_path(*parts)
        self.fs.makedirs(tmp.rsplit("/", 1)[0], exist_ok=True)
        try:
            with self.fs.open(tmp, mode) as f:
                yield f
            self.commit_staged(tmp, *parts, fence=fence)
        except BaseException:
            self.discard_staged(tmp)
            raise

    def write_json(self, data: Mapping[str, Any], *parts: str, fence: Fence | None = None) -> None:
        with self.staged(*parts, fence=fence, mode="w") as f:
            json.dump(data, f, indent=1, default=str)

    def write_parquet(self, table: pa.Table, *parts: str, fence: Fence | None = None, **options: Any) -> int:
        """TABLE as the Parquet file PARTS, staged (OPTIONS: pyarrow's write_table); returns its size."""
        import pyarrow.parquet as pq

        with self.staged(*parts, fence=fence) as f:
            pq.write_table(table, f, **options)
        return self.fs.size(self.path(*parts))


# ---------------------------------------------------------------------------------------- shards
@contextmanager
def open_parquet(uri: str, storage_options: Mapping[str, Any] | None = None, what: str = "a shard") -> Iterator[Any]:
    """The Parquet file URI as a pyarrow ParquetFile. A file that is not there is a FileNotFoundError, one
    that is not Parquet (garbage, truncated) an UnreadableFileError; both name URI."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, path = filesystem(uri, storage_options)
    try:
        f = fs.open(path, "rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri} ({what}) is not there (deleted while it was read?)") from None
    with f:
        try:
            pf = pq.ParquetFile(f)
        except (pa.ArrowException, OSError, ValueError) as e:
            raise UnreadableFileError(f"{uri} ({what}) is not a readable Parquet file: {describe_error(e)}") from None
        yield pf


def read_pages(pf, uri: str, what: str = "a shard", **read) -> pa.Table:
    """PF's table (an open ParquetFile of URI; READ: ParquetFile.read's arguments, e.g. columns); an
    UnreadableFileError naming URI when a data page is damaged."""
    import pyarrow as pa

    try:
        return pf.read(**read)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise UnreadableFileError(f"{uri} ({what}) cannot be read: {describe_error(e)}") from None


def iter_pages(pf, uri: str, what: str = "a shard", **read) -> Iterator[pa.RecordBatch]:
    """PF's record batches (READ: ParquetFile.iter_batches' arguments); an UnreadableFileError naming URI
    when a data page is damaged."""
    import pyarrow as pa

    batches = pf.iter_batches(**read)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (pa.ArrowException, OSError, ValueError) as e:
            raise UnreadableFileError(f"{uri} ({what}) cannot be read: {describe_error(e)}") from None
        yield batch


def read_parquet(uri: str, storage_options: Mapping[str, Any] | None = None, what: str = "a shard",
                 **read) -> pa.Table:
    """The table of the Parquet file URI (READ: ParquetFile.read's arguments); errors name URI."""
    with open_parquet(uri, storage_options, what) as pf:
        return read_pages(pf, uri, what, **read)


def find_shards(uri: str, storage_options: Mapping[str, Any] | None = None, check: bool = True) -> list[str]:
    """Parquet files of a region-text dataset: an annotate OUTPUT (its data/ folder), a folder of
    shards, or one file. Returns full URIs, sorted, each checked for a v1 schema footer (CHECK False:
    not opened here, for a caller that reads every footer anyway and checks it then). A file without
    vesl's footer passes when its columns cast to v1 (see `schemas.region_text.check_shard_schema`)."""
    fs, path = filesystem(uri, storage_options)
    if fs.isdir(path) and fs.isdir(path.rstrip("/") + f"/{DATA_DIR}"):
        path = path.rstrip("/") + f"/{DATA_DIR}"
    if fs.isdir(path):
        root = path.rstrip("/")
        files = sorted(p for p in fs.find(path) if p.endswith(".parquet") and f"/{REJECTS_DIR}/" not in p
                       and not any(part.startswith(".") for part in p[len(root):].split("/")))
    elif fs.exists(path):
        files = [path]
    else:
        raise FileNotFoundError(f"no region-text shards at {uri}")
    if not files:
        raise FileNotFoundError(f"no .parquet shards under {uri}")
    uris = [uri_prefix(uri) + p for p in files]
    if check:
        checked = []
        for file_uri in uris:
            with open_parquet(file_uri, storage_options) as pf:
                checked.append((file_uri, check_shard_schema(pf.schema_arrow, where=file_uri)))
        note = describe_footerless(checked)
        if note:
            log.warning("%s", note)
    return uris


def count_rows(uris: list[str], storage_options: Mapping[str, Any] | None = None) -> int:
    """Rows of the Parquet files URIS, read from their footers."""
    total = 0
    for uri in uris:
        with open_parquet(uri, storage_options) as pf:
            total += pf.metadata.num_rows
    return total


def completion(uri: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, int] | None:
    """How far the annotate run in OUTPUT URI got: its plan's units and inputs, and the units with a
    completion record (every slice's); None when URI is no annotate OUTPUT (a folder of shards, a file)."""
    out = OutputDir(uri, storage_options)
    if not out.exists(PLAN_DIR, "plan.json"):
        return None
    plan = out.read_json(PLAN_DIR, "plan.json", what="plan")
    done = sum(1 for n in out.names(UNITS_DIR) if n.endswith(".json") and n[:-5].isdigit())
    return {"units_done": done, "units": int(plan.get("units", 0)), "planned_inputs": int(plan.get("inputs", 0))}
