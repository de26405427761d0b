"""The wider diagnosis suite: the everyday bugs of PyTorch training loops, and the recipes people use, on three
architectures and three optimizers, diagnosed by the monitor at its defaults.

    python bench/diagnosis_wide.py                  # every run (about 6 minutes on 2 CPU cores)
    python bench/diagnosis_wide.py --only cnn_no_zero_grad resnet_eval_mode

Architectures: the tutorial's CNN (its own initialisation) and a small BatchNorm ResNet (PyTorch's default
initialisation) on the shipped digits (Data/, batches of 16, the training set's random crops), a small pre-LN
transformer language model on the text of Python's own help topics (pydoc_data, shipped with the standard library),
character by character, and MLPs on the flattened digits. Optimizers: SGD with momentum 0.9, AdamW and Adam. Every run
validates after each epoch, as train.py does, and gives the monitor each step's loss and each epoch's metrics.

A faulty run has one known bug, taken from the taxonomies of real deep-learning faults (Humbatova et al., ICSE 2020;
Islam et al., FSE 2019; Zhang et al., ISSTA 2018). The suite prints, per run, its cause, what the diagnosis named
first (the first problem of its story, notes left aside) and whether that is one of the rules whose words name the
cause; then the totals: causes named first, healthy runs with a warning, and suggestions that go against the run's
history. None of these runs was used to set a threshold before this suite was written; bench/diagnosis_suite.py
holds the runs that were.
"""

import argparse
import math
import os
import pydoc_data.topics
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from diagnosis_suite import score  # noqa: E402

from data import CIFAR10_MEAN, CIFAR10_STD, CachedBatches, build_loaders  # noqa: E402
from gradwatch import TrainingMonitor  # noqa: E402
from utils import Net  # noqa: E402

EPOCHS = 8
TEXT_STEPS = 50  # optimizer steps per epoch of the language model
CONTEXT = 32  # characters per sequence


def cnn():
    model = Net()
    model.initialize_weights()
    return model


def cnn_default_init():
    return Net()


class Block(nn.Module):
    """ResNet's basic block."""

    def __init__(self, inputs, outputs, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.shortcut = nn.Sequential()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """A small ResNet for 32x32 images: a strided stem, then three stages of one basic block (8, 16, 32
    channels)."""

    def __init__(self, classes=10, dropout=0.0):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1, self.layer2, self.layer3 = Block(8, 8, 1), Block(8, 16, 2), Block(16, 32, 2)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(32, classes))

    def forward(self, x):
        return self.head(self.layer3(self.layer2(self.layer1(self.stem(x)))))


def mlp(depth=2, width=128, activation=nn.ReLU):
    layers = [nn.Flatten(), nn.Linear(3 * 32 * 32, width), activation()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), activation()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


class CharTransformer(nn.Module):
    """A small pre-LN transformer language model: 2 layers, width 48, 4 heads, dropout 0.1."""

    def __init__(self, vocabulary, width=48, layers=2):
        super().__init__()
        self.embed = nn.Embedding(vocabulary, width)
        self.position = nn.Parameter(torch.zeros(1, CONTEXT, width))
        layer = nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.1, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, vocabulary)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(CONTEXT), persistent=False)

    def forward(self, tokens):
        x = self.embed(tokens) + self.position[:, : tokens.shape[1]]
        return self.out(self.norm(self.blocks(x, mask=self.mask, is_causal=True)))


def text_data():
    """The help topics of Python's documentation as character ids: (train, valid, vocabulary size)."""
    text = "\n".join(pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics))
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text[:400_000]]) if len(chars) < 256 else None
    split = int(0.9 * len(ids))
    return ids[:split], ids[split:], len(chars)


def text_batches(ids, steps, seed, batch=16):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(len(ids) - CONTEXT - 1, (batch,), generator=generator)
        window = torch.stack([ids[s : s + CONTEXT + 1] for s in starts])
        yield window[:, :-1], window[:, 1:]


class SortedBatches(list):
    """Batches of 16 indices in the order of their labels: training data sorted by class, never shuffled."""

    def __init__(self, labels, batch=16):
        order = torch.argsort(labels, stable=True).tolist()
        super().__init__(order[i : i + batch] for i in range(0, len(order), batch))


# the language model's recipe, GPT-style: AdamW, warmup then cosine decay per step, weight decay 0.1, clipping at 1.0
LM = dict(arch="transformer", optimizer="adamw", lr=3e-3, weight_decay=0.1, clip=1.0, schedule="warmup_cosine")

# name: (its cause, the rules whose words name it, settings)
FAULTS = {
    "cnn_no_zero_grad": ("optimizer.zero_grad() never called", {"gradients_not_cleared"}, dict(no_zero_grad=True)),
    "transformer_no_zero_grad": (
        "zero_grad() never called (AdamW)",
        {"gradients_not_cleared"},
        dict(LM, no_zero_grad=True),
    ),  # fmt: skip
    "resnet_no_zero_grad": (
        "zero_grad() never called",
        {"gradients_not_cleared"},
        dict(arch="resnet", lr=0.05, no_zero_grad=True),
    ),  # fmt: skip
    "cnn_layer_not_in_optimizer": ("conv1 left out of the optimizer", {"not_in_optimizer"}, dict(leave_out="conv1")),
    "transformer_embedding_left_out": (
        "the embedding left out of AdamW",
        {"not_in_optimizer"},
        dict(LM, leave_out="embed"),
    ),  # fmt: skip
    "cnn_detached": ("features .detach()ed after conv2", {"no_gradient"}, dict(detach="pool2")),
    "resnet_detached": (
        "features .detach()ed after layer1",
        {"no_gradient"},
        dict(arch="resnet", lr=0.05, detach="layer1"),
    ),  # fmt: skip
    "cnn_scheduler_per_batch": (
        "StepLR(7, 0.1) stepped every batch",
        {"lr_collapsed"},
        dict(schedule="step_per_batch"),
    ),
    "transformer_scheduler_per_batch": (
        "StepLR(7, 0.1) stepped every batch",
        {"lr_collapsed"},
        dict(LM, schedule="step_per_batch"),
    ),  # fmt: skip
    "cnn_softmax_before_loss": (
        "softmax before CrossEntropyLoss",
        {"softmax_before_loss"},
        dict(softmax=True, lr=0.05),
    ),  # fmt: skip
    "resnet_softmax_before_loss": (
        "softmax before CrossEntropyLoss",
        {"softmax_before_loss"},
        dict(arch="resnet", lr=0.05, softmax=True),
    ),  # fmt: skip
    "resnet_eval_mode": (
        "model left in eval() after validation",
        {"eval_mode"},
        dict(arch="resnet", lr=0.05, stay_eval=True),
    ),  # fmt: skip
    "transformer_eval_mode": (
        "model left in eval() (dropout off)",
        {"eval_mode"},
        dict(LM, stay_eval=True),
    ),  # fmt: skip
    "cnn_mse_one_hot": ("MSE on one-hot targets", {"not_cross_entropy"}, dict(mse=True, lr=0.05)),
    "cnn_noisy_labels": ("40% of training labels wrong", {"noisy_labels"}, dict(noise=0.4, lr=0.02)),
    "resnet_noisy_labels": (
        "40% of training labels wrong",
        {"noisy_labels"},
        dict(arch="resnet", lr=0.05, noise=0.4),
    ),  # fmt: skip
    "mlp_tanh_20_adam": (
        "20 tanh layers under Adam",
        {"saturated", "vanishing_gradients"},
        dict(arch="tanh20", optimizer="adam", lr=1e-3),
    ),  # fmt: skip
    "cnn_sorted": ("data sorted by class, never shuffled", {"unshuffled"}, dict(sort=True)),
    "resnet_sorted": ("data sorted by class, never shuffled", {"unshuffled"}, dict(arch="resnet", lr=0.05, sort=True)),
    "resnet_weight_decay_0.5": (
        "weight decay 0.5 with BatchNorm",
        {"strong_weight_decay"},
        dict(arch="resnet", lr=0.05, weight_decay=0.5),
    ),  # fmt: skip
    "cnn_lr_2_default_init": (
        "lr 2 with PyTorch's default init",
        {"diverging", "exploding_gradients"},
        dict(arch="cnn_default_init", lr=2.0),
    ),  # fmt: skip
    "transformer_lr_high": ("AdamW at lr 0.1", {"diverging", "exploding_gradients"}, dict(LM, lr=0.1)),  # fmt: skip
    "mlp_adam_lr_high": (
        "Adam at lr 0.1",
        {"diverging", "exploding_gradients", "dead_units"},
        dict(arch="mlp", optimizer="adam", lr=0.1),
    ),  # fmt: skip
}
HEALTHY = {  # name: (what it is, settings)
    "resnet_cosine_wd": (
        "SGD 0.05, cosine, weight decay 5e-4 with BN",
        dict(arch="resnet", lr=0.05, weight_decay=5e-4, schedule="cosine"),
    ),  # fmt: skip
    "resnet_warmup_cosine": (
        "warmup then cosine per batch, seed 1",
        dict(arch="resnet", lr=0.05, seed=1, weight_decay=5e-4, schedule="warmup_cosine"),
    ),  # fmt: skip
    "resnet_dropout": ("dropout 0.3 before the classifier", dict(arch="resnet", lr=0.05, dropout=0.3)),
    "resnet_frozen_backbone": ("backbone frozen, head fine-tuned", dict(arch="resnet", lr=0.05, freeze="head")),
    "transformer_recipe": ("AdamW, warmup + cosine, clip 1.0, wd 0.1", dict(LM)),
    "transformer_seed_1": ("the same, seed 1", dict(LM, seed=1)),
    "transformer_accumulate_4": ("the same, gradients accumulated over 4", dict(LM, accumulate=4)),
    "cnn_label_smoothing": ("label smoothing 0.1", dict(label_smoothing=0.1)),
    "cnn_cosine_per_batch": ("cosine over the run, stepped per batch", dict(schedule="cosine_per_batch", lr=0.02)),
    "cnn_step_lr": ("the tutorial's StepLR(7, 0.1) per epoch, seed 3", dict(schedule="step", seed=3)),
    "cnn_accumulate_2": ("gradients accumulated over 2 batches", dict(accumulate=2)),
    "mlp_adam": ("Adam 1e-3", dict(arch="mlp", optimizer="adam", lr=1e-3)),
}
# Runs kept aside: written before they were first run, and scored without changing a rule afterwards (--held-out)
HELD_OUT_FAULTS = {
    "mlp_adam_no_zero_grad": (
        "zero_grad() never called (Adam)",
        {"gradients_not_cleared"},
        dict(arch="mlp", optimizer="adam", lr=1e-3, no_zero_grad=True),
    ),  # fmt: skip
    "mlp_adam_layer_left_out": (
        "the first layer left out of Adam",
        {"not_in_optimizer"},
        dict(arch="mlp", optimizer="adam", lr=1e-3, leave_out="1"),
    ),  # fmt: skip
    "mlp_adam_detached": (
        "features .detach()ed after the first layer",
        {"no_gradient"},
        dict(arch="mlp", optimizer="adam", lr=1e-3, detach="2"),
    ),  # fmt: skip
    "transformer_detached": ("the embedding's output .detach()ed", {"no_gradient"}, dict(LM, detach="embed")),
    "transformer_no_zero_grad_seed_1": (
        "zero_grad() never called, seed 1",
        {"gradients_not_cleared"},
        dict(LM, no_zero_grad=True, seed=1),
    ),  # fmt: skip
    "resnet_scheduler_per_batch": (
        "StepLR(7, 0.1) stepped every batch",
        {"lr_collapsed"},
        dict(arch="resnet", lr=0.05, schedule="step_per_batch"),
    ),  # fmt: skip
    "mlp_adam_softmax_before_loss": (
        "softmax before CrossEntropyLoss (Adam)",
        {"softmax_before_loss"},
        dict(arch="mlp", optimizer="adam", lr=1e-3, softmax=True),
    ),  # fmt: skip
    "resnet_eval_mode_seed_1": (
        "left in eval() after validation, lr 0.1",
        {"eval_mode"},
        dict(arch="resnet", lr=0.1, seed=1, stay_eval=True),
    ),  # fmt: skip
    "mlp_adam_sorted": (
        "data sorted by class (Adam)",
        {"unshuffled"},
        dict(arch="mlp", optimizer="adam", lr=1e-3, sort=True),
    ),  # fmt: skip
    "resnet_noisy_labels_30": (
        "30% of training labels wrong, seed 1",
        {"noisy_labels"},
        dict(arch="resnet", lr=0.05, noise=0.3, seed=1),
    ),  # fmt: skip
    "cnn_weight_decay_0.5": (
        "weight decay 0.5 without BatchNorm",
        {"strong_weight_decay"},
        dict(weight_decay=0.5),
    ),  # fmt: skip
    "resnet_lr_5": ("SGD at lr 5", {"diverging", "exploding_gradients"}, dict(arch="resnet", lr=5.0)),
}
HELD_OUT_HEALTHY = {
    "resnet_seed_2": (
        "SGD 0.1, cosine, weight decay 5e-4, seed 2",
        dict(arch="resnet", lr=0.1, weight_decay=5e-4, schedule="cosine", seed=2),
    ),  # fmt: skip
    "transformer_seed_2": ("the language model's recipe, seed 2", dict(LM, seed=2)),
    "mlp_adamw_cosine": (
        "AdamW 1e-3, weight decay 0.01, cosine per batch",
        dict(arch="mlp", optimizer="adamw", lr=1e-3, weight_decay=0.01, schedule="cosine_per_batch"),
    ),  # fmt: skip
    "cnn_lr_0.02_seed_4": ("the tutorial's CNN at lr 0.02, seed 4", dict(lr=0.02, seed=4)),
    "resnet_frozen_adamw": (
        "backbone frozen, head trained by AdamW 1e-3",
        dict(arch="resnet", optimizer="adamw", lr=1e-3, freeze="head"),
    ),  # fmt: skip
    "cnn_eval_no_dropout": ("left in eval(), with no dropout or BatchNorm", dict(stay_eval=True)),
    "mlp_adam_accumulate_4": (
        "Adam 1e-3, gradients accumulated over 4",
        dict(arch="mlp", optimizer="adam", lr=1e-3, accumulate=4),
    ),  # fmt: skip
}
# A second set kept aside, written before any rule was changed after the first set's scores (--held-out 2)
HELD_OUT_2_FAULTS = {
    "mlp_adam_mse_one_hot": (
        "MSE on one-hot targets (Adam)",
        {"not_cross_entropy"},
        dict(arch="mlp", optimizer="adam", lr=1e-3, mse=True),
    ),  # fmt: skip
    "resnet_mse_one_hot": (
        "MSE on one-hot targets",
        {"not_cross_entropy"},
        dict(arch="resnet", lr=0.05, mse=True),
    ),  # fmt: skip
    "resnet_head_left_out": (
        "the classifier left out of the optimizer",
        {"not_in_optimizer"},
        dict(arch="resnet", lr=0.05, leave_out="head"),
    ),  # fmt: skip
    "transformer_softmax_before_loss": (
        "softmax before cross_entropy",
        {"softmax_before_loss"},
        dict(LM, softmax=True),
    ),  # fmt: skip
    "resnet_adamw_no_zero_grad": (
        "zero_grad() never called (AdamW)",
        {"gradients_not_cleared"},
        dict(arch="resnet", optimizer="adamw", lr=1e-3, no_zero_grad=True),
    ),  # fmt: skip
    "mlp_dead_bias": (
        "first layer's bias at -5: dead ReLUs",
        {"dead_units"},
        dict(arch="mlp", optimizer="adam", lr=1e-3, first_bias=-5.0),
    ),  # fmt: skip
    "cnn_lr_1": ("SGD at lr 1", {"diverging", "exploding_gradients"}, dict(lr=1.0)),
    "resnet_adamw_noisy_labels_50": (
        "50% of training labels wrong (AdamW)",
        {"noisy_labels"},
        dict(arch="resnet", optimizer="adamw", lr=1e-3, noise=0.5),
    ),  # fmt: skip
    "transformer_scheduler_per_batch_seed_1": (
        "ExponentialLR(0.5) stepped every batch",
        {"lr_collapsed"},
        dict(LM, schedule="exponential_per_batch", seed=1),
    ),  # fmt: skip
    "resnet_eval_mode_adamw": (
        "left in eval() (AdamW)",
        {"eval_mode"},
        dict(arch="resnet", optimizer="adamw", lr=1e-3, stay_eval=True),
    ),  # fmt: skip
}
HELD_OUT_2_HEALTHY = {
    "resnet_adamw_cosine": (
        "AdamW 1e-3, weight decay 0.05, cosine",
        dict(arch="resnet", optimizer="adamw", lr=1e-3, weight_decay=0.05, schedule="cosine"),
    ),  # fmt: skip
    "mlp_adam_seed_1": ("Adam 1e-3, seed 1", dict(arch="mlp", optimizer="adam", lr=1e-3, seed=1)),
    "resnet_dropout_seed_1": (
        "dropout 0.3 before the classifier, seed 1",
        dict(arch="resnet", lr=0.05, dropout=0.3, seed=1),
    ),  # fmt: skip
    "transformer_constant_lr": (
        "AdamW 1e-3, constant, no clipping",
        dict(arch="transformer", optimizer="adamw", lr=1e-3),
    ),  # fmt: skip
    "cnn_lr_0.005": ("the tutorial's CNN at lr 0.005, seed 5", dict(lr=0.005, seed=5)),
    "resnet_label_smoothing_cosine": (
        "label smoothing 0.1, cosine, weight decay 5e-4",
        dict(arch="resnet", lr=0.05, label_smoothing=0.1, schedule="cosine", weight_decay=5e-4),
    ),  # fmt: skip
    "mlp_sgd_cosine": (
        "SGD 0.01, cosine per batch",
        dict(arch="mlp", lr=0.01, schedule="cosine_per_batch"),
    ),  # fmt: skip
}
SETS = [(FAULTS, HEALTHY), (HELD_OUT_FAULTS, HELD_OUT_HEALTHY), (HELD_OUT_2_FAULTS, HELD_OUT_2_HEALTHY)]
ARCHS = {"cnn": cnn, "cnn_default_init": cnn_default_init, "resnet": ResNet, "mlp": mlp,
         "tanh20": lambda: mlp(depth=20, width=64, activation=nn.Tanh)}  # fmt: skip


def build_model(arch, vocabulary, dropout, softmax, freeze, first_bias):
    model = CharTransformer(vocabulary) if arch == "transformer" else None
    model = model or (ResNet(dropout=dropout) if arch == "resnet" else ARCHS[arch]())
    if first_bias is not None:
        first = next(m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None)
        nn.init.constant_(first.bias, first_bias)
    if freeze:
        for name, param in model.named_parameters():
            param.requires_grad = name.startswith(freeze)
    return nn.Sequential(model, nn.Softmax(-1)) if softmax else model


def build_optimizer(model, name, lr, weight_decay, leave_out):
    params = [p for n, p in model.named_parameters() if p.requires_grad and not n.split(".")[0] == leave_out]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    kind = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    return kind(params, lr=lr, weight_decay=weight_decay)


def build_schedule(optimizer, schedule, steps_per_epoch, epochs):
    """(scheduler, stepped every batch); (None, False) for a constant learning rate."""
    total = steps_per_epoch * epochs
    warmup = steps_per_epoch // 2
    if schedule in ("step", "step_per_batch"):
        return torch.optim.lr_scheduler.StepLR(optimizer, 7, 0.1), schedule == "step_per_batch"
    if schedule == "exponential_per_batch":
        return torch.optim.lr_scheduler.ExponentialLR(optimizer, 0.5), True
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs), False
    if schedule == "cosine_per_batch":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total), True
    if schedule == "warmup_cosine":

        def factor(step):
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor), True
    return None, False


def loss_of(outputs, targets, mse, label_smoothing):
    outputs = outputs.flatten(0, -2)
    targets = targets.flatten()
    if mse:
        return F.mse_loss(outputs, F.one_hot(targets, outputs.shape[-1]).float())
    return F.cross_entropy(outputs, targets, label_smoothing=label_smoothing)


@torch.no_grad()
def evaluate(model, batches, classes, mse):
    """(accuracy, mean loss, per-class recall) in eval mode, as validate() measures them."""
    model.eval()
    correct = seen = 0
    loss_sum = 0.0
    hits = torch.zeros(classes)
    counts = torch.zeros(classes)
    for x, y in batches:
        outputs = model(x).flatten(0, -2)
        y = y.flatten()
        predicted = outputs.argmax(1)
        loss_sum += loss_of(outputs, y, mse, 0.0).item() * len(y)
        correct += (predicted == y).sum().item()
        seen += len(y)
        counts += torch.bincount(y, minlength=classes).float()
        hits += torch.bincount(y[predicted == y], minlength=classes).float()
    recall = (hits / counts.clamp(min=1)).tolist()
    return correct / seen, loss_sum / seen, recall


class Data:
    """The images (cached, normalised batches) and the text, loaded once."""

    def __init__(self):
        self.train, self.valid, self.classes, _ = build_loaders(
            ROOT / "Data", 16, 0, torch.device("cpu"), 0, "yes", CIFAR10_MEAN, CIFAR10_STD
        )
        self.text_train, self.text_valid, self.vocabulary = text_data()

    def epoch(self, text, epoch, seed, sort, noise):
        """The training batches of one epoch, with their fault in the order or the labels."""
        if text:
            return text_batches(self.text_train, TEXT_STEPS, seed * 1000 + epoch)
        loader = self.train
        if sort:
            loader = CachedBatches(loader.images, loader.labels, SortedBatches(loader.labels), CIFAR10_MEAN,
                                   CIFAR10_STD, augment=True)  # fmt: skip
        else:
            loader.batch_sampler.set_epoch(seed * 1000 + epoch)
        return noisy(loader, noise, seed)

    def validation(self, text):
        if text:
            return list(text_batches(self.text_valid, 8, seed=12345, batch=64))
        return self.valid


def noisy(batches, share, seed):
    """The batches with `share` of their labels replaced by another class, the same ones every epoch."""
    for x, y in batches:
        if share:
            generator = torch.Generator().manual_seed(seed + int(y.sum()))
            wrong = torch.rand(len(y), generator=generator) < share
            other = (y + torch.randint(1, 10, y.shape, generator=generator)) % 10
            y = torch.where(wrong, other, y)
        yield x, y


class Loop:
    """A run's training loop, one bug switched on by its settings."""

    def __init__(self, model, optimizer, monitor, settings, steps_per_epoch):
        self.model, self.optimizer, self.monitor = model, optimizer, monitor
        self.clip, self.accumulate = settings["clip"], settings["accumulate"]
        self.no_zero_grad, self.mse = settings["no_zero_grad"], settings["mse"]
        self.label_smoothing = settings["label_smoothing"]
        epochs_steps = steps_per_epoch // self.accumulate
        self.scheduler, self.per_batch = build_schedule(optimizer, settings["schedule"], epochs_steps, EPOCHS)

    def epoch(self, batches):
        """Train on `batches`; returns the training loss and accuracy, averaged over the epoch."""
        loss_sum = correct = seen = 0
        for i, (x, y) in enumerate(batches):
            outputs = self.model(x)
            loss = loss_of(outputs, y, self.mse, self.label_smoothing)
            (loss / self.accumulate).backward()
            if (i + 1) % self.accumulate == 0:
                self.step(loss)
            loss_sum += loss.item() * len(y)
            seen += len(y)
            correct += (outputs.flatten(0, -2).argmax(1) == y.flatten()).float().mean().item() * len(y)
        if self.scheduler is not None and not self.per_batch:
            self.scheduler.step()
        return loss_sum / seen, correct / seen

    def step(self, loss):
        norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.clip) if self.clip else None
        self.optimizer.step()
        self.monitor.step(loss, grad_norm=norm, max_norm=self.clip)
        if not self.no_zero_grad:
            self.optimizer.zero_grad()
        if self.per_batch:
            self.scheduler.step()


SETTINGS = dict(arch="cnn", optimizer="sgd", lr=0.01, weight_decay=0.0, seed=0, schedule=None, clip=None,
                label_smoothing=0.0, dropout=0.0, freeze=None, accumulate=1, no_zero_grad=False, leave_out=None,
                detach=None, softmax=False, stay_eval=False, mse=False, noise=0.0, sort=False,
                first_bias=None)  # fmt: skip


def train(log_dir, data, **settings):
    """One run with the monitor at its defaults (SETTINGS, changed by `settings`); returns its findings."""
    settings = {**SETTINGS, **settings}
    text = settings["arch"] == "transformer"
    torch.manual_seed(settings["seed"])
    model = build_model(settings["arch"], data.vocabulary, settings["dropout"], settings["softmax"], settings["freeze"],
                        settings["first_bias"])  # fmt: skip
    opt = build_optimizer(model, settings["optimizer"], settings["lr"], settings["weight_decay"], settings["leave_out"])
    if settings["detach"]:
        module = dict(model.named_modules())[settings["detach"]]
        module.register_forward_hook(lambda module, inputs, output: output.detach())
    classes = data.vocabulary if text else len(data.classes)
    names = None if text else [str(i) for i in range(classes)]
    with TrainingMonitor(log_dir).watch(model, opt) as monitor:
        loop = Loop(model, opt, monitor, settings, TEXT_STEPS if text else len(data.train))
        for epoch in range(EPOCHS):
            batches = data.epoch(text, epoch, settings["seed"], settings["sort"], settings["noise"])
            train_loss, train_accuracy = loop.epoch(batches)
            accuracy, valid_loss, recall = evaluate(model, data.validation(text), classes, settings["mse"])
            if not settings["stay_eval"]:
                model.train()
            metrics = {"train/loss": train_loss, "train/accuracy": train_accuracy}
            metrics.update({"valid/accuracy": accuracy, "valid/loss": valid_loss})
            monitor.epoch_end(epoch, metrics, classes=names, recall=recall if names else None)
    return monitor.findings


def main():
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", nargs="*", help="run only these (names from the tables)")
    parser.add_argument("--story", action="store_true", help="print each run's whole story too")
    parser.add_argument("--held-out", type=int, nargs="?", const=1, choices=(1, 2),
                        help="a set of runs kept aside instead: 1 (the first, seen once before two rules changed) or 2"
                        " (written before the rules changed again; scored as they stand)")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    data = Data()
    faults, healthy = SETS[args.held_out or 0]
    runs = {**faults, **{name: (what, set(), settings) for name, (what, settings) in healthy.items()}}
    unknown = sorted(set(args.only or ()) - set(runs))
    if unknown:
        parser.error(f"no such run: {', '.join(unknown)}; known: {', '.join(runs)}")
    score(
        runs, args.only or list(runs), lambda log_dir, settings: train(log_dir, data, **settings), (32, 44), args.story
    )


if __name__ == "__main__":
    main()
