"""compute_histograms against numpy.histogram over the logged edges, and its sums against float64 arithmetic."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from gradwatch.histograms import CHUNK, DEFAULT_BINS, compute_histograms


def finite_values(tensor):
    """The values the monitor bins, as float64: float64 stays float64, everything else is compared as float32."""
    tensor = tensor.detach().to_dense() if tensor.is_sparse else tensor.detach()
    values = (tensor if tensor.dtype == torch.float64 else tensor.float()).cpu().numpy().astype(np.float64).ravel()
    return values[np.isfinite(values)]


def check_against_numpy(histogram, tensor, bins=DEFAULT_BINS):
    values = finite_values(tensor)
    assert histogram.num == values.size == histogram.bucket_counts.sum()
    assert histogram.nonfinite == tensor.numel() - values.size
    assert histogram.min == values.min() and histogram.max == values.max()
    edges = np.concatenate([[histogram.min], histogram.bucket_limits])
    assert (np.diff(edges) > 0).all() and len(histogram.bucket_counts) <= bins
    if histogram.min == histogram.max:  # one bucket, half a unit wide
        assert edges.tolist() == [histogram.min, histogram.min + 0.5]
    elif bins > 1:  # bucket width: the smallest power of two that spans the range in bins - 1 buckets
        width = 2.0 ** np.ceil(np.log2((histogram.max - histogram.min) / (bins - 1)))
        interior = edges[1:-1] / width
        np.testing.assert_array_equal(interior, np.round(interior))
        assert edges[-1] == histogram.max and len(histogram.bucket_counts) >= (bins - 1) / 2
    # with exactly the logged edges, numpy puts every value in the same bucket
    exact, _ = np.histogram(values, bins=edges)
    np.testing.assert_array_equal(histogram.bucket_counts, exact)
    # the sums are float64 sums: right to float64 rounding
    assert abs(histogram.sum - math.fsum(values)) <= 1e-13 * math.fsum(np.abs(values)) + 1e-300
    assert histogram.sum_squares == pytest.approx(math.fsum(values * values), rel=1e-13, abs=1e-300)


@pytest.mark.parametrize(
    "make",
    [
        lambda g: torch.randn(10_000, generator=g),
        lambda g: torch.randn(64, 3, 5, 5, generator=g, dtype=torch.float64) * 1e-6,
        lambda g: torch.rand(7, generator=g).half(),
        lambda g: (torch.randn(1000, generator=g) * 300).bfloat16(),
        lambda g: torch.randint(-5, 5, (100,), generator=g),
        lambda g: torch.full((10,), 0.25),
    ],
)
def test_histogram_counts_match_numpy(make):
    tensor = make(torch.Generator().manual_seed(0))
    check_against_numpy(compute_histograms({"t": tensor})["t"], tensor)


@pytest.mark.parametrize(
    "make",
    [
        lambda g: torch.arange(-64, 65, dtype=torch.float32) / 8,  # values on the bucket edges themselves
        lambda g: torch.tensor([-1e-40, -1e-30, 0.0, 1e-30, 200.0, -300.0]),  # tiny values in a wide range
        lambda g: torch.tensor([-3e38, 3e38, 0.0, -1e-45]),  # the widest float32 range
        lambda g: torch.tensor([0.0, 1e-45, 3e-45, 7e-45]),  # subnormals only: a tiny width
        lambda g: 1000 + torch.randn(5000, generator=g) * 1e-4,  # a range of a few ulps far from zero
        lambda g: torch.randn(20_000, generator=g) * 10 ** torch.randint(-30, 30, (20_000,), generator=g),
        lambda g: torch.randn(200_001, generator=g) * 100,  # widths above 1: binned in float64
        lambda g: torch.randn(150_000, generator=g, dtype=torch.float64),
    ],
)
@pytest.mark.parametrize("bins", [1, 2, 7, DEFAULT_BINS, 256])
def test_every_value_lands_in_the_bucket_its_edges_say(make, bins):
    tensor = make(torch.Generator().manual_seed(0))
    check_against_numpy(compute_histograms({"t": tensor}, bins=bins)["t"], tensor, bins=bins)


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_values_within_one_float32_ulp_of_an_edge_are_counted_as_numpy_counts_them(scale):
    """Every inner edge, and the float32 neighbours on either side of it, among random values: not one is counted
    in another bucket than numpy's over the same edges."""
    g = torch.Generator().manual_seed(1)
    values = (torch.randn(5000, generator=g) * scale).float()
    inner = compute_histograms({"t": values})["t"].bucket_limits[:-1].astype(np.float32)  # the last one is the max
    near = np.concatenate([np.nextafter(inner, -np.inf), inner, np.nextafter(inner, np.inf)])
    tensor = torch.cat([values, torch.from_numpy(near)])
    histogram = compute_histograms({"t": tensor})["t"]
    assert histogram.bucket_limits.tolist() == compute_histograms({"t": values})["t"].bucket_limits.tolist()
    check_against_numpy(histogram, tensor)


def test_a_tensor_of_many_chunks_is_counted_exactly():
    """More than 2**24 values, most of them in one bucket: counts beyond float32's whole numbers, summed over
    chunks, with min, max and sums over all of them."""
    size = 2**24 + 5
    assert size > 16 * CHUNK
    tensor = torch.zeros(size)
    tensor[[0, size - 1]] = torch.tensor([-1.0, 3.0])
    histogram = compute_histograms({"t": tensor})["t"]
    assert histogram.bucket_counts[np.searchsorted(histogram.bucket_limits, 0.0, side="right")] == size - 2
    assert histogram.bucket_counts.sum() == size
    assert (histogram.min, histogram.max, histogram.sum, histogram.sum_squares) == (-1.0, 3.0, 2.0, 10.0)


def test_a_batch_of_tensors_gives_each_the_histogram_it_gets_alone():
    g = torch.Generator().manual_seed(2)
    with_nan = torch.randn(300, generator=g)
    with_nan[7] = float("nan")
    batch = {
        "normal": torch.randn(1000, generator=g),
        "constant": torch.full((5,), -2.0),
        "nan": with_nan,
        "all_inf": torch.full((3,), float("inf")),
        "wide": torch.randn(50, generator=g) * 1e4,
        "half": torch.randn(64, generator=g).half(),
        "big": torch.randn(70_000, generator=g),
        "double": torch.randn(40, generator=g, dtype=torch.float64),
    }
    together = compute_histograms(batch)
    assert list(together) == list(batch)
    for name, tensor in batch.items():
        alone = compute_histograms({name: tensor})[name]
        assert repr(together[name]) == repr(alone), name
        if alone.num:
            check_against_numpy(together[name], tensor)


def test_nonfinite_values_are_counted_and_left_out_of_the_bins():
    tensor = torch.randn(5000, generator=torch.Generator().manual_seed(1))
    tensor[[3, 10, 99]] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    histogram = compute_histograms({"t": tensor}, bins=16)["t"]
    assert histogram.nonfinite == 3
    check_against_numpy(histogram, tensor, bins=16)


def test_all_nonfinite_and_empty_tensors_never_raise():
    result = compute_histograms(
        {"nan": torch.full((4,), float("nan")), "inf": torch.full((2,), float("inf")), "empty": torch.empty(0)}
    )
    assert set(result) == {"nan", "inf"}
    assert (result["nan"].num, result["nan"].nonfinite) == (0, 4)
    assert (result["inf"].num, result["inf"].nonfinite) == (0, 2)


def test_sparse_gradient_is_binned_like_its_dense_form():
    embedding = nn.Embedding(50, 4, sparse=True)
    embedding(torch.tensor([1, 2, 2, 7])).sum().backward()
    assert embedding.weight.grad.is_sparse
    check_against_numpy(compute_histograms({"g": embedding.weight.grad})["g"], embedding.weight.grad)


@pytest.mark.parametrize("bins", [0, -1, 2.5, "64"])
def test_bins_must_be_a_positive_integer(bins):
    with pytest.raises(ValueError, match="bins must be a positive integer"):
        compute_histograms({"t": torch.ones(3)}, bins=bins)
