"""Entrypoint of the CLOC training job (the job itself is `vesl.cloc.job`):

    python pipelines/train.py SHARDS OUT [--config FILE.yaml] [--preset tiny] [--set k=v ...] [--overwrite]

or `vesl train ...`, or under `ray job submit --working-dir . -- python pipelines/train.py ...`.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.preflight import require_dependencies  # noqa: E402  (standard library only)

if __name__ == "__main__":
    require_dependencies("vesl train")
    from vesl.cloc.job import main

    sys.exit(main())
