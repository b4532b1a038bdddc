"""OWLv2 boxes mean the same thing as HF's reference post-processing, on non-square images."""

import numpy as np
import pytest
import torch

from operators.detect import (
    DetectConfig,
    DetectRegions,
    box_iou,
    nms,
    normalise_to_image,
    padded_square_boxes_to_original,
    select_regions,
)
from tests.conftest import photo

SIZES = [(96, 48), (40, 120), (77, 31), (64, 64)]


@pytest.fixture(scope="module")
def hf(tiny_dir):
    from transformers import Owlv2ForObjectDetection, Owlv2Processor

    processor = Owlv2Processor.from_pretrained(tiny_dir / "detector")
    model = Owlv2ForObjectDetection.from_pretrained(tiny_dir / "detector").eval()
    return processor, model


@pytest.fixture(scope="module")
def detector(tiny_dir):
    return DetectRegions(DetectConfig(model=str(tiny_dir / "detector"), threshold=0.0, min_box_pixels=0.0))


@pytest.mark.parametrize("width, height", SIZES)
def test_pixel_boxes_equal_hf_post_processing(hf, width, height):
    processor, model = hf
    queries = [["red sofa", "cat", "white helmet"]]
    inputs = processor(text=queries, images=photo(width, height, seed=width), return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
    ref = processor.post_process_grounded_object_detection(out, threshold=0.2, target_sizes=[(height, width)],
                                                           text_labels=queries)[0]
    ours = padded_square_boxes_to_original(out.pred_boxes[0].numpy(), width, height)
    scores = torch.sigmoid(out.logits[0].max(-1).values).numpy()
    kept = np.flatnonzero(scores > 0.2)
    assert len(kept) == len(ref["boxes"]) > 0
    np.testing.assert_allclose(ours[kept], ref["boxes"].numpy(), atol=1e-3)


@pytest.mark.parametrize("width, height", SIZES)
def test_detector_regions_are_hf_boxes_clipped_and_normalised(hf, detector, width, height):
    """The whole stage (our query tensors, our masking, our selection) against HF's path."""
    processor, model = hf
    phrases = ["red sofa", "cat", "white helmet"]
    image = photo(width, height, seed=width)
    inputs = processor(text=[phrases], images=image, return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
    ref = processor.post_process_grounded_object_detection(out, threshold=0.0, target_sizes=[(height, width)])[0]
    expected = []
    for box, score, label in zip(ref["boxes"].numpy(), ref["scores"].numpy(), ref["labels"].numpy()):
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        if 0 <= cx < width and 0 <= cy < height:  # a box centred in the padding is not on the image
            clipped = np.clip(box, 0, [width, height, width, height]) / [width, height, width, height]
            if clipped[2] > clipped[0] and clipped[3] > clipped[1]:
                expected.append([*clipped, label, score])
    regions = detector.detect([np.asarray(image)], [phrases])[0]
    got = [[*box, q, s] for box, q, s in regions]
    assert len(got) == len(expected) > 0
    order = lambda rows: np.array(sorted(rows, key=lambda r: (-r[5], r[0], r[1])))  # noqa: E731
    np.testing.assert_allclose(order(got), order(expected), atol=1e-4)
    assert all(0 <= b[0] < b[2] <= 1 and 0 <= b[1] < b[3] <= 1 for b, _, _ in regions)


def test_ragged_queries_padding_never_wins_and_changes_nothing(detector):
    images = [np.asarray(photo(80, 40, seed=1)), np.asarray(photo(50, 90, seed=2))]
    queries = [["cat"], ["red sofa", "cat", "white helmet", "flag"]]
    unique, index = detector.query_index(queries)
    assert unique == ["cat", "flag", "red sofa", "white helmet"]
    assert index.tolist() == [[0, -1, -1, -1], [2, 0, 3, 1]]
    together = detector.detect(images, queries)
    alone = detector.detect(images[:1], queries[:1])
    assert all(q == 0 for _, q, _ in together[0])
    assert [(q, round(s, 5)) for _, q, s in together[0]] == [(q, round(s, 5)) for _, q, s in alone[0]]
    assert detector.detect(images, [[], []]) == [[], []]


def test_each_phrase_is_encoded_once(tiny_dir, monkeypatch):
    detector = DetectRegions(DetectConfig(model=str(tiny_dir / "detector"), threshold=0.0, text_cache_size=2))
    seen = []
    encode = detector.model.owlv2.get_text_features

    def spy(input_ids, attention_mask):
        seen.append(input_ids.shape[0])
        return encode(input_ids=input_ids, attention_mask=attention_mask)

    monkeypatch.setattr(detector.model.owlv2, "get_text_features", spy)
    images = [np.asarray(photo(40, 30, seed=i)) for i in range(3)]
    first = detector.detect(images, [["cat", "dog"], ["dog", "cat"], ["cat"]])
    assert seen == [2]  # one call, two distinct phrases, for six query slots
    again = detector.detect(images, [["cat", "dog"], ["dog", "cat"], ["cat"]])
    assert seen == [2] and _same(again, first)  # cached: no new text forward, same regions
    detector.detect(images[:1], [["bird", "cat"]])  # cache holds 2: "bird" new, "dog" evicted
    assert seen == [2, 1] and list(detector._text_cache) == ["bird", "cat"]


def _same(a, b):
    return all(len(x) == len(y) and all(np.allclose(p[0], q[0]) and p[1:] == q[1:] for p, q in zip(x, y))
               for x, y in zip(a, b))


def test_torch_and_hf_preprocessing_give_the_same_boxes(tiny_dir):
    """The detector's output with our preprocessing equals its output with HF's, within 1e-3."""
    fast = DetectRegions(DetectConfig(model=str(tiny_dir / "detector"), threshold=0.0, min_box_pixels=0.0))
    slow = DetectRegions(DetectConfig(model=str(tiny_dir / "detector"), threshold=0.0, min_box_pixels=0.0,
                                      preprocess="hf"))
    assert fast.preprocess is not None and slow.preprocess is None
    images = [np.asarray(photo(w, h, seed=w)) for w, h in [(640, 480), (97, 300), (1024, 683), (20, 20)]]
    queries = [["red sofa", "cat"], ["cat"], ["white helmet", "flag", "cat"], ["flag"]]
    for got, ref in zip(fast.detect(images, queries), slow.detect(images, queries)):
        assert len(got) == len(ref) > 0
        assert [q for _, q, _ in got] == [q for _, q, _ in ref]
        np.testing.assert_allclose(np.array([b for b, _, _ in got]), np.array([b for b, _, _ in ref]), atol=1e-3)
        np.testing.assert_allclose([s for _, _, s in got], [s for _, _, s in ref], atol=1e-3)


def test_boxes_in_the_padding_are_dropped_and_others_clipped():
    # 100 x 50 image: the padded square is 100 x 100, its lower half is padding.
    boxes = np.array([[0.5, 0.75, 0.2, 0.2],    # centred in the padding -> dropped
                      [0.5, 0.45, 0.2, 0.2],    # crosses into the padding -> clipped at y = 50
                      [0.05, 0.1, 0.2, 0.1]])   # crosses the left edge -> clipped at x = 0
    pixels = padded_square_boxes_to_original(boxes, 100, 50)
    np.testing.assert_allclose(pixels[1], [40, 35, 60, 55])
    norm, valid = normalise_to_image(pixels, 100, 50)
    assert valid.tolist() == [False, True, True]
    np.testing.assert_allclose(norm[1], [0.4, 0.7, 0.6, 1.0], atol=1e-6)
    np.testing.assert_allclose(norm[2], [0.0, 0.1, 0.15, 0.3], atol=1e-6)


def test_select_regions_threshold_top_k_and_labels():
    scores = np.array([0.953, 0.731, 0.047])
    best = np.array([0, 1, 1])
    boxes = np.array([[0.25, 0.25, 0.2, 0.2], [0.6, 0.6, 0.2, 0.2], [0.5, 0.5, 0.1, 0.1]])
    got = select_regions(scores, best, boxes, width=100, height=100, threshold=0.1)
    assert [(q, round(s, 3)) for _, q, s in got] == [(0, 0.953), (1, 0.731)]
    assert len(select_regions(scores, best, boxes, 100, 100, threshold=0.1, top_k=1)) == 1
    assert select_regions(scores, best, boxes, 100, 100, threshold=0.99) == []


def test_nms_keeps_the_best_of_overlapping_boxes():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]], dtype=float)
    assert box_iou(boxes[:1], boxes[1:2])[0, 0] == pytest.approx(81 / 100)
    assert nms(boxes, np.array([0.9, 0.95, 0.5]), iou=0.5).tolist() == [1, 2]
    assert nms(boxes, np.array([0.9, 0.95, 0.5]), iou=0.9).tolist() == [1, 0, 2]


def test_stage_adds_regions_and_leaves_the_working_copy_behind(detector):
    import pyarrow as pa

    from operators.decode import DecodeImages
    from tests.conftest import encode

    table = DecodeImages()(pa.table({"image_id": ["a", "b", "c"],
                                     "image_bytes": [encode(photo(90, 60, seed=s)) for s in range(3)]}))
    assert "pixels" in table.column_names
    table = table.append_column("phrases", pa.array([["cat", "red sofa"], [], ["flag"]]))
    table = table.append_column("phrase_sources", pa.array([["caption", "alt_text"], [], ["caption"]]))
    table = table.append_column("phrase_spans", pa.array([[[[0, 3]], [[4, 12]]], [], [[[0, 4], [9, 13]]]]))
    from operators.registry import drops_after

    detector.drop = drops_after()["detect"]  # what the wiring hands the detect stage
    try:
        out = detector(table)
    finally:
        detector.drop = ()
    assert "pixels" not in out.column_names  # not carried to the writer
    regions = out.column("regions").to_pylist()
    assert regions[1] == [] and len(regions[0]) > 0 and {r["phrase"] for r in regions[0]} <= {"cat", "red sofa"}
    spans = {"cat": [[0, 3]], "red sofa": [[4, 12]], "flag": [[0, 4], [9, 13]]}
    assert all(r["spans"] == spans[r["phrase"]] for rs in regions for r in rs)  # each region keeps its phrase's
    assert out.column("reject_stage").to_pylist() == [None, None, None]
