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
from vesl.core.text import describe_error

log = logging.getLogger("vesl.cloc.data")
# Columns the trainer reads; image_bytes may be null (then the image is fetched from image_uri).
COLUMNS = ["image_id", "image_uri", "image_bytes", "caption", "regions"]


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
    meaning (a crop would cut them, padding would move them)."""

    from vesl.core.images import decode_image, fetch_bytes

    data = row.get("image_bytes")
    if data is None:
        if not row.get("image_uri"):
            raise ValueError("no image_bytes and no image_uri")
        data = fetch_bytes(row["image_uri"], storage_options, config.max_image_bytes, config.fetch_timeout_s)
    image, _, _ = decode_image(data, max_side=WORKING_MAX_SIDE)
    return square_pixels(image, size)


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
            reasons[i] = f"{getattr(e, 'reason', type(e).__name__)}: {describe_error(e)}"[:300]
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
