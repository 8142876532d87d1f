"""Multi-expert Gemma decoder (mixture of transformers).

Several token streams run side by side, one per expert. Each expert has its own norms, Q/K/V/O
projections and GeGLU MLP; in every layer the experts' keys and values are concatenated along
the sequence so all tokens attend jointly (one masked fp32 softmax per query row), and each
stream is projected back by its own expert. Expert 0 owns the token embedding (scaled by
sqrt(width)) and the tied output head. Experts share depth, heads, KV heads and head_dim;
widths and MLP sizes may differ.

Experts can be conditioned by adaRMSNorm (π0.5's flow-time conditioning of the action expert):
zero-initialized scale/shift/gate computed from a conditioning vector, with gated residuals.

Parameter layout follows big_vision's Gemma (q_einsum [N, W, D], kv_einsum [2, K, W, D],
attn_vec_einsum [N, D, W], gating_einsum [2, W, M], linear [M, W]), stacked over layers.

An expert may carry low-rank adapters on these five projections (vla/models/lora.py), applied on
the activations inside the scanned layer body.
"""
from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from vla.models import layers as L
from vla.models import lora as lora_lib
from vla.models.variants import GemmaVariant

KVCache = tuple[jax.Array, jax.Array]  # keys, values: [layers, B, S, K, D] each (post-RoPE)


class ExpertWeights(nnx.Module):
    """One expert's weights for all layers (stacked on a leading "layers" axis), with the
    adapters `lora` names ("<weight>_lora_a" / "_lora_b", vla/models/lora.py)."""

    def __init__(self, v: GemmaVariant, adarms_cond_dim: int | None, *, rngs: nnx.Rngs, param_dtype,
                 lora: lora_lib.LoRASpec | None = None, lora_rngs: nnx.Rngs | None = None):
        w, m, n, k, d, depth = v.width, v.mlp_dim, v.num_heads, v.num_kv_heads, v.head_dim, v.depth
        self.variant, self.adarms, self.lora = v, adarms_cond_dim is not None, lora
        stack = lambda init, shape, names: L.param(rngs, init, (depth, *shape), ("layers", *names), param_dtype)
        projections = {  # name -> (init, per-layer shape, logical names)
            "q_einsum": (L.fan_in_init([2]), (n, w, d), ("heads", "embed", "head_dim")),
            "kv_einsum": (L.fan_in_init([3]), (2, k, w, d), (None, "kv_heads", "embed", "head_dim")),
            "attn_vec_einsum": (L.fan_in_init([1, 2]), (n, d, w), ("heads", "head_dim", "embed")),
            "gating_einsum": (L.fan_in_init([2]), (2, w, m), (None, "embed", "mlp")),
            "linear": (L.fan_in_init([1]), (m, w), ("mlp", "embed")),
        }
        for name, (init, shape, names) in projections.items():
            setattr(self, name, stack(init, shape, names))
        for name in sorted(lora.weights if lora else ()):
            _, shape, names = projections[name]
            a, b = lora_lib.init_adapter(lora_rngs, lora_lib.EXPERT_WEIGHTS[name], (depth, *shape),
                                         ("layers", *names), lora.rank, param_dtype)
            setattr(self, name + lora_lib.A_SUFFIX, a)
            setattr(self, name + lora_lib.B_SUFFIX, b)
        if self.adarms:
            c = adarms_cond_dim
            self.pre_attention_mod_kernel = stack(L.zeros, (c, 3 * w), (None, "embed"))
            self.pre_attention_mod_bias = stack(L.zeros, (3 * w,), ("embed",))
            self.pre_ffw_mod_kernel = stack(L.zeros, (c, 3 * w), (None, "embed"))
            self.pre_ffw_mod_bias = stack(L.zeros, (3 * w,), ("embed",))
            self.final_mod_kernel = L.param(rngs, L.zeros, (c, 3 * w), (None, "embed"), param_dtype)
            self.final_mod_bias = L.param(rngs, L.zeros, (3 * w,), ("embed",), param_dtype)
        else:
            self.pre_attention_norm = stack(L.zeros, (w,), ("norm",))
            self.pre_ffw_norm = stack(L.zeros, (w,), ("norm",))
            self.final_norm = L.param(rngs, L.zeros, (w,), ("norm",), param_dtype)

    def layer_params(self) -> dict[str, jax.Array]:
        names = ["q_einsum", "kv_einsum", "attn_vec_einsum", "gating_einsum", "linear"]
        names += [name + suffix for name in sorted(self.lora.weights if self.lora else ())
                  for suffix in (lora_lib.A_SUFFIX, lora_lib.B_SUFFIX)]
        names += (["pre_attention_mod_kernel", "pre_attention_mod_bias", "pre_ffw_mod_kernel", "pre_ffw_mod_bias"]
                  if self.adarms else ["pre_attention_norm", "pre_ffw_norm"])
        return {name: getattr(self, name)[...] for name in names}

    def final_params(self) -> dict[str, jax.Array]:
        if self.adarms:
            return {"mod_kernel": self.final_mod_kernel[...], "mod_bias": self.final_mod_bias[...]}
        return {"norm": self.final_norm[...]}


def _norm(x: jax.Array, p: dict, prefix: str, cond: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
    """RMSNorm (1+scale), or adaRMSNorm from `cond` [B, C] returning the residual gate too."""
    if f"{prefix}mod_kernel" not in p:
        return L.rms_norm(x, p[f"{prefix}norm"]), None
    if cond is None:
        raise ValueError("this expert uses adaRMSNorm and needs a conditioning vector")
    mod = cond.astype(jnp.float32) @ p[f"{prefix}mod_kernel"].astype(jnp.float32) + p[f"{prefix}mod_bias"]
    scale, shift, gate = jnp.split(mod[:, None, :], 3, axis=-1)
    y = L.rms_norm(x, None).astype(jnp.float32) * (1.0 + scale) + shift
    return y.astype(x.dtype), gate.astype(x.dtype)


def _residual(x: jax.Array, y: jax.Array, gate: jax.Array | None) -> jax.Array:
    return x + y if gate is None else x + y * gate


class Decoder(nnx.Module):
    """Joint-attention decoder over one token stream per expert.

    Shapes: stream e is [B, S_e, W_e]; positions [B, sum S_e]; mask [B, sum S_e, S_cache + sum S_e].
    lora: per expert, its adapters (None: none); they draw their initialization from a stream of
    their own, so the base weights are the same with or without them.
    """

    def __init__(self, variants: Sequence[GemmaVariant], vocab_size: int, *, rngs: nnx.Rngs,
                 adarms_cond_dims: Sequence[int | None] | None = None, param_dtype=jnp.float32,
                 compute_dtype=jnp.float32, scan: bool = True, remat_policy: str = "nothing_saveable",
                 lora: Sequence[lora_lib.LoRASpec | None] | None = None):
        first = variants[0]
        for v in variants[1:]:
            if (v.depth, v.num_heads, v.num_kv_heads, v.head_dim) != (first.depth, first.num_heads,
                                                                      first.num_kv_heads, first.head_dim):
                raise ValueError(f"experts must share depth, heads, KV heads and head_dim: {first} vs {v}")
        if first.num_heads % first.num_kv_heads:
            raise ValueError(f"{first.num_heads} heads are not a multiple of {first.num_kv_heads} KV heads")
        adarms_cond_dims = adarms_cond_dims or [None] * len(variants)
        lora = lora or [None] * len(variants)
        self.variants, self.vocab_size = tuple(variants), vocab_size
        self.compute_dtype, self.scan, self.remat_policy = compute_dtype, scan, remat_policy
        self.embedder = L.param(rngs, nnx.initializers.normal(first.width**-0.5), (vocab_size, first.width),
                                ("vocab", "embed"), param_dtype)
        self.experts = nnx.List([
            ExpertWeights(v, c, rngs=rngs, param_dtype=param_dtype, lora=spec,
                          lora_rngs=lora_lib.adapter_rngs(rngs, e) if spec else None)
            for e, (v, c, spec) in enumerate(zip(variants, adarms_cond_dims, lora))])

    def embed(self, tokens: jax.Array) -> jax.Array:
        """tokens int32 [B, S] -> [B, S, W_0], scaled by sqrt(W_0) as in Gemma."""
        x = jnp.take(self.embedder[...], tokens, axis=0).astype(self.compute_dtype)
        return x * jnp.asarray(self.variants[0].width ** 0.5, self.compute_dtype)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Tied output head: [B, S, W_0] -> fp32 logits [B, S, vocab]."""
        return jnp.einsum("bsw,vw->bsv", hidden, self.embedder[...].astype(hidden.dtype),
                          preferred_element_type=jnp.float32)

    def __call__(
        self,
        streams: Sequence[jax.Array | None],
        positions: jax.Array,
        mask: jax.Array,
        *,
        adarms_cond: Sequence[jax.Array | None] | None = None,
        kv_cache: KVCache | None = None,
        insulate: bool = False,
    ) -> tuple[list[jax.Array | None], KVCache]:
        """Runs the active experts (streams that are not None) jointly through every layer.

        kv_cache: keys/values of earlier tokens (e.g. the prefix) that the new tokens attend to,
        placed before them. insulate: queries of experts >= 1 read stop_gradient of expert 0's
        keys/values (knowledge insulation), so their losses do not move the VLM.
        Returns the final-normed output per stream and this call's keys/values [L, B, S, K, D].
        """
        active = [e for e, s in enumerate(streams) if s is not None]
        adarms_cond = adarms_cond or [None] * len(streams)
        dt = self.compute_dtype
        lengths = [streams[e].shape[1] for e in active]
        splits = list(itertools.accumulate(lengths))[:-1]
        head_dim = self.variants[0].head_dim
        # Rows are independent in softmax, so splitting the queries of expert 0 from the others
        # changes nothing numerically; it lets the others read stop-gradient VLM keys/values.
        insulate = insulate and active[0] == 0 and len(active) > 1
        scales = [expert.lora.scale if expert.lora else None for expert in self.experts]

        def body(carry, xs):
            x_list = carry
            layer_params, cache = xs
            qs, ks, vs, gates = [], [], [], []
            for x, e, p in zip(x_list, active, layer_params):
                proj = functools.partial(lora_lib.project, p=p, scale=scales[e], dtype=dt)
                h, gate = _norm(x, p, "pre_attention_", adarms_cond[e])
                gates.append(gate)
                qs.append(proj("bsw,nwd->bsnd", h, name="q_einsum"))
                kv = proj("bsw,ckwd->cbskd", h, name="kv_einsum")
                ks.append(kv[0])
                vs.append(kv[1])
            q = L.apply_rope(jnp.concatenate(qs, axis=1), positions) * jnp.asarray(head_dim**-0.5, dt)
            k_new = L.apply_rope(jnp.concatenate(ks, axis=1), positions)
            v_new = jnp.concatenate(vs, axis=1)
            k = k_new if cache is None else jnp.concatenate([cache[0].astype(dt), k_new], axis=1)
            v = v_new if cache is None else jnp.concatenate([cache[1].astype(dt), v_new], axis=1)
            if insulate:
                n0, offset = lengths[0], k.shape[1] - k_new.shape[1]
                sg_k = jnp.concatenate([jax.lax.stop_gradient(k[:, :offset + n0]), k[:, offset + n0:]], axis=1)
                sg_v = jnp.concatenate([jax.lax.stop_gradient(v[:, :offset + n0]), v[:, offset + n0:]], axis=1)
                attn = jnp.concatenate([L.attention(q[:, :n0], k, v, mask[:, :n0]),
                                        L.attention(q[:, n0:], sg_k, sg_v, mask[:, n0:])], axis=1)
            else:
                attn = L.attention(q, k, v, mask)
            new_x = []
            for x, e, p, a, gate in zip(x_list, active, layer_params, jnp.split(attn, splits, axis=1), gates):
                proj = functools.partial(lora_lib.project, p=p, scale=scales[e], dtype=dt)
                x = _residual(x, proj("bsnd,ndw->bsw", a, name="attn_vec_einsum"), gate)
                h, gate = _norm(x, p, "pre_ffw_", adarms_cond[e])
                gate_up = proj("bsw,cwm->cbsm", h, name="gating_einsum")
                h = jax.nn.gelu(gate_up[0], approximate=True) * gate_up[1]
                x = _residual(x, proj("bsm,mw->bsw", h, name="linear"), gate)
                new_x.append(L.constrain_tokens(x))
            return new_x, (k_new, v_new)

        x0 = [streams[e].astype(dt) for e in active]
        layer_params = [self.experts[e].layer_params() for e in active]
        x_out, kv = L.run_layers(body, x0, (layer_params, kv_cache), scan=self.scan, remat_policy=self.remat_policy)
        outs: list[jax.Array | None] = [None] * len(streams)
        for x, e in zip(x_out, active):
            outs[e] = _norm(x, self.experts[e].final_params(), "", adarms_cond[e])[0]
        return outs, kv
