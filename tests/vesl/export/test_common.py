"""The pieces every export format shares: spans (recorded, or searched in older shards), the grounding text,
Qwen2.5-VL's resize, image files written upright, safe file names, COCO categories."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from operators.phrases import phrase_of_text
from vesl.export.coco import category_list
from vesl.export.common import (
    Counts,
    ExportOptions,
    file_stem,
    find_spans,
    grounding_text,
    select_regions,
    smart_resize,
    upright_image,
)


def test_find_spans_finds_every_place_any_case_any_punctuation_between():
    text = "A Red Car, a red-car? No: a RED  car; and a redcar and red cars"
    spans = find_spans(text, "red car")
    assert [text[a:b] for a, b in spans] == ["Red Car", "RED  car"]  # "red-car" is one word, "redcar" and "cars" differ
    assert find_spans("U.S. flag", "u s flag") == [(0, 9)] and find_spans(None, "x") == [] and find_spans("x", "") == []
    assert all(phrase_of_text(text[a:b]) == "red car" for a, b in spans)


def test_regions_are_filtered_best_first_and_older_shards_get_searched_spans():
    row = {"caption": "A Dog and a cat", "alt_text": "dog",
           "regions": [{"box": [0, 0, 1, 1], "phrase": "cat", "score": 0.2, "source": "caption", "spans": [[12, 15]]},
                       {"box": [0, 0, 1, 1], "phrase": "dog", "score": 0.9, "source": "caption", "spans": None},
                       {"box": [0, 0, 1, 1], "phrase": "dog", "score": 0.5, "source": "alt_text", "spans": None}]}
    counts = Counts()
    out = select_regions(row, ExportOptions(format="odvg"), counts)
    assert [(r["phrase"], r["spans"]) for r in out] == [("dog", [(2, 5)]), ("dog", [(0, 3)]), ("cat", [(12, 15)])]
    assert counts.spans_searched == 2
    counts = Counts()
    out = select_regions(row, ExportOptions(format="odvg", sources="caption", min_score=0.3, max_regions=1), counts)
    assert [r["phrase"] for r in out] == ["dog"]
    assert counts.dropped == {"source_not_exported": 1, "below_min_score": 1}
    assert select_regions(row, ExportOptions(format="odvg", max_regions=2), counts)[1]["source"] == "alt_text"


def test_an_alt_text_region_points_into_the_cleaned_alt_text_after_the_caption():
    alt = "<p>Tom &amp; Jerry</p>\n\n<b>Vintage</b>   Poster"
    row = {"caption": "A cat.", "alt_text": alt}
    regions = [{"phrase": "cat", "source": "caption", "spans": [(2, 5)]},
               {"phrase": "tom & jerry", "source": "alt_text", "spans": [(3, 18)]},
               {"phrase": "vintage poster", "source": "alt_text", "spans": [(27, 48)]}]
    assert [alt[a:b] for a, b in (regions[1]["spans"][0], regions[2]["spans"][0])] == [
        "Tom &amp; Jerry", "Vintage</b>   Poster"]
    g = grounding_text(row, regions)
    assert g.text == "A cat. Tom & Jerry Vintage Poster"
    assert [[g.text[a:b] for a, b in spans] for spans in g.spans] == [["cat"], ["Tom & Jerry"], ["Vintage Poster"]]
    assert grounding_text({"caption": "A cat.", "alt_text": alt}, regions[:1]).text == "A cat."  # no alt region


def test_smart_resize_is_qwen2_vl_s_own():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as qwen

    for h, w in [(80, 120), (480, 640), (1080, 1920), (4000, 3000), (30, 29), (10, 1500), (9000, 9000)]:
        for lo, hi in [(56 * 56, 28 * 28 * 16384), (256 * 28 * 28, 1280 * 28 * 28)]:
            assert smart_resize(h, w, lo, hi) == tuple(qwen(h, w, factor=28, min_pixels=lo, max_pixels=hi)), (h, w)


def test_an_exif_rotated_jpeg_is_written_upright_and_others_byte_for_byte():
    image = Image.new("RGB", (40, 20), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to display
    buf = io.BytesIO()
    image.save(buf, "JPEG", exif=exif.tobytes())
    data, ext, turned = upright_image(buf.getvalue())
    assert turned and ext == ".jpg" and Image.open(io.BytesIO(data)).size == (20, 40)
    png = io.BytesIO()
    image.save(png, "PNG")
    assert upright_image(png.getvalue()) == (png.getvalue(), ".png", False)
    with pytest.raises(Exception):
        upright_image(b"not an image")


def test_file_names_of_hostile_ids_are_hashed():
    assert file_stem("abc_01.x") == "abc_01.x"
    names = {file_stem(i) for i in ("../etc/passwd", "a/b", "a b", "..", ".hidden", "x" * 300)}
    assert len(names) == 6 and all(n.startswith("id-") and "/" not in n for n in names)


def test_categories_are_phrases_with_enough_regions_most_first():
    cats = category_list({"dog": 5, "cat": 5, "red car": 9, "tail": 1}, min_count=2)
    assert [(c["id"], c["name"]) for c in cats] == [(1, "red car"), (2, "cat"), (3, "dog")]


def test_options_are_checked():
    assert ExportOptions(format="coco", sources="alt_text, caption,caption").sources == ("alt_text", "caption")
    for bad in ({"format": "yolo"}, {"format": "odvg", "sources": "title"}, {"format": "odvg", "max_regions": 0},
                {"format": "llava", "style": "kosmos"}):
        with pytest.raises(ValueError):
            ExportOptions(**bad)


def test_an_image_only_a_web_url_holds_is_not_downloaded_again(tmp_path):
    from vesl.export.job import ShardExport

    exporter = ShardExport(str(tmp_path), ExportOptions(format="coco"), None, None, None)
    with pytest.raises(ValueError, match="does not download it again"):
        exporter.read({"image_bytes": None, "image_location": None, "image_uri": "https://example.com/a.jpg"})
    (tmp_path / "a.jpg").write_bytes(b"jpeg bytes")
    assert exporter.read({"image_uri": str(tmp_path / "a.jpg")}) == b"jpeg bytes"  # a 1.1 row's file: read there
    assert exporter.read({"image_bytes": b"inline", "image_uri": "https://example.com/a.jpg"}) == b"inline"
