"""Fault injection: training runs broken in known ways, and healthy ones, diagnosed by the monitor at its defaults.

    python bench/diagnosis_suite.py                 # 13 faulty and 6 healthy runs on the sample data (a few minutes)
    python bench/diagnosis_suite.py --only lr_high_2 --epochs 4

Every run trains on the shipped digits (Data/) with SGD (momentum 0.9, batch 16) for the same number of epochs,
the monitor watching at its defaults and given each step's loss and each epoch's metrics. A faulty run has one
known cause; the suite prints, per run, the cause, what the diagnosis named first (the first problem of its story,
notes left aside) and whether that is one of the rules that name the cause; then the totals: causes named first,
runs with a problem among the healthy ones, and suggestions that go against the run's history (raising the
learning rate after the loss diverged, or lowering it for a run stuck at its starting loss).
"""

import argparse
import contextlib
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from data import CIFAR10_MEAN, CIFAR10_STD, build_loaders  # noqa: E402
from gradwatch import TrainingMonitor  # noqa: E402
from utils import Net, validate  # noqa: E402


def net(init=None):
    def build():
        model = Net()
        model.initialize_weights()
        if init:
            init(model)
        return model

    return build


def zero(model):
    for p in model.parameters():
        nn.init.zeros_(p)


def huge(model):
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(30)


def dead_bias(model):
    nn.init.constant_(model.conv1.bias, -10.0)


def deep_sigmoid():
    layers = [nn.Flatten(), nn.Linear(3 * 32 * 32, 64), nn.Sigmoid()]
    for _ in range(7):
        layers += [nn.Linear(64, 64), nn.Sigmoid()]
    return nn.Sequential(*layers, nn.Linear(64, 10))


# name: (the cause, the rules that name it, settings); settings: model, lr, weight_decay, labels, inputs, nan_at
FAULTS = {
    "lr_high_2": ("learning rate far too high (2)", {"diverging", "exploding_gradients"}, dict(lr=2.0)),
    "lr_high_50": ("learning rate far too high (50)", {"diverging", "exploding_gradients"}, dict(lr=50.0)),
    "lr_low": ("learning rate far too low (1e-5)", {"stuck", "not_learning"}, dict(lr=1e-5)),
    "zero_init": ("all weights initialised to zero", {"dead_units", "vanishing_gradients"}, dict(model=net(zero))),
    "huge_init": ("initial weights 30x too large", {"high_initial_loss"}, dict(model=net(huge))),
    "shuffled_labels": ("training labels shuffled", {"no_generalisation", "stuck"}, dict(labels="shuffle")),
    "deep_sigmoid": ("8 sigmoid layers", {"saturated", "vanishing_gradients"}, dict(model=deep_sigmoid, lr=0.05)),
    "dead_relus": ("conv1's bias at -10: dead ReLUs", {"dead_units"}, dict(model=net(dead_bias))),
    "missing_class": ("class 3 missing from training", {"output_bias_skew"}, dict(labels="drop 3")),
    "unnormalised": ("inputs not normalised (0-255)", {"high_initial_loss", "diverging"}, dict(inputs=255.0)),
    "weights_growing": ("no weight decay at twice the lr", {"weights_growing"}, dict(lr=0.02)),
    "nan_injected": ("a NaN batch at step 300", {"diverging", "nonfinite_gradients"}, dict(nan_at=300)),
    "clipped_lr_high": ("lr 0.2 (20x), clipped at norm 0.1", {"mostly_clipped"}, dict(lr=0.2, clip=0.1)),
}
HEALTHY = {  # name: (what it is, settings)
    "default": ("healthy: lr 0.01, seed 0", dict()),
    "seed_1": ("healthy: seed 1", dict(seed=1)),
    "seed_2": ("healthy: seed 2", dict(seed=2)),
    "lr_0.005": ("healthy: lr 0.005", dict(lr=0.005)),
    "weight_decay": ("healthy: lr 0.02, weight decay 5e-4", dict(lr=0.02, weight_decay=5e-4)),
    "clipped": ("healthy: clipped at norm 6 (p90)", dict(clip=6.0)),
}


def batches(loader, labels, inputs, seed):
    """The cached training batches, with a fault in the labels or the inputs."""
    generator = torch.Generator().manual_seed(seed)
    for x, y in loader:
        if labels == "shuffle":
            y = y[torch.randperm(len(y), generator=generator)]
        elif labels == "drop 3":
            x, y = x[y != 3], y[y != 3]
        if inputs != 1.0:  # undo the normalisation: raw pixel values 0..255
            mean, std = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
            x = (x * std + mean) * inputs
        yield x, y


def train(log_dir, train_loader, valid_loader, classes, epochs, model=None, lr=0.01, weight_decay=0.0, seed=0,
          labels=None, inputs=1.0, nan_at=None, clip=None):  # fmt: skip
    """One run with the monitor at its defaults; returns its findings."""
    torch.manual_seed(seed)
    model = (model or net())()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    with TrainingMonitor(log_dir).watch(model, optimizer) as monitor:
        for epoch in range(epochs):
            train_loader.batch_sampler.set_epoch(epoch)
            loss_sum, correct, seen = 0.0, 0, 0
            for x, y in batches(train_loader, labels, inputs, seed * 1000 + epoch):
                if nan_at is not None and monitor.steps + 1 == nan_at:
                    x = torch.full_like(x, math.nan)
                optimizer.zero_grad()
                outputs = model(x)
                loss = nn.functional.cross_entropy(outputs, y)
                loss.backward()
                norm = nn.utils.clip_grad_norm_(model.parameters(), clip) if clip else None
                optimizer.step()
                monitor.step(loss, grad_norm=norm, max_norm=clip)
                loss_sum, seen = loss_sum + loss.item() * len(y), seen + len(y)
                correct += (outputs.argmax(1) == y).sum().item()
            valid = batches(valid_loader, None, inputs, 0)  # the same inputs, the right labels
            conf_mat, accuracy, valid_loss = validate(model, valid, "valid", classes, nn.functional.cross_entropy)
            recall = [conf_mat[i, i] / max(conf_mat[i].sum(), 1) for i in range(len(classes))]
            metrics = {"train/loss": loss_sum / seen, "train/accuracy": correct / seen}
            metrics.update({"valid/accuracy": accuracy, "valid/loss": valid_loss})
            monitor.epoch_end(epoch, metrics, classes=classes, recall=recall)
    return monitor.findings


def first_problem(findings):
    problems = [f for f in findings if f.cause is None and f.severity == "warning"]
    return problems[0] if problems else None


def contradictions(findings):
    """Suggestions that go against the run's history."""
    diverged = any(f.rule in ("diverging", "exploding_gradients") for f in findings)
    roots = [f for f in findings if f.cause is None and f.severity == "warning"]
    stuck = bool(roots) and roots[0].rule in ("stuck", "not_learning") and not diverged
    bad = []
    for f in findings:
        text = (f.suggestion or "").lower()
        if diverged and "larger learning rate" in text:
            bad.append(f"{f.id}: raises the learning rate after the loss diverged")
        if stuck and ("lower the learning rate" in text or "lower learning rate" in text):
            bad.append(f"{f.id}: lowers the learning rate of a stuck run")
    return bad


def score(runs, names, train_one, widths=(18, 38), story=False):
    """Train each run of `names` ({name: (cause, the rules that name it, settings)}; no rules for a healthy run)
    with `train_one(log_dir, settings)`, which returns its findings; print a row per run (what the diagnosis named
    first, whether that is right, the seconds it took), its story if asked, then the totals."""
    name_width, cause_width = widths
    print(f"{'run':{name_width}}{'cause':{cause_width}}{'named first':24}{'right':>6}  {'s':>5}")
    right = wrong_healthy = faults = healthy = 0
    bad = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            cause, rules, settings = runs[name]
            start = time.perf_counter()
            with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
                findings = train_one(f"{tmp}/{name}", settings)
            first = first_problem(findings)
            named = first.rule if first else "-"
            ok = named in rules if rules else first is None
            faults += bool(rules)
            healthy += not rules
            right += bool(rules) and ok
            wrong_healthy += not rules and not ok
            bad += [f"{name}: {text}" for text in contradictions(findings)]
            print(f"{name:{name_width}}{cause:{cause_width}}{named:24}{'yes' if ok else 'NO':>6}  "
                  f"{time.perf_counter() - start:5.1f}", flush=True)  # fmt: skip
            for finding in findings if story else ():
                print(f"    {finding}")
    print(f"\ncauses named first: {right} of {faults} faulty runs; healthy runs with a warning: {wrong_healthy} of "
          f"{healthy}; suggestions against the run's history: {len(bad)}; "
          f"{time.perf_counter() - started:.0f} s in all")  # fmt: skip
    for text in bad:
        print(f"  {text}")


def main():
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=10, help="epochs per run (default 10)")
    parser.add_argument("--only", nargs="*", help="run only these (names from the table)")
    args = parser.parse_args()
    device = torch.device("cpu")
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    train_loader, valid_loader, classes, _ = build_loaders(
        ROOT / "Data", 16, 0, device, 0, "yes", CIFAR10_MEAN, CIFAR10_STD
    )
    runs = {**FAULTS, **{name: (what, set(), settings) for name, (what, settings) in HEALTHY.items()}}

    def train_one(log_dir, settings):
        return train(log_dir, train_loader, valid_loader, classes, args.epochs, **settings)

    score(runs, args.only or list(runs), train_one)


if __name__ == "__main__":
    main()
