"""`mmcv_compat`'s multi-scale deformable attention, held to a naive reference written here from
the definition mmcv's CUDA kernel (`ms_deform_attn_im2col_bilinear`) computes: a location (x, y) in
[0, 1] of a level of height H and width W samples pixel (x·W − 0.5, y·H − 0.5) (align_corners=False)
by bilinear interpolation, each of the four neighbours outside the level counting as zero; the
samples are weighted by the attention weights and summed over levels and points, per head."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from worker.runtime.mmcv_compat import multi_scale_deformable_attn_pytorch

#: Two levels, deliberately not square, so that exchanging x and y shows.
SHAPES = ((3, 5), (2, 4))
BATCH, HEADS, DIMS, QUERIES, POINTS = 2, 2, 3, 4, 2


def bilinear_zero_padded(level: np.ndarray, x: float, y: float) -> np.ndarray:
    """level: (H, W, dims); x, y normalised to [0, 1]. One sample, as mmcv's kernel takes it."""
    height, width, dims = level.shape
    h_im, w_im = y * height - 0.5, x * width - 0.5
    sample = np.zeros(dims)
    if not (h_im > -1 and w_im > -1 and h_im < height and w_im < width):
        return sample
    h_low, w_low = math.floor(h_im), math.floor(w_im)
    lh, lw = h_im - h_low, w_im - w_low
    for row, weight_h in ((h_low, 1 - lh), (h_low + 1, lh)):
        for col, weight_w in ((w_low, 1 - lw), (w_low + 1, lw)):
            if 0 <= row < height and 0 <= col < width:
                sample += weight_h * weight_w * level[row, col]
    return sample


def naive(value: np.ndarray, locations: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """value: (batch, Σ H·W, heads, dims); locations: (batch, queries, heads, levels, points, 2) as
    (x, y); weights: (batch, queries, heads, levels, points). Out: (batch, queries, heads · dims)."""
    out = np.zeros((BATCH, QUERIES, HEADS * DIMS))
    starts = np.cumsum([0] + [h * w for h, w in SHAPES])
    for b in range(BATCH):
        for q in range(QUERIES):
            for head in range(HEADS):
                total = np.zeros(DIMS)
                for level, (h, w) in enumerate(SHAPES):
                    grid = value[b, starts[level]:starts[level + 1], head].reshape(h, w, DIMS)  # row-major: y·W + x
                    for p in range(POINTS):
                        x, y = locations[b, q, head, level, p]
                        total += weights[b, q, head, level, p] * bilinear_zero_padded(grid, x, y)
                out[b, q, head * DIMS:(head + 1) * DIMS] = total
    return out


@pytest.fixture
def inputs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    value = rng.normal(size=(BATCH, sum(h * w for h, w in SHAPES), HEADS, DIMS))
    locations = rng.uniform(0, 1, size=(BATCH, QUERIES, HEADS, len(SHAPES), POINTS, 2))
    # Known places, among the random ones: a pixel centre, the corners of the [0, 1] square,
    # partly outside (one neighbour row or column in, the others padded with zeros), and wholly
    # outside (the sample is zero).
    known = [(0.5 / 5, 0.5 / 3), (0.0, 0.0), (1.0, 1.0), (-0.05, 0.4), (0.6, 1.1), (-0.5, 0.5), (1.7, -0.4),
             (0.3, -2.0)]
    flat = locations.reshape(-1, 2)
    flat[: len(known)] = known
    flat[len(known): 2 * len(known)] = known[::-1]
    weights = rng.uniform(0, 1, size=(BATCH, QUERIES, HEADS, len(SHAPES), POINTS))
    weights /= weights.sum(axis=(-2, -1), keepdims=True)  # softmax-like, as the attention gives them
    return value, locations, weights


def test_equals_a_naive_bilinear_reference(inputs: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    value, locations, weights = inputs
    ours = multi_scale_deformable_attn_pytorch(
        torch.from_numpy(value), torch.tensor(SHAPES), torch.from_numpy(locations), torch.from_numpy(weights)
    )
    assert ours.shape == (BATCH, QUERIES, HEADS * DIMS) and ours.dtype == torch.float64
    expected = naive(value, locations, weights)
    assert np.allclose(ours.numpy(), expected, atol=1e-5, rtol=0), np.abs(ours.numpy() - expected).max()


def test_reference_samples_zero_outside_and_pixels_at_their_centres() -> None:
    """The reference itself, on cases worked out by hand."""
    level = np.arange(15, dtype=np.float64).reshape(3, 5, 1)  # value = 5·row + col
    assert bilinear_zero_padded(level, 2.5 / 5, 1.5 / 3)[0] == 7  # the centre of row 1, column 2
    assert bilinear_zero_padded(level, 3 / 5, 1.5 / 3)[0] == 7.5  # halfway to column 3
    assert bilinear_zero_padded(level, 0.0, 1.5 / 3)[0] == 5 * 0.5  # half column 0 (row 1), half padding
    assert bilinear_zero_padded(level, 4.5 / 5, 0.0)[0] == 4 * 0.5  # half row 0 (column 4), half padding
    assert bilinear_zero_padded(level, 2.5 / 5, 1.0)[0] == 12 * 0.5  # half row 2, half padding
    assert bilinear_zero_padded(level, 1.2, 0.5)[0] == 0.0 and bilinear_zero_padded(level, 0.5, -0.4)[0] == 0.0


def test_float32_as_m2fp_runs_it(inputs: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    value, locations, weights = inputs
    ours = multi_scale_deformable_attn_pytorch(
        torch.from_numpy(value).float(), torch.tensor(SHAPES), torch.from_numpy(locations).float(),
        torch.from_numpy(weights).float(),
    )
    assert np.allclose(ours.numpy(), naive(value, locations, weights), atol=1e-5, rtol=0)
