"""Saved states checked against a state of the same object before they are loaded: a checkpoint
that loads but holds values of other kinds (edited by hand, written by other code, another version)
is refused with one line naming the value, rather than failing steps later inside the loop."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch


def kind(value: Any) -> str:
    """The kind of a saved value, in words: a bool, an int, a number, a str, a dict, a list, a
    tensor, or its class."""
    kinds = ((bool, "a bool"), (int, "an int"), (float, "a number"), (str, "a str"))
    kinds += ((Mapping, "a dict"), ((list, tuple), "a list"), (torch.Tensor, "a tensor"))
    return next((words for types, words in kinds if isinstance(value, types)), type(value).__name__)


def state_problem(
    state: Any,
    like: Mapping[str, Any],
    name: str = "the state",
    required: Iterable[str] = (),
    strict: bool = True,
) -> str | None:
    """What is wrong with `state` against `like`, a state of the same object: a `required` key
    missing, or a value of another kind than `like`'s (nothing is asked of a key `like` holds None
    under; an int passes where a number was saved), a negative int; then the same within each dict,
    where None passes too and ints and numbers pass for each other (a value not known, a learning
    rate given as 1). None if nothing is wrong."""
    if not isinstance(state, Mapping):
        return f"{name} is {kind(state)}, not a dict"
    missing = [key for key in required if key not in state]
    if missing:
        return f"{name} lacks {', '.join(map(repr, missing))}"
    for key in like.keys() & state.keys():
        problem = _value_problem(f"{name}[{key!r}]", like[key], state[key], strict)
        if problem:
            return problem
    return None


def _value_problem(where: str, saved: Any, value: Any, strict: bool) -> str | None:
    """What is wrong with one value of a state (see state_problem), or None."""
    want = kind(saved)
    got = kind(value)
    numbers = {"a number", "an int"}
    lenient = not strict and (value is None or {want, got} <= numbers)
    if saved is None or lenient or (want, got) == ("a number", "an int"):
        return None
    if got != want:
        return f"{where} is {got} where {want} belongs"
    if strict and want == "an int" and value < 0:
        return f"{where} is {value}, below 0"
    return state_problem(value, saved, where, strict=False) if want == "a dict" else None


def items_problem(
    state: Mapping[str, Any],
    lists: Mapping[str, tuple[Iterable[str], Mapping[str, Any]]],
    name: str,
) -> str | None:
    """Which list of `state` named in `lists` ({key: (required keys, an item like those it holds)})
    holds an item that is not a dict, lacks a required key or holds a value of another kind than
    the item given (None if none does)."""
    for key, (required, like) in lists.items():
        for i, item in enumerate(state.get(key, [])):
            problem = state_problem(item, like, f"{name}[{key!r}][{i}]", required, False)
            if problem:
                return problem
    return None
