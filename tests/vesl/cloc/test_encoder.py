"""RegionEncoder: the trained model as a library (tiny CLIP, random Prompter: the numbers mean nothing,
the plumbing is what is checked)."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from tests.conftest import encode, photo


@pytest.fixture
def checkpoint(tiny_dir, tmp_path):
    from transformers import AutoProcessor, CLIPModel

    from vesl.cloc.checkpoint import save_checkpoint
    from vesl.cloc.model import ClocModel

    torch.manual_seed(3)
    model = ClocModel(CLIPModel.from_pretrained(tiny_dir / "clip")).eval()
    with torch.no_grad():
        for p in model.prompter.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # not the initial values: the files must carry them
    return save_checkpoint(tmp_path / "ck", model, AutoProcessor.from_pretrained(tiny_dir / "clip"), {"step": 7})


def test_save_then_load_gives_the_same_embeddings(checkpoint, tmp_path):
    from vesl.cloc import RegionEncoder

    enc = RegionEncoder.from_pretrained(checkpoint, device="cpu")
    image = photo(90, 60, seed=2)
    boxes = [[5, 5, 60, 50], [30, 10, 90, 60]]
    a = (enc.embed_regions(image, boxes), enc.embed_images([image, photo(40, 80, seed=3)]),
         enc.embed_texts(["a red car", "a dog"]), enc.ground(image, ["a red car"]))
    enc.save_pretrained(tmp_path / "again")
    back = RegionEncoder.from_pretrained(tmp_path / "again", device="cpu")
    b = (back.embed_regions(image, boxes), back.embed_images([image, photo(40, 80, seed=3)]),
         back.embed_texts(["a red car", "a dog"]), back.ground(image, ["a red car"]))
    for x, y in zip(a[:3], b[:3]):
        assert torch.allclose(x, y, atol=1e-6)
    assert np.allclose(a[3], b[3], atol=1e-5) and back.meta["step"] == 7
    assert a[0].shape == (2, enc.model.clip.config.projection_dim)
    assert torch.allclose(a[0].norm(dim=1), torch.ones(2), atol=1e-5)  # unit norm
    assert not torch.allclose(a[0][0], a[0][1])  # two boxes, two regions


def test_embed_regions_agrees_with_what_vesl_eval_computes_for_the_same_boxes(checkpoint):
    from vesl.cloc import RegionEncoder
    from vesl.cloc.checkpoint import CLIP_DIR
    from vesl.cloc.data import DataConfig, prepare_batch
    from vesl.cloc.evaluate import embed_regions

    enc = RegionEncoder.from_pretrained(checkpoint, device="cpu")
    images = [encode(photo(120, 80, seed=5)), encode(photo(1500, 900, seed=6))]  # the second is scaled down first
    boxes = [[[0.1, 0.1, 0.5, 0.6], [0.4, 0.2, 0.9, 0.9]], [[0.0, 0.0, 1.0, 1.0]]]
    rows = [{"image_id": f"i{k}", "image_bytes": data, "caption": "a photo",
             "regions": [{"phrase": f"thing {j}", "box": b, "score": 0.9 - 0.1 * j, "source": "caption"}
                         for j, b in enumerate(bs)]} for k, (data, bs) in enumerate(zip(images, boxes))]
    batch = prepare_batch(pa.Table.from_pylist(rows), tokenizer=f"{enc.meta['path']}/{CLIP_DIR}", revision=None,
                          image_size=enc.image_size, caption_max_tokens=enc.max_tokens, config=DataConfig())
    from_eval = embed_regions(enc.model, [batch], "cpu", baseline=False, limit=None)["embeds"]
    pil = [Image.open(io.BytesIO(d)) for d in images]
    ours = enc.embed_regions(pil, boxes, normalized=True)
    assert torch.allclose(ours, from_eval, atol=1e-5)
    in_pixels = enc.embed_regions(pil, [[[b[0] * 120, b[1] * 80, b[2] * 120, b[3] * 80] for b in boxes[0]],
                                        [[0, 0, 1500, 900]]])
    assert torch.allclose(in_pixels, from_eval, atol=1e-5)  # pixels of the image given = the same boxes


def test_ground_returns_boxes_in_each_images_pixels(checkpoint):
    from vesl.cloc import RegionEncoder

    enc = RegionEncoder.from_pretrained(checkpoint, device="cpu")
    wide, tall = photo(300, 100, seed=1), photo(50, 200, seed=2)
    found = enc.ground([wide, tall], [["a red car", "a dog"], ["a cat"]])
    assert [f.shape for f in found] == [(2, 4), (1, 4)]
    for (w, h), boxes in zip([(300, 100), (50, 200)], found):
        assert (boxes[:, [0, 2]] >= 0).all() and (boxes[:, [0, 2]] <= w).all()
        assert (boxes[:, [1, 3]] >= 0).all() and (boxes[:, [1, 3]] <= h).all()
    # the same prediction as the head's normalised box, scaled by the image's own size
    _, patches = enc._patches([enc.pixels(tall)[0]])
    with torch.no_grad():
        norm = enc.model.ground(patches, torch.tensor([0]), enc._text_embeds(["a cat"])).numpy()
    assert np.allclose(found[1], norm * np.array([50, 200, 50, 200]), atol=1e-4)
    assert enc.ground(wide, ["a red car", "a dog"]).shape == (2, 4)  # one image alone: an array


def test_classify_regions_picks_the_most_similar_class_and_checks_its_inputs(checkpoint):
    from vesl.cloc import RegionEncoder

    enc = RegionEncoder.from_pretrained(checkpoint, device="cpu")
    image = np.asarray(photo(64, 64, seed=4))  # an array works like a PIL image
    names, similarity = enc.classify_regions(image, [[0, 0, 32, 32], [10, 10, 60, 60]], ["car", "dog", "cat"])
    regions = enc.embed_regions(image, [[0, 0, 32, 32], [10, 10, 60, 60]])
    classes = enc.embed_texts(["a photo of a car.", "a photo of a dog.", "a photo of a cat."])
    assert torch.allclose(similarity, regions @ classes.T, atol=1e-6)
    assert names == [["car", "dog", "cat"][int(k)] for k in similarity.argmax(dim=1)]
    with pytest.raises(ValueError, match="x0 < x1"):
        enc.embed_regions(image, [[30, 0, 10, 20]])
    with pytest.raises(ValueError, match="2 image"):
        enc.embed_regions([image, image], [[[0, 0, 5, 5]]])
    with pytest.raises(TypeError, match="PIL image"):
        enc.embed_images(["not an image"])
