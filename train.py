"""Train the tutorial's CNN on a list of images and watch every layer's weights and gradients in TensorBoard.

python train.py                           # sample digits in Data/, run folder Result/<timestamp>
tensorboard --logdir Result               # then open http://localhost:6006
python train.py --resume Result/<run>     # continue a stopped run (add --epochs N to train longer)
python train.py --help                    # every option and its default
torchrun --nproc_per_node 2 train.py --fsdp  # shard the model over 2 processes (FSDP2)

The options are in options.py, the run folder and its checkpoints in checkpoints.py, the processes
of a torchrun job in distributed.py, the input pipeline in data.py; what watches the training is
the gradwatch package.
"""

import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # Ctrl-C while the libraries load (seconds) ends quietly; main() restores KeyboardInterrupt
    # os._exit, not an exception: one raised inside torch's import can surface in its C++ code and abort
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))
    if {"-h", "--help"} & set(sys.argv[1:]):  # answered before torch loads (seconds, more under load)
        from options import parse_args

        parse_args()

import numpy as np
import torch
import torch.nn as nn

import checkpoints
from checkpoints import Progress, RunError
from data import build_loaders, load_normalisation
from distributed import Distributed, shard_model
from gradwatch import TrainingMonitor, confusion_matrix_image
from gradwatch.diagnosis import indented
from options import hyperparameters, param_groups, parse_args
from utils import DataListError, ImageReadError, Net, class_report, validate

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
TENSORBOARD_HISTOGRAM_STEPS = 100  # what TensorBoard's default loader keeps per histogram tag
TOTALS = ("loss_sum", "correct", "seen")  # of the epoch so far


def warn(message):
    print(message, file=sys.stderr, flush=True)


class StopRequest:
    """Turns Ctrl-C (SIGINT) and SIGTERM into a flag the loop checks at safe points; a second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        name = signal.Signals(signum).name
        warn(f"\n{name} received: stopping after this iteration and saving a checkpoint (Ctrl-C again to stop at once)")

    def __enter__(self):
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


@dataclass
class Run:
    """One training run: what setup() builds, and where the loop stands."""

    args: Any
    dist: Distributed
    run_dir: Path
    classes: list
    loaders: tuple  # (training batches, validation batches)
    net: nn.Module  # what is logged and saved (with --fsdp, sharded itself)
    model: nn.Module  # what trains: net, in DistributedDataParallel under torchrun, compiled with --compile
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    autocast: Any  # the forward pass's mixed precision, or nothing
    monitor: TrainingMonitor | None = None
    progress: Progress = field(default_factory=Progress)  # saved in every checkpoint


def load_data(args, dist):
    """Check the lists and every image; returns ((training batches, validation batches), classes)."""
    start = time.perf_counter()
    mean, std, normalisation = load_normalisation(args.data)
    shard = dict(rank=dist.rank, world_size=dist.world_size)
    train_loader, valid_loader, classes, cached = build_loaders(
        args.data, args.batch_size, args.seed, dist.device, args.workers, args.cache, mean, std, **shard
    )
    images = f"{train_loader.batch_sampler.size} training and {valid_loader.batch_sampler.size} validation images"
    how = "decoded once, kept in memory" if cached else "decoded every epoch (no cache)"
    print(f"Checked {images} in {time.perf_counter() - start:.1f}s; {how}\nNormalising with {normalisation}")
    if not (args.data / "classes.txt").is_file():
        print(f"{args.data / 'classes.txt'} not found: naming the {len(classes)} classes 0..{len(classes) - 1}")
    return (train_loader, valid_loader), classes


def setup(args, dist):
    """Check the data, then build the model, its optimiser and schedule and the run folder of a new or
    resumed run."""
    if args.amp == "fp16" and dist.device.type != "cuda":
        raise RunError("--amp fp16 needs a CUDA device; use --amp bf16 on the CPU")
    loaders, classes = load_data(args, dist)
    if dist.is_main:
        checkpoints.prepare_run_dir(args)
        checkpoints.lock_run_dir(args.log_dir / args.run_name)
    args.run_name = dist.broadcast(args.run_name)

    torch.manual_seed(args.seed)
    net = Net(num_classes=len(classes))
    net.initialize_weights()
    net.to(dist.device)
    if args.fsdp:  # before the optimizer is built: it must hold the sharded parameters
        shard_model(net, dist)
    try:
        groups = param_groups(net, args.lr, args.weight_decay, args.layer_lr, args.layer_wd)
    except ValueError as err:
        raise RunError(f"--layer-lr/--layer-wd: {err}") from None
    optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, dampening=args.dampening)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.step_size, gamma=args.gamma)
    model = nn.parallel.DistributedDataParallel(net) if dist.world_size > 1 and not args.fsdp else net
    model = torch.compile(model, backend=args.compile) if args.compile else model
    scaler = torch.amp.GradScaler(dist.device.type, enabled=args.amp == "fp16")
    # entering even a disabled autocast costs time on every step: none without --amp
    autocast = torch.autocast(dist.device.type, dtype=AMP_DTYPES[args.amp]) if args.amp != "off" else nullcontext()
    run_dir = args.log_dir / args.run_name
    return Run(args, dist, run_dir, classes, loaders, net, model, optimizer, scheduler, scaler, autocast)


def open_monitor(run, monitor_state):
    """The monitor of the run, continuing from its saved state on resume: the diagnosis compares with the
    epochs before the stop, and each step axis is rewritten from just after the checkpoint."""
    args, progress = run.args, run.progress
    options = dict(thresholds=args.thresholds, stats_every=args.stats_every, hist_every=args.hist_every)
    if args.resume is not None and not monitor_state:  # a checkpoint of a version that saved no monitor state
        options.update(purge_epoch=progress.epoch, purge_step=progress.step + 1, start_step=progress.step)
    elif args.resume is None and any(run.run_dir.glob("events.out.tfevents.*")):  # started again: hide the old
        options.update(purge_epoch=0, purge_step=1)
    monitor = TrainingMonitor(run.run_dir, **options)  # stats_every None: the monitor's default
    monitor.watch(run.model, run.optimizer)  # the model as trained: compiled, it keeps its activation hooks
    if monitor_state:
        try:
            monitor.load_state_dict(monitor_state)
        except ValueError as err:  # edited, or written by other code: the diagnosis starts again
            monitor.close()
            afresh = f"its diagnosis starts afresh at epoch {progress.epoch + 1}"
            warn(f"warning: {run.run_dir / 'last.pt'}: the monitor's saved state is damaged ({err}); {afresh}")
            return open_monitor(run, None)
    steps = max(args.epochs, len(run.loaders[0]) * args.epochs // args.hist_every if args.hist_every else 0)
    if steps > TENSORBOARD_HISTOGRAM_STEPS:
        everything = f"tensorboard --logdir {args.log_dir} --samples_per_plugin histograms=0"
        print(
            f"Note: this run logs {steps} histogram steps per tag; TensorBoard shows a sample of "
            f"{TENSORBOARD_HISTOGRAM_STEPS} unless started with: {everything}"
        )
    return monitor


def train_step(run, inputs, labels):
    """One optimizer step. Returns the loss, the outputs and the gradient norm before clipping (None
    without --clip-grad-norm)."""
    run.optimizer.zero_grad(set_to_none=True)
    with run.autocast:  # forward
        outputs = run.model(inputs)
        loss = nn.functional.cross_entropy(outputs, labels)
    run.scaler.scale(loss).backward()
    grad_norm = clip_gradients(run) if run.args.clip_grad_norm else None
    run.scaler.step(run.optimizer)  # unscales the gradients first: the monitor sees true values
    run.scaler.update()
    return loss, outputs, grad_norm


def clip_gradients(run):
    """Clip the gradients to --clip-grad-norm and return their total norm before clipping: of the unscaled
    gradients under --amp fp16, of the whole model under --fsdp (summed over the shards)."""
    run.scaler.unscale_(run.optimizer)  # scaler.step() then skips unscaling again
    return nn.utils.clip_grad_norm_(run.net.parameters(), run.args.clip_grad_norm)


class Window:
    """TOTALS of the iterations since the last progress line, kept on the training device."""

    def __init__(self, device):
        self.sums = torch.zeros(len(TOTALS), dtype=torch.float64, device=device)

    def add(self, loss, outputs, labels):
        self.sums[0] += loss.detach() * len(labels)
        self.sums[1] += (outputs.argmax(dim=1) == labels).sum()
        self.sums[2] += len(labels)

    def add_to(self, totals, dist):
        """Add them, summed over all ranks, to the epoch's totals, and start again from zero."""
        # note: a CPU-GPU sync point, once per progress line
        for key, value in zip(TOTALS, dist.sum(self.sums.tolist())):
            totals[key] += value
        self.sums.zero_()


def train_one_epoch(run, stop_request):
    """Train the epoch run.progress stands at, from its batches_done-th iteration on, printing progress.
    Returns None at the epoch's end, or an exit status after a checkpoint when it had to stop early."""
    args, dist, loader, progress = run.args, run.dist, run.loaders[0], run.progress
    run.net.train()
    loader.batch_sampler.set_epoch(progress.epoch, progress.batches_done)
    if progress.batches_done == 0:
        progress.totals = dict.fromkeys(TOTALS, 0.0)
    window = Window(dist.device)
    try:
        for inputs, labels in loader:
            inputs, labels = inputs.to(dist.device, non_blocking=True), labels.to(dist.device, non_blocking=True)
            loss, outputs, grad_norm = train_step(run, inputs, labels)
            progress.step += 1
            progress.batches_done += 1
            # statistics and step histograms, when due
            urgent = run.monitor.step(loss, grad_norm=grad_norm, max_norm=args.clip_grad_norm)
            # note: with --stop-on-nonfinite, reading the loss is a CPU-GPU sync point every step
            if args.stop_on_nonfinite and dist.any(bool(urgent) or not math.isfinite(loss.item())):
                return stop_on_nonfinite(run, urgent)
            window.add(loss, outputs, labels)
            if progress.batches_done % args.print_every == 0 or progress.batches_done == len(loader):
                window.add_to(progress.totals, dist)
                print_progress(run)
            if dist.any(stop_request.requested) and progress.batches_done < len(loader):
                window.add_to(progress.totals, dist)
                stop(run, "Stopped")
                return 130
    except ImageReadError:
        window.add_to(progress.totals, dist)
        stop(run, "Stopped on a bad image")
        raise
    return None


def format_epoch(epoch, epochs):
    return f"Epoch[{epoch + 1:0>3}/{epochs:0>3}]"


def print_progress(run):
    progress = run.progress
    totals = progress.totals
    iteration = f"Iteration[{progress.batches_done:0>3}/{len(run.loaders[0]):0>3}]"
    loss = totals["loss_sum"] / totals["seen"]
    accuracy = totals["correct"] / totals["seen"]
    print(
        f"Training: {format_epoch(progress.epoch, run.args.epochs)} {iteration} Loss: {loss:.4f} Acc: {accuracy:.2%}",
        flush=True,
    )


def stop(run, why):
    """Save last.pt where the loop stands, and say how to go on."""
    checkpoints.save(run, "last.pt")
    where = f"epoch {run.progress.epoch + 1}, iteration {run.progress.batches_done}"
    warn(f"{why}: checkpoint saved at {where}. Resume with: python train.py --resume {run.run_dir}")


def stop_on_nonfinite(run, urgent):
    """Save the state at the first non-finite loss or gradient as nonfinite.pt and say what to do; exit status 3."""
    then = "start again with a smaller --lr"
    if (run.run_dir / "last.pt").exists():
        then = f"resume from the last good epoch with: python train.py --resume {run.run_dir} --lr SMALLER"
    checkpoints.save(run, "nonfinite.pt")
    what = "gradients in " + ", ".join(urgent[0].parameters) if urgent else "loss"
    where = f"at step {run.progress.step} (epoch {run.progress.epoch + 1}); the state is in "
    where += str(run.run_dir / "nonfinite.pt")
    warn(f"Stopped: non-finite {what} {where}. Lower the learning rate or clip gradients: {then}")
    return 3


def validate_and_log(run, lr, images_per_second):
    """Validate, hand the epoch's metrics, confusion matrix and per-class recall to the monitor, and print the
    epoch's summary. Returns (validation accuracy, confusion matrix, its picture, metrics)."""
    totals, epoch = run.progress.totals, run.progress.epoch
    conf_mat, accuracy, valid_loss = validate(
        run.net, run.loaders[1], "valid", run.classes, nn.functional.cross_entropy
    )
    recall, precision = class_report(conf_mat)
    # capitals put the curves first in TensorBoard, before the lower-case statistics (gradwatch/layout.py)
    metrics = {"Loss/train": totals["loss_sum"] / totals["seen"], "Accuracy/train": totals["correct"] / totals["seen"]}
    metrics.update({"Loss/valid": valid_loss, "Accuracy/valid": accuracy, "Optimizer/learning rate": lr})
    metrics["train/images_per_second"] = images_per_second
    metrics.update({f"valid_recall/{name}": r for name, r in zip(run.classes, recall) if not np.isnan(r)})
    metrics.update({f"valid_precision/{name}": p for name, p in zip(run.classes, precision) if not np.isnan(p)})
    picture = confusion_matrix_image(conf_mat, run.classes, "valid")
    recall = [None if np.isnan(r) else float(r) for r in recall]
    run.monitor.epoch_end(epoch, metrics, {"valid/confusion_matrix": picture}, run.classes, recall)
    trained = f"train loss {metrics['Loss/train']:.4f} acc {metrics['Accuracy/train']:.2%}"
    rest = f"valid acc {accuracy:.2%} | lr {lr:.3g} | {images_per_second:,.0f} images/s"
    print(f"Summary:  {format_epoch(epoch, run.args.epochs)} {trained} | {rest}", flush=True)
    return accuracy, conf_mat, picture, metrics


def checkpoint(run, accuracy, picture):
    """last.pt after every epoch; best.pt and its confusion matrix when the validation accuracy is the best yet."""
    progress = run.progress
    is_best = accuracy > progress.best_accuracy
    progress.best_accuracy = max(progress.best_accuracy, accuracy)
    progress.epoch += 1
    progress.batches_done = 0
    # best.pt first: a kill between the two renames leaves last.pt an epoch behind, whose rerun writes the same
    # best.pt again; the other way round, best.pt could stay an epoch behind the best for good
    checkpoints.save(run, "best.pt", "last.pt") if is_best else checkpoints.save(run, "last.pt")
    if is_best and run.dist.is_main:
        with checkpoints.writing(run.run_dir / "Confusion_Matrix_valid_best.png") as path:
            picture.save(path)


def report(run, conf_mat, picture):
    """The last epoch's per-class results, and where to look."""
    if run.dist.is_main:
        with checkpoints.writing(run.run_dir / "Confusion_Matrix_valid_last.png") as path:
            picture.save(path)
    print("Per-class results on the validation set (last epoch):")
    for name, r, p, n in zip(run.classes, *class_report(conf_mat), conf_mat.sum(axis=1)):
        recall, precision = ("      -" if np.isnan(v) else f"{v:7.2%}" for v in (r, p))
        print(f"  class {name:<12} images {n:<6} recall {recall}  precision {precision}")
    best = f"best validation accuracy {run.progress.best_accuracy:.2%}"
    print(f"Finished training: {best}. See it with: tensorboard --logdir {run.args.log_dir}")


def train_epochs(run, stop_request):
    """Per epoch: train, validate and log, step the schedule, checkpoint. Returns (None, the last epoch's
    confusion matrix and its picture) when all epochs are done, or (an exit status, None) when stopped."""
    args, progress = run.args, run.progress
    while progress.epoch < args.epochs:
        group = run.optimizer.param_groups[0]  # the base learning rate, as StepLR has decayed it so far
        lr = args.lr * group["lr"] / group["initial_lr"]
        seen = progress.totals.get("seen", 0) if progress.batches_done else 0  # resumed within the epoch
        started = time.perf_counter()
        status = train_one_epoch(run, stop_request)
        if status is not None:
            return status, None
        throughput = (progress.totals["seen"] - seen) / (time.perf_counter() - started)  # all ranks' images
        accuracy, conf_mat, picture, metrics = validate_and_log(run, lr, throughput)
        run.scheduler.step()
        checkpoint(run, accuracy, picture)
        if run.dist.any(stop_request.requested) and progress.epoch < args.epochs:
            run.monitor.flush()
            warn(f"Stopped after epoch {progress.epoch}. Resume with: python train.py --resume {run.run_dir}")
            return 130, None
    # two metrics: beside the five settings TensorBoard ticks, they fit a window 1,700 pixels wide
    final = {"best_valid_accuracy": progress.best_accuracy, "final_train_loss": metrics["Loss/train"]}
    run.monitor.log_hparams(hyperparameters(args), {f"hparam/{k}": v for k, v in final.items()}, progress.epoch - 1)
    return None, (conf_mat, picture)


def train(args, dist):
    """The whole run: set up, resume, train epoch by epoch, tell the diagnosis. Returns the exit status."""
    run = setup(args, dist)
    monitor_state = checkpoints.resume(run) if args.resume is not None else None
    done = run.progress.epoch
    if done >= args.epochs:
        print(f"{run.run_dir} has already trained {done} epochs; pass --epochs N (N > {done}) to train on")
        return 0
    if args.resume is not None:
        print(f"Resuming {run.run_dir} at epoch {done + 1}, iteration {run.progress.batches_done + 1}")
    if dist.is_main:
        checkpoints.write_args(run)
    parameters = sum(p.numel() for p in run.net.parameters())
    print(
        f"Run folder: {run.run_dir}   device: {dist.device}   classes: {len(run.classes)}   parameters: {parameters:,}"
    )
    with open_monitor(run, monitor_state) as run.monitor, StopRequest() as stop_request:
        status, last = train_epochs(run, stop_request)
    print(f"Diagnosis (in full in {run.run_dir / 'diagnosis.json'} and TensorBoard's Text tab):")
    print(indented(run.monitor.story()))
    if status is None:
        report(run, *last)
    return status or 0


def one_line(err):
    """The message of a data error, also when a DataLoader worker re-raised it with its traceback attached."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    last = lines[-1] if lines else repr(err)
    prefix = f"{type(err).__module__}.{type(err).__name__}: "
    return last.removeprefix(prefix).removeprefix(f"{type(err).__name__}: ")


def main(argv=None):
    signal.signal(signal.SIGINT, signal.default_int_handler)
    args = parse_args(argv)
    dist = Distributed(args.device, fsdp=args.fsdp)
    try:
        return train(args, dist)
    except (DataListError, ImageReadError, RunError) as err:
        warn(f"error: {one_line(err)}")
        return 1
    except KeyboardInterrupt:
        run_dir = args.log_dir / (args.run_name or "")
        if args.run_name and (run_dir / "last.pt").is_file():
            warn(f"Stopped at once; resume from the last checkpoint with: python train.py --resume {run_dir}")
        else:
            warn("Stopped before the first checkpoint; nothing to resume")
        return 130
    finally:
        checkpoints.release_run_dirs()
        dist.close()


if __name__ == "__main__":
    sys.exit(main())
