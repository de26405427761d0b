"""The loss's own graph, read at the first step: which loss function made the loss, what was applied
between the model's output and it, which watched parameters it reaches, and the lines of code that
did it.

After loss.backward() the graph keeps its nodes and their edges (only the tensors they saved are
freed), so walking back from `loss.grad_fn` costs no device work and no synchronisation. The lines,
and what the loss function was given, come from `CallLog`: a TorchFunctionMode active from the
model's first training forward pass to the optimizer step after it, which notes where each softmax,
sigmoid, log-softmax and loss function was called, by which module, and with which targets.

The facts are plain values (they go into diagnosis.json); the rules in diagnosis/ read
`problems`, each a bug the graph shows exactly.
"""

from __future__ import annotations

import collections
import math
import os
import statistics
import sys
from collections.abc import Iterable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from .histograms import to_host
from .shards import is_sharded
from .stats import HALF, NamedParameters

# Nodes that move, select, reshape or cast values without changing what they mean (a log-probability
# stays one): the walk from a loss to what fed it passes through them
KEEPS_MEANING = {
    "ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "TransposeBackward0",
    "TransposeBackward1", "TBackward0", "PermuteBackward0", "SqueezeBackward0", "SqueezeBackward1",
    "SqueezeBackward2", "UnsqueezeBackward0", "SliceBackward0", "SelectBackward0", "IndexBackward0",
    "IndexSelectBackward0", "GatherBackward0", "MaskedSelectBackward0", "CloneBackward0",
    "ToCopyBackward0", "AliasBackward0", "SplitBackward0", "SplitWithSizesBackward0",
    "UnbindBackward0", "NarrowBackward0", "AsStridedBackward0", "CatBackward0", "StackBackward0",
}  # fmt: skip
SQUASH = {"SoftmaxBackward0": "softmax", "SigmoidBackward0": "sigmoid"}
LOG_PROBABILITIES = {"LogSoftmaxBackward0", "LogBackward0", "LogSigmoidBackward0"}
# What makes raw scores: a layer's product or sum, an activation, a normalisation
RAW_SCORES = {
    "AddmmBackward0", "MmBackward0", "BmmBackward0", "ConvolutionBackward0", "AddBackward0",
    "ReluBackward0", "GeluBackward0", "NativeLayerNormBackward0", "NativeBatchNormBackward0",
    "EmbeddingBackward0", "TanhBackward0", "LinearBackward0",
}  # fmt: skip
# A layer's product of its input and its weights: where, without the model's outputs, a way from
# the loss enters the model
LAYER_PRODUCTS = {"AddmmBackward0", "MmBackward0", "BmmBackward0", "ConvolutionBackward0"}
# The ops that multiply what feeds them by a layer's weights
WEIGHT_PRODUCTS = LAYER_PRODUCTS | {"LinearBackward0"}
# Ops whose result is a linear function of what feeds them (a layer's product and sum, averaging,
# reshaping, padding, dropout's mask): a model made of these alone computes one linear map, however
# many layers it stacks. What is not here (an activation, max-pooling, a normalisation, a product
# of two inputs, a fused recurrent layer) counts as not linear.
LINEAR = KEEPS_MEANING | {
    "AddmmBackward0", "MmBackward0", "ConvolutionBackward0", "LinearBackward0", "AddBackward0",
    "SubBackward0", "NegBackward0", "ExpandBackward0", "AvgPool1DBackward0", "AvgPool2DBackward0",
    "AvgPool3DBackward0", "AdaptiveAvgPool1DBackward0", "AdaptiveAvgPool2DBackward0",
    "AdaptiveAvgPool3DBackward0", "MeanBackward0", "MeanBackward1", "SumBackward0", "SumBackward1",
    "ConstantPadNdBackward0", "NativeDropoutBackward0", "torch::autograd::AccumulateGrad",
}  # fmt: skip
# The losses the graph names by their node, and the loss function behind each
LOSS_NODES = {
    "NllLossBackward0": "nll_loss", "NllLoss2DBackward0": "nll_loss",
    "MseLossBackward0": "mse_loss", "L1LossBackward0": "l1_loss",
    "SmoothL1LossBackward0": "smooth_l1_loss",
    "HuberLossBackward0": "huber_loss", "BinaryCrossEntropyBackward0": "binary_cross_entropy",
    "BinaryCrossEntropyWithLogitsBackward0": "binary_cross_entropy_with_logits",
    "KlDivBackward0": "kl_div",
}  # fmt: skip
# The functions CallLog notes: the losses (by the name torch gives them) and what squashes scores
LOSS_FUNCTIONS = {
    "cross_entropy", "nll_loss", "mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss",
    "binary_cross_entropy", "binary_cross_entropy_with_logits", "kl_div",
}  # fmt: skip
NOTED = LOSS_FUNCTIONS | {"softmax", "sigmoid", "log_softmax", "log"}
ELEMENTWISE = {"mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss", "binary_cross_entropy",
               "binary_cross_entropy_with_logits"}  # fmt: skip
MAX_NODES = 200_000  # a walk stops there: larger graphs are told as not fully read
MAX_CALLS = 100_000  # torch calls CallLog looks at before it stops looking
HERE = (os.path.dirname(torch.__file__), os.path.dirname(__file__))


def user_frame(frame: Any) -> Any:
    """The innermost frame of `frame`'s stack that is not inside torch or this package: the user's
    line of code."""
    while frame is not None and frame.f_code.co_filename.startswith(HERE):
        frame = frame.f_back
    return frame


def where(frame: Any) -> str | None:
    """'file:line' of a frame, the file relative to the working folder where it lies under it."""
    if frame is None:
        return None
    path = frame.f_code.co_filename
    relative = os.path.relpath(path) if not path.startswith("<") else path
    return f"{path if relative.startswith('..') else relative}:{frame.f_lineno}"


def _module(frame: Any, modules: dict[int, str]) -> str | None:
    """The name of the innermost watched module whose forward() is on `frame`'s stack."""
    while frame is not None:
        if frame.f_code.co_name in ("forward", "_call_impl"):
            owner = frame.f_locals.get("self")
            if id(owner) in modules:
                return modules[id(owner)]
        frame = frame.f_back
    return None


def _tensor_facts(value: Any) -> dict[str, Any]:
    """Shape and dtype of a tensor, and its range (one synchronisation, once)."""
    if not isinstance(value, torch.Tensor):
        return {}
    facts = {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}
    if value.numel() and not value.is_complex() and not value.is_sparse:
        low, high = torch.aminmax(value.detach().float())  # note: a CPU-GPU sync point, once
        facts.update(min=low.item(), max=high.item())
    return facts


def _one_hot(target: Any) -> bool:
    """Whether `target` is rows of one-hot vectors: class labels written as a regression's target
    (one synchronisation, once)."""
    if not isinstance(target, torch.Tensor) or target.dim() != 2 or target.shape[1] < 2:
        return False
    if not target.is_floating_point() or not target.numel():
        return False
    values = target.detach()
    binary = ((values == 0) | (values == 1)).all() & (values.sum(1) == 1).all()
    return bool(binary)


class CallLog(TorchFunctionMode):
    """Where the functions of NOTED are called during the first training step: {id of the node their
    result's grad_fn is: {"function", "line", "module"}}, and for a loss function also the shapes of
    its input and target and the target's range. Every torch call goes through it while it is
    active, so it is active for one step only, and stops looking after MAX_CALLS calls."""

    def __init__(self, modules: dict[int, str]):
        super().__init__()
        self.modules = modules  # {id(module): name} of the watched model
        self.calls: dict[int, dict[str, Any]] = {}
        self.nodes: list[Any] = []  # the grad_fn nodes noted, kept alive until the walk
        self.seen = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        self.seen += 1
        name = getattr(func, "__name__", "")
        if name in NOTED and self.seen <= MAX_CALLS:
            try:
                self._note(name, result, args, kwargs or {})
            except Exception:  # a fact not noted; the user's call has its result
                pass
        return result

    def _note(self, name: str, result: Any, args: tuple, kwargs: dict) -> None:
        node = getattr(result, "grad_fn", None)
        if node is None:
            return
        frame = sys._getframe(2)
        call = {"function": name, "line": where(user_frame(frame))}
        call["module"] = _module(frame, self.modules)
        if name in LOSS_FUNCTIONS:
            given = [*args, *kwargs.values()]
            call["input"] = _tensor_facts(given[0] if given else None)
            target = kwargs.get("target", args[1] if len(args) > 1 else None)
            call["target"] = _tensor_facts(target)
            if name in ELEMENTWISE and _one_hot(target):
                call["target"]["one_hot"] = True
            call["reduction"] = kwargs.get("reduction", "mean")
        self.calls.setdefault(id(node), call)
        self.nodes.append(node)


def _walk(root: Any) -> tuple[list[Any], set[int], bool]:
    """Every node below `root`, the ids of the leaf tensors it reaches, and whether it was read
    whole (MAX_NODES)."""
    seen = {id(root)}
    order = [root]
    leaves = set()
    i = 0
    while i < len(order) and len(order) < MAX_NODES:
        node = order[i]
        i += 1
        variable = getattr(node, "variable", None)
        if variable is not None:
            leaves.add(id(variable))
        for child, _ in node.next_functions:
            if child is not None and id(child) not in seen:
                seen.add(id(child))
                order.append(child)
    return order, leaves, i == len(order)


# Nodes that hand a parameter to the op above them unchanged: a Linear's weight reaches its product
# through TBackward0, so the product is the weight's layer
HANDS_ON = {
    "TBackward0", "TransposeBackward0", "ViewBackward0", "PermuteBackward0", "ExpandBackward0",
    "UnsqueezeBackward0", "ToCopyBackward0", "AliasBackward0",
}  # fmt: skip
LOOKUPS = {"EmbeddingBackward0", "EmbeddingBagBackward0", "IndexSelectBackward0", "IndexBackward0"}


def _held(node: Any) -> Any:
    """The parameter (leaf tensor) `node` is, or hands on unchanged; None for any other node."""
    while node is not None:
        variable = getattr(node, "variable", None)
        if variable is not None:
            return variable
        if node.name() not in HANDS_ON or len(node.next_functions) != 1:
            return None
        node = node.next_functions[0][0]
    return None


BATCH_NORMS = {"NativeBatchNormBackward0", "CudnnBatchNormBackward0", "MiopenBatchNormBackward0"}


def _normalised_biases(node: Any) -> list[Any]:
    """Where `node` is a batch norm in training mode: the biases of the layer whose output it
    normalises, directly. It subtracts each channel's mean over the batch, and with it the bias:
    their gradient is zero but for rounding, and their steps round away by design."""
    if node.name() not in BATCH_NORMS or not getattr(node, "_saved_training", False):
        return []
    layer = node.next_functions[0][0] if node.next_functions else None
    if layer is None or layer.name() not in WEIGHT_PRODUCTS:
        return []
    held = [_held(child) for child, _ in layer.next_functions if child is not None]
    return [p for p in held if p is not None and p.dim() == 1]


def _multiplies(name: str) -> bool:
    """Whether an op of this name multiplies its input by the weights it takes (a layer's product,
    a fused recurrent layer's: MkldnnRnnLayerBackward0, CudnnRnnBackward0), where a weight's gain
    (see gains) is the scale it gives what it feeds."""
    return name in WEIGHT_PRODUCTS or "Rnn" in name


def _note_layer(node: Any, depth: int, held: Iterable, depths: dict, kinds: dict[str, set]) -> int:
    """Note the depth of the parameters `node` takes (`held`), and whether it looks them up or
    multiplies by them (`kinds`); return the depth of what feeds it: one more where it is a layer,
    an op that takes weights (a bias's addition, a norm's gain are part of one)."""
    held = [parameter for parameter in held if parameter is not None]
    for parameter in held:
        depths[id(parameter)] = min(depths.get(id(parameter), depth), depth)
        if node.name() in LOOKUPS:
            kinds["lookups"].add(id(parameter))
        if _multiplies(node.name()):
            kinds["multiplied"].add(id(parameter))
    return depth + any(parameter.dim() > 1 for parameter in held)


def layer_depths(root: Any) -> tuple[dict[int, int], dict[str, set[int]]]:
    """How deep below the loss each parameter's layer lies, {id(parameter): layers}: 0 for the
    layers nearest the loss (an output head; a model of two heads has two), 1 for the layers that
    feed them, and so on, the fewest on any way from the loss; and the ids of the parameters by
    how they are read: "lookups", by a lookup (an embedding), whose gradient is zero at the rows a
    batch did not look up; "multiplied", by a layer's product (see _multiplies), not added or
    looked up; "normalised", added by a layer a batch norm normalises (_normalised_biases). An op
    that takes weights is a layer: what feeds it lies one layer deeper."""
    depths: dict[int, int] = {}
    kinds: dict[str, set[int]] = {"lookups": set(), "multiplied": set(), "normalised": set()}
    best = {id(root): 0}
    queue = collections.deque([(root, 0)])
    while queue and len(best) < MAX_NODES:
        node, depth = queue.popleft()
        if best[id(node)] < depth:
            continue
        children = [child for child, _ in node.next_functions if child is not None]
        held = {child: _held(child) for child in children}
        below = _note_layer(node, depth, held.values(), depths, kinds)
        kinds["normalised"].update(id(p) for p in _normalised_biases(node))
        for child in children:
            if held[child] is None and best.get(id(child), math.inf) > below:
                best[id(child)] = below
                # 0-1 breadth-first: a way that crosses no layer is read first
                queue.appendleft((child, below)) if below == depth else queue.append((child, below))
    return depths, kinds


def stacked_linear(outputs: list[Any]) -> int:
    """How many weight layers (WEIGHT_PRODUCTS) lie on the longest way below the
    model's output nodes where every op below them is LINEAR; 0 where one is not, or where the
    graph is larger than MAX_NODES."""
    most: dict[int, int] = {}  # id(node): layers on the longest way below it, itself included
    todo = [(node, False) for node in outputs]
    while todo:
        node, ready = todo.pop()
        if id(node) in most and not ready:
            continue
        if node.name() not in LINEAR or len(most) >= MAX_NODES:
            return 0
        children = [child for child, _ in node.next_functions if child is not None]
        if not ready:
            todo.append((node, True))
            todo += [(child, False) for child in children if id(child) not in most]
            continue
        layer = node.name() in WEIGHT_PRODUCTS
        most[id(node)] = layer + max((most.get(id(child), 0) for child in children), default=0)
    return max((most.get(id(node), 0) for node in outputs), default=0)


@torch.no_grad()
def gains(parameters: Iterable[torch.Tensor]) -> dict[int, torch.Tensor]:
    """{id(weight): its gain} of the floating-point weight matrices and kernels among `parameters`:
    its RMS x the square root of its fan-in (its values per output), ||W|| / sqrt(outputs), as a
    0-dim tensor (no synchronisation; half precision summed in float32, one tensor at a time, so
    that no copy of the whole model is made). torch.nn's initialisations give 0.3 to 1.5 (Linear's
    default 0.58, Kaiming's for ReLU 1.41); weights drawn with a standard deviation of 1 give the
    square root of the fan-in."""
    found = {}
    for p in parameters:
        if p.dim() > 1 and p.numel() and p.is_floating_point() and not is_sharded(p):
            dtype = torch.float32 if p.dtype in HALF else None
            found[id(p)] = torch.linalg.vector_norm(p.detach(), dtype=dtype) / p.shape[0] ** 0.5
    return found


def weight_gains(
    weights: NamedParameters, known: dict[int, torch.Tensor] | None = None
) -> dict[str, float]:
    """{name: gain} of the weights given (see gains): from `known` (gains read earlier: before the
    first step) where it has them, else as they are now."""
    known = known or {}
    known = {**known, **gains(p for _, p in weights if id(p) not in known)}
    return to_host({name: known[id(p)] for name, p in weights if id(p) in known})


def largest_gain(
    weights: NamedParameters, known: dict[int, torch.Tensor] | None = None
) -> dict[str, Any] | None:
    """Of the weights given, the one of the largest gain, {"name", "gain"}; None without any weight
    matrix or kernel."""
    found = weight_gains(weights, known)
    return _largest(found)


def _largest(found: dict[str, float]) -> dict[str, Any] | None:
    if not found:
        return None
    top = max(found, key=found.get)
    return {"name": top, "gain": found[top]}


def made_of_losses(root: Any, outputs: set[int], losses: set[int] = frozenset()) -> bool:
    """Whether every way from the loss back to the model's outputs (or, where they are not known, to
    a layer's product) passes a loss function the graph names (LOSS_NODES) or one of `losses` (the
    ids of the nodes of loss functions torch writes as other ops: l1_loss is a mean of abs): a loss
    such as a policy gradient's (-log p x advantage) does not; terms on the parameters alone (an L2
    penalty) do not count."""
    seen = {id(root)}
    todo = [root]
    while todo and len(seen) < MAX_NODES:
        node = todo.pop()
        if node.name() in LOSS_NODES or id(node) in losses:  # also where the model returns its loss
            continue
        if id(node) in outputs or not outputs and node.name() in LAYER_PRODUCTS:
            return False
        for child, _ in node.next_functions:
            if child is not None and id(child) not in seen:
                seen.add(id(child))
                todo.append(child)
    return True


def _fed_by(node: Any, outputs: set[int]) -> list[Any]:
    """The chain below a loss node along its first input: the nodes that keep meaning, then the
    first that does not (or a model output); the walk goes on through a log-softmax."""
    chain = []
    node = node.next_functions[0][0] if node.next_functions else None
    while node is not None and len(chain) < 64:
        chain.append(node)
        keeps = node.name() in KEEPS_MEANING or node.name() == "LogSoftmaxBackward0"
        if id(node) in outputs or not keeps or not node.next_functions:
            break
        node = node.next_functions[0][0]
    return chain


def _problem(kind: str, loss: dict[str, Any], node: Any, calls: dict, **facts: Any) -> dict:
    """A problem the graph shows, with the line and module of the call that made `node`."""
    call = calls.get(id(node), {})
    found = {"kind": kind, "loss": loss["function"], "loss_line": loss.get("line")}
    return {**found, "line": call.get("line"), "module": call.get("module"), **facts}


def _squashed(loss: dict, chain: list[Any], calls: dict) -> list[dict]:
    """A softmax or sigmoid before a loss that applies log-softmax or log-sigmoid itself."""
    names = [n.name() for n in chain]
    applies = "LogSoftmaxBackward0" if loss["node"].startswith("NllLoss") else None
    if loss["node"] == "BinaryCrossEntropyWithLogitsBackward0":
        applies = "itself"
    if applies is None or applies != "itself" and applies not in names:
        return []
    after = chain[names.index(applies) + 1 :] if applies != "itself" else chain
    squash = next((n for n in after if n.name() in SQUASH), None)
    if squash is None or any(n.name() not in KEEPS_MEANING for n in after[: after.index(squash)]):
        return []
    return [_problem("squashed", loss, squash, calls, squash=SQUASH[squash.name()])]


def _not_log_probabilities(loss: dict, chain: list[Any], calls: dict) -> list[dict]:
    """nll_loss fed raw scores or probabilities, not log-probabilities: it then only pushes the
    target's value up, without bound."""
    fed = next((n for n in chain if n.name() not in KEEPS_MEANING), None)
    if loss["function"] != "nll_loss" or fed is None:
        return []
    if fed.name() in LOG_PROBABILITIES or fed.name() not in RAW_SCORES | set(SQUASH):
        return []
    what = SQUASH.get(fed.name(), "raw scores")
    return [_problem("not_log_probabilities", loss, fed, calls, fed=what, made_by=fed.name())]


def _broadcast(loss: dict) -> list[dict]:
    """An elementwise loss given an input and a target of different shapes, which it broadcast:
    every output compared with every target."""
    shapes = [loss.get(key, {}).get("shape") for key in ("input", "target")]
    if loss["function"] not in ELEMENTWISE or None in shapes or shapes[0] == shapes[1]:
        return []
    try:
        both = list(torch.broadcast_shapes(*shapes))
    except RuntimeError:
        return []
    found = {"kind": "broadcast", "loss": loss["function"], "line": loss.get("line")}
    return [{**found, "loss_line": loss.get("line"), "module": None, "input_shape": shapes[0],
             "target_shape": shapes[1], "broadcast_shape": both}]  # fmt: skip


def _one_hot_targets(loss: dict) -> list[dict]:
    """A regression loss (MSE, L1) between the model's scores and one-hot class labels."""
    if not loss.get("target", {}).get("one_hot"):
        return []
    found = {"kind": "one_hot_targets", "loss": loss["function"], "line": loss.get("line")}
    return [{**found, "loss_line": loss.get("line"), "module": None,
             "classes": loss["target"]["shape"][1]}]  # fmt: skip


def _target_range(loss: dict) -> list[dict]:
    """A binary cross-entropy given targets outside [0, 1]: its loss then has no lower bound."""
    target = loss.get("target", {})
    if not loss["function"].startswith("binary_cross_entropy") or "min" not in target:
        return []
    if 0 <= target["min"] and target["max"] <= 1:
        return []
    found = {"kind": "target_range", "loss": loss["function"], "line": loss.get("line")}
    return [{**found, "loss_line": loss.get("line"), "module": None, "min": target["min"],
             "max": target["max"]}]  # fmt: skip


def _losses(nodes: list[Any], calls: dict) -> list[dict[str, Any]]:
    """The loss functions in the graph, topmost first: by their node, or by the call CallLog saw
    make it, with what it saw of that call (cross_entropy is log-softmax then nll_loss: its call
    names it; l1_loss is abs then mean: only its call does)."""
    found = []
    for node in nodes:
        name = node.name()
        call = calls.get(id(node), {})
        if name in LOSS_NODES or call.get("function") in LOSS_FUNCTIONS:
            loss = {"function": call.get("function") or LOSS_NODES[name], "node": name}
            loss.update({key: call[key] for key in ("line", "input", "target") if key in call})
            found.append((node, loss))
    return found


def _read_losses(nodes: list[Any], outputs: set[int], calls: dict) -> tuple[list, list, set[int]]:
    """The loss functions among `nodes`, each with the functions the user called between it and the
    model's output ("between") and whether it reaches that output; the problems they show; the ids
    of their nodes."""
    losses = []
    problems = []
    found_losses = _losses(nodes, calls)
    for node, found in found_losses:
        chain = _fed_by(node, outputs)
        between = [calls[id(n)]["function"] for n in chain if id(n) in calls]  # called by the user
        from_output = bool(chain) and id(chain[-1]) in outputs
        losses.append({**found, "between": between, "from_output": from_output})
        for check in (_squashed, _not_log_probabilities):
            problems += check(found, chain, calls)
        problems += _broadcast(found) + _target_range(found) + _one_hot_targets(found)
    return losses, problems, {id(node) for node, _ in found_losses}


# The facts of the loss's graph that name the parameters layer_depths finds of a kind
KIND_FACTS = (("lookups", "lookups"), ("normalised_biases", "normalised"))


def loss_graph(
    loss: torch.Tensor,
    parameters: NamedParameters,
    outputs: Iterable[Any] = (),
    calls: dict[int, dict] | None = None,
    others: dict[str, set[int]] | None = None,
    known_gains: dict[int, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """What the loss's graph shows, as plain values: {"losses": the loss functions in it, each with
    its line, input and target where CallLog saw them, and the ops between it and the model's
    output; "reached": how many of `parameters` it reaches; "unreached": the trainable ones it does
    not; "whole": whether the walk read it all; "made_of_losses"; "problems": the bugs it shows;
    "depths", "lookups", "normalised_biases" (layer_depths); _gain_facts, from `known_gains` where
    given}. `outputs`: the grad_fn nodes of the model's outputs in that step; `others`: {name: ids
    of its parameters} of the loop's other models, named in "reaches_parts" where the loss reaches
    them (a GAN's generator loss, through the discriminator). {} for a loss without a graph."""
    root = getattr(loss, "grad_fn", None)
    if root is None:
        return {}
    nodes, leaves, whole = _walk(root)
    outputs = {id(node) for node in outputs if node is not None}
    losses, problems, loss_nodes = _read_losses(nodes, outputs, calls or {})
    if (layers := stacked_linear([node for node in nodes if id(node) in outputs])) >= 2:
        problems.append({"kind": "linear_model", "layers": layers})  # one linear map
    unreached = [name for name, p in parameters if p.requires_grad and id(p) not in leaves]
    depths, kinds = layer_depths(root)
    weights = [(n, p) for n, p in parameters if id(p) in kinds["multiplied"]]  # gains: of products
    return {
        "losses": losses,
        "made_of_losses": made_of_losses(root, outputs, loss_nodes),
        "reaches_parts": [name for name, ids in (others or {}).items() if ids & leaves],
        "reached": sum(id(p) in leaves for _, p in parameters),
        "unreached": unreached if whole else [],
        "whole": whole,
        "nodes": len(nodes),
        "problems": problems,
        "depths": {n: depths[id(p)] for n, p in parameters if id(p) in depths and p.dim() > 1},
        **{key: [n for n, p in parameters if id(p) in kinds[kind]] for key, kind in KIND_FACTS},
        **_gain_facts(weight_gains(weights, known_gains)),
    }


def _gain_facts(found: dict[str, float]) -> dict[str, Any]:
    """ "largest_gain" (see largest_gain), "median_gain" (over the weights), and "zero_weights": the
    weight matrices and kernels all of whose values were 0 (before the first step, where read
    then): every unit they feed computes the same, and gets the same gradient, so no step tells
    them apart."""
    zero = [name for name, gain in found.items() if gain == 0]
    median = statistics.median(found.values()) if found else None
    return {"largest_gain": _largest(found), "zero_weights": zero, "median_gain": median}


def output_nodes(output: Any) -> list[Any]:
    """The grad_fn nodes of the tensors in a model's output (a tensor, a tuple, list or dict of
    them, or a Hugging Face ModelOutput)."""
    if isinstance(output, torch.Tensor):
        return [output.grad_fn] if output.grad_fn is not None else []
    if isinstance(output, dict) or hasattr(output, "values") and callable(output.values):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        return [node for item in output[:16] for node in output_nodes(item)]
    return []


class FirstStep:
    """The graph of the loss of the first training step after watch(): `CallLog` active from the
    model's first training forward pass to the optimizer step after it (not in a compiled model,
    whose graph would be traced with it), and the grad_fn nodes of the model's outputs meanwhile,
    where the walk from the loss stops."""

    def __init__(self):
        self.armed = False
        self.log: CallLog | None = None  # while it is on torch's stack
        self.calls: dict[int, dict] = {}
        self.outputs: list[Any] = []
        self.others: dict[str, set[int]] = {}  # the other models of the loop: their parameters
        self.inputs: list[dict[str, Any]] = []  # the first training batch as the model took it
        self.gains: dict[int, torch.Tensor] = {}  # the weights' gains before the first step
        # the loss with its graph, where step() is given it detached (by the framework callbacks)
        self.given: Any = None

    def arm(self) -> None:
        """Read the next training step."""
        self.armed = True
        self.calls = {}
        self.outputs = []
        self.inputs = []
        self.gains = {}

    def begin(self, model: torch.nn.Module, inputs: tuple = ()) -> None:
        """At a forward pass: note the batch, and start noting calls, if armed and not begun, in
        training mode."""
        if self.armed and not self.inputs and model.training:
            self.inputs = [_tensor_facts(x) for x in inputs[:4] if isinstance(x, torch.Tensor)]
        if self.armed and not self.gains and model.training:
            self.gains = gains(model.parameters())
        if self.armed and self.log is None and not self.calls and model.training:
            self.log = CallLog({id(m): name for name, m in model.named_modules()})
            self.calls = self.log.calls
            self.log.__enter__()

    def output(self, output: Any) -> None:
        if self.armed:
            self.outputs += output_nodes(output)

    def end(self) -> None:
        """Stop noting calls: the mode leaves torch's stack where it is on top (in the thread that
        began it); elsewhere it stops looking, and leaves at a later end()."""
        log = self.log
        if log is None:
            return
        log.seen = MAX_CALLS
        stack = torch._C._len_torch_function_stack()
        if stack and torch._C._get_function_stack_at(stack - 1) is log:
            log.__exit__(None, None, None)
            self.log = None

    def take(self, loss: Any, parameters: NamedParameters) -> dict[str, Any]:
        """The loss graph's facts (loss_graph), with the calls noted; the step is then read. A loss
        without a graph is read from `given`, where a callback gave it."""
        self.end()
        if getattr(loss, "grad_fn", None) is None:
            loss = self.given
        self.given = None
        graph = (loss, parameters, self.outputs, self.calls, self.others, self.gains)
        facts = loss_graph(*graph) if self.armed else {}
        if facts:
            facts["inputs"] = self.inputs
        self.armed = False
        self.calls = {}
        self.outputs = []
        if self.log is not None:  # still on the stack: let go of what it noted
            self.log.nodes = []
        return facts
