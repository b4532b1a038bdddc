"""decode: fetch bytes, refuse bombs before decoding, decode to RGB with EXIF orientation applied
(the fetch and decode themselves are `vesl.core.images`, which the trainer and the report share).

Adds `width`, `height` (the oriented original), `pixels` (a packed RGB working copy whose longer
side is at most `working_max_side`, what the model stages read) and its `pixel_width` /
`pixel_height`. The working copy is a uniform rescale, so normalised boxes found on it are
normalised boxes of the original.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
from PIL import Image, ImageFile
from pydantic import Field

from operators.base import Reject, Resources, Stage, StageConfig
from schemas.rejects import RejectReason as R
from vesl.core.images import DEFAULT_MAX_PIXELS, DecodeError, decode_image, fetch_bytes


class DecodeConfig(StageConfig):
    max_pixels: int = Field(
        default=DEFAULT_MAX_PIXELS, ge=1,
        description="Refuse images with more pixels than this, read from the header before decoding "
        "(decompression-bomb guard; 100 MP is a 10000x10000 photo).",
    )
    max_bytes: int = Field(default=64 * 1024 * 1024, ge=1, description="Refuse encoded files larger than this.")
    fetch_timeout_s: float = Field(
        default=60.0, gt=0,
        description="Give up on one http(s):// or s3:// fetch after this long, the whole fetch and each request "
        "(a 'fetch_failed' reject); the storage options' own request timeouts win where they are set.",
    )
    min_side: int = Field(default=1, ge=1, description="Refuse images whose shorter side is below this.")
    working_max_side: int = Field(
        default=1024, ge=32,
        description="Longer side of the RGB working copy handed to the model stages (OWLv2 uses 960).",
    )
    embed_images: bool = Field(
        default=False, description="Keep the encoded bytes so the writer can embed them (trainer-ready shards)."
    )
    batch_size: int = Field(default=16, ge=1, description="Rows per decode task batch.")


class DecodeImages(Stage):
    """Rows with `image_bytes` or `image_uri` in, decoded working copies out (Ray Data tasks: decode
    holds no model worth an actor)."""

    name = "decode"
    config_class = DecodeConfig
    reads = ("image_uri", "image_bytes")
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

    def decode_row(self, uri: str | None, data: bytes | None) -> dict[str, Any]:
        config = self.config
        if data is None:
            if not uri:
                raise DecodeError(R.MISSING_INPUT, "row has neither image bytes nor an image URI")
            data = fetch_bytes(uri, self.storage_options, config.max_bytes, config.fetch_timeout_s)
        elif len(data) > config.max_bytes:
            raise DecodeError(R.FILE_TOO_LARGE, f"more than {config.max_bytes} bytes")
        image, width, height = decode_image(data, max_pixels=config.max_pixels, min_side=config.min_side,
                                            max_side=config.working_max_side)
        return {"width": width, "height": height, "pixels": image.tobytes(), "pixel_width": image.size[0],
                "pixel_height": image.size[1], "image_bytes": data if config.embed_images else None}

    def process(self, batch: pa.Table) -> list[dict[str, Any] | Reject]:
        out: list[dict[str, Any] | Reject] = []
        for uri, data in zip(batch.column("image_uri").to_pylist(), batch.column("image_bytes").to_pylist()):
            try:
                out.append(self.decode_row(uri, data))
            except DecodeError as e:
                out.append(Reject(R(e.reason), str(e)))
        return out
