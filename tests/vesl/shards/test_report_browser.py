"""The HTML report in a real browser: headless Chromium opens it from disk, the gallery's images
load (natural width > 0), and the boxes are drawn where the data says, in their colours (checked on
the screenshot's pixels)."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from tests.browser import Browser, find_chromium
from tests.conftest import encode, photo
from tests.vesl.shards.test_inspect import SHARD_A, SHARD_B, write_known_output
from vesl.shards.inspect import collect_stats
from vesl.shards.report import write_report

pytestmark = pytest.mark.slow

MEASURE = """(() => {
  const rect = el => { const r = el.getBoundingClientRect();
    return {x: r.left + scrollX, y: r.top + scrollY, w: r.width, h: r.height}; };
  const cards = [...document.querySelectorAll('#gallery .card')].map(card => {
    const img = card.querySelector('img.photo');
    return {id: card.dataset.imageId, frame: rect(card.querySelector('.frame')),
            img: img ? {natural: img.naturalWidth, naturalH: img.naturalHeight, complete: img.complete} : null,
            boxes: [...card.querySelectorAll('.box')].map(b => ({colour: b.dataset.colour, rect: rect(b),
              border: getComputedStyle(b).borderLeftWidth, label: b.querySelector('.label').textContent}))};
  });
  return {cards, dpr: devicePixelRatio, plots: document.querySelectorAll('svg.hist rect').length};
})()"""


def hex_rgb(colour: str) -> tuple[int, int, int]:
    return tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))


def check_box(box: dict, region: dict, frame: dict, shot: Image.Image, dpr: float, image_id: str) -> None:
    """BOX sits where REGION's box says, relative to the picture's FRAME, and is drawn on the screenshot."""
    x0, y0, x1, y1 = region["box"]
    assert box["rect"]["x"] == pytest.approx(frame["x"] + x0 * frame["w"], abs=1.0)
    assert box["rect"]["y"] == pytest.approx(frame["y"] + y0 * frame["h"], abs=1.0)
    assert box["rect"]["w"] == pytest.approx((x1 - x0) * frame["w"], abs=1.0)
    assert box["rect"]["h"] == pytest.approx((y1 - y0) * frame["h"], abs=1.0)
    assert box["label"] == f"{region['phrase']} {region['score']:.2f}"
    # drawn: the middle of its left border has its colour on the screenshot
    px = int((box["rect"]["x"] + 1.5) * dpr)
    py = int((box["rect"]["y"] + box["rect"]["h"] * 0.6) * dpr)
    got = shot.getpixel((px, py))
    want = hex_rgb(box["colour"])
    assert max(abs(a - b) for a, b in zip(got, want)) <= 12, (image_id, box, got, want)


def test_report_renders_in_headless_chromium(tmp_path):
    chromium = find_chromium()
    if chromium is None:
        pytest.fail("no Chromium on PATH: run scripts/setup-browser.sh (part of scripts/test.sh) or set VESL_CHROMIUM")
    images = tmp_path / "images"
    images.mkdir()
    rows = {r["image_id"]: r for r in SHARD_A + SHARD_B}
    for image_id, r in rows.items():
        if image_id != "c":  # c's file is missing: its card says so instead of an image
            (images / f"{image_id}.jpg").write_bytes(encode(photo(r["width"], r["height"], seed=len(image_id))))
    out = write_known_output(tmp_path / "out", image_dir=images)
    report = tmp_path / "report.html"
    write_report(collect_stats(str(out), sample=5), str(report), thumb_size=256)

    with Browser(chromium, width=1400, height=900) as browser:
        browser.open(report.as_uri())
        browser.fit_page(1400)
        page = browser.evaluate(MEASURE)
        png = browser.screenshot()
    (tmp_path / "report.png").write_bytes(png)
    shot = Image.open(io.BytesIO(png)).convert("RGB")
    dpr = page["dpr"]
    assert page["plots"] > 0  # the histograms are there

    cards = {c["id"]: c for c in page["cards"]}
    assert set(cards) == set(rows)
    for image_id, card in cards.items():
        if image_id == "c":
            assert card["img"] is None
            continue
        # the embedded image loaded: the browser decoded it at the thumbnail's size
        r = rows[image_id]
        scale = min(1.0, 256 / max(r["width"], r["height"]))
        assert card["img"]["complete"] and card["img"]["natural"] > 0
        assert card["img"]["natural"] == max(1, round(r["width"] * scale))
    drawn = 0
    for image_id, card in cards.items():
        regions = rows[image_id]["regions"]
        assert len(card["boxes"]) == len(regions)
        for box, region in zip(card["boxes"], regions):
            check_box(box, region, card["frame"], shot, dpr, image_id)
            drawn += 1
    assert drawn == 7
    # boxes of one image have distinct colours
    assert len({b["colour"] for b in cards["a"]["boxes"]}) == 3
    # the photo itself is on the screenshot: inside image d's frame, away from any border, it is not the page
    frame = cards["d"]["frame"]
    inside = shot.getpixel((int((frame["x"] + 0.15 * frame["w"]) * dpr), int((frame["y"] + 0.3 * frame["h"]) * dpr)))
    assert inside != (255, 255, 255) and inside != (250, 250, 250)
