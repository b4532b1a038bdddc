"""The CLOC trainer: a CLIP with a Prompter (box -> region embedding), its losses, the shard reader,
the Ray Train loop, checkpoints and evaluation; `RegionEncoder` is the trained model as a library."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:  # lazy: `import vesl.cloc.data` must not pull in torch
    if name == "RegionEncoder":
        from vesl.cloc.encoder import RegionEncoder

        return RegionEncoder
    raise AttributeError(name)


__all__ = ["RegionEncoder"]
