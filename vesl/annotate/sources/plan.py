"""Planning an input: list it once and decide how to read it (a manifest, WebDataset tars, img2dataset's
output, a folder of images), local or on any fsspec URI. Each source is one file a reading task takes."""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from vesl.annotate.sources.config import InputConfig
from vesl.annotate.sources.img2dataset import IMG2DATASET_LAYOUTS, STATS_SUFFIX
from vesl.annotate.sources.manifest import MANIFEST_SUFFIXES
from vesl.core.storage import canonical_uri, describe_change, filesystem, fingerprint, is_within, uri_prefix


class EmptyInputError(ValueError):
    """The input yields no inputs at all (and input.allow_empty is off)."""


@dataclass
class InputPlan:
    """How an input is read: KIND (manifest | webdataset | folder) and its SOURCES, the files one reading
    task each takes (a manifest file, a tar, an image, an img2dataset shard), plus what the listing held."""

    uri: str
    kind: str
    sources: list[dict[str, Any]]
    img2dataset: bool = False
    found: dict[str, int] = field(default_factory=dict)  # suffix (or "folder") -> count in the listing
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # URI -> fingerprint of each file read

    @property
    def label(self) -> str:
        """The kind, with img2dataset's name for its layout: 'webdataset (img2dataset webdataset)'."""
        if not self.img2dataset:
            return self.kind
        return f"{self.kind} (img2dataset {IMG2DATASET_LAYOUTS[self.kind]} layout)"

    def holds(self) -> str:
        return ", ".join(f"{n} {s}" for s, n in self.found.items()) or "nothing"


def _suffix(path: str) -> str:
    return posixpath.splitext(path)[1].lower() or "(no suffix)"


def plan_input(uri: str, config: InputConfig, storage_options: Mapping[str, Mapping[str, Any]] | None,
               exclude: str | None = None, allow_empty: bool | None = None) -> InputPlan:
    """List INPUT once and decide how to read it (see InputConfig.format). EXCLUDE (a folder, e.g. OUTPUT
    inside a folder input) is left out of the listing. Raises FileNotFoundError for a missing input,
    ValueError for one that cannot be read as asked, and EmptyInputError when there is nothing to read
    (unless ALLOW_EMPTY, by default input.allow_empty)."""
    fs, path = filesystem(uri, storage_options)
    fs.invalidate_cache()  # s3fs keeps listings per instance: a resume compares with the input as it is now
    if not fs.exists(path):
        raise FileNotFoundError(f"input {uri} does not exist")
    prefix = uri_prefix(uri)
    if not fs.isdir(path):
        plan = _plan_file(uri, prefix + path, config.format)
        plan.files = {prefix + path: fingerprint(fs.info(path))}
        return plan
    root = path.rstrip("/")
    listed = _listing(fs, root, uri, exclude)
    plan = _plan_folder(uri, root, prefix, sorted(listed), config)
    plan.files = _fingerprints(plan, root, prefix, listed)
    if not plan.sources and not (config.allow_empty if allow_empty is None else allow_empty):
        exts = ", ".join(e.lower() for e in config.image_extensions)
        wanted = {"webdataset": ".tar files", "manifest": f"manifest files ({', '.join(sorted(MANIFEST_SUFFIXES))})",
                  "folder": f"image files ({exts})"}[plan.kind]
        raise EmptyInputError(f"input {uri} yields no inputs: read as {plan.label}, it has no {wanted}; it holds "
                              f"{plan.holds()}. Set input.format to read it another way, or input.allow_empty=true "
                              "to accept an empty input")
    return plan


def _listing(fs, root: str, uri: str, exclude: str | None) -> dict[str, dict[str, Any]]:
    """Every file under ROOT (path -> its fingerprint), but hidden ones (`.x`, `_x`, or in such a folder)
    and those inside EXCLUDE."""
    skip = None
    if exclude is not None:
        where, inside = canonical_uri(uri), canonical_uri(exclude)
        skip = inside[len(where) + 1:] + "/" if inside != where and is_within(inside, where) else None
    infos = {}
    for f, info in fs.find(root, detail=True).items():
        rel = f[len(root):].lstrip("/")
        if any(part.startswith((".", "_")) for part in rel.split("/") if part) or (skip and rel.startswith(skip)):
            continue
        infos[f] = fingerprint(info)  # not the whole info: a folder of a million images is listed here
    return infos


def _plan_folder(uri: str, root: str, prefix: str, listing: list[str], config: InputConfig) -> InputPlan:
    """The plan of a folder INPUT from its LISTING (sorted file paths under ROOT)."""
    top = [f for f in listing if posixpath.dirname(f) == root]
    subdirs = sorted({f[len(root) + 1:].split("/", 1)[0] for f in listing if posixpath.dirname(f) != root})
    found = dict(sorted(_count(_suffix(f) for f in listing).items()))
    if subdirs:
        found["folders"] = len(subdirs)
    names = {posixpath.basename(f) for f in top}
    stems = sorted({n[: -len(STATS_SUFFIX)] for n in names if n.endswith(STATS_SUFFIX)}
                   | {posixpath.splitext(n)[0] for n in names if n.endswith(".parquet")
                      and (posixpath.splitext(n)[0] + ".tar" in names or posixpath.splitext(n)[0] in subdirs)})
    img2dataset = any(f"{s}.parquet" in names for s in stems)
    tars = [f for f in top if f.endswith(".tar")] if img2dataset else [f for f in listing if f.endswith(".tar")]
    manifests = [f for f in listing
                 if _suffix(f) in MANIFEST_SUFFIXES and not (img2dataset and f.endswith(STATS_SUFFIX))]
    kind = config.format
    if kind == "auto":
        if img2dataset:
            kind = "webdataset" if tars else "folder" if any(s in subdirs for s in stems) else "manifest"
        else:
            suffixes = {_suffix(f) for f in listing}
            kind = ("webdataset" if suffixes and suffixes <= {".tar"}
                    else "manifest" if suffixes and suffixes <= set(MANIFEST_SUFFIXES) else "folder")
    plan = InputPlan(uri, kind, [], img2dataset=img2dataset, found=found)
    if kind == "webdataset":
        status = {f"{root}/{s}.tar": f"{root}/{s}.parquet" for s in stems if f"{s}.parquet" in names}
        plan.sources = [{"uri": prefix + t, "index": i, "status": prefix + status[t] if t in status else None}
                        for i, t in enumerate(tars)]
    elif kind == "manifest":
        formats = {MANIFEST_SUFFIXES[_suffix(f)] for f in manifests}
        if len(formats) > 1:
            raise ValueError(f"input {uri} mixes manifest formats {sorted({_suffix(f) for f in manifests})}: use one")
        plan.sources = [{"uri": prefix + f, "index": i} for i, f in enumerate(manifests)]
    else:
        shard_dirs = {s for s in stems if s in subdirs and f"{s}.parquet" in names}
        exts = tuple(e.lower() for e in config.image_extensions)
        plan.sources = _folder_units(root, prefix, listing, exts, shard_dirs)
    return plan


SOURCE_FILE_KEYS = ("uri", "status", "txt", "json")  # the keys of a source that name a file its reader opens


def _fingerprints(plan: InputPlan, root: str, prefix: str, listed: Mapping[str, dict[str, Any]]
                  ) -> dict[str, dict[str, Any]]:
    """URI -> fingerprint of every file PLAN's readers open: each source's file and the status table and
    sidecars beside it, and every file of an img2dataset files-layout shard folder."""
    def path_of(u: str) -> str:
        return u[len(prefix):] if prefix else u

    files, by_folder = {}, {}
    if any(source.get("folder") for source in plan.sources):
        for f in listed:
            by_folder.setdefault(f[len(root) + 1:].split("/", 1)[0], []).append(f)
    for source in plan.sources:
        for key in SOURCE_FILE_KEYS:
            if source.get(key) and path_of(source[key]) in listed:
                files[source[key]] = listed[path_of(source[key])]
        if source.get("folder"):
            for f in by_folder.get(posixpath.basename(source["folder"].rstrip("/")), []):
                files[prefix + f] = listed[f]
    return files


def _plan_file(uri: str, file_uri: str, forced: str) -> InputPlan:
    """The plan of an INPUT that is one file: a manifest or a WebDataset tar, told by its suffix."""
    suffix = _suffix(file_uri)
    kind = "webdataset" if suffix == ".tar" else "manifest" if suffix in MANIFEST_SUFFIXES else None
    if kind is None and forced == "auto":
        raise ValueError(f"input {uri}: cannot tell its format from the suffix; expected one of "
                         f"{sorted(MANIFEST_SUFFIXES)} or .tar, or a folder")
    if forced not in ("auto", kind):
        raise ValueError(f"input {uri} is one {suffix} file; input.format={forced} needs "
                         + ("a folder" if forced == "folder" else "a .tar" if forced == "webdataset"
                            else f"one of {sorted(MANIFEST_SUFFIXES)}"))
    return InputPlan(uri, kind, [{"uri": file_uri, "index": 0}], found={suffix: 1})


def _folder_units(root: str, prefix: str, listing: list[str], exts: tuple[str, ...],
                  shard_dirs: set[str]) -> list[dict[str, Any]]:
    """The units of a folder input: each image with the .txt / .json beside it when the listing has
    them, then each img2dataset files-layout shard (status table + folder)."""
    files_by_stem: dict[str, set[str]] = {}
    for f in listing:
        files_by_stem.setdefault(posixpath.splitext(f)[0], set()).add(_suffix(f))
    images = [f for f in listing if f.lower().endswith(exts) and f[len(root) + 1:].split("/", 1)[0] not in shard_dirs]
    units = []
    for i, f in enumerate(images):
        stem = posixpath.splitext(f)[0]
        sidecars = {side: prefix + f"{stem}.{side}" if f".{side}" in files_by_stem[stem] else None
                    for side in ("txt", "json")}
        units.append({"uri": prefix + f, "index": i, **sidecars})
    for k, s in enumerate(sorted(shard_dirs)):
        status = prefix + f"{root}/{s}.parquet"
        units.append({"uri": status, "index": len(images) + k, "status": status, "folder": prefix + f"{root}/{s}"})
    return units


FILES_SCHEMA = pa.schema([("uri", pa.string()), ("size", pa.int64()), ("mtime", pa.float64()), ("etag", pa.string())])


def files_table(files: Mapping[str, Mapping[str, Any]]) -> pa.Table:
    """FILES (URI -> fingerprint) as a table, sorted by URI: what a plan records of its input."""
    uris = sorted(files)
    return pa.table({"uri": uris, **{k: [files[u][k] for u in uris] for k in ("size", "mtime", "etag")}},
                    schema=FILES_SCHEMA)


def _differs(a: pa.ChunkedArray, b: pa.ChunkedArray) -> pa.ChunkedArray:
    """A != B, where null != value and null == null."""
    both_null = pc.and_(pc.is_null(a), pc.is_null(b))
    return pc.and_(pc.fill_null(pc.not_equal(a, b), True), pc.invert(both_null))


def changed_files(planned: pa.Table, now: pa.Table) -> pa.Table:
    """The files (uri, then each fingerprint field planned and now) that differ between two `files_table`s:
    gone (now null), new (planned null), or another size, ETag or (without ETags) modification time."""
    joined = planned.join(now, "uri", join_type="full outer", left_suffix="_planned", right_suffix="_now")
    col = joined.column
    tagged = pc.or_(pc.is_valid(col("etag_planned")), pc.is_valid(col("etag_now")))
    gone_or_new = pc.or_(pc.is_null(col("size_planned")), pc.is_null(col("size_now")))
    differs = pc.or_(pc.or_(gone_or_new, _differs(col("size_planned"), col("size_now"))),
                     pc.if_else(tagged, _differs(col("etag_planned"), col("etag_now")),
                                _differs(col("mtime_planned"), col("mtime_now"))))
    return joined.filter(differs).sort_by("uri")


def describe_changes(changed: pa.Table, limit: int = 5) -> str:
    """The first LIMIT rows of `changed_files` in words: 'FILE: missing', 'FILE: new', 'FILE: grown: ...'."""
    out = []
    for row in changed.slice(0, limit).to_pylist():
        planned = {k: row[f"{k}_planned"] for k in ("size", "mtime", "etag")}
        now = {k: row[f"{k}_now"] for k in ("size", "mtime", "etag")}
        what = ("missing" if now["size"] is None and planned["size"] is not None
                else "new (not in the plan)" if planned["size"] is None else describe_change(planned, now))
        out.append(f"{row['uri']}: {what}")
    more = changed.num_rows - len(out)
    return "; ".join(out) + (f"; and {more} more" if more > 0 else "")


def _count(items) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out
