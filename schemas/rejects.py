"""Every reason an input can become a reject, by the stage that records it.

A reject row's `reason` is one of these values, except for inputs img2dataset already failed: those
keep img2dataset's own status (`failed_to_download`, `failed_to_resize`, ...) as their reason, so
its words are not translated into ours.
"""

from __future__ import annotations

from enum import StrEnum

READ_STAGE = "read"  # the reject_stage of inputs the reader (or the duplicate check) rejects


class RejectReason(StrEnum):
    # read: the input rows themselves
    BAD_MANIFEST_ROW = "bad_manifest_row"  # a manifest line that is not a JSON object, a row without a usable id
    UNREADABLE_MANIFEST = "unreadable_manifest"  # a manifest (or img2dataset status table) that cannot be read
    BAD_URI = "bad_uri"  # an image_uri longer than 8192 characters: data pasted into the wrong column
    MISSING_IMAGE = "missing_image"  # a WebDataset sample or img2dataset success without its image
    UNREADABLE_FILE = "unreadable_file"  # an image file of a folder input that cannot be read
    BAD_SIDECAR = "bad_sidecar"  # an image's .json/.txt sidecar that cannot be read
    UNREADABLE_SHARD = "unreadable_shard"  # a WebDataset tar that breaks off
    DUPLICATE = "duplicate"  # an image_id an earlier input already has (the first one is kept)
    # decode: fetching and decoding the image
    MISSING_INPUT = "missing_input"  # neither image bytes nor an image URI
    NOT_FOUND = "not_found"  # no such file, HTTP 404/410
    NOT_A_FILE = "not_a_file"  # a local path that is a FIFO, a socket, a device or a folder: never read
    FETCH_FAILED = "fetch_failed"  # any other fetch failure (HTTP status or transport error in the message)
    FILE_TOO_LARGE = "file_too_large"  # more than decode.max_bytes
    EMPTY_FILE = "empty_file"  # zero bytes
    NOT_AN_IMAGE = "not_an_image"  # no image format PIL knows
    CORRUPT_IMAGE = "corrupt_image"  # truncated data, corrupt chunks, codec errors
    DECOMPRESSION_BOMB = "decompression_bomb"  # more pixels than decode.max_pixels, read from the header
    TOO_SMALL = "too_small"  # a side below decode.min_side
    DECODE_ERROR = "decode_error"  # anything else the decode stage raised on this row
    # caption
    EMPTY_CAPTION = "empty_caption"  # the captioner wrote nothing (alt-text mode: the row has no alt-text)
    # fuse
    EMPTY_FUSION = "empty_fusion"  # the fusion LLM wrote nothing
    # phrases
    PHRASE_ERROR = "phrase_error"  # spaCy raised on this row's texts
    # caption, fuse, detect
    MODEL_ERROR = "model_error"  # the model raised on this row (the batch is retried row by row)
    # caption, fuse with backend openai
    # the inference server refused this row's request (a 4xx but 408/425/429), or failed it (500) on every try
    # while it answered other requests
    REQUEST_REFUSED = "request_refused"
