"""The Lightning callback in a real `lightning.Trainer` on the CPU: what it writes, read back with TensorBoard's
loader; the gradients it logs under "16-mixed" and gradient accumulation against those Lightning hands to the
module; resuming from a checkpoint; rank 0 alone writing under DDP; README's snippet as printed."""

import json

import lightning as L
import pytest
import torch
from conftest import ROOT, load_events, readme_python, run_script
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradwatch.lightning import MonitorCallback


class Recorder(L.LightningModule):
    """A small classifier that records each batch's loss and, where Lightning says they are final (unscaled,
    accumulated), the norm of all gradients before each optimizer step."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
        self.losses, self.grad_norms = [], []

    def training_step(self, batch, batch_idx):
        inputs, labels = batch
        loss = nn.functional.cross_entropy(self.net(inputs), labels)
        self.losses.append(loss.item())
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def on_before_optimizer_step(self, optimizer):
        norms = [p.grad.float().norm() for p in self.parameters() if p.grad is not None]
        self.grad_norms.append(torch.linalg.vector_norm(torch.stack(norms)).item())

    def validation_step(self, batch, batch_idx):
        inputs, labels = batch
        logits = self.net(inputs)
        self.log("val_loss", nn.functional.cross_entropy(logits, labels))
        self.log("val_acc", (logits.argmax(1) == labels).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loaders(size=256, batch_size=16):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(size, 8, 8, generator=generator)
    y = (x[:, 0, 0] > 0).long() + 2 * (x[:, 1, 1] > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=batch_size), DataLoader(TensorDataset(x, y), batch_size=64)


def fit(tmp_path, module, callback, ckpt_path=None, **trainer_options):
    options = dict(max_epochs=2, accelerator="cpu", default_root_dir=tmp_path, enable_progress_bar=False)
    trainer = L.Trainer(callbacks=[callback], enable_model_summary=False, **{**options, **trainer_options})
    trainer.fit(module, *loaders(), ckpt_path=ckpt_path)
    return trainer


def scalars(accumulator, tag):
    return {event.step: event.value for event in accumulator.Scalars(tag)}


def test_unscaled_accumulated_gradients_and_the_mean_loss_once_per_optimizer_step(tmp_path):
    torch.manual_seed(0)
    module, callback = Recorder(), MonitorCallback(stats_every=1, classes=["a", "b", "c", "d"])
    # Lightning's "16-mixed", with the GradScaler it uses on a GPU (on the CPU it would switch to bf16 and no scaler)
    fp16 = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    trainer = fit(tmp_path, module, callback, plugins=[fp16], accumulate_grad_batches=2)
    assert trainer.precision_plugin.scaler.get_scale() >= 2**10  # scaled gradients would be that much larger

    run = tmp_path / "lightning_logs" / "version_0"  # the TensorBoardLogger's folder: one run in TensorBoard
    steps = load_events(run / "steps")
    skipped = scalars(steps, "amp/skipped_steps") if "amp/skipped_steps" in steps.Tags()["scalars"] else {}
    logged = scalars(steps, "grad_norm/total")
    assert len(module.grad_norms) == 16 == len(logged) + len(skipped)  # 2 epochs of 16 batches, 2 per step
    for step, norm in logged.items():
        assert norm == pytest.approx(module.grad_norms[step - 1], rel=1e-4)
    for step, loss in scalars(steps, "loss").items():  # the mean over the step's two batches
        assert loss == pytest.approx(sum(module.losses[2 * step - 2 : 2 * step]) / 2, rel=1e-5)

    epochs = load_events(run)
    for tag in ("net.1.weight_data", "net.1.weight_grad", "net.3.bias_grad"):
        assert [event.step for event in epochs.Histograms(tag)] == [1, 2]
    assert "val_acc" in epochs.Tags()["scalars"]  # the logger's own scalars, in the same run
    assert [event.step for event in epochs.Images("gradient_flow")] == [1, 2]
    assert isinstance(json.loads((run / "diagnosis.json").read_text())["findings"], list)
    assert len(callback.state_dict()["history"]) == 2


def test_with_gradient_clip_val_the_norm_before_clipping_is_logged_and_diagnosed(tmp_path):
    torch.manual_seed(0)
    module, callback = Recorder(), MonitorCallback(stats_every=1)
    fp16 = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    fit(tmp_path, module, callback, plugins=[fp16], gradient_clip_val=0.05)
    run = tmp_path / "lightning_logs" / "version_0"
    steps = load_events(run / "steps")
    before, after = scalars(steps, "clip/grad_norm"), scalars(steps, "grad_norm/total")
    assert len(before) >= 28 and before.keys() == after.keys()  # 32 steps, less any the scaler skipped
    for step, norm in before.items():  # the unscaled norm Lightning hands the module, before it clips
        assert norm == pytest.approx(module.grad_norms[step - 1], rel=1e-4)
        assert after[step] == pytest.approx(min(norm, 0.05), rel=1e-3)
    assert [event.value for event in load_events(run).Scalars("clip/clipped_share")] == [1.0, 1.0]
    # the diagnosis reads the clipping: mostly_clipped stays silent only while the loss falls
    told = "mostly_clipped" in [
        finding["rule"] for finding in json.loads((run / "diagnosis.json").read_text())["findings"]
    ]
    losses = list(scalars(steps, "loss").values())
    assert told or losses[-1] < losses[0]


def test_a_fit_resumed_from_its_checkpoint_goes_on_with_the_monitor_state(tmp_path):
    first = fit(tmp_path, Recorder(), MonitorCallback(), max_epochs=1)
    checkpoint = next((tmp_path / "lightning_logs" / "version_0" / "checkpoints").glob("*.ckpt"))
    callback = MonitorCallback()
    fit(tmp_path, Recorder(), callback, max_epochs=2, ckpt_path=checkpoint)
    state = callback.state_dict()
    assert state["steps"] == 2 * first.global_step == 32
    assert [summary["epoch"] for summary in state["history"]] == [0, 1]


def test_with_another_logger_it_writes_a_folder_of_its_own(tmp_path):
    fit(tmp_path, Recorder(), MonitorCallback(include=["net.3.*"]), max_epochs=1, logger=CSVLogger(tmp_path))
    histograms = load_events(tmp_path / "gradwatch").Tags()["histograms"]
    assert sorted(histograms) == ["net.3.bias_data", "net.3.bias_grad", "net.3.weight_data", "net.3.weight_grad"]


DDP_SCRIPT = """
import sys, torch, lightning as L
sys.path.insert(0, {tests!r})
from test_lightning import Recorder, loaders
from gradwatch.lightning import MonitorCallback
torch.manual_seed(0)
trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=2, strategy="ddp_spawn", default_root_dir={root!r},
                    callbacks=[MonitorCallback()], enable_progress_bar=False, enable_model_summary=False)
trainer.fit(Recorder(), *loaders())
"""


def test_under_ddp_only_rank_zero_writes(tmp_path):
    result = run_script("-c", DDP_SCRIPT.format(tests=str(ROOT / "tests"), root=str(tmp_path)))
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "lightning_logs" / "version_0"
    assert len(list((run / "steps").glob("events.out.tfevents.*"))) == 1  # one writer, not one per process
    assert [event.step for event in load_events(run).Histograms("net.1.weight_grad")] == [1]
    assert (run / "diagnosis.json").is_file() and not list(tmp_path.rglob("gradwatch-errors.log"))


def test_the_readme_snippet_runs_as_printed(tmp_path):
    (tmp_path / "snippet.py").write_text(readme_python("#### A Lightning example"))
    result = run_script(tmp_path / "snippet.py", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "lightning_logs" / "version_0"
    assert [event.step for event in load_events(run).Histograms("net.1.weight_grad")] == [1, 2, 3]
    assert json.loads((run / "diagnosis.json").read_text())["findings"] == []


LIGHTNING_FSDP_SCRIPT = """
import json, sys, torch, lightning as L
from pathlib import Path
sys.path.insert(0, {tests!r})
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard
from test_lightning import Recorder, loaders
from gradwatch.lightning import MonitorCallback


class Sharded(Recorder):
    def configure_model(self):
        mesh = self.device_mesh["data_parallel"]
        for layer in (self.net[1], self.net[3], self.net):
            fully_shard(layer, mesh=mesh)

    def on_before_optimizer_step(self, optimizer):  # torch's own norm of the DTensor gradients: the whole model's
        norm = torch.nn.utils.get_total_norm([p.grad for p in self.parameters() if p.grad is not None])
        self.grad_norms.append(norm.full_tensor().item())

    def on_fit_end(self):
        if self.global_rank == 0:
            (Path({root!r}) / "norms.json").write_text(json.dumps(self.grad_norms))


torch.manual_seed(0)
strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=2, strategy=strategy, default_root_dir={root!r},
                    callbacks=[MonitorCallback(stats_every=1)], enable_progress_bar=False, enable_model_summary=False)
trainer.fit(Sharded(), *loaders())
"""


def test_a_model_sharded_by_lightning_is_watched_whole(tmp_path):
    """ModelParallelStrategy with fully_shard (FSDP2), two gloo processes: the callback runs on both, rank 0
    writes, and the logged total gradient norm is torch's norm of the whole sharded model at every step."""
    script = tmp_path / "fsdp.py"
    script.write_text(LIGHTNING_FSDP_SCRIPT.format(tests=str(ROOT / "tests"), root=str(tmp_path)))
    result = run_script(script, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "lightning_logs" / "version_0"
    assert len(list((run / "steps").glob("events.out.tfevents.*"))) == 1
    norms = json.loads((tmp_path / "norms.json").read_text())
    logged = [e.value for e in load_events(run / "steps").Scalars("grad_norm/total")]
    assert len(logged) == len(norms) == 8 and logged == pytest.approx(norms, rel=1e-5)
    histogram = load_events(run).Histograms("net.1.weight_data")[0].histogram_value
    assert histogram.num == 64 * 32  # the whole weight, not rank 0's half
    assert not list(tmp_path.rglob("gradwatch-errors.log"))


class Endless(torch.utils.data.IterableDataset):
    """loaders()'s task without end: a run counted in max_steps."""

    def __iter__(self):
        generator = torch.Generator().manual_seed(0)
        while True:
            x = torch.randn(8, 8, generator=generator)
            yield x, (x[0, 0] > 0).long() + 2 * (x[1, 1] > 0).long()


def test_a_max_steps_run_is_diagnosed_in_windows_of_steps_while_it_trains(tmp_path):
    callback = MonitorCallback(stats_every=10)
    trainer = L.Trainer(callbacks=[callback], max_steps=600, accelerator="cpu", default_root_dir=tmp_path,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)  # fmt: skip
    trainer.fit(Recorder(), DataLoader(Endless(), batch_size=16))
    lines = (tmp_path / "lightning_logs" / "version_0" / "gradwatch-summaries.jsonl").read_text().splitlines()
    summaries = [json.loads(line)["summary"] for line in lines[:-1]]
    assert [(s["unit"], s["step"]) for s in summaries][:2] == [("steps", 260), ("steps", 520)]
    assert summaries[-1]["step"] == 600  # the rest: at the epoch's end, or at close()
    assert json.loads(lines[-1])["ended"]["step"] == 600  # then the run's end, which `diagnose` replays


class SoftmaxTwice(Recorder):
    """README's bug in a LightningModule: probabilities handed to cross-entropy."""

    def training_step(self, batch, batch_idx):
        inputs, labels = batch
        return nn.functional.cross_entropy(self.net(inputs).softmax(1), labels)


def test_the_loss_graph_is_read_from_the_loss_lightning_backpropagates(tmp_path):
    """Lightning hands on_train_batch_end the loss detached: the callback reads the graph from on_before_backward,
    and the line that applies the softmax is named at the first step."""
    run = tmp_path / "run"
    fit(tmp_path, SoftmaxTwice(), MonitorCallback(log_dir=run), max_epochs=1)
    saved = json.loads((run / "diagnosis.json").read_text())
    first = saved["findings"][0]
    assert first["rule"] == "softmax_before_loss" and first["step"] == 1
    assert "tests/test_lightning.py:" in first["message"] and saved["facts"]["loss"]["reached"] == 4
