"""Planning an input: list it once and decide how to read it (a manifest, WebDataset tars, img2dataset's
output, a folder of images), local or on any fsspec URI. Each source is one file a reading task takes."""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from vesl.annotate.sources.config import InputConfig
from vesl.annotate.sources.img2dataset import IMG2DATASET_LAYOUTS, STATS_SUFFIX
from vesl.annotate.sources.manifest import MANIFEST_SUFFIXES
from vesl.core.storage import filesystem, uri_prefix


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


def plan_input(uri: str, config: InputConfig, storage_options: Mapping[str, Mapping[str, Any]] | None) -> InputPlan:
    """List INPUT once and decide how to read it (see InputConfig.format). Raises FileNotFoundError for
    a missing input, ValueError for one that cannot be read as asked, and EmptyInputError when there
    is nothing to read (unless input.allow_empty)."""
    fs, path = filesystem(uri, storage_options)
    if not fs.exists(path):
        raise FileNotFoundError(f"input {uri} does not exist")
    prefix = uri_prefix(uri)
    forced = config.format
    if not fs.isdir(path):
        return _plan_file(uri, prefix + path, forced)
    root = path.rstrip("/")
    listing = sorted(f for f in fs.find(root) if not any(
        part.startswith((".", "_")) for part in f[len(root):].split("/") if part))
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
    exts = tuple(e.lower() for e in config.image_extensions)
    kind = forced
    if forced == "auto":
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
        plan.sources = _folder_units(root, prefix, listing, exts, shard_dirs)
    if not plan.sources and not config.allow_empty:
        wanted = {"webdataset": ".tar files", "manifest": f"manifest files ({', '.join(sorted(MANIFEST_SUFFIXES))})",
                  "folder": f"image files ({', '.join(exts)})"}[kind]
        raise EmptyInputError(f"input {uri} yields no inputs: read as {plan.label}, it has no {wanted}; it holds "
                              f"{plan.holds()}. Set input.format to read it another way, or input.allow_empty=true "
                              "to accept an empty input")
    return plan


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


def _count(items) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out
