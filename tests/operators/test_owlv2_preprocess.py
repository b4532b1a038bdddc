"""Our torch OWLv2 preprocessing equals HF's processor (the PIL/SciPy path) on many sizes and shapes."""

import numpy as np
import pytest
import torch

from operators.owlv2_preprocess import (
    Owlv2Preprocess,
    gaussian_weights,
    mirror_indices,
    resample_matrix,
    zoom_axis,
)
from tests.conftest import photo

# Stated tolerance: max |ours - HF| over all normalised pixel values (values span about [-1.8, 2.2]).
TOLERANCE = 1e-4


def hf_processor(side: int):
    from transformers import Owlv2ImageProcessorPil

    return Owlv2ImageProcessorPil(size={"height": side, "width": side})


def test_mirror_indices_follow_scipy():
    from scipy import ndimage

    n = 5
    idx = torch.arange(-7, 12)
    # shifting a ramp by k with mode='mirror' reads sample mirror(i - k)
    ramp = np.arange(n, dtype=np.float64)
    for shift in (-3, -1, 2, 4):
        expected = ndimage.shift(ramp, shift, order=0, mode="mirror")
        got = ramp[mirror_indices(torch.arange(n) - shift, n).numpy()]
        np.testing.assert_array_equal(got, expected)
    assert mirror_indices(idx, 1).tolist() == [0] * len(idx)


@pytest.mark.parametrize("sigma", [0.05, 0.3, 1.0, 2.7])
def test_gaussian_weights_equal_scipy_filter(sigma):
    from scipy import ndimage

    impulse = np.zeros(41)
    impulse[20] = 1.0
    response = ndimage.gaussian_filter1d(impulse, sigma, mode="mirror")
    w = np.asarray(gaussian_weights(sigma))
    r = len(w) // 2
    np.testing.assert_allclose(response[20 - r:21 + r], w, atol=1e-12)
    assert response.sum() == pytest.approx(1.0)


@pytest.mark.parametrize("n, size", [(7, 20), (20, 7), (13, 13), (1, 4), (640, 960), (1024, 960)])
def test_zoom_axis_equals_scipy_zoom(n, size):
    from scipy import ndimage

    rng = np.random.default_rng(n * 31 + size)
    x = rng.random((3, n, 5)).astype(np.float32)
    expected = ndimage.zoom(x, (1, size / n, 1), order=1, mode="mirror", grid_mode=True)
    got = zoom_axis(torch.from_numpy(x), size, 1).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("n, size", [(640, 64), (200, 64), (97, 10)])
def test_resample_matrix_is_scipy_blur_then_zoom(n, size):
    """The one-matmul path (used for strong shrinks) against SciPy's two steps on one axis."""
    from scipy import ndimage

    sigma = (n / size - 1) / 2
    x = np.random.default_rng(n).random((n, 4))
    blurred = ndimage.gaussian_filter1d(x, sigma, axis=0, mode="mirror")
    expected = ndimage.zoom(blurred, (size / n, 1), order=1, mode="mirror", grid_mode=True)
    got = resample_matrix(n, size, sigma, "cpu").double().numpy() @ x
    np.testing.assert_allclose(got, expected, atol=1e-6)


# landscape, portrait, square, tiny, extreme strips, sizes above and below the target (blur on and off)
SIZES = [(640, 480), (480, 640), (300, 300), (3, 2), (1, 1), (500, 7), (9, 400), (1024, 683),
         (2000, 1500), (1500, 2600), (961, 960), (96, 48), (40, 120)]


@pytest.mark.parametrize("side", [64, 960])
@pytest.mark.parametrize("width, height", SIZES)
def test_equals_hf_processor(side, width, height):
    if side == 64 and max(width, height) > 1100:
        pytest.skip("covered at 960")
    image = np.asarray(photo(width, height, seed=width * 7 + height))
    processor = hf_processor(side)
    expected = processor(images=[image], return_tensors="pt", input_data_format="channels_last")["pixel_values"]
    got = Owlv2Preprocess(processor)([image])
    assert got.shape == expected.shape == (1, 3, side, side)
    assert torch.max(torch.abs(got - expected)).item() < TOLERANCE


def test_batch_of_mixed_sizes_keeps_order_and_dtype():
    images = [np.asarray(photo(w, h, seed=i)) for i, (w, h) in enumerate([(50, 30), (30, 50), (64, 64)])]
    processor = hf_processor(64)
    expected = processor(images=images, return_tensors="pt", input_data_format="channels_last")["pixel_values"]
    got = Owlv2Preprocess(processor, dtype=torch.bfloat16)(images)
    assert got.dtype == torch.bfloat16 and got.shape == (3, 3, 64, 64)
    assert torch.max(torch.abs(got.float() - expected)).item() < 0.02  # bf16 rounding of values up to ~2.2


def test_refuses_what_it_does_not_implement():
    from transformers import Owlv2ImageProcessorPil

    with pytest.raises(ValueError, match="pad-to-square"):
        Owlv2Preprocess(Owlv2ImageProcessorPil(size={"height": 64, "width": 64}, do_pad=False))
    with pytest.raises(ValueError, match="uint8"):
        Owlv2Preprocess(hf_processor(64))([np.zeros((4, 4, 3), dtype=np.float32)])
