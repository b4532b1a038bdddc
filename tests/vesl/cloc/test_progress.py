"""The driver's step bar follows the rank-0 worker's live metrics file."""

from __future__ import annotations

import io
import json
import time

from vesl.cloc.train import MetricsBar


def test_metrics_bar_follows_the_metrics_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    out = io.StringIO()
    with MetricsBar(path, 12, poll_s=0.02, file=out) as bar:  # the file does not exist yet: no error
        time.sleep(0.1)
        for step in (4, 8, 12):
            with open(path, "a") as f:
                f.write(json.dumps({"step": step, "loss": 1.0 / step, "images_per_s": 10.0}) + "\n")
            deadline = time.monotonic() + 5
            while bar.bar.n != step and time.monotonic() < deadline:
                time.sleep(0.02)
            assert bar.bar.n == step
        path.write_text(path.read_text() + '{"step": 12, "lo')  # a half-written line is skipped
        time.sleep(0.1)
    text = out.getvalue()
    assert "vesl train" in text and "12/12" in text and "loss=0.0833" in text


def test_no_bar_without_a_path():
    with MetricsBar(None, 10) as bar:
        assert not hasattr(bar, "bar")
