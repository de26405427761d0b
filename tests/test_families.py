"""Many small tensors: statistics reduced in stacks (the same numbers as tensor by tensor), and a layer's experts
summarised as one family in TensorBoard, the diagnosis still naming each expert."""

import json
import math
import statistics

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import load_events

from gradwatch import TrainingMonitor, parameter_statistics
from gradwatch.families import FAMILY_MIN, families, folded, outliers
from gradwatch.stats import gradient_flow, stacks

COUNT = 12  # experts per layer


class Experts(nn.Module):
    """`COUNT` experts (two matrices each), slice i of the batch to expert i, as bench/experts.py builds them."""

    def __init__(self, width=8, hidden=4):
        super().__init__()
        self.up = nn.ParameterList(nn.Parameter(torch.randn(hidden, width) / width**0.5) for _ in range(COUNT))
        self.down = nn.ParameterList(nn.Parameter(torch.randn(width, hidden) / hidden**0.5) for _ in range(COUNT))

    def forward(self, x):
        outputs = [torch.relu(s @ u.T) @ d.T for s, u, d in zip(x.chunk(COUNT), self.up, self.down)]
        return x + torch.cat(outputs)


def moe():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), Experts(), Experts(), nn.Linear(8, 3))


def by_hand(model, before):
    """The statistics tensor by tensor, in float64 numpy: the oracle."""
    found = {}
    for name, p in model.named_parameters():
        w = p.detach().double().numpy().ravel()
        g = p.grad.double().numpy().ravel()
        change = w - before[name].double().numpy().ravel()
        found[name] = {
            "weight_norm": np.linalg.norm(w),
            "max_abs_weight": np.abs(w).max(),
            "grad_norm": np.linalg.norm(g),
            "grad_zero_share": 1 - np.count_nonzero(g) / g.size,
            "update_ratio": np.linalg.norm(change) / np.linalg.norm(w),
            "unchanged_share": 1 - np.count_nonzero(change) / w.size,
        }
    return found


def test_statistics_reduced_in_stacks_are_those_of_each_tensor():
    """Expert matrices are reduced in stacks of their shape; every number is the tensor's own, also where one
    expert's gradient holds a NaN, another's is all zero and another did not move."""
    model = moe()
    named = list(model.named_parameters())
    assert sorted(map(len, stacks([p for _, p in named]))) == [2 * COUNT, 2 * COUNT]  # up and down of each shape
    x = torch.randn(4 * COUNT, 8)
    nn.functional.cross_entropy(model(x), torch.randint(0, 3, (4 * COUNT,))).backward()
    before = {name: p.detach().clone() for name, p in named}
    with torch.no_grad():
        for name, p in named:
            if name != "1.up.3":  # one expert that does not move
                p.sub_(0.1 * p.grad)
    model[1].up[5].grad.zero_()
    model[1].down[7].grad[0, 0] = math.nan
    stats = parameter_statistics(model, before)
    expected = by_hand(model, before)
    for name, values in expected.items():
        for key, value in values.items():
            if name == "1.down.7" and key == "grad_norm":
                assert math.isnan(stats[name][key])
                continue
            assert stats[name][key] == pytest.approx(value, rel=1e-5, abs=1e-12), (name, key)
    assert stats["1.down.7"]["nonfinite_share"] == pytest.approx(1 / model[1].down[7].numel())
    assert stats["1.up.5"]["grad_zero_share"] == 1.0 and stats["1.up.3"]["unchanged_share"] == 1.0


def test_half_precision_stacks_are_widened_and_the_gradient_flow_is_per_tensor():
    weights = [nn.Parameter(torch.full((4, 4), 300.0, dtype=torch.float16) * (i + 1)) for i in range(FAMILY_MIN)]
    for w in weights:
        w.grad = w.detach().clone()
    named = [(f"experts.{i}.weight", w) for i, w in enumerate(weights)]
    stats = parameter_statistics(named)
    for i, (name, _) in enumerate(named):  # 16 values of 300(i+1): a float16 sum of squares would overflow
        assert stats[name]["weight_norm"] == pytest.approx(4 * 300.0 * (i + 1), rel=1e-3)
    names, means, maxes = gradient_flow(named)
    assert names == [n for n, _ in named]
    assert means == pytest.approx([300.0 * (i + 1) for i in range(FAMILY_MIN)], rel=1e-3)


def test_families_are_parallel_modules_never_a_stack_of_layers():
    shapes = [(f"layers.{i}.attn.weight", (8, 8)) for i in range(24)]  # 24 layers: depths, not a family
    shapes += [(f"layers.{i}.experts.{e}.w1.weight", (4, 8)) for i in range(2) for e in range(16)]
    shapes += [(f"experts.{e}.weight", (4, 4)) for e in range(FAMILY_MIN)]  # named for experts
    shapes += [(f"blocks.0.heads.{h}.weight", (4, 4)) for h in range(FAMILY_MIN - 1)]  # too few
    shapes += [(f"blocks.1.mix.{h}.weight", (4, 4 + h % 2)) for h in range(2 * FAMILY_MIN)]  # two shapes of 8
    found = families(shapes)
    assert found["layers.0.experts.*.w1.weight"] == [f"layers.0.experts.{e}.w1.weight" for e in range(16)]
    expected = ["blocks.1.mix.*.weight", "experts.*.weight", "layers.0.experts.*.w1.weight"]
    assert sorted(found) == [*expected, "layers.1.experts.*.w1.weight"]
    assert found["blocks.1.mix.*.weight"] == [f"blocks.1.mix.{h}.weight" for h in range(0, 2 * FAMILY_MIN, 2)]


def test_a_family_is_told_by_its_mean_spread_and_extremes_and_its_outliers_are_named():
    values = {f"e.{i}.w": 1.0 + 0.01 * i for i in range(16)} | {"e.16.w": 9.0, "other": 2.0}
    members = {"e.*.w": [f"e.{i}.w" for i in range(17)]}
    kept = folded({"grad_norm": values}, members)["grad_norm"]
    family = list(values.values())[:17]
    assert kept["e.*.w"] == pytest.approx(statistics.fmean(family))
    assert kept["e.*.w/spread"] == pytest.approx(statistics.pstdev(family))
    assert (kept["e.*.w/min"], kept["e.*.w/max"], kept["other"]) == (1.0, 9.0, 2.0)
    assert len(kept) == 5
    assert outliers(values, members["e.*.w"]) == ["e.16.w"]
    assert outliers({n: 1.0 for n in members["e.*.w"]}, members["e.*.w"]) == []


def train(log_dir, fold, steps=12):
    model = moe()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with torch.no_grad():
        model[2].up[4].mul_(0)  # an expert with nothing: no gradient reaches through its zero weights
    with TrainingMonitor(log_dir, stats_every=2, families=fold).watch(model, optimizer) as monitor:
        for _ in range(steps):
            x = torch.randn(4 * COUNT, 8)
            loss = nn.functional.cross_entropy(model(x), x[:, :3].argmax(1))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            monitor.step(loss)
        monitor.epoch_end(0, {"train/loss": loss.item()})
    return model


def test_tensorboard_gets_one_chart_and_one_histogram_per_family_and_diagnosis_json_names_the_outlier(tmp_path):
    model = train(tmp_path, fold=True)
    events = load_events(tmp_path)
    histograms = events.Tags()["histograms"]
    assert "1.up.*_data" in histograms and "2.down.*_grad" in histograms
    assert not any(tag.startswith(("1.up.0", "2.down.11")) for tag in histograms)
    (joined,) = events.Histograms("1.up.*_data")
    values = torch.cat([p.detach().reshape(-1) for p in model[1].up]).numpy()
    assert joined.histogram_value.num == values.size
    assert joined.histogram_value.sum == pytest.approx(values.sum(), rel=1e-4, abs=1e-5)
    steps = load_events(tmp_path / "steps").Tags()["scalars"]
    assert {"grad_norm/1.up.*", "grad_norm/1.up.*/spread", "grad_norm/1.up.*/max"} <= set(steps)
    assert not any(tag.startswith("grad_norm/1.up.") and tag[len("grad_norm/1.up.") :].isdigit() for tag in steps)
    assert {"update_ratio/max", "update_ratio/min", "grad_norm/0.weight"} <= set(steps)
    facts = json.loads((tmp_path / "diagnosis.json").read_text())["facts"]["families"]
    assert facts["2.up.*"]["members"] == COUNT
    assert facts["2.up.*"]["outliers"]["weight_norm"][0] == "2.up.4"


def test_families_false_keeps_every_tensor_apart(tmp_path):
    train(tmp_path, fold=False)
    histograms = load_events(tmp_path).Tags()["histograms"]
    assert "1.up.0_data" in histograms and not any("*" in tag for tag in histograms)
    assert "families" not in json.loads((tmp_path / "diagnosis.json").read_text())["facts"]
    with pytest.raises(TypeError, match="families must be True or False"):
        TrainingMonitor(tmp_path / "x", families="yes")
