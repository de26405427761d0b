"""From findings to a story: `diagnose` runs every rule on a history, `record` merges an epoch's
findings into the run's and links each to the earlier finding it follows from, `story` tells them in
the order they began, one paragraph per problem, and `saved_findings` reads them back from
diagnosis.json.
"""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Mapping
from dataclasses import replace

from ..summary import EpochSummary
from .findings import RAISE, RULES, Finding, _when, declared
from .loss import SHOWN
from .thresholds import Thresholds


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
