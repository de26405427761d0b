"""Copies of a watched model, optimizer or monitor: an EMA made by copy.deepcopy, a whole model saved with torch.save,
a dataset that holds the monitor in spawned DataLoader workers. None of them may fail because of the monitor, none
feeds it, and none writes to its run folder; the watched model keeps no hook after close()."""

import copy
import io
import subprocess
import sys
import textwrap

import torch
import torch.nn as nn
from conftest import ROOT, load_events
from torch.optim.swa_utils import AveragedModel

from gradwatch import TrainingMonitor
from gradwatch.hooks import ignore


def model_and_optimizer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def train(model, optimizer, monitor, steps):
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(torch.randn(8, 4)), torch.randint(0, 2, (8,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        monitor.step(loss)


def hooks_of(model):
    found = [hook for module in model.modules() for hook in module._forward_hooks.values()]
    return found + [hook for p in model.parameters() for hook in (p._backward_hooks or {}).values()]


def test_copies_of_a_watched_model_hold_no_hook_of_the_monitor_and_do_not_feed_it(tmp_path):
    model, optimizer = model_and_optimizer()
    monitor = TrainingMonitor(tmp_path / "run", stats_every=2).watch(model, optimizer)
    train(model, optimizer, monitor, 3)  # the hooks of step 4's statistics are placed
    assert len(hooks_of(model)) == 3  # the ReLU's, the model output's, the gradient-clearing probe

    ema = copy.deepcopy(model)
    averaged = AveragedModel(model)
    saved = io.BytesIO()
    torch.save(model, saved)
    loaded = torch.load(io.BytesIO(saved.getvalue()), weights_only=False)
    copied_optimizer = copy.deepcopy(optimizer)
    for copied in (ema, averaged.module, loaded):
        assert hooks_of(copied) and all(hook is ignore for hook in hooks_of(copied))
    assert not copied_optimizer._optimizer_step_pre_hooks or all(
        hook is ignore for hook in copied_optimizer._optimizer_step_pre_hooks.values()
    )

    before = dict(monitor.hooks.values)
    for copied in (ema, loaded):
        copied.train()
        copied(torch.randn(8, 4)).sum().backward()
    assert monitor.hooks.values == before and not monitor.hooks.output  # the copies' passes were not measured

    train(model, optimizer, monitor, 1)
    record = monitor.diagnosis.records[-1]
    assert record["loop"]["step"] == 4 and "1" in record["activations"]  # the model's own pass was measured


def test_no_hook_stays_on_the_model_after_close_whatever_the_cadence(tmp_path):
    model, optimizer = model_and_optimizer()
    monitor = TrainingMonitor(tmp_path / "run", stats_every=1).watch(model, optimizer)
    for epoch in range(3):
        train(model, optimizer, monitor, 3)
        monitor.epoch_end(epoch, {"train/loss": 1.0})
        assert len(hooks_of(model)) <= 3  # never two of one kind: each placing takes the last one off
    monitor.close()
    assert hooks_of(model) == [] and not optimizer._optimizer_step_pre_hooks


def test_a_copy_of_a_monitor_that_has_written_writes_nothing(tmp_path):
    model, optimizer = model_and_optimizer()
    fresh = copy.deepcopy(TrainingMonitor(tmp_path / "fresh"))
    assert fresh.sink.writes  # nothing written yet: copied whole, as for torch.multiprocessing.spawn

    monitor = TrainingMonitor(tmp_path / "run", stats_every=1).watch(model, optimizer)
    train(model, optimizer, monitor, 2)
    monitor.epoch_end(0, {"train/loss": 1.0})
    monitor.flush()
    files = sorted(p.name for p in (tmp_path / "run").rglob("*"))
    copied = copy.deepcopy(monitor)
    assert not copied.sink.writes and copied.guard.sink is copied.sink
    copied.epoch_end(1, {"train/loss": 1.0})
    copied.close()
    assert sorted(p.name for p in (tmp_path / "run").rglob("*")) == files


WORKERS = """
import sys
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset
from gradwatch import TrainingMonitor


class Holding(Dataset):  # a dataset that keeps a reference to the monitor, as a LightningModule's bound method does
    def __init__(self, monitor):
        self.monitor = monitor

    def __len__(self):
        return 32

    def __getitem__(self, i):
        return torch.full((4,), float(i % 2)), i % 2


if __name__ == "__main__":
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = TrainingMonitor(sys.argv[1], stats_every=2).watch(model, optimizer)
    loader = DataLoader(Holding(monitor), batch_size=8, num_workers=2, multiprocessing_context="spawn")
    for epoch in range(3):  # the workers are spawned again each epoch, copying a monitor that has written
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            monitor.step(loss)
        monitor.epoch_end(epoch, {"train/loss": loss.item()})
    monitor.close()
"""


def test_a_monitor_held_by_a_dataset_in_spawned_dataloader_workers(tmp_path):
    (tmp_path / "workers.py").write_text(textwrap.dedent(WORKERS))
    run = tmp_path / "run"
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "workers.py", str(run)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "Error" not in result.stderr, result.stderr
    assert len(list(run.glob("events.out.tfevents.*"))) == 1  # the workers opened no event file of their own
    assert len(list((run / "steps").glob("events.out.tfevents.*"))) == 1
    events = load_events(run)
    assert [e.step for e in events.Histograms("0.weight_grad")] == [1, 2, 3]
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]
