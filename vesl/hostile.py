"""A hostile-input sample: every kind of broken file and awkward-but-valid image and alt-text a
web-scale run meets, with the outcome each must have. `vesl sample hostile DIR` writes it; the test
suite runs it through the pipeline.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from schemas.rejects import RejectReason as R


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A real-looking RGB test image: smooth gradients and a solid block (not flat noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1),
                       (x + y) * 127 // max(width + height - 2, 1)], axis=-1).astype(np.uint8)
    pixels[: height // 3, : width // 3] = rng.integers(0, 255, 3)
    return Image.fromarray(pixels)


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A valid 1-bit PNG of WIDTH x HEIGHT pixels that compresses to a few hundred KB."""
    row = b"\x00" * (1 + (width + 7) // 8)
    comp = zlib.compressobj(9)
    data = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def _valid_files() -> dict[str, tuple[str, bytes]]:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 on display
    frames = [photo(24, 16, seed=i) for i in range(3)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=40, loop=0)
    sixteen = Image.fromarray((np.arange(48 * 32, dtype=np.uint16).reshape(32, 48) * 40))
    palette = photo(40, 30, seed=3).convert("P", palette=Image.Palette.ADAPTIVE)
    return {
        "cmyk": ("cmyk.jpg", _encode(photo(60, 40, 1).convert("CMYK"), "JPEG")),
        "sixteen_bit": ("sixteen.png", _encode(sixteen, "PNG")),
        "palette_alpha": ("palette.png", _encode(palette, "PNG", transparency=0)),
        "grayscale": ("gray.jpg", _encode(photo(50, 50, 2).convert("L"), "JPEG")),
        "animated_gif": ("anim.gif", gif.getvalue()),
        "webp": ("pic.webp", _encode(photo(64, 48, 4), "WEBP")),
        "exif_rotated": ("rotated.jpg", _encode(photo(60, 20, 5), "JPEG", exif=exif.tobytes())),
        "one_by_one": ("one.png", _encode(photo(1, 1), "PNG")),
        "wide_2000x3": ("wide.png", _encode(photo(2000, 3, 6), "PNG")),
        "short_500x3": ("short.png", _encode(photo(500, 3, 8), "PNG")),  # (3, 500, 3): looks channels-first
        "tall_1x3": ("tall.png", _encode(photo(1, 3, 9), "PNG")),
        "plain": ("plain.jpg", _encode(photo(80, 60, 7), "JPEG")),
    }


def write_hostile_sample(root: str | Path) -> tuple[Path, dict[str, str | None]]:
    """Write ROOT/images/* and ROOT/manifest.jsonl; return (manifest, {id: expected reject reason or None})."""
    root = Path(root)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    valid = _valid_files()
    good = valid["plain"][1]
    broken = {
        "truncated": ("truncated.jpg", good[: len(good) // 2], R.CORRUPT_IMAGE),
        "zero_bytes": ("zero.jpg", b"", R.EMPTY_FILE),
        "random_bytes": ("random.png", np.random.default_rng(0).bytes(4096), R.NOT_AN_IMAGE),
        "html": ("page.jpg", b"<!DOCTYPE html><html><body><h1>403 Forbidden</h1></body></html>", R.NOT_AN_IMAGE),
        "text": ("notes.png", b"just some text, not a picture\n", R.NOT_AN_IMAGE),
        "bomb": ("bomb.png", bomb_png(), R.DECOMPRESSION_BOMB),
    }
    for name, data in list(valid.values()) + [(n, d) for n, d, _ in broken.values()]:
        (images / name).write_bytes(data)
    (images / "a_directory.jpg").mkdir(exist_ok=True)

    alt_texts = {
        "cmyk": None, "sixteen_bit": "", "palette_alpha": "a red car " * 8000,  # missing, empty, 80 KB
        "grayscale": "قطة سوداء على الأريكة 🐈‍⬛ and a 🚗 near שלט",  # RTL scripts and emoji
        "animated_gif": "<div onclick='x()'><b>A dog</b> &amp; a <i>ball</i><script>alert(1)</script></div>",
        "webp": "a\x00 cat\x07 on\x1b[31m a\u202e sofa\x7f",  # control characters, a bidi override
    }
    rows: list[dict] = []
    expected: dict[str, str | None] = {}
    for key, (name, _) in valid.items():
        rows.append({"id": key, "image": f"images/{name}", "alt_text": alt_texts.get(key, f"a photo ({key})")})
        expected[key] = None
    for key, (name, _, reason) in broken.items():
        rows.append({"id": key, "image": f"images/{name}", "alt_text": "a broken file"})
        expected[key] = reason
    rows += [
        {"id": "missing_path", "image": "images/not-there.jpg", "alt_text": "x"},
        {"id": "bad_scheme", "image": "nosuchscheme://bucket/a.jpg", "alt_text": "x"},
        {"id": "refused_http", "image": "http://127.0.0.1:9/a.jpg", "alt_text": "x"},
        {"id": "directory", "image": "images/a_directory.jpg", "alt_text": "x"},
        {"id": "no_image", "alt_text": "a row with no image at all"},
        {"id": "../../../etc/passwd", "image": "images/plain.jpg", "alt_text": "an id that looks like a path"},
        {"id": "plain", "image": "images/plain.jpg", "alt_text": "the same id again"},  # duplicate id
    ]
    expected.update({"missing_path": R.NOT_FOUND, "bad_scheme": R.FETCH_FAILED, "refused_http": R.FETCH_FAILED,
                     "directory": R.NOT_FOUND, "no_image": R.MISSING_INPUT, "../../../etc/passwd": None})
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    lines.insert(3, "{this line is not json")
    lines.insert(5, "[1, 2, 3]")
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root / "manifest.jsonl", expected


# Inputs whose outcome is not one row per id: the duplicate 'plain' (one row, one 'duplicate'
# reject) and the two manifest lines that are not JSON objects ('bad_manifest_row' rejects).
EXTRA_REJECTS = {R.DUPLICATE: 1, R.BAD_MANIFEST_ROW: 2}
