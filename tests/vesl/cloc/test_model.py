"""The Prompter: box encoding, shapes, box-dependence; the CLOC model on a tiny CLIP; RoI baseline."""

import math

import pytest
import torch

from vesl.cloc.model import (
    ClocModel,
    GroundingHead,
    Prompter,
    PrompterConfig,
    patch_centres,
    roi_pool_embeddings,
    sinusoidal_encoding,
)


def test_sinusoidal_encoding_layout_and_values():
    code = sinusoidal_encoding(torch.tensor([[0.0, 0.5]]), frequencies=3, max_frequency=4.0)
    assert code.shape == (1, 12)
    freqs = [1.0, 2.0, 4.0]  # geometric from 1 to max_frequency
    x_sin, x_cos, y_sin, y_cos = code[0, :3], code[0, 3:6], code[0, 6:9], code[0, 9:]
    assert torch.allclose(x_sin, torch.zeros(3), atol=1e-6) and torch.allclose(x_cos, torch.ones(3))
    assert torch.allclose(y_sin, torch.tensor([math.sin(2 * math.pi * f * 0.5) for f in freqs]), atol=1e-6)
    assert torch.allclose(y_cos, torch.tensor([math.cos(2 * math.pi * f * 0.5) for f in freqs]), atol=1e-6)


def test_box_prompts_are_two_corner_tokens_that_tell_boxes_apart():
    torch.manual_seed(0)
    prompter = Prompter(width=32, embed_dim=16, config=PrompterConfig(frequencies=8))
    boxes = torch.tensor([[0.1, 0.2, 0.5, 0.6], [0.1, 0.2, 0.5, 0.7], [0.1, 0.2, 0.5, 0.6]])
    prompts = prompter.box_prompts(boxes)
    assert prompts.shape == (3, 2, 32)
    # equal up to GEMM rounding (a batched matmul may treat rows in different kernel tails)
    assert torch.allclose(prompts[0], prompts[2], atol=1e-6)
    assert torch.allclose(prompts[0, 0], prompts[1, 0], atol=1e-6)  # same top-left corner
    assert not torch.allclose(prompts[0, 1], prompts[1, 1])  # different bottom-right corner
    # the two corners' roles differ even for the same point
    same_point = prompter.box_prompts(torch.tensor([[0.3, 0.3, 0.3, 0.3]]))
    assert not torch.allclose(same_point[0, 0], same_point[0, 1])


def test_prompter_shapes_and_box_dependence():
    torch.manual_seed(0)
    prompter = Prompter(width=32, embed_dim=16).eval()
    patches = torch.randn(2, 16, 32)  # two images, a 4x4 patch grid
    image_index = torch.tensor([0, 0, 1])
    boxes = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.0, 0.0, 0.5, 0.5]])
    pooled = prompter(patches, image_index, prompter.box_prompts(boxes))
    assert pooled.shape == (3, 32)
    assert prompter.project(pooled).shape == (3, 16)
    assert not torch.allclose(pooled[0], pooled[1])  # same image, other box
    assert not torch.allclose(pooled[0], pooled[2])  # same box, other image
    text = prompter.text_prompts(torch.randn(3, 16))
    assert text.shape == (3, 1, 32)
    assert prompter(patches, image_index, text).shape == (3, 32)


def test_region_pool_prompt_reads_only_the_corner_tokens_all_reads_every_token():
    torch.manual_seed(0)
    patches, image_index = torch.randn(1, 16, 32), torch.tensor([0])
    boxes = torch.tensor([[0.1, 0.2, 0.6, 0.9]])
    for pool in ("prompt", "all"):
        prompter = Prompter(width=32, embed_dim=16, config=PrompterConfig(region_pool=pool)).eval()
        tokens = prompter.encode(patches, image_index, prompter.box_prompts(boxes))
        expected = tokens[:, :2].mean(dim=1) if pool == "prompt" else tokens.mean(dim=1)
        assert torch.allclose(prompter(patches, image_index, prompter.box_prompts(boxes)), expected)
    assert not torch.allclose(tokens[:, :2].mean(dim=1), tokens.mean(dim=1))


def test_grounding_head_predicts_a_box_in_unit_range():
    head = GroundingHead(32)
    layers = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert len(layers) == 2 and isinstance(head.mlp[1], torch.nn.GELU)
    out = head(torch.randn(5, 7, 32) * 10)  # 5 prompts' Prompter outputs: a text token and 6 patches
    assert out.shape == (5, 4) and (out >= 0).all() and (out <= 1).all()


def test_patch_centres_are_row_major():
    assert patch_centres(2).tolist() == [[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]]


@pytest.fixture(scope="module")
def cloc(tiny_dir):
    from transformers import CLIPModel

    torch.manual_seed(0)
    return ClocModel(CLIPModel.from_pretrained(tiny_dir / "clip")).eval()


def test_cloc_forward_on_a_tiny_clip(cloc):
    size = cloc.clip.config.vision_config.image_size
    pixels = torch.randint(0, 256, (2, size, size, 3), dtype=torch.uint8)
    ids = torch.randint(0, 100, (2, 8))
    out = cloc(pixels, ids, torch.ones_like(ids), image_index=torch.tensor([0, 1, 1]),
               boxes=torch.tensor([[0.1, 0.1, 0.4, 0.4], [0.0, 0.5, 1.0, 1.0], [0.2, 0.2, 0.3, 0.9]]),
               phrase_ids=torch.randint(0, 100, (3, 6)), phrase_mask=torch.ones(3, 6, dtype=torch.long))
    e = cloc.clip.config.projection_dim
    assert out["image"].shape == (2, e) and out["text"].shape == (2, e)
    assert out["region"].shape == (3, e) and out["phrase"].shape == (3, e)
    assert out["pred_box"].shape == (3, 4)
    # the patch tokens the Prompter reads: the ViT's tokens before pooling, CLS dropped
    _, patches = cloc.encode_image(pixels)
    grid = size // cloc.clip.config.vision_config.patch_size
    assert patches.shape == (2, grid * grid, cloc.clip.config.vision_config.hidden_size)
    # without regions only the CLIP part runs
    assert set(cloc(pixels, ids, torch.ones_like(ids))) == {"image", "text", "logit_scale"}


def test_roi_pool_averages_the_patches_inside_the_box(cloc):
    width = cloc.clip.config.vision_config.hidden_size
    patches = torch.randn(1, 16, width)  # a 4x4 grid
    # this box holds the centres of patches 0, 1, 4, 5 (the top-left quarter)
    box = torch.tensor([[0.0, 0.0, 0.5, 0.5]])
    got = roi_pool_embeddings(cloc, patches, torch.tensor([0]), box)
    mean = patches[0, [0, 1, 4, 5]].mean(dim=0, keepdim=True)
    want = cloc.clip.visual_projection(cloc.clip.vision_model.post_layernorm(mean))
    assert torch.allclose(got, want, atol=1e-5)
    # a box too small to hold any centre takes the patch nearest its centre
    tiny = torch.tensor([[0.9, 0.9, 0.95, 0.95]])
    want = cloc.clip.visual_projection(cloc.clip.vision_model.post_layernorm(patches[0, [15]]))
    assert torch.allclose(roi_pool_embeddings(cloc, patches, torch.tensor([0]), tiny), want, atol=1e-5)


def test_a_batch_without_regions_trains_on_the_image_text_loss_alone(cloc):
    """No region in the batch: the region outputs are empty, the loss is L_CLIP exactly, and every
    parameter still gets a (zero, for the region branch) gradient, so DDP sees its usual graph."""
    from vesl.cloc.config import load_train_config
    from vesl.cloc.loss import ClocLoss

    size = cloc.clip.config.vision_config.image_size
    torch.manual_seed(1)
    pixels = torch.randint(0, 256, (3, size, size, 3), dtype=torch.uint8)
    ids = torch.randint(0, 100, (3, 8))
    cloc.train()
    try:
        out = cloc(pixels, ids, torch.ones_like(ids), image_index=torch.zeros(0, dtype=torch.long),
                   boxes=torch.zeros(0, 4), phrase_ids=torch.zeros(0, 6, dtype=torch.long),
                   phrase_mask=torch.zeros(0, 6, dtype=torch.long))
        assert out["region"].shape == (0, cloc.clip.config.projection_dim) and out["pred_box"].shape == (0, 4)
        loss = ClocLoss(load_train_config(None, "tiny", []).loss)
        parts = loss(out, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
        assert parts["cloc"].item() == 0.0 and parts["grounding"].item() == 0.0
        assert torch.isfinite(parts["clip"]) and parts["loss"].item() == pytest.approx(parts["clip"].item())
        cloc.zero_grad(set_to_none=True)
        parts["loss"].backward()
        missing = [n for n, p in cloc.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, missing
        assert all(float(p.grad.abs().sum()) == 0.0 for p in cloc.prompter.parameters())
        assert any(float(p.grad.abs().sum()) > 0 for p in cloc.clip.parameters())
    finally:
        cloc.zero_grad(set_to_none=True)
        cloc.eval()


def test_the_attending_head_averages_patch_boxes_by_the_text_token_score():
    from vesl.cloc.model import AttendGroundingHead

    torch.manual_seed(0)
    head = AttendGroundingHead(16)
    tokens = torch.randn(3, 1 + 16, 16)  # a text token, then a 4 x 4 grid of patches
    out = head(tokens)
    assert out.shape == (3, 4) and (out >= 0).all() and (out <= 1).all()
    assert (out[:, 0] < out[:, 2]).all() and (out[:, 1] < out[:, 3]).all()
    # at initialisation each patch proposes the box one patch around its centre; make one patch win
    with torch.no_grad():
        head.query.weight.zero_()
        head.query.bias.fill_(1.0)
        head.key.weight.copy_(torch.eye(16) * 50)
        head.key.bias.zero_()
    keyed = torch.zeros(1, 17, 16)
    keyed[0, 1 + 5, :] = 1.0  # only patch 5's key is not zero: its score is highest by far
    cx, cy = patch_centres(4)[5].tolist()  # patch (1, 1)
    assert head(keyed)[0].tolist() == pytest.approx([cx - 0.25, cy - 0.25, cx + 0.25, cy + 0.25], abs=1e-3)


def test_a_checkpoint_that_does_not_record_its_prompter_settings_is_refused(tiny_dir, tmp_path):
    import json

    from transformers import AutoProcessor, CLIPModel

    from vesl.cloc.checkpoint import META, load_cloc, save_checkpoint
    from vesl.cloc.model import PrompterConfig

    model = ClocModel(CLIPModel.from_pretrained(tiny_dir / "clip"), PrompterConfig(grounding="pooled"))
    save_checkpoint(tmp_path / "ck", model, AutoProcessor.from_pretrained(tiny_dir / "clip"), {"step": 1})
    meta = json.loads((tmp_path / "ck" / META).read_text())
    del meta["prompter"]["grounding"], meta["prompter"]["region_pool"]  # as written before the choices existed
    (tmp_path / "ck" / META).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"earlier vesl.*\['grounding', 'region_pool'\].*train it again"):
        load_cloc(tmp_path / "ck")
