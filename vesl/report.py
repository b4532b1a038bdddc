"""The HTML report of `vesl inspect --out report.html`: one self-contained file.

Summary tables, SVG histograms (regions per image, scores, words per phrase), rejects with example
messages, the most frequent phrases, models and thresholds, and a gallery of sampled images with
their boxes drawn in distinct colours, each labelled with its phrase and score, caption and
alt-text beside. Images are embedded as base64 JPEG thumbnails: the file needs no network and no
other file to be viewed. Every text from the data is HTML-escaped (captions and alt-texts are
untrusted input).
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
from collections.abc import Mapping, Sequence
from typing import Any

# Distinct, saturated colours (after Sasha Trubetskoy's list); box i of an image takes colour i.
PALETTE = ["#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
           "#469990", "#9a6324", "#800000", "#808000", "#000075", "#fabed4", "#dcbeff", "#aaffc3", "#ffd8b1"]

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#1d1d1f;background:#fafafa}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.meta{color:#666;margin:0 0 12px}
table{border-collapse:collapse;margin:6px 0}td,th{padding:3px 10px;border-bottom:1px solid #e5e5e5;text-align:left;
vertical-align:top}th{font-weight:600;background:#f0f0f0}td.num{text-align:right;font-variant-numeric:tabular-nums}
.plots{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}
.plot{background:#fff;border:1px solid #e2e2e2;border-radius:6px;padding:8px}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(420px,1fr));gap:18px}
.card{margin:0;background:#fff;border:1px solid #e2e2e2;border-radius:6px;padding:10px;display:flex;
flex-direction:column;gap:8px}
.frame{position:relative;line-height:0;background:#ddd;align-self:center}
.frame img{width:100%;height:100%;display:block}
.frame .missing{display:flex;align-items:center;justify-content:center;line-height:1.3;color:#a00;padding:8px;
box-sizing:border-box;width:100%;height:100%;position:absolute;font-size:12px;overflow:hidden}
.box{position:absolute;box-sizing:border-box;border:3px solid;pointer-events:none}
.label{position:absolute;left:-3px;bottom:100%;white-space:nowrap;font-size:11px;line-height:1.35;padding:0 4px;
max-width:260px;overflow:hidden;text-overflow:ellipsis}
.box.top .label{bottom:auto;top:0}
.text{font-size:13px}.text b{color:#555;font-weight:600}
.regions{list-style:none;padding:0;margin:4px 0 0;font-size:12px;columns:2}
.sw{display:inline-block;width:10px;height:10px;margin-right:5px;border-radius:2px;vertical-align:-1px}
.muted{color:#888}
"""


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def text_colour(hex_colour: str) -> str:
    r, g, b = (int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))
    return "#000" if 0.299 * r + 0.587 * g + 0.114 * b > 150 else "#fff"


def svg_histogram(counts: Sequence[int], labels: Sequence[str], title: str, xlabel: str, colour: str = "#4363d8",
                  width: int = 460, height: int = 210) -> str:
    """A bar chart as inline SVG (no scripts, no fonts to fetch)."""
    left, right, top, bottom = 44, 10, 26, 38
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = max(counts) if counts and max(counts) > 0 else 1
    n = max(len(counts), 1)
    bar_w = plot_w / n
    parts = [f'<svg class="hist" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{esc(title)}">',
             f'<text x="{width / 2:.0f}" y="16" text-anchor="middle" font-size="13" font-weight="600">'
             f'{esc(title)}</text>',
             f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#888"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="#888"/>']
    for frac in (0.0, 0.5, 1.0):
        y = top + plot_h * (1 - frac)
        parts.append(f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end" font-size="10">'
                     f'{round(peak * frac)}</text>')
    step = max(1, round(n / 10))
    for i, (c, label) in enumerate(zip(counts, labels)):
        h = plot_h * c / peak
        x = left + i * bar_w
        parts.append(f'<rect x="{x + 1:.1f}" y="{top + plot_h - h:.1f}" width="{max(bar_w - 2, 1):.1f}" '
                     f'height="{h:.1f}" fill="{colour}"><title>{esc(label)}: {c}</title></rect>')
        if i % step == 0:
            parts.append(f'<text x="{x + bar_w / 2:.1f}" y="{top + plot_h + 13}" text-anchor="middle" '
                         f'font-size="10">{esc(label)}</text>')
    parts.append(f'<text x="{left + plot_w / 2:.0f}" y="{height - 6}" text-anchor="middle" font-size="11">'
                 f'{esc(xlabel)}</text></svg>')
    return "".join(parts)


THUMB_MAX_BYTES = 64 * 1024 * 1024  # the decode stage's defaults: an image the job read, the report reads
THUMB_FETCH_TIMEOUT_S = 60.0


def thumbnail(row: Mapping[str, Any], thumb_size: int, storage_options) -> tuple[str | None, str | None]:
    """(data: URI of a JPEG thumbnail, None) or (None, why the image could not be shown)."""
    from operators.decode import DecodeConfig, decode_image, fetch_bytes
    from vesl.core.text import describe_error

    config = DecodeConfig(working_max_side=thumb_size)
    try:
        data = row.get("image_bytes")
        if data is None:
            if not row.get("image_uri"):
                return None, "no image_bytes and no image_uri in the shard"
            data = fetch_bytes(row["image_uri"], storage_options, config.max_bytes, config.fetch_timeout_s)
        image, _, _ = decode_image(data, config)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=85)
    except Exception as e:  # a report shows what it can: one unreadable image is a note on its card
        return None, describe_error(e)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), None


FRAME_MAX = (400, 440)  # CSS pixels a gallery picture may take; small images are scaled up to it
TEXT_MAX = 400  # characters of a caption or alt-text shown on a card


def clip(text: str | None, limit: int = TEXT_MAX) -> str:
    """TEXT escaped, cut at LIMIT characters with a note of how much was left out."""
    if text is None:
        return ""
    if len(text) <= limit:
        return esc(text)
    return f'{esc(text[:limit])}… <span class="muted">({len(text) - limit} more characters)</span>'


def frame_size(width: int, height: int) -> tuple[float, float]:
    scale = min(FRAME_MAX[0] / width, FRAME_MAX[1] / height)
    return width * scale, height * scale


def gallery_card(row: Mapping[str, Any], thumb_size: int, storage_options) -> str:
    src, problem = thumbnail(row, thumb_size, storage_options)
    width, height = int(row.get("width") or 1), int(row.get("height") or 1)
    frame_w, frame_h = frame_size(width, height)
    boxes, items = [], []
    for i, region in enumerate(row.get("regions") or []):
        colour = PALETTE[i % len(PALETTE)]
        x0, y0, x1, y1 = (float(v) for v in region["box"])
        label = f"{region['phrase']} {float(region['score']):.2f}"
        near_top = " top" if y0 < 0.06 else ""
        boxes.append(
            f'<div class="box{near_top}" data-region="{i}" data-colour="{colour}" style="left:{100 * x0:.3f}%;'
            f'top:{100 * y0:.3f}%;width:{100 * (x1 - x0):.3f}%;height:{100 * (y1 - y0):.3f}%;border-color:{colour}">'
            f'<span class="label" style="background:{colour};color:{text_colour(colour)}">{esc(label)}</span></div>')
        items.append(f'<li><span class="sw" style="background:{colour}"></span>{esc(region["phrase"])} '
                     f'<span class="muted">{float(region["score"]):.2f} · {esc(region["source"])}</span></li>')
    if src:
        picture = f'<img class="photo" src="{src}" alt="{esc(row["image_id"])}">'
    else:
        picture = f'<div class="missing">image not available: {esc(problem)}</div>'
    phrases = ", ".join(esc(p) for p in row.get("phrases") or []) or '<span class="muted">none</span>'
    return (f'<figure class="card" data-image-id="{esc(row["image_id"])}" data-regions="{len(boxes)}">'
            f'<div class="frame" style="width:{frame_w:.1f}px;height:{frame_h:.1f}px">{picture}{"".join(boxes)}</div>'
            f'<figcaption class="text"><div><b>{esc(row["image_id"])}</b> <span class="muted">{width}×{height} · '
            f'{len(boxes)} region(s) · {esc(row.get("image_uri") or "embedded")}</span></div>'
            f'<div><b>caption</b> {clip(row.get("caption"))}</div>'
            f'<div><b>alt-text</b> {clip(row.get("alt_text")) or "<span class=muted>none</span>"}</div>'
            f'<div><b>phrases</b> {phrases}</div><ul class="regions">{"".join(items)}</ul></figcaption></figure>')


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], numeric: Sequence[int] = ()) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td class="num">{esc(v)}</td>' if j in numeric else f"<td>{esc(v)}</td>"
                                    for j, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render_report(stats: Mapping[str, Any], storage_options=None, thumb_size: int = 512) -> str:
    from vesl.core.text import fmt

    reg, phr, words = stats["regions"], stats["phrases"], stats["words_per_region_phrase"]
    paper = stats["paper"]
    run = stats.get("run") or {}
    summary = _table(["", "value", "paper (CLOC, real models)"], [
        ["images (inputs)", stats["images"], ""],
        ["rows (images with labels)", stats["rows"], ""],
        ["rejects", stats["rejects"], ""],
        ["accounted (rows + rejects = inputs)", "yes" if stats["accounted"] else "NO", ""],
        ["regions", reg["total"], ""],
        ["regions per image", fmt(reg["per_image_mean"]), f"~{paper['regions_per_image']}"],
        ["images without regions", reg["images_without_regions"], ""],
        ["candidate phrases per image", fmt(phr["per_image_mean"]), ""],
        ["words per region phrase", fmt(words["mean"]), f"~{paper['words_per_phrase']}"],
        ["distinct region phrases", phr["distinct_region_phrases"], ""],
        ["shard files", stats["shards"], ""],
    ], numeric=(1,))
    hist = reg["per_image_histogram"]
    last = max([i for i, v in enumerate(hist) if v] + [5])
    region_plot = svg_histogram(hist[:last + 1], [f"{i}+" if i == len(hist) - 1 else str(i) for i in range(last + 1)],
                                "regions per image", "regions in the image")
    score_hist = stats["scores"]["histogram"]
    bins = len(score_hist)
    score_plot = svg_histogram(score_hist, [f"{i / bins:.2f}" for i in range(bins)], "region scores",
                               "detector score (bin start)", colour="#f58231")
    word_items = sorted((int(k), v) for k, v in words["histogram"].items())
    word_plot = svg_histogram([v for _, v in word_items] or [0], [str(k) for k, _ in word_items] or ["0"],
                              "words per region phrase", "words", colour="#3cb44b")
    quantiles = stats["scores"]["quantiles"]
    score_table = _table(list(quantiles), [[f"{v:.3f}" for v in quantiles.values()]]) if quantiles else \
        '<p class="muted">no regions</p>'
    if stats["by_reason"]:
        reject_rows = []
        for key, count in stats["by_reason"].items():
            example = (stats.get("reject_examples") or {}).get(key, [{}])[0]
            reject_rows.append([*key.split("/", 1), count, example.get("image_id", ""), example.get("message", "")])
        rejects = _table(["stage", "reason", "count", "e.g. image_id", "message"], reject_rows, numeric=(2,))
    else:
        rejects = '<p class="muted">no rejects</p>'
    phrases = _table(["phrase", "regions"], stats["top_phrases"], numeric=(1,)) if stats["top_phrases"] else \
        '<p class="muted">no regions</p>'
    model_rows = [[stage, info.get("id"), info.get("class", ""), info.get("revision", "")]
                  for m in stats["footer"].get("models") or [] for stage, info in m.items()]
    threshold_rows = [[k, "off" if v is None else v] for t in stats["footer"].get("thresholds") or []
                      for k, v in t.items()]
    models = (_table(["stage", "model", "class", "revision"], model_rows)
              + _table(["threshold", "value"], threshold_rows))
    sample = stats.get("sample") or []
    cards = "".join(gallery_card(row, thumb_size, storage_options) for row in sample)
    generated = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    run_line = (f"run {esc(run.get('run_id'))} · input {esc(run.get('input'))} · finished {esc(run.get('finished_at'))}"
                if run else "no run manifest (a folder of shards)")
    machine = json.dumps({k: v for k, v in stats.items() if k != "sample"}, default=str).replace("<", "\\u003c")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>vesl report: {esc(stats['output'])}</title><style>{CSS}</style></head>
<body>
<h1>vesl report</h1>
<p class="meta">{esc(stats['output'])} · {run_line} · generated {generated}</p>
<p class="meta">Labels from tiny random-weight models (the demo's <code>--preset tiny</code>) are structurally valid and
meaningless; compare the paper's figures with runs of real models only.</p>
<div class="plots"><div><h2>Summary</h2>{summary}<h3>score quantiles</h3>{score_table}</div>
<div><h2>Distributions</h2><div class="plots"><div class="plot">{region_plot}</div><div class="plot">{score_plot}</div>
<div class="plot">{word_plot}</div></div></div></div>
<h2>Rejects</h2>{rejects}
<h2 id="gallery-title">Gallery: {len(sample)} sampled images</h2>
<div class="gallery" id="gallery">{cards}</div>
<h2>Most frequent region phrases</h2>{phrases}
<h2>Models and thresholds (shard footers)</h2>{models}
<script type="application/json" id="vesl-stats">{machine}</script>
</body></html>
"""


def write_report(stats: Mapping[str, Any], out: str, storage_options=None, thumb_size: int = 512) -> str:
    """Render STATS (from `collect_stats(..., sample=N)`) and write the HTML to OUT (local or fsspec URI)."""
    from vesl.core.storage import filesystem

    page = render_report(stats, storage_options, thumb_size)
    fs, path = filesystem(out, storage_options)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent and "://" not in out:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return out


__all__ = ["PALETTE", "render_report", "svg_histogram", "write_report"]
