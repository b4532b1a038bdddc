"""decode: fetch bytes, refuse bombs before decoding, decode to RGB with EXIF orientation applied
(the fetch and decode themselves are `vesl.core.images`, which the trainer and the report share).

Adds `width`, `height` (the oriented original), `pixels` (a packed RGB working copy whose longer
side is at most `working_max_side`, what the model stages read) and its `pixel_width` /
`pixel_height`. The working copy is a uniform rescale, so normalised boxes found on it are
normalised boxes of the original.
"""

from __future__ import annotations

from typing import Any, Literal

import pyarrow as pa
from PIL import Image, ImageFile
from pydantic import Field

from operators.base import Reject, Resources, Stage, StageConfig
from schemas.columns import LOCATION_COLUMNS
from schemas.rejects import RejectReason as R
from vesl.core.images import (
    DEFAULT_FETCH_TIMEOUT_S,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    DecodeError,
    ImageRef,
    decode_image,
    read_image,
)


class DecodeConfig(StageConfig):
    max_pixels: int = Field(
        default=DEFAULT_MAX_PIXELS, ge=1,
        description="Refuse images with more pixels than this, read from the header before decoding "
        "(decompression-bomb guard; 100 MP is a 10000x10000 photo).",
    )
    max_bytes: int = Field(default=DEFAULT_MAX_BYTES, ge=1, description="Refuse encoded files larger than this.")
    fetch_timeout_s: float = Field(
        default=DEFAULT_FETCH_TIMEOUT_S, gt=0,
        description="Give up on one http(s):// or s3:// fetch after this long, the whole fetch and each request "
        "(a 'fetch_failed' reject); the storage options' own request timeouts win where they are set.",
    )
    min_side: int = Field(default=1, ge=1, description="Refuse images whose shorter side is below this.")
    working_max_side: int = Field(
        default=1024, ge=32,
        description="Longer side of the RGB working copy handed to the model stages (OWLv2 uses 960).",
    )
    embed_images: bool | Literal["auto"] = Field(
        default="auto", description="Keep the encoded image in the shard (image_bytes). 'auto': only when it has no "
        "image_location to be read again from (bytes given inline in a manifest or img2dataset's parquet layout, "
        "a fetch over http(s), a member of a compressed tar); true: every image (self-contained shards, for a "
        "trainer that cannot reach the input); false: none (rows without a location then point at image_uri).",
    )
    batch_size: int = Field(default=16, ge=1, description="Rows per decode task batch.")


class DecodeImages(Stage):
    """Rows with `image_bytes`, an `image_location` or an `image_uri` in (read by `vesl.core.images.read_image`,
    as every consumer of a shard reads them), decoded working copies out (Ray Data tasks: decode holds no
    model worth an actor)."""

    name = "decode"
    config_class = DecodeConfig
    reads = ("image_uri", "image_bytes", *LOCATION_COLUMNS)
    writes = ("width", "height", "pixels", "pixel_width", "pixel_height", "image_bytes")
    reasons = (R.MISSING_INPUT, R.NOT_FOUND, R.NOT_A_FILE, R.FETCH_FAILED, R.FILE_TOO_LARGE, R.EMPTY_FILE,
               R.NOT_AN_IMAGE, R.CORRUPT_IMAGE, R.DECOMPRESSION_BOMB, R.TOO_SMALL, R.DECODE_ERROR)
    error_reason = R.DECODE_ERROR
    resources = Resources(actor=False, num_cpus=1.0)

    def __init__(self, config: DecodeConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        # Truncated files are errors, never silently grey-filled images.
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        # PIL's own guard fires at its default 89 MP; align it with ours (ours runs first).
        Image.MAX_IMAGE_PIXELS = self.config.max_pixels

    def decode_row(self, ref: ImageRef) -> dict[str, Any]:
        config = self.config
        data = read_image(ref, self.storage_options, config.max_bytes, config.fetch_timeout_s)
        image, width, height = decode_image(data, max_pixels=config.max_pixels, min_side=config.min_side,
                                            max_side=config.working_max_side)
        embed = config.embed_images is True or (config.embed_images == "auto" and not ref.location)
        return {"width": width, "height": height, "pixels": image.tobytes(), "pixel_width": image.size[0],
                "pixel_height": image.size[1], "image_bytes": data if embed else None}

    def process(self, batch: pa.Table) -> list[dict[str, Any] | Reject]:
        out: list[dict[str, Any] | Reject] = []
        for row in batch.select(list(self.reads)).to_pylist():
            try:
                out.append(self.decode_row(ImageRef.of(row)))
            except DecodeError as e:
                out.append(Reject(R(e.reason), str(e)))
        return out
