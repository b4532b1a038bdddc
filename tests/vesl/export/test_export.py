"""`vesl export` on Ray, every format read back by its real consumer (pycocotools, HF datasets, `vesl eval
--coco`) or by a small reader that follows the format's documentation (ODVG, GRIT, LLaVA styles): spans
slice their text to the phrase, every box converts back to the shard's box, and nothing goes missing
silently."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
from PIL import Image

import vesl
from operators.phrases import ExtractPhrases, phrase_of_text
from tests.conftest import encode, photo
from vesl.export.job import main as export_main

pytestmark = pytest.mark.slow

CAPTIONS = {
    # the same phrase twice, in other cases; a phrase only the alt-text has (through markup and entities)
    "twice": ("A Red Car beside a red car and a small dog.", "<b>Vintage</b> poster &amp; wooden frame"),
    "upright": ("A woman holds a blue umbrella in the rain.", None),
    "rotated": ("A tall lighthouse on a rocky coast.", "Lighthouse"),
    "no-phrase": ("It is here.", None),
    "gone": ("A green bicycle.", None),  # its image file is deleted: a recorded skip, not a missing row
    "odd/id ..": ("Two cats sleep on a sofa.", "CATS"),
}


def rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated by 90 degrees: the shard's width and height are the upright image's
    buf = io.BytesIO()
    photo(90, 60, seed=7).save(buf, "JPEG", exif=exif.tobytes())
    return buf.getvalue()


def shard_rows(folder: Path) -> list[dict]:
    """Rows as the annotate job writes them: phrases, sources and spans from the real phrases stage, one box
    per phrase (made up, known), images inline, as files or as EXIF-rotated files."""
    found = ExtractPhrases().extract([c for c, _ in CAPTIONS.values()], [a for _, a in CAPTIONS.values()])
    rows = []
    for k, ((image_id, (caption, alt)), (phrases, sources, spans)) in enumerate(zip(CAPTIONS.items(), found)):
        data, size = (rotated_jpeg(), (60, 90)) if image_id == "rotated" else (encode(photo(120, 80, seed=k)),
                                                                               (120, 80))
        as_file = k % 2 == 1 or image_id == "gone"
        row = {"image_id": image_id, "width": size[0], "height": size[1], "caption": caption, "alt_text": alt,
               "phrases": phrases, "image_bytes": None if as_file else data, "image_location": None,
               "image_uri": None}
        if as_file:
            path = folder / f"{k}.jpg"
            path.write_bytes(data)
            row["image_location"] = row["image_uri"] = str(path)
        row["regions"] = [{"box": [0.05 * j, 0.1, 0.3 + 0.05 * j, 0.4 + 0.1 * (j % 3)], "phrase": p,
                           "score": round(0.9 - 0.15 * j, 2), "source": s, "spans": [list(x) for x in sp]}
                          for j, (p, s, sp) in enumerate(zip(phrases, sources, spans))]
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def shards(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("export")
    (root / "images").mkdir()
    rows = shard_rows(root / "images")
    vesl.write_regions(pa.Table.from_pylist(rows[:3]), str(root / "out" / "data" / "part-000000000.parquet"))
    vesl.write_regions(pa.Table.from_pylist(rows[3:]), str(root / "out" / "data" / "part-000000001.parquet"))
    (root / "images" / f"{list(CAPTIONS).index('gone')}.jpg").unlink()
    return root


def shard_regions(root: Path) -> dict[str, dict]:
    return vesl.read_regions(str(root / "out"), explode=False).set_index("image_id").to_dict("index")


def export(root: Path, name: str, *args: str) -> Path:
    assert export_main([str(root / "out"), str(root / name), *args]) == 0
    return root / name


def summary(dest: Path) -> dict:
    return json.loads((dest / "export.json").read_text())


def assert_box(back: list[float], box: list[float], width: int, height: int, px: float = 1.0) -> None:
    """BACK (normalised x0, y0, x1, y1 read from an export) is the shard's BOX within PX pixels."""
    scale = [width, height, width, height]
    assert all(abs(a - b) * s <= px for a, b, s in zip(back, box, scale)), (back, box)


def assert_span(text: str, span, phrase: str) -> None:
    start, end = span
    assert phrase_of_text(text[start:end]) == phrase, (text[start:end], phrase)


def read_odvg(path: Path) -> list[dict]:
    """ODVG as MM-Grounding-DINO documents it (grounding data): one JSON object a line with filename, height,
    width and grounding {caption, regions [{bbox x1y1x2y2 pixels, phrase, tokens_positive [[s, e], ...]}]};
    back to shard-like rows: image, size, caption, regions with normalised boxes."""
    rows = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        w, h, grounding = record["width"], record["height"], record["grounding"]
        regions = [{"box": [x0 / w, y0 / h, x1 / w, y1 / h], "phrase": r["phrase"], "spans": r["tokens_positive"]}
                   for r in grounding["regions"] for x0, y0, x1, y1 in [r["bbox"]]]
        rows.append({"file": path.parent / record["filename"], "width": w, "height": h,
                     "caption": grounding["caption"], "regions": regions})
    return rows


def test_odvg_round_trips_to_the_same_regions_with_spans_that_slice_the_caption(shards):
    dest = export(shards, "odvg", "--format", "odvg")
    truth = shard_regions(shards)
    rows = read_odvg(dest / "odvg.jsonl")
    counts = summary(dest)["counts"]
    assert counts["rows"] == 6 and counts["exported"] == len(rows) == 4
    assert counts["skipped"] == {"no_regions": 1, "image_unreadable": 1}  # "no-phrase" and "gone", listed with why
    skipped = [json.loads(line) for p in (dest / "_vesl_export" / "skipped").iterdir() for line in p.open()]
    assert {(s["image_id"], s["reason"]) for s in skipped} == {("no-phrase", "no_regions"),
                                                                ("gone", "image_unreadable")}
    assert "no such file" in next(s["message"] for s in skipped if s["image_id"] == "gone")
    for row in rows:
        image = Image.open(row["file"])
        assert image.size == (row["width"], row["height"])  # the rotated one is written upright
        image_id = next(i for i in truth if row["caption"].startswith(truth[i]["caption"]))
        shard = truth[image_id]
        assert sorted(r["phrase"] for r in row["regions"]) == sorted(r["phrase"] for r in shard["regions"]), image_id
        assert [r["score"] for r in shard_order(shard, row)] == sorted((r["score"] for r in shard["regions"]),
                                                                       reverse=True)
        for region, original in zip(row["regions"], shard_order(shard, row)):
            assert_box(region["box"], list(original["box"]), row["width"], row["height"])
            for span in region["spans"]:
                assert_span(row["caption"], span, region["phrase"])
    twice = next(r for r in rows if r["caption"].startswith("A Red Car"))
    assert twice["caption"] == "A Red Car beside a red car and a small dog. Vintage poster & wooden frame"
    red_car = next(r for r in twice["regions"] if r["phrase"] == "red car")
    assert [twice["caption"][a:b] for a, b in red_car["spans"]] == ["Red Car", "red car"]
    poster = next(r for r in twice["regions"] if r["phrase"] == "vintage poster")  # from the alt-text
    assert [twice["caption"][a:b] for a, b in poster["spans"]] == ["Vintage poster"]


def shard_order(shard: dict, row: dict) -> list[dict]:
    """The shard's regions in the export's order (best score first), matched by phrase."""
    by_phrase = {r["phrase"]: r for r in shard["regions"]}
    return [by_phrase[r["phrase"]] for r in row["regions"]]


def test_grit_spans_slice_the_caption_and_boxes_are_the_shards(shards):
    dest = export(shards, "grit", "--format", "grit")
    truth = shard_regions(shards)
    table = pd.read_parquet(dest / "parts")
    assert sorted(table["key"]) == ["gone", "odd/id ..", "rotated", "twice", "upright"]  # no image files: "gone" kept
    assert summary(dest)["counts"]["skipped"] == {"no_regions": 1}
    for row in table.to_dict("records"):
        shard = truth[row["key"]]
        ranked = sorted(shard["regions"], key=lambda r: -r["score"])
        assert len(row["noun_chunks"]) == len(ranked)
        for chunk, region in zip(row["noun_chunks"], ranked):
            start, end, *box, score = chunk
            assert_span(row["caption"], (int(start), int(end)), region["phrase"])
            assert_box(box, list(region["box"]), 1, 1, px=1e-6)
            assert abs(score - region["score"]) < 1e-6
        assert str(row["image_location"]) == str(shard["image_location"])  # the image stays where the shard says


def test_coco_loads_in_pycocotools_one_annotation_per_region(shards):
    from pycocotools.coco import COCO

    dest = export(shards, "coco", "--format", "coco")
    truth = shard_regions(shards)
    coco = COCO(str(dest / "instances.json"))
    images = {i["vesl_image_id"]: i for i in coco.dataset["images"]}
    assert set(images) == set(truth) - {"gone"}  # its image could not be read: skipped, and listed
    names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    assert sorted(names.values()) == sorted({r["phrase"] for s in truth.values() for r in s["regions"]
                                             if s is not truth["gone"]})
    assert len(coco.getAnnIds()) == sum(len(truth[i]["regions"]) for i in images)
    for image_id, image in images.items():
        assert Image.open(dest / image["file_name"]).size == (image["width"], image["height"])
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
        shard = {r["phrase"]: r for r in truth[image_id]["regions"]}
        assert sorted(names[a["category_id"]] for a in anns) == sorted(shard)
        for a in anns:
            x, y, w, h = a["bbox"]
            assert abs(a["area"] - w * h) < 0.01 and a["iscrowd"] == 0
            back = [x / image["width"], y / image["height"], (x + w) / image["width"], (y + h) / image["height"]]
            assert_box(back, list(shard[names[a["category_id"]]]["box"]), image["width"], image["height"])
    cut = export(shards, "coco-cut", "--format", "coco", "--min-phrase-count", "2", "--sources", "caption")
    assert json.loads((cut / "instances.json").read_text())["categories"] == []  # no caption phrase twice here
    assert summary(cut)["counts"]["dropped"]["phrase_below_min_count"] > 0


def test_vesl_eval_coco_runs_on_an_export_and_agrees_with_the_shards(tmp_path, tiny_dir, ray_local):
    import torch
    from transformers import AutoProcessor, CLIPModel

    from vesl.cli import main
    from vesl.cloc.checkpoint import save_checkpoint
    from vesl.cloc.evaluate import evaluate
    from vesl.cloc.model import ClocModel
    from vesl.cloc.synthetic import write_shapes_dataset

    torch.manual_seed(5)
    checkpoint = save_checkpoint(tmp_path / "ck", ClocModel(CLIPModel.from_pretrained(tiny_dir / "clip")).eval(),
                                 AutoProcessor.from_pretrained(tiny_dir / "clip"), {"step": 1})
    write_shapes_dataset(tmp_path / "shapes", images=16, seed=3, embed_images=False)  # spans null: searched
    assert export_main([str(tmp_path / "shapes"), str(tmp_path / "coco"), "--format", "coco"]) == 0
    shards = evaluate(str(tmp_path / "shapes"), str(checkpoint), str(tmp_path / "shapes" / "classes.json"),
                      device="cpu")
    result = tmp_path / "eval.json"
    import contextlib

    with result.open("w") as f, contextlib.redirect_stdout(f):
        assert main(["eval", "--coco", str(tmp_path / "coco" / "instances.json"), "--images",
                     str(tmp_path / "coco"), "--checkpoint", str(checkpoint), "--device", "cpu"]) == 0
    coco = json.loads(result.read_text())
    assert coco["regions"] == shards["regions"] > 0
    assert coco["mAcc"] == pytest.approx(shards["mAcc"], abs=1e-6)


def test_hf_export_loads_with_typed_features(shards):
    import datasets

    dest = export(shards, "hf", "--format", "hf")
    truth = shard_regions(shards)
    ds = datasets.load_from_disk(str(dest))
    assert isinstance(ds.features["image"], datasets.Image)
    assert ds.num_rows == 5 and sorted(ds["image_id"]) == sorted(set(truth) - {"gone"})  # "no-phrase" kept, empty
    for row in ds:
        shard = truth[row["image_id"]]
        assert row["image"].size == (row["width"], row["height"]) == (shard["width"], shard["height"])
        objects = row["objects"]
        assert len(objects["bbox"]) == len(shard["regions"])
        by_phrase = {r["phrase"]: r for r in shard["regions"]}
        for (x, y, w, h), phrase, span, source in zip(objects["bbox"], objects["category"], objects["span"],
                                                      objects["source"]):
            back = [x / row["width"], y / row["height"], (x + w) / row["width"], (y + h) / row["height"]]
            assert_box(back, list(by_phrase[phrase]["box"]), row["width"], row["height"])
            assert_span(row["caption"] if source == "caption" else row["alt_text"], span, phrase)


def answer_boxes(answer: str, style: str, width: int, height: int,
                 resized: bool = True) -> list[tuple[str, list[float]]]:
    """(label, normalised box) from a conversation's answer, read as each model family writes them."""
    if style == "shikra":  # the text before each [box;box] ends with the phrase: (that text, box)
        return [(phrase_of_text(re.sub(r"\[[\d.,;]+\]", " ", answer[:m.start()])), [float(v) for v in box.split(",")])
                for m in re.finditer(r"\[([\d.,;]+)\]", answer) for box in m.group(1).split(";")]
    objects = json.loads(answer.removeprefix("```json\n").removesuffix("\n```"))
    if style == "qwen3-vl":
        return [(o["label"], [v / 1000 for v in o["bbox_2d"]]) for o in objects]
    from vesl.export.common import smart_resize

    rh, rw = smart_resize(height, width, 56 * 56, 28 * 28 * 16384) if resized else (height, width)
    return [(o["label"], [v / s for v, s in zip(o["bbox_2d"], (rw, rh, rw, rh))]) for o in objects]


@pytest.mark.parametrize("style", ["qwen2.5-vl", "qwen2.5-vl-original", "qwen3-vl", "shikra"])
def test_llava_conversations_give_the_shards_boxes_back(shards, style):
    resized = style != "qwen2.5-vl-original"
    style = style.removesuffix("-original")
    dest = export(shards, f"llava-{style}-{resized}", "--format", "llava", "--style", style,
                  *([] if resized else ["--pixels", "original"]))
    truth = shard_regions(shards)
    records = json.loads((dest / "llava.json").read_text())
    assert sorted(r["id"] for r in records) == ["odd/id ..", "rotated", "twice", "upright"]
    for record in records:
        shard = truth[record["id"]]
        human, gpt = record["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n") and gpt["from"] == "gpt"
        assert shard["caption"] in human["value"] and (dest / record["image"]).is_file()
        boxes = answer_boxes(gpt["value"], style, shard["width"], shard["height"], resized)
        by_phrase = {r["phrase"]: r for r in shard["regions"]}
        if style != "shikra":
            assert [label for label, _ in boxes] == [r["phrase"] for r in sorted(shard["regions"],
                                                                                 key=lambda r: -r["score"])]
        else:
            assert len(boxes) == len(shard["regions"])
            assert phrase_of_text(re.sub(r"\[[\d.,;]+\]", "", gpt["value"])) == phrase_of_text(
                human["value"].split("Caption: ", 1)[1])  # the caption itself, boxes inserted
        for label, box in boxes:
            region = by_phrase.get(label) or max((r for r in shard["regions"] if label.endswith(" " + r["phrase"])
                                                  or label == r["phrase"]), key=lambda r: len(r["phrase"]))
            assert_box(box, list(region["box"]), shard["width"], shard["height"])


def test_filters_resume_and_a_changed_setting_is_refused(shards, capsys):
    args = ["--format", "odvg", "--min-score", "0.7", "--max-regions", "1", "--sources", "caption"]
    dest = export(shards, "filtered", *args)
    rows = read_odvg(dest / "odvg.jsonl")
    truth = shard_regions(shards)
    for row in rows:
        image_id = next(i for i in truth if row["caption"].startswith(truth[i]["caption"]))
        best = max(truth[image_id]["regions"], key=lambda r: r["score"])
        assert [r["phrase"] for r in row["regions"]] == [best["phrase"]] and best["source"] == "caption"
    before = (dest / "odvg.jsonl").read_text()
    first = summary(dest)
    assert first["counts"]["dropped"]["below_min_score"] > 0 and first["counts"]["dropped"]["over_max_regions"] > 0
    (dest / "_vesl_export" / "done" / "part-000000001.json").unlink()  # as if the run died before that shard ended
    (dest / "parts" / "part-000000001.jsonl").unlink()
    (dest / "odvg.jsonl").unlink()
    assert export_main([str(shards / "out"), str(dest), *args]) == 0
    assert (dest / "odvg.jsonl").read_text() == before and summary(dest)["counts"] == first["counts"]
    assert export_main([str(shards / "out"), str(dest), "--format", "odvg"]) == 2
    assert "holds an export with other settings" in capsys.readouterr().err
    done = json.loads((dest / "_vesl_export" / "done" / "part-000000000.json").read_text())
    done["shard_version"]["size"] += 1  # as if the shard had been rewritten (annotate --overwrite) since
    (dest / "_vesl_export" / "done" / "part-000000000.json").write_text(json.dumps(done))
    (dest / "parts" / "part-000000000.jsonl").write_text("")  # a stale part: it must be written again
    assert export_main([str(shards / "out"), str(dest), *args]) == 0
    assert (dest / "odvg.jsonl").read_text() == before
    assert export_main([str(shards / "out"), str(shards / "out" / "data" / "x"), "--format", "odvg"]) == 2


def test_a_shard_older_than_1_3_exports_with_spans_found_in_its_text(tmp_path, ray_local):
    from tests.schemas.test_schema_minor import write_v10_shard

    out = write_v10_shard(tmp_path / "old", version="1.2")
    assert export_main([str(out), str(tmp_path / "grit"), "--format", "grit"]) == 0
    [row] = pd.read_parquet(tmp_path / "grit" / "parts").to_dict("records")
    [(start, end, *_)] = row["noun_chunks"]
    assert row["caption"][int(start):int(end)] == "red circle"
    assert summary(tmp_path / "grit")["counts"]["spans_searched"] == 1


def test_each_coco_part_is_a_coco_file_of_its_own(shards):
    from pycocotools.coco import COCO

    dest = shards / "coco"  # written by the pycocotools test above, or now
    if not (dest / "export.json").exists():
        export(shards, "coco", "--format", "coco")
    parts = sorted((dest / "parts").iterdir())
    assert len(parts) == 2
    merged = json.loads((dest / "instances.json").read_text())
    total = 0
    for part in parts:
        coco = COCO(str(part))
        total += len(coco.getAnnIds())
        assert {c["name"] for c in coco.dataset["categories"]} >= {c["name"] for c in merged["categories"]}
    assert total == len(merged["annotations"])
