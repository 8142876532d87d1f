"""Sweep building blocks for a config file's `sweep()`: lists of override sets.

An override set maps dotted config keys to values ({"knobs.control_hz": 10}). An axis is a list
of override sets; a dict {key: [values]} is the axis of one key, or of several keys at once:

    from configs.grid import product, zipped
    def sweep():
        return product(zipped({"knobs.vit": ["tiny/8", "mu/8"], "knobs.vlm": ["gemma_tiny", "gemma_small"]}),
                       {"knobs.context_frames": [1, 2]})

`product` takes every combination (the first argument varies slowest); `zipped` pairs the i-th
values of its arguments, which must be equally long. `informative_keys` says which keys of a
sweep tell its runs apart (launch.sweep names runs by them, launch.summary plots against them).
"""
from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

Overrides = dict[str, Any]
Axis = Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]]


def _axes(args: Sequence[Axis], combine) -> list[list[Overrides]]:
    """Each argument as a list of override sets; a dict of several keys is combined first."""
    out = []
    for arg in args:
        if isinstance(arg, Mapping):
            per_key = []
            for key, values in arg.items():
                if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
                    raise TypeError(f"sweep values of {key!r} must be a list, got {values!r}")
                per_key.append([{key: v} for v in values])
            out.append(combine(*per_key) if len(per_key) > 1 else per_key[0] if per_key else [{}])
        else:
            out.append([dict(o) for o in arg])
    return out


def _merge(sets: Sequence[Mapping[str, Any]]) -> Overrides:
    merged: Overrides = {}
    for overrides in sets:
        both = set(merged) & set(overrides)
        if both:
            raise ValueError(f"sweep keys {sorted(both)} are set by more than one axis")
        merged.update(overrides)
    return merged


def product(*axes: Axis) -> list[Overrides]:
    """Every combination of the axes' override sets, the first axis varying slowest."""
    return [_merge(combo) for combo in itertools.product(*_axes(axes, product))]


def zipped(*axes: Axis) -> list[Overrides]:
    """The i-th override sets of all axes merged, for each i; the axes must be equally long."""
    lists = _axes(axes, zipped)
    if len({len(a) for a in lists}) > 1:
        raise ValueError(f"zipped axes differ in length: {[len(a) for a in lists]}")
    return [_merge(sets) for sets in zip(*lists)]


def _one_to_one(sets: Sequence[Mapping[str, Any]], a: str, b: str) -> bool:
    """Whether b's value follows from a's and vice versa in every set (zipped keys)."""
    forward, backward = {}, {}
    for s in sets:
        if (a in s) != (b in s):
            return False
        if a in s:
            va, vb = repr(s[a]), repr(s[b])
            if forward.setdefault(va, vb) != vb or backward.setdefault(vb, va) != va:
                return False
    return True


def informative_keys(sets: Sequence[Mapping[str, Any]]) -> list[str]:
    """The sets' keys, less those in one-to-one correspondence with an earlier key (zipped with
    it: they tell nothing more about a run)."""
    keys = list(dict.fromkeys(k for s in sets for k in s))
    return [k for i, k in enumerate(keys) if not any(_one_to_one(sets, e, k) for e in keys[:i])]
