"""Screenshot of an HTML report in headless Chromium (how docs/report.png is made).

    .venv/bin/vesl annotate vesl/fixtures/sample/manifest.jsonl out/demo --preset tiny --overwrite
    .venv/bin/vesl inspect out/demo --out out/demo-report.html --sample 6
    .venv/bin/python scripts/screenshot_report.py out/demo-report.html docs/report.png --max-height 2050 --scale 0.7
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image  # noqa: E402

from tests.browser import Browser, find_chromium  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("report")
    p.add_argument("png")
    p.add_argument("--width", type=int, default=1300, help="browser window width, CSS pixels")
    p.add_argument("--max-height", type=int, default=2600, help="crop the page below this many pixels")
    p.add_argument("--scale", type=float, default=0.75, help="resize the picture by this factor")
    args = p.parse_args()
    chromium = find_chromium()
    if not chromium:
        raise SystemExit("no Chromium: run scripts/setup-browser.sh")
    with Browser(chromium, width=args.width) as browser:
        browser.open(Path(args.report).resolve().as_uri())
        browser.fit_page(args.width)
        png = browser.screenshot()
    image = Image.open(io.BytesIO(png)).convert("RGB")
    image = image.crop((0, 0, image.width, min(image.height, args.max_height)))
    if args.scale != 1:
        image = image.resize((round(image.width * args.scale), round(image.height * args.scale)), Image.LANCZOS)
    Path(args.png).parent.mkdir(parents=True, exist_ok=True)
    image.save(args.png, optimize=True)
    print(f"{args.png}: {image.width}x{image.height}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
