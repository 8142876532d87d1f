"""Low-rank adapters (LoRA) on the attention and MLP projections of chosen decoder experts.

Config (configs/base.py, model.*): lora_rank r (0 = off), lora_alpha, lora_targets: regexes
(re.search) over the LoRA-capable weight paths "decoder/experts/<e>/<name>", name one of
EXPERT_WEIGHTS, e.g. "decoder/experts/1/(q_einsum|kv_einsum|attn_vec_einsum|gating_einsum|linear)".

Factorization. A weight W maps input dims to output dims; its adapter is W + s * A @ B with
A [inputs, r] and B [r, outputs], one pair per layer (stacked on the leading "layers" axis and
scanned with the layer). The fused pairs of a Gemma weight (kv_einsum's K/V, gating_einsum's
gate/up, the leading axis "c") are kept apart, one adapter each, as with peft on Hugging Face's
separate k_proj/v_proj and gate_proj/up_proj; heads are output (q, kv) or input (attn_vec) dims
of one matrix, as there:

    q_einsum        [L, N, W, D]     A [L, W, r]        B [L, r, N, D]
    kv_einsum       [L, 2, K, W, D]  A [L, 2, W, r]     B [L, 2, r, K, D]
    attn_vec_einsum [L, N, D, W]     A [L, N, D, r]     B [L, r, W]
    gating_einsum   [L, 2, W, M]     A [L, 2, W, r]     B [L, 2, r, M]
    linear          [L, M, W]        A [L, M, r]        B [L, r, W]

Adapters carry the base weight's logical names for their input/output dims and "lora_rank"
(replicated: vla/sharding.py) for r. Scaling s = alpha / r (the original LoRA, not rsLoRA's
alpha / sqrt(r); for that set alpha = a * sqrt(r)). A is LeCun-normal over its input dims, B is
zero, so a fresh adapter changes nothing. Names: "<weight>_lora_a", "<weight>_lora_b" beside the
weight ("decoder/experts/1/q_einsum_lora_a"); `is_adapter` tells them apart.

Where applied: on the activations, y = x W + s (x A) B, inside the scanned layer body; not as
W + s A B. On π0 (gemma_2b layers: 110M weights, W 2048, M 16384; r 16 on all five) the merged
form costs 2 r * 110M = 3.5 GFLOP per layer per step whatever the batch (cheap), but its
backward runs through dW' = x^T dy, the full weight gradient (2 T * 110M FLOPs per layer for
T tokens, one third of a full fine-tuning step) and a weight-sized fp32 buffer per layer
(440 MB), recomputed under remat: exactly what freezing the base should save. On activations
the adapters add 2 T * r * sum(inputs + outputs) = 2 T * 1.1M FLOPs per layer forward (1% of the
layer) and about twice that backward, hold [tokens, r] activations, and the frozen base weights
are never differentiated (vla/train.py takes the gradient of the trainable parameters only).
Inference pays nothing either way: the bundle holds merged weights (`merge_lora`).

Training: with adapters in the model, only adapters train (vla/optimizer.trainable_mask, with
optimizer.also_train naming others that train too (openpi trains the ViT and the projections), and
optimizer.freeze on top); the base weights get neither moments nor an EMA copy.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
from flax import nnx

from vla.models import layers as L

A_SUFFIX, B_SUFFIX = "_lora_a", "_lora_b"
_ADAPTER = re.compile(f"({A_SUFFIX}|{B_SUFFIX})$")
_RANK = "r"  # the rank's letter in the adapter einsums (no weight uses it)
_ADAPTER_STREAM = 0x10A  # folded into the params key (plus the expert index) for adapter init


@dataclasses.dataclass(frozen=True)
class Factorization:
    """How one layer's weight splits into A [batch, inputs, r] and B [batch, r, outputs]; dims
    are einsum letters of the weight (e.g. "ckwd"), outputs the ones in neither batch nor inputs."""

    weight: str
    batch: str
    inputs: str

    @property
    def outputs(self) -> str:
        return "".join(c for c in self.weight if c not in self.batch + self.inputs)

    @property
    def a(self) -> str:
        return self.batch + self.inputs + _RANK

    @property
    def b(self) -> str:
        return self.batch + _RANK + self.outputs


# The expert weights (vla/models/gemma.py's layout without the layers axis) an adapter can target.
EXPERT_WEIGHTS = {
    "q_einsum": Factorization("nwd", "", "w"),
    "kv_einsum": Factorization("ckwd", "c", "w"),
    "attn_vec_einsum": Factorization("ndw", "", "nd"),
    "gating_einsum": Factorization("cwm", "c", "w"),
    "linear": Factorization("mw", "", "m"),
}


@dataclasses.dataclass(frozen=True)
class LoRASpec:
    """The adapters of one expert: rank, alpha and which of EXPERT_WEIGHTS carry one."""

    rank: int
    alpha: float
    weights: frozenset[str]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def is_adapter(path: str) -> bool:
    """Whether a parameter path ("decoder/experts/1/q_einsum_lora_a") names an adapter."""
    return bool(_ADAPTER.search(path))


def capable_paths(num_experts: int) -> list[str]:
    """The paths lora_targets patterns are matched against."""
    return [f"decoder/experts/{e}/{name}" for e in range(num_experts) for name in EXPERT_WEIGHTS]


def expert_specs(rank: int, alpha: float, targets: Sequence[str], num_experts: int
                 ) -> tuple[LoRASpec | None, ...]:
    """Per expert, its adapters (None: none), from the model config; raises ValueError naming the
    config key for a negative rank, a rank without targets (or targets without a rank), a
    non-positive alpha or a pattern that matches no LoRA-capable weight."""
    if rank < 0:
        raise ValueError(f"config.model.lora_rank must be >= 0 (0 = no LoRA), got {rank}")
    if bool(rank) != bool(targets):
        raise ValueError(f"config.model.lora_rank={rank} with lora_targets={tuple(targets)}: LoRA needs "
                         f"both a rank > 0 and target patterns (or neither)")
    if not rank:
        return (None,) * num_experts
    if alpha <= 0:
        raise ValueError(f"config.model.lora_alpha must be positive, got {alpha}")
    paths = capable_paths(num_experts)
    for pattern in targets:
        if not any(re.search(pattern, p) for p in paths):
            raise ValueError(f"config.model.lora_targets pattern {pattern!r} matches no LoRA-capable "
                             f"weight; valid paths: {paths}")
    chosen = [p for p in paths if any(re.search(t, p) for t in targets)]
    specs = []
    for e in range(num_experts):
        names = frozenset(p.rsplit("/", 1)[1] for p in chosen if p.startswith(f"decoder/experts/{e}/"))
        specs.append(LoRASpec(rank, float(alpha), names) if names else None)
    return tuple(specs)


def adapter_rngs(rngs: nnx.Rngs, expert: int) -> nnx.Rngs:
    """The stream one expert's adapters are initialized from: derived from rngs' params key
    without drawing from it, so every base weight initializes the same with LoRA on or off."""
    return nnx.Rngs(jax.random.fold_in(rngs.params.key[...], _ADAPTER_STREAM + expert))


def init_adapter(rngs: nnx.Rngs, f: Factorization, shape: Sequence[int], names: Sequence[str | None],
                 rank: int, dtype) -> tuple[nnx.Param, nnx.Param]:
    """(A, B) for a stacked weight of `shape` [layers, *f.weight dims] and logical `names`."""
    dim = dict(zip(f.weight, zip(shape[1:], names[1:])))  # letter -> (size, logical name)
    rank_dim = (rank, "lora_rank")
    a_dims = [dim[c] for c in f.batch + f.inputs] + [rank_dim]
    b_dims = [dim[c] for c in f.batch] + [rank_dim] + [dim[c] for c in f.outputs]
    fan_in = list(range(1 + len(f.batch), 1 + len(f.batch) + len(f.inputs)))
    make = lambda init, dims: L.param(rngs, init, (shape[0], *(s for s, _ in dims)),
                                      ("layers", *(n for _, n in dims)), dtype)
    return make(L.fan_in_init(fan_in), a_dims), make(L.zeros, b_dims)


def _adapter_equations(eq: str, f: Factorization) -> tuple[str, str]:
    """The two einsums of x -> (x A) B for the base einsum `eq` ("x,weight->out")."""
    operands, out = eq.split("->")
    x, weight = operands.split(",")
    if weight != f.weight or _RANK in eq:
        raise ValueError(f"einsum {eq!r} does not apply a {f.weight!r} weight")
    low = "".join(c for c in out if c not in f.outputs) + _RANK
    return f"{x},{f.a}->{low}", f"{low},{f.b}->{out}"


def project(eq: str, x: jax.Array, p: dict[str, jax.Array], name: str, scale: float | None,
            dtype) -> jax.Array:
    """einsum(eq, x, p[name]) plus, when p holds the weight's adapter, scale * (x A) B.

    p: one layer's parameters; the scale multiplies the rank-r intermediate (the smallest)."""
    y = jnp.einsum(eq, x, p[name].astype(dtype))
    if name + A_SUFFIX not in p:
        return y
    eq_a, eq_b = _adapter_equations(eq, EXPERT_WEIGHTS[name])
    low = jnp.einsum(eq_a, x, p[name + A_SUFFIX].astype(dtype)) * jnp.asarray(scale, dtype)
    return y + jnp.einsum(eq_b, low, p[name + B_SUFFIX].astype(dtype))


def delta(f: Factorization, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """s * A @ B laid out like the stacked weight [layers, *f.weight dims], in fp32."""
    return scale * jnp.einsum(f"l{f.a},l{f.b}->l{f.weight}", a.astype(jnp.float32), b.astype(jnp.float32),
                              precision=jax.lax.Precision.HIGHEST)


Config = TypeVar("Config")  # vla.models.vla.VLAConfig (not imported: it imports this module)


def merge_lora(params: dict[str, Any], cfg: Config) -> tuple[dict[str, Any], Config]:
    """Folds every adapter into its weight: (params without adapters, cfg with LoRA off).

    params: the model's pure dict ({"decoder": {"experts": {0 or "0": {...}}}, ...}, jax or
    numpy arrays); each targeted weight becomes W + (alpha / rank) * A @ B, computed in fp32 and
    cast to W's dtype; everything else is passed through. The result loads into
    VLA(cfg without LoRA): what tools.export writes into a bundle, and what a run starting from a
    LoRA run's checkpoint (config.init_from) loads when it has no adapters itself.
    """
    off = dataclasses.replace(cfg, lora_rank=0, lora_targets=())
    if not cfg.lora_rank:
        return params, off
    experts = {}
    for e, weights in params["decoder"]["experts"].items():
        merged = {k: v for k, v in weights.items() if not is_adapter(k)}
        for name, f in EXPERT_WEIGHTS.items():
            if name + A_SUFFIX in weights:
                w = weights[name]
                d = delta(f, weights[name + A_SUFFIX], weights[name + B_SUFFIX], cfg.lora_alpha / cfg.lora_rank)
                merged[name] = (jnp.asarray(w, jnp.float32) + d).astype(w.dtype)
        experts[e] = merged
    return {**params, "decoder": {**params["decoder"], "experts": experts}}, off
