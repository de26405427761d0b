"""Families of tensors that a person looks at together: a Mixture of Experts' experts, kept as
separate tensors (`layers.3.experts.17.w1.weight`), are one family per layer and matrix
(`layers.3.experts.*.w1.weight`). A family gets one chart per statistic (its members' mean, with
their spread and extremes) and one histogram of all its members' values, rather than hundreds of
each; the diagnosis still reads, and names, every member.

A family is the tensors whose names differ only in their innermost number, FAMILY_MIN of them or
more, all of one shape, where that number indexes parallel modules: it sits under another number
(a layer's index: `blocks.2.experts.5`) or in a container named for experts. A stack of layers
(`layers.11.attn.weight`) is never one: each layer is a depth of its own.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence

import torch

FAMILY_MIN = 8
# a family's histogram is one of all its members' values where they hold at most this many (a copy
# of them is made); a larger family's members, whose kernels take long beside their launch, get one
# each
JOINED_MAX = 1 << 24
EXPERTS = re.compile(r"expert", re.IGNORECASE)


def _family(name: str) -> str | None:
    """The family `name` would belong to (its innermost number made `*`), or None where that
    number does not index parallel modules."""
    parts = name.split(".")
    numbers = [i for i, part in enumerate(parts) if part.isdigit()]
    if not numbers:
        return None
    last = numbers[-1]
    parallel = len(numbers) > 1 or (last > 0 and EXPERTS.search(parts[last - 1]))
    return ".".join([*parts[:last], "*", *parts[last + 1 :]]) if parallel else None


def families(shapes: Iterable[tuple[str, Sequence[int]]]) -> dict[str, list[str]]:
    """{family: its members' names, in order} of the (name, shape) pairs given: the families of
    FAMILY_MIN tensors or more of one shape (where one name has several shapes, the first shape's
    members). Names in no family are left out."""
    found: dict[tuple, list[str]] = {}
    for name, shape in shapes:
        family = _family(name)
        if family is not None:
            found.setdefault((family, tuple(shape)), []).append(name)
    kept: dict[str, list[str]] = {}
    for (family, _), names in found.items():  # of two shapes under one name, the first
        if len(names) >= FAMILY_MIN and family not in kept:
            kept[family] = names
    return kept


def folded(
    columns: Mapping[str, Mapping[str, float]], members: Mapping[str, list[str]]
) -> dict[str, dict[str, float]]:
    """Statistics of every tensor, `{key: {name: value}}`, with each family's members replaced by
    their mean under the family's name and, beside it, `<family>/spread` (their standard
    deviation), `/min` and `/max`; non-finite values are left out of a family's figures."""
    member_of = {name: family for family, names in members.items() for name in names}
    return {key: _folded(values, members, member_of) for key, values in columns.items()}


def _folded(values: Mapping[str, float], members: Mapping[str, list[str]], member_of: dict) -> dict:
    kept = {name: value for name, value in values.items() if name not in member_of}
    for family, names in members.items():
        present = [values[name] for name in names if name in values]
        finite = [value for value in present if math.isfinite(value)]
        if not finite:
            continue
        mean = math.fsum(finite) / len(finite)  # fsum and a square root: statistics' are slower
        kept[family] = mean
        squares = math.fsum((value - mean) ** 2 for value in finite)
        kept[f"{family}/spread"] = math.sqrt(squares / len(finite))
        kept[f"{family}/min"] = min(finite)
        kept[f"{family}/max"] = max(finite)
    return kept


def outliers(values: Mapping[str, float], names: list[str], z: float = 3.5) -> list[str]:
    """The members of a family whose value lies `z` robust standard deviations (1.4826 MAD) or more
    from the family's median, farthest first."""
    present = {name: values[name] for name in names if math.isfinite(values.get(name, math.nan))}
    if len(present) < FAMILY_MIN:
        return []
    centre = statistics.median(present.values())
    spread = 1.4826 * statistics.median(abs(v - centre) for v in present.values())
    if spread <= 0:
        far = [name for name, v in present.items() if v != centre]
        return far if len(far) * 2 < len(present) else []
    far = {name: abs(v - centre) / spread for name, v in present.items()}
    return sorted((name for name, d in far.items() if d >= z), key=far.get, reverse=True)


def joined(
    tensors: Mapping[str, torch.Tensor], members: Mapping[str, list[str]]
) -> dict[str, torch.Tensor]:
    """The tutorial's tensors by tag (`<name>_data`, `<name>_grad`) with each family's joined:
    `<family>_data` and `<family>_grad` hold all its members' values (a member without a gradient
    adds none), for the families of at most JOINED_MAX values."""
    kept = dict(tensors)
    for family, names in members.items():
        if sum(kept[f"{name}_data"].numel() for name in names) > JOINED_MAX:
            continue
        for suffix in ("_data", "_grad"):
            parts = [kept.pop(name + suffix) for name in names if name + suffix in kept]
            if parts:
                kept[family + suffix] = torch.cat([part.detach().reshape(-1) for part in parts])
    return kept


def folded_flow(
    flow: tuple[list[str], list[float], list[float]], members: Mapping[str, list[str]]
) -> tuple[list[str], list[float], list[float]]:
    """The gradient flow (names, mean |grad|, max |grad|) with each family's members as one bar
    where its first member was: their mean of the mean (members are of one size), their max."""
    names, means, maxes = flow
    member_of = {name: family for family, names_ in members.items() for name in names_}
    bars: dict[str, tuple[list[float], list[float]]] = {}
    for name, mean, top in zip(names, means, maxes):
        bar = bars.setdefault(member_of.get(name, name), ([], []))
        bar[0].append(mean)
        bar[1].append(top)
    return (
        list(bars),
        [statistics.fmean(m) for m, _ in bars.values()],
        [max(t) for _, t in bars.values()],
    )


REPORTED = ("grad_norm", "update_ratio", "weight_norm")  # the statistics whose outliers are named


def report(layers: Mapping[str, Mapping[str, float]], members: Mapping[str, list[str]]) -> dict:
    """For diagnosis.json: each family's size and, by statistic of REPORTED, the members far from
    the others (outliers: an expert the router never picks gets no gradient and does not move)."""
    found = {}
    for family, names in members.items():
        far = {}
        for key in REPORTED:
            values = {name: layers.get(name, {}).get(key, math.nan) for name in names}
            far[key] = outliers(values, names)
        found[family] = {"members": len(names), "outliers": {k: v for k, v in far.items() if v}}
    return found
