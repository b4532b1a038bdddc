"""The `input:` section: how an input is recognised and read, and how it is cut into work units."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from vesl.core.settings import Settings

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


class InputConfig(Settings):
    format: Literal["auto", "manifest", "webdataset", "folder"] = Field(
        default="auto",
        description="'auto': img2dataset's output folders by their layout (NNNNN.tar -> webdataset, NNNNN.parquet "
        "with images -> manifest, NNNNN/ image folders -> folder; their NNNNN.parquet status tables and "
        "NNNNN_stats.json beside them), a .parquet/.jsonl/.json/.csv file (or a folder of them) is a manifest, "
        ".tar files are WebDataset shards, any other folder is a folder of images. Any other value forces that "
        "reading of the input (e.g. 'webdataset': only the folder's .tar files).",
    )
    allow_empty: bool = Field(default=False, description="Accept an input that yields no inputs at all (the run "
                              "then writes an empty OUTPUT). Off: that is an error naming what the input holds.")
    status_column: str = Field(default="status", description="img2dataset's per-row download status: a row whose "
                               "status is not 'success' becomes a `read` reject with that status as its reason and "
                               "ERROR_COLUMN as its message, instead of a second download.")
    error_column: str = Field(default="error_message", description="img2dataset's download error message.")
    id_column: list[str] = Field(default=["id", "key", "image_id"], description="Id column names, first found wins.")
    image_column: list[str] = Field(default=["image", "url", "path", "image_uri", "image_path"],
                                    description="Image path/URI column names (img2dataset: url).")
    bytes_column: list[str] = Field(default=["image_bytes", "jpg", "png", "webp", "bytes"],
                                    description="Encoded image column names (img2dataset: jpg).")
    alt_text_column: list[str] = Field(default=["alt_text", "caption", "text", "txt"],
                                       description="Alt-text column names (img2dataset: caption).")
    image_extensions: list[str] = Field(default=list(IMAGE_SUFFIXES), description="Files a folder input reads.")
    limit: int | None = Field(default=None, ge=1, description="Read only the first N inputs (smoke runs): the "
                              "plan scans source files in order until it has N, and keeps the first N.")
    unit_rows: int = Field(
        default=10_000, ge=1,
        description="Inputs per work unit: the input is split once into units (a manifest every this many records, "
        "a tar or img2dataset shard each, a folder's images this many at a time), each written as one shard, one "
        "rejects file and one completion record. A resume redoes only units without a record. Used when the plan is "
        "made (the first run on an OUTPUT); later runs keep the saved units.",
    )
    slice: str | None = Field(
        default=None, pattern=r"^\d+/\d+$",
        description="I/N: process only slice I of N of the plan's units (contiguous), so N jobs (e.g. N RayJobs) "
        "share one input and one OUTPUT. `--slice I/N` sets it. Slices of one N never overlap; every job reads "
        "the same saved plan.",
    )
    block_rows: int = Field(
        default=64, ge=1,
        description="Rows per Ray Data block, the unit that streams from stage to stage. A reader emits a whole "
        "manifest file as one block; it is split into blocks of this size so stages overlap and shards land "
        "progressively (64 decoded 1024x768 images are about 150 MB). Smaller blocks cost per-block overhead, "
        "larger ones fill the pipeline and the object-store budget slowly (README, Performance).",
    )
