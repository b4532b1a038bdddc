"""OWLv2 image preprocessing in torch, on whatever device the detector runs on.

Hugging Face's processor without torchvision (`Owlv2ImageProcessorPil`) does, per image, in NumPy and
SciPy on one CPU core: rescale to [0, 1], pad to a square (bottom and right, value 0), Gaussian
anti-aliasing blur (sigma = max(0, (factor - 1) / 2) per axis, truncated at 4 sigma, 'mirror'
boundary), linear resize on the pixel-area grid (`scipy.ndimage.zoom(order=1, grid_mode=True,
mode='mirror')`), clip to the input's value range, normalise with the CLIP mean and std (the
speed of both: README, Performance).

This module computes the same function with torch tensor ops. Both the blur and the linear resize
are separable, so each is done axis by axis: the blur as a weighted sum of shifted views of a
mirror-padded copy, the resize as a lerp between two gathered rows with scipy's coordinates and
its mirror rule for the edges. A strong shrink to a small side (a long blur kernel) instead applies
the combined blur-and-resize matrix of each axis as a matmul. The image travels to the device once,
as uint8.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np


def mirror_indices(indices: Any, n: int) -> Any:
    """scipy.ndimage's 'mirror' rule for integer indices into an axis of length N: reflect about the
    first and last sample without repeating them (... 2 1 | 0 1 2 ... n-1 | n-2 n-3 ...)."""
    if n == 1:
        return indices * 0
    period = 2 * (n - 1)
    indices = indices.abs() % period
    return indices.where(indices < n, period - indices)


def gaussian_weights(sigma: float, truncate: float = 4.0) -> list[float]:
    """scipy.ndimage.gaussian_filter1d's kernel: radius int(truncate * sigma + 0.5), normalised."""
    radius = int(truncate * sigma + 0.5)
    if sigma <= 0 or radius == 0:
        return [1.0]
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    return (w / w.sum()).tolist()


def blur_axis(x: Any, sigma: float, dim: int) -> Any:
    """Gaussian blur of X along DIM with scipy's kernel and 'mirror' boundary."""
    import torch

    weights = gaussian_weights(sigma)
    if len(weights) == 1:
        return x
    radius = len(weights) // 2
    n = x.shape[dim]
    index = mirror_indices(torch.arange(-radius, n + radius, device=x.device), n)
    padded = x.index_select(dim, index)
    out = padded.narrow(dim, 0, n) * weights[0]
    for k in range(1, len(weights)):
        out.add_(padded.narrow(dim, k, n), alpha=weights[k])
    return out


def zoom_sources(n: int, size: int) -> tuple[Any, Any, Any]:
    """scipy.ndimage.zoom(order=1, grid_mode=True, mode='mirror') along one axis: for each of SIZE
    output samples, its two input samples (mirror rule applied) and the weight (float64) of the
    second. Output sample o reads input coordinate (o + 0.5) * n / size - 0.5."""
    import torch

    coords = (torch.arange(size, dtype=torch.float64) + 0.5) * (n / size) - 0.5
    lower = torch.floor(coords)
    frac = coords - lower
    lower = lower.long()
    return mirror_indices(lower, n), mirror_indices(lower + 1, n), frac


@functools.lru_cache(maxsize=64)
def _zoom_plan(n: int, size: int, device: str) -> tuple[Any, Any, Any]:
    """zoom_sources on DEVICE, weights in float32."""
    import torch

    i0, i1, frac = zoom_sources(n, size)
    return i0.to(device), i1.to(device), frac.to(torch.float32).to(device)


@functools.lru_cache(maxsize=32)
def resample_matrix(n: int, size: int, sigma: float, device: str) -> Any:
    """The (SIZE, N) matrix of blur-then-linear-resize along one axis (scipy's kernel, coordinates and
    mirror edges), for applying both as one matmul."""
    import torch

    weights = gaussian_weights(sigma)
    radius = len(weights) // 2
    rows = torch.arange(n)
    blur = torch.zeros((n, n), dtype=torch.float64)
    for k, w in enumerate(weights):
        blur.index_put_((rows, mirror_indices(rows + k - radius, n)), torch.full((n,), w, dtype=torch.float64),
                        accumulate=True)
    i0, i1, frac = zoom_sources(n, size)
    out = torch.arange(size)
    zoom = torch.zeros((size, n), dtype=torch.float64)
    zoom.index_put_((out, i0), 1 - frac, accumulate=True)
    zoom.index_put_((out, i1), frac, accumulate=True)
    return (zoom @ blur).to(torch.float32).to(device)


def zoom_axis(x: Any, size: int, dim: int, scratch: Any = None, out: Any = None) -> Any:
    """Linear resize of X along DIM to SIZE samples as scipy.ndimage.zoom(order=1, grid_mode=True,
    mode='mirror') does it (see zoom_sources).

    SCRATCH and OUT, when given, are preallocated tensors of the output's shape (reused buffers
    avoid the page faults of a fresh large allocation on every image)."""
    import torch

    n = x.shape[dim]
    if n == size:
        return x if out is None else out.copy_(x)
    i0, i1, frac = _zoom_plan(n, size, str(x.device))
    shape = [1] * x.dim()
    shape[dim] = size
    low = torch.index_select(x, dim, i0, out=scratch) if scratch is not None else x.index_select(dim, i0)
    high = torch.index_select(x, dim, i1, out=out) if out is not None else x.index_select(dim, i1)
    return high.sub_(low).mul_(frac.to(x.dtype).view(shape)).add_(low)  # low + frac * (high - low)


class Owlv2Preprocess:
    """Callable: list of (H, W, 3) uint8 arrays -> (B, 3, S, S) pixel values on DEVICE in DTYPE,
    equal (within float32 rounding) to the HF processor's output for the same images.

    Built from the checkpoint's own image processor so size, mean, std and rescale factor follow
    the model; a processor whose settings this implementation does not cover (no padding, no
    resize, a non-square target) is refused with ValueError so the caller can use HF's instead.

    Three shortcuts keep it cheap, none changes the result beyond float rounding:
    - rescale and normalise are one per-channel affine map, and blur and resize weights sum to 1,
      so the map is applied first, to the small input (the padding gets the image of 0);
    - blur and linear resize are convex combinations, so the output already lies in the input's
      value range: HF's final clip is a no-op and is skipped;
    - the image is stored transposed while the first axis is resized, so both resize passes
      gather whole rows (a gather along the last axis is several times slower on CPU)."""

    def __init__(self, image_processor: Any, device: str = "cpu", dtype: Any = None) -> None:
        import torch

        size = getattr(image_processor, "size", None) or {}
        size = dict(size) if not isinstance(size, dict) else size
        height, width = size.get("height"), size.get("width")
        if not (getattr(image_processor, "do_pad", False) and getattr(image_processor, "do_resize", False)
                and height and height == width):
            raise ValueError("only OWLv2's pad-to-square + square resize preprocessing is implemented in torch")
        self.side = int(height)
        scale = float(getattr(image_processor, "rescale_factor", 1 / 255)) \
            if getattr(image_processor, "do_rescale", True) else 1.0
        mean = np.zeros(3)
        std = np.ones(3)
        if getattr(image_processor, "do_normalize", True):
            mean = np.asarray(getattr(image_processor, "image_mean", None) or [0.0] * 3, dtype=np.float64)
            std = np.asarray(getattr(image_processor, "image_std", None) or [1.0] * 3, dtype=np.float64)
        self.device = torch.device(device)
        self.dtype = dtype or torch.float32
        # uint8 value v -> (v * scale - mean) / std; the zero padding -> -mean / std
        self.gain = torch.tensor(scale / std, dtype=torch.float32, device=self.device).view(3, 1, 1)
        self.offset = torch.tensor(-mean / std, dtype=torch.float32, device=self.device).view(3, 1, 1)
        self._buffers: dict[tuple[str, Any], Any] = {}
        self._torch = torch

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: Any = None) -> Any:
        """A reused work tensor of SHAPE: a view of a flat buffer that only grows, so images of
        changing sizes reuse memory too (a fresh large CPU allocation page-faults on first touch:
        several ms per image)."""
        dtype = dtype or self._torch.float32
        numel = math.prod(shape)
        buf = self._buffers.get((name, dtype))
        if buf is None or buf.numel() < numel:
            buf = self._buffers[(name, dtype)] = self._torch.empty(numel, dtype=dtype, device=self.device)
        return buf[:numel].view(shape)

    def one(self, image: Any, out: Any) -> Any:
        """Write the (3, S, S) pixel values of one (H, W, 3) uint8 tensor (on the device) into OUT."""
        torch = self._torch
        h, w = int(image.shape[0]), int(image.shape[1])
        n, side = max(h, w), self.side
        # x[c, column, row]: the padded square, transposed, already normalised
        x = self._buffer("square", (3, n, n))
        x.copy_(self.offset.expand(3, n, n))
        x[:, :w, :h] = image.permute(2, 1, 0)
        x[:, :w, :h].mul_(self.gain).add_(self.offset)
        sigma = max(0.0, (n / side - 1) / 2)
        taps = len(gaussian_weights(sigma))
        if taps > 1 and side * (n + side) < 16 * n * taps:
            # strong shrink to a small side (a long blur kernel): blur + resize as two matmuls, which
            # beat 2 x TAPS elementwise passes by far (BLAS does ~8x the multiply-adds per second here)
            m = resample_matrix(n, side, sigma, str(self.device))
            cols = torch.matmul(m, x)                                   # [c, column', row]
            return out.copy_(torch.matmul(m, cols.transpose(1, 2)))    # [c, row', column']
        for dim in (1, 2):
            x = blur_axis(x, sigma, dim)
        cols = zoom_axis(x, side, 1, self._buffer("scratch1", (3, side, n)), self._buffer("cols", (3, side, n)))
        rows = self._buffer("rows", (3, n, side))
        rows.copy_(cols.transpose(1, 2))  # back to rows first
        if out.dtype == rows.dtype:
            return zoom_axis(rows, side, 1, self._buffer("scratch2", (3, side, side)), out)
        return out.copy_(zoom_axis(rows, side, 1, self._buffer("scratch2", (3, side, side)),
                                   self._buffer("final", (3, side, side))))

    def __call__(self, images: Sequence[np.ndarray]) -> Any:
        """(B, 3, S, S) pixel values. On CPU the tensor is a reused buffer: the next call overwrites it."""
        torch = self._torch
        shape = (len(images), 3, self.side, self.side)
        out = (self._buffer("out", shape, self.dtype) if self.device.type == "cpu"
               else torch.empty(shape, dtype=self.dtype, device=self.device))
        for i, image in enumerate(images):
            array = np.ascontiguousarray(image)
            if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
                raise ValueError(f"expected an (H, W, 3) uint8 image, got {array.shape} {array.dtype}")
            with warnings.catch_warnings():  # Arrow-backed arrays are read-only; nothing here writes to them
                warnings.simplefilter("ignore", UserWarning)
                tensor = torch.from_numpy(array)
            self.one(tensor.to(self.device, non_blocking=True), out[i])
        return out
