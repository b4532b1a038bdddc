#!/usr/bin/env bash
# One command: set up .venv, then run the annotate job on the built-in sample (local Ray, local
# files, tiny offline random-weight models) into out/demo, show what it wrote, and write the HTML
# report out/demo-report.html (open it in a browser: boxes drawn on the images) and the ODVG export
# out/demo-odvg (what GroundingDINO-style trainers read).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
.venv/bin/python pipelines/annotate.py vesl/fixtures/sample/manifest.jsonl out/demo --preset tiny --overwrite "$@"
.venv/bin/python - <<'PY'
import pandas as pd
df = pd.read_parquet("out/demo/data")
print(df[["image_id", "width", "height", "caption_source", "caption", "phrases"]].to_string(max_colwidth=40))
print(f"{len(df)} rows, {df.regions.map(len).sum()} regions; first region:", df.regions.iloc[0][:1])
print("(tiny random-weight models: the captions, fusions and boxes are structurally valid and meaningless)")
PY
.venv/bin/vesl inspect out/demo --out out/demo-report.html
rm -rf out/demo-odvg
.venv/bin/vesl export out/demo out/demo-odvg --format odvg 2>/dev/null
