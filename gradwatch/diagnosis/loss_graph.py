"""The rules that read the loss's own graph (graph.py): a softmax squashed before a loss that takes
scores, log-probabilities that are not, a loss broadcast across shapes that do not match, targets
out of range. Exact, each with the line of the call.
"""

from __future__ import annotations

import statistics

from ..summary import EpochSummary, finite
from .facts import _graph_step, _problem
from .findings import Finding, _found, rule
from .loop import SQUASHED_BY, _place
from .thresholds import Thresholds


@rule(
    "an activation (ReLU, GELU) after each hidden layer: without one, the layers compose into a "
    "single linear map, which more layers do not make more able to learn.",
    exact=True,
    root=True,
)
def linear_model(history: list[EpochSummary], t: Thresholds) -> list[Finding]:
    """Where the loss's graph was read with the model's outputs: two weight layers or more lie on
    one way below the outputs and every op there is linear (a layer's product and sum, average
    pooling, reshaping, dropout): the model computes one linear map of its inputs."""
    now = history[-1]
    problem = _problem(now, "linear_model")
    if problem is None:
        return []
    message = f"the model's graph stacks {problem['layers']} weight layers with no activation "
    message += "between them (only linear ops: products, sums, average pooling, reshapes): they "
    message += "compute one linear map of the inputs."
    return [_found(now, [], {"layers": problem["layers"]}, message, _graph_step(now, history))]


def _in_band(reading: dict) -> bool:
    """Whether the step's loss is what cross-entropy on these output rows can give."""
    loss = reading["loss"]
    margin = 0.02 * reading["ce_high"]
    return finite(loss) and reading["ce_low"] - margin <= loss <= reading["ce_high"] + margin


def _squashed_in_graph(now: EpochSummary, history: list[EpochSummary]) -> list[Finding]:
    """The graph's version of softmax_before_loss: exact, and with the line."""
    problem = _problem(now, "squashed")
    if problem is None:
        return []
    squash = problem["squash"]
    message = f"the loss's graph shows a {squash} applied to the scores{_place(problem)}, before "
    message += f"{problem['loss']}, which applies {SQUASHED_BY[squash]} itself: it learns from "
    message += f"{squash} outputs squashed twice, whose loss cannot fall far and whose gradients "
    message += "vanish as the model grows confident."
    what = "raw scores" if squash == "softmax" else "raw scores (logits)"
    suggestion = f"remove the {squash}{_place(problem)}: {problem['loss']} applies "
    suggestion += (
        f"{SQUASHED_BY[squash]} to {what} itself; apply {squash} only to show probabilities."
    )
    evidence = {key: problem.get(key) for key in ("squash", "loss", "line", "module")}
    return [_found(now, [], evidence, message, _graph_step(now, history), suggestion)]


@rule(
    "remove the softmax at the end of the model: nn.CrossEntropyLoss (F.cross_entropy) applies "
    "log-softmax to raw scores itself; apply softmax only to show probabilities.",
    exact=True,
    root=True,
)
def softmax_before_loss(history: list[EpochSummary], t: Thresholds) -> list[Finding]:
    """Where the loss's graph was read: a softmax (or sigmoid) between the scores and a loss that
    applies log-softmax (or a log-sigmoid) itself, told with the line. Elsewhere (logs read by
    `diagnose`): at every statistics step of the epoch, and of the run before it back to the first
    that says otherwise (two at least), the model's output rows are probabilities (in [0, 1],
    summing to 1) and the loss is what cross-entropy on those rows gives. It began at the first of
    those steps."""
    now = history[-1]
    if now.loop.get("graph", {}).get("losses"):
        return _squashed_in_graph(now, history)
    if not now.loop.get("outputs"):
        return []
    readings = []  # the latest run of such readings, newest first
    for reading in reversed([r for s in history for r in s.loop.get("outputs", [])]):
        if not (reading["probabilities"] and _in_band(reading)):
            break
        readings.append(reading)
    if len(readings) < 2 or len(readings) < len(now.loop["outputs"]):
        return []
    top = statistics.median(r["max_value"] for r in readings)
    low = statistics.median(r["ce_low"] for r in readings)
    message = "the model's outputs are probabilities (rows in [0, 1] summing to 1; mean top value "
    message += f"{top:.2f}) and the loss is cross-entropy on them, which cannot fall below about "
    message += f"{low:.2f} for such rows: a softmax before a loss that applies its own."
    evidence = {"max_value": top, "loss_floor": low, "readings": len(readings)}
    return [_found(now, [], evidence, message, step=readings[-1]["step"])]


@rule(
    "apply log_softmax to the scores before nll_loss (F.nll_loss(F.log_softmax(scores, dim=1), "
    "labels)), or give F.cross_entropy the raw scores.",
    exact=True,
    root=True,
)
def not_log_probabilities(history: list[EpochSummary], t: Thresholds) -> list[Finding]:
    """The loss's graph shows nll_loss fed raw scores (a layer's output) or probabilities, not
    log-probabilities: nll_loss only takes the target's value with a minus sign, so it pushes that
    value up without bound and the loss falls below zero."""
    now = history[-1]
    problem = _problem(now, "not_log_probabilities")
    if problem is None:
        return []
    line = f" at {problem['loss_line']}" if problem.get("loss_line") else ""
    message = f"the loss's graph shows nll_loss{line} fed {problem['fed']} (made by "
    message += f"{problem['made_by']}), not log-probabilities: nll_loss only takes minus the "
    message += "target's value, so it pushes that value up without bound."
    suggestion = f"apply log_softmax to the scores before nll_loss{line}, or give F.cross_entropy "
    suggestion += "the raw scores instead."
    evidence = {key: problem.get(key) for key in ("fed", "made_by", "loss_line")}
    return [_found(now, [], evidence, message, _graph_step(now, history), suggestion)]


@rule(
    "give the loss an input and a target of the same shape (output.squeeze(-1), or "
    "target.view_as(output)).",
    exact=True,
    root=True,
)
def loss_broadcast(history: list[EpochSummary], t: Thresholds) -> list[Finding]:
    """An elementwise loss (mse_loss, l1_loss, binary cross-entropy, ...) was given an input and a
    target of different shapes at the first step, and broadcast them: it compares every output
    with every target."""
    now = history[-1]
    p = _problem(now, "broadcast")
    if p is None:
        return []
    shapes = [tuple(p[key]) for key in ("input_shape", "target_shape", "broadcast_shape")]
    line = f" at {p['line']}" if p.get("line") else ""
    message = f"{p['loss']}{line} was given an input of shape {shapes[0]} and a target of shape "
    message += f"{shapes[1]}, and broadcast them to {shapes[2]}: it compares every output with "
    message += "every target, and the model learns their mean."
    suggestion = f"give {p['loss']}{line} an input and a target of one shape "
    suggestion += "(output.squeeze(-1), or target.view_as(output))."
    evidence = {"input_shape": shapes[0], "target_shape": shapes[1], "broadcast": shapes[2]}
    return [_found(now, [], evidence, message, _graph_step(now, history), suggestion)]


@rule(
    "binary cross-entropy takes targets in [0, 1]: check the labels (class indices of more than "
    "two classes need F.cross_entropy).",
    exact=True,
    root=True,
)
def target_range(history: list[EpochSummary], t: Thresholds) -> list[Finding]:
    """A binary cross-entropy was given targets outside [0, 1] at the first step: its loss has no
    lower bound there, and the scores are pushed without end."""
    now = history[-1]
    p = _problem(now, "target_range")
    if p is None:
        return []
    line = f" at {p['line']}" if p.get("line") else ""
    message = f"{p['loss']}{line} was given targets from {p['min']:g} to {p['max']:g}, outside "
    message += "[0, 1]: its loss has no lower bound there, and the scores are pushed without end."
    evidence = {"min": p["min"], "max": p["max"], "loss": p["loss"]}
    return [_found(now, [], evidence, message, _graph_step(now, history))]
