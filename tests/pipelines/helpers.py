"""Inputs with known answers for the end-to-end tests."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from schemas.region_text import RegionRow, check_schema_version, region_text_schema
from tests.conftest import encode, photo

# id -> expected reject reason (None: must be an output row)
EXPECTED = {
    "wide": None, "tall": None, "gray": None, "png_alpha": None, "webp": None,
    "truncated": "corrupt_image", "empty": "empty_file", "text": "not_an_image", "missing": "not_found",
}


def make_manifest(root: Path) -> Path:
    """A JSONL manifest (id, image, alt_text) over valid and broken local images."""
    images = root / "images"
    images.mkdir(parents=True)
    good = encode(photo(120, 60, seed=1))
    files = {
        "wide": ("wide.jpg", good), "tall": ("tall.jpg", encode(photo(50, 140, seed=2))),
        "gray": ("gray.png", encode(photo(64, 64, seed=3, mode="L"), "PNG")),
        "png_alpha": ("alpha.png", encode(photo(70, 30, seed=4, mode="RGBA"), "PNG")),
        "webp": ("pic.webp", encode(photo(90, 45, seed=5), "WEBP")),
        "truncated": ("trunc.jpg", good[: len(good) // 3]), "empty": ("empty.jpg", b""),
        "text": ("notes.jpg", b"this is not an image"),
    }
    for name, data in files.values():
        (images / name).write_bytes(data)
    rows = [{"id": key, "image": f"images/{name}", "alt_text": f"a red car next to a small dog ({key})"}
            for key, (name, _) in files.items()]
    rows.append({"id": "missing", "image": "images/does-not-exist.jpg", "alt_text": None})
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def read_output(out: Path | str, filesystem=None) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(rows, rejects, manifest) of a finished run; validates every row against schema v1."""
    out = str(out).rstrip("/")
    open_ = filesystem.open if filesystem else open
    with open_(f"{out}/manifest.json") as f:
        manifest = json.load(f)
    data_files = [f for f in manifest["files"] if "/data/" in f]
    reject_files = [f for f in manifest["files"] if "/rejects/" in f]
    tables = []
    for path in data_files:
        with open_(path.split("://", 1)[-1] if filesystem else path, "rb") as f:
            table = pq.read_table(f)
        check_schema_version(table.schema.metadata, where=path)
        assert table.schema.remove_metadata() == region_text_schema(), path
        for record in table.to_pylist():
            RegionRow.model_validate(record)
        tables.append(table.to_pandas())
    rows = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    rejects = []
    for path in reject_files:
        with open_(path.split("://", 1)[-1] if filesystem else path, "rb") as f:
            rejects.append(pq.read_table(f).to_pandas())
    rejects = pd.concat(rejects, ignore_index=True) if rejects else pd.DataFrame(columns=["image_id", "reason"])
    return rows, rejects, manifest


def assert_accounted(rows: pd.DataFrame, rejects: pd.DataFrame, manifest: dict, expected: dict) -> None:
    got = {**{i: None for i in rows.get("image_id", [])}, **dict(zip(rejects["image_id"], rejects["reason"]))}
    assert got == expected
    assert len(rows) + len(rejects) == len(expected)  # nothing doubled
    counts = manifest["counts"]
    assert counts["inputs"] == len(expected) == counts["rows"] + counts["rejects"]
    assert counts["accounted"] is True
    assert counts["funnel"][0]["entered"] == len(expected) and counts["funnel"][-1]["passed"] == len(rows)


def annotate_here(capfd, *args: str) -> tuple[int, str, str]:
    """`vesl annotate ARGS` in this process, on the session's Ray (with the stages the registry holds): its exit code
    and what it printed on stdout and stderr."""
    from vesl.annotate.job import main

    capfd.readouterr()
    code = main(list(args))
    out, err = capfd.readouterr()
    return code, out, err
