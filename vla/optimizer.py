"""The optimizer of a run: AdamW, linear warmup + cosine decay, global-norm clipping, no weight
decay on norms/biases/embeddings, frozen parameters, and an EMA of the trained weights.

Parameters are the model's pure dict ({"decoder": {"embedder": array, ...}}); a parameter's path
is its keys joined by "/" ("decoder/experts/0/q_einsum"). Freezing has one rule,
`trainable_mask`: when the model holds LoRA adapters (vla/models/lora.py) only they train, with
the parameters OptimizerSpec.also_train matches; OptimizerSpec.freeze's regexes (re.search over
paths) freeze more on top. A frozen parameter gets a zero update and no optimizer moments
(optax.multi_transform keeps AdamW's state for the trainable leaves only); the trainer
differentiates and averages (EMA) only the `select`ed trainable subtree, so frozen weights cost
neither a gradient nor an EMA copy. (With LoRA the EMA averages A and B each, so the merged EMA
weights are W + s avg(A) avg(B), not avg(W + s A B).)
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from vla.models import lora

Params = Any  # a pytree of arrays keyed by parameter name


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """A run's optimizer (configs/specs.py builds it from config.optimizer and total_steps)."""

    lr: float
    warmup_steps: int  # linear warmup, then cosine decay to lr * min_lr_ratio at total_steps
    min_lr_ratio: float
    b1: float
    b2: float
    eps: float
    weight_decay: float
    clip_norm: float
    ema_decay: float  # 0: no EMA
    grad_accum_steps: int  # microbatches per step
    freeze: tuple[str, ...]  # regexes over parameter paths
    total_steps: int
    also_train: tuple[str, ...] = ()  # with LoRA: regexes of non-adapter parameters that train too
    mu_dtype: str = ""  # AdamW's first moment ("": the parameters' dtype; the second keeps theirs)

# Scales and shifts (norms, biases) and lookup tables (token / position embeddings) are not
# weight-decayed. Decided by name, not ndim: scanned layers stack a norm's scale to [layers, width].
_NO_DECAY = re.compile(r"(norm|bias|scale|embed)")


def param_paths(params: Params) -> Params:
    """The tree of "a/b/c" path strings of a parameter tree."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: jax.tree_util.keystr(path, simple=True, separator="/"), params)


def decay_mask(params: Params) -> Params:
    """True where weight decay applies: matrices and kernels, judged by the parameter's own name."""
    return jax.tree.map(lambda p: not _NO_DECAY.search(p.rsplit("/", 1)[-1]), param_paths(params))


def trainable_mask(params: Params, freeze: Sequence[str], also_train: Sequence[str] = ()) -> Params:
    """True where a parameter trains: every one, or, when there are LoRA adapters, the adapters
    and the parameters an `also_train` pattern matches; less those a freeze pattern matches. A
    pattern matching no parameter is a config error."""
    paths = param_paths(params)
    all_paths = jax.tree.leaves(paths)
    for key, patterns in (("freeze", freeze), ("also_train", also_train)):
        for pattern in patterns:
            if not any(re.search(pattern, p) for p in all_paths):
                raise ValueError(f"config.optimizer.{key} pattern {pattern!r} matches no parameter; "
                                 f"paths look like {all_paths[:3]}")
    adapters_only = any(lora.is_adapter(p) for p in all_paths)
    trains = lambda p: not adapters_only or lora.is_adapter(p) or any(re.search(a, p) for a in also_train)
    return jax.tree.map(lambda p: trains(p) and not any(re.search(f, p) for f in freeze), paths)


def select(tree: dict, mask: dict) -> dict:
    """The subtree of a nested dict where mask (same structure, bool leaves) is True; emptied
    branches are dropped, so an all-True mask gives the tree itself (same structure)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            sub = select(value, mask[key])
            if sub:
                out[key] = sub
        elif mask[key]:
            out[key] = value
    return out


def overlay(tree: dict, subtree: dict) -> dict:
    """tree with the leaves of subtree (a `select`ion of a tree of its structure) in their place."""
    return {key: (overlay(value, subtree[key]) if isinstance(value, dict) else subtree[key])
            if key in subtree else value for key, value in tree.items()}


def learning_rate(spec: OptimizerSpec) -> optax.Schedule:
    """0 -> lr linearly over warmup_steps, then cosine to lr * min_lr_ratio at total_steps."""
    warmup = min(spec.warmup_steps, spec.total_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=spec.lr, warmup_steps=warmup,
        decay_steps=max(spec.total_steps, warmup + 1), end_value=spec.lr * spec.min_lr_ratio)


def make_optimizer(spec: OptimizerSpec, params: Params) -> optax.GradientTransformation:
    """AdamW with clipping over the trainable parameters (`trainable_mask`); frozen ones get zero
    updates and no moments. Takes and returns trees of the whole parameter structure."""
    adamw = optax.chain(
        optax.clip_by_global_norm(spec.clip_norm),
        optax.adamw(learning_rate(spec), b1=spec.b1, b2=spec.b2, eps=spec.eps,
                    weight_decay=spec.weight_decay, mask=decay_mask(params), mu_dtype=spec.mu_dtype or None))
    mask = trainable_mask(params, spec.freeze, spec.also_train)
    if all(jax.tree.leaves(mask)):
        return adamw
    labels = jax.tree.map(lambda t: "train" if t else "frozen", mask)
    return optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()}, labels)


def ema_update(ema: Params, params: Params, decay: float, step: jax.Array) -> Params:
    """One step of the exponential moving average of the (trainable) parameters. The decay ramps up as
    (1 + step) / (10 + step) until it reaches `decay`, so early evaluations of the EMA are not
    dominated by the random initialization."""
    d = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    return jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)
