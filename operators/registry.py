"""The annotate job's stages, in order: decode, caption, fuse, phrases, detect.

Adding a stage: one file in operators/ and one line here.

Everything else reads this list: the wiring (`vesl.jobs.annotate.build`), the config sections
(`vesl.config`), the actor pools (`vesl.resources`), the funnel and the label hash.
"""

from __future__ import annotations

from operators.base import Stage
from operators.caption import CaptionImages
from operators.decode import DecodeImages
from operators.detect import DetectRegions
from operators.fuse import FuseCaptions
from operators.phrases import ExtractPhrases
from schemas.columns import COLUMNS, READER_COLUMNS
from schemas.region_text import REJECT_SCHEMA, region_text_schema
from schemas.rejects import READ_STAGE

STAGES: list[type[Stage]] = [
    DecodeImages,
    CaptionImages,
    FuseCaptions,
    ExtractPhrases,
    DetectRegions,
]

def stages() -> tuple[type[Stage], ...]:
    """The registered stages, in order (read at call time, so a test may register one more)."""
    return tuple(STAGES)


def funnel_steps(chain: tuple[type[Stage], ...] | None = None) -> list[str]:
    """The funnel's steps: the reader, then each stage."""
    return [READ_STAGE] + [stage.name for stage in (stages() if chain is None else chain)]


def check_chain(chain: tuple[type[Stage], ...] | None = None) -> None:
    """Raise ValueError unless every column a stage reads is written by the reader or an earlier stage,
    every column it writes has a type, its names are unique and not 'read', and the chain writes every
    column of a shard."""
    chain = stages() if chain is None else chain
    available = set(READER_COLUMNS)
    names = [READ_STAGE]
    for stage in chain:
        if stage.name in names:
            raise ValueError(f"stage name {stage.name!r} is used twice (or is the reader's)")
        names.append(stage.name)
        missing = [c for c in stage.reads if c not in available]
        if missing:
            raise ValueError(f"stage {stage.name!r} reads {missing}, which neither the reader nor an earlier stage "
                             "writes")
        untyped = [c for c in stage.writes if c not in COLUMNS and c not in stage.column_types]
        if untyped:
            raise ValueError(f"stage {stage.name!r} writes {untyped} without a type (schemas.columns or column_types)")
        if stage.error_reason not in stage.reasons:
            raise ValueError(f"stage {stage.name!r}: its error_reason {stage.error_reason!r} is not in its reasons")
        available.update(stage.writes)
    needed = set(region_text_schema().names) | {f.name for f in REJECT_SCHEMA if f.name in READER_COLUMNS}
    lacking = sorted(needed - available)
    if lacking:
        raise ValueError(f"no stage writes the shard column(s) {lacking}")


def drops_after(chain: tuple[type[Stage], ...] | None = None) -> dict[str, tuple[str, ...]]:
    """For each stage, the columns to drop from its output: those no later stage reads and no shard or
    reject row keeps (the decoded pixels, up to 3 MB a row, leave with the last stage that reads them
    instead of travelling to the writer)."""
    chain = stages() if chain is None else chain
    kept = set(region_text_schema().names) | set(READER_COLUMNS)
    out = {}
    written: set[str] = set()
    for i, stage in enumerate(chain):
        written.update(stage.writes)
        later = {c for s in chain[i + 1:] for c in s.reads}
        out[stage.name] = tuple(sorted(c for c in written if c not in later and c not in kept
                                       and (c in stage.reads or c in stage.writes)))
    return out
