"""One row on its way out: what the format writers get, and the contract they keep."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, BinaryIO, ClassVar, Iterable

from vesl.export.common import ExportOptions


@dataclass
class Item:
    """One exported row: the shard row (without its image bytes), its regions (best first, each with
    `spans` in its source text), the grounding text and each region's spans in it, the image file written
    beside the records (relative to DEST) and, for formats that embed it, the image's bytes."""

    row: dict[str, Any]
    regions: list[dict[str, Any]]
    text: str
    text_spans: list[list[tuple[int, int]]]
    file: str | None = None
    data: bytes | None = None


class Format:
    """An export format: how one shard's items become one part file, and how the parts become what the
    consumer reads."""

    name: ClassVar[str]
    wants_files: ClassVar[bool] = False  # image files beside the records
    embeds_images: ClassVar[bool] = False  # the image bytes inside the records
    needs_spans: ClassVar[bool] = False  # a region with no span in the grounding text is left out
    keeps_empty: ClassVar[bool] = False  # a row with no region left is still written
    part_suffix: ClassVar[str] = ".jsonl"
    merged: ClassVar[str | None] = None  # the one file the parts are merged into (None: the parts are it)

    def __init__(self, options: ExportOptions, categories: dict[str, int] | None = None) -> None:
        self.options = options
        self.categories = categories

    def write(self, f: BinaryIO, items: Iterable[Item]) -> None:
        raise NotImplementedError

    @classmethod
    def finish(cls, out, parts: list[str], options: ExportOptions, context: dict[str, Any]) -> list[str]:
        """Files written from the finished parts (PARTS: their paths relative to DEST, in shard order)."""
        return []
