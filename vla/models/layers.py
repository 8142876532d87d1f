"""Building blocks shared by the ViT and the decoder: parameters with logical axes, norms, RoPE,
masked attention, time embeddings and remat policies.

Parameters of repeated layers are *stacked* along a leading "layers" axis and applied with
`jax.lax.scan`, so compile time is flat in depth; `run_layers` also offers an unrolled loop over
the same parameters (used to check FLOP counts against XLA, which counts a scan body once).
"""
from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from vla.sharding import constrain

Initializer = Callable[..., jax.Array]
NEG_INF = -2.3819763e38  # finite, so fully masked rows (padding queries) stay NaN-free


def param(
    rngs: nnx.Rngs,
    init: Initializer,
    shape: Sequence[int],
    names: Sequence[str | None],
    dtype: jnp.dtype,
) -> nnx.Param:
    """A parameter annotated with logical axis names (one per dimension).

    Created unsharded: placement happens once for the whole model (sharding.init_sharded: jit
    with output shardings), so constructing a model never needs an active mesh.
    """
    if len(names) != len(shape):
        raise ValueError(f"logical names {names} do not match shape {shape}")
    with nnx.use_eager_sharding(False):
        return nnx.Param(nnx.with_partitioning(init, tuple(names))(rngs.params(), tuple(shape), dtype))


def fan_in_init(fan_in_axes: Sequence[int], scale: float = 1.0) -> Initializer:
    """LeCun-normal style init whose fan-in is the product of the given axes (stacked layers ok)."""

    def init(key, shape, dtype):
        fan_in = math.prod(shape[a] for a in fan_in_axes)
        return (jax.random.normal(key, shape, jnp.float32) * (scale / math.sqrt(fan_in))).astype(dtype)

    return init


zeros = nnx.initializers.zeros_init()
ones = nnx.initializers.ones_init()


class Dense(nnx.Module):
    """y = x @ kernel + bias, with logical names for (in, out)."""

    def __init__(self, d_in: int, d_out: int, names: tuple[str | None, str | None], *, rngs: nnx.Rngs,
                 dtype=jnp.float32, use_bias: bool = True, kernel_init: Initializer | None = None):
        self.kernel = param(rngs, kernel_init or fan_in_init([0]), (d_in, d_out), names, dtype)
        self.bias = param(rngs, zeros, (d_out,), (names[1],), dtype) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x @ self.kernel[...].astype(x.dtype)
        return y + self.bias[...].astype(x.dtype) if self.bias is not None else y


def rms_norm(x: jax.Array, scale: jax.Array | None, eps: float = 1e-6) -> jax.Array:
    """Gemma RMSNorm in fp32: x / rms(x) * (1 + scale). scale None = no learned scale (adaRMS)."""
    dtype = x.dtype
    x = x.astype(jnp.float32)
    y = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    if scale is not None:
        y = y * (1.0 + scale.astype(jnp.float32))
    return y.astype(dtype)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float = 1e-6) -> jax.Array:
    """LayerNorm in fp32 (SigLIP)."""
    dtype = x.dtype
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + eps) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(dtype)


def apply_rope(x: jax.Array, positions: jax.Array, max_wavelength: float = 10_000.0) -> jax.Array:
    """Rotary embedding (Gemma's half-split layout). x: [B, S, N, D], positions: [B, S]."""
    half = x.shape[-1] // 2
    freq = max_wavelength ** (-jnp.arange(half, dtype=jnp.float32) * 2 / x.shape[-1])
    angle = positions[..., None, None].astype(jnp.float32) * freq  # [B, S, 1, D/2]
    sin, cos = jnp.sin(angle), jnp.cos(angle)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Masked multi-/grouped-query attention with the softmax in fp32.

    q: [B, Sq, N, D]; k, v: [B, Sk, K, D] with N a multiple of K; mask: [B, Sq, Sk] bool.
    Returns [B, Sq, N, D]. Queries are pre-scaled by the caller.
    """
    b, sq, n, d = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, sq, kv_heads, n // kv_heads, d)
    logits = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32)
    logits = jnp.where(mask[:, None, None], logits, NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v)
    return out.reshape(b, sq, n, d)


def block_causal_mask(valid: jax.Array, ar: jax.Array, q_slice: slice | None = None) -> jax.Array:
    """Attention mask from per-token validity and "starts a new causal block" flags.

    Token i may attend to token j when both are valid and block(j) <= block(i), where
    block = cumsum(ar). ar=0 everywhere gives full attention (the prefix); ar=1 on every token
    gives causal attention (text targets); ar=1 on a block's first token makes it block-causal.
    valid, ar: [B, S] -> mask [B, S, S] (rows restricted to q_slice when given).
    """
    block = jnp.cumsum(ar.astype(jnp.int32), axis=1)
    rows = block if q_slice is None else block[:, q_slice]
    rows_valid = valid if q_slice is None else valid[:, q_slice]
    return (block[:, None, :] <= rows[:, :, None]) & valid[:, None, :] & rows_valid[:, :, None]


def positions_from_valid(valid: jax.Array, offset: jax.Array | int = 0) -> jax.Array:
    """RoPE positions = cumulative count of valid tokens, so padding does not advance them.

    valid: [B, S]; offset: scalar or [B] (tokens already in a cache). Returns [B, S] int32.
    """
    offset = jnp.asarray(offset, jnp.int32)
    return jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1 + (offset[:, None] if offset.ndim else offset)


def sincos_embedding(t: jax.Array, dim: int, min_period: float = 4e-3, max_period: float = 4.0) -> jax.Array:
    """Sinusoidal embedding of a scalar per example (the flow time). t: [B] -> [B, dim] (fp32)."""
    if dim % 2:
        raise ValueError(f"sincos embedding dim must be even, got {dim}")
    fraction = jnp.linspace(0.0, 1.0, dim // 2)
    period = min_period * (max_period / min_period) ** fraction
    angle = t[:, None].astype(jnp.float32) * (2 * jnp.pi / period)[None]
    return jnp.concatenate([jnp.sin(angle), jnp.cos(angle)], axis=-1)


REMAT_POLICIES = {
    "none": None,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
    # As dots_with_no_batch_dims_saveable, but the saved matmul outputs wait for the backward
    # pass in host memory (TPU/GPU pinned host), not in HBM: the transfers overlap compute.
    "offload_dots_with_no_batch_dims": jax.checkpoint_policies.offload_dot_with_no_batch_dims(
        "device", "pinned_host"),
}


def run_layers(body: Callable, carry, xs, *, scan: bool, remat_policy: str):
    """Applies `body(carry, x_layer) -> (carry, y_layer)` over stacked layer inputs.

    scan=True: one jax.lax.scan (compile time flat in depth); scan=False: an unrolled Python loop
    over the same stacked parameters. remat_policy names a jax.checkpoint policy ("none" = no remat).
    """
    if remat_policy not in REMAT_POLICIES:
        raise ValueError(f"unknown remat_policy {remat_policy!r}; choose from {sorted(REMAT_POLICIES)}")
    if remat_policy != "none":
        body = jax.checkpoint(body, policy=REMAT_POLICIES[remat_policy], prevent_cse=not scan)
    if scan:
        return jax.lax.scan(body, carry, xs)
    depth = jax.tree.leaves(xs)[0].shape[0]
    ys = []
    for i in range(depth):
        carry, y = body(carry, jax.tree.map(operator.itemgetter(i), xs))
        ys.append(y)
    return carry, jax.tree.map(lambda *a: jnp.stack(a), *ys) if ys and ys[0] is not None else None


def constrain_tokens(x: jax.Array) -> jax.Array:
    """Activation constraint at block boundaries: [B, S, W] batch-sharded."""
    return constrain(x, ("batch", "act_seq", "act_embed"))
