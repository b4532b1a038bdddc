"""The HTML report of `vesl inspect --out report.html`: one self-contained file.

Summary tables, SVG histograms (regions per image, scores, words per phrase), rejects with example
messages, the most frequent phrases, models and thresholds, and a gallery of sampled images with
their boxes drawn in distinct colours, each labelled with its phrase and score, caption and
alt-text beside. Images are embedded as base64 JPEG thumbnails: the file needs no network and no
other file to be viewed. Every text from the data is HTML-escaped (captions and alt-texts are
untrusted input): the page is a Jinja2 template with autoescape on.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from markupsafe import Markup, escape

from vesl.core.text import fmt

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


def thumbnail(row: Mapping[str, Any], thumb_size: int, storage_options,
              relocations: Mapping[str, str] | None = None) -> tuple[str | None, str | None]:
    """(data: URI of a JPEG thumbnail, None) or (None, why the image could not be shown). The image is read
    as the trainer reads it: its bytes, else its location, else its original URI."""
    from operators.decode import DecodeConfig
    from vesl.core.images import ImageRef, decode_image, read_image
    from vesl.core.text import describe_error

    config = DecodeConfig()  # the limits the job read the image with
    try:
        data = read_image(ImageRef.of(row), storage_options, config.max_bytes, config.fetch_timeout_s, relocations)
        image, _, _ = decode_image(data, max_pixels=config.max_pixels, max_side=thumb_size)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=85)
    except Exception as e:  # a report shows what it can: one unreadable image is a note on its card
        return None, describe_error(e)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), None


FRAME_MAX = (400, 440)  # CSS pixels a gallery picture may take; small images are scaled up to it
TEXT_MAX = 400  # characters of a caption or alt-text shown on a card


def clip(text: str | None, limit: int = TEXT_MAX) -> Markup:
    """TEXT escaped, cut at LIMIT characters with a note of how much was left out."""
    if text is None:
        return Markup("")
    if len(text) <= limit:
        return escape(text)
    return Markup('{}… <span class="muted">({} more characters)</span>').format(text[:limit], len(text) - limit)


def frame_size(width: int, height: int) -> tuple[float, float]:
    scale = min(FRAME_MAX[0] / width, FRAME_MAX[1] / height)
    return width * scale, height * scale


def box_geometry(region: Mapping[str, Any]) -> dict[str, Any]:
    """Where a region's box and label go on its card, in percent of the picture."""
    x0, y0, x1, y1 = (float(v) for v in region["box"])
    return {"left": f"{100 * x0:.3f}", "top": f"{100 * y0:.3f}", "width": f"{100 * (x1 - x0):.3f}",
            "height": f"{100 * (y1 - y0):.3f}", "near_top": y0 < 0.06, "score": f"{float(region['score']):.2f}"}


def card_context(row: Mapping[str, Any], thumb_size: int, storage_options,
                 relocations: Mapping[str, str] | None = None) -> dict[str, Any]:
    src, problem = thumbnail(row, thumb_size, storage_options, relocations)
    width, height = int(row.get("width") or 1), int(row.get("height") or 1)
    frame_w, frame_h = frame_size(width, height)
    regions = [{**region, **box_geometry(region), "colour": PALETTE[i % len(PALETTE)],
                "ink": text_colour(PALETTE[i % len(PALETTE)])} for i, region in enumerate(row.get("regions") or [])]
    return {"row": row, "src": src, "problem": problem, "width": width, "height": height,
            "frame_w": f"{frame_w:.1f}", "frame_h": f"{frame_h:.1f}", "regions": regions}


def summary_rows(stats: Mapping[str, Any]) -> list[list[Any]]:
    reg, phr, words, paper = stats["regions"], stats["phrases"], stats["words_per_region_phrase"], stats["paper"]
    return [
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
        *caption_rows(stats),
        ["shard files", stats["shards"], ""],
    ]


def caption_rows(stats: Mapping[str, Any]) -> list[list[Any]]:
    caps = stats.get("captions")
    if not caps:
        return []
    rows = [["words per caption (final)", fmt(caps["final_words"]["mean"], 1), ""],
            ["words per VLM caption", fmt(caps["vlm_words"]["mean"], 1), ""]]
    return rows + [[f"captions {source}", f"{n} ({100 * n / max(1, stats['rows']):.0f}%)", ""]
                   for source, n in caps["sources"].items()]


def plots(stats: Mapping[str, Any]) -> list[Markup]:
    """The three histograms, as inline SVG (our own markup: its texts are escaped as it is built)."""
    hist = stats["regions"]["per_image_histogram"]
    last = max([i for i, v in enumerate(hist) if v] + [5])
    score_hist = stats["scores"]["histogram"]
    bins = len(score_hist)
    word_items = sorted((int(k), v) for k, v in stats["words_per_region_phrase"]["histogram"].items())
    return [Markup(svg) for svg in (
        svg_histogram(hist[:last + 1], [f"{i}+" if i == len(hist) - 1 else str(i) for i in range(last + 1)],
                      "regions per image", "regions in the image"),
        svg_histogram(score_hist, [f"{i / bins:.2f}" for i in range(bins)], "region scores",
                      "detector score (bin start)", colour="#f58231"),
        svg_histogram([v for _, v in word_items] or [0], [str(k) for k, _ in word_items] or ["0"],
                      "words per region phrase", "words", colour="#3cb44b"))]


def reject_rows(stats: Mapping[str, Any]) -> list[list[Any]]:
    rows = []
    for key, count in stats["by_reason"].items():
        example = (stats.get("reject_examples") or {}).get(key, [{}])[0]
        rows.append([*key.split("/", 1), count, example.get("image_id", ""), example.get("message", "")])
    return rows


TEMPLATES = Path(__file__).parent / "templates"


def template():
    """The page template (vesl/shards/templates/report.html); autoescape on: every value from the data is
    HTML-escaped."""
    from jinja2 import Environment, FileSystemLoader

    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=True, keep_trailing_newline=True)
    env.filters["clip"] = clip
    env.policies["json.dumps_kwargs"] = {"default": str}  # tojson also escapes <, >, & and '
    return env.get_template("report.html")


def stage_rows(stages: Mapping[str, Mapping[str, Any]]) -> list[list[Any]]:
    """[stage, rows in, rejected, seconds, rows/s, rejects by reason] per stage of the run manifest's `stages`."""
    return [[name, s["rows"], sum(s["rejects"].values()), fmt(s["seconds"], 1), fmt(s["rows_per_s"], 1),
             ", ".join(f"{r} {n}" for r, n in s["rejects"].items())] for name, s in stages.items()]



def render_report(stats: Mapping[str, Any], storage_options=None, thumb_size: int = 512,
                  relocations: Mapping[str, str] | None = None) -> str:
    footer = stats["footer"]
    return template().render(
        stats=stats, css=Markup(CSS), run=stats.get("run"), summary=summary_rows(stats), plots=plots(stats),
        quantiles={k: f"{v:.3f}" for k, v in stats["scores"]["quantiles"].items()},
        rejects=reject_rows(stats) if stats["by_reason"] else [],
        stages=stage_rows(stats.get("stages") or {}),
        cards=[card_context(row, thumb_size, storage_options, relocations) for row in stats.get("sample") or []],
        models=[[stage, info.get("id"), info.get("class", ""), info.get("revision", "")]
                for m in footer.get("models") or [] for stage, info in m.items()],
        thresholds=[[k, "off" if v is None else v] for t in footer.get("thresholds") or [] for k, v in t.items()],
        generated=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        machine={k: v for k, v in stats.items() if k != "sample"})


def write_report(stats: Mapping[str, Any], out: str, storage_options=None, thumb_size: int = 512,
                 relocations: Mapping[str, str] | None = None) -> str:
    """Render STATS (from `collect_stats(..., sample=N)`) and write the HTML to OUT (local or fsspec URI);
    RELOCATIONS: image_location prefixes mapped to where the images are now."""
    from vesl.core.storage import filesystem

    page = render_report(stats, storage_options, thumb_size, relocations)
    fs, path = filesystem(out, storage_options)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent and "://" not in out:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return out


__all__ = ["PALETTE", "render_report", "svg_histogram", "write_report"]
