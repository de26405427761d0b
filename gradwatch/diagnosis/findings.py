"""What a rule is and what it finds: `Finding` (a symptom or a cause, with its numbers), `Cause` (a
candidate cause of a symptom and the check that proves it), `Rule` (a rule's declaration) and
`@rule`, which declares the function below it into `RULES`, in the order findings that begin at one
step are told.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

from ..summary import EpochSummary
from .facts import _fast_so_far, _peak_lr
from .thresholds import Thresholds


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
    # its rule found that the run does well anyway, or that a recipe's way (a slow start) is as
    # likely as a fault: a note
    harmless: bool = False
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
    at_end: bool = False  # it judges the run as a whole: read once more when the run ends (close())
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
        if "cause" in finding.evidence:  # a cause of its own: a claim on the rate where it is one
            return self.lr if named == "learning_rate" else 0
        return self.lr

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


def _fast_steps(history: list[EpochSummary], finding: Finding, t: Thresholds) -> dict | None:
    """Weights that moved by more than `update_fast` of their size per step at some summary so far:
    steps that large push a unit's inputs far out (where a ReLU stays at 0 and a sigmoid or tanh
    flattens) and carry the weights to where the gradients are steep; the learning rate's check."""
    fast = _fast_so_far(history, t)
    return {"update_ratio": fast} if fast else None


def _never(history: list[EpochSummary], finding: Finding, t: Thresholds) -> None:
    """A cause no statistic of the monitor shows: only to be looked at."""
    return None


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
