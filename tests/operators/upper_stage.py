"""A trivial stage for the registry test: the whole of what adding a stage takes is this file and one
line in operators/registry.py's STAGES (the test inserts that line with monkeypatch)."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from operators.base import Reject, Stage, StageConfig
from schemas.rejects import RejectReason as R


class UpperConfig(StageConfig):
    batch_size: int = Field(default=64, ge=1)
    refuse: str = Field(default="", description="Reject a caption containing this word (empty: none).")


class UpperCaseCaption(Stage):
    """Upper-cases the caption."""

    name = "upper"
    config_class = UpperConfig
    reads = ("caption",)
    writes = ("caption",)
    reasons = (R.MODEL_ERROR, R.EMPTY_CAPTION)

    def process(self, batch) -> list[dict[str, Any] | Reject]:
        return [Reject(R.EMPTY_CAPTION, f"refused: {self.config.refuse}")
                if self.config.refuse and self.config.refuse in caption.split()
                else {"caption": caption.upper()} for caption in batch.column("caption").to_pylist()]
