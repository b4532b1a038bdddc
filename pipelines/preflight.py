"""Checks a job entrypoint runs before importing anything heavy (standard library only)."""

from __future__ import annotations

import importlib.util
import sys

REQUIRED = ("PIL", "pyarrow", "pydantic", "yaml", "fsspec", "ray", "torch", "transformers", "spacy")


def require_dependencies(prog: str) -> None:
    """Exit 2 with a message that says what to do when this interpreter lacks vesl's dependencies.

    The usual cause: under `ray job submit`, the entrypoint's `python` is the first one on the PATH of
    the Ray node that runs the job, i.e. of the shell that ran `ray start`, not the one that ran
    `ray job submit`."""
    missing = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
    if not missing:
        return
    print(f"{prog}: error: this Python ({sys.executable}) cannot import {', '.join(missing)}: vesl's dependencies "
          "are not installed for it. Under `ray job submit` the entrypoint's `python` is the one on the PATH of the "
          "Ray head that runs the job: name vesl's interpreter in the entrypoint "
          "(`-- /path/to/vesl/.venv/bin/python pipelines/annotate.py ...`), or start the head with vesl's "
          "virtualenv active (`source .venv/bin/activate && ray start --head`).", file=sys.stderr)
    sys.exit(2)
