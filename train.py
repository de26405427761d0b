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
from datetime import datetime
from pathlib import Path

if __name__ == "__main__":  # Ctrl-C while the libraries load (seconds) ends quietly; main() restores KeyboardInterrupt
    # os._exit, not an exception: one raised inside torch's import can surface in its C++ code and abort
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))

import numpy as np
import torch
import torch.nn as nn

from data import build_loaders, load_normalisation
from diagnosis import Thresholds, threshold_override
from monitor import TrainingMonitor
from utils import DataListError, ImageReadError, Net, class_report, confusion_matrix_picture, validate

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
TENSORBOARD_HISTOGRAM_STEPS = 100  # what TensorBoard's default loader keeps per histogram tag


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def positive_float(text):
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def non_negative_float(text):
    value = float(text)
    if not value >= 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


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
        raise argparse.ArgumentTypeError(f"run folder '{text}' does not exist; pass a folder under the log dir, "
                                         f"e.g. Result/<run-name>")
    for name in ("args.json", "last.pt"):
        if not (path / name).is_file():
            raise argparse.ArgumentTypeError(f"'{text}' has no {name}, so it is not a run folder train.py can resume")
    return path


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show every default, except where there is none to show."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def key_value(value_type):
    """argparse type for NAME=VALUE pairs."""
    def parse(text):
        name, sep, value = text.partition("=")
        if not sep or not name:
            raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got '{text}'")
        return name, value_type(value)
    parse.__name__ = "NAME=VALUE"
    return parse


def build_parser():
    parser = argparse.ArgumentParser(
        description="Train the tutorial's CNN on an image list, writing weight and gradient histograms of every "
                    "layer to TensorBoard each epoch.",
        epilog="Example: python train.py --epochs 5 && tensorboard --logdir Result",
        formatter_class=HelpFormatter)
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
    logging = parser.add_argument_group("logging")
    logging.add_argument("--log-dir", type=Path, default=Path("Result"), help="where run folders go")
    logging.add_argument("--run-name", default=None, help="run folder name under --log-dir (default: the start time, e.g. 20261126-171500)")
    logging.add_argument("--hist-every", type=non_negative_int, default=0,
                         help="also log histograms every N optimizer steps (into <run>/steps); 0: once per epoch only")
    logging.add_argument("--print-every", type=positive_int, default=10, help="iterations between progress lines")
    watch = parser.add_argument_group("diagnosis (see README: The diagnosis)")
    watch.add_argument("--stats-every", type=non_negative_int, default=20,
                       help="log per-layer statistics every N optimizer steps; 0: once per epoch")
    watch.add_argument("--stop-on-nonfinite", action="store_true",
                       help="stop at the first NaN or Inf in the loss or the logged gradients (checks the loss "
                            "every step)")
    watch.add_argument("--threshold", action="append", type=threshold_override, default=[], metavar="NAME=VALUE",
                       help=f"change a diagnosis threshold (repeatable); names: {', '.join(Thresholds.names())}")
    optim.add_argument("--layer-lr", action="append", type=key_value(positive_float), default=[],
                       metavar="NAME=FACTOR", help="multiply the learning rate of a parameter or module prefix, "
                                                   "e.g. conv1=10 (repeatable)")
    optim.add_argument("--layer-wd", action="append", type=key_value(non_negative_float), default=[],
                       metavar="NAME=VALUE", help="weight decay of a parameter or module prefix, e.g. fc1=5e-4 "
                                                  "(repeatable)")
    logging.add_argument("--resume", type=run_folder, default=None, metavar="RUN_DIR",
                         help="continue the run in RUN_DIR from its last checkpoint; options given with it override "
                              "the saved ones (e.g. --epochs)")
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
            raise ValueError(f"'{prefix}' names no parameter or module; parameters are: "
                             f"{', '.join(name for name, _ in named)}")

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

    Every rank runs the same loop on its shard of each epoch; rank 0 alone prints, writes events and
    checkpoints. The collectives below are no-ops for a single process.
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
        self.is_main = self.rank == 0
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


def save_checkpoint(path, state):
    """Write atomically: a crash mid-save leaves the previous checkpoint intact. Only rank 0 writes."""
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


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


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def prepare_run_dir(args):
    """Name (a timestamp unless --run-name) and create <log-dir>/<run-name> for a new run; a resumed run has one."""
    if args.resume is not None:
        return
    args.run_name = args.run_name or datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = args.log_dir / args.run_name
    if (run_dir / "args.json").exists():
        raise RunError(f"{run_dir} already holds a run; continue it with --resume {run_dir} "
                       f"or pick another --run-name")
    run_dir.mkdir(parents=True, exist_ok=True)


def percent(value):
    return "      -" if np.isnan(value) else f"{value:7.2%}"


def format_epoch(epoch, epochs):
    return f"Epoch[{epoch + 1:0>3}/{epochs:0>3}]"


def train(args, dist):
    """The whole run: data, model, the epoch loop, logging and checkpoints. Returns the process exit code."""
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
    run_dir = args.log_dir / args.run_name

    torch.manual_seed(args.seed)
    net = Net(num_classes=len(classes))
    net.initialize_weights()
    net.to(device)
    criterion = nn.CrossEntropyLoss()
    try:
        groups = param_groups(net, args.lr, args.weight_decay, args.layer_lr, args.layer_wd)
    except ValueError as err:
        raise RunError(f"--layer-lr/--layer-wd: {err}") from None
    optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, dampening=args.dampening)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.step_size, gamma=args.gamma)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    # entering even a disabled autocast costs about 5% of a small model's step: use none without --amp
    autocast = torch.autocast(device.type, dtype=AMP_DTYPES[args.amp]) if args.amp != "off" else nullcontext()

    # Where to start: a new run at epoch 0, a resumed one where its last checkpoint left off.
    start_epoch, start_batch, step, best_accuracy, totals = 0, 0, 0, 0.0, {}
    if args.resume is not None:
        checkpoint = torch.load(run_dir / "last.pt", map_location=device, weights_only=True)
        if checkpoint["classes"] != classes:
            raise RunError(f"{args.data}: its classes differ from the ones {run_dir} was trained on; "
                           f"resume with the same --data")
        net.load_state_dict(checkpoint["model"])
        try:
            optimizer.load_state_dict(checkpoint["optimizer"])
        except ValueError:
            raise RunError(f"{run_dir}: its optimizer has other parameter groups; resume with the run's own "
                           f"--layer-lr/--layer-wd settings (see its args.json)") from None
        scheduler.load_state_dict(checkpoint["scheduler"])
        saved_lr = checkpoint["args"]["lr"]
        if args.lr != saved_lr:  # --lr given with --resume rescales every group's schedule
            factor = args.lr / saved_lr
            for group in optimizer.param_groups:
                group["lr"] *= factor
                group["initial_lr"] *= factor
            scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
            print(f"Learning rate changed from {saved_lr:g} to {args.lr:g} (StepLR decays apply as before)")
        if checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        if "rng" in checkpoint:  # the crops go on where they stopped: a resumed run trains as an unbroken one
            set_rng_state(checkpoint["rng"], device)
        start_epoch, start_batch = checkpoint["epoch"], checkpoint["batches_done"]
        step, best_accuracy, totals = checkpoint["step"], checkpoint["best_accuracy"], checkpoint["totals"]
        if start_epoch >= args.epochs:
            print(f"{run_dir} has already trained {start_epoch} epochs; pass --epochs N (N > {start_epoch}) "
                  f"to train it further")
            return 0
        print(f"Resuming {run_dir} at epoch {start_epoch + 1}, iteration {start_batch + 1}")
    saved_args = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()
                  if key != "thresholds"}
    if dist.is_main:
        (run_dir / "args.json").write_text(json.dumps(saved_args, indent=2) + "\n")
    print(f"Run folder: {run_dir}   device: {device}   classes: {len(classes)}   "
          f"parameters: {sum(p.numel() for p in net.parameters()):,}")

    def checkpoint_state(epoch, batches_done):
        return {"model": net.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "epoch": epoch, "batches_done": batches_done, "step": step, "best_accuracy": best_accuracy,
                "totals": dict(totals), "classes": classes, "args": saved_args, "monitor": monitor.state_dict(),
                "rng": rng_state(device)}

    def stop(epoch, batches_done, why):
        save_checkpoint(run_dir / "last.pt", checkpoint_state(epoch, batches_done))
        print(f"{why}: checkpoint saved at epoch {epoch + 1}, iteration {batches_done}. "
              f"Resume with: python train.py --resume {run_dir}", file=sys.stderr)

    histogram_steps = max(args.epochs, len(train_loader) * args.epochs // args.hist_every if args.hist_every else 0)
    if histogram_steps > TENSORBOARD_HISTOGRAM_STEPS:
        print(f"Note: this run logs {histogram_steps} histogram steps per tag; TensorBoard shows a sample of "
              f"{TENSORBOARD_HISTOGRAM_STEPS} unless started with: "
              f"tensorboard --logdir {args.log_dir} --samples_per_plugin histograms=0")
    # DDP averages the gradients over the ranks during backward; net (its module) is what is logged and saved
    model = torch.nn.parallel.DistributedDataParallel(net) if dist.world_size > 1 else net
    resumed = args.resume is not None
    monitor = TrainingMonitor(run_dir, stats_every=args.stats_every, hist_every=args.hist_every,
                              thresholds=args.thresholds, purge_epoch=start_epoch if resumed else None,
                              purge_step=step + 1 if resumed else None, start_step=step).watch(net, optimizer)
    if resumed and "monitor" in checkpoint:  # the diagnosis goes on comparing with the epochs before the stop
        monitor.load_state_dict(checkpoint["monitor"])
    sampler = train_loader.batch_sampler
    with monitor, StopRequest() as stop_request:
        for epoch in range(start_epoch, args.epochs):
            net.train()
            sampler.set_epoch(epoch, start_batch if epoch == start_epoch else 0)
            if epoch != start_epoch or start_batch == 0:
                totals = {"loss_sum": 0.0, "correct": 0, "seen": 0}
            group = optimizer.param_groups[0]  # the base learning rate, as StepLR has decayed it so far
            lr = args.lr * group["lr"] / group["initial_lr"]
            epoch_start, epoch_images = time.perf_counter(), 0
            # running sums stay on the device between progress lines
            window_loss = torch.zeros((), device=device)
            window_correct = torch.zeros((), dtype=torch.int64, device=device)
            window_seen, done = 0, sampler.start

            def add_window():
                nonlocal window_seen
                # note: a CPU-GPU sync point, once per progress line; sums over all ranks under torchrun
                loss_sum, correct, seen = dist.sum([window_loss.item(), window_correct.item(), window_seen])
                totals["loss_sum"] += loss_sum
                totals["correct"] += int(correct)
                totals["seen"] += int(seen)
                window_loss.zero_()
                window_correct.zero_()
                window_seen = 0

            try:
                for inputs, labels in train_loader:
                    inputs = inputs.to(device, non_blocking=True)
                    labels = labels.to(device, non_blocking=True)
                    # forward (autocast under --amp), backward, update
                    optimizer.zero_grad(set_to_none=True)
                    with autocast:
                        outputs = model(inputs)
                        loss = criterion(outputs, labels)
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)  # unscales the gradients first: the monitor sees true values
                    scaler.update()
                    step += 1
                    done += 1
                    urgent = monitor.step()  # statistics and step histograms, when due
                    # note: with --stop-on-nonfinite, reading the loss is a CPU-GPU sync point every step
                    if args.stop_on_nonfinite and (urgent or not math.isfinite(loss.item())):
                        save_checkpoint(run_dir / "nonfinite.pt", checkpoint_state(epoch, done))
                        what = "gradients in " + ", ".join(urgent[0].parameters) if urgent else "loss"
                        then = (f"resume from the last good epoch with: python train.py --resume {run_dir} --lr SMALLER"
                                if (run_dir / "last.pt").exists() else "start again with a smaller --lr")
                        print(f"Stopped: non-finite {what} at step {step} (epoch {epoch + 1}); the state is in "
                              f"{run_dir / 'nonfinite.pt'}. Lower the learning rate or clip gradients: {then}",
                              file=sys.stderr)
                        return 3

                    window_loss += loss.detach() * labels.size(0)
                    window_correct += (outputs.argmax(dim=1) == labels).sum()
                    window_seen += labels.size(0)
                    epoch_images += labels.size(0)
                    if done % args.print_every == 0 or done == len(sampler):
                        add_window()
                        print(f"Training: {format_epoch(epoch, args.epochs)} Iteration[{done:0>3}/{len(sampler):0>3}] "
                              f"Loss: {totals['loss_sum'] / totals['seen']:.4f} "
                              f"Acc: {totals['correct'] / totals['seen']:.2%}", flush=True)
                    if dist.any(stop_request.requested) and done < len(sampler):
                        add_window()
                        stop(epoch, done, "Stopped")
                        return 130
            except ImageReadError:
                add_window()
                stop(epoch, done, "Stopped on a bad image")
                raise
            train_seconds = time.perf_counter() - epoch_start

            conf_mat, accuracy = validate(net, valid_loader, "valid", classes)
            scheduler.step()
            recall, precision = class_report(conf_mat)
            metrics = {"train/loss": totals["loss_sum"] / totals["seen"], "train/accuracy": totals["correct"] / totals["seen"],
                       "valid/accuracy": accuracy, "train/lr": lr, "train/images_per_second": epoch_images * dist.world_size / train_seconds}
            metrics.update({f"valid_recall/{name}": r for name, r in zip(classes, recall) if not np.isnan(r)})
            metrics.update({f"valid_precision/{name}": p for name, p in zip(classes, precision) if not np.isnan(p)})
            picture = confusion_matrix_picture(conf_mat, classes, "valid")
            new_findings = monitor.epoch_end(epoch, metrics, {"valid/confusion_matrix": picture}, classes=classes,
                                             recall=[None if np.isnan(r) else float(r) for r in recall])
            print(f"Summary:  {format_epoch(epoch, args.epochs)} train loss {metrics['train/loss']:.4f} "
                  f"acc {metrics['train/accuracy']:.2%} | valid acc {accuracy:.2%} | lr {lr:.3g} | "
                  f"{metrics['train/images_per_second']:,.0f} images/s", flush=True)
            for finding in new_findings:
                print(f"Diagnosis: {finding}", flush=True)

            is_best = accuracy > best_accuracy
            best_accuracy = max(best_accuracy, accuracy)
            state = checkpoint_state(epoch + 1, 0)
            save_checkpoint(run_dir / "last.pt", state)
            if is_best:
                save_checkpoint(run_dir / "best.pt", state)
                if dist.is_main:  # the picture TensorBoard shows (matplotlib's took 0.3 s an epoch)
                    (run_dir / "Confusion_Matrix_valid_best.png").write_bytes(picture.png())
            if dist.any(stop_request.requested) and epoch + 1 < args.epochs:
                monitor.flush()
                print(f"Stopped after epoch {epoch + 1}. Resume with: python train.py --resume {run_dir}",
                      file=sys.stderr)
                return 130

        monitor.log_hparams(hyperparameters(args), {"hparam/best_valid_accuracy": best_accuracy,
                                                    "hparam/final_valid_accuracy": accuracy,
                                                    "hparam/final_train_loss": metrics["train/loss"]}, epoch)
    if dist.is_main:
        (run_dir / "Confusion_Matrix_valid_last.png").write_bytes(picture.png())
    print("Per-class results on the validation set (last epoch):")
    for name, r, p, n in zip(classes, recall, precision, conf_mat.sum(axis=1)):
        print(f"  class {name:<12} images {n:<6} recall {percent(r)}  precision {percent(p)}")
    print(f"Finished training: best validation accuracy {best_accuracy:.2%}. "
          f"See it with: tensorboard --logdir {args.log_dir}")
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
