"""The annotate job's stages, in order: decode, caption, fuse, phrases, detect.

Adding a stage: one file in operators/ and one line here.

Everything else reads this list: the wiring (`vesl.annotate.job.build`), the config sections
(`vesl.annotate.config`), the actor pools (`vesl.annotate.pools`), the funnel and the label hash.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

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
        if not stage.reads:
            raise ValueError(f"stage {stage.name!r} reads no column: `process` is given only the columns it reads")
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


def stage_totals(by_reason: Mapping[str, int]) -> dict[str, int]:
    """Reject counts by stage from counts by "stage/reason": {'decode/not_found': 2, 'decode/empty_file': 1}
    -> {'decode': 3}."""
    by_stage: dict[str, int] = {}
    for key, n in by_reason.items():
        stage = key.split("/", 1)[0]
        by_stage[stage] = by_stage.get(stage, 0) + n
    return dict(sorted(by_stage.items()))


def funnel(inputs: int, by_stage: Mapping[str, int], steps: list[str]) -> list[dict[str, Any]]:
    """Per step of STEPS (`funnel_steps`: the reader first), in order: how many inputs entered it, how
    many it rejected, how many went on. The last step's `passed` must equal the number of output rows. A
    stage that rejected inputs but is not in STEPS (an OUTPUT written with other stages) comes last."""
    out, entered = [], inputs
    for stage in list(steps) + sorted(set(by_stage) - set(steps)):
        rejected = int(by_stage.get(stage, 0))
        out.append({"stage": stage, "entered": entered, "rejected": rejected, "passed": entered - rejected})
        entered -= rejected
    return out
