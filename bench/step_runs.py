"""Loops counted in steps: runs that call only watch() and step(loss), never epoch_end(), diagnosed in windows of
steps by the monitor at its defaults; loss spikes injected at known steps, a divergence, and healthy recipes.

    python bench/step_runs.py                  # the second held-out set (about 3 minutes on 2 CPU cores)
    python bench/step_runs.py --set 1          # the first held-out set; --set tuning: the runs the thresholds
                                               # were set on
    python bench/step_runs.py --only cnn_sgd_spikes --story

A spike is a few steps (3) of a much larger learning rate, the way a bad batch or an unlucky step throws a run off;
it must be named first (loss_spikes), with the count of spikes; a learning rate raised for good must be named a
divergence; a healthy recipe must get no warning. The tuning runs are the MLP and AdamW runs of
tests/test_step_diagnosis.py; the held-out runs use the other architectures and optimizers of
bench/diagnosis_wide.py (the tutorial's CNN and a BatchNorm ResNet on the shipped digits, a character transformer on
Python's help topics; SGD with momentum, AdamW, Adam), and were scored once, after the thresholds were set.
"""

import argparse
import itertools
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from diagnosis_suite import score  # noqa: E402
from diagnosis_wide import Data, build_model, text_batches  # noqa: E402

from gradwatch import TrainingMonitor  # noqa: E402

SPIKES = {"loss_spikes"}
DIVERGED = {"diverging", "exploding_gradients"}
STEPS = 1500
SETTINGS = dict(arch="mlp", optimizer="adamw", lr=1e-3, clip=None, spikes=(), boost=100.0, raise_at=None, seed=0,
                schedule="warmup_cosine", steps=STEPS)  # fmt: skip

TUNING = {  # name: (what, the rules that name it (none: healthy), settings)
    "mlp_adamw_spikes": ("MLP, AdamW: 2 spikes (lr x100)", SPIKES, dict(spikes=(500, 1000))),
    "mlp_adamw_healthy": ("MLP, AdamW 1e-3, warmup + cosine", set(), dict()),
    "mlp_sgd_clipped": ("MLP, SGD 0.05, cosine, clip 1.0", set(), dict(optimizer="sgd", lr=0.05, clip=1.0)),
    "mlp_adamw_seed_1": ("MLP, AdamW, seed 1", set(), dict(seed=1)),
}
HELD_OUT = {
    "cnn_sgd_spikes": ("CNN, SGD 0.01: 2 spikes (lr x30)", SPIKES, dict(arch="cnn", optimizer="sgd", lr=0.01,
                                                                        boost=30.0, spikes=(500, 1000))),
    "resnet_sgd_spikes": ("ResNet, SGD 0.05: 2 spikes (lr x30)", SPIKES, dict(arch="resnet", optimizer="sgd",
                                                                             lr=0.05, boost=30.0, spikes=(400, 800),
                                                                             steps=1000)),
    "transformer_spikes": ("transformer, AdamW: 2 spikes (lr x30)", SPIKES, dict(arch="transformer", lr=3e-3,
                                                                                 boost=30.0, spikes=(500, 1000))),
    "cnn_adam_spike": ("CNN, Adam 1e-3: 1 spike (lr x100)", SPIKES, dict(arch="cnn", optimizer="adam",
                                                                        spikes=(600,))),
    "cnn_lr_raised": ("CNN, SGD: lr x100 from step 600 on", DIVERGED, dict(arch="cnn", optimizer="sgd", lr=0.01,
                                                                          raise_at=600)),
    "cnn_sgd_cosine": ("CNN, SGD 0.01, warmup + cosine", set(), dict(arch="cnn", optimizer="sgd", lr=0.01)),
    "cnn_adam_constant": ("CNN, Adam 1e-3, constant lr", set(), dict(arch="cnn", optimizer="adam",
                                                                    schedule=None)),
    "resnet_sgd_cosine": ("ResNet, SGD 0.05, warmup + cosine", set(), dict(arch="resnet", optimizer="sgd",
                                                                          lr=0.05, steps=1000)),
    "transformer_recipe": ("transformer, AdamW, warmup + cosine, clip 1.0", set(), dict(arch="transformer",
                                                                                        lr=3e-3, clip=1.0)),
}  # fmt: skip
HELD_OUT_2 = {  # written after HELD_OUT was scored once, before the rule changed again
    "resnet_adamw_spikes": ("ResNet, AdamW 1e-3: 2 spikes (lr x50)", SPIKES, dict(arch="resnet", boost=50.0,
                                                                               spikes=(400, 700), steps=1000)),
    "transformer_adam_spike": ("transformer, Adam 1e-3: 1 spike (lr x100)", SPIKES, dict(arch="transformer",
                                                                                      optimizer="adam",
                                                                                      schedule=None,
                                                                                      spikes=(800,))),
    "cnn_sgd_three_spikes": ("CNN, SGD 0.02: 3 spikes (lr x20)", SPIKES, dict(arch="cnn", optimizer="sgd",
                                                                           lr=0.02, boost=20.0,
                                                                           spikes=(400, 800, 1200))),
    "transformer_lr_raised": ("transformer, AdamW: lr x100 from step 700", DIVERGED, dict(arch="transformer",
                                                                                        lr=3e-3, raise_at=700)),
    "resnet_adamw_cosine": ("ResNet, AdamW 1e-3, warmup + cosine", set(), dict(arch="resnet", steps=1000)),
    "transformer_adam_constant": ("transformer, Adam 1e-3, constant lr", set(), dict(arch="transformer",
                                                                                    optimizer="adam",
                                                                                    schedule=None)),
    "cnn_sgd_seed_1": ("CNN, SGD 0.02, warmup + cosine, seed 1", set(), dict(arch="cnn", optimizer="sgd",
                                                                          lr=0.02, seed=1)),
    "cnn_adamw_clipped": ("CNN, AdamW 1e-3, clip 1.0", set(), dict(arch="cnn", clip=1.0)),
}  # fmt: skip
SETS = {"tuning": TUNING, "1": HELD_OUT, "2": HELD_OUT_2}


def image_batches(data, seed):
    """The shipped digits' training batches (random crops), epoch after epoch, for as long as asked."""
    for epoch in itertools.count():
        data.train.batch_sampler.set_epoch(seed * 1000 + epoch)
        yield from data.train


def optimizer_of(model, name, lr):
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)


def schedule_of(optimizer, name, steps, warmup=100):
    if name is None:
        return None
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )


def train(log_dir, data, **settings):
    """One loop without epochs (SETTINGS, changed by `settings`); returns the monitor's findings."""
    s = {**SETTINGS, **settings}
    torch.manual_seed(s["seed"])
    text = s["arch"] == "transformer"
    model = build_model(s["arch"], data.vocabulary, 0.0, False, None, None)
    optimizer = optimizer_of(model, s["optimizer"], s["lr"])
    schedule = schedule_of(optimizer, s["schedule"], s["steps"])
    batches = text_batches(data.text_train, s["steps"], s["seed"]) if text else image_batches(data, s["seed"])
    with TrainingMonitor(log_dir).watch(model, optimizer) as monitor:
        for step, (x, y) in zip(range(1, s["steps"] + 1), batches):
            outputs = model(x)
            loss = F.cross_entropy(outputs.flatten(0, -2), y.flatten())
            optimizer.zero_grad()
            loss.backward()
            norm = nn.utils.clip_grad_norm_(model.parameters(), s["clip"]) if s["clip"] else None
            boost = any(start <= step < start + 3 for start in s["spikes"])
            boost = s["boost"] if boost else 100.0 if s["raise_at"] and step >= s["raise_at"] else 1.0
            for group in optimizer.param_groups:
                group["lr"] *= boost
            optimizer.step()
            for group in optimizer.param_groups:
                group["lr"] /= boost
            if schedule:
                schedule.step()
            monitor.step(loss, grad_norm=norm, max_norm=s["clip"])
    return monitor.findings


def main():
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--set",
        choices=SETS,
        default="2",
        help="tuning: the runs the thresholds were set on; 1:"
        " the first held-out set (seen once before the rule changed); 2 (default): the second",
    )
    parser.add_argument("--only", nargs="*", help="run only these (names from the tables)")
    parser.add_argument("--story", action="store_true", help="print each run's findings too")
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    runs = SETS[args.set]
    unknown = sorted(set(args.only or ()) - set(runs))
    if unknown:
        parser.error(f"no such run: {', '.join(unknown)}; known: {', '.join(runs)}")
    data = Data()
    score(runs, args.only or list(runs), lambda log_dir, settings: train(log_dir, data, **settings), (22, 48),
          args.story)  # fmt: skip


if __name__ == "__main__":
    main()
