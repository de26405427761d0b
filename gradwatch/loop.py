"""Exact facts about the training loop, read on statistics steps: what is in the optimizer, what got
a gradient, whether the model is in training mode, what the learning rate and weight decay are, and
what the model's output looks like. The loop rules of diagnosis.py read them before any threshold
on a statistic.

Pure functions of the model, its parameters, its optimizer and one output; the hooks that catch the
output and the gradients at the next backward pass are in hooks.py.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

from .stats import NamedParameters, learning_rate, weight_decay

MAX_ROWS = 1024  # the output rows read at a statistics step (images of a batch, or tokens)


def mode_matters(model: torch.nn.Module) -> bool:
    """Whether `model` behaves differently in training and eval mode: it has dropout (with p > 0)
    or BatchNorm."""
    return any(
        isinstance(m, _BatchNorm) or (isinstance(m, _DropoutNd) and m.p > 0)
        for m in model.modules()
    )


def loop_facts(
    model: torch.nn.Module, parameters: NamedParameters, optimizer: torch.optim.Optimizer | None
) -> dict[str, Any]:
    """What a statistics step can tell of the loop, as plain values: whether the model is in
    training mode and whether that matters, the trainable parameters (requires_grad) in no optimizer
    group and those without a gradient, the learning rate and the weight decay."""
    trainable = [(name, p) for name, p in parameters if p.requires_grad]
    facts = {
        "training": bool(model.training),
        "mode_matters": mode_matters(model),
        "trainable": len(trainable),
        "frozen": [name for name, p in parameters if not p.requires_grad],
        "no_gradient": [name for name, p in trainable if p.grad is None],
        "not_in_optimizer": [],
        "lr": learning_rate(optimizer),
        "weight_decay": weight_decay(optimizer),
    }
    if optimizer is not None:
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        facts["not_in_optimizer"] = [name for name, p in trainable if id(p) not in held]
    return facts


def logits(output: Any) -> torch.Tensor | None:
    """The class scores in a model's output: the output itself, its `logits` (Hugging Face), or
    its first element; None if they are not a tensor of at least two columns."""
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    output = getattr(output, "logits", output)
    if isinstance(output, dict):
        output = output.get("logits")
    ok = isinstance(output, torch.Tensor) and output.ndim >= 2 and output.shape[-1] >= 2
    return output if ok and output.is_floating_point() and output.numel() else None


@torch.no_grad()
def output_facts(scores: torch.Tensor) -> dict[str, torch.Tensor]:
    """What the rules read of one training output (rows of class scores), as 0-dim float tensors
    left on their device: whether every row is a probability distribution (values in [0, 1] summing
    to 1); the band in which cross-entropy on these rows must lie whatever the labels (its mean
    lowest and highest value per row); the mean largest value; and the share of rows whose top
    class is the batch's most common one."""
    rows = scores.detach().flatten(0, -2)[:MAX_ROWS].float()
    inside = ((rows >= -1e-6) & (rows <= 1 + 1e-6)).all()
    sums_to_one = ((rows.sum(-1) - 1).abs() < 1e-3).all()
    top, top_class = rows.max(-1)
    spread = rows.logsumexp(-1)
    modal = top_class.mode().values
    return {
        "probabilities": (inside & sums_to_one).float(),
        "ce_low": (spread - top).mean(),
        "ce_high": (spread - rows.min(-1).values).mean(),
        "max_value": top.mean(),
        "mode": modal.float(),
        "mode_share": (top_class == modal).float().mean(),
        "rows": torch.tensor(float(len(rows)), device=rows.device),
        "columns": torch.tensor(float(rows.shape[-1]), device=rows.device),
    }
