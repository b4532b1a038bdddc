"""The columns that pass between the reader and the stages of the annotate job, with their types.

The reader (`vesl.inputs`) writes READER_COLUMNS; each stage declares which of these it reads and
writes (`operators.base.Stage`), and `operators.registry` checks the chain. The writer keeps the
shard's columns (`schemas.region_text`) and turns rejected rows into reject rows.
"""

from __future__ import annotations

import pyarrow as pa

from schemas.region_text import REGION_TYPE, SPANS_TYPE

REJECT_STAGE, REJECT_REASON, REJECT_MESSAGE = "reject_stage", "reject_reason", "reject_message"
REJECT_COLUMNS = (REJECT_STAGE, REJECT_REASON, REJECT_MESSAGE)

COLUMNS: dict[str, pa.DataType] = {
    # written by the reader
    "image_id": pa.string(),
    "image_uri": pa.string(),
    "image_bytes": pa.large_binary(),  # the encoded image (kept in the shard per decode.embed_images)
    # where the image can be read again: a file or a tar (+ the member's byte offset and length)
    "image_location": pa.string(),
    "image_offset": pa.int64(),
    "image_length": pa.int64(),
    "alt_text": pa.string(),
    # position of the input: (file index << 32) + row in file. Decides which of several rows sharing an
    # image_id is kept (the first), the same way on every run.
    "ordinal": pa.int64(),
    REJECT_STAGE: pa.string(),  # set once, by the first stage that rejects the row
    REJECT_REASON: pa.string(),  # a schemas.rejects.RejectReason
    REJECT_MESSAGE: pa.string(),
    # decode
    "width": pa.int32(),  # the oriented original
    "height": pa.int32(),
    "pixels": pa.large_binary(),  # packed RGB working copy, longer side <= decode.working_max_side
    "pixel_width": pa.int32(),
    "pixel_height": pa.int32(),
    # caption (fuse rewrites caption and caption_source)
    "caption": pa.string(),
    "vlm_caption": pa.string(),
    "caption_source": pa.string(),  # a schemas.region_text.CaptionSource
    # phrases
    "phrases": pa.list_(pa.string()),
    "phrase_sources": pa.list_(pa.string()),  # "caption" or "alt_text", one per phrase
    "phrase_spans": pa.list_(SPANS_TYPE),  # one per phrase: its [start, end) spans in its source text
    # detect
    "regions": pa.list_(REGION_TYPE),
}

LOCATION_COLUMNS = ("image_location", "image_offset", "image_length")
READER_COLUMNS = ("image_id", "image_uri", "image_bytes", *LOCATION_COLUMNS, "alt_text", "ordinal", *REJECT_COLUMNS)
INPUT_SCHEMA = pa.schema([pa.field(name, COLUMNS[name]) for name in READER_COLUMNS])
