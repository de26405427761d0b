"""train.py's run folder and its checkpoints: last.pt after every epoch, best.pt at the best
validation accuracy, each holding everything a resumed run needs to train on as if it had not stopped.

    python train.py --resume Result/<run>            # from last.pt
    python train.py --resume Result/<run> --epochs 40  # and train longer
"""

import json
import os
import shutil

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from pathlib import Path

import torch

from gradwatch.states import kind, state_problem


class RunError(Exception):
    """A run folder that cannot be used as asked; the message says what to do instead."""


@dataclass
class Progress:
    """Where a run stands, saved in every checkpoint."""

    epoch: int = 0  # the epoch running, or to run next
    batches_done: int = 0  # its iterations done
    step: int = 0  # optimizer steps so far
    best_accuracy: float = 0.0
    totals: dict = field(default_factory=dict)  # the epoch's loss sum, correct predictions, images


def prepare_run_dir(args):
    """Name (a timestamp unless --run-name) and create <log-dir>/<run-name> for a new run; a resumed
    run has one."""
    if args.resume is not None:
        return
    args.run_name = args.run_name or datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = args.log_dir / args.run_name
    if (run_dir / "args.json").exists() and (run_dir / "last.pt").exists():
        again = f"continue it with --resume {run_dir} or pick another --run-name"
        raise RunError(f"{run_dir} already holds a run; {again}")
    if (run_dir / "args.json").exists():  # killed before its first checkpoint: nothing to resume
        print(f"{run_dir} holds a run stopped before its first checkpoint: starting it again", flush=True)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a read-only log dir, a file in the way
        where = "pick another --log-dir or --run-name"
        raise RunError(f"{run_dir}: cannot create the run folder ({err.strerror}); {where}") from None


@contextmanager
def writing(path, partial=None):
    """Writing `path` into a run folder: a failure (a full disk, a folder made read-only) becomes a RunError that
    names the file and what to do, the half-written `partial` is removed, and what was written before is kept."""
    try:
        yield path
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError of its zip writer
        run_dir = path.parent
        if isinstance(err, OSError) and err.strerror:
            reason = err.strerror
        elif run_dir.is_dir() and shutil.disk_usage(run_dir).free < 2**20:  # before the partial file is removed
            reason = "the disk is full"
        else:
            reason = str(err).strip().splitlines()[-1]
        if partial is not None:
            partial.unlink(missing_ok=True)
        if (run_dir / "last.pt").is_file():
            then = f"resume with: python train.py --resume {run_dir}"
        else:
            then = "run the same command again"
        raise RunError(f"{path}: cannot be written ({reason}); free space on its disk or make {run_dir} "
                       f"writable, then {then}") from None  # fmt: skip


_LOCKS = []  # the lock files this process holds, open until it exits


def lock_run_dir(run_dir):
    """Take the run folder for this process, so that one run folder has one writer: a second train.py
    on it is refused with a line naming the first."""
    if fcntl is None:  # not on POSIX: no lock
        return
    with writing(run_dir / ".lock") as path:
        lock = open(path, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        holder = lock.read().strip() or "?"
        lock.close()
        raise RunError(f"{run_dir} is being trained by another train.py (process {holder}); wait for it to end, "
                       "or pick another --run-name") from None  # fmt: skip
    _LOCKS.append(lock)
    with writing(run_dir / ".lock"):
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()


def release_run_dirs():
    """Give up the run folders this process took (at the end of train.py's main)."""
    while _LOCKS:
        _LOCKS.pop().close()


def saved_args(args):
    """The options as args.json holds them."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "thresholds"}


def write_args(run):
    with writing(run.run_dir / "args.json") as path:
        path.write_text(json.dumps(saved_args(run.args), indent=2) + "\n")


def rng_state(device):
    """The random state the augmentation draws from (on the device the crops are drawn on)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def state(run):
    """Everything a checkpoint holds; the model and optimizer state whole (under --fsdp gathered from
    every rank, which must all call this), so that it loads into a plain Net."""
    if run.args.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict  # 1 s to load

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model, optimizer = get_state_dict(run.net, run.optimizer, options=options)
    else:
        model, optimizer = run.net.state_dict(), run.optimizer.state_dict()
    saved = {key: getattr(run, key).state_dict() for key in ("scheduler", "scaler", "monitor")}
    saved.update(asdict(run.progress), model=model, optimizer=optimizer, classes=run.classes)
    return {**saved, "args": saved_args(run.args), "rng": rng_state(run.dist.device)}


def save(run, *names):
    """Write the checkpoint under each name, atomically: a crash or a full disk mid-save leaves the previous
    one intact. Under --fsdp every rank gathers, and rank 0 writes."""
    if not (run.dist.is_main or run.args.fsdp):
        return
    saved = state(run)
    if not run.dist.is_main:
        return
    if run.monitor is not None:  # the events of the steps the checkpoint covers are on disk first
        run.monitor.flush()
    for name in names:
        path, partial = run.run_dir / name, run.run_dir / (name + ".tmp")
        with writing(path, partial):
            torch.save(saved, partial)
            os.replace(partial, path)


def read_checkpoint(path, device):
    """The checkpoint at `path`, or a RunError that says what is wrong with it (torch's own message
    for a damaged file suggests weights_only=False, which would run whatever the file holds)."""
    fix = "copy best.pt over it to resume from the best epoch, or start a new run"
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # truncated, empty, random bytes
        raise RunError(f"{path}: not a readable checkpoint ({type(err).__name__}): it is damaged; {fix}") from None
    keys = {"model", "optimizer", "scheduler", "classes", "args", *(f.name for f in fields(Progress))}
    missing = sorted(keys - set(checkpoint)) if isinstance(checkpoint, dict) else ["everything"]
    if missing:
        raise RunError(f"{path}: not a train.py checkpoint (it lacks {', '.join(missing)}); {fix}")
    return checkpoint


def _check_options(run, checkpoint):
    """Refuse options changed on resume that the run cannot honour: another --batch-size in the middle of
    an epoch (the batches done would not be the ones skipped), another --layer-lr or --layer-wd (the
    optimizer's state holds the saved ones, so the new ones would be ignored)."""
    saved, args = checkpoint["args"], run.args
    if checkpoint["batches_done"] and saved.get("batch_size", args.batch_size) != args.batch_size:
        done = f"{checkpoint['batches_done']} batches of {saved['batch_size']} of epoch {checkpoint['epoch'] + 1}"
        raise RunError(f"{run.run_dir} stopped within an epoch ({done} done): resume it with --batch-size "
                       f"{saved['batch_size']}, which can go on exactly")  # fmt: skip
    for option in ("layer_lr", "layer_wd"):
        before = [list(pair) for pair in saved.get(option, [])]
        if before != [list(pair) for pair in getattr(args, option)]:
            flag = "--" + option.replace("_", "-")
            own = f"resume with the run's own {flag}, or start a new run"
            held = "and its optimizer state holds the old settings"
            raise RunError(f"{run.run_dir}: {flag} differs from the run's ({before or 'none'}), {held}; {own}")


def _check(run, checkpoint):
    """Refuse a checkpoint the run as built cannot continue."""
    _check_options(run, checkpoint)
    if checkpoint["classes"] != run.classes:
        again = "use the same --data"
        raise RunError(f"{run.args.data}: its classes differ from those {run.run_dir} was trained on; {again}")
    sizes = [len(group["params"]) for group in checkpoint["optimizer"]["param_groups"]]
    if sizes != [len(group["params"]) for group in run.optimizer.param_groups]:
        own = "resume with the run's own --layer-lr/--layer-wd settings (see its args.json)"
        raise RunError(f"{run.run_dir}: its optimizer has other parameter groups; {own}")


def _check_values(run, path, checkpoint):
    """Refuse a checkpoint that loads but holds values of other kinds than train.py saves (edited by
    hand, written by other code): each would fail later, inside the loop."""
    like = {**asdict(Progress()), "model": {}, "args": {}, "classes": [], "rng": {}}
    like.update(scheduler=run.scheduler.state_dict(), optimizer=run.optimizer.state_dict())
    problem = state_problem(checkpoint, like, "checkpoint")
    group = like["optimizer"]["param_groups"][0]
    for i, saved in enumerate([] if problem else checkpoint["optimizer"].get("param_groups", [])):
        problem = problem or state_problem(saved, group, f"checkpoint['optimizer']['param_groups'][{i}]", ["params"])
    ours = torch.get_rng_state()
    rng = checkpoint.get("rng", {}).get("cpu", ours)
    if not problem and (kind(rng) != "a tensor" or rng.shape != ours.shape):
        shape = tuple(getattr(rng, "shape", ()))
        problem = f"checkpoint['rng']['cpu'] is {kind(rng)} of shape {shape}, not the random generator's state"
    if problem:
        fix = "copy best.pt over it to resume from the best epoch, or start a new run"
        raise RunError(f"{path}: {problem}; {fix}")


def _mismatch(model, optimizer):
    """The first tensor of the optimizer's state whose shape is not its parameter's, in words."""
    names = {id(p): name for name, p in model.named_parameters()}
    for p, state in optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.dim() and value.shape != p.shape:
                return f"its {key} of {names.get(id(p), '?')} has shape {tuple(value.shape)}, not {tuple(p.shape)}"
    return None


def _load_weights(run, checkpoint, path):
    """The model and optimizer state, or a RunError that says which does not fit the run as built."""
    try:
        if run.args.fsdp:  # every rank takes its shards of the whole state
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            options = StateDictOptions(full_state_dict=True)
            model, optimizer = checkpoint["model"], checkpoint["optimizer"]
            set_state_dict(run.net, run.optimizer, model_state_dict=model, optim_state_dict=optimizer, options=options)
        else:
            run.net.load_state_dict(checkpoint["model"])
            run.optimizer.load_state_dict(checkpoint["optimizer"])
        wrong = _mismatch(run.net, run.optimizer)
    except Exception as err:  # another Net (its layers edited), an optimizer state of another shape
        wrong = one_detail(err)
    if wrong:
        fix = "resume with the code the run was trained with (utils.Net, train.py's optimizer), or start a new run"
        raise RunError(f"{path}: its model or optimizer state does not fit the run as built ({wrong}); {fix}")


def one_detail(err):
    """An exception in one line: its first line that names something (torch's load_state_dict puts
    the details after a header line)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    detail = next((line for line in lines[1:] if not line.endswith(":")), lines[0] if lines else "")
    return f"{type(err).__name__}: {detail}"


def _rescale_lr(run, saved_lr):
    """--lr given with --resume rescales every group's schedule."""
    factor = run.args.lr / saved_lr
    for group in run.optimizer.param_groups:
        group["lr"] *= factor
        group["initial_lr"] *= factor
    run.scheduler.base_lrs = [lr * factor for lr in run.scheduler.base_lrs]
    print(f"Learning rate changed from {saved_lr:g} to {run.args.lr:g} (StepLR decays apply as before)")


def _restore_rng(rng, device):
    """The crops go on where they stopped: a resumed run trains as an unbroken one."""
    torch.set_rng_state(rng["cpu"].cpu())  # the generators take CPU tensors; map_location moved it
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"].cpu(), device)


def resume(run):
    """Load the run's last checkpoint into `run`; returns the monitor's saved state, if the
    checkpoint has one (a checkpoint of an earlier version may not)."""
    device = run.dist.device
    path = run.run_dir / "last.pt"
    checkpoint = read_checkpoint(path, device)
    _check_values(run, path, checkpoint)
    _check(run, checkpoint)
    _load_weights(run, checkpoint, path)
    run.scheduler.load_state_dict(checkpoint["scheduler"])
    if run.args.lr != checkpoint["args"]["lr"]:
        _rescale_lr(run, checkpoint["args"]["lr"])
    if checkpoint.get("scaler"):
        run.scaler.load_state_dict(checkpoint["scaler"])
    if "rng" in checkpoint:
        _restore_rng(checkpoint["rng"], device)
    run.progress = Progress(**{f.name: checkpoint[f.name] for f in fields(Progress)})
    return checkpoint.get("monitor")
