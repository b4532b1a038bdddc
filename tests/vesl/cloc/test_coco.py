"""`vesl eval --coco`: region recognition on a COCO-format file equals the shard-based evaluation of the
same scenes; crowd annotations and empty boxes are left out."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch


@pytest.fixture
def checkpoint(tiny_dir, tmp_path):
    from transformers import AutoProcessor, CLIPModel

    from vesl.cloc.checkpoint import save_checkpoint
    from vesl.cloc.model import ClocModel

    torch.manual_seed(5)
    model = ClocModel(CLIPModel.from_pretrained(tiny_dir / "clip")).eval()
    return save_checkpoint(tmp_path / "ck", model, AutoProcessor.from_pretrained(tiny_dir / "clip"), {"step": 1})


def shapes_as_coco(shapes: Path, out: Path) -> Path:
    """The synthetic scenes' shards as a COCO instances file (bbox in pixels), plus a crowd annotation
    and a zero-area box that must be left out."""
    from vesl.cloc.synthetic import CLASSES

    rows = pq.read_table(shapes / "data").to_pylist()
    categories = [{"id": k + 1, "name": name.replace(" ", "_") if k % 2 else name, "supercategory": "shape"}
                  for k, name in enumerate(CLASSES)]  # LVIS-style underscores in half of them
    ids = {name: k + 1 for k, name in enumerate(CLASSES)}
    images, annotations = [], []
    for i, row in enumerate(rows):
        images.append({"id": i + 10, "file_name": Path(row["image_uri"]).name, "width": row["width"],
                       "height": row["height"]})
        for region in row["regions"]:
            x0, y0, x1, y1 = (v * s for v, s in zip(region["box"], [row["width"], row["height"]] * 2))
            annotations.append({"id": len(annotations) + 1, "image_id": i + 10, "category_id": ids[region["phrase"]],
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
    annotations.append({"id": 9001, "image_id": 10, "category_id": 1, "bbox": [0, 0, 64, 64], "area": 4096,
                        "iscrowd": 1})
    annotations.append({"id": 9002, "image_id": 11, "category_id": 2, "bbox": [5, 5, 0, 9], "area": 0, "iscrowd": 0})
    out.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return out


def test_coco_mAcc_equals_the_shard_evaluation_of_the_same_scenes(checkpoint, tmp_path):
    from vesl.cloc.coco import evaluate_coco
    from vesl.cloc.evaluate import evaluate
    from vesl.cloc.synthetic import write_shapes_dataset

    write_shapes_dataset(tmp_path / "shapes", images=24, seed=3, embed_images=False)
    instances = shapes_as_coco(tmp_path / "shapes", tmp_path / "instances.json")
    template = "a photo of a {}."
    shards = evaluate(str(tmp_path / "shapes"), str(checkpoint), str(tmp_path / "shapes" / "classes.json"),
                      template=template, device="cpu")
    coco = evaluate_coco(str(instances), str(tmp_path / "shapes" / "images"), str(checkpoint), template=template,
                         device="cpu")
    assert coco["regions"] == shards["regions"] == shards["regions_with_class"]  # the crowd box is not a region
    assert coco["dataset"]["annotations_ignored"] == 2
    assert coco["mAcc"] == pytest.approx(shards["mAcc"], abs=1e-9)
    assert coco["per_class_acc"] == pytest.approx(shards["per_class_acc"], abs=1e-9)
    assert coco["classes"] == 12 and coco["images"] == 24
    few = evaluate_coco(str(instances), str(tmp_path / "shapes" / "images"), str(checkpoint), max_images=5,
                        device="cpu")
    assert few["images"] == 5 and few["dataset"]["images_used"] == 5


def test_the_eval_command_takes_coco_or_shards_and_refuses_a_mix(checkpoint, tmp_path, capsys):
    from vesl.cli import main
    from vesl.cloc.synthetic import write_shapes_dataset

    write_shapes_dataset(tmp_path / "shapes", images=6, seed=4, embed_images=False)
    instances = shapes_as_coco(tmp_path / "shapes", tmp_path / "instances.json")
    assert main(["eval", "--coco", str(instances), "--images", str(tmp_path / "shapes" / "images"),
                 "--checkpoint", str(checkpoint), "--max-images", "3", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 3 and 0.0 <= result["mAcc"] <= 1.0
    assert main(["eval", "--coco", str(instances), "--checkpoint", str(checkpoint)]) == 2  # no --images
    assert "give SHARDS with --classes, or --coco" in capsys.readouterr().err
