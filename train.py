"""Train the tutorial's CNN on a list of images and watch every layer's weights and gradients in TensorBoard.

python train.py                           # sample digits in Data/, run folder Result/<timestamp>
tensorboard --logdir Result               # then open http://localhost:6006
python train.py --resume Result/<run>     # continue a stopped run (add --epochs N to train longer)
python train.py --help                    # every option and its default
torchrun --nproc_per_node 2 train.py --fsdp  # shard the model over 2 processes (FSDP2)
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
from gradwatch.diagnosis import indented, threshold_override
from utils import DataListError, ImageReadError, Net, validate

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
TENSORBOARD_HISTOGRAM_STEPS = 100  # what TensorBoard's default loader keeps per histogram tag
PROGRESS = ("epoch", "batches_done", "step", "best_accuracy", "totals")  # where a run stands, in its checkpoints
TOTALS = ("loss_sum", "correct", "seen")  # of the epoch so far


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


def compile_backend(text):
    from torch._dynamo import list_backends  # only when --compile is given: it takes a moment to load

    if text not in list_backends(exclude_tags=()):  # the debugging ones too, but suggest the usual ones
        raise argparse.ArgumentTypeError(f"unknown torch.compile backend '{text}'; use {', '.join(list_backends())}")
    return text


def run_folder(text):
    path = Path(text)
    if not path.is_dir():
        hint = "pass a folder under the log dir, e.g. Result/<run-name>"
        raise argparse.ArgumentTypeError(f"run folder '{text}' does not exist; {hint}")
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
        return action.help if action.default in (None, [], False) else super()._get_help_string(action)


OPTIONS = {  # group: [(option, keyword arguments of add_argument)]; README's table says more
    "data": [
        ("--data", dict(type=Path, default=Path("Data"), help="folder with train.txt, valid.txt, classes.txt")),
        ("--cache", dict(choices=("auto", "yes", "no"), default="auto")),
        ("--workers", dict(type=non_negative_int, default=min(2, os.cpu_count() or 1))),
    ],
    "optimisation (the tutorial's SGD with StepLR)": [
        ("--epochs", dict(type=positive_int, default=20, help="epochs to train in all")),
        ("--batch-size", dict(type=positive_int, default=16, help="training images per step")),
        ("--lr", dict(type=positive_float, default=0.01, help="initial learning rate")),
        ("--momentum", dict(type=non_negative_float, default=0.9, help="SGD momentum")),
        ("--dampening", dict(type=non_negative_float, default=0.1, help="SGD dampening of the momentum")),
        ("--weight-decay", dict(type=non_negative_float, default=0.0, help="L2 penalty for every layer")),
        ("--step-size", dict(type=positive_int, default=15, help="StepLR: epochs between decays")),
        ("--gamma", dict(type=positive_float, default=0.1, help="StepLR: decay factor")),
        ("--seed", dict(type=int, default=0, help="seeds the weights and the shuffling")),
        ("--device", dict(type=device_name, default="auto", help="auto picks CUDA when available")),
        ("--amp", dict(choices=("off", "bf16", "fp16"), default="off")),
        ("--compile", dict(nargs="?", const="inductor", type=compile_backend, metavar="BACKEND")),
        ("--clip-grad-norm", dict(type=positive_float, metavar="MAX")),
        ("--fsdp", dict(action="store_true")),
        ("--layer-lr", dict(action="append", type=key_value(positive_float), default=[], metavar="NAME=FACTOR")),
        ("--layer-wd", dict(action="append", type=key_value(non_negative_float), default=[], metavar="NAME=VALUE")),
    ],
    "logging": [
        ("--log-dir", dict(type=Path, default=Path("Result"), help="where run folders go")),
        ("--run-name", dict(help="run folder name under --log-dir (default: the start time)")),
        ("--hist-every", dict(type=non_negative_int, default=0)),
        ("--print-every", dict(type=positive_int, default=10, help="iterations between progress lines")),
        ("--resume", dict(type=run_folder, metavar="RUN_DIR")),
    ],
    "diagnosis (see README: The diagnosis)": [
        ("--stats-every", dict(type=non_negative_int)),
        ("--stop-on-nonfinite", dict(action="store_true")),
        ("--threshold", dict(action="append", type=threshold_override, default=[], metavar="NAME=VALUE")),
    ],
}
HELP = {  # help texts too long for the table
    "--cache": "decode every image once and keep it in memory as uint8 (auto: when it takes under a quarter of the "
    "free memory); 'no' decodes each image every epoch, as the tutorial does",
    "--workers": "DataLoader worker processes without the cache (0 loads in the training process)",
    "--compile": "train the model through torch.compile (BACKEND: inductor unless given; the first steps compile)",
    "--clip-grad-norm": "clip the gradients to this total norm (torch.nn.utils.clip_grad_norm_); the monitor logs the "
    "norm before clipping and the share of clipped steps",
    "--fsdp": "under torchrun: shard the model's parameters, gradients and optimizer state over the processes (FSDP2, "
    "fully_shard) instead of copying the model to each (DistributedDataParallel)",
    "--amp": "mixed precision: autocast to bf16, or to fp16 with a GradScaler (fp16 needs CUDA)",
    "--layer-lr": "multiply the learning rate of a parameter or module prefix, e.g. conv1=10 (repeatable)",
    "--layer-wd": "weight decay of a parameter or module prefix, e.g. fc1=5e-4 (repeatable)",
    "--hist-every": "also log histograms every N optimizer steps (into <run>/steps); 0: once per epoch only",
    "--resume": "continue the run in RUN_DIR from its last checkpoint; options given with it override the saved ones",
    "--stats-every": "log per-layer statistics every N optimizer steps (into <run>/steps); 0: once per epoch "
    "(default: every 50 steps; after the first epoch, 16 times an epoch if that is sparser, at most 1,000 apart)",
    "--stop-on-nonfinite": "stop at the first NaN or Inf in the loss (checked every step) or the logged gradients",
    "--threshold": f"change a diagnosis threshold (repeatable); names: {', '.join(Thresholds.names())}",
}


def build_parser():
    parser = argparse.ArgumentParser(
        description="Train the tutorial's CNN on an image list, writing weight and gradient histograms of every layer "
        "to TensorBoard each epoch.",
        epilog="Example: python train.py --epochs 5 && tensorboard --logdir Result",
        formatter_class=HelpFormatter,
    )
    for title, options in OPTIONS.items():
        group = parser.add_argument_group(title)
        for option, settings in options:
            group.add_argument(option, **{"help": HELP.get(option), **settings})
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
        saved["data"], saved["log_dir"] = Path(saved["data"]), Path(saved["log_dir"])
        args = parser.parse_args(argv, namespace=argparse.Namespace(**saved))
        args.log_dir, args.run_name, args.resume = run_dir.parent, run_dir.name, run_dir
    args.thresholds = Thresholds().replace(dict(args.threshold))  # names and values checked by the parser
    if args.fsdp and "LOCAL_RANK" not in os.environ:
        parser.error(
            "--fsdp shards the model over the processes of a torchrun job: torchrun --nproc_per_node N train.py --fsdp"
        )
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
    values["clip_grad_norm"] = args.clip_grad_norm or 0.0  # 0: no clipping
    for key in ("layer_lr", "layer_wd"):
        values[key] = ",".join(f"{n}={v:g}" for n, v in getattr(args, key)) or "-"
    return values


class RunError(Exception):
    """A run folder that cannot be used as asked; the message says what to do instead."""


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


class Distributed:
    """This process's place in a torchrun job (WORLD_SIZE, RANK and LOCAL_RANK set by torchrun), or rank 0 of 1.

    Every rank runs the same loop on its shard of each epoch; the main process (rank 0, is_main_process())
    alone prints, writes events and checkpoints. The collectives below are no-ops for a single process.
    """

    def __init__(self, device_name, fsdp=False):
        self.world_size, self.rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if device_name == "auto" else None
        self.device = self.device or torch.device(device_name)
        if self.world_size > 1 or fsdp:
            if self.device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(self.device)
            torch.distributed.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.is_main = is_main_process()
        if not self.is_main:  # one console for the job: the other ranks stay quiet
            sys.stdout = sys.stderr = open(os.devnull, "w")

    def sum(self, values):
        """Sum a list of numbers over all ranks."""
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            torch.distributed.all_reduce(tensor)
        return tensor.tolist()

    def any(self, flag):
        """True on every rank when it is true on one: a stop request must stop all ranks at the same step."""
        return self.sum([float(flag)])[0] > 0

    def broadcast(self, value):
        """Rank 0's value on every rank."""
        box = [value]
        if self.world_size > 1:
            torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def close(self):
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


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


def format_epoch(epoch, epochs):
    return f"Epoch[{epoch + 1:0>3}/{epochs:0>3}]"


@dataclass
class Run:
    """One training run: what setup() builds, and where the loop stands (all of it saved in every checkpoint)."""

    args: argparse.Namespace
    dist: Distributed
    run_dir: Path
    classes: list
    loaders: tuple  # (training batches, validation batches)
    net: nn.Module  # what is logged and saved; under torchrun `model` wraps it in DistributedDataParallel (or,
    # with --fsdp, `net` itself is sharded)
    optimizer: torch.optim.Optimizer
    model: nn.Module = None
    monitor: Any = None
    epoch: int = 0  # the epoch running, or to run next
    batches_done: int = 0  # its iterations done
    step: int = 0  # optimizer steps so far
    best_accuracy: float = 0.0
    totals: dict = field(default_factory=dict)  # the epoch's loss sum, correct predictions and images so far

    def __post_init__(self):
        args, device = self.args, self.dist.device
        replicated = self.dist.world_size > 1 and not args.fsdp
        self.model = nn.parallel.DistributedDataParallel(self.net) if replicated else self.net
        if args.compile:
            self.model = torch.compile(self.model, backend=args.compile)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=args.step_size, gamma=args.gamma)
        self.scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
        # entering even a disabled autocast costs time on every step: none without --amp
        self.autocast = torch.autocast(device.type, dtype=AMP_DTYPES[args.amp]) if args.amp != "off" else nullcontext()

    def state(self):
        """Everything a checkpoint holds; the model and optimizer state whole (under --fsdp gathered from every
        rank, which must all call this), so that it loads into a plain Net."""
        if self.args.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict  # a second to load

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model, optimizer = get_state_dict(self.net, self.optimizer, options=options)
        else:
            model, optimizer = self.net.state_dict(), self.optimizer.state_dict()
        state = {key: getattr(self, key).state_dict() for key in ("scheduler", "scaler", "monitor")}
        state.update({key: getattr(self, key) for key in PROGRESS}, model=model, optimizer=optimizer)
        return {**state, "classes": self.classes, "args": saved_args(self.args), "rng": rng_state(self.dist.device)}

    def save(self, *names):
        """Write the checkpoint under each name, atomically: a crash mid-save leaves the previous one intact."""
        if not (self.dist.is_main or self.args.fsdp):
            return
        state = self.state()  # under --fsdp every rank gathers; rank 0 writes
        if not self.dist.is_main:
            return
        for name in names:
            torch.save(state, self.run_dir / (name + ".tmp"))
            os.replace(self.run_dir / (name + ".tmp"), self.run_dir / name)

    def stop(self, why):
        self.save("last.pt")
        where = f"epoch {self.epoch + 1}, iteration {self.batches_done}"
        warn(f"{why}: checkpoint saved at {where}. Resume with: python train.py --resume {self.run_dir}")


def saved_args(args):
    """The options as args.json holds them."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "thresholds"}


def rng_state(device):
    """The random state the augmentation draws from (on the device the crops are drawn on), for a checkpoint."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def setup(args, dist):
    """Check the data, then build the model, the optimiser and the run folder of a new or resumed run."""
    if args.amp == "fp16" and dist.device.type != "cuda":
        raise RunError("--amp fp16 needs a CUDA device; use --amp bf16 on the CPU")
    start = time.perf_counter()
    mean, std, normalisation = load_normalisation(args.data)
    shard = dict(rank=dist.rank, world_size=dist.world_size)
    loaders = build_loaders(
        args.data, args.batch_size, args.seed, dist.device, args.workers, args.cache, mean, std, **shard
    )
    train_loader, valid_loader, classes, cached = loaders
    images = f"{train_loader.batch_sampler.size} training and {valid_loader.batch_sampler.size} validation images"
    how = "decoded once, kept in memory" if cached else "decoded every epoch (no cache)"
    print(f"Checked {images} in {time.perf_counter() - start:.1f}s; {how}\nNormalising with {normalisation}")
    if not (args.data / "classes.txt").is_file():
        print(f"{args.data / 'classes.txt'} not found: naming the {len(classes)} classes 0..{len(classes) - 1}")
    if dist.is_main:
        prepare_run_dir(args)
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
    return Run(args, dist, args.log_dir / args.run_name, classes, (train_loader, valid_loader), net, optimizer)


def shard_model(net, dist):
    """FSDP2, as PyTorch's guide does it: each layer that holds parameters is sharded over all processes (gathered
    for its own forward and backward only), then the root module (what is left, and when to gather)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(dist.device.type, (dist.world_size,))
    for module in net.modules():
        if module is not net and any(True for _ in module.parameters(recurse=False)):
            fully_shard(module, mesh=mesh)
    fully_shard(net, mesh=mesh)


def resume(run):
    """Load the run's last checkpoint into `run`; returns the monitor's saved state, if the checkpoint has one."""
    args, device = run.args, run.dist.device
    checkpoint = torch.load(run.run_dir / "last.pt", map_location=device, weights_only=True)
    if checkpoint["classes"] != run.classes:
        raise RunError(f"{args.data}: its classes differ from those {run.run_dir} was trained on; use the same --data")
    sizes = [len(group["params"]) for group in checkpoint["optimizer"]["param_groups"]]
    if sizes != [len(group["params"]) for group in run.optimizer.param_groups]:
        own = "resume with the run's own --layer-lr/--layer-wd settings (see its args.json)"
        raise RunError(f"{run.run_dir}: its optimizer has other parameter groups; {own}")
    if args.fsdp:  # every rank takes its shards of the whole state
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        options = StateDictOptions(full_state_dict=True)
        model, optimizer = checkpoint["model"], checkpoint["optimizer"]
        set_state_dict(run.net, run.optimizer, model_state_dict=model, optim_state_dict=optimizer, options=options)
    else:
        run.net.load_state_dict(checkpoint["model"])
        run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.scheduler.load_state_dict(checkpoint["scheduler"])
    saved_lr = checkpoint["args"]["lr"]
    if args.lr != saved_lr:  # --lr given with --resume rescales every group's schedule
        factor = args.lr / saved_lr
        for group in run.optimizer.param_groups:
            group["lr"], group["initial_lr"] = group["lr"] * factor, group["initial_lr"] * factor
        run.scheduler.base_lrs = [lr * factor for lr in run.scheduler.base_lrs]
        print(f"Learning rate changed from {saved_lr:g} to {args.lr:g} (StepLR decays apply as before)")
    if checkpoint.get("scaler"):
        run.scaler.load_state_dict(checkpoint["scaler"])
    if "rng" in checkpoint:  # the crops go on where they stopped: a resumed run trains as an unbroken one
        torch.set_rng_state(checkpoint["rng"]["cpu"].cpu())  # the generators take CPU tensors; map_location moved it
        if "cuda" in checkpoint["rng"] and device.type == "cuda":
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"].cpu(), device)
    for key in PROGRESS:
        setattr(run, key, checkpoint[key])
    return checkpoint.get("monitor")


def open_monitor(run, monitor_state):
    """The monitor of the run, continuing from its saved state on resume (the diagnosis compares with the
    epochs before the stop) and rewriting, on each step axis, only what comes after the checkpoint."""
    args = run.args
    options = dict(thresholds=args.thresholds, stats_every=args.stats_every, hist_every=args.hist_every)
    if args.resume is not None and not monitor_state:  # a checkpoint of a version that saved no monitor state
        options.update(purge_epoch=run.epoch, purge_step=run.step + 1, start_step=run.step)
    monitor = TrainingMonitor(run.run_dir, **options)  # stats_every None: the monitor's default
    monitor.watch(run.model, run.optimizer)  # the model as trained: compiled, it keeps its activation hooks
    if monitor_state:
        monitor.load_state_dict(monitor_state)
    steps = max(args.epochs, len(run.loaders[0]) * args.epochs // args.hist_every if args.hist_every else 0)
    if steps > TENSORBOARD_HISTOGRAM_STEPS:
        everything = f"tensorboard --logdir {args.log_dir} --samples_per_plugin histograms=0"
        print(
            f"Note: this run logs {steps} histogram steps per tag; TensorBoard shows a sample of "
            f"{TENSORBOARD_HISTOGRAM_STEPS} unless started with: {everything}"
        )
    return monitor


def train_one_epoch(run, stop_request):
    """Train run.epoch from its run.batches_done-th iteration on, printing progress. Returns None at the epoch's
    end, or an exit status after a checkpoint when it had to stop early."""
    args, dist, loader = run.args, run.dist, run.loaders[0]
    run.net.train()
    loader.batch_sampler.set_epoch(run.epoch, run.batches_done)
    if run.batches_done == 0:
        run.totals = dict.fromkeys(TOTALS, 0.0)
    window = torch.zeros(3, dtype=torch.float64, device=dist.device)  # TOTALS since the last progress line

    def add_window():
        # note: a CPU-GPU sync point, once per progress line; sums over all ranks
        for key, value in zip(TOTALS, dist.sum(window.tolist())):
            run.totals[key] += value
        window.zero_()

    try:
        for inputs, labels in loader:
            inputs, labels = inputs.to(dist.device, non_blocking=True), labels.to(dist.device, non_blocking=True)
            run.optimizer.zero_grad(set_to_none=True)
            with run.autocast:  # forward
                outputs = run.model(inputs)
                loss = nn.functional.cross_entropy(outputs, labels)
            run.scaler.scale(loss).backward()
            grad_norm = clip_gradients(run) if args.clip_grad_norm else None
            run.scaler.step(run.optimizer)  # unscales the gradients first: the monitor sees true values
            run.scaler.update()
            run.step, run.batches_done = run.step + 1, run.batches_done + 1
            # statistics and step histograms, when due
            urgent = run.monitor.step(loss, grad_norm=grad_norm, max_norm=args.clip_grad_norm)
            # note: with --stop-on-nonfinite, reading the loss is a CPU-GPU sync point every step
            if args.stop_on_nonfinite and dist.any(bool(urgent) or not math.isfinite(loss.item())):
                return stop_on_nonfinite(run, urgent)
            window[0] += loss.detach() * len(labels)
            window[1] += (outputs.argmax(dim=1) == labels).sum()
            window[2] += len(labels)
            if run.batches_done % args.print_every == 0 or run.batches_done == len(loader):
                add_window()
                totals = run.totals
                where = f"{format_epoch(run.epoch, args.epochs)} Iteration[{run.batches_done:0>3}/{len(loader):0>3}]"
                loss, accuracy = totals["loss_sum"] / totals["seen"], totals["correct"] / totals["seen"]
                print(f"Training: {where} Loss: {loss:.4f} Acc: {accuracy:.2%}", flush=True)
            if dist.any(stop_request.requested) and run.batches_done < len(loader):
                add_window()
                run.stop("Stopped")
                return 130
    except ImageReadError:
        add_window()
        run.stop("Stopped on a bad image")
        raise
    return None


def clip_gradients(run):
    """Clip the gradients to --clip-grad-norm and return their total norm before clipping: of the unscaled
    gradients under --amp fp16, of the whole model under --fsdp (summed over the shards)."""
    run.scaler.unscale_(run.optimizer)  # scaler.step() then skips unscaling again
    return nn.utils.clip_grad_norm_(run.net.parameters(), run.args.clip_grad_norm)


def stop_on_nonfinite(run, urgent):
    """Save the state at the first non-finite loss or gradient as nonfinite.pt and say what to do; exit status 3."""
    then = "start again with a smaller --lr"
    if (run.run_dir / "last.pt").exists():
        then = f"resume from the last good epoch with: python train.py --resume {run.run_dir} --lr SMALLER"
    run.save("nonfinite.pt")
    what = "gradients in " + ", ".join(urgent[0].parameters) if urgent else "loss"
    where = f"at step {run.step} (epoch {run.epoch + 1}); the state is in {run.run_dir / 'nonfinite.pt'}"
    warn(f"Stopped: non-finite {what} {where}. Lower the learning rate or clip gradients: {then}")
    return 3


def validate_and_log(run, lr, images_per_second):
    """Validate, hand the epoch's metrics, confusion matrix and per-class recall to the monitor, and print the
    epoch's summary. Returns (validation accuracy, confusion matrix, its picture, metrics)."""
    totals = run.totals
    conf_mat, accuracy, valid_loss = validate(
        run.net, run.loaders[1], "valid", run.classes, nn.functional.cross_entropy
    )
    recall, precision = class_report(conf_mat)
    metrics = {"train/loss": totals["loss_sum"] / totals["seen"], "train/accuracy": totals["correct"] / totals["seen"]}
    metrics.update({"valid/accuracy": accuracy, "valid/loss": valid_loss, "train/lr": lr})
    metrics["train/images_per_second"] = images_per_second
    metrics.update({f"valid_recall/{name}": r for name, r in zip(run.classes, recall) if not np.isnan(r)})
    metrics.update({f"valid_precision/{name}": p for name, p in zip(run.classes, precision) if not np.isnan(p)})
    picture = confusion_matrix_image(conf_mat, run.classes, "valid")
    recall = [None if np.isnan(r) else float(r) for r in recall]
    run.monitor.epoch_end(run.epoch, metrics, {"valid/confusion_matrix": picture}, run.classes, recall)
    trained = f"train loss {metrics['train/loss']:.4f} acc {metrics['train/accuracy']:.2%}"
    rest = f"valid acc {accuracy:.2%} | lr {lr:.3g} | {images_per_second:,.0f} images/s"
    print(f"Summary:  {format_epoch(run.epoch, run.args.epochs)} {trained} | {rest}", flush=True)
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
    print("Per-class results on the validation set (last epoch):")
    for name, r, p, n in zip(run.classes, *class_report(conf_mat), conf_mat.sum(axis=1)):
        recall, precision = ("      -" if np.isnan(v) else f"{v:7.2%}" for v in (r, p))
        print(f"  class {name:<12} images {n:<6} recall {recall}  precision {precision}")
    best = f"best validation accuracy {run.best_accuracy:.2%}"
    print(f"Finished training: {best}. See it with: tensorboard --logdir {run.args.log_dir}")


def train(args, dist):
    """The whole run: set up, resume, then per epoch: train, validate and log, checkpoint. Returns the exit status."""
    run = setup(args, dist)
    monitor_state = resume(run) if args.resume is not None else None
    if run.epoch >= args.epochs:
        print(f"{run.run_dir} has already trained {run.epoch} epochs; pass --epochs N (N > {run.epoch}) to train on")
        return 0
    if args.resume is not None:
        print(f"Resuming {run.run_dir} at epoch {run.epoch + 1}, iteration {run.batches_done + 1}")
    if dist.is_main:
        (run.run_dir / "args.json").write_text(json.dumps(saved_args(args), indent=2) + "\n")
    parameters = sum(p.numel() for p in run.net.parameters())
    print(
        f"Run folder: {run.run_dir}   device: {dist.device}   classes: {len(run.classes)}   parameters: {parameters:,}"
    )
    status = None
    with open_monitor(run, monitor_state) as run.monitor, StopRequest() as stop_request:
        while run.epoch < args.epochs and status is None:
            group = run.optimizer.param_groups[0]  # the base learning rate, as StepLR has decayed it so far
            lr = args.lr * group["lr"] / group["initial_lr"]
            seen, started = run.totals.get("seen", 0) if run.batches_done else 0, time.perf_counter()
            status = train_one_epoch(run, stop_request)
            if status is not None:
                break
            throughput = (run.totals["seen"] - seen) / (time.perf_counter() - started)  # all ranks' images
            accuracy, conf_mat, picture, metrics = validate_and_log(run, lr, throughput)
            run.scheduler.step()
            checkpoint(run, accuracy, picture)
            if dist.any(stop_request.requested) and run.epoch < args.epochs:
                run.monitor.flush()
                warn(f"Stopped after epoch {run.epoch}. Resume with: python train.py --resume {run.run_dir}")
                status = 130
        if status is None:
            final = {"best_valid_accuracy": run.best_accuracy, "final_valid_accuracy": accuracy}
            final["final_train_loss"] = metrics["train/loss"]
            run.monitor.log_hparams(hyperparameters(args), {f"hparam/{k}": v for k, v in final.items()}, run.epoch - 1)
    print(f"Diagnosis (in full in {run.run_dir / 'diagnosis.json'} and TensorBoard's Text tab):")
    print(indented(run.monitor.story()))
    if status is None:
        report(run, conf_mat, picture)
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
        dist.close()


if __name__ == "__main__":
    sys.exit(main())
