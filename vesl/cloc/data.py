"""From region-text shards to training tensors.

`vesl.core.outdir.find_shards` lists and checks the shards (schema v1 footers); `prepare_batch` turns a batch of
shard rows into fixed-shape arrays: the image resized to the model's square input (uint8), the
caption's and every region phrase's token ids, region boxes padded to `max_regions` with a mask.
It runs in Ray Data tasks for training and in-process for evaluation, and never raises on a bad
row: a broken or unreachable image gives `ok = False` and a `skip_reason`, counted by the trainer.
`sample_regions` draws up to M regions per image for one step.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import Field

from schemas.region_text import conform_table
from vesl.core.settings import Settings

log = logging.getLogger("vesl.cloc.data")
# Columns the trainer reads: the image is its bytes, else its location, else its original URI (read_image).
COLUMNS = ["image_id", "image_uri", "image_bytes", "image_location", "image_offset", "image_length", "caption",
           "regions"]


class DataConfig(Settings):
    max_regions: int = Field(default=32, ge=1, description="Regions kept per image (highest scores first); M are "
                             "sampled from these each step. The paper's labels average ~11.5 per image.")
    phrase_max_tokens: int = Field(default=16, ge=4, description="Token budget of a region phrase (phrases are "
                                   "at most a few words).")
    caption_max_tokens: int | None = Field(default=None, ge=4, description="Token budget of a caption; None: the "
                                           "text encoder's maximum (77 for CLIP).")
    prep_batch_rows: int = Field(default=64, ge=1, description="Rows per Ray Data preprocessing task batch.")
    materialize: bool = Field(default=False, description="Keep the preprocessed data in Ray's object store after "
                              "the first pass (small datasets: each epoch then skips decoding).")
    shuffle_buffer_rows: int = Field(default=1024, ge=0, description="Local shuffle buffer of each worker (rows).")
    fetch_timeout_s: float = Field(default=60.0, gt=0, description="Timeout of one image fetch by URI.")
    max_image_bytes: int = Field(default=50_000_000, ge=1, description="Refuse larger encoded images.")
    relocate: dict[str, str] = Field(default_factory=dict, description="Old prefix -> new prefix of image_location: "
                                     "the input was moved or copied after it was annotated (e.g. "
                                     "{'s3://old-bucket/tars/': '/mnt/tars/'}); the longest matching prefix wins.")
    max_unreadable_share: float = Field(default=0.2, ge=0, le=1, description="Stop (with the first failures and the "
                                        "fix) when more than this share of the rows read so far have no readable "
                                        "image; a batch with none at all is skipped and counted either way.")
    probe_images: int = Field(default=32, ge=0, description="Before training, read this many images spread over "
                              "the shards and refuse to start when more than max_unreadable_share fail (0: off).")


class UnreadableImagesError(RuntimeError):
    """More than data.max_unreadable_share of the rows have no readable image: training stops (or does not
    start) rather than learn from what is left without a word."""


def unreadable_line(failed: int, rows: int, share: float, examples: list[str], what: str) -> str:
    """The one line that stops training: the count, the first failures, the fix."""
    return (f"{failed} of {rows} {what} have no readable image (more than data.max_unreadable_share={share}); "
            f"first failures: {'; '.join(examples[:3]) or 'none recorded'}. Fix: make the images readable where the "
            "shards say they are (image_location; if the input moved, map its old prefix to the new one with "
            "--relocate OLD=NEW or data.relocate), or annotate again with decode.embed_images: true so the shards "
            "carry the images")


def probe_images(uris: list[str], config: DataConfig, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Read up to config.probe_images images spread over the shards URIS (the first rows of evenly spaced
    files) before training starts; raises UnreadableImagesError when more than max_unreadable_share fail.
    Returns {"probed": n, "failed": k}."""
    from vesl.core.images import failure_text

    want = config.probe_images
    if not want or not uris:
        return {"probed": 0, "failed": 0}
    picked = [uris[round(i * (len(uris) - 1) / max(1, min(want, len(uris)) - 1))] for i in range(min(want, len(uris)))]
    per_file = -(-want // len(picked))
    probed, failures = 0, []
    for uri in dict.fromkeys(picked):
        for table in iter_shard_batches(uri, storage_options, per_file):
            for row in table.to_pylist():
                probed += 1
                try:
                    read_row_image(row, storage_options, config)
                except Exception as e:  # noqa: BLE001 - counted; the line names the first ones
                    failures.append(f"{row.get('image_id')}: {failure_text(e)}"[:300])
            break  # the first PER_FILE rows of each file
    if probed and len(failures) > config.max_unreadable_share * probed:
        raise UnreadableImagesError(unreadable_line(len(failures), probed, config.max_unreadable_share, failures,
                                                    "images probed before training"))
    return {"probed": probed, "failed": len(failures)}


def text_key(text: str) -> int:
    """A stable 63-bit key of a phrase's normalised text: equal keys = identical phrases."""
    digest = hashlib.blake2b(" ".join(text.lower().split()).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@functools.lru_cache(maxsize=4)
def load_tokenizer(model: str, revision: str | None = None):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model, revision=revision)


def tokenize(tokenizer: Any, texts: list[str], max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_tokens, return_tensors="np")
    return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)


def load_image(row: Mapping[str, Any], size: int, storage_options: Mapping[str, Any] | None,
               config: DataConfig) -> np.ndarray:
    """A row's image as (SIZE, SIZE, 3) uint8, stretched to the square: normalised boxes keep their
    meaning (a crop would cut them, padding would move them). Read by `read_image`: the row's bytes,
    else its location (through `config.relocate`), else its original URI."""

    from vesl.core.images import decode_image

    image, _, _ = decode_image(read_row_image(row, storage_options, config), max_side=WORKING_MAX_SIDE)
    return square_pixels(image, size)


def read_row_image(row: Mapping[str, Any], storage_options: Mapping[str, Any] | None, config: DataConfig) -> bytes:
    """A shard row's encoded image, read with the trainer's limits and `config.relocate` (a DecodeError says
    which place failed and why)."""
    from vesl.core.images import ImageRef, read_image

    return read_image(ImageRef.of(row), storage_options, config.max_image_bytes, config.fetch_timeout_s,
                      config.relocate)


WORKING_MAX_SIDE = 1024  # the longer side an image is first scaled down to, as decode does


def square_pixels(image, size: int) -> np.ndarray:
    """An oriented RGB image (its longer side at most WORKING_MAX_SIDE) -> (SIZE, SIZE, 3) uint8, stretched."""
    from PIL import Image

    return np.asarray(image.resize((size, size), Image.Resampling.BICUBIC), dtype=np.uint8)


def prepare_batch(batch: pa.Table | Mapping[str, Any], *, tokenizer: str, revision: str | None, image_size: int,
                  caption_max_tokens: int, config: DataConfig,
                  storage_options: Mapping[str, Any] | None = None, region_texts: bool = True) -> dict[str, np.ndarray]:
    """Shard rows -> fixed-shape arrays (see the module doc). Bad rows are kept, flagged `ok = False`.
    REGION_TEXTS False leaves out `region_phrases` (a 2-D array of strings, for evaluation only, which
    Ray Data could only pickle)."""
    from vesl.core.images import failure_text

    table = batch if isinstance(batch, pa.Table) else pa.table(dict(batch))
    rows = table.to_pylist()
    tok = load_tokenizer(tokenizer, revision)
    n, r, lp = len(rows), config.max_regions, config.phrase_max_tokens
    pixels = np.zeros((n, image_size, image_size, 3), np.uint8)
    ok = np.ones(n, bool)
    reasons = np.array([""] * n, dtype=object)
    boxes = np.zeros((n, r, 4), np.float32)
    valid = np.zeros((n, r), bool)
    keys = np.zeros((n, r), np.int64)
    phrases = np.full((n, r), "", dtype=object)
    for i, row in enumerate(rows):
        try:
            pixels[i] = load_image(row, image_size, storage_options, config)
        except Exception as e:  # noqa: BLE001 - one bad image must not stop training; counted by the trainer
            ok[i] = False
            reasons[i] = failure_text(e)[:300]
            continue
        regions = sorted(row.get("regions") or [], key=lambda g: -float(g["score"]))[:r]
        for j, region in enumerate(regions):
            boxes[i, j] = region["box"]
            valid[i, j] = True
            keys[i, j] = text_key(region["phrase"])
            phrases[i, j] = region["phrase"]
    captions = [row.get("caption") or "" for row in rows]
    input_ids, attention_mask = tokenize(tok, captions, caption_max_tokens)
    flat = [p for p in phrases.reshape(-1)]
    phrase_ids, phrase_mask = tokenize(tok, flat, lp)
    out = {
        "image_id": np.array([row["image_id"] for row in rows], dtype=object),
        "ok": ok, "skip_reason": reasons, "pixels": pixels,
        "input_ids": input_ids, "attention_mask": attention_mask,
        "region_boxes": boxes, "region_valid": valid & ok[:, None], "region_keys": keys,
        "region_phrases": phrases,
        "phrase_ids": phrase_ids.reshape(n, r, lp), "phrase_mask": phrase_mask.reshape(n, r, lp),
    }
    if not region_texts:
        del out["region_phrases"]
    return out


def sample_regions(valid, m: int, generator=None):
    """Up to M regions per image, uniformly without replacement among VALID (B, R) ones.
    Returns flat (image_index, slot) tensors: region k is slot[k] of image image_index[k]."""
    import torch

    scores = torch.rand(valid.shape, generator=generator)
    scores = scores.masked_fill(~valid.cpu(), -1.0)
    top = scores.topk(min(m, valid.shape[1]), dim=1)
    keep = top.values >= 0
    image_index = torch.arange(valid.shape[0]).unsqueeze(1).expand_as(keep)[keep]
    return image_index.to(valid.device), top.indices[keep].to(valid.device)


def iter_shard_batches(uri: str, storage_options: Mapping[str, Any] | None = None,
                       batch_rows: int = 64) -> Iterator[pa.Table]:
    """The trainer's COLUMNS of one shard file, cast to schema v1, in tables of up to BATCH_ROWS rows
    (a shard that pandas wrote back, without image_bytes or with a double score, reads the same)."""
    from vesl.core.outdir import iter_pages, open_parquet

    with open_parquet(uri, storage_options) as pf:
        present = [c for c in COLUMNS if c in pf.schema_arrow.names]
        for record_batch in iter_pages(pf, uri, batch_size=batch_rows, columns=present):
            yield conform_table(pa.Table.from_batches([record_batch]), where=uri, columns=COLUMNS)


def read_shard_files(batch: pa.Table, storage_options: Mapping[str, Any] | None, batch_rows: int) -> Iterator[pa.Table]:
    """Ray Data generator UDF: one row per shard URI in, `iter_shard_batches` tables out."""
    for uri in batch.column("uri").to_pylist():
        yield from iter_shard_batches(uri, storage_options, batch_rows)


def iter_prepared(uris: list[str], *, tokenizer: str, revision: str | None, image_size: int,
                  caption_max_tokens: int, config: DataConfig, storage_options: Mapping[str, Any] | None = None,
                  batch_rows: int = 64) -> Iterator[dict[str, np.ndarray]]:
    """Prepared batches read straight from the shards, in order, without Ray (evaluation)."""
    for uri in uris:
        for table in iter_shard_batches(uri, storage_options, batch_rows):
            yield prepare_batch(table, tokenizer=tokenizer, revision=revision, image_size=image_size,
                                caption_max_tokens=caption_max_tokens, config=config, storage_options=storage_options)
