"""Entrypoint of the annotate job (the job itself is `vesl.annotate.job`):

    python pipelines/annotate.py INPUT OUTPUT [--config FILE.yaml] [--preset tiny] [--set k=v ...]

or `vesl annotate ...`, or under `ray job submit --working-dir . -- python pipelines/annotate.py ...`
(inside a Ray job RAY_ADDRESS is set and the job joins that cluster; otherwise it starts a local one).
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.preflight import require_dependencies  # noqa: E402  (standard library only)

if __name__ == "__main__":
    require_dependencies("vesl annotate")
    from vesl.annotate.job import main

    sys.exit(main())
