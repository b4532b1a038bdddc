"""What every export format shares: the options, which regions of a row go out, where each region's phrase
stands in the text it is paired with, box conversions, and the image files written beside the records.

A row's regions go out best score first, after `--sources`, `--min-score` and `--max-regions`. Each
region's spans come from the shard (schema 1.3); shards older than 1.3 have none, and then the phrase is
looked for in its text (case-insensitive, any punctuation or space between its words) and every place
found is checked the same way a recorded span is: `phrase_of_text(text[start:end]) == phrase`.

The grounding text: formats that point into one text (ODVG's caption, GRIT's caption, the `shikra`
conversation) use the caption, and, when a region's phrase came from the alt-text, the caption plus a
space plus the cleaned alt-text, with that region's spans shifted past the caption (`grounding_text`).
"""

from __future__ import annotations

import bisect
import hashlib
import io
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from operators.phrases import phrase_of_text
from vesl.core.text import clean_text_map

FORMATS = ("odvg", "grit", "coco", "llava", "hf")
STYLES = ("qwen2.5-vl", "qwen3-vl", "shikra")
SOURCES = ("caption", "alt_text")
MAX_ALT_CHARS = 2000  # the alt-text appended to a grounding text is cleaned and cut to this (as the phrases stage)


class ExportOptions(BaseModel):
    """The settings of one export; DEST records them, and a re-run into DEST must give the same."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal["odvg", "grit", "coco", "llava", "hf"]
    min_score: float = Field(default=0.0, ge=0.0, le=1.0, description="Regions scoring below this are left out.")
    max_regions: int | None = Field(default=None, ge=1, description="At most this many regions per image, "
                                    "best score first.")
    sources: tuple[Literal["caption", "alt_text"], ...] = Field(default=SOURCES, min_length=1,
                                                                description="Regions whose phrase came from these.")
    min_phrase_count: int = Field(default=1, ge=1, description="coco: a phrase is a category when at least this "
                                  "many exported regions have it.")
    style: Literal["qwen2.5-vl", "qwen3-vl", "shikra"] = Field(default="qwen2.5-vl",
                                                               description="llava: how boxes are written.")
    min_pixels: int = Field(default=56 * 56, ge=1, description="llava qwen2.5-vl: the processor's min_pixels.")
    max_pixels: int = Field(default=28 * 28 * 16384, ge=1, description="llava qwen2.5-vl: the processor's "
                            "max_pixels (boxes are in pixels of the image the model sees).")
    pixels: Literal["resized", "original"] = Field(
        default="resized", description="llava qwen2.5-vl: boxes in pixels of the image the model sees (its "
        "processor's smart_resize, what Qwen2.5-VL answers in) or of the original image (for fine-tuning code "
        "that rescales boxes itself).")
    merge: bool = Field(default=True, description="Also write the parts as the one file the consumer reads "
                        "(odvg.jsonl, instances.json, llava.json).")

    @field_validator("sources", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = tuple(v.strip() for v in value.split(",") if v.strip())
        return tuple(dict.fromkeys(value))  # in order, once each


@dataclass
class Counts:
    """What one shard's export did; summed over shards into export.json."""

    rows: int = 0  # rows read
    exported: int = 0  # rows written out
    regions: int = 0  # regions written out
    skipped: dict[str, int] = field(default_factory=dict)  # rows not written, by reason
    dropped: dict[str, int] = field(default_factory=dict)  # regions not written, by reason
    spans_searched: int = 0  # regions whose spans were found by search (a shard older than 1.3)
    images_written: int = 0
    images_reoriented: int = 0  # EXIF-rotated images written upright (their boxes are of the upright image)

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + n

    def drop(self, reason: str, n: int = 1) -> None:
        if n:
            self.dropped[reason] = self.dropped.get(reason, 0) + n

    def as_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "exported": self.exported, "regions": self.regions, "skipped": self.skipped,
                "dropped": self.dropped, "spans_searched": self.spans_searched,
                "images_written": self.images_written, "images_reoriented": self.images_reoriented}


def add_counts(total: dict[str, Any], part: Mapping[str, Any]) -> dict[str, Any]:
    """TOTAL plus PART (two Counts.as_dict()s)."""
    out = dict(total)
    for key, value in part.items():
        if isinstance(value, Mapping):
            merged = dict(out.get(key) or {})
            for k, v in value.items():
                merged[k] = merged.get(k, 0) + v
            out[key] = merged
        else:
            out[key] = out.get(key, 0) + value
    return out


# ------------------------------------------------------------------------------------------------ spans
def find_spans(text: str | None, phrase: str) -> list[tuple[int, int]]:
    """Every place PHRASE stands in TEXT: its words in order, any case, with spaces or punctuation between;
    each checked as a recorded span is (for shards older than schema 1.3, which record none)."""
    words = phrase.split()
    if not text or not words:
        return []
    pattern = re.compile(r"(?<!\w)" + r"[^\w'&-]+".join(re.escape(w) for w in words) + r"(?!\w)", re.IGNORECASE)
    return [m.span() for m in pattern.finditer(text) if phrase_of_text(m.group(0)) == phrase]


def region_spans(region: Mapping[str, Any], row: Mapping[str, Any], counts: Counts) -> list[tuple[int, int]]:
    """REGION's spans in the row's text its source names: the recorded ones, else found by search."""
    if region.get("spans") is not None:
        return [(int(a), int(b)) for a, b in region["spans"]]
    counts.spans_searched += 1
    return find_spans(row.get(region["source"]), region["phrase"])


def filter_regions(row: Mapping[str, Any], options: ExportOptions, counts: Counts) -> list[dict[str, Any]]:
    """The row's regions that pass `--sources`, `--min-score` and `--max-regions`, best score first."""
    regions = sorted(row.get("regions") or [], key=lambda r: -r["score"])
    kept = [r for r in regions if r["source"] in options.sources]
    counts.drop("source_not_exported", len(regions) - len(kept))
    scored = [r for r in kept if r["score"] >= options.min_score]
    counts.drop("below_min_score", len(kept) - len(scored))
    if options.max_regions is not None:
        counts.drop("over_max_regions", max(0, len(scored) - options.max_regions))
        scored = scored[: options.max_regions]
    return scored


def select_regions(row: Mapping[str, Any], options: ExportOptions, counts: Counts) -> list[dict[str, Any]]:
    """The row's regions to export, best score first, each with `spans` (possibly empty)."""
    return [{**r, "spans": region_spans(r, row, counts)} for r in filter_regions(row, options, counts)]


@dataclass
class Grounding:
    """One text the regions point into, and each region's spans in it."""

    text: str
    spans: list[list[tuple[int, int]]]


def grounding_text(row: Mapping[str, Any], regions: list[dict[str, Any]]) -> Grounding:
    """The caption, plus " " and the cleaned alt-text when a region's phrase came from the alt-text; each
    region's spans moved into that text (an alt-text span through the cleaning's character map)."""
    caption = row.get("caption") or ""
    if not any(r["source"] == "alt_text" for r in regions):
        return Grounding(caption, [list(r["spans"]) for r in regions])
    alt, where = clean_text_map(row.get("alt_text") or "", MAX_ALT_CHARS)
    starts = [w[0] for w in where] if where else list(range(len(alt)))  # both non-decreasing
    ends = [w[1] for w in where] if where else list(range(1, len(alt) + 1))
    shift = len(caption) + 1 if caption else 0
    spans = []
    for r in regions:
        if r["source"] == "caption":
            spans.append(list(r["spans"]))
            continue
        moved = []
        for a, b in r["spans"]:
            lo, hi = bisect.bisect_left(starts, a), bisect.bisect_right(ends, b)  # alt[lo:hi] covers [a, b)
            if lo < hi and phrase_of_text(alt[lo:hi]) == r["phrase"]:
                moved.append((shift + lo, shift + hi))
        spans.append(moved)
    return Grounding(f"{caption} {alt}" if caption else alt, spans)


# ------------------------------------------------------------------------------------------------ boxes
def pixel_box(box: list[float], width: int, height: int) -> list[float]:
    """A normalised x0, y0, x1, y1 box in pixels of a WIDTH x HEIGHT image (2 decimals)."""
    x0, y0, x1, y1 = box
    return [round(x0 * width, 2), round(y0 * height, 2), round(x1 * width, 2), round(y1 * height, 2)]


def xywh(box: list[float], width: int, height: int) -> list[float]:
    x0, y0, x1, y1 = pixel_box(box, width, height)
    return [x0, y0, round(x1 - x0, 2), round(y1 - y0, 2)]


def smart_resize(height: int, width: int, min_pixels: int, max_pixels: int, factor: int = 28) -> tuple[int, int]:
    """The (height, width) Qwen2.5-VL's image processor resizes an image to: each side a multiple of
    FACTOR, the area within [MIN_PIXELS, MAX_PIXELS], the aspect ratio kept as near as it can be."""
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


# ------------------------------------------------------------------------------------------------ images
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}


def file_stem(image_id: str) -> str:
    """A file name for IMAGE_ID: the id itself when it is a plain name, else a hash of it (ids may hold
    slashes, spaces or '..')."""
    if _SAFE_NAME.fullmatch(image_id) and ".." not in image_id:
        return image_id
    return "id-" + hashlib.sha1(image_id.encode()).hexdigest()[:20]


def upright_image(data: bytes) -> tuple[bytes, str, bool]:
    """(bytes, file extension, re-encoded) of an encoded image as a file beside the records. A JPEG or
    other image with an EXIF orientation other than 1 is written upright (the shard's width, height and
    boxes are of the upright image, and most training loaders do not apply EXIF orientation); any other
    image is written byte for byte."""
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as image:
        kind = image.format or "PNG"
        orientation = image.getexif().get(0x0112, 1)
        if orientation in (None, 1) and kind in EXTENSIONS:
            return data, EXTENSIONS[kind], False
        upright = ImageOps.exif_transpose(image)
        out = io.BytesIO()
        if kind == "JPEG":
            upright.convert("RGB").save(out, "JPEG", quality=95)
            return out.getvalue(), ".jpg", True
        upright.save(out, "PNG")
        return out.getvalue(), ".png", True

