"""Rules that read a training run the way a practitioner reads its curves and histograms, and the
story they tell.

Each rule is declared once, with `@rule(...)` above the function that checks it: the function is
named after the rule, its docstring says when it fires, and the declaration holds everything the
story needs (the suggestion, the thresholds it reads, the rules it can follow from, what its
suggestion does to the learning rate). `RULES` holds the declarations in the order findings that
begin at the same step are told.

A check is a pure function of the epoch summaries so far (oldest first, see summary.py) that returns
findings about the latest one: the parameters or layers concerned, the evidence in numbers and a
message. A healthy run produces none. `record` merges an epoch's findings into the run's: a finding
that lasts is one entry with its first and last epoch, and a finding that follows from an earlier
one names it as its `cause` and leaves the suggestion to it; `story` tells them in the order they
began.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import statistics
import textwrap
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from .summary import EXTRA, JUMP, JUMP_READINGS, EpochSummary, finite, jumped, loop_summary

METRIC_TAGS = {  # the scalar tags under which training loops commonly log these, preferred first
    "train_loss": "train/loss train_loss loss/train Loss/train training_loss train/loss_epoch "
    "train_loss_epoch loss",
    "train_accuracy": "train/accuracy train_acc train/acc accuracy/train Accuracy/train acc",
    "valid_loss": "valid/loss val_loss val/loss validation/loss loss/val Loss/val Loss/valid "
    "eval/loss eval_loss",
    "valid_accuracy": "valid/accuracy val_acc val/acc val/accuracy val_accuracy "
    "validation/accuracy accuracy/val Accuracy/val Accuracy/valid eval/accuracy eval_accuracy",
}
METRIC_TAGS = {key: tuple(tags.split()) for key, tags in METRIC_TAGS.items()}


@dataclass
class Thresholds:
    """When each rule fires (README's table says the same). The fields keep the order in which
    they were added, so that positional arguments keep their meaning."""

    # vanishing_gradients: the first weight layer's gradient RMS is below vanishing_ratio of the
    # last one's, or a weight layer's gradient RMS is below vanishing_floor
    vanishing_ratio: float = 1e-2
    vanishing_floor: float = 1e-7
    # exploding_gradients: the total gradient norm exceeds this multiple of its earlier median
    exploding_factor: float = 100.0
    # mostly_clipped: gradient clipping scaled down more than this share of an epoch's steps
    clipped_share: float = 0.5
    # weights_growing: max |w| above weight_max_abs, at least weight_growth times its value after
    # the first epoch, and still growing over weight_window epochs (the tutorial: 0.3, then 0.6)
    weight_max_abs: float = 1.0
    weight_growth: float = 2.0
    weight_window: int = 3
    # output_bias_skew: an output bias bias_z robust standard deviations (1.4826 MAD) from the
    # median, and at least bias_min_deviation from it
    bias_z: float = 3.5
    bias_min_deviation: float = 1.0
    # not_learning: a layer's median update-to-weight ratio ||dw|| / ||w|| is below update_slow;
    # moving_too_fast: it is above update_fast (about 1e-3 is typical of healthy training)
    update_slow: float = 1e-6
    update_fast: float = 1e-1
    # high_initial_loss: the first training loss is above this multiple of ln C
    initial_loss_factor: float = 3.0
    # diverging: the training loss rises above this multiple of its first value
    diverging_factor: float = 1.5
    # dead_units: this share of a ReLU's units gave no positive output at any statistics step of
    # the epoch
    dead_share: float = 0.5
    # saturated: this share of a sigmoid's or tanh's outputs are within 1% of their limits
    saturated_share: float = 0.5
    # stuck: the training loss stays above stuck_loss x ln C (C classes) and the accuracy within
    # chance_margin of chance (1 / C) for stuck_epochs epochs in a row; with the weights moving
    # faster than stuck_moving_ratio (median update ratio), the data are suspect, not the lr
    stuck_loss: float = 0.9
    chance_margin: float = 0.1
    stuck_epochs: int = 5
    stuck_moving_ratio: float = 1e-4
    # no_generalisation: the training accuracy generalisation_gap above chance, the validation
    # accuracy within chance_margin of it
    generalisation_gap: float = 0.3
    # overfitting: the training accuracy overfit_gap further above the validation accuracy than at
    # the best validation loss, which the validation loss now exceeds by overfit_rise
    overfit_gap: float = 0.05
    overfit_rise: float = 0.1
    # oscillating: over the last oscillation_epochs epochs the training loss went up and down by
    # oscillation_amplitude of its level, without falling
    oscillation_epochs: int = 6
    oscillation_amplitude: float = 0.2
    # overfitting: the validation loss overfit_rise above its best for overfit_epochs epochs in a
    # row
    overfit_epochs: int = 3
    # lr_collapsed: the learning rate fell below lr_collapse of its peak within the first epoch and
    # stayed there
    lr_collapse: float = 0.01
    # unshuffled: at least this share of a batch's rows had the same top class
    uniform_batch: float = 0.9
    # noisy_labels: the training accuracy below the validation accuracy of the epoch before by
    # noisy_gap, for noisy_epochs epochs in a row
    noisy_gap: float = 0.15
    noisy_epochs: int = 3
    # strong_weight_decay: the weights' norm below half its first value while the loss stayed
    # above stuck_loss x an untrained model's for decay_epochs epochs
    decay_epochs: int = 3
    # not_cross_entropy: the training loss below ce_bound x the least cross-entropy allows at the
    # training accuracy ((1 - accuracy) x ln 2); a quarter leaves room for focal losses and a loss
    # divided by up to 4 accumulation steps
    ce_bound: float = 0.25
    # loss_spikes: a loss window's highest loss above spike_factor x the median of the highest of
    # the SPIKE_BASELINE windows before, and above it by spike_rise x an untrained model's loss,
    # from a level below stuck_loss x that; back once a window's highest is within half that rise
    spike_factor: float = 1.5
    spike_rise: float = 0.2

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def replace(self, overrides: Mapping[str, Any]) -> Thresholds:
        """A copy with {name: value} overrides; unknown names raise ValueError listing the known
        ones."""
        values = asdict(self)
        for name, value in overrides.items():
            if name not in values:
                raise ValueError(f"unknown threshold '{name}'; known: {', '.join(self.names())}")
            values[name] = type(values[name])(value)
        return Thresholds(**values)


def threshold_override(text: str) -> tuple[str, float]:
    """argparse type for --threshold NAME=VALUE (train.py and diagnose.py): a known name and a
    number."""
    name, sep, value = text.partition("=")
    known = Thresholds.names()
    if name not in known:
        raise argparse.ArgumentTypeError(f"unknown threshold '{name}'; known: {', '.join(known)}")
    try:
        if not sep:
            raise ValueError
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected NAME=VALUE with a number, got '{text}'"
        ) from None
    whole = isinstance(getattr(Thresholds(), name), int)  # a count of epochs or readings
    if not math.isfinite(number) or (whole and not (number.is_integer() and number >= 0)):
        what = "a whole number, 0 or more" if whole else "a finite number"
        raise argparse.ArgumentTypeError(f"{name} must be {what}, got '{value}'")
    return name, number


@dataclass
class Finding:
    rule: str
    parameters: list  # the parameters or layers concerned; empty for the whole run
    epoch: int  # the epoch (from 0) at whose end it was first found
    step: int  # the optimizer step at which it began, as near as the evidence tells
    evidence: dict  # the numbers the rule read when it was first found
    message: str
    suggestion: str | None  # what to try; None for a consequence of an earlier finding (see cause)
    last_epoch: int = -1  # the last epoch it held
    cause: str | None = None  # the id of the earlier finding it follows from
    severity: str = "warning"  # or "note": it ended on its own (a slow start), or is harmless
    harmless: bool = False  # its rule found that the run does well anyway: a note
    unit: str = "epoch"  # or "steps": found in windows of steps (epoch counts the windows)
    last_step: int = -1  # the step of the last epoch's (window's) end at which it held
    part: str = ""  # with several models watched (a GAN's generator), the one it is about

    def __post_init__(self):
        self.last_epoch = max(self.last_epoch, self.epoch)
        self.last_step = max(self.last_step, self.step)

    @property
    def key(self) -> tuple:
        """Findings with the same key say the same thing: a finding that lasts is one entry. One per
        parameter for the rules that judge parameters one by one, one per rule for the others."""
        part = (self.part,) if self.part else ()
        if declared(self.rule).per_parameter:
            return (*part, self.rule, *self.parameters[:1])
        return (*part, self.rule)

    @property
    def id(self) -> str:
        return ":".join(self.key)

    def to_json(self) -> dict:
        """As diagnosis.json holds it: epochs (and windows of steps) counted from 1, as everywhere
        the run is shown."""
        counted = {"epoch": self.epoch + 1, "last_epoch": self.last_epoch + 1}
        return {"id": self.id, **asdict(self), **counted}

    @classmethod
    def from_json(cls, item: dict) -> Finding:
        """A finding from diagnosis.json or a monitor's state_dict()."""
        values = {key: value for key, value in item.items() if key != "id"}
        values.update(epoch=item["epoch"] - 1, last_epoch=item["last_epoch"] - 1)
        return cls(**values)

    def __str__(self):
        text = f"[{self.rule}] {_when(self)}: {self.message}"
        if self.cause:
            text += f" It follows from {self.cause}."
        if self.suggestion:
            text += f" Try: {self.suggestion}"
        return text


# what a rule's suggestion does to the learning rate
LOWER = -1
RAISE = 1
Check = Callable[[list[EpochSummary], Thresholds], list[Finding]]


@dataclass(frozen=True)
class Cause:
    """A candidate cause of a symptom: `check` returns its evidence in the run, or None where it
    does not hold. A symptom's finding names the cause whose check alone holds, with its
    `suggestion`; where none or several hold, it names none and says what to `look` at, in order."""

    name: str
    check: Callable[[list[EpochSummary], Finding, Thresholds], dict | None]
    suggestion: str
    look: str  # what to check for it, where no check decides
    lr: int = 0  # LOWER or RAISE: what its suggestion does to the learning rate, or 0


@dataclass(frozen=True)
class Rule:
    """A rule's declaration: everything the story needs to know about its findings."""

    name: str
    check: Check  # the findings about the latest summary, their rule and suggestion still unset
    suggestion: str  # what to try; {lr} and {lr_up}: a tenth and ten times the rate set
    thresholds: tuple[str, ...] = ()  # the fields of Thresholds it reads
    follows: tuple[str, ...] = ()  # the rules whose earlier findings can explain its findings
    lr: int = 0  # LOWER or RAISE: what its suggestion does to the learning rate, or 0
    instead: str | None = None  # what to suggest where that would go against the run's history
    per_parameter: bool = False  # a finding per parameter (weights_growing) or one for the rule
    exact: bool = False  # it reads exact facts of the loop: checked at every statistics reading
    root: bool = False  # it proves the loop broken: any later finding can follow from it
    ended: str = ""  # what a finding that ended on its own was, told as a note; "": a warning
    diverged: bool = False  # the run diverged: no later suggestion may raise the learning rate
    # for a rule whose findings repeat (loss_spikes): the message told from the evidence, whose
    # "count" merged findings add up and whose "spikes" they join
    retell: Callable[[dict], str] | None = None
    # the candidate causes of the symptom it finds, in the order to check them: its suggestion then
    # comes from the one whose check alone holds (Cause), and `suggestion` is unused
    causes: tuple[Cause, ...] = ()

    def __post_init__(self):
        unknown = set(self.thresholds) - set(Thresholds.names())
        if unknown:
            raise ValueError(f"rule {self.name}: no such threshold {', '.join(sorted(unknown))}")
        if self.lr and not self.instead:
            raise ValueError(
                f"rule {self.name}: a rule that moves the learning rate needs `instead`"
            )

    @property
    def when(self) -> str:
        """When it fires: its check's docstring."""
        return inspect.getdoc(self.check) or ""

    def __call__(self, history: list[EpochSummary], thresholds: Thresholds) -> list[Finding]:
        """Its findings about the latest summary of `history` (oldest first). Pure."""
        findings = self.check(history, thresholds)
        for finding in findings:
            finding.rule = self.name
            if finding.suggestion is None and self.causes:
                self.attribute(finding, history, thresholds)
            elif finding.suggestion is None:
                finding.suggestion = self.suggest(finding.parameters, _peak_lr(history))
        return findings

    def attribute(self, finding: Finding, history: list, thresholds: Thresholds) -> None:
        """Name the cause of a symptom's finding whose check alone holds, with its evidence and
        suggestion; else no cause ("cause": None), and what to check, in order, those that
        hold first."""
        held = {}
        for cause in self.causes:
            evidence = cause.check(history, finding, thresholds)
            if evidence is not None:
                held[cause.name] = evidence
        if len(held) == 1:
            cause = next(c for c in self.causes if c.name in held)
            finding.evidence.update(cause=cause.name, cause_evidence=held[cause.name])
            lr = _peak_lr(history)
            finding.suggestion = self.suggest(finding.parameters, lr, cause.suggestion)
            return
        ordered = sorted(self.causes, key=lambda c: c.name not in held)
        finding.evidence.update(cause=None, causes_held=list(held))
        finding.suggestion = "check, in this order: " + "; ".join(c.look for c in ordered) + "."

    def way(self, finding: Finding) -> int:
        """What the finding's suggestion does to the learning rate: LOWER, RAISE or 0."""
        if finding.evidence.get("weights_move"):
            return 0  # it makes no claim on the learning rate
        named = finding.evidence.get("cause")
        if self.causes:
            return next((c.lr for c in self.causes if c.name == named), 0)
        return 0 if "cause" in finding.evidence else self.lr  # a cause of its own, or none

    def suggest(self, parameters: list, lr: float | None, template: str | None = None) -> str:
        """The suggestion (or `template`), its rates relative to `lr`, the rate the user set (a
        schedule's peak, not the rate it has decayed to)."""
        fill = {
            "lr": f" (to {lr / 10:g} or less, a tenth of the {lr:g} set)" if lr else "",
            "lr_up": f" (e.g. {lr * 10:g}, ten times the {lr:g} set)" if lr else "",
        }
        template = self.suggestion if template is None else template
        return template.format(name=parameters[0] if parameters else "", **fill)


RULES: dict[str, Rule] = {}  # by name, in the order findings that begin at one step are told


def rule(suggestion: str, **declaration: Any) -> Callable[[Check], Rule]:
    """Declare the rule checked by the function below, which is named after it (Rule says what the
    keywords mean)."""

    def declare(check: Check) -> Rule:
        RULES[check.__name__] = Rule(check.__name__, check, suggestion, **declaration)
        return RULES[check.__name__]

    return declare


def declared(name: str) -> Rule:
    """The declaration of rule `name`; a bare one for a rule this version does not know."""
    return RULES.get(name) or Rule(name, lambda history, thresholds: [], "")


def names(layers: Iterable[str], shown: int = 4) -> str:
    """Layer names for a sentence: all of a few, the first `shown` and a count of the rest."""
    layers = list(layers)
    more = len(layers) - shown
    if more <= 1:
        return ", ".join(layers)
    return f"{', '.join(layers[:shown])} and {more} more layers"


def _found(
    now: EpochSummary,
    parameters: list,
    evidence: dict,
    message: str,
    step: int | None = None,
    suggestion: str | None = None,
) -> Finding:
    """A finding about summary `now`; its rule, and its suggestion unless given, are the Rule's."""
    step = now.step if step is None else step
    found = Finding("", parameters, now.epoch, step, evidence, message, suggestion)
    found.unit = now.unit
    found.last_step = max(found.step, now.step)
    return found


def _classes(summary: EpochSummary) -> int | None:
    classes = summary.num_classes
    return classes if classes and classes >= 2 else None


def _loss(summary: EpochSummary) -> float | None:
    """The epoch's training loss: as the training loop reported it, else its windows' median."""
    windows = [w["mean"] for w in summary.losses if finite(w["mean"])]
    return summary.metrics.get("train_loss", statistics.median(windows) if windows else None)


def _accuracy(summary: EpochSummary) -> float | None:
    """The validation accuracy, else the training accuracy."""
    return summary.metrics.get("valid_accuracy", summary.metrics.get("train_accuracy"))


def _period(summary: EpochSummary) -> str:
    """What a summary covers, for a message: "the epoch", or "steps 257-512" for a window of steps
    (which stays true once a long first epoch has ended)."""
    if summary.unit == "epoch":
        return "the epoch"
    losses = summary.losses
    start = losses[0].get("first", losses[0]["step"]) if losses else summary.step
    return f"steps {start}-{summary.step}" if start < summary.step else f"step {start}"


# The objectives whose loss is not minimised step by step: a policy gradient's, a GAN's, or one
# the monitor does not know (see watch(objective=...)); their loss rules say nothing
NOT_MINIMISED = ("rl", "gan", "other")
OBJECTIVES = ("classification", "regression", "language_model", "contrastive", *NOT_MINIMISED)


def _judged(history: list[EpochSummary]) -> bool:
    """Whether the run's loss is one to be minimised, which the loss rules judge: not where its
    objective is one of NOT_MINIMISED (given to watch(), or "other" for a loss the graph shows is
    not made by known loss functions alone)."""
    return history[-1].loop.get("objective", "") not in NOT_MINIMISED


def _kept_apart(now: EpochSummary) -> set[str]:
    """Parameters that require gradients but are in no parameter group of the optimizer and get no
    gradient either (the loss does not reach them): a copy kept apart, as a DQN's target network or
    an EMA is, neither trained nor meant to be."""
    unreached = {*now.loop.get("no_gradient", []), *now.loop.get("graph", {}).get("unreached", [])}
    return set(now.loop.get("not_in_optimizer", [])) & unreached


def _loop_start(history: list[EpochSummary]) -> int:
    """The first step of the latest epoch: where a fact about the loop's code holds from."""
    return history[-2].step + 1 if len(history) > 1 else 1


def _problem(now: EpochSummary, kind: str) -> dict | None:
    """The first problem of `kind` the loss's graph shows (graph.py), or None."""
    problems = now.loop.get("graph", {}).get("problems", [])
    return next((p for p in problems if p["kind"] == kind), None)


def _graph_step(now: EpochSummary, history: list[EpochSummary]) -> int:
    """The step at which the loss's graph was read (its facts hold from there)."""
    return now.loop.get("graph", {}).get("step") or _loop_start(history)


# The rules that read exact facts of the loop come first in the order of telling: a fact of the
# loop is a cause, and the statistics it disturbs follow from it
from . import exact  # noqa: E402, F401  (registers them here, between the helpers they use and the rest)


@rule(
    "for classes, nn.CrossEntropyLoss on the model's raw scores with the class indices as targets "
    "(not MSE or L1 on one-hot vectors); if this loss is chosen on purpose, ignore this.",
    thresholds=("ce_bound",),
)
def not_cross_entropy(history: list[EpochSummary], t: Thresholds) -> list[Finding]:
    """The loss's graph shows MSE or L1 between the scores and one-hot targets; or the epoch's
    training loss is below `ce_bound` x (1 - training accuracy) x ln 2: cross-entropy on class
    labels costs at least ln 2 for every wrong answer (its class then has a probability of 1/2 at
    most), so the loss is not cross-entropy (MSE on one-hot targets, most often)."""
    if not _judged(history):  # a loss not minimised by design (RL, GAN, other)
        return []
    now = history[-1]
    one_hot = _problem(now, "one_hot_targets")
    if one_hot:  # the loss's graph shows it: no need to wait for the accuracy
        message = f"the loss is {one_hot['loss']} between the model's scores and one-hot class "
        message += f"labels ({one_hot['classes']} classes, at {one_hot['line']}): a square or "
        message += "absolute loss on class labels learns classes slowly, or not at all."
        return [_found(now, [], {"graph": one_hot}, message, _graph_step(now, history))]
    loss = now.metrics.get("train_loss")
    accuracy = now.metrics.get("train_accuracy")
    if not (finite(loss) and finite(accuracy)) or not 0 <= accuracy <= 1:
        return []
    least = (1 - accuracy) * math.log(2)
    if loss >= t.ce_bound * least:
        return []
    message = f"the training loss is {loss:.3g} at a training accuracy of {accuracy:.1%}, where "
    message += f"cross-entropy on class labels cannot be below {least:.3g} (ln 2 for each wrong "
    message += "answer): the loss is not cross-entropy, and a square loss on one-hot targets "
    message += "learns classes slowly."
    evidence = {"train_loss": loss, "train_accuracy": accuracy, "least_cross_entropy": least}
    return [_found(now, [], evidence, message, step=_loop_start(history))]


@rule(
    "call scheduler.step() once per epoch, after the batch loop, or give a per-batch scheduler its "
    "length in steps (T_max, total_steps).",
    thresholds=("lr_collapse",),
)
def lr_collapsed(history: list[EpochSummary], t: Thresholds) -> list[Finding]:
    """The learning rate fell below `lr_collapse` of its peak within the first epoch and is still
    there an epoch later: a scheduler meant for epochs, stepped every batch (a loop without epochs
    steps its scheduler by design)."""
    if len(history) < 2 or history[-1].unit == "steps":
        return []
    first = history[0]
    now = history[-1]
    peak = _peak_lr(history[:1])
    if not peak or not finite(first.lr) or not finite(now.lr):
        return []
    limit = t.lr_collapse * peak
    if first.lr >= limit or now.lr >= limit:
        return []
    fell = next((step for step, lr in first.loop.get("lrs", []) if lr < limit), first.step)
    message = f"the learning rate fell from {peak:g} to {first.lr:.2g} within the first epoch "
    message += f"(below {t.lr_collapse:g} of its peak by step {fell}) and is {now.lr:.2g} now: the "
    message += "model barely moves. A scheduler meant for epochs is stepped every batch."
    evidence = {"peak": peak, "after_first_epoch": first.lr, "now": now.lr}
    evidence["threshold"] = t.lr_collapse
    return [_found(now, [], evidence, message, step=fell)]


@rule(
    "shuffle the training data (DataLoader(..., shuffle=True), or a sampler that shuffles).",
    thresholds=("uniform_batch",),
    follows=("not_cross_entropy",),  # a square loss on one-hot labels collapses to one class too
)
def unshuffled(history: list[EpochSummary], t: Thresholds) -> list[Finding]:
    """At three quarters of the statistics steps so far (four at least) the model gave one top
    class to `uniform_batch` of a batch's rows, and that class changed from batch to batch (three
    classes at least), and at a quarter of those steps (two at least) the loss was below half the
    first one, or an epoch's training accuracy was below half of chance: each batch holds one
    class, the data are not shuffled. A model whose output ignores its input gives one class to
    every row too, but on batches of mixed classes never a low loss, nor an accuracy far below
    chance (the class of the batch before, always wrong)."""
    if not _judged(history):  # a loss not minimised by design (RL, GAN, other)
        return []
    first = history[0].first_loss
    readings = [r for s in history for r in s.loop.get("outputs", []) if r["rows"] >= 8]
    uniform = [r for r in readings if r["mode_share"] >= t.uniform_batch]
    classes = sorted({int(r["mode"]) for r in uniform})
    if len(readings) < 4 or len(uniform) * 4 < len(readings) * 3 or len(classes) < 3:
        return []
    low = 0.5 * first if finite(first) else -math.inf
    right = [r for r in uniform if finite(r["loss"]) and r["loss"] < low]
    chance = 1 / _classes(history[-1]) if _classes(history[-1]) else 0.0
    below = any(
        finite(a) and a < chance / 2 for a in (s.metrics.get("train_accuracy") for s in history)
    )
    if len(right) < max(2, len(uniform) / 4) and not below:
        return []
    shown = ", ".join(map(str, classes[:6])) + (", ..." if len(classes) > 6 else "")
    message = f"at {len(uniform)} of {len(readings)} statistics steps the model gave one class to "
    message += f"the whole batch, and a different one from batch to batch (classes {shown}): each "
    message += "training batch holds one class, the data are not shuffled."
    evidence = {"uniform_readings": len(uniform), "readings": len(readings), "classes": classes}
    return [_found(history[-1], [], evidence, message, step=1)]  # the data's order, from the start


@rule(
    "check that the inputs are normalised and that the initial weights are small (the defaults of "
    "torch.nn, or the tutorial's Net.initialize_weights).",
    thresholds=("initial_loss_factor",),
)
def high_initial_loss(history: list[EpochSummary], t: Thresholds) -> list[Finding]:
    """The first training loss is above `initial_loss_factor` x ln C, the loss of an untrained
    model (C: the classes given, or those of the one cross-entropy the loss's graph shows)."""
    if not _judged(history):  # a loss not minimised by design (RL, GAN, other)
        return []
    now = history[0]
    expected = _untrained_loss(now)
    first = now.first_loss
    if len(history) > 1 or not expected or not finite(first):
        return []
    if first <= t.initial_loss_factor * expected:
        return []
    message = f"the first training loss was {first:.3g}, {first / expected:.0f}x the "
    message += f"{expected:.2f} (ln {round(math.exp(expected))}) of an untrained model: the "
    message += "initial weights or the inputs are far too large."
    return [_found(now, [], {"first_loss": first, "expected": expected}, message, step=1)]


LEVEL_STEPS = 8  # the fewest steps a level of the loss is read over: never one batch's loss
# A batch's cross-entropy this many times an untrained model's (ln C) is no chance of sampling: the
# logits have blown up (a batch of a model that learns stays within a few times ln C)
EXPLODED = 10
# A level of the loss this many times both an untrained model's and its own first level: the model
# has become worse than one that guesses (its units dead, its logits wrecked)
WORSE = 1.1


def _levels(windows: list[dict]) -> list[dict]:
    """The training loss's level in spans of consecutive windows of LEVEL_STEPS steps or more: the
    median of their medians (a window's mean where an older state holds no median), with the
    span's first and last step and the step of its highest loss."""
    levels = []
    span: list[dict] = []
    for window in windows:
        span.append(window)
        first = span[0].get("first", span[0]["step"])
        if window["step"] - first + 1 < LEVEL_STEPS:
            continue
        values = [w.get("median", w["mean"]) for w in span]
        values = [v for v in values if finite(v)]
        top = max(span, key=lambda w: w["max"] if finite(w["max"]) else -math.inf)
        if values:
            level = statistics.median(values)
            levels.append({"first": first, "step": window["step"], "level": level})
            levels[-1]["peak_step"] = top["max_step"] or window["step"]
        span = []
    return levels


# Losses over classes whose input's second dimension counts them: cross-entropy of scores, and
# nll_loss of log-probabilities (a loss given anything else is told by not_log_probabilities)
CLASS_LOSSES = ("cross_entropy", "nll_loss")


def _untrained_loss(summary: EpochSummary) -> float | None:
    """The loss of an untrained model, where the objective tells it: ln C for a cross-entropy over
    C classes (the classes given, or the class dimension of the one cross-entropy the loss's graph
    is made of)."""
    classes = _classes(summary)
    losses = summary.loop.get("graph", {}).get("losses", [])
    if not classes and len(losses) == 1 and losses[0].get("function") in CLASS_LOSSES:
        shape = losses[0].get("input", {}).get("shape", [])
        classes = shape[1] if len(shape) >= 2 and shape[1] >= 2 else None
    return math.log(classes) if classes else None


def _exploded(now: EpochSummary, untrained: float | None) -> dict | None:
    """The first window with a batch's loss EXPLODED x an untrained model's (logits blown up)."""
    exploded = [w for w in now.losses if untrained and w["max"] > EXPLODED * untrained]
    return {"peak_step": exploded[0]["max_step"]} if exploded else None


def _first_level(history: list[EpochSummary]) -> float | None:
    """The training loss's first level (LEVEL_STEPS steps or more) in the run."""
    for summary in history:
        levels = _levels(summary.losses)
        if levels:
            return levels[0]["level"]
    return None


SPIKE_BASELINE = 8  # the loss windows before a spike that give its level
SHOWN = 5  # the spikes a finding's evidence lists


def _spikes(history: list[EpochSummary], t: Thresholds) -> list[dict[str, Any]]:
    """The loss spikes that came back within the latest summary, each told once: [{"after": the
    last step at the loss's level, "start", "peak_step", "peak", "level", "base", "back"}]. See
    loss_spikes for when a window spikes."""
    start, _ = _start_loss(history)
    if not start:
        return []
    recent = history[-4:]
    windows = [(s is recent[-1], w) for s in recent for w in s.losses if finite(w["max"])]
    rise = t.spike_rise * start  # over the highest losses before
    found = []
    spike = None
    for i, (latest, w) in enumerate(windows):
        if spike is None:
            spike = _spike_at([v for _, v in windows[max(0, i - SPIKE_BASELINE) : i]], w, rise, t)
        elif w["max"] >= spike["base"] + rise / 2:  # not back yet: a spike over two windows
            spike["lasted"] = True
            if w["max"] > spike["peak"]:
                spike.update(peak=w["max"], peak_step=w["max_step"])
        else:
            if latest and spike.pop("lasted"):
                found.append({**spike, "back": w["step"]})
            spike = None
    return found


def _spike_at(before: list[dict], window: dict, rise: float, t: Thresholds) -> dict | None:
    """A spike beginning at loss window `window`, after the windows `before` (at least four), or
    None; "lasted" tells whether this window alone tells of more than one hard batch: it rose
    twice as far, or it spans several steps and its mean rose by a quarter of `rise` (one batch
    of many moves the mean little)."""
    if len(before) < 4:
        return None
    base = statistics.median(w["max"] for w in before)
    level = statistics.median(w["mean"] for w in before)
    start = rise / t.spike_rise
    high = window["max"] > max(t.spike_factor * base, base + rise)
    if not high or level >= t.stuck_loss * start:  # only from a level the model had reached
        return None
    several = window.get("first", window["step"]) < window["step"]
    lasted = window["max"] > base + 2 * rise or several and window["mean"] > level + rise / 4
    spike = {"after": before[-1]["step"], "start": window["max_step"], "level": level}
    return {**spike, "peak": window["max"], "peak_step": window["max_step"], "base": base,
            "lasted": lasted}  # fmt: skip


def _moved_first(history: list[EpochSummary], spike: dict) -> dict[str, Any]:
    """The earliest reading from just before `spike` to its end at which layers jumped (see
    summary.EpochSummary.jumps); {} if none did, or none was read then."""
    jumps = [j for s in history[-4:] for j in s.loop.get("jumps", [])]
    jumps = [j for j in jumps if spike["after"] <= j["step"] <= spike["back"]]  # from its update
    return min(jumps, key=lambda j: j["step"], default={})


def _spike_message(evidence: dict) -> str:
    count = evidence["count"]
    first = evidence["spikes"][0]
    text = f"the training loss spiked {'once' if count == 1 else f'{count} times'}: "
    text += "the first " if count > 1 else ""
    text += f"at step {first['peak_step']}, from about {first['level']:.3g} to "
    text += f"{first['peak']:.3g}, back by step {first['back']}"
    moved = evidence.get("moved_first")
    if not moved:
        text += " (which layers jumped first is not known: no statistics reading in it could be "
        return text + "compared with an earlier window or epoch; stats_every=1 reads every step)."
    said = {"grad_norm": "gradient norm", "update_ratio": "update ratio"}
    parts = [
        f"{name} ({', '.join(f'{said[k]} x{v:.0f}' for k, v in ratios.items() if v >= JUMP)})"
        for name, ratios in moved["layers"].items()
    ]
    return f"{text}. First to jump, at step {moved['step']}: {'; '.join(parts)}."


@rule(
    "clip gradients (torch.nn.utils.clip_grad_norm_ at 1.0), a lower peak learning rate or a "
    "longer warmup, and look at the batches of those steps; with Adam, a larger eps.",
    thresholds=("spike_factor", "spike_rise", "stuck_loss"),
    follows=("gradients_not_cleared", "unshuffled"),
    lr=LOWER,
    instead="clip gradients, and look at the batches of those steps.",
    retell=_spike_message,
)
def loss_spikes(history: list[EpochSummary], t: Thresholds) -> list[Finding]:
    """The training loss spiked and came back: a loss window's highest value above `spike_factor`
    x the median of the highest of the 8 windows before, and above it by `spike_rise` x an
    untrained model's loss (ln C, or the first loss), from a level the model had reached (below
    `stuck_loss` x that), for two windows or twice as high, until a window's highest is within half
    that rise again. Told with the layers whose gradient norm or update ratio jumped first (3x their
    median in the summary before, or more), where a statistics reading fell in the spike; repeated
    spikes are one finding with their count."""
    if not _judged(history):  # a loss not minimised by design (RL, GAN, other)
        return []
    spikes = _spikes(history, t)
    if not spikes:
        return []
    evidence = {"count": len(spikes), "spikes": spikes[:SHOWN]}
    evidence["moved_first"] = _moved_first(history, spikes[0])
    message = _spike_message(evidence)
    began = spikes[0]["after"]  # the update of that step is the first that could have caused it
    return [_found(history[-1], [], evidence, message, step=began)]


@rule(
    "lower the learning rate at least ten times{lr}; check that the inputs are normalised; clip "
    "gradients (torch.nn.utils.clip_grad_norm_).",
    thresholds=("diverging_factor",),
    follows=(
        "gradients_not_cleared",
        "unshuffled",
        "loss_spikes",
        "high_initial_loss",
        "moving_too_fast",
    ),
    lr=LOWER,
    instead="check the data and the loss for invalid values, clip gradients.",
    diverged=True,
)
def diverging(history: list[EpochSummary], t: Thresholds) -> list[Finding]:
    """The training loss's level (the median of its values over LEVEL_STEPS steps or more, never
    one batch's) rises above `diverging_factor` x where it started (the lower of an untrained
    model's loss, ln C for a cross-entropy over C classes, and its first level) or, with ln C
    known, above WORSE x both ln C and its first level (worse than a model that guesses), or a
    batch's cross-entropy reaches EXPLODED x ln C; or the loss becomes NaN or Inf (then, without
    rising first, it points at the data)."""
    now = history[-1]
    judged = _judged(history)  # not: a loss that rises by design, of which only NaN is told
    untrained = _untrained_loss(now) if judged else None
    first = _first_level(history)
    start = min((level for level in (untrained, first) if level is not None), default=None)
    limit = t.diverging_factor * start if judged and finite(start) and start > 0 else math.inf
    if untrained and finite(start):  # worse than an untrained model, and risen from its start
        limit = min(limit, WORSE * max(untrained, first or 0.0))
    high = next((span for span in _levels(now.losses) if span["level"] > limit), None)
    high = high or _exploded(now, untrained)
    if high is not None:
        peak = max((w for w in now.losses if finite(w["max"])), key=lambda w: w["max"])
        steps = peak["max_step"]
        when = f"in the first {steps} steps" if now.epoch == 0 else f"by step {steps}"
        message = f"the training loss rose from {start:.3g} to {peak['max']:.3g} {when}: "
        message += "the learning rate is too high."
        evidence = {"first_loss": start, "peak": peak["max"], "peak_step": steps}
        evidence.update(level=high.get("level"), threshold=t.diverging_factor)
        began = [w for w in now.losses if w["max"] > limit and w["step"] >= high.get("first", 0)]
        step = began[0]["max_step"] if began else high["peak_step"]  # when it began
        return [_found(now, [], evidence, message, step)]
    bad = next((w for w in now.losses if w.get("nonfinite_step") is not None), None)
    if bad is None:
        return []
    step = bad["nonfinite_step"]
    message = f"the training loss became NaN or Inf at step {step} without rising first: "
    message += "a batch with invalid values, or an overflow."
    check = "check the data and the loss for NaN or Inf (--stop-on-nonfinite stops at the first)."
    return [_found(now, [], {"nonfinite_step": step}, message, step, suggestion=check)]


@rule(
    "lower the learning rate{lr}, clip gradients (torch.nn.utils.clip_grad_norm_), check the data "
    "and the loss for invalid values; --stop-on-nonfinite stops at the first one.",
    follows=("gradients_not_cleared", "diverging", "exploding_gradients", "high_initial_loss"),
    lr=LOWER,
    instead="check the data and the loss for invalid values, clip gradients.",
)
def nonfinite_gradients(history: list[EpochSummary], t: Thresholds) -> list[Finding]:
    """A logged gradient holds NaN or Inf (steps GradScaler skipped are not counted)."""
    now = history[-1]
    bad = {
        n: s["nonfinite_share"] for n, s in now.layers.items() if s.get("nonfinite_share", 0) > 0
    }
    if not bad:
        return []
    message = f"NaN or Inf values in the gradients of {names(sorted(bad))} (up to "
    message += f"{max(bad.values()):.1%} of a tensor)."
    return [_found(now, sorted(bad), {"nonfinite_share": bad}, message)]


@rule(
    "lower the learning rate{lr} or clip gradients (torch.nn.utils.clip_grad_norm_).",
    thresholds=("exploding_factor",),
    follows=("gradients_not_cleared", "loss_spikes", "diverging", "high_initial_loss"),
    lr=LOWER,
    instead="clip gradients (torch.nn.utils.clip_grad_norm_).",
    diverged=True,
)
def exploding_gradients(history: list[EpochSummary], t: Thresholds) -> list[Finding]:
    """The epoch's largest total gradient norm exceeds `exploding_factor` x its median over the
    epochs before."""
    now = history[-1]
    before = [h.total_grad_norm_median for h in history[:-1] if finite(h.total_grad_norm_median)]
    peak = now.total_grad_norm_max
    if not before or not finite(peak):
        return []
    baseline = statistics.median(before)
    if baseline <= 0 or peak < t.exploding_factor * baseline:
        return []
    evidence = {"total_grad_norm_max": peak, "median_before": baseline, "factor": peak / baseline}
    evidence["threshold"] = t.exploding_factor
    message = f"the total gradient norm reached {peak:.3g}, {peak / baseline:.0f}x its median of "
    message += f"{baseline:.3g} in the {'epochs' if now.unit == 'epoch' else 'steps'} before."
    return [_found(now, ["total"], evidence, message)]


def _falling(history: list[EpochSummary]) -> bool:
    """Whether the epoch's training loss is a new low: below the first loss and every earlier
    epoch's."""
    losses = [_loss(s) for s in history]
    first = history[0].first_loss
    if not finite(losses[-1]):
        return False
    before = [loss for loss in [first, *losses[:-1]] if finite(loss)]
    return bool(before) and losses[-1] < min(before)


@rule(
    "lower the learning rate, and raise the clipping threshold to about the 90th percentile of the "
    "norms before clipping, so that it catches only the outliers.",
    thresholds=("clipped_share",),
    follows=("gradients_not_cleared", "diverging", "exploding_gradients", "high_initial_loss"),
    lr=LOWER,
    instead="raise the clipping threshold to about the 90th percentile of the norms before "
    "clipping.",
)
def mostly_clipped(history: list[EpochSummary], t: Thresholds) -> list[Finding]:
    """Gradient clipping scaled down more than `clipped_share` of the epoch's steps while the
    training loss made no new low: a learning rate too high, hidden by the clipping (the Deep
    Learning Tuning Playbook's rule). While the loss falls, clipping most steps is what clipping
    at 1.0 does early in transformer training, and no problem."""
    if not _judged(history):  # a loss not minimised by design (RL, GAN, other)
        return []
    now = history[-1]
    clip = now.clipping
    share = clip.get("clipped_share")
    if not finite(share) or share <= t.clipped_share or _falling(history):
        return []
    median = clip["grad_norm_median"]
    p90 = clip["grad_norm_p90"]
    at = f" at {clip['max_norm']:g}" if clip.get("max_norm") else ""  # unknown in others' logs
    message = f"gradient clipping{at} scaled down {share:.0%} of the {clip['steps']} steps of "
    message += f"{_period(now)} (norms before clipping: median {median:.3g}, "
    message += f"90th percentile {p90:.3g}). Clipping nearly every step "
    lr = now.lr
    in_effect = lr * clip["max_norm"] / median if lr and at and median > 0 else None
    if in_effect:
        message += f"makes the learning rate of {lr:g} about {in_effect:.2g} in effect: "
    else:
        message += "shrinks it: "
    message += "a learning rate too high for these gradients, hidden by the clipping."
    suggestion = None
    if in_effect:
        suggestion = f"lower the learning rate to about {in_effect:.2g}, what it is in effect "
        suggestion += f"now, and raise the clipping threshold to about {p90:.3g}, the 90th "
        suggestion += "percentile of the norms, so that clipping catches only the outliers."
    evidence = {**clip, "threshold": t.clipped_share}
    return [_found(now, [], evidence, message, suggestion=suggestion)]


@rule(
    "a weight decay ten to a hundred times smaller (5e-4 is usual with SGD, 0.01 to 0.1 with "
    "AdamW).",
    thresholds=("decay_epochs", "stuck_loss"),
)
def strong_weight_decay(history: list[EpochSummary], t: Thresholds) -> list[Finding]:
    """The optimizer has weight decay, the weights' norm is below half what it was at the first
    statistics step, and the training loss stayed above `stuck_loss` x an untrained model's (ln C,
    or the first loss) for `decay_epochs` epochs: the decay holds the weights near zero, where the
    gradients cannot move them."""
    if not _judged(history):  # a loss not minimised by design (RL, GAN, other)
        return []
    now = history[-1]
    decay = now.loop.get("weight_decay")
    start = history[0].loop.get("weight_norm_first")
    norm = now.loop.get("weight_norm")
    untrained, said = _start_loss(history)
    if len(history) < t.decay_epochs or not decay or not untrained or not finite(start):
        return []
    losses = [_loss(s) for s in history[-t.decay_epochs :]]
    if not finite(norm) or norm >= start / 2:
        return []
    if not all(finite(loss) and loss >= t.stuck_loss * untrained for loss in losses):
        return []
    message = f"with weight decay {decay:g} the weights' norm fell from {start:.3g} to {norm:.3g} "
    message += f"while the training loss stays near {untrained:.3g} ({said}; {losses[-1]:.3g} "
    message += "now): the decay holds the weights near zero faster than the gradients can move "
    message += "them."
    evidence = {"weight_decay": decay, "weight_norms": [start, norm], "train_loss": losses[-1]}
    suggestion = (
        f"a weight decay ten to a hundred times smaller than {decay:g} (5e-4 is usual with "
    )
    suggestion += "SGD, 0.01 to 0.1 with AdamW)."
    return [_found(now, [], evidence, message, 1, suggestion)]  # the decay acts from the first step


@rule(
    "a smaller negative bias or a better initialisation (Kaiming's), or LeakyReLU.",
    thresholds=("dead_share",),
    follows=(
        "gradients_not_cleared",
        "strong_weight_decay",
        "unshuffled",
        "diverging",
        "exploding_gradients",
        "high_initial_loss",
    ),
)
def dead_units(history: list[EpochSummary], t: Thresholds) -> list[Finding]:
    """`dead_share` of a ReLU's units (channels or features) gave no positive output at any
    statistics step of the epoch (in logs read by `diagnose`: for a whole batch). A note while the
    model learns anyway (not near its start, as `stuck` measures it), a warning once it does not."""
    now = history[-1]
    # by the layer that feeds them: of two ReLUs after one layer, the later one speaks for it
    dead = {
        a["layer"]: a.get("never_fired", a["share"])
        for a in now.activations.values()
        if a["kind"] == "relu"
    }
    dead = {layer: share for layer, share in dead.items() if share >= t.dead_share}
    if not dead:
        return []
    parts = ", ".join(f"{share:.0%} of {layer}'s" for layer, share in dead.items())
    message = f"{parts} units gave no positive output on any batch read in {_period(now)}: "
    message += "their ReLUs no longer fire (dead units)."
    start, _ = _start_loss(history)
    learns = bool(start) and finite(_loss(now)) and not _near_start(now, start, t)  # no more
    if learns:
        accuracy = _accuracy(now)
        message += f" The model learns on the units left (training loss {_loss(now):.3g}"
        message += f", accuracy {accuracy:.1%})." if finite(accuracy) else ")."
    evidence = {"dead_share": dead, "threshold": t.dead_share}
    finding = _found(now, list(dead), evidence, message)
    finding.harmless = learns
    return [finding]


def _saturated(summary: EpochSummary, t: Thresholds) -> dict[str, dict]:
    """The sigmoid and tanh activations of `summary` with `saturated_share` of their outputs or
    more within 1% of their limits, by layer."""
    squashing = [a for a in summary.activations.values() if a["kind"] in ("sigmoid", "tanh")]
    return {a["layer"]: a for a in squashing if a["share"] >= t.saturated_share}


def _fast(summary: EpochSummary, t: Thresholds) -> dict[str, float]:
    """The weights of `summary` whose median update ratio is above `update_fast`, by name."""
    return {n: r for n, r in _update_ratios(summary).items() if r > t.update_fast}


def _fast_steps(history: list[EpochSummary], finding: Finding, t: Thresholds) -> dict | None:
    """Weights that move by more than `update_fast` of their size per step: steps that large
    push a unit's inputs far out, where sigmoid and tanh flatten."""
    fast = _fast(history[-1], t)
    return {"update_ratio": fast} if fast else None


def _squashing(history: list[EpochSummary], finding: Finding, t: Thresholds) -> dict:
    """Sigmoid and tanh flatten away from 0: the activation is a cause wherever they saturate."""
    return {"activations": finding.parameters}


@rule(
    "",
    causes=(
        Cause(
            "learning_rate",
            _fast_steps,
            "a lower learning rate{lr}.",
            "the learning rate: "
            "steps of more than a tenth of the weights push the units into saturation",
            LOWER,
        ),
        Cause(
            "activation",
            _squashing,
            "ReLU instead of sigmoid or tanh in hidden layers, "
            "normalisation layers, or smaller initial weights.",
            "the activation: ReLU or GELU "
            "do not saturate, and normalisation layers before a sigmoid or tanh keep its inputs "
            "small",
        ),
    ),  # fmt: skip
    thresholds=("saturated_share", "update_fast"),
    follows=("gradients_not_cleared", "diverging", "exploding_gradients", "high_initial_loss"),
)
def saturated(history: list[EpochSummary], t: Thresholds) -> list[Finding]:
    """`saturated_share` of a sigmoid's or tanh's outputs are within 1% of their limits. A symptom
    of the activation, or of steps too large for it (weights moving by more than `update_fast` of
    their size per step): the activation is named where the steps are not that large."""
    now = history[-1]
    found = _saturated(now, t)
    if not found:
        return []
    parts = ", ".join(f"{a['share']:.0%} of {layer}'s {a['kind']}" for layer, a in found.items())
    message = f"{parts} outputs are within 1% of their limits, where their gradient is nearly zero "
    message += "(saturated)."
    shares = {layer: a["share"] for layer, a in found.items()}
    evidence = {"saturated_share": shares, "threshold": t.saturated_share}
    return [_found(now, list(found), evidence, message)]


def _weight_rms(summary: EpochSummary) -> dict[str, float]:
    """Each weight tensor's gradient RMS, in model order (biases and norms' gains tell less), but
    those the loss's graph shows are read by a lookup (an embedding: its gradient is zero at every
    row a batch did not look up, so its RMS says how many rows were, not how deep it lies)."""
    lookups = set(summary.loop.get("graph", {}).get("lookups", []))
    return {
        name: s["grad_rms"]
        for name, s in summary.layers.items()
        if name.endswith("weight") and finite(s.get("grad_rms")) and name not in lookups
    }


def _ends(summary: EpochSummary, rms: dict[str, float]) -> tuple[str, str]:
    """The weight layers a vanishing gradient is measured between: the deepest below the loss and
    the last, by the loss's graph (depths); by model order without it. Of several last layers (the
    heads of an actor and a critic, whose losses have scales of their own), the one of the smallest
    gradient: a head's gradient is not what another head's layers should have."""
    depths = summary.loop.get("graph", {}).get("depths", {})
    known = {name: depths[name] for name in rms if name in depths}
    if len(known) < 2 or min(known.values()) != 0:
        return next(iter(rms)), list(rms)[-1]
    deepest = max(known.values())
    heads = [name for name, depth in known.items() if depth == 0]
    return next(n for n, depth in known.items() if depth == deepest), min(heads, key=rms.get)


def _vanishes(now: EpochSummary, rms: dict, first: str, last: str, t: Thresholds) -> bool:
    """Whether the gradient vanishes from the last layer down to the first: its RMS there is below
    `vanishing_ratio` of the last's, and so are that layer's steps where they were measured (an
    optimizer that rescales each step, as Adam does, moves a layer of small gradients at the pace
    of the others: no harm)."""
    if first == last or rms[last] <= 0 or rms[first] >= t.vanishing_ratio * rms[last]:
        return False
    steps = _update_ratios(now)
    if first not in steps or last not in steps:
        return True
    return steps[first] < t.vanishing_ratio * steps[last]


DEEP = 6  # weight layers between a layer and the loss, on its shortest way, that make a plain stack


def _saturation(history: list[EpochSummary], finding: Finding, t: Thresholds) -> dict | None:
    """Sigmoid or tanh units near their limits in the latest summary: their gradient is nearly 0."""
    shares = {layer: a["share"] for layer, a in _saturated(history[-1], t).items()}
    return {"saturated_share": shares} if shares else None


def _deep_stack(history: list[EpochSummary], finding: Finding, t: Thresholds) -> dict | None:
    """A layer DEEP or more weight layers below the loss on its shortest way: no residual
    connection carries its gradient past the others."""
    depths = history[-1].loop.get("graph", {}).get("depths", {})
    deepest = max((depths[n] for n in finding.parameters if n in depths), default=0)
    return {"depth": deepest} if deepest >= DEEP else None


def _never(history: list[EpochSummary], finding: Finding, t: Thresholds) -> None:
    """A cause no statistic of the monitor shows: only to be looked at."""
    return None


VANISHING_CAUSES = (
    Cause("saturation", _saturation, "ReLU or GELU instead of sigmoid or tanh in the hidden "
          "layers, or normalisation layers before them.", "saturated sigmoid or tanh units below "
          "the output (diagnosis.json's activations)"),
    Cause("depth", _deep_stack, "residual connections or normalisation layers, or an auxiliary "
          "loss near the early layers.", "how many weight layers lie between these and the output "
          "without a residual connection"),
    Cause("small_output", _never, "", "the scale of the layers after them: a small initial gain "
          "(as policy heads use) or weights decayed towards zero shrink every gradient below"),
)  # fmt: skip


@rule(
    "",
    causes=VANISHING_CAUSES,
    thresholds=("vanishing_ratio", "vanishing_floor", "saturated_share"),
    follows=(
        "softmax_before_loss",
        "dead_units",
        "saturated",
        "diverging",
        "exploding_gradients",
        "high_initial_loss",
    ),
    ended="a slow start",
)
def vanishing_gradients(history: list[EpochSummary], t: Thresholds) -> list[Finding]:
    """The deepest weight layer's gradient RMS is below `vanishing_ratio` of the last weight
    layer's (depths by the loss's graph; of several output heads, the smallest), or any weight
    layer's is below `vanishing_floor`; embeddings are not compared (_weight_rms), and nothing is
    while a loss to be minimised is down to LEARNT x where it started. A symptom: its
    causes are saturated units (above `saturated_share`), a deep stack without shortcuts, or a
    small scale of the layers after them."""
    now = history[-1]
    rms = _weight_rms(now)
    if len(rms) < 2 or _judged(history) and _fell(history, LEARNT):
        return []  # a loss near nothing (a margin every triplet meets) has no gradient to pass on
    first, last = _ends(now, rms)
    findings = []
    if _vanishes(now, rms, first, last, t):
        early = [n for n in rms if n != last and rms[n] < t.vanishing_ratio * rms[last]]
        evidence = {"grad_rms": {n: rms[n] for n in [*early, last]}}
        evidence.update(ratio_first_to_last=rms[first] / rms[last], threshold=t.vanishing_ratio)
        smaller = "zero, against"
        if rms[first] > 0:
            smaller = f"{rms[last] / rms[first]:.0f}x smaller than"
        message = f"gradients of {names(early)} are {smaller} those of the last layer {last} "
        message += f"(RMS {rms[first]:.2g} against {rms[last]:.2g})."
        findings.append(_found(now, early, evidence, message))
    done = findings[0].parameters if findings else []
    floor = [n for n in rms if rms[n] < t.vanishing_floor and n not in done]
    if floor:
        evidence = {"grad_rms": {n: rms[n] for n in floor}, "floor": t.vanishing_floor}
        message = f"gradients of {names(floor)} have an RMS below {t.vanishing_floor:g}: "
        message += "these layers barely learn."
        findings.append(_found(now, floor, evidence, message))
    return findings


def _peak_lr(history: list[EpochSummary]) -> float | None:
    """The highest learning rate of the run so far: the rate set (a scheduler's `initial_lr`, a
    warmup's target), at watch(), at a statistics step, or at an epoch's end."""
    rates = [s.loop.get(key) for s in history for key in ("lr_first", "lr_peak", "lr_set")]
    rates = [r for r in [*rates, *(s.lr for s in history)] if finite(r)]
    return max(rates, default=None)


def _update_ratios(summary: EpochSummary) -> dict[str, float]:
    """The median update-to-weight ratio of each weight tensor, by name: weights only, since a bias
    that starts at zero moves by a large fraction of its size early on, harmlessly."""
    return {
        name: s["update_ratio"]
        for name, s in sorted(summary.layers.items())
        if name.endswith("weight") and finite(s.get("update_ratio")) and s.get("weight_norm", 0) > 0
    }


def _update_finding(now: EpochSummary, found: dict[str, float], threshold: float, comparison: str):
    most = min(found.values()) if comparison == "less" else max(found.values())
    message = f"{names(found)} change by {comparison} than {threshold:g} of their size per step "
    message += f"(median ||dw||/||w||: {most:.2g})."
    return [_found(now, list(found), {"update_ratio": found, "threshold": threshold}, message)]


@rule(
    "a larger learning rate for these layers (--layer-lr NAME=FACTOR), less weight decay, or check "
    "that they receive gradients.",
    thresholds=("update_slow",),
    follows=(
        "updates_rounded_away",
        "not_updated",
        "not_in_optimizer",
        "no_gradient",
        "lr_collapsed",
        "strong_weight_decay",
        "dead_units",
        "saturated",
        "vanishing_gradients",
        "diverging",
        "high_initial_loss",
    ),
    lr=RAISE,
    instead="check that these layers receive gradients and are in the optimizer.",
    ended="a slow start",
)
def not_learning(history: list[EpochSummary], t: Thresholds) -> list[Finding]:
    """A weight tensor's median update-to-weight ratio ||dw|| / ||w|| over the epoch is below
    `update_slow`; frozen ones (requires_grad=False) and copies kept apart (a target network) are
    meant not to move, and neither are any once the schedule has brought the learning rate below a
    tenth of its peak, or once a loss to be minimised is down to LEARNT x where it started."""
    frozen = set(history[-1].loop.get("frozen", ())) | _kept_apart(history[-1])
    peak = _peak_lr(history)
    if peak and finite(history[-1].lr) and history[-1].lr < 0.1 * peak:
        return []  # the schedule has annealed the learning rate: slow steps are what it asks for
    if _judged(history) and _fell(history, LEARNT):
        return []  # the loss is near nothing: the gradients, and so the steps, are too
    ratios = _update_ratios(history[-1]).items()
    found = {n: r for n, r in ratios if r < t.update_slow and n not in frozen}
    return _update_finding(history[-1], found, t.update_slow, "less") if found else []


FELL = 0.75  # a loss at this share of where it started, or below, has come down: the run learns
LEARNT = 0.01  # and at this share, there is little left to learn


def _latest_level(summary: EpochSummary) -> float | None:
    """The training loss's latest level in `summary`: its last window of LEVEL_STEPS steps or more
    (its median), else its last level, else the epoch's loss."""
    long = LEVEL_STEPS - 1
    windows = [w for w in summary.losses if w["step"] - w.get("first", w["step"]) >= long]
    if windows and finite(windows[-1].get("median")):
        return windows[-1]["median"]
    levels = _levels(summary.losses)
    return levels[-1]["level"] if levels else _loss(summary)


def _starts(history: list[EpochSummary]) -> list[float]:
    """Where the loss started: an untrained model's loss (ln C) and the run's first level, those
    known."""
    known = [_untrained_loss(history[-1]), _first_level(history) or _loss(history[0])]
    return [value for value in known if finite(value)]


def _fell(history: list[EpochSummary], share: float = FELL) -> bool:
    """Whether the loss has come down to `share` x where it started (the lower start) or below."""
    starts = _starts(history)
    latest = _latest_level(history[-1])
    return bool(starts) and finite(latest) and latest <= share * min(starts)


def _rose(history: list[EpochSummary], finding: Finding, t: Thresholds) -> dict | None:
    """A loss to be minimised that is now above where it started (the higher start): the steps
    overshoot."""
    starts = _starts(history)
    latest = _latest_level(history[-1])
    if not _judged(history) or not starts or not finite(latest) or latest <= max(starts):
        return None
    return {"started": max(starts), "loss": latest}


@rule(
    "",
    thresholds=("update_fast",),
    follows=(
        "gradients_not_cleared",
        "diverging",
        "exploding_gradients",
        "mostly_clipped",
        "strong_weight_decay",
        "high_initial_loss",
    ),
    causes=(
        Cause(
            "learning_rate",
            _rose,
            "a lower learning rate for these layers (--layer-lr NAME=0.1) or for the whole model.",
            "the learning rate: whether the loss falls at a tenth of it",
            lr=LOWER,
        ),
        Cause(
            "small_weights",
            _never,
            "",
            "weight decay or an initialisation that keeps these "
            "weights near zero (the ratio is to their size)",
        ),
        Cause(
            "data",
            _never,
            "",
            "the labels and inputs: weights that move fast while the loss "
            "does not fall find nothing to learn in them",
        ),
    ),  # fmt: skip
)
def moving_too_fast(history: list[EpochSummary], t: Thresholds) -> list[Finding]:
    """A weight tensor's median update-to-weight ratio is above `update_fast` (about 1e-3 is typical
    of healthy training), while a loss to be minimised does not fall below FELL x its first level
    (large steps that bring the loss down are learning: weights that start near zero move by much
    of their size). A symptom: the learning rate is its cause where the loss rose meanwhile."""
    if _judged(history) and _fell(history):
        return []
    found = _fast(history[-1], t)
    return _update_finding(history[-1], found, t.update_fast, "more") if found else []


def _start_loss(history: list[EpochSummary]) -> tuple[float | None, str]:
    """What the loss of a model that has learnt nothing is, and how to say it: ln C for C classes,
    else the run's own first loss (any loss function)."""
    classes = _classes(history[-1])
    if classes:
        return math.log(classes), f"ln {classes}, an untrained model's"
    first = history[0].first_loss
    return (first, "its first value") if finite(first) and first > 0 else (None, "")


def _near_start(summary: EpochSummary, start: float, t: Thresholds) -> bool:
    """Whether the epoch's training loss is still near `start`, and with classes, the accuracy near
    chance."""
    loss = _loss(summary)
    classes = _classes(summary)
    if not finite(loss) or loss < t.stuck_loss * start:
        return False
    if not classes:
        return True
    accuracy = _accuracy(summary)
    return finite(accuracy) and accuracy <= 1 / classes + t.chance_margin


@rule(
    "a larger learning rate{lr_up}; if that does not help, check that the labels match the images "
    "and that the inputs are normalised.",
    thresholds=("stuck_loss", "chance_margin", "stuck_epochs", "stuck_moving_ratio"),
    follows=(
        "updates_rounded_away",
        "not_updated",
        "not_in_optimizer",
        "no_gradient",
        "eval_mode",
        "gradients_not_cleared",
        "softmax_before_loss",
        "lr_collapsed",
        "unshuffled",
        "strong_weight_decay",
        "diverging",
        "dead_units",
        "saturated",
        "vanishing_gradients",
        "not_learning",
        "high_initial_loss",
    ),
    lr=RAISE,
    instead="check that the labels match the images and that the inputs are normalised.",
    ended="a slow start",
)
def stuck(history: list[EpochSummary], t: Thresholds) -> list[Finding]:
    """For `stuck_epochs` epochs the training loss stays above `stuck_loss` x ln C and the accuracy
    within `chance_margin` of chance (without classes: above `stuck_loss` x the first loss, for any
    loss function); if the weights move meanwhile (median update ratio above `stuck_moving_ratio`),
    the labels and inputs are the suspects, not the learning rate; in fewer than FEW_STEPS
    optimizer steps in all, the run is too short to blame either."""
    if not _judged(history):  # a loss not minimised by design (RL, GAN, other)
        return []
    now = history[-1]
    classes = _classes(now)
    start, said = _start_loss(history)
    recent = history[-t.stuck_epochs :]
    if not start or len(history) < t.stuck_epochs:
        return []
    if not all(_near_start(summary, start, t) for summary in recent):
        return []
    accuracy = _accuracy(now)
    loss = _loss(now)
    where = "near" if loss <= 1.5 * start else "above"
    since = f"epoch {recent[0].epoch + 1}" if now.unit == "epoch" else f"step {recent[0].step}"
    message = f"since {since} the training loss stays {where} {start:.3g} "
    message += f"({said}; {loss:.3g} now)"
    if classes:
        message += f" and the accuracy near chance ({accuracy:.1%}; chance {1 / classes:.1%})"
    evidence = {"train_loss": _loss(now), "accuracy": accuracy, "since_epoch": recent[0].epoch}
    if now.step < FEW_STEPS:
        message += f", in {now.step} optimizer steps in all: too few to tell."
        suggestion = "let it take more steps (more data, or more epochs) before judging the "
        suggestion += "learning rate or the data: a model learns little in so few."
        evidence.update(cause="few_steps", steps=now.step)  # no claim on the learning rate
        return [_found(now, [], evidence, message, suggestion=suggestion)]
    moving = _moving(recent)  # if the weights move, the data are suspect
    if moving is None or moving < t.stuck_moving_ratio:
        return [_found(now, [], evidence, f"{message}: the model is not learning.")]
    message += f", although the weights move (median ||dw||/||w|| {moving:.2g}): the labels or the "
    message += "inputs say nothing the model can learn."
    suggestion = "check that the labels match the images (a shuffled or misaligned list?) and that "
    suggestion += "the inputs vary and are normalised; a larger learning rate will not help."
    evidence.update(update_ratio=moving, weights_move=True)
    return [_found(now, [], evidence, message, suggestion=suggestion)]


# optimizer steps in all below which a loss that has not moved says nothing yet: 4 levels of it
FEW_STEPS = 4 * LEVEL_STEPS


def _moving(recent: list[EpochSummary]) -> float | None:
    """The median update ratio of the weights at the latest of `recent` that read one (an epoch
    shorter than the statistics' cadence may read none)."""
    for summary in reversed(recent):
        ratios = [s.get("update_ratio") for s in summary.layers.values()]
        ratios = [ratio for ratio in ratios if finite(ratio)]
        if ratios:
            return statistics.median(ratios)
    return None


@rule(
    "a lower learning rate{lr} or a larger batch.",
    thresholds=("oscillation_epochs", "oscillation_amplitude"),
    follows=(
        "gradients_not_cleared",
        "unshuffled",
        "diverging",
        "exploding_gradients",
        "moving_too_fast",
    ),
    lr=LOWER,
    instead="a larger batch, or clip gradients.",
)
def oscillating(history: list[EpochSummary], t: Thresholds) -> list[Finding]:
    """Over the last `oscillation_epochs` epochs the training loss turned up and down nearly every
    epoch, by `oscillation_amplitude` of its level, without falling; not once it is down to LEARNT x
    where it started (batches then bounce it around its floor: a converged regression's)."""
    if not _judged(history) or _fell(history, LEARNT):  # not minimised by design (RL, GAN, other)
        return []
    losses = [_loss(s) for s in history[-t.oscillation_epochs :]]
    if len(losses) < t.oscillation_epochs or not all(map(finite, losses)):
        return []
    steps = [b - a for a, b in zip(losses, losses[1:])]
    turns = sum(1 for a, b in zip(steps, steps[1:]) if a * b < 0)
    level = statistics.median(losses)
    swing = statistics.median(abs(d) for d in steps)
    half = len(losses) // 2
    falling = statistics.mean(losses[half:]) < 0.9 * statistics.mean(losses[:half])
    if turns < len(steps) - 2 or swing < t.oscillation_amplitude * level or falling:
        return []
    span = "epochs" if history[-1].unit == "epoch" else "windows of steps"
    message = f"over the last {len(losses)} {span} the training loss went up and down by "
    message += f"{swing:.3g} "
    message += f"(around {level:.3g}) without falling: the steps overshoot."
    evidence = {"train_losses": losses, "swing": swing, "threshold": t.oscillation_amplitude}
    return [_found(history[-1], [], evidence, message)]


def _worse_on_new_data(history: list[EpochSummary], rise: float) -> bool:
    """Whether the validation loss rose `rise` above its best so far at some epoch, and has made no
    new best since (so that one rise that came back above the best still counts, and a new best
    clears it); True without validation."""
    losses = [s.metrics.get("valid_loss") for s in history]
    if not finite(losses[-1]):
        return True
    best = math.inf
    worse = False
    for loss in filter(finite, losses):
        worse = (worse and loss >= best) or loss > (1 + rise) * best
        best = min(best, loss)
    return worse


def _max_abs_weight(summary: EpochSummary, name: str) -> float | None:
    return summary.layers.get(name, {}).get("max_abs_weight")


@rule(
    "weight decay for this layer (--layer-wd {name}=5e-4), or a lower learning rate.",
    thresholds=("weight_max_abs", "weight_growth", "weight_window", "overfit_rise"),
    follows=("gradients_not_cleared", "diverging", "output_bias_skew"),
    per_parameter=True,
    ended="the validation loss made a new best, or the weights stopped growing",
)
def weights_growing(history: list[EpochSummary], t: Thresholds) -> list[Finding]:
    """A layer's max |w| is above `weight_max_abs`, at least `weight_growth` times its value after
    the first epoch, and still higher than `weight_window` epochs ago, while the validation loss (if
    there is one) rose `overfit_rise` above its best and has made no new best since: weights that
    grow while the model does better than ever on new data are learning, not overfitting. In a loop
    without epochs, only with a validation loss: there weights grow as a model learns."""
    if history[-1].unit == "steps" and not finite(history[-1].metrics.get("valid_loss")):
        return []
    if len(history) <= t.weight_window or not _worse_on_new_data(history, t.overfit_rise):
        return []
    now = history[-1]
    findings = []
    for name, s in now.layers.items():
        first = _max_abs_weight(history[0], name)
        earlier = _max_abs_weight(history[-1 - t.weight_window], name)
        value = s.get("max_abs_weight")
        if not all(map(finite, (first, earlier, value))) or first <= 0:
            continue
        if value > t.weight_max_abs and value >= t.weight_growth * first and value > earlier:
            evidence = {"max_abs_weight": value, "after_first_epoch": first}
            evidence[f"{t.weight_window}_epochs_before"] = earlier
            evidence["weight_norm"] = s.get("weight_norm")
            after = "the first epoch" if now.unit == "epoch" else f"step {history[0].step}"
            message = f"{name}: max |w| grew from {first:.3g} after {after} to "
            message += f"{value:.3g} and "
            message += "is still growing."
            findings.append(_found(now, [name], evidence, message))
    return findings


def _skewed(bias: list[float], t: Thresholds) -> list[tuple[int, float, float]]:
    """(class index, deviation from the median bias, robust z) of the outlying classes."""
    centre = statistics.median(bias)
    spread = 1.4826 * statistics.median(abs(b - centre) for b in bias)
    found = []
    for i, b in enumerate(bias):
        deviation = b - centre
        if spread > 0:
            z = deviation / spread
        else:  # all but a few biases equal: any deviation is infinitely far out
            z = math.copysign(math.inf, deviation) if deviation else 0.0
        if not (abs(deviation) < t.bias_min_deviation or abs(z) < t.bias_z):
            found.append((i, centre, z))
    return found


@rule(
    "check that class's share of the training data (rebalance or weight the loss), or "
    "re-initialise the output bias.",
    thresholds=("bias_z", "bias_min_deviation"),
    follows=(
        "unshuffled",
        "softmax_before_loss",
        "diverging",
        "dead_units",
        "not_learning",
        "stuck",
    ),
    per_parameter=True,
)
def output_bias_skew(history: list[EpochSummary], t: Thresholds) -> list[Finding]:
    """A class's output-layer bias lies `bias_z` robust standard deviations (1.4826 MAD) and at
    least `bias_min_deviation` from the median bias, at this epoch and the one before (if any);
    reported with that class's validation recall. With recalls, only where that class's is below
    half the median one: a skew that costs that class nothing is the model's business."""
    now = history[-1]
    bias = now.output_bias
    values = bias.get("values")
    if not values or len(values) < 3:
        return []
    recalls = [r for r in bias.get("recall") or () if finite(r)]
    typical = statistics.median(recalls) if recalls else None
    before = history[-2].output_bias.get("values") if len(history) > 1 else None
    lasting = set()
    if before and len(before) == len(values):
        lasting = {i for i, _, _ in _skewed(before, t)}
    findings = []
    for i, centre, z in _skewed(values, t):
        if len(history) > 1 and i not in lasting:
            continue  # a skew of one epoch is the noise of training
        label = bias["classes"][i]
        recall = bias["recall"][i] if bias["recall"] else None
        if typical is not None and finite(recall) and recall >= typical / 2:
            continue
        evidence = {"class": label, "bias": values[i], "median_bias": centre, "robust_z": z}
        evidence["validation_recall"] = recall
        message = f"class '{label}' has output bias {values[i]:.3g} against a median of "
        message += f"{centre:.3g} among the classes"
        message += f"; its validation recall is {recall:.1%}." if recall is not None else "."
        findings.append(_found(now, [f"{bias['name']}[{i}]"], evidence, message))
    return findings


@rule(
    "check and clean the training labels (a wrong class for some images: a shifted list, two label "
    "sets mixed); label smoothing softens the damage meanwhile.",
    thresholds=("noisy_gap", "noisy_epochs"),
)
def noisy_labels(history: list[EpochSummary], t: Thresholds) -> list[Finding]:
    """For `noisy_epochs` epochs in a row the training accuracy is `noisy_gap` or more below the
    validation accuracy of the epoch before (the model as the epoch began, so that a training
    accuracy averaged over an epoch of fast learning does not count): the model predicts held-out
    labels better than the training ones, so part of the training labels are wrong."""
    recent = history[-1 - t.noisy_epochs :]
    if len(history) <= t.noisy_epochs:
        return []
    train = [s.metrics.get("train_accuracy") for s in recent]
    valid = [s.metrics.get("valid_accuracy") for s in recent]
    if not all(map(finite, train + valid)):
        return []
    if min(before - now for before, now in zip(valid, train[1:])) < t.noisy_gap:
        return []
    train = train[-1]
    valid = valid[-1]
    message = (
        f"for {t.noisy_epochs} epochs the validation accuracy stays {t.noisy_gap:.0%} or more "
    )
    message += f"above the training accuracy (now {valid:.1%} against {train:.1%}): the model "
    message += "predicts held-out labels better than the training ones, so part of the training "
    message += (
        f"labels are wrong (at least about {1 - train / valid:.0%}, if the validation labels "
    )
    message += "are right)."
    evidence = {"train_accuracy": train, "valid_accuracy": valid, "threshold": t.noisy_gap}
    return [_found(history[-1], [], evidence, message, step=recent[1].step)]


@rule(
    "check that the training labels match the images (a shuffled list?); if they do, more data, "
    "augmentation or weight decay against memorisation.",
    thresholds=("generalisation_gap", "chance_margin"),
)
def no_generalisation(history: list[EpochSummary], t: Thresholds) -> list[Finding]:
    """The training accuracy is `generalisation_gap` above chance while the validation accuracy
    stays within `chance_margin` of it."""
    now = history[-1]
    classes = _classes(now)
    train = now.metrics.get("train_accuracy")
    valid = now.metrics.get("valid_accuracy")
    if not classes or not (finite(train) and finite(valid)):
        return []
    chance = 1 / classes
    if train < chance + t.generalisation_gap or valid > chance + t.chance_margin:
        return []
    message = f"the training accuracy reached {train:.1%} while the validation accuracy stays near "
    message += f"chance ({valid:.1%}; chance {chance:.1%}): what the model learns does not carry "
    message += "over "
    message += "to new images."
    evidence = {"train_accuracy": train, "valid_accuracy": valid, "chance": chance}
    return [_found(now, [], evidence, message)]


def _gap(summary: EpochSummary) -> float:
    return summary.metrics["train_accuracy"] - summary.metrics["valid_accuracy"]


@rule(
    "keep the best validation epoch (best.pt), and weight decay (--weight-decay), augmentation or "
    "more data.",
    thresholds=("overfit_gap", "overfit_rise", "overfit_epochs"),
    follows=("no_generalisation", "weights_growing"),
    ended="the validation loss came back near its best, so it was noise, not overfitting",
)
def overfitting(history: list[EpochSummary], t: Thresholds) -> list[Finding]:
    """For `overfit_epochs` epochs in a row the validation loss is `overfit_rise` above its best,
    and the train-valid accuracy gap is now `overfit_gap` and more above what it was then."""
    keys = ("valid_loss", "train_accuracy", "valid_accuracy")
    seen = [s for s in history if all(finite(s.metrics.get(k)) for k in keys)]
    if len(seen) < 2 or seen[-1] is not history[-1]:
        return []
    best = min(seen, key=lambda s: s.metrics["valid_loss"])
    now = seen[-1]
    loss = now.metrics["valid_loss"]
    best_loss = best.metrics["valid_loss"]
    gap = _gap(now)
    best_gap = _gap(best)
    if gap < max(best_gap, 0) + t.overfit_gap:
        return []
    recent = [s.metrics["valid_loss"] for s in seen[-t.overfit_epochs :]]
    if len(recent) < t.overfit_epochs or min(recent) < (1 + t.overfit_rise) * best_loss:
        return []
    message = f"since epoch {best.epoch + 1} the validation loss rose from {best_loss:.3g} to "
    message += f"{loss:.3g} and the gap between training and validation accuracy grew from "
    message += f"{best_gap:.1%} to {gap:.1%}: the model fits its training images at the expense of "
    message += "new ones."
    evidence = {"best_epoch": best.epoch, "valid_loss": loss, "gap": gap, "best_gap": best_gap}
    return [_found(now, [], evidence, message)]


def diagnose(
    history: list[EpochSummary | Mapping], thresholds: Thresholds | None = None
) -> list[Finding]:
    """Every rule on the latest epoch summary of `history` (oldest first; summaries or their dicts).
    Pure: nothing is logged."""
    thresholds = thresholds or Thresholds()
    history = [s if isinstance(s, EpochSummary) else EpochSummary.from_dict(s) for s in history]
    return [
        finding for declaration in RULES.values() for finding in declaration(history, thresholds)
    ]


def _order(finding: Finding) -> tuple:
    told = list(RULES)
    return (
        finding.step,
        finding.epoch,
        told.index(finding.rule) if finding.rule in told else len(told),
    )


def record(
    findings: list[Finding], new: list[Finding], epoch: int, rose: bool = False
) -> tuple[list[Finding], list[Finding]]:
    """The run's findings with epoch `epoch`'s `new` ones merged in, in the order they began, each
    linked to the earlier finding it follows from; and the findings that began this epoch, in the
    same order. `rose`: the loss rose above its start, so that no suggestion may raise the learning
    rate even without a finding that says so (in logs read without the monitor's summaries). Pure:
    the arguments are kept."""
    merged = {f.key: replace(f) for f in findings}
    begun = set()
    for finding in new:
        kept = merged.get(finding.key)
        if kept is None:
            merged[finding.key] = replace(finding)
            begun.add(finding.key)
            continue
        kept.last_epoch = max(kept.last_epoch, finding.last_epoch)
        retell = declared(finding.rule).retell
        if retell is not None:  # each finding of such a rule tells of new events
            kept.evidence = _counted(kept.evidence, finding.evidence)
            kept.message = retell(kept.evidence)
        kept.last_step = max(kept.last_step, finding.last_step)
        kept.harmless = kept.harmless and finding.harmless  # once it did harm, a warning
        kept.parameters = [
            *kept.parameters,
            *(p for p in finding.parameters if p not in kept.parameters),
        ]
    ordered = sorted(merged.values(), key=_order)
    _link(ordered, epoch, rose)
    return ordered, [f for f in ordered if f.key in begun]


def _counted(kept: dict, new: dict) -> dict:
    """The evidence of a repeating finding with a new one's added: the counts summed, the first
    SHOWN events kept."""
    spikes = [*kept.get("spikes", []), *new.get("spikes", [])][:SHOWN]
    return {**kept, "count": kept.get("count", 0) + new.get("count", 0), "spikes": spikes}


def _link(findings: list[Finding], epoch: int, rose: bool = False) -> None:
    """Causes, severities and suggestions of findings in the order they began: a finding that can
    follow from an earlier one does, and leaves the suggestion to it; no suggestion goes against the
    run's history."""
    diverged = rose or any(declared(f.rule).diverged for f in findings)
    direction = 0  # the first problem's, for the learning rate
    for i, finding in enumerate(findings):
        rule_ = declared(finding.rule)
        causes = [
            f
            for f in findings[:i]
            if (f.rule in rule_.follows or declared(f.rule).root)
            and f.severity != "note"
            and _related(f, finding)
        ]  # a note explains nothing that is a problem
        finding.cause = causes[0].id if causes else None
        ended = rule_.ended and finding.last_epoch < epoch
        note = (ended or finding.harmless) and not finding.cause
        finding.severity = "note" if note else "warning"
        if finding.cause:
            finding.suggestion = None
            continue
        way = rule_.way(finding)
        if way and (way == -direction or (way == RAISE and diverged)):
            finding.suggestion = rule_.instead
        elif way and not direction:
            direction = way


def _related(cause: Finding, effect: Finding) -> bool:
    """Whether `cause` can explain `effect`: a finding about the whole run explains any; otherwise
    they must share a layer (conv1 explains conv1.weight; fc3.bias[3], one class's output bias,
    explains fc3.bias)."""

    def layers(finding):
        return {
            p.split("[")[0].removesuffix(".weight").removesuffix(".bias")
            for p in finding.parameters
        }

    return not cause.parameters or not effect.parameters or bool(layers(cause) & layers(effect))


def _paragraph(root: Finding, chain: list[Finding], told_in_full: int) -> str:
    if root.severity == "note" and not root.harmless:
        after = f"step {root.last_step}" if root.unit == "steps" else f"epoch {root.last_epoch + 1}"
        ended = f"It ended after {after}: {declared(root.rule).ended}."
        return f"Note, {_when(root)}: {root.message} {ended}"
    if root.severity == "note":
        return f"Note, {_when(root)}: {root.message} If that matters: {root.suggestion}"
    text = [f"Problem, {_when(root)}: {root.message}"]
    text += [f"Then, {_when(f)}: {f.message}" for f in chain[:told_in_full]]
    later: dict[str, list[Finding]] = {}
    for finding in chain[told_in_full:]:
        later.setdefault(finding.rule, []).append(finding)
    if later:
        also = [
            f"{rule} ({_when(fs[0])}{f', and {len(fs) - 1} more' if len(fs) > 1 else ''})"
            for rule, fs in later.items()
        ]
        text.append(f"Then also: {', '.join(also)}.")
    return " ".join([*text, f"Try: {root.suggestion}"])


def story(findings: list[Finding], told_in_full: int = 2) -> str:
    """The run's findings told in the order they began, one paragraph per problem: what happened,
    what followed from it (the first `told_in_full` in full, the others by name), and what to try.
    """
    paragraphs = []
    for root in (f for f in findings if f.cause is None):
        causes = {root.id}  # the root and what follows from it, directly or not
        chain = []
        for finding in findings:
            if finding.cause in causes:
                causes.add(finding.id)
                chain.append(finding)
        paragraphs.append(_paragraph(root, chain, told_in_full))
    return "\n".join(paragraphs) or "No findings."


def indented(story: str, width: int = 116) -> str:
    """A story for the console: each paragraph wrapped to `width`, its first line indented two
    spaces, the rest four."""
    wrap = textwrap.TextWrapper(width, initial_indent="  ", subsequent_indent="    ")
    return "\n".join(wrap.fill(paragraph) for paragraph in story.splitlines())


def _when(finding: Finding) -> str:
    part = f"{finding.part}, " if finding.part else ""  # its own steps
    if finding.unit == "steps":  # a loop without epochs
        if finding.last_step > finding.step:
            return f"{part}steps {finding.step}-{finding.last_step}"
        return f"{part}step {finding.step}"
    epochs = f"epoch {finding.epoch + 1}"
    if finding.last_epoch > finding.epoch:
        epochs += f"-{finding.last_epoch + 1}"
    if finding.last_step > finding.step:  # the steps, named as a window of steps names them
        return f"{part}{epochs}, steps {finding.step}-{finding.last_step}"
    return f"{part}{epochs}, step {finding.step}"


def saved_findings(path: str, before_epoch: int | None) -> list[Finding]:
    """The findings of a diagnosis.json as they stood before epoch `before_epoch` (what a resumed
    run keeps of them); none if there is no such file, or no such epoch."""
    if before_epoch is None or not os.path.isfile(path):
        return []
    with open(path) as fh:
        saved = json.load(fh)
    if isinstance(saved, dict):  # {"facts", "findings"}; a list in earlier versions
        saved = saved.get("findings", [])
    findings = [Finding.from_json(item) for item in saved if item["epoch"] <= before_epoch]
    for finding in findings:
        finding.last_epoch = min(finding.last_epoch, before_epoch - 1)
    return findings


# What the rules keep of a run: at most MAX_HISTORY summaries, the first and the latest RECENT
# always, every other one of those between dropped whenever there are more (so that over a million
# steps the older windows thin out, and memory and state_dict() stay flat)
MAX_HISTORY = 128
RECENT = 32


def thinned(items: list, limit: int, recent: int) -> list:
    """`items` if there are at most `limit`; else the first, every other one of the middle, and the
    latest `recent`."""
    if len(items) <= limit:
        return items
    return [items[0], *items[1:-recent][1::2], *items[-recent:]]


class RunDiagnosis:
    """What the rules remember of a run: the statistics records since the last summary, the
    summaries so far (oldest first: one per finished epoch, or per window of steps in a loop that
    calls no epoch_end) and the findings so far."""

    def __init__(self, thresholds: Thresholds | None = None, findings: Iterable[Finding] = ()):
        if thresholds is not None and not isinstance(thresholds, Thresholds):
            kind = type(thresholds).__name__
            raise TypeError(f"thresholds must be a gradwatch.Thresholds, got {kind}")
        self.thresholds = thresholds or Thresholds()
        self.records: list[dict] = []
        self.jumps: list[dict] = []  # the readings since the last summary at which layers jumped
        self.history: list[EpochSummary] = []
        self.findings: list[Finding] = list(findings)
        # what the run is, as plain values for diagnosis.json: the model and optimizer ("model"),
        # the loss's graph and the first batch ("loss")
        self.facts: dict[str, Any] = {}
        self.told: set[tuple] = set()  # the keys of the findings an epoch_end has returned
        self.objective = ""  # given to watch(); "" to recognise it from the loss's graph
        self.part = ""  # the name of the model diagnosed, where one monitor watches several

    def next_epoch(self) -> int:
        """The epoch (window) after the last one summarised: where a resumed run begins again."""
        return self.history[-1].epoch + 1 if self.history else 0

    @property
    def has_epochs(self) -> bool:
        """Whether an epoch was summarised: from then on, the loop's epochs make the summaries."""
        return bool(self.history) and self.history[-1].unit == "epoch"

    def readings(self) -> int:
        """The statistics records taken since the last window of steps, past the first steps after
        watch() (with epochs, 0)."""
        if self.has_epochs:
            return 0
        since = self.history[-1].step if self.history else -1
        loops = [record["loop"] for record in self.records]
        return sum(loop["step"] > since and not loop.get("first") for loop in loops)

    def undiagnosed(self) -> bool:
        """Whether readings wait for a diagnosis: taken since the last window of steps, or, in a run
        not diagnosed yet, the first steps' (a run that stops early has their facts)."""
        return bool(self.readings() or not self.history and self.records)

    def keep(self, record: dict, limit: int) -> None:
        """Add a statistics record; past `limit` records, the older half thins out. Whether its
        layers jumped against the last summary is kept apart, for the first JUMP_READINGS."""
        settled = self.history and not record["loop"].get("first")  # no jump from a first step
        found = jumped(record, self.history[-1].layers) if settled else None
        if found and len(self.jumps) < JUMP_READINGS:
            self.jumps.append(found)
        self.records = thinned([*self.records, record], limit, limit // 2)

    def urgent(
        self, step: int, stats: Mapping[str, dict], losses: list[dict], first_loss: float | None
    ) -> list[Finding]:
        """What cannot wait for the epoch's end, from one statistics record and the latest loss
        windows: non-finite gradients, then a diverging or non-finite loss."""
        layers = {name: values for name, values in stats.items() if name not in EXTRA}
        since = self.history[-1].step if self.history else -1
        records = [r for r in self.records if r.get("loop", {}).get("step", 0) > since]
        now = EpochSummary(self.next_epoch(), step, layers=layers, losses=losses)
        now.first_loss = first_loss
        now.loop = self._with_graph(loop_summary(records))
        found = nonfinite_gradients([now], self.thresholds)
        found += diverging([*self.history, now], self.thresholds)  # from where the run started
        for declaration in (d for d in RULES.values() if d.exact):
            found += declaration([*self.history[-1:], now], self.thresholds)
        return self._named(found)

    def _with_graph(self, loop: dict[str, Any]) -> dict[str, Any]:
        """The loop facts of a summary, with the loss's graph as last read where none of its
        readings read it (the graph is read once, and stays what it was), and the objective: as
        given to watch(), or "other" where the graph shows a loss not made by known loss functions
        alone."""
        if not loop.get("graph") and self.facts.get("loss"):
            loop["graph"] = self.facts["loss"]
        made_of_losses = loop.get("graph", {}).get("made_of_losses")
        loop["objective"] = self.objective or ("other" if made_of_losses is False else "")
        self.facts["objective"] = loop["objective"] or "a loss to minimise"
        return loop

    def _named(self, findings: list[Finding]) -> list[Finding]:
        """`findings`, each named by the part diagnosed (if any)."""
        for finding in findings:
            finding.part = self.part
        return findings

    def untold(self) -> list[Finding]:
        """The findings no epoch_end has returned yet (also those a window of steps inside the
        epoch found first), in the order they began; they count as told from now on."""
        new = [f for f in self.findings if f.key not in self.told]
        self.told.update(f.key for f in new)
        return new

    def add(self, summary: EpochSummary, guard: Callable[[str], Any]) -> list[Finding]:
        """Summary `summary` added to the history; every rule, each under `guard`, on the history,
        and the findings merged into the run's. Returns the findings that began. The first epoch
        after windows of steps replaces them (their findings are kept, as found in that epoch)."""
        if summary.unit == "epoch" and self.history and not self.has_epochs:
            summary.first_loss = self.history[0].first_loss
            for finding in self.findings:
                finding.unit = "epoch"
                finding.epoch = finding.last_epoch = summary.epoch
            self.history = []
        summary.loop = self._with_graph(summary.loop)
        summary.loop.setdefault("jumps", self.jumps)
        self.jumps = []
        self.history = thinned([*self.history, summary], MAX_HISTORY, RECENT)
        found = []
        for declaration in RULES.values():
            with guard(f"the {declaration.name} rule"):
                found += declaration(self.history, self.thresholds)
        self.findings, begun = record(self.findings, self._named(found), summary.epoch)
        return begun

    def state_dict(self) -> dict[str, Any]:
        history = [summary.to_dict() for summary in self.history]
        findings = [finding.to_json() for finding in self.findings]
        state = {"history": history, "records": list(self.records), "findings": findings}
        return {**state, "jumps": list(self.jumps), "facts": dict(self.facts)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.history = [EpochSummary.from_dict(summary) for summary in state["history"]]
        self.records = list(state["records"])
        self.jumps = list(state.get("jumps", []))
        self.findings = [Finding.from_json(item) for item in state["findings"]]
        self.facts = {**dict(state.get("facts", {})), **self.facts}  # those read since watch() win
        self.told = {f.key for f in self.findings}
