"""decode: fetch bytes, refuse bombs before decoding, decode to RGB with EXIF orientation applied.

Adds `width`, `height` (the oriented original), `pixels` (a packed RGB working copy whose longer
side is at most `working_max_side`, what the model stages read) and its `pixel_width` /
`pixel_height`. The working copy is a uniform rescale, so normalised boxes found on it are
normalised boxes of the original.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from pydantic import Field

from operators.base import StageConfig, StageTimer, as_table, describe_error, mark_rejects, pending_rows, put_column

STAGE = "decode"


class DecodeConfig(StageConfig):
    max_pixels: int = Field(
        default=100_000_000, ge=1,
        description="Refuse images with more pixels than this, read from the header before decoding "
        "(decompression-bomb guard; 100 MP is a 10000x10000 photo).",
    )
    max_bytes: int = Field(default=64 * 1024 * 1024, ge=1, description="Refuse encoded files larger than this.")
    fetch_timeout_s: float = Field(
        default=60.0, gt=0,
        description="Give up on one http(s):// or s3:// fetch after this long (a 'fetch_failed' reject), "
        "unless the storage options set their own timeouts.",
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


class DecodeError(Exception):
    """A row that cannot be decoded, with the reject reason to record."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def with_timeout(uri: str, options: dict[str, Any], timeout_s: float | None) -> dict[str, Any]:
    """Add a per-request timeout to the fsspec options of network URIs (kept if already set)."""
    from vesl.storage import protocol_of

    protocol = protocol_of(uri)
    if timeout_s is None:
        return options
    if protocol in ("http", "https"):
        import aiohttp

        client = dict(options.get("client_kwargs", {}))
        client.setdefault("timeout", aiohttp.ClientTimeout(total=timeout_s))
        return {**options, "client_kwargs": client}
    if protocol in ("s3", "s3a"):
        config = dict(options.get("config_kwargs", {}))
        config.setdefault("connect_timeout", timeout_s)
        config.setdefault("read_timeout", timeout_s)
        return {**options, "config_kwargs": config}
    return options


def fetch_error(uri: str, error: BaseException) -> DecodeError:
    """The reject for a failed fetch. fsspec's http filesystem raises FileNotFoundError for every
    failure (a 404, a 503, a refused connection) with the real cause chained: the HTTP status, or the
    transport error, goes into the message, and only a 404/410 or a missing file is `not_found`."""
    cause = error.__cause__ or error.__context__
    status = getattr(cause, "status", None) if cause is not None else None
    if isinstance(status, int) and 100 <= status <= 599:
        text = f"HTTP {status} {str(getattr(cause, 'message', '') or '').strip()}".rstrip()
        return DecodeError("not_found" if status in (404, 410) else "fetch_failed", f"{text}: {uri}")
    if isinstance(error, FileNotFoundError) and uri.startswith(("http://", "https://")) and cause is not None:
        return DecodeError("fetch_failed", f"{uri}: {describe_error(cause)}")
    if isinstance(error, FileNotFoundError):
        return DecodeError("not_found", f"no such file: {uri}")
    if isinstance(error, IsADirectoryError):
        return DecodeError("not_found", f"is a directory: {uri}")
    return DecodeError("fetch_failed", f"{uri}: {describe_error(error)}")


def fetch_bytes(uri: str, storage_options: Mapping[str, Mapping[str, Any]] | None, max_bytes: int,
                timeout_s: float | None = None) -> bytes:
    """Read a local path or any fsspec URI, refusing files over MAX_BYTES without reading them whole.

    STORAGE_OPTIONS are fsspec options by protocol ({"s3": {...}})."""
    from vesl.storage import filesystem, options_for, protocol_of

    try:
        options = {protocol_of(uri): with_timeout(uri, options_for(uri, storage_options), timeout_s)}
        fs, path = filesystem(uri, options)
        with fs.open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except Exception as e:  # noqa: BLE001 - any transport error is a reject, not a crash
        raise fetch_error(uri, e) from e
    if len(data) > max_bytes:
        raise DecodeError("file_too_large", f"{uri}: more than {max_bytes} bytes")
    return data


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB for every mode PIL opens: alpha composited on white, 16-bit scaled, palette expanded."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        return Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        span = float(array.max() - array.min()) or 1.0
        return Image.fromarray(((array - array.min()) / span * 255.0).astype(np.uint8)).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(data: bytes, config: DecodeConfig) -> tuple[Image.Image, int, int]:
    """Decode DATA to an oriented RGB image; returns (working copy, original width, original height)."""
    if not data:
        raise DecodeError("empty_file", "zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size  # from the header: nothing decoded yet
            if width * height > config.max_pixels:
                raise DecodeError(
                    "decompression_bomb", f"{width}x{height} = {width * height} pixels > max_pixels {config.max_pixels}"
                )
            if getattr(image, "n_frames", 1) > 1:
                image.seek(0)  # animated: the first frame stands for the image
            image.load()
            image = ImageOps.exif_transpose(image)
            image = _to_rgb(image)
    except DecodeError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        reason = "not_an_image" if isinstance(e, UnidentifiedImageError) else "decompression_bomb"
        raise DecodeError(reason, describe_error(e)) from e
    except Exception as e:  # noqa: BLE001 - truncated data, corrupt chunks, codec errors
        raise DecodeError("corrupt_image", describe_error(e)) from e
    width, height = image.size
    if min(width, height) < config.min_side:
        raise DecodeError("too_small", f"{width}x{height} has a side below min_side {config.min_side}")
    longest = max(width, height)
    if longest > config.working_max_side:
        scale = config.working_max_side / longest
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    return image, width, height


class DecodeImages:
    """Callable stage: rows with `image_bytes` or `image_uri` in, decoded working copies out."""

    def __init__(
        self, config: DecodeConfig | None = None, storage_options: Mapping[str, Mapping[str, Any]] | None = None
    ) -> None:
        self.config = config or DecodeConfig()
        self.storage_options = dict(storage_options or {})
        self.timer = StageTimer()
        # Truncated files are errors, never silently grey-filled images.
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        # PIL's own guard fires at its default 89 MP; align it with ours (ours runs first).
        Image.MAX_IMAGE_PIXELS = self.config.max_pixels

    def __call__(self, batch: pa.Table | Mapping[str, Any]) -> pa.Table:
        with self.timer:
            table = as_table(batch)
            n = table.num_rows
            uris = table.column("image_uri").to_pylist() if "image_uri" in table.column_names else [None] * n
            blobs = table.column("image_bytes").to_pylist() if "image_bytes" in table.column_names else [None] * n
            pixels: list[bytes | None] = [None] * n
            pw, ph, ow, oh = [0] * n, [0] * n, [0] * n, [0] * n
            kept: list[bytes | None] = [None] * n
            rejects: dict[int, tuple[str, str]] = {}
            for i in pending_rows(table):
                try:
                    data = blobs[i]
                    if data is None:
                        if not uris[i]:
                            raise DecodeError("missing_input", "row has neither image bytes nor an image URI")
                        data = fetch_bytes(uris[i], self.storage_options, self.config.max_bytes,
                                           self.config.fetch_timeout_s)
                    elif len(data) > self.config.max_bytes:
                        raise DecodeError("file_too_large", f"more than {self.config.max_bytes} bytes")
                    image, ow[i], oh[i] = decode_image(data, self.config)
                except DecodeError as e:
                    rejects[i] = (e.reason, str(e))
                    continue
                pw[i], ph[i] = image.size
                pixels[i] = image.tobytes()
                if self.config.embed_images:
                    kept[i] = data
            table = put_column(table, "width", ow, pa.int32())
            table = put_column(table, "height", oh, pa.int32())
            table = put_column(table, "pixels", pixels, pa.large_binary())
            table = put_column(table, "pixel_width", pw, pa.int32())
            table = put_column(table, "pixel_height", ph, pa.int32())
            table = put_column(table, "image_bytes", kept, pa.large_binary())
            self.timer.rows += n
            return mark_rejects(table, STAGE, rejects)


def decode_images(batch: pa.Table | Mapping[str, Any], config: DecodeConfig | None = None,
                  storage_options: Mapping[str, Mapping[str, Any]] | None = None) -> pa.Table:
    """Function form of the stage, for Ray Data tasks (decode holds no model worth an actor)."""
    return DecodeImages(config, storage_options)(batch)
