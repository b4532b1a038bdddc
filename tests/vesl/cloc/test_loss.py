"""L_CLIP, L_CLOC (with near-duplicate negatives masked), L_grounding, and the distributed gather."""

import math

import pytest
import torch

from vesl.cloc.loss import (
    ClocLoss,
    LossConfig,
    clip_loss,
    cloc_loss,
    duplicate_text_mask,
    gather_features,
    grounding_loss,
    info_nce,
)


def test_info_nce_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    assert info_nce(logits).item() == pytest.approx(math.log(1 + math.exp(-2)))
    # asymmetric: the two directions differ and are averaged
    logits = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    rows = (-math.log(math.e / (math.e + 1)) - math.log(1 / (math.e + 1))) / 2
    cols = (-math.log(math.e / (2 * math.e)) - math.log(1 / 2)) / 2
    assert info_nce(logits).item() == pytest.approx((rows + cols) / 2)


def test_clip_loss_uses_the_scale():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert clip_loss(image, image, torch.tensor(3.0)).item() == pytest.approx(math.log(1 + math.exp(-3)))


def test_duplicate_texts_are_masked_by_key_and_by_cosine():
    text = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.05, 1.0], [1.0, 1.0]]), dim=1)
    keys = torch.tensor([7, 8, 9, 7])  # 0 and 3 are the same phrase; 1 and 2 have cosine 0.9988
    mask = duplicate_text_mask(text, keys, 0.9)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[0, 3] = expected[3, 0] = expected[1, 2] = expected[2, 1] = True
    assert torch.equal(mask, expected)
    assert not mask.diagonal().any()  # a pair is never masked from itself


def test_cloc_loss_masks_near_duplicate_negatives_by_hand():
    e = math.e
    region = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    phrase = region.clone()
    keys = torch.tensor([1, 1, 2])  # regions 0 and 1 are both "red circle"
    # logits [[1,1,0],[1,1,0],[0,0,1]]; (0,1) and (1,0) masked; the matrix is symmetric so both
    # directions give the same rows
    masked = (2 * math.log(1 + 1 / e) + math.log(1 + 2 / e)) / 3
    assert cloc_loss(region, phrase, keys, torch.tensor(1.0), 0.9).item() == pytest.approx(masked)
    # without the duplicate (distinct keys, threshold above every cosine) the twin is a negative
    unmasked = (2 * math.log((2 * e + 1) / e) + math.log(1 + 2 / e)) / 3
    assert cloc_loss(region, phrase, torch.tensor([1, 2, 3]), torch.tensor(1.0), 1.0).item() == pytest.approx(unmasked)


def test_no_gradient_flows_through_the_duplicate_check():
    phrase = torch.nn.functional.normalize(torch.randn(5, 8), dim=1).requires_grad_()
    mask = duplicate_text_mask(phrase, torch.arange(5), 0.9)
    assert not mask.requires_grad


def test_grounding_loss_is_squared_l2_mean_over_regions():
    pred = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.1, 0.1, 0.5, 0.5]])
    true = torch.tensor([[0.5, 0.0, 1.0, 1.0], [0.1, 0.1, 0.5, 0.5]])
    assert grounding_loss(pred, true).item() == pytest.approx(0.25 / 2)


def test_total_is_clip_plus_lambda_times_region_terms():
    torch.manual_seed(0)
    out = {"image": torch.randn(3, 4), "text": torch.randn(3, 4), "logit_scale": torch.tensor(math.log(10.0)),
           "region": torch.randn(5, 4), "phrase": torch.randn(5, 4), "pred_box": torch.rand(5, 4)}
    boxes, keys = torch.rand(5, 4), torch.arange(5)
    parts = ClocLoss(LossConfig(region_weight=0.5))(out, boxes, keys)  # L1 + GIoU, weighted 0.25 by default
    assert parts["loss"].item() == pytest.approx(
        (parts["clip"] + 0.5 * (parts["cloc"] + 0.25 * parts["grounding"])).item(), rel=1e-6)
    paper = ClocLoss(LossConfig(region_weight=0.5, grounding_loss="l2"))(out, boxes, keys)  # the paper's: weight 1
    assert paper["grounding"].item() == pytest.approx(grounding_loss(out["pred_box"], boxes, "l2").item())
    assert paper["loss"].item() == pytest.approx(
        (paper["clip"] + 0.5 * (paper["cloc"] + paper["grounding"])).item(), rel=1e-6)
    heavy = ClocLoss(LossConfig(region_weight=0.5, grounding_weight=2.0))(out, boxes, keys)  # a set weight wins
    assert heavy["loss"].item() == pytest.approx(
        (parts["clip"] + 0.5 * (parts["cloc"] + 2.0 * parts["grounding"])).item(), rel=1e-6)
    plain = ClocLoss(LossConfig(region_weight=0.0))(out, boxes, keys)
    assert set(plain) == {"clip", "loss"} and plain["loss"].item() == pytest.approx(parts["clip"].item())


def _gather_worker(rank: int, world: int, port: int, queue) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    rows = 2 if rank == 0 else 3  # ragged: regions per worker differ
    x = torch.full((rows, 2), float(rank + 1), requires_grad=True)
    keys = torch.arange(rows) + 10 * rank
    (gx, gk) = gather_features(x, keys)
    (gx * torch.arange(1, gx.shape[0] + 1).unsqueeze(1)).sum().backward()
    queue.put((rank, gx.detach().tolist(), gk.tolist(), x.grad.tolist()))
    dist.destroy_process_group()


def test_gather_features_concatenates_ragged_rows_with_gradient():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_gather_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = {r: (gx, gk, grad) for r, gx, gk, grad in (queue.get(timeout=60) for _ in procs)}
    for p in procs:
        p.join(timeout=30)
    for rank in (0, 1):
        gx, gk, grad = results[rank]
        assert gx == [[1.0, 1.0]] * 2 + [[2.0, 2.0]] * 3  # rank 0's 2 rows, then rank 1's 3
        assert gk == [0, 1, 10, 11, 12]
    # each rank computes the same global loss; the gather's backward sums both ranks' gradients, so
    # a row's gradient is world_size x its weight in the global loss (DDP then averages over ranks)
    assert results[0][2] == [[2.0, 2.0], [4.0, 4.0]]
    assert results[1][2] == [[6.0, 6.0], [8.0, 8.0], [10.0, 10.0]]


def test_gather_is_identity_without_a_process_group():
    x = torch.randn(3, 2)
    assert gather_features(x)[0] is x


def test_cosine_mask_waits_for_its_step_identical_phrases_never_do():
    # three different phrases whose embeddings are nearly parallel (a text encoder at initialisation)
    phrase = torch.nn.functional.normalize(torch.tensor([[1.0, 0.01], [1.0, 0.02], [1.0, 0.03]]), dim=1)
    keys = torch.tensor([1, 2, 2])  # the last two are the same phrase
    out = {"image": torch.eye(3), "text": torch.eye(3), "logit_scale": torch.tensor(0.0),
           "region": torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), "phrase": phrase, "pred_box": torch.rand(3, 4)}
    loss = ClocLoss(LossConfig(cosine_mask_from_step=10))
    early = loss(out, torch.rand(3, 4), keys, step=3)
    late = loss(out, torch.rand(3, 4), keys, step=10)
    assert early["masked_negatives"].item() == pytest.approx(2 / 6)  # only the identical pair
    assert late["masked_negatives"].item() == pytest.approx(1.0)  # every pair is a near-duplicate
    assert late["cloc"].item() == pytest.approx(0.0, abs=1e-6) and early["cloc"].item() > 0.1


def test_generalized_iou_and_the_l1_giou_loss_by_hand():
    from vesl.cloc.loss import generalized_iou

    a = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.2, 0.2], [0.1, 0.1, 0.3, 0.3]])
    b = torch.tensor([[0.0, 0.0, 0.5, 0.25], [0.5, 0.5, 1.0, 1.0], [0.1, 0.1, 0.3, 0.3]])
    # IoU 0.5 (hull = union); disjoint: 0 - (1 - 0.29) / 1; identical: 1
    assert generalized_iou(a, b).tolist() == pytest.approx([0.5, -(1.0 - 0.29), 1.0], abs=1e-5)
    loss = grounding_loss(a, b, "l1_giou")
    l1 = (a - b).abs().sum(dim=1).mean()
    assert loss.item() == pytest.approx(2 * l1.item() + (1 - torch.tensor([0.5, -0.71, 1.0])).mean().item(), abs=1e-5)
    assert grounding_loss(a, a, "l1_giou").item() == pytest.approx(0.0, abs=1e-5)
    assert grounding_loss(a, b, "l2").item() == pytest.approx(((a - b) ** 2).sum(dim=1).mean().item())
