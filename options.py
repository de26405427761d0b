"""train.py's command line: every option, its default and its help, checked as it is parsed, and
what the options that name layers make of the model's parameters (param_groups).

`python train.py --help` prints them; README's table says more. With --resume, the run's saved
arguments (args.json) are the defaults, and options given with it override them.
"""

import argparse
import json
import math
import os
from pathlib import Path

from gradwatch import Thresholds
from gradwatch.diagnosis import threshold_override


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
seed = checked(int, lambda v: 0 <= v < 2**64, "an integer from 0 to 2**64 - 1 (what torch.manual_seed takes)")
NAME_MAX = 255  # bytes in one file name, on the usual file systems


def device_name(text):
    if text == "auto":
        return text
    import torch  # here, so that --help answers before torch loads (seconds)

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


def run_name(text):
    """argparse type for --run-name: one folder name, so that the run stays inside --log-dir."""
    separators = [sep for sep in (os.sep, os.altsep) if sep]
    if text in ("", ".", "..") or any(sep in text for sep in separators) or Path(text).is_absolute():
        raise argparse.ArgumentTypeError(
            f"must be one folder name, which goes under --log-dir (no '/', '.' or '..'), got '{text}'"
        )
    size = len(os.fsencode(text))
    if size > NAME_MAX:
        raise argparse.ArgumentTypeError(
            f"must be at most {NAME_MAX} bytes, the longest file name a file system takes; got {size}"
        )
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
        ("--seed", dict(type=seed, default=0, help="seeds the weights and the shuffling")),
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
        ("--run-name", dict(type=run_name, help="run folder name under --log-dir (default: the start time)")),
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


def saved_options(path, parser):
    """The options a run was started with, from its args.json, as defaults for the parser; a damaged
    file ends the program with one line (parser.error) that says so."""
    try:
        saved = json.loads(path.read_text())
        known = {action.dest for action in parser._actions}
        saved = {key: value for key, value in saved.items() if key in known}
        saved["data"], saved["log_dir"] = Path(saved["data"]), Path(saved["log_dir"])
    except (ValueError, KeyError, TypeError, AttributeError) as err:  # not JSON, not an object, keys missing
        why = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
        parser.error(f"{path} is damaged ({why}); restore it, or start a new run")
    return saved


def saved_value_problem(action, value):
    """What is wrong with an option's value as args.json holds it (edited by hand: "batch_size": "sixteen"),
    checked as the parser checks it from the command line; None if nothing."""
    if value is None or isinstance(value, Path):
        return None
    if action.const in (True, False) and not action.type:  # --fsdp and the like
        return None if isinstance(value, bool) else f"must be true or false, got {value!r}"
    if action.choices and value not in action.choices:
        return f"must be one of {', '.join(action.choices)}, got {value!r}"
    appended = isinstance(action, argparse._AppendAction)
    items = value if appended and isinstance(value, list) else [value]
    try:
        for item in items if action.type else ():
            pair = isinstance(item, (list, tuple)) and len(item) == 2
            if action.type(f"{item[0]}={item[1]}" if pair else str(item)) != (tuple(item) if pair else item):
                raise argparse.ArgumentTypeError(f"must be {action.type.__name__}, got {item!r}")
    except (argparse.ArgumentTypeError, TypeError) as err:
        return str(err)
    return None


def parse_args(argv=None):
    """Parse the command line; with --resume, the run's saved arguments are the defaults."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume is not None:
        run_dir = args.resume
        saved = saved_options(run_dir / "args.json", parser)
        args = parser.parse_args(argv, namespace=argparse.Namespace(**saved))
        for action in parser._actions:  # the saved values the command line kept
            if action.dest in saved and getattr(args, action.dest) is saved[action.dest]:
                problem = saved_value_problem(action, saved[action.dest])
                if problem:
                    damaged = f"{run_dir / 'args.json'} is damaged ({action.option_strings[-1]} {problem})"
                    parser.error(f"{damaged}; restore it, or start a new run")
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


# TensorBoard's HParams tab ticks the first five settings by name, capitals before lower case, in every
# comparison (also of runs that differ in another setting): the five most compared between runs are named in
# words, the rest as train.py's options
TICKED = {"Learning rate": "lr", "Batch size": "batch_size", "Weight decay": "weight_decay", "Momentum": "momentum"}
OTHERS = ("epochs", "dampening", "step_size", "gamma", "seed")


def hyperparameters(args):
    """The settings shown in TensorBoard's HParams tab: clipping as "off" or its norm (a string either way, since
    TensorBoard leaves out the runs whose value has another type than the first run's)."""
    values = {name: getattr(args, key) for name, key in TICKED.items()}
    values["Clipping"] = f"{args.clip_grad_norm:g}" if args.clip_grad_norm else "off"
    values.update((key, getattr(args, key)) for key in OTHERS)
    for key in ("layer_lr", "layer_wd"):
        values[key] = ",".join(f"{n}={v:g}" for n, v in getattr(args, key)) or "-"
    return values
