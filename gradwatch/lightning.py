"""gradwatch in a Lightning `Trainer`: one callback.

    from gradwatch.lightning import MonitorCallback

    trainer = lightning.Trainer(callbacks=[MonitorCallback()])

Needs `pip install gradwatch[lightning]`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from .monitor import TrainingMonitor, numbers, told


class MonitorCallback(Callback):
    """The gradwatch monitor for a `lightning.Trainer` fit: histograms of every weight and gradient,
    per-layer statistics every `stats_every` optimizer steps, the gradient-flow picture and the
    diagnosis each epoch, and the diagnosis's story at the end of the fit.

    Files go into the TensorBoardLogger's version folder (`lightning_logs/version_N`), beside the
    logger's own events, so that TensorBoard shows one run; with another logger or none, into
    `<default_root_dir>/gradwatch`; `log_dir` chooses. It runs on every rank, since statistics of
    sharded (FSDP2) models take them all, and only global rank 0 writes. The gradients are read once
    per optimizer step (after gradient accumulation, unscaled under "16-mixed"), and the training
    loss is the mean over the step's batches. The diagnosis reads the epoch's `train_loss`,
    `val_loss`, `val_acc` and the other tags of README's list among the logged metrics; `classes`
    (names) tells it the number of classes. The monitor's state goes into Lightning's checkpoints,
    so a fit resumed with `ckpt_path` diagnoses as if it had not stopped. With `gradient_clip_val`
    (clipping by norm), the norm before clipping goes to the clipping scalars and rule.
    `monitor_options` go to `TrainingMonitor` (stats_every, hist_every, bins, thresholds, include,
    exclude).
    """

    def __init__(
        self,
        log_dir: str | os.PathLike | None = None,
        classes: list[str] | None = None,
        **monitor_options,
    ):
        self.log_dir = log_dir
        self.classes = classes
        self.options = monitor_options
        self.monitor: TrainingMonitor | None = None
        # the sum of the loss over the batches of this optimizer step
        self._loss: torch.Tensor | None = None
        self._global_step = 0
        # under gradient_clip_val: the step's norm before clipping
        self._grad_norm: torch.Tensor | None = None
        self._state: dict[str, Any] | None = None  # the monitor's state from a checkpoint

    def _folder(self, trainer: Trainer) -> str:
        if self.log_dir is not None:
            return os.fspath(self.log_dir)
        if isinstance(trainer.logger, TensorBoardLogger):
            return trainer.logger.log_dir
        return os.path.join(trainer.default_root_dir, "gradwatch")

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # on every rank: a sharded model's statistics take them all; global rank 0 alone writes
        self.monitor = TrainingMonitor(self._folder(trainer), **self.options)
        optimizer = trainer.optimizers[0] if len(trainer.optimizers) == 1 else None
        self.monitor.watch(pl_module, optimizer)
        if self._state:  # from a checkpoint: it goes on from there
            self.monitor.load_state_dict(self._state)
        self._global_step = trainer.global_step

    def on_before_backward(
        self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor
    ) -> None:
        """The loss with its graph (Lightning hands on_train_batch_end the loss detached), for the
        monitor's reading of the loss's graph at the first step."""
        if self.monitor is not None and self.monitor.hooks.first.armed:
            self.monitor.hooks.first.given = loss

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: Any
    ) -> None:
        """Lightning clips right after this hook: the norm before clipping, for the clipping scalars
        and rule."""
        by_norm = (trainer.gradient_clip_algorithm or "norm") == "norm"
        if self.monitor is None or not trainer.gradient_clip_val or not by_norm:
            return
        grads = [
            p.grad
            for group in optimizer.param_groups
            for p in group["params"]
            if p.grad is not None
        ]
        with self.monitor.guard("the norm before clipping"):  # never the end of the fit
            self._grad_norm = torch.nn.utils.get_total_norm(grads) if grads else None

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.monitor is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        # divided by accumulate_grad_batches already: the sum is the mean
        if isinstance(loss, torch.Tensor):
            self._loss = loss.detach() if self._loss is None else self._loss + loss.detach()
        if trainer.global_step == self._global_step:  # accumulating: no optimizer step yet
            return
        self._global_step = trainer.global_step
        clip = {}
        if self._grad_norm is not None:  # set only under gradient_clip_val
            clip = dict(grad_norm=self._grad_norm, max_norm=float(trainer.gradient_clip_val))
        for finding in self.monitor.step(self._loss, **clip):
            rank_zero_warn(f"gradwatch: {finding}")
        self._loss = None
        self._grad_norm = None
        if batch_idx + 1 == trainer.num_training_batches:  # validation will clear the gradients
            self.monitor.log_epoch_parameters(trainer.current_epoch)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.monitor is None:
            return
        # the logger writes them: the diagnosis only reads them
        metrics = numbers(trainer.callback_metrics)
        for finding in self.monitor.epoch_end(
            trainer.current_epoch, {}, classes=self.classes, metrics=metrics
        ):
            rank_zero_warn(f"gradwatch: {finding}")

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        monitor = self.monitor
        if monitor is not None:
            self.teardown(trainer, pl_module, "fit")  # the run as a whole is judged: then told
            rank_zero_info(told(monitor))

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.monitor is not None:
            self.monitor.close()
            self._state = self.monitor.state_dict()  # what state_dict() gives after the fit
            self.monitor = None

    def state_dict(self) -> dict[str, Any]:
        return self.monitor.state_dict() if self.monitor is not None else dict(self._state or {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._state = dict(state_dict)
