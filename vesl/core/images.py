"""Image fetch and decode: bytes from any fsspec URI (size-capped, timed out), a tar member by a ranged
read, bombs refused from the header before decoding, RGB with EXIF orientation applied.

`read_image` is the one way a row's image is read, by the decode stage, the trainer, `vesl eval`,
`read_regions(with_images=True)` and the report: its bytes when it carries them, else its
`image_location` (a ranged read of a tar member, or the whole file; through `relocate`'s prefix map
when the input moved), else its `image_uri`."""

from __future__ import annotations

import io
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from schemas.rejects import RejectReason as R
from vesl.core.storage import NotAFileError, filesystem, is_local, open_regular, options_for, protocol_of
from vesl.core.text import describe_error

DEFAULT_MAX_PIXELS = 100_000_000
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_FETCH_TIMEOUT_S = 60.0


class DecodeError(Exception):
    """A row that cannot be decoded, with the reject reason to record."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def failure_text(error: BaseException) -> str:
    """Why an image could not be read or decoded, as one line: its reject reason (a DecodeError's, else the
    exception's type), then the message."""
    return f"{getattr(error, 'reason', type(error).__name__)}: {describe_error(error)}"


def with_timeout(uri: str, options: dict[str, Any], timeout_s: float | None) -> dict[str, Any]:
    """Add a per-request timeout to the fsspec options of network URIs (kept if already set)."""
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
        return DecodeError(R.NOT_FOUND if status in (404, 410) else R.FETCH_FAILED, f"{text}: {uri}")
    if isinstance(error, FileNotFoundError) and uri.startswith(("http://", "https://")) and cause is not None:
        return DecodeError(R.FETCH_FAILED, f"{uri}: {describe_error(cause)}")
    if isinstance(error, FileNotFoundError):
        return DecodeError(R.NOT_FOUND, f"no such file: {uri}")
    if isinstance(error, (NotAFileError, IsADirectoryError)):
        return DecodeError(R.NOT_A_FILE, f"{uri}: {error}" if isinstance(error, IsADirectoryError) else str(error))
    return DecodeError(R.FETCH_FAILED, f"{uri}: {describe_error(error)}")


READ_CHUNK = 1 << 20  # bytes asked for per read: a body streamed in chunks is read to its end, up to the cap


def fetch_bytes(uri: str, storage_options: Mapping[str, Mapping[str, Any]] | None, max_bytes: int,
                timeout_s: float | None = None) -> bytes:
    """The whole body of a local path or any fsspec URI, refusing one over MAX_BYTES without reading more.

    A local path must be a regular file (a FIFO or a device is `not_a_file`, never a read that blocks). A
    body is read to its end whether or not its size is announced (an HTTP response in chunks), so only a
    body that really ends early decodes as truncated. TIMEOUT_S bounds each network request and the whole
    fetch (a server that trickles forever is `fetch_failed`). STORAGE_OPTIONS are fsspec options by
    protocol ({"s3": {...}})."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        options = {protocol_of(uri): with_timeout(uri, options_for(uri, storage_options), timeout_s)}
        fs, path = filesystem(uri, options)
        with open_regular(fs, path) as f:
            data = read_capped(f, max_bytes, deadline)
    except (DecodeError, _Timeout) as e:
        raise (DecodeError(R.FETCH_FAILED, f"{uri}: {e}") if isinstance(e, _Timeout) else e) from None
    except Exception as e:  # noqa: BLE001 - any transport error is a reject, not a crash
        raise fetch_error(uri, e) from e
    if len(data) > max_bytes:
        raise DecodeError(R.FILE_TOO_LARGE, f"{uri}: more than {max_bytes} bytes")
    return data


class _Timeout(Exception):
    """The whole fetch took longer than its deadline."""


def read_capped(f, max_bytes: int, deadline: float | None = None) -> bytes:
    """F read to its end, or to MAX_BYTES + 1 bytes (then it is too large), in chunks: a file object of a
    streamed body may return fewer bytes than asked before its end. _Timeout past DEADLINE (monotonic)."""
    chunks, total = [], 0
    while total <= max_bytes:
        if deadline is not None and time.monotonic() > deadline:
            raise _Timeout(f"no whole answer within the fetch deadline ({total} bytes read)")
        chunk = f.read(min(READ_CHUNK, max_bytes + 1 - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def fetch_range(uri: str, offset: int, length: int, storage_options: Mapping[str, Mapping[str, Any]] | None,
                max_bytes: int, timeout_s: float | None = None) -> bytes:
    """LENGTH bytes of URI from byte OFFSET (a tar member): one ranged read (fsspec `cat_file(path, start,
    end)`: a ranged GET on S3 or HTTP), never a scan. Fewer bytes than LENGTH (the file is shorter than
    when it was annotated) is `fetch_failed`."""
    if length > max_bytes:
        raise DecodeError(R.FILE_TOO_LARGE, f"{uri}: a member of {length} bytes, more than {max_bytes}")
    try:
        options = {protocol_of(uri): with_timeout(uri, options_for(uri, storage_options), timeout_s)}
        fs, path = filesystem(uri, options)
        if is_local(fs):
            with open_regular(fs, path) as f:
                f.seek(offset)
                data = read_capped(f, length - 1) if length else b""
        else:
            data = fs.cat_file(path, start=offset, end=offset + length)
    except (DecodeError, _Timeout) as e:
        raise (DecodeError(R.FETCH_FAILED, f"{uri}: {e}") if isinstance(e, _Timeout) else e) from None
    except Exception as e:  # noqa: BLE001 - any transport error is a reject, not a crash
        raise fetch_error(uri, e) from e
    if len(data) != length:
        raise DecodeError(R.FETCH_FAILED, f"{uri}: {len(data)} of {length} bytes at offset {offset} (the file is "
                          "shorter than when it was annotated: replaced or cut?)")
    return data


def relocate(location: str, relocations: Mapping[str, str] | None) -> str:
    """LOCATION with its longest prefix among RELOCATIONS (old prefix -> new prefix) replaced: the input was
    copied or moved after it was annotated."""
    if not relocations:
        return location
    old = max((p for p in relocations if p and location.startswith(p)), key=len, default=None)
    return location if old is None else relocations[old] + location[len(old):]


def parse_relocations(pairs: list[str]) -> dict[str, str]:
    """`--relocate OLD=NEW` arguments as a prefix map for `relocate` (ValueError for one without '=')."""
    out = {}
    for pair in pairs:
        old, sep, new = pair.partition("=")
        if not sep or not old:
            raise ValueError(f"--relocate expects OLD=NEW (two prefixes), got {pair!r}")
        out[old] = new
    return out


RELOCATE_HELP = ("read images whose image_location starts with OLD from NEW instead (the input was moved or copied "
                 "after it was annotated); repeatable")


@dataclass(frozen=True)
class ImageRef:
    """Where one shard row's image is: its bytes, its location (a file, or a tar and the member's byte
    range), its original URI (provenance; read only when there is no location)."""

    data: bytes | None = None
    location: str | None = None
    offset: int | None = None
    length: int | None = None
    uri: str | None = None

    @classmethod
    def of(cls, row: Mapping[str, Any]) -> ImageRef:
        """The image of a shard (or reader) row; missing columns (1.0 and 1.1 shards) count as nulls."""
        return cls(row.get("image_bytes"), row.get("image_location"), row.get("image_offset"),
                   row.get("image_length"), row.get("image_uri"))


def read_image(ref: ImageRef, storage_options: Mapping[str, Mapping[str, Any]] | None, max_bytes: int,
               timeout_s: float | None = None, relocations: Mapping[str, str] | None = None) -> bytes:
    """The encoded image REF points at: its bytes, else its location (RELOCATIONS applied; a ranged read
    for a tar member), else its original URI. A failing location is not retried from the URI (that would
    be a second crawl): the DecodeError says which place failed and why."""
    if ref.data is not None:
        if len(ref.data) > max_bytes:
            raise DecodeError(R.FILE_TOO_LARGE, f"image_bytes: more than {max_bytes} bytes")
        return ref.data
    if ref.location:
        where = relocate(ref.location, relocations)
        try:
            if ref.offset is not None:
                return fetch_range(where, ref.offset, ref.length or 0, storage_options, max_bytes, timeout_s)
            return fetch_bytes(where, storage_options, max_bytes, timeout_s)
        except DecodeError as e:
            raise DecodeError(e.reason, f"image_location: {e}") from e.__cause__
    if ref.uri:
        return fetch_bytes(ref.uri, storage_options, max_bytes, timeout_s)
    raise DecodeError(R.MISSING_INPUT, "no image_bytes, image_location or image_uri")


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


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = 1,
                 max_side: int | None = None) -> tuple[Image.Image, int, int]:
    """Decode DATA to an oriented RGB image; returns (working copy, original width, original height).
    The working copy is the image, uniformly scaled down so its longer side is at most MAX_SIDE."""
    if not data:
        raise DecodeError(R.EMPTY_FILE, "zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size  # from the header: nothing decoded yet
            if width * height > max_pixels:
                raise DecodeError(
                    R.DECOMPRESSION_BOMB, f"{width}x{height} = {width * height} pixels > max_pixels {max_pixels}"
                )
            if getattr(image, "n_frames", 1) > 1:
                image.seek(0)  # animated: the first frame stands for the image
            image.load()
            image = ImageOps.exif_transpose(image)
            image = _to_rgb(image)
    except DecodeError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        reason = R.NOT_AN_IMAGE if isinstance(e, UnidentifiedImageError) else R.DECOMPRESSION_BOMB
        raise DecodeError(reason, describe_error(e)) from e
    except Exception as e:  # noqa: BLE001 - truncated data, corrupt chunks, codec errors
        raise DecodeError(R.CORRUPT_IMAGE, describe_error(e)) from e
    width, height = image.size
    if min(width, height) < min_side:
        raise DecodeError(R.TOO_SMALL, f"{width}x{height} has a side below min_side {min_side}")
    return scale_down(image, max_side), width, height


def scale_down(image: Image.Image, max_side: int | None) -> Image.Image:
    """IMAGE uniformly scaled down so its longer side is at most MAX_SIDE (as it is when smaller)."""
    width, height = image.size
    longest = max(width, height)
    if max_side is None or longest <= max_side:
        return image
    scale = max_side / longest
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)


def to_rgb(image: Image.Image) -> Image.Image:
    """IMAGE as RGB, the way decoding makes it (alpha over white, palettes and grey expanded)."""
    return _to_rgb(image)
