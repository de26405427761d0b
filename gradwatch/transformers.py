"""gradwatch in a Hugging Face `transformers.Trainer`: one callback.

    from gradwatch.transformers import MonitorCallback

    trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[MonitorCallback()])

Needs `pip install gradwatch[transformers]`.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.integrations.integration_utils import default_logdir
from transformers.utils import logging

from .monitor import TrainingMonitor, numbers, told

logger = logging.get_logger(__name__)


class MonitorCallback(TrainerCallback):
    """The gradwatch monitor for a `transformers.Trainer`: histograms of every weight and gradient,
    per-layer statistics every `stats_every` optimizer steps, the gradient-flow picture and the
    diagnosis each epoch, and the diagnosis's story at the end of training.

    Files go where the Trainer's TensorBoard logging goes: `log_dir` if given, else
    `TENSORBOARD_LOGGING_DIR`, else `<output_dir>/runs/<time>_<host>` (the TensorBoardCallback's
    default; set one of the first two to be sure both write one folder). It runs in every process,
    since statistics of sharded (FSDP2) models take them all, and only the main process writes. The
    gradients are read once per optimizer step, after gradient accumulation and clipping; the
    training loss is the mean of the `loss` the model returns over the step's batches (a model that
    returns none leaves the loss-based rules to the logged `eval_loss`). The diagnosis reads
    `eval_loss`, `eval_accuracy` and the training `loss` from the Trainer's logs; `classes` (names)
    tells it the number of classes. `monitor_options` go to `TrainingMonitor` (stats_every,
    hist_every, bins, thresholds, include, exclude).
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
        self._hook = None
        self._losses: list[torch.Tensor] = []  # the losses of the batches of this optimizer step
        self._epoch = 0
        self._epoch_steps = 0  # optimizer steps done in the epoch
        self._steps_per_epoch = math.inf
        self._metrics: dict[str, float] = {}  # the latest logged numbers
        self._pending: int | None = None  # an epoch whose evaluation is still to come

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model=None,
        **kwargs,
    ) -> None:
        # on every process: a sharded model's statistics take them all; the main one writes
        if model is None:
            return
        folder = (
            self.log_dir
            or getattr(args, "logging_dir", None)
            or os.getenv("TENSORBOARD_LOGGING_DIR")
        )
        self.monitor = TrainingMonitor(
            folder or os.path.join(args.output_dir, default_logdir()), **self.options
        )
        self.monitor.watch(
            model, kwargs.get("optimizer"), compiled=getattr(args, "torch_compile", False)
        )
        # the model unwrapped
        self._hook = self.monitor.model.register_forward_hook(self._keep_loss)
        with contextlib.suppress(TypeError):  # an iterable dataset may have no length: max_steps
            batches = len(kwargs.get("train_dataloader"))
            self._steps_per_epoch = math.ceil(batches / args.gradient_accumulation_steps)

    def _keep_loss(self, module: torch.nn.Module, inputs: Any, output: Any) -> None:
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if module.training and isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self._losses.append(loss.detach())
            if self.monitor.hooks.first.armed:  # with its graph, which the first step reads
                self.monitor.hooks.first.given = loss

    def on_epoch_begin(self, args, state, control, **kwargs) -> None:
        self._epoch = int(state.epoch or 0)
        self._epoch_steps = 0

    def on_optimizer_step(self, args, state, control, **kwargs) -> None:
        if self.monitor is None:
            return
        loss = torch.stack([loss.float() for loss in self._losses]).mean() if self._losses else None
        self._losses = []
        self._warn(self.monitor.step(loss))
        self._epoch_steps += 1
        # the Trainer clears the gradients after each step
        if self._epoch_steps == self._steps_per_epoch:
            self.monitor.log_epoch_parameters(self._epoch)

    def on_log(self, args, state, control, logs: dict | None = None, **kwargs) -> None:
        self._metrics.update(numbers(logs or {}))

    def on_epoch_end(self, args, state, control, **kwargs) -> None:
        if self.monitor is None:
            return
        # the evaluation of this epoch comes next: diagnose with its metrics
        if control.should_evaluate:
            self._pending = self._epoch
        else:
            self._epoch_end(self._epoch)

    def on_evaluate(self, args, state, control, metrics: dict | None = None, **kwargs) -> None:
        if self._pending is not None:
            self.on_log(args, state, control, metrics)
            self._epoch_end(self._pending)

    def _epoch_end(self, epoch: int) -> None:
        self._pending = None
        self._warn(self.monitor.epoch_end(epoch, {}, classes=self.classes, metrics=self._metrics))

    def _warn(self, findings: list) -> None:
        for finding in findings if self.monitor.is_writer else ():
            logger.warning(f"gradwatch: {finding}")

    def on_train_end(self, args, state, control, **kwargs) -> None:
        if self.monitor is None:
            return
        if self._pending is not None:
            self._epoch_end(self._pending)
        self._hook.remove()
        self.monitor.close()  # the run as a whole is judged: before its story is told
        if self.monitor.is_writer:
            print(told(self.monitor), flush=True)
        self.monitor = None
