import math
import numpy as np
import pytest
import torch
import torch.nn as nn

import monitor
from conftest import load_events
from monitor import DEFAULT_BINS, TrainingMonitor, compute_histograms


@pytest.fixture(params=["cpu fast path", "cpu torch path", "device path"], autouse=True)
def binning_path(request, monkeypatch):
    """Every histogram test runs on every code path: on the CPU, small tensors in a numpy batch and the others
    one by one with torch (here all of them), and the sync-free one used on GPUs."""
    monkeypatch.setattr(monitor, "CPU_FAST_PATH", request.param != "device path")
    if request.param == "cpu torch path":
        monkeypatch.setattr(monitor, "_NUMPY_BELOW", 0)


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
    exact, _ = np.histogram(values.astype(np.float64), bins=edges)
    np.testing.assert_array_equal(histogram.bucket_counts, exact)
    scale = np.abs(values.astype(np.float64)).sum()  # sums are accumulated in the tensor's precision
    assert histogram.sum == pytest.approx(values.astype(np.float64).sum(), abs=1e-6 * scale + 1e-12)
    assert histogram.sum_squares == pytest.approx((values.astype(np.float64) ** 2).sum(), rel=1e-4)  # float32 accumulation


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


@pytest.mark.parametrize("make", [
    lambda g: torch.arange(-64, 65, dtype=torch.float32) / 8,  # values on the bucket edges themselves
    lambda g: torch.tensor([-1e-40, -1e-30, 0.0, 1e-30, 200.0, -300.0]),  # tiny values in a wide range
    lambda g: torch.tensor([-3e38, 3e38, 0.0, -1e-45]),  # the widest float32 range
    lambda g: torch.tensor([0.0, 1e-45, 3e-45, 7e-45]),  # subnormals only: a tiny width
    lambda g: 1000 + torch.randn(5000, generator=g) * 1e-4,  # a range of a few ulps far from zero
    lambda g: torch.randn(20_000, generator=g) * 10 ** torch.randint(-30, 30, (20_000,), generator=g),
    lambda g: torch.randn(200_001, generator=g),  # large and odd: counted in folded pairs plus one
    lambda g: 1000 + torch.randn(150_001, generator=g) * 1e-3,  # large and far from zero: shifted before folding
    lambda g: torch.randn(150_000, generator=g, dtype=torch.float64),  # large float64: folded as float64
    lambda g: torch.cat([torch.randn(150_000, generator=g), torch.tensor([-3e38, 3e38])]),  # large, widest range
])
@pytest.mark.parametrize("bins", [1, 2, 7, DEFAULT_BINS, 256])
def test_every_value_lands_in_the_bucket_its_edges_say(make, bins):
    tensor = make(torch.Generator().manual_seed(0))
    check_against_numpy(compute_histograms({"t": tensor}, bins=bins)["t"], tensor, bins=bins)


def test_a_batch_of_tensors_gives_each_the_histogram_it_gets_alone():
    g = torch.Generator().manual_seed(2)
    with_nan = torch.randn(300, generator=g)
    with_nan[7] = float("nan")
    batch = {"normal": torch.randn(1000, generator=g), "constant": torch.full((5,), -2.0), "nan": with_nan,
             "all_inf": torch.full((3,), float("inf")), "wide": torch.randn(50, generator=g) * 1e4,
             "half": torch.randn(64, generator=g).half(), "big": torch.randn(70_000, generator=g),
             "double": torch.randn(40, generator=g, dtype=torch.float64)}
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


def test_parameter_statistics_and_gradient_flow_match_plain_torch():
    g = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Linear(300, 200), nn.ReLU(), nn.Linear(200, 5))
    model(torch.randn(16, 300, generator=g)).square().mean().backward()
    stats = monitor.parameter_statistics(model)
    names, means, maxes = monitor.gradient_flow(model)
    assert names == ["0.weight", "2.weight"]
    for name, p in model.named_parameters():
        assert stats[name]["max_abs_weight"] == pytest.approx(p.detach().abs().max().item(), rel=1e-6)
        assert stats[name]["weight_norm"] == pytest.approx(p.detach().norm().item(), rel=1e-5)
        assert stats[name]["grad_norm"] == pytest.approx(p.grad.norm().item(), rel=1e-5)
    for name, mean, peak in zip(names, means, maxes):
        grad = dict(model.named_parameters())[name].grad
        assert mean == pytest.approx(grad.abs().mean().item(), rel=1e-5)
        assert peak == pytest.approx(grad.abs().max().item(), rel=1e-6)
    named = list(model.named_parameters())  # what the monitor keeps from watch(): the same figures
    assert monitor.parameter_statistics(named) == stats and monitor.gradient_flow(named) == (names, means, maxes)
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    assert math.isnan(monitor.parameter_statistics(model)["0.weight"]["max_abs_weight"])


def test_epoch_end_before_watch_says_what_to_do(tmp_path):
    with TrainingMonitor(tmp_path) as unwatched, pytest.raises(RuntimeError, match=r"watch\(model\)"):
        unwatched.epoch_end(0, {"loss": 1.0})


def test_buffers_kept_between_calls_give_each_call_its_own_histograms():
    """The monitor keeps its binning buffers from log to log: calls with more, then fewer values than before
    must not see each other's leftovers."""
    g = torch.Generator().manual_seed(4)
    scratch = monitor._Scratch()
    calls = [{"a": torch.randn(3000, generator=g), "b": torch.randn(200_001, generator=g) * 5},
             {"a": torch.randn(50, generator=g) + 7, "c": torch.randn(70_000, generator=g, dtype=torch.float64)},
             {"a": torch.randn(9000, generator=g), "b": torch.full((300_000,), 2.0), "d": torch.randn(10)}]
    for tensors in calls:
        kept, fresh = compute_histograms(tensors, scratch=scratch), compute_histograms(tensors)
        for name, tensor in tensors.items():
            check_against_numpy(kept[name], tensor)
            assert np.array_equal(kept[name].bucket_counts, fresh[name].bucket_counts)
            assert np.array_equal(kept[name].bucket_limits, fresh[name].bucket_limits)


def test_rewrite_replaces_longer_and_shorter_contents_exactly(tmp_path):
    path = tmp_path / "gradient_flow.png"
    for data in (b"a" * 1000, b"short", b"b" * 2000, b""):
        monitor._rewrite(str(path), data)
        assert path.read_bytes() == data


def test_gradient_flow_pictures_drawn_on_kept_axes_equal_fresh_ones():
    names = ["conv1.weight", "layer1.0.conv2.weight", "fc.weight"]
    calls = [([1e-3, 2e-4, 5e-2], [1e-1, 3e-3, 0.9], 0),  # then lower bars on the same scale: none of the
             ([2e-3, 3e-4, 1e-3], [3e-3, 5e-4, 2e-2], 1),  # first call's bars may remain
             ([0.0, math.nan, 1e-6], [0.0, math.inf, 1e-5], 2),
             ([0.0, 0.0, 0.0], [0.0, 0.0, 0.0], 3)]
    kept = [monitor.gradient_flow_image(names, means, maxes, epoch) for means, maxes, epoch in calls]
    for picture, (means, maxes, epoch) in zip(kept, calls):
        monitor._gradient_flow_axes.cache_clear()
        assert np.array_equal(picture, monitor.gradient_flow_image(names, means, maxes, epoch))
    assert not np.array_equal(kept[0], kept[1]) and not np.array_equal(kept[2], kept[3])


def test_scalars_logged_again_under_the_same_tags_keep_each_steps_values(tmp_path):
    from tensorboardX import SummaryWriter
    with SummaryWriter(tmp_path) as writer:
        scalars = monitor._Scalars()
        scalars.add(writer, {"a": 1.0, "b": 2.0}, 0)
        scalars.add(writer, {"a": 3.0, "b": 4.0}, 1)  # the same tags: the kept message, new values
        scalars.add(writer, {"b": 5.0, "c": 6.0}, 2)  # other tags
        scalars.add(writer, {}, 3)
    events = load_events(tmp_path)
    assert [(e.step, e.value) for e in events.Scalars("a")] == [(0, 1.0), (1, 3.0)]
    assert [(e.step, e.value) for e in events.Scalars("b")] == [(0, 2.0), (1, 4.0), (2, 5.0)]
    assert [(e.step, e.value) for e in events.Scalars("c")] == [(2, 6.0)]


def test_update_ratio_is_the_steps_change_over_the_weight(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with TrainingMonitor(tmp_path, stats_every=2).watch(model, optimizer) as monitor:
        for step in range(6):  # the snapshot buffers are reused from one statistics step to the next
            before = {name: p.detach().clone() for name, p in model.named_parameters()}
            optimizer.zero_grad()
            model(torch.randn(4, 8)).square().mean().backward()
            optimizer.step()
            monitor.step()
            if step % 2 == 1:
                for name, p in model.named_parameters():
                    expected = (p.detach() - before[name]).norm() / p.detach().norm()
                    assert monitor._records[-1][name]["update_ratio"] == pytest.approx(expected.item(), rel=1e-5)
        assert len(monitor._records) == 3
