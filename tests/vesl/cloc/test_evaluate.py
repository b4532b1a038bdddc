"""Evaluation maths by hand, the class list format, and the checkpoint round trip."""

import json

import numpy as np
import pytest
import torch

from vesl.cloc.evaluate import box_iou, class_accuracy, load_classes, recall_at


def test_mean_of_per_class_accuracy_not_overall_accuracy():
    true = np.array([0, 0, 0, 0, 1, 1])
    pred = np.array([0, 0, 0, 0, 0, 0])  # right on the 4 of class 0, wrong on the 2 of class 1
    macc, per_class = class_accuracy(true, pred, 3)
    assert per_class == {0: 1.0, 1: 0.0}  # class 2 is absent from the set: not averaged in
    assert macc == pytest.approx(0.5)  # overall accuracy would be 4/6


def test_recall_at_k():
    similarity = np.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.8]])
    relevant = np.array([[False, False, True], [True, False, False]])  # ranks 2 and 3
    r = recall_at(similarity, relevant, ks=(1, 2, 3))
    assert r == {"R@1": 0.0, "R@2": 0.5, "R@3": 1.0}


def test_box_iou_by_hand():
    a = np.array([[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.2, 0.2], [0.1, 0.1, 0.3, 0.3]])
    b = np.array([[0.0, 0.0, 0.5, 0.25], [0.5, 0.5, 1.0, 1.0], [0.1, 0.1, 0.3, 0.3]])
    assert box_iou(a, b).tolist() == pytest.approx([0.5, 0.0, 1.0])


def test_class_list_or_synonym_mapping(tmp_path):
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps(["Red Circle", "dog"]))
    assert load_classes(str(listed)) == {"red circle": "Red Circle", "dog": "dog"}
    mapped = tmp_path / "map.json"
    mapped.write_text(json.dumps({"dog": ["puppy", "small  Dog"], "cat": []}))
    assert load_classes(str(mapped)) == {"dog": "dog", "puppy": "dog", "small dog": "dog", "cat": "cat"}
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(ValueError):
        load_classes(str(empty))


def test_checkpoint_round_trip_gives_the_same_embeddings(tiny_dir, tmp_path):
    from transformers import AutoProcessor, CLIPModel

    from vesl.cloc.checkpoint import load_cloc, save_checkpoint
    from vesl.cloc.model import ClocModel

    torch.manual_seed(1)
    model = ClocModel(CLIPModel.from_pretrained(tiny_dir / "clip")).eval()
    with torch.no_grad():
        model.prompter.corner_type.add_(1.0)  # not the initial values: the file must carry them
    save_checkpoint(tmp_path / "ck", model, AutoProcessor.from_pretrained(tiny_dir / "clip"), {"step": 3})
    loaded, meta = load_cloc(tmp_path / "ck")
    assert meta["step"] == 3 and meta["format"] == "vesl-cloc"
    pixels = torch.randint(0, 256, (1, 64, 64, 3), dtype=torch.uint8)
    boxes = torch.tensor([[0.1, 0.2, 0.6, 0.9]])
    with torch.no_grad():
        a = model.region_embeddings(model.encode_image(pixels)[1], torch.tensor([0]), boxes)
        b = loaded.region_embeddings(loaded.encode_image(pixels)[1], torch.tensor([0]), boxes)
    assert torch.allclose(a, b, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="not a vesl CLOC checkpoint"):
        load_cloc(tmp_path)
