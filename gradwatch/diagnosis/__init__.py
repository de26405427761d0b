"""The diagnosis: rules that read a training run the way a practitioner reads its curves and
histograms, and the story they tell. Its files, read in this order, are its design:

- `thresholds.py`: the numbers the rules compare against, which users set by name.
- `findings.py`: `Finding`, `Cause` and `Rule`. Each rule is declared once, with `@rule(...)` above
  the function that checks it: the function is named after the rule, its docstring says when it
  fires, and the declaration holds everything the story needs (the suggestion, the thresholds it
  reads, the rules it can follow from, what its suggestion does to the learning rate, and for a
  symptom its candidate causes, each a check that returns its evidence or None).
- `facts.py`: the readings of a run that several rules share (levels of the loss, what an untrained
  model's loss is, whether the loss came down, the rate set).
- The rules, in the order findings that begin at the same step are told (`RULES`): first the exact
  facts of the loop (`loop.py`, `loss_graph.py`, `updates.py`, `replicas.py`), which are causes;
  then the symptoms (`start.py`, `loss.py`, `gradients.py`, `units.py`, `vanishing.py`, `speed.py`,
  `progress.py`, `validation.py`).
- `story.py`: `diagnose`, `record` (an epoch's findings merged into the run's, each linked to the
  earlier finding it follows from) and `story`.
- `run.py`: `RunDiagnosis`, what the monitor keeps of a run between epochs.

A check is a pure function of the epoch summaries so far (oldest first, see summary.py) that returns
findings about the latest one: the parameters or layers concerned, the evidence in numbers and a
message. A healthy run produces none. tests/test_rule_examples.py holds each rule's example runs:
those it must find, and those it must leave alone.
"""

# The rule modules register their rules in the order of telling as they are imported
from . import loop, loss_graph, updates, replicas  # noqa: F401, I001  (exact facts of the loop: causes)
from . import start, loss, gradients, units, vanishing, speed, progress, validation  # noqa: F401, I001
from .facts import METRIC_TAGS, NOT_MINIMISED, OBJECTIVES
from .findings import LOWER, RAISE, RULES, Cause, Finding, Rule, _found, declared, names, rule
from .gradients import nonfinite_gradients
from .loss import diverging
from .run import MAX_HISTORY, RECENT, RunDiagnosis, thinned
from .story import diagnose, indented, record, saved_findings, story
from .thresholds import Thresholds, threshold_override
from .validation import output_bias_skew

__all__ = [
    "LOWER",
    "MAX_HISTORY",
    "METRIC_TAGS",
    "NOT_MINIMISED",
    "OBJECTIVES",
    "RAISE",
    "RECENT",
    "RULES",
    "Cause",
    "Finding",
    "Rule",
    "RunDiagnosis",
    "Thresholds",
    "_found",
    "declared",
    "diagnose",
    "diverging",
    "indented",
    "names",
    "nonfinite_gradients",
    "output_bias_skew",
    "record",
    "rule",
    "saved_findings",
    "story",
    "thinned",
    "threshold_override",
]
