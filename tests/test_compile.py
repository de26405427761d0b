"""The monitor on a torch.compile'd model: no graph break of its own, and the same statistics as without compiling.
The "aot_eager" backend traces forward and backward as inductor does, without generating code (seconds, not
a minute, on the CPU)."""

import tempfile

import pytest
import torch
from conftest import ROOT, load_events, run_script
from torch import nn
from torch._dynamo.utils import counters

from gradwatch import TrainingMonitor


def train(compiled, steps=6, stats_every=2):
    """The statistics records of a small ReLU/tanh net trained for `steps`, compiled ("wrapper": the module
    torch.compile returns; "in place": Module.compile()) or not (same seed)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 4))
    with torch.no_grad():
        model[0].bias[:12] = -10.0  # 12 of the 32 ReLU units dead
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    forward = torch.compile(model, backend="aot_eager") if compiled == "wrapper" else model
    if compiled == "in place":
        model.compile(backend="aot_eager")
    inputs, labels = torch.randn(steps, 8, 16), torch.randint(0, 4, (steps, 8))
    with tempfile.TemporaryDirectory() as folder, TrainingMonitor(folder, stats_every=stats_every) as monitor:
        monitor.watch(forward, optimizer)
        for x, y in zip(inputs, labels):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(forward(x), y)
            loss.backward()
            optimizer.step()
            monitor.step(loss)
        return monitor.state_dict()["records"]


@pytest.mark.parametrize("how", ["wrapper", "in place"])
def test_no_graph_breaks_and_the_statistics_of_the_uncompiled_model(how):
    torch._dynamo.reset()
    counters.clear()
    compiled = train(compiled=how)
    assert dict(counters["graph_break"]) == {} and counters["stats"]["unique_graphs"] >= 1  # it did compile
    plain = train(compiled=None)
    assert len(compiled) == len(plain) == 4  # steps 1 and 2 (the first two after watch()), 4 and 6
    for ours, theirs in zip(compiled, plain):
        assert ours["activations"] == theirs["activations"]
        assert ours["activations"]["1"]["share"] >= 12 / 32  # measured inside the compiled graph
        for name in ("0.weight", "2.weight", "4.bias"):
            assert ours[name]["grad_norm"] == pytest.approx(theirs[name]["grad_norm"], rel=1e-5)
            assert ours[name]["update_ratio"] == pytest.approx(theirs[name]["update_ratio"], rel=1e-5)


def test_train_py_compile(tmp_path):
    args = ["--compile", "aot_eager", "--epochs", "1", "--log-dir", tmp_path, "--run-name", "c", "--device", "cpu"]
    result = run_script(ROOT / "train.py", *args)
    assert result.returncode == 0, result.stderr[-2000:]
    steps = load_events(tmp_path / "c" / "steps")
    assert {"dead_share/relu1", "grad_norm/conv1.weight", "loss"} <= set(steps.Tags()["scalars"])
    assert "conv1.weight_grad" in load_events(tmp_path / "c").Tags()["histograms"]  # its own names, no _orig_mod
