"""Train the tutorial's CNN on a list of images and watch every layer's weights and gradients in TensorBoard.

    python train.py                           # sample digits in Data/, run folder Result/<timestamp>
    tensorboard --logdir Result               # then open http://localhost:6006
    python train.py --resume Result/<run>     # continue a stopped run (add --epochs N to train longer)
    python train.py --help                    # every option and its default
"""

import argparse
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # Ctrl-C while the libraries load (seconds) ends quietly; main() restores KeyboardInterrupt
    # os._exit, not an exception: one raised inside torch's import can surface in its C++ code and abort
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))

import numpy as np
import torch
import torch.nn as nn

from data import build_loaders, load_normalisation
from gradwatch import Thresholds, TrainingMonitor, confusion_matrix_image, is_main_process
from gradwatch.diagnosis import threshold_override
from utils import DataListError, ImageReadError, Net, validate

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
TENSORBOARD_HISTOGRAM_STEPS = 100  # what TensorBoard's default loader keeps per histogram tag


def checked(convert, test, requirement):
    """An argparse type: `convert` the text, then refuse a value that fails `test`, saying what is required."""

    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not test(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
        return value

    parse.__name__ = requirement  # argparse names the type in its own messages
    return parse


positive_int = checked(int, lambda v: v >= 1, "a positive integer")
non_negative_int = checked(int, lambda v: v >= 0, "0 or more")
positive_float = checked(float, lambda v: 0 < v < math.inf, "a positive number")
non_negative_float = checked(float, lambda v: 0 <= v < math.inf, "0 or more")


def device_name(text):
    if text == "auto":
        return text
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device '{text}'; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("CUDA is not available on this machine; use --device cpu")
    return text


def run_folder(text):
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(
            f"run folder '{text}' does not exist; pass a folder under the log dir, e.g. Result/<run-name>"
        )
    for name in ("args.json", "last.pt"):
        if not (path / name).is_file():
            raise argparse.ArgumentTypeError(f"'{text}' has no {name}, so it is not a run folder train.py can resume")
    return path


def key_value(value_type):
    """argparse type for NAME=VALUE pairs."""

    def parse(text):
        name, sep, value = text.partition("=")
        if not sep or not name:
            raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got '{text}'")
        return name, value_type(value)

    parse.__name__ = "NAME=VALUE"
    return parse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show every default, except where there is none to show."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser():
    parser = argparse.ArgumentParser(
        description="Train the tutorial's CNN on an image list, writing weight and gradient histograms of every "
        "layer to TensorBoard each epoch.",
        epilog="Example: python train.py --epochs 5 && tensorboard --logdir Result",
        formatter_class=HelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument("--data", type=Path, default=Path("Data"),
                      help="folder holding train.txt and valid.txt ('path label' per line) and optionally classes.txt")
    data.add_argument("--cache", choices=("auto", "yes", "no"), default="auto",
                      help="decode every image once and keep it in memory as uint8 (auto: when it takes under a "
                      "quarter of the free memory); 'no' decodes each image every epoch, as the tutorial does")
    data.add_argument("--workers", type=non_negative_int, default=min(2, os.cpu_count() or 1),
                      help="DataLoader worker processes without the cache (0 loads in the training process)")
    optim = parser.add_argument_group("optimisation (the tutorial's SGD with StepLR)")
    optim.add_argument("--epochs", type=positive_int, default=20, help="epochs to train in all")
    optim.add_argument("--batch-size", type=positive_int, default=16, help="training images per step")
    optim.add_argument("--lr", type=positive_float, default=0.01, help="initial learning rate")
    optim.add_argument("--momentum", type=non_negative_float, default=0.9, help="SGD momentum")
    optim.add_argument("--dampening", type=non_negative_float, default=0.1, help="SGD dampening of the momentum")
    optim.add_argument("--weight-decay", type=non_negative_float, default=0.0, help="L2 penalty for every layer")
    optim.add_argument("--step-size", type=positive_int, default=15, help="StepLR: epochs between decays")
    optim.add_argument("--gamma", type=positive_float, default=0.1, help="StepLR: decay factor")
    optim.add_argument("--seed", type=int, default=0, help="seeds the weights and the shuffling")
    optim.add_argument("--device", type=device_name, default="auto", help="auto picks CUDA when available")
    optim.add_argument("--amp", choices=("off", "bf16", "fp16"), default="off",
                       help="mixed precision: autocast to bf16, or to fp16 with a GradScaler (fp16 needs CUDA)")
    optim.add_argument("--layer-lr", action="append", type=key_value(positive_float), default=[],
                       metavar="NAME=FACTOR",
                       help="multiply the learning rate of a parameter or module prefix, e.g. conv1=10 (repeatable)")
    optim.add_argument("--layer-wd", action="append", type=key_value(non_negative_float), default=[],
                       metavar="NAME=VALUE",
                       help="weight decay of a parameter or module prefix, e.g. fc1=5e-4 (repeatable)")
    logging = parser.add_argument_group("logging")
    logging.add_argument("--log-dir", type=Path, default=Path("Result"), help="where run folders go")
    logging.add_argument("--run-name", default=None,
                         help="run folder name under --log-dir (default: the start time, e.g. 20261126-171500)")
    logging.add_argument("--hist-every", type=non_negative_int, default=0,
                         help="also log histograms every N optimizer steps (into <run>/steps); 0: once per epoch only")
    logging.add_argument("--print-every", type=positive_int, default=10, help="iterations between progress lines")
    logging.add_argument("--resume", type=run_folder, default=None, metavar="RUN_DIR",
                         help="continue the run in RUN_DIR from its last checkpoint; options given with it override "
                         "the saved ones (e.g. --epochs)")
    watch = parser.add_argument_group("diagnosis (see README: The diagnosis)")
    watch.add_argument("--stats-every", type=non_negative_int, default=20,
                       help="log per-layer statistics every N optimizer steps; 0: once per epoch")
    watch.add_argument("--stop-on-nonfinite", action="store_true",
                       help="stop at the first NaN or Inf in the loss or the logged gradients (checks the loss "
                       "every step)")
    watch.add_argument("--threshold", action="append", type=threshold_override, default=[], metavar="NAME=VALUE",
                       help=f"change a diagnosis threshold (repeatable); names: {', '.join(Thresholds.names())}")
    return parser


def parse_args(argv=None):
    """Parse the command line; with --resume, the run's saved arguments are the defaults."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume is not None:
        run_dir = args.resume
        saved = json.loads((run_dir / "args.json").read_text())
        known = {action.dest for action in parser._actions}
        saved = {key: value for key, value in saved.items() if key in known}
        for key in ("data", "log_dir"):
            saved[key] = Path(saved[key])
        args = parser.parse_args(argv, namespace=argparse.Namespace(**saved))
        args.log_dir, args.run_name, args.resume = run_dir.parent, run_dir.name, run_dir
    args.thresholds = Thresholds().replace(dict(args.threshold))  # names and values checked by the parser
    return args


def param_groups(model, lr, weight_decay, layer_lr=(), layer_wd=()):
    """Optimizer parameter groups from NAME=FACTOR learning-rate factors and NAME=VALUE weight decays.

    NAME is a parameter name or a module prefix ('conv1' covers conv1.weight and conv1.bias);
    the longest matching prefix wins. Raises ValueError for a NAME that matches nothing.
    """
    named = list(model.named_parameters())

    def matches(prefix, name):
        return name == prefix or name.startswith(prefix + ".")

    for prefix, _ in [*layer_lr, *layer_wd]:
        if not any(matches(prefix, name) for name, _ in named):
            names = ", ".join(name for name, _ in named)
            raise ValueError(f"'{prefix}' names no parameter or module; parameters are: {names}")

    def setting(rules, name, default):
        best = max((p for p, _ in rules if matches(p, name)), key=len, default=None)
        return dict(rules)[best] if best is not None else default

    groups = {}
    for name, param in named:
        key = (lr * setting(layer_lr, name, 1.0), setting(layer_wd, name, weight_decay))
        groups.setdefault(key, []).append(param)
    return [{"params": params, "lr": group_lr, "weight_decay": wd} for (group_lr, wd), params in groups.items()]


def hyperparameters(args):
    """The settings shown in TensorBoard's HParams tab."""
    keys = ("lr", "batch_size", "momentum", "dampening", "weight_decay", "epochs", "step_size", "gamma", "seed")
    values = {key: getattr(args, key) for key in keys}
    values["layer_lr"] = ",".join(f"{n}={v:g}" for n, v in args.layer_lr) or "-"
    values["layer_wd"] = ",".join(f"{n}={v:g}" for n, v in args.layer_wd) or "-"
    return values


class RunError(Exception):
    """A run folder that cannot be used as asked; the message says what to do instead."""


class StopRequest:
    """Turns Ctrl-C (SIGINT) and SIGTERM into a flag the loop checks at safe points; a second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name} received: stopping after this iteration and saving a checkpoint "
              f"(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self):
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class Distributed:
    """This process's place in a torchrun job (WORLD_SIZE, RANK and LOCAL_RANK set by torchrun), or rank 0 of 1.

    Every rank runs the same loop on its shard of each epoch; the main process (rank 0) alone prints,
    writes events and checkpoints. The collectives below are no-ops for a single process.
    """

    def __init__(self, device_name):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = resolve_device(device_name)
        if self.world_size > 1:
            if self.device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(self.device)
            torch.distributed.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.is_main = is_main_process()
        if not self.is_main:  # one console for the job: the other ranks stay quiet
            sys.stdout = sys.stderr = open(os.devnull, "w")

    def sum(self, values):
        """Sum a list of numbers over all ranks."""
        if self.world_size == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(tensor)
        return tensor.tolist()

    def any(self, flag):
        """True on every rank when it is true on one: a stop request must stop all ranks at the same step."""
        return flag if self.world_size == 1 else self.sum([float(flag)])[0] > 0

    def broadcast(self, value):
        """Rank 0's value on every rank."""
        if self.world_size == 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def close(self):
        if self.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def rng_state(device):
    """The random state the augmentation draws from (on the device the crops are drawn on), for a checkpoint."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    # the generators take their state as a CPU tensor; torch.load(map_location=cuda) has moved it to the GPU
    torch.set_rng_state(state["cpu"].cpu())
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def prepare_run_dir(args):
    """Name (a timestamp unless --run-name) and create <log-dir>/<run-name> for a new run; a resumed run has one."""
    if args.resume is not None:
        return
    args.run_name = args.run_name or datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = args.log_dir / args.run_name
    if (run_dir / "args.json").exists():
        raise RunError(f"{run_dir} already holds a run; continue it with --resume {run_dir} or pick another --run-name")
    run_dir.mkdir(parents=True, exist_ok=True)


def class_report(conf_mat):
    """Per-class (recall, precision) arrays from a confusion matrix; NaN where a class has no samples."""
    conf_mat = np.asarray(conf_mat, dtype=np.float64)
    hits = np.diag(conf_mat)
    with np.errstate(invalid="ignore", divide="ignore"):
        return hits / conf_mat.sum(axis=1), hits / conf_mat.sum(axis=0)


def percent(value):
    return "      -" if np.isnan(value) else f"{value:7.2%}"


def format_epoch(epoch, epochs):
    return f"Epoch[{epoch + 1:0>3}/{epochs:0>3}]"


@dataclass
class Run:
    """One training run: what setup() builds, and where the loop stands (saved in every checkpoint)."""

    args: argparse.Namespace
    dist: Distributed
    run_dir: Path
    classes: list
    train_loader: Any
    valid_loader: Any
    net: nn.Module  # what is logged and saved
    model: nn.Module  # what trains: net, or its DistributedDataParallel wrapper under torchrun
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    autocast: Any
    monitor: Any = None
    epoch: int = 0  # the epoch running, or to run next
    batches_done: int = 0  # its iterations done
    step: int = 0  # optimizer steps so far
    best_accuracy: float = 0.0
    totals: dict = field(default_factory=dict)  # the epoch's loss sum, correct predictions and images so far

    def state(self):
        return {"model": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "epoch": self.epoch,
                "batches_done": self.batches_done, "step": self.step, "best_accuracy": self.best_accuracy,
                "totals": dict(self.totals), "classes": self.classes, "args": saved_args(self.args),
                "monitor": self.monitor.state_dict(), "rng": rng_state(self.dist.device)}

    def save(self, *names):
        """Write the checkpoint under each name, atomically: a crash mid-save leaves the previous one intact."""
        if not self.dist.is_main:
            return
        state = self.state()
        for name in names:
            tmp = self.run_dir / (name + ".tmp")
            torch.save(state, tmp)
            os.replace(tmp, self.run_dir / name)

    def stop(self, why):
        self.save("last.pt")
        print(f"{why}: checkpoint saved at epoch {self.epoch + 1}, iteration {self.batches_done}. "
              f"Resume with: python train.py --resume {self.run_dir}", file=sys.stderr)


def saved_args(args):
    return {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()
            if key != "thresholds"}


def setup(args, dist):
    """Check the data, then build the model, the optimiser and the run folder of a new or resumed run."""
    device = dist.device
    if args.amp == "fp16" and device.type != "cuda":
        raise RunError("--amp fp16 needs a CUDA device; use --amp bf16 on the CPU")
    start = time.perf_counter()
    mean, std, normalisation = load_normalisation(args.data)
    train_loader, valid_loader, classes, cached = build_loaders(args.data, args.batch_size, args.seed, device,
                                                                args.workers, args.cache, mean, std,
                                                                rank=dist.rank, world_size=dist.world_size)
    print(f"Checked {train_loader.batch_sampler.size} training and {valid_loader.batch_sampler.size} validation "
          f"images in {time.perf_counter() - start:.1f}s; "
          f"{'decoded once, kept in memory' if cached else 'decoded every epoch (no cache)'}")
    print(f"Normalising with {normalisation}")
    if not (args.data / "classes.txt").is_file():
        print(f"{args.data / 'classes.txt'} not found: naming the {len(classes)} classes 0..{len(classes) - 1}")
    if dist.is_main:
        prepare_run_dir(args)
    args.run_name = dist.broadcast(args.run_name)

    torch.manual_seed(args.seed)
    net = Net(num_classes=len(classes))
    net.initialize_weights()
    net.to(device)
    try:
        groups = param_groups(net, args.lr, args.weight_decay, args.layer_lr, args.layer_wd)
    except ValueError as err:
        raise RunError(f"--layer-lr/--layer-wd: {err}") from None
    optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, dampening=args.dampening)
    # entering even a disabled autocast costs about 5% of a small model's step: use none without --amp
    autocast = torch.autocast(device.type, dtype=AMP_DTYPES[args.amp]) if args.amp != "off" else nullcontext()
    # DDP averages the gradients over the ranks during backward
    model = torch.nn.parallel.DistributedDataParallel(net) if dist.world_size > 1 else net
    return Run(args, dist, args.log_dir / args.run_name, classes, train_loader, valid_loader, net, model, optimizer,
               torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.step_size, gamma=args.gamma),
               torch.amp.GradScaler(device.type, enabled=args.amp == "fp16"), autocast)


def resume(run):
    """Load the run's last checkpoint into `run`; returns the monitor's saved state, if the checkpoint has one."""
    args, device = run.args, run.dist.device
    checkpoint = torch.load(run.run_dir / "last.pt", map_location=device, weights_only=True)
    if checkpoint["classes"] != run.classes:
        raise RunError(f"{args.data}: its classes differ from the ones {run.run_dir} was trained on; "
                       f"resume with the same --data")
    run.net.load_state_dict(checkpoint["model"])
    try:
        run.optimizer.load_state_dict(checkpoint["optimizer"])
    except ValueError:
        raise RunError(f"{run.run_dir}: its optimizer has other parameter groups; resume with the run's own "
                       f"--layer-lr/--layer-wd settings (see its args.json)") from None
    run.scheduler.load_state_dict(checkpoint["scheduler"])
    saved_lr = checkpoint["args"]["lr"]
    if args.lr != saved_lr:  # --lr given with --resume rescales every group's schedule
        factor = args.lr / saved_lr
        for group in run.optimizer.param_groups:
            group["lr"] *= factor
            group["initial_lr"] *= factor
        run.scheduler.base_lrs = [lr * factor for lr in run.scheduler.base_lrs]
        print(f"Learning rate changed from {saved_lr:g} to {args.lr:g} (StepLR decays apply as before)")
    if checkpoint.get("scaler"):
        run.scaler.load_state_dict(checkpoint["scaler"])
    if "rng" in checkpoint:  # the crops go on where they stopped: a resumed run trains as an unbroken one
        set_rng_state(checkpoint["rng"], device)
    run.epoch, run.batches_done = checkpoint["epoch"], checkpoint["batches_done"]
    run.step, run.best_accuracy, run.totals = checkpoint["step"], checkpoint["best_accuracy"], checkpoint["totals"]
    return checkpoint.get("monitor")


def open_monitor(run, monitor_state):
    """The monitor of the run, continuing from its saved state on resume (the diagnosis compares with the
    epochs before the stop) and rewriting, on each step axis, only what comes after the checkpoint."""
    args, resumed = run.args, run.args.resume is not None
    monitor = TrainingMonitor(run.run_dir, stats_every=args.stats_every, hist_every=args.hist_every,
                              thresholds=args.thresholds, purge_epoch=run.epoch if resumed else None,
                              purge_step=run.step + 1 if resumed else None, start_step=run.step)
    monitor.watch(run.net, run.optimizer)
    if monitor_state:
        monitor.load_state_dict(monitor_state)
    histogram_steps = args.epochs
    if args.hist_every:
        histogram_steps = max(args.epochs, len(run.train_loader) * args.epochs // args.hist_every)
    if histogram_steps > TENSORBOARD_HISTOGRAM_STEPS:
        print(f"Note: this run logs {histogram_steps} histogram steps per tag; TensorBoard shows a sample of "
              f"{TENSORBOARD_HISTOGRAM_STEPS} unless started with: "
              f"tensorboard --logdir {args.log_dir} --samples_per_plugin histograms=0")
    return monitor


class RunningTotals:
    """The epoch's loss and accuracy so far. Sums stay on the device between progress lines, where they are read
    (summed over all ranks) into `totals`."""

    def __init__(self, device, totals):
        self.totals = totals
        self.loss = torch.zeros((), device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.seen = 0

    def add(self, loss, outputs, labels):
        self.loss += loss.detach() * labels.size(0)
        self.correct += (outputs.argmax(dim=1) == labels).sum()
        self.seen += labels.size(0)

    def read(self, dist):
        # note: a CPU-GPU sync point, once per progress line
        loss_sum, correct, seen = dist.sum([self.loss.item(), self.correct.item(), self.seen])
        self.totals["loss_sum"] += loss_sum
        self.totals["correct"] += int(correct)
        self.totals["seen"] += int(seen)
        self.loss.zero_()
        self.correct.zero_()
        self.seen = 0
        return self.totals


def train_one_epoch(run, stop_request):
    """Train run.epoch from its run.batches_done-th iteration on, printing progress. Returns None at the epoch's
    end, or an exit status after a checkpoint when it had to stop early."""
    args, dist, sampler = run.args, run.dist, run.train_loader.batch_sampler
    device = dist.device
    run.net.train()
    sampler.set_epoch(run.epoch, run.batches_done)
    if run.batches_done == 0:
        run.totals = {"loss_sum": 0.0, "correct": 0, "seen": 0}
    running = RunningTotals(device, run.totals)
    try:
        for inputs, labels in run.train_loader:
            inputs, labels = inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            run.optimizer.zero_grad(set_to_none=True)
            with run.autocast:  # forward
                outputs = run.model(inputs)
                loss = nn.functional.cross_entropy(outputs, labels)
            run.scaler.scale(loss).backward()
            run.scaler.step(run.optimizer)  # unscales the gradients first: the monitor sees true values
            run.scaler.update()
            run.step += 1
            run.batches_done += 1
            urgent = run.monitor.step()  # statistics and step histograms, when due
            # note: with --stop-on-nonfinite, reading the loss is a CPU-GPU sync point every step
            if args.stop_on_nonfinite and (urgent or not math.isfinite(loss.item())):
                return stop_on_nonfinite(run, urgent)
            running.add(loss, outputs, labels)
            if run.batches_done % args.print_every == 0 or run.batches_done == len(sampler):
                totals = running.read(dist)
                print(f"Training: {format_epoch(run.epoch, args.epochs)} "
                      f"Iteration[{run.batches_done:0>3}/{len(sampler):0>3}] Loss: {totals['loss_sum'] / totals['seen']:.4f} "
                      f"Acc: {totals['correct'] / totals['seen']:.2%}", flush=True)
            if dist.any(stop_request.requested) and run.batches_done < len(sampler):
                running.read(dist)
                run.stop("Stopped")
                return 130
    except ImageReadError:
        running.read(dist)
        run.stop("Stopped on a bad image")
        raise
    return None


def stop_on_nonfinite(run, urgent):
    """Save the state at the first non-finite loss or gradient as nonfinite.pt and say what to do; exit status 3."""
    save_as = run.run_dir / "nonfinite.pt"
    last_good = (run.run_dir / "last.pt").exists()
    run.save("nonfinite.pt")
    what = "gradients in " + ", ".join(urgent[0].parameters) if urgent else "loss"
    then = (f"resume from the last good epoch with: python train.py --resume {run.run_dir} --lr SMALLER"
            if last_good else "start again with a smaller --lr")
    print(f"Stopped: non-finite {what} at step {run.step} (epoch {run.epoch + 1}); the state is in {save_as}. "
          f"Lower the learning rate or clip gradients: {then}", file=sys.stderr)
    return 3


def validate_and_log(run, lr, images_per_second):
    """Validate, hand the epoch's metrics, confusion matrix and per-class recall to the monitor, and print the
    epoch's summary and new findings. Returns (validation accuracy, confusion matrix, its picture, metrics)."""
    args, totals = run.args, run.totals
    conf_mat, accuracy = validate(run.net, run.valid_loader, "valid", run.classes)
    recall, precision = class_report(conf_mat)
    metrics = {"train/loss": totals["loss_sum"] / totals["seen"], "train/accuracy": totals["correct"] / totals["seen"],
               "valid/accuracy": accuracy, "train/lr": lr,
               "train/images_per_second": images_per_second}
    metrics.update({f"valid_recall/{name}": r for name, r in zip(run.classes, recall) if not np.isnan(r)})
    metrics.update({f"valid_precision/{name}": p for name, p in zip(run.classes, precision) if not np.isnan(p)})
    picture = confusion_matrix_image(conf_mat, run.classes, "valid")
    findings = run.monitor.epoch_end(run.epoch, metrics, {"valid/confusion_matrix": picture}, classes=run.classes,
                                     recall=[None if np.isnan(r) else float(r) for r in recall])
    print(f"Summary:  {format_epoch(run.epoch, args.epochs)} train loss {metrics['train/loss']:.4f} "
          f"acc {metrics['train/accuracy']:.2%} | valid acc {accuracy:.2%} | lr {lr:.3g} | "
          f"{metrics['train/images_per_second']:,.0f} images/s", flush=True)
    for finding in findings:
        print(f"Diagnosis: {finding}", flush=True)
    return accuracy, conf_mat, picture, metrics


def checkpoint(run, accuracy, picture):
    """last.pt after every epoch; best.pt and its confusion matrix when the validation accuracy is the best yet."""
    is_best = accuracy > run.best_accuracy
    run.best_accuracy = max(run.best_accuracy, accuracy)
    run.epoch, run.batches_done = run.epoch + 1, 0
    run.save("last.pt", "best.pt") if is_best else run.save("last.pt")
    if is_best and run.dist.is_main:
        picture.save(run.run_dir / "Confusion_Matrix_valid_best.png")


def report(run, conf_mat, picture):
    """The last epoch's per-class results, and where to look."""
    if run.dist.is_main:
        picture.save(run.run_dir / "Confusion_Matrix_valid_last.png")
    recall, precision = class_report(conf_mat)
    print("Per-class results on the validation set (last epoch):")
    for name, r, p, n in zip(run.classes, recall, precision, conf_mat.sum(axis=1)):
        print(f"  class {name:<12} images {n:<6} recall {percent(r)}  precision {percent(p)}")
    print(f"Finished training: best validation accuracy {run.best_accuracy:.2%}. "
          f"See it with: tensorboard --logdir {run.args.log_dir}")


def train(args, dist):
    """The whole run: set up, resume, then per epoch: train, validate and log, checkpoint. Returns the exit status."""
    run = setup(args, dist)
    monitor_state = resume(run) if args.resume is not None else None
    if run.epoch >= args.epochs:
        print(f"{run.run_dir} has already trained {run.epoch} epochs; pass --epochs N (N > {run.epoch}) "
              f"to train it further")
        return 0
    if args.resume is not None:
        print(f"Resuming {run.run_dir} at epoch {run.epoch + 1}, iteration {run.batches_done + 1}")
    if dist.is_main:
        (run.run_dir / "args.json").write_text(json.dumps(saved_args(args), indent=2) + "\n")
    print(f"Run folder: {run.run_dir}   device: {dist.device}   classes: {len(run.classes)}   "
          f"parameters: {sum(p.numel() for p in run.net.parameters()):,}")
    with open_monitor(run, monitor_state) as run.monitor, StopRequest() as stop_request:
        while run.epoch < args.epochs:
            group = run.optimizer.param_groups[0]  # the base learning rate, as StepLR has decayed it so far
            lr = args.lr * group["lr"] / group["initial_lr"]
            seen, started = run.totals.get("seen", 0) if run.batches_done else 0, time.perf_counter()
            status = train_one_epoch(run, stop_request)
            if status is not None:
                return status
            throughput = (run.totals["seen"] - seen) / (time.perf_counter() - started)  # all ranks' images
            accuracy, conf_mat, picture, metrics = validate_and_log(run, lr, throughput)
            run.scheduler.step()
            checkpoint(run, accuracy, picture)
            if dist.any(stop_request.requested) and run.epoch < args.epochs:
                run.monitor.flush()
                print(f"Stopped after epoch {run.epoch}. Resume with: python train.py --resume {run.run_dir}",
                      file=sys.stderr)
                return 130
        final = {"hparam/best_valid_accuracy": run.best_accuracy, "hparam/final_valid_accuracy": accuracy,
                 "hparam/final_train_loss": metrics["train/loss"]}
        run.monitor.log_hparams(hyperparameters(args), final, run.epoch - 1)
    report(run, conf_mat, picture)
    return 0


def one_line(err):
    """The message of a data error, also when a DataLoader worker re-raised it with its traceback attached."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    last = lines[-1] if lines else repr(err)
    prefix = f"{type(err).__module__}.{type(err).__name__}: "
    return last.removeprefix(prefix).removeprefix(f"{type(err).__name__}: ")


def main(argv=None):
    signal.signal(signal.SIGINT, signal.default_int_handler)
    args = parse_args(argv)
    dist = Distributed(args.device)
    try:
        return train(args, dist)
    except (DataListError, ImageReadError, RunError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        run_dir = args.log_dir / (args.run_name or "")
        if args.run_name and (run_dir / "last.pt").is_file():
            print(f"Stopped at once; resume from the last checkpoint with: python train.py --resume {run_dir}",
                  file=sys.stderr)
        else:
            print("Stopped before the first checkpoint; nothing to resume", file=sys.stderr)
        return 130
    finally:
        dist.close()


if __name__ == "__main__":
    sys.exit(main())
