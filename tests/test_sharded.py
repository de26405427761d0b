"""Models sharded with FSDP2 (fully_shard) over two gloo processes: the monitor's histograms and statistics are
those of the whole tensors, checked against the same tensors gathered, numpy.histogram and an unsharded twin."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import histogram_steps, load_events, run_script
from test_train import HISTOGRAM_TAGS

from utils import Net

TWIN = Path(__file__).with_name("sharded_twin.py")


@pytest.fixture(scope="module")
def twin_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    result = run_script("-m", "torch.distributed.run", "--nproc_per_node", "2", TWIN, out, cwd=out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "gradwatch:" not in result.stderr  # no part of the monitor failed
    return out, json.loads((out / "results.json").read_text())


def same(a, b, rel=1e-6):
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)


def test_sharded_histograms_equal_those_of_the_whole_tensors(twin_run):
    _, results = twin_run
    sharded, gathered, values = results["sharded"], results["gathered"], results["values"]
    assert results["local_sizes"]["0.weight_grad"] == 272  # rank 0 holds 17 of the 33 rows: a real shard
    assert results["local_sizes"]["4.bias_grad"] == 1  # and rank 1 none of the last layer's single row
    assert sharded.keys() == gathered.keys() and len(sharded) == 12
    for name, h in sharded.items():
        whole = gathered[name]  # the tensor gathered onto one rank, binned there
        for key in ("num", "nonfinite", "min", "max", "limits", "counts"):
            assert h[key] == whole[key], (name, key)
        assert same(h["sum"], whole["sum"], 1e-12) and same(h["sum_squares"], whole["sum_squares"], 1e-12)
        finite = np.array(values[name])[np.isfinite(values[name])]
        if len(h["limits"]) > 1:  # numpy.histogram with the same edges counts the same
            counts, _ = np.histogram(finite, bins=[h["min"], *h["limits"]])
            assert counts.tolist() == h["counts"], name
        assert h["num"] == len(finite) and h["num"] + h["nonfinite"] == len(values[name])


def test_non_finite_values_in_one_ranks_shard_are_counted_for_the_whole_tensor(twin_run):
    _, results = twin_run
    assert results["sharded"]["0.weight_grad"]["nonfinite"] == 3  # NaN, Inf and -Inf in rank 1's shard alone
    assert results["sharded"]["0.bias_grad"]["nonfinite"] == 1  # a NaN in rank 0's
    assert all(math.isfinite(results["sharded"]["0.weight_grad"][key]) for key in ("min", "max", "sum"))


def test_sharded_statistics_equal_the_unsharded_twins(twin_run):
    _, results = twin_run
    sharded, twin = results["statistics"]["sharded"], results["statistics"]["twin"]
    assert sharded.keys() == twin.keys() and "total" in sharded
    for name, stats in twin.items():
        assert stats.keys() == sharded[name].keys()
        for key, value in stats.items():
            assert same(sharded[name][key], value), (name, key, sharded[name][key], value)
    assert sharded["0.weight"]["nonfinite_share"] == pytest.approx(3 / 528)
    for sharded_values, twin_values in zip(*(results["flow"][name] for name in ("sharded", "twin"))):
        assert all(same(a, b) for a, b in zip(sharded_values, twin_values) if isinstance(a, float))


def test_a_sharded_run_logs_what_its_unsharded_twin_logs(twin_run):
    """Every tag of both step axes: histograms bucket for bucket, scalars (norms, update ratios, loss) within
    float rounding, the gradient-flow picture and the diagnosis."""
    out, _ = twin_run
    for folder in ("", "steps"):
        sharded, twin = load_events(out / "sharded" / folder), load_events(out / "twin" / folder)
        assert sharded.Tags()["histograms"] == twin.Tags()["histograms"]
        assert sorted(sharded.Tags()["scalars"]) == sorted(twin.Tags()["scalars"])
        assert sharded.Tags()["images"] == twin.Tags()["images"]
        for tag in twin.Tags()["histograms"]:
            for a, b in zip(sharded.Histograms(tag), twin.Histograms(tag), strict=True):
                a, b = a.histogram_value, b.histogram_value  # the sums are added in another order: rounding
                assert (a.min, a.max, a.num, a.bucket_limit, a.bucket) == (
                    b.min,
                    b.max,
                    b.num,
                    b.bucket_limit,
                    b.bucket,
                )
                assert same(a.sum, b.sum, 1e-9) and same(a.sum_squares, b.sum_squares, 1e-9), tag
        for tag in twin.Tags()["scalars"]:
            pairs = list(zip(sharded.Scalars(tag), twin.Scalars(tag), strict=True))
            assert all(a.step == b.step and same(a.value, b.value, 1e-5) for a, b in pairs), tag
    steps = load_events(out / "sharded" / "steps")
    assert {"grad_norm/total", "update_ratio/0.weight", "dead_share/1"} <= set(steps.Tags()["scalars"])
    assert [e.step for e in steps.Histograms("0.weight_grad")] == [2, 4, 6]
    sharded, twin = (json.loads((out / run / "diagnosis.json").read_text()) for run in ("sharded", "twin"))
    assert sharded["findings"] == twin["findings"] and sharded["facts"]["model"]["parameters"] == 667


def torchrun(*args):
    return run_script(
        "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *args, "--device", "cpu"
    )


def test_train_py_with_fsdp_trains_logs_and_resumes_as_ddp_does(data_dir, tmp_path):
    """train.py --fsdp, one epoch then resumed for a second, against DistributedDataParallel in one go: the same
    weights, tags, histograms and clipping, up to float rounding (the norms are summed in another order); the
    checkpoint loads into a plain Net."""
    common = ("--data", data_dir, "--log-dir", tmp_path, "--batch-size", "4", "--clip-grad-norm", "0.05")
    common += ("--stats-every", "1")
    for args in (("--run-name", "fsdp", "--fsdp", "--epochs", "1"), ("--resume", tmp_path / "fsdp", "--epochs", "2")):
        result = torchrun(*common, *args)
        assert result.returncode == 0, result.stderr[-3000:]
    result = torchrun(*common, "--run-name", "ddp", "--epochs", "2")
    assert result.returncode == 0, result.stderr[-3000:]

    fsdp, ddp = (torch.load(tmp_path / run / "last.pt", weights_only=True) for run in ("fsdp", "ddp"))
    assert fsdp["step"] == ddp["step"] == 6 and fsdp["model"].keys() == ddp["model"].keys()
    for name, weight in ddp["model"].items():  # the momentum went through the checkpoint too
        assert torch.allclose(fsdp["model"][name], weight, rtol=1e-5, atol=1e-7), name
    Net(num_classes=4).load_state_dict(fsdp["model"])
    for folder in ("", "steps"):
        sharded, replicated = load_events(tmp_path / "fsdp" / folder), load_events(tmp_path / "ddp" / folder)
        assert sharded.Tags()["histograms"] == replicated.Tags()["histograms"]
        assert sorted(sharded.Tags()["scalars"]) == sorted(replicated.Tags()["scalars"])
    sharded, replicated = load_events(tmp_path / "fsdp"), load_events(tmp_path / "ddp")
    for tag in HISTOGRAM_TAGS:
        assert histogram_steps(sharded)[tag] == [1, 2]
        for ours, theirs in zip(sharded.Histograms(tag), replicated.Histograms(tag)):  # sums in another order
            ours, theirs = ours.histogram_value, theirs.histogram_value
            assert ours.num == theirs.num and [ours.min, ours.max] == pytest.approx([theirs.min, theirs.max], rel=1e-4)
    sharded, replicated = load_events(tmp_path / "fsdp" / "steps"), load_events(tmp_path / "ddp" / "steps")
    for tag in ("clip/grad_norm", "grad_norm/total", "grad_norm/conv1.weight", "update_ratio/fc3.weight"):
        ours, theirs = ([e.value for e in events.Scalars(tag)] for events in (sharded, replicated))
        assert len(ours) == 6 and ours == pytest.approx(theirs, rel=1e-4), tag  # global, not one shard's
