import numpy as np
import pytest
import torch
import torch.nn as nn

import monitor
from conftest import load_events
from monitor import DEFAULT_BINS, TrainingMonitor, compute_histograms


@pytest.fixture(params=["cpu fast path", "device path"], autouse=True)
def binning_path(request, monkeypatch):
    """Every histogram test runs on both code paths: the CPU one and the sync-free one used on GPUs."""
    monkeypatch.setattr(monitor, "CPU_FAST_PATH", request.param == "cpu fast path")


def finite_values(tensor):
    """The values the monitor bins: float64 stays float64, everything else is compared as float32."""
    tensor = tensor.detach().to_dense() if tensor.is_sparse else tensor.detach()
    values = tensor.numpy() if tensor.dtype == torch.float64 else tensor.float().numpy()
    values = values.ravel()
    return values[np.isfinite(values)]


def check_against_numpy(histogram, tensor, bins=DEFAULT_BINS):
    values = finite_values(tensor)
    assert histogram.num == values.size
    assert histogram.nonfinite == tensor.numel() - values.size
    assert histogram.min == values.min() and histogram.max == values.max()
    # numpy picks the same equal-width edges from min to max (+-0.5 for a constant tensor) ...
    counts, edges = np.histogram(values.astype(np.float64), bins=bins)
    np.testing.assert_allclose(histogram.bucket_limits, edges[1:], rtol=1e-6, atol=1e-6)
    # ... and with exactly the logged edges, puts every value in the same bucket.
    left = edges[0] if histogram.min == histogram.max else histogram.min
    exact, _ = np.histogram(values, bins=np.concatenate([[left], histogram.bucket_limits]))
    np.testing.assert_array_equal(histogram.bucket_counts, exact)
    assert abs(histogram.bucket_counts - counts).sum() <= 2  # numpy's float64 edges may differ by an ulp
    assert histogram.sum == pytest.approx(values.astype(np.float64).sum(), rel=1e-6, abs=1e-6)
    assert histogram.sum_squares == pytest.approx((values.astype(np.float64) ** 2).sum(), rel=1e-6)


@pytest.mark.parametrize("make", [
    lambda g: torch.randn(10_000, generator=g),
    lambda g: torch.randn(64, 3, 5, 5, generator=g, dtype=torch.float64) * 1e-6,
    lambda g: torch.rand(7, generator=g).half(),
    lambda g: (torch.randn(1000, generator=g) * 300).bfloat16(),
    lambda g: torch.randint(-5, 5, (100,), generator=g),
    lambda g: torch.full((10,), 0.25),
])
def test_histogram_counts_match_numpy(make):
    tensor = make(torch.Generator().manual_seed(0))
    check_against_numpy(compute_histograms({"t": tensor})["t"], tensor)


def test_nonfinite_values_are_counted_and_left_out_of_the_bins():
    tensor = torch.randn(5000, generator=torch.Generator().manual_seed(1))
    tensor[[3, 10, 99]] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    histogram = compute_histograms({"t": tensor}, bins=16)["t"]
    assert histogram.nonfinite == 3
    check_against_numpy(histogram, tensor, bins=16)


def test_all_nonfinite_and_empty_tensors_never_raise():
    result = compute_histograms({"nan": torch.full((4,), float("nan")), "inf": torch.full((2,), float("inf")),
                                 "empty": torch.empty(0)})
    assert set(result) == {"nan", "inf"}
    assert (result["nan"].num, result["nan"].nonfinite) == (0, 4)
    assert (result["inf"].num, result["inf"].nonfinite) == (0, 2)


def test_sparse_gradient_is_binned_like_its_dense_form():
    embedding = nn.Embedding(50, 4, sparse=True)
    embedding(torch.tensor([1, 2, 2, 7])).sum().backward()
    assert embedding.weight.grad.is_sparse
    check_against_numpy(compute_histograms({"g": embedding.weight.grad})["g"], embedding.weight.grad)


def test_log_parameters_writes_both_tags_and_skips_missing_gradients(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    model[2].bias.requires_grad_(False)  # frozen: no gradient
    model(torch.randn(16, 8)).sum().backward()
    model[0].weight.grad[0, 0] = float("nan")
    with TrainingMonitor(tmp_path) as monitor:
        monitor.log_parameters(model, 0)
    events = load_events(tmp_path)
    tags = set(events.Tags()["histograms"])
    assert tags == {"0.weight_data", "0.bias_data", "2.weight_data", "2.bias_data", "0.weight_grad", "0.bias_grad",
                    "2.weight_grad"}
    stored = events.Histograms("2.weight_data")[0].histogram_value
    counts, _ = np.histogram(model[2].weight.detach().numpy(), bins=np.concatenate([[stored.min], stored.bucket_limit]))
    assert list(stored.bucket) == counts.tolist() and stored.num == 8
    assert [e.value for e in events.Scalars("nonfinite/0.weight_grad")] == [1.0]


def test_monitor_rejects_bad_bins(tmp_path):
    with pytest.raises(ValueError, match="bins"):
        TrainingMonitor(tmp_path, bins=0)


def test_a_writer_reopened_within_the_same_second_keeps_earlier_events(tmp_path):
    model = nn.Linear(2, 2)
    for epoch in range(3):  # three monitors, as a run stopped and resumed twice in quick succession
        with TrainingMonitor(tmp_path, purge_epoch=epoch or None) as monitor:
            monitor.watch(model).epoch_end(epoch, {"loss": float(epoch)})
    events = load_events(tmp_path)
    assert [e.step for e in events.Histograms("weight_data")] == [0, 1, 2]
    assert [e.value for e in events.Scalars("loss")] == [0.0, 1.0, 2.0]
