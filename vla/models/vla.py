"""The vision-language-action model: SigLIP + a two-expert Gemma (VLM, action expert) trained with
flow matching on action chunks and cross-entropy on text targets.

Token layout (one sequence; expert 0 runs the prefix, expert 1 the suffix):

    prefix = [camera 0: past frames pooled, current frame] ... [camera C-1] [text tokens]
    suffix = π0:   [state token] [action tokens x H]
             π0.5: [action tokens x H]        (state is discretized into the prompt)

Attention is block-causal (see layers.block_causal_mask): the prefix attends to itself fully,
text targets (captions, answers, subtasks, FAST action tokens) causally, the state block sees the
prefix, the action block sees everything before it and itself. So prefix outputs never depend on
the state or actions, which is what lets `sample_actions` cache the prefix once.

Flow matching (openpi convention): t ~ Beta(1.5, 1) * 0.999 + 0.001, x_t = t * eps + (1 - t) * a,
the action expert predicts u = eps - a; sampling integrates from t=1 to t=0 with Euler steps.
Unlike openpi the flow loss is masked by action_mask (padded dims and steps past the episode end).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vla.models import layers as L
from vla.models import lora
from vla.models.gemma import Decoder
from vla.models.siglip import SigLIP
from vla.models.variants import gemma_variant, vit_variant

Batch = dict[str, Any]
MODES = ("pi0", "pi05")
# The loss terms, and the scalar metrics `VLA.loss` returns beside their per-source sums.
LOSSES = ("flow", "text")
SCALAR_METRICS = ("loss", *(f"{name}_loss" for name in LOSSES))


def per_source_key(loss: str, stat: str) -> str:
    """The name of a per-source metric [num_sources]: stat "loss" (mean), "count" or "sum"."""
    return f"{loss}_{stat}_per_source"


@dataclasses.dataclass(frozen=True)
class VLAConfig:
    """Static model configuration (hashable: it is closed over by jitted functions); a run's
    is built from its config by configs/specs.py."""

    mode: str = "pi0"
    vit: str = "tiny/8"
    vlm: str = "gemma_tiny"
    action_expert: str = "gemma_tiny_expert"
    image_size: int = 32
    cameras: tuple[str, ...] = ("corner2",)
    context_frames: int = 1  # frames per camera, current frame last
    past_frame_tokens: int = 4  # tokens each past frame is pooled to (a square number)
    max_text_tokens: int = 16
    state_dim: int = 8
    action_dim: int = 4
    action_horizon: int = 10
    vocab_size: int = 256
    knowledge_insulation: bool = False
    fast_token_start: int | None = None  # text targets with ids >= this are hidden from actions
    flow_loss_weight: float = 1.0
    text_loss_weight: float = 1.0
    text_loss_chunk: int = 0  # text positions whose logits are live at once (0: all)
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat_policy: str = "nothing_saveable"
    scan_layers: bool = True
    # Low-rank adapters (vla/models/lora.py): rank 0 = off; targets: regexes over expert weight paths.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ()

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"model.mode must be one of {MODES}, got {self.mode!r}")
        vit = vit_variant(self.vit)
        gemma_variant(self.vlm), gemma_variant(self.action_expert)
        self.lora_experts()  # a bad rank, alpha or target pattern fails here, in words
        if self.image_size % vit.patch:
            raise ValueError(f"image_size {self.image_size} is not divisible by the ViT patch {vit.patch}")
        if self.context_frames < 1:
            raise ValueError(f"context_frames must be >= 1, got {self.context_frames}")
        if self.context_frames > 1:
            side, grid = math.isqrt(self.past_frame_tokens), self.image_size // vit.patch
            if side * side != self.past_frame_tokens or grid % side:
                raise ValueError(
                    f"past_frame_tokens={self.past_frame_tokens} must be a square s*s with s dividing the "
                    f"{grid}x{grid} patch grid (e.g. {[d * d for d in range(1, grid + 1) if grid % d == 0]})")

    def lora_experts(self) -> tuple[lora.LoRASpec | None, ...]:
        """The adapters of the VLM and the action expert (None: none)."""
        return lora.expert_specs(self.lora_rank, self.lora_alpha, self.lora_targets, num_experts=2)

    @property
    def image_tokens(self) -> int:
        """Prefix tokens from images: per camera, (T-1) pooled past frames + one full frame."""
        full = (self.image_size // vit_variant(self.vit).patch) ** 2
        return len(self.cameras) * ((self.context_frames - 1) * self.past_frame_tokens + full)


class VLA(nnx.Module):
    def __init__(self, cfg: VLAConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pd, cd = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.compute_dtype)
        vlm, expert = gemma_variant(cfg.vlm), gemma_variant(cfg.action_expert)
        common = dict(param_dtype=pd, compute_dtype=cd, scan=cfg.scan_layers, remat_policy=cfg.remat_policy)
        self.vit = SigLIP(vit_variant(cfg.vit), cfg.image_size, vlm.width, rngs=rngs, **common)
        pi05 = cfg.mode == "pi05"
        self.decoder = Decoder([vlm, expert], cfg.vocab_size, rngs=rngs,
                               adarms_cond_dims=[None, expert.width if pi05 else None],
                               lora=cfg.lora_experts(), **common)
        w = expert.width
        self.action_in_proj = L.Dense(cfg.action_dim, w, (None, "embed"), rngs=rngs, dtype=pd)
        self.action_out_proj = L.Dense(w, cfg.action_dim, ("embed", None), rngs=rngs, dtype=pd)
        if pi05:
            self.time_mlp_in = L.Dense(w, w, (None, "embed"), rngs=rngs, dtype=pd)
            self.time_mlp_out = L.Dense(w, w, ("embed", None), rngs=rngs, dtype=pd)
        else:
            self.state_proj = L.Dense(cfg.state_dim, w, (None, "embed"), rngs=rngs, dtype=pd)
            self.action_time_mlp_in = L.Dense(2 * w, w, (None, "embed"), rngs=rngs, dtype=pd)
            self.action_time_mlp_out = L.Dense(w, w, ("embed", None), rngs=rngs, dtype=pd)

    # ------------------------------------------------------------------ token blocks

    def embed_prefix(self, batch: Batch) -> dict[str, jax.Array]:
        """Image tokens of every camera and context frame, then the text tokens.

        Returns x [B, Sp, W0], valid [B, Sp], ar [B, Sp] (block starts: text targets),
        hidden [B, Sp] (tokens the action expert must not see: FAST action targets).
        """
        cfg, cd = self.cfg, jnp.dtype(self.cfg.compute_dtype)
        tokens = batch["tokens"]
        b, t = tokens.shape[0], cfg.context_frames
        missing = [c for c in cfg.cameras if c not in batch["images"]]
        if missing:
            raise ValueError(f"batch has no images for cameras {missing}; expected {list(cfg.cameras)}")
        frames = jnp.stack([batch["images"][c] for c in cfg.cameras])  # [C, B, T, H, W, 3]
        if frames.shape[2] != t:
            raise ValueError(f"images have {frames.shape[2]} frames, the model expects context_frames={t}")
        c, hw = frames.shape[0], frames.shape[3:]
        encoded = self.vit(frames.reshape(c * b * t, *hw)).astype(cd)
        encoded = encoded.reshape(c, b, t, *encoded.shape[1:])  # [C, B, T, P, W0]
        image_mask = batch.get("image_mask", jnp.ones((b, c), bool))
        frame_mask = batch.get("frame_mask", jnp.ones((b, c, t), bool)) & image_mask[:, :, None]
        xs, valids = [], []
        for cam in range(c):
            if t > 1:
                past = _pool_tokens(encoded[cam, :, :-1], cfg.past_frame_tokens)  # [B, T-1, k, W0]
                xs.append(past.reshape(b, -1, past.shape[-1]))
                valids.append(jnp.repeat(frame_mask[:, cam, :-1], cfg.past_frame_tokens, axis=1))
            xs.append(encoded[cam, :, -1])
            valids.append(jnp.repeat(frame_mask[:, cam, -1:], encoded.shape[3], axis=1))
        n_img = sum(x.shape[1] for x in xs)
        text_valid = batch["token_mask"]
        target = both(batch.get("target_mask", jnp.zeros_like(text_valid)), text_valid)
        hidden = (target & (tokens >= cfg.fast_token_start) if cfg.fast_token_start is not None
                  else jnp.zeros_like(target))
        zeros = jnp.zeros((b, n_img), bool)
        return dict(
            x=L.constrain_tokens(jnp.concatenate(xs + [self.decoder.embed(tokens)], axis=1)),
            valid=jnp.concatenate(valids + [text_valid], axis=1),
            ar=jnp.concatenate([zeros, target], axis=1),
            hidden=jnp.concatenate([zeros, hidden], axis=1),
        )

    def embed_suffix(self, state: jax.Array, x_t: jax.Array, t: jax.Array) -> dict[str, jax.Array]:
        """π0: [state token][H action tokens]; π0.5: [H action tokens] + adaRMS condition.

        state [B, S], x_t [B, H, A], t [B] -> x [B, Ss, W1], valid, ar [B, Ss], cond [B, W1] | None.
        """
        cd = jnp.dtype(self.cfg.compute_dtype)
        b, h, _ = x_t.shape
        w = self.action_in_proj.kernel.shape[1]
        actions = self.action_in_proj(x_t.astype(cd))
        time_emb = L.sincos_embedding(t, w).astype(cd)
        if self.cfg.mode == "pi05":
            cond = jax.nn.swish(self.time_mlp_out(jax.nn.swish(self.time_mlp_in(time_emb))))
            x, ar = actions, jnp.zeros((b, h), bool).at[:, 0].set(True)
        else:
            cond = None
            mixed = jnp.concatenate([actions, jnp.broadcast_to(time_emb[:, None], (b, h, w))], axis=-1)
            mixed = self.action_time_mlp_out(jax.nn.swish(self.action_time_mlp_in(mixed)))
            x = jnp.concatenate([self.state_proj(state.astype(cd))[:, None], mixed], axis=1)
            ar = jnp.zeros((b, h + 1), bool).at[:, :2].set(True)
        return dict(x=L.constrain_tokens(x), valid=jnp.ones(ar.shape, bool), ar=ar, cond=cond)

    def _joint(self, prefix: dict, suffix: dict) -> tuple[jax.Array, jax.Array]:
        """Prefix and suffix through the decoder together (training, and the uncached reference)."""
        valid = jnp.concatenate([prefix["valid"], suffix["valid"]], axis=1)
        mask = L.block_causal_mask(valid, jnp.concatenate([prefix["ar"], suffix["ar"]], axis=1))
        n_prefix = prefix["x"].shape[1]
        hidden = jnp.concatenate([prefix["hidden"], jnp.zeros_like(suffix["valid"])], axis=1)
        is_suffix_row = jnp.arange(valid.shape[1]) >= n_prefix
        mask = mask & ~(is_suffix_row[None, :, None] & hidden[:, None, :])
        (prefix_out, suffix_out), _ = self.decoder(
            [prefix["x"], suffix["x"]], L.positions_from_valid(valid), mask,
            adarms_cond=[None, suffix["cond"]], insulate=self.cfg.knowledge_insulation)
        return prefix_out, suffix_out

    def _velocity(self, suffix_out: jax.Array) -> jax.Array:
        return self.action_out_proj(suffix_out[:, -self.cfg.action_horizon:]).astype(jnp.float32)

    # ------------------------------------------------------------------ training

    def loss(self, batch: Batch, rng: jax.Array, num_sources: int = 1) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Weighted flow-matching + text cross-entropy loss.

        Returns (scalar loss, metrics) with metrics["flow_loss"], ["text_loss"] and per-source
        ["flow_loss_per_source"], ["text_loss_per_source"] [num_sources] (NaN-free: 0 where a source
        had no supervised elements) with their element counts ["*_count_per_source"].
        """
        cfg = self.cfg
        actions = batch["actions"].astype(jnp.float32)
        b = actions.shape[0]
        eps, t = flow_noise(rng, actions.shape)
        x_t = t[:, None, None] * eps + (1.0 - t[:, None, None]) * actions
        prefix = self.embed_prefix(batch)
        if cfg.flow_loss_weight:
            prefix_out, suffix_out = self._joint(prefix, self.embed_suffix(batch["state"], x_t, t))
            action_mask = batch["action_mask"].astype(jnp.float32)
            flow_sum = jnp.sum(jnp.square(self._velocity(suffix_out) - (eps - actions)) * action_mask, axis=(1, 2))
            flow_count = jnp.sum(action_mask, axis=(1, 2))
        else:  # text-only training (π0.5 stage 1): the action expert does not run at all
            prefix_out, _ = self.encode_prefix(prefix)
            flow_sum = flow_count = jnp.zeros((b,), jnp.float32)
        if cfg.text_loss_weight:
            text_sum, text_count = self._text_nll(prefix_out, batch)
        else:
            text_sum = text_count = jnp.zeros((b,), jnp.float32)
        flow_loss = jnp.sum(flow_sum) / jnp.maximum(jnp.sum(flow_count), 1.0)
        text_loss = jnp.sum(text_sum) / jnp.maximum(jnp.sum(text_count), 1.0)
        loss = cfg.flow_loss_weight * flow_loss + cfg.text_loss_weight * text_loss

        source = batch.get("source", jnp.zeros((b,), jnp.int32))
        # A one-hot sum, not a scatter (segment_sum): XLA's TPU cost model cannot time that
        # scatter (its step estimate came out negative); a sum, not a matmul, keeps it exact fp32.
        one_hot = jax.nn.one_hot(source, num_sources, dtype=jnp.float32)  # [B, num_sources]
        per_source = lambda v: jnp.sum(v[:, None] * one_hot, axis=0)
        metrics = dict(zip(SCALAR_METRICS, (loss, flow_loss, text_loss)))
        for name, total, count in zip(LOSSES, (flow_sum, text_sum), (flow_count, text_count)):
            n = per_source(count)
            metrics[per_source_key(name, "loss")] = per_source(total) / jnp.maximum(n, 1.0)
            metrics[per_source_key(name, "count")] = n
        return loss, metrics

    def _text_nll(self, prefix_out: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array]:
        """Next-token cross-entropy on target tokens: per-example (sum, count), fp32.

        The fp32 logits [B, S, vocab] of a 257k vocabulary are ~200 MB an example at 200 text
        tokens (their gradient as much again). With text_loss_chunk they are computed that many
        positions at a time inside a rematerialized scan, so only [B, chunk, vocab] is live,
        forward or backward; XLA's TPU schedule of the full version needed less HBM at π0.5's
        shapes (BENCHMARKS.md), so chunking is a knob, off by default.
        """
        tokens, n_text = batch["tokens"], batch["tokens"].shape[1]
        weight = both(batch["target_mask"], batch["token_mask"])[:, 1:].astype(jnp.float32)
        return chunked_nll(self.decoder.logits, prefix_out[:, -n_text:-1], tokens[:, 1:], weight,
                           self.cfg.text_loss_chunk)

    # ------------------------------------------------------------------ inference

    def encode_prefix(self, prefix: dict) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """Runs the prefix once through the VLM: (outputs [B, Sp, W0], KV cache [L, B, Sp, K, D])."""
        mask = L.block_causal_mask(prefix["valid"], prefix["ar"])
        (out, _), kv = self.decoder([prefix["x"], None], L.positions_from_valid(prefix["valid"]), mask)
        return out, kv

    def sample_actions(self, batch: Batch, noise: jax.Array | None = None, rng: jax.Array | None = None,
                       num_steps: int = 10, use_cache: bool = True, guide_actions: jax.Array | None = None,
                       guide_weights: jax.Array | None = None, max_guidance: float = 5.0) -> jax.Array:
        """Action chunk [B, H, A] (normalized space) by `num_steps` Euler steps from t=1 to t=0.

        The prefix (images, prompt, any known text targets such as a decoded subtask) is encoded once
        into a KV cache and each flow step runs only the action expert. use_cache=False runs the
        full joint forward at every step instead (the reference the cache is tested against).

        Guided sampling (real-time chunking's training-free inpainting, Black et al. 2025, ΠGDM):
        with guide_actions [B, H, A] and guide_weights [B, H] (or [B, H, A]) in [0, 1], every step
        pulls the denoised estimate a_hat(x) = x - t * v(x, t) toward the guide on weighted steps:
            g = (d a_hat / d x)^T [(guide - a_hat) * W],   v_guided = v - c * g,
            c = min(max_guidance, (1 - τ) / (τ r²)),  r² = (1 - τ)² / (τ² + (1 - τ)²),  τ = 1 - t.
        In the paper's time τ (0 = noise) and velocity -v the guided step is v_paper + c * g, so
        here it is v - c * g (dt < 0). The vector-Jacobian product runs through the action expert
        only (the cached prefix is a constant). All-zero weights give unguided sampling.
        """
        cfg = self.cfg
        b = batch["tokens"].shape[0]
        if noise is None:
            if rng is None:
                raise ValueError("sample_actions needs noise or an rng")
            noise = jax.random.normal(rng, (b, cfg.action_horizon, cfg.action_dim), jnp.float32)
        if (guide_actions is None) != (guide_weights is None):
            raise ValueError("guided sampling needs both guide_actions and guide_weights (or neither)")
        if guide_actions is not None:
            guide = jnp.asarray(guide_actions, jnp.float32)
            weights = jnp.asarray(guide_weights, jnp.float32)
            if guide.shape != noise.shape:
                raise ValueError(f"guide_actions has shape {guide.shape}, expected the chunk shape {noise.shape}")
            if weights.shape == noise.shape[:2]:
                weights = weights[..., None]
            elif weights.shape != noise.shape:
                raise ValueError(f"guide_weights has shape {weights.shape}, expected {noise.shape[:2]} "
                                 f"or {noise.shape}")
        prefix = self.embed_prefix(batch)
        state, dt = batch["state"], -1.0 / num_steps

        if use_cache:
            _, kv = self.encode_prefix(prefix)
            visible = prefix["valid"] & ~prefix["hidden"]
            offset = jnp.sum(prefix["valid"], axis=1)

            def velocity(x, t):
                suffix = self.embed_suffix(state, x, jnp.full((b,), t))
                rows = suffix["valid"][:, :, None]
                mask = jnp.concatenate([rows & visible[:, None, :],
                                        L.block_causal_mask(suffix["valid"], suffix["ar"])], axis=2)
                positions = L.positions_from_valid(suffix["valid"], offset)
                (_, out), _ = self.decoder([None, suffix["x"]], positions, mask,
                                           adarms_cond=[None, suffix["cond"]], kv_cache=kv)
                return self._velocity(out)
        else:
            def velocity(x, t):
                return self._velocity(self._joint(prefix, self.embed_suffix(state, x, jnp.full((b,), t)))[1])

        if guide_actions is not None:

            def guided_velocity(x, t):
                def denoise(x):
                    v = velocity(x, t)
                    return x - t * v, v

                a_hat, vjp, v = jax.vjp(denoise, x, has_aux=True)
                (g,) = vjp((guide - a_hat) * weights)
                tau = 1.0 - t
                # (1 - τ) / (τ r²) = (τ² + (1 - τ)²) / (τ (1 - τ)); infinite at τ = 0 (t = 1): clipped.
                c = jnp.minimum(max_guidance, (tau ** 2 + t ** 2) / jnp.maximum(tau * t, 1e-12))
                return v - c * g

        flow = velocity if guide_actions is None else guided_velocity

        def step(i, x):
            return x + dt * flow(x, 1.0 + i * dt)

        return jax.lax.fori_loop(0, num_steps, step, noise.astype(jnp.float32))

    def generate_text(self, batch: Batch, max_new_tokens: int, eos_id: int, rng: jax.Array | None = None,
                      temperature: float = 0.0) -> tuple[jax.Array, jax.Array]:
        """KV-cached decoding after the prompt (the non-target valid tokens of batch["tokens"]).

        Greedy when temperature == 0, else sampling at that temperature; a sequence stops at EOS.
        Returns tokens int32 [B, max_new_tokens] and their mask (true up to and including EOS).
        """
        prompt_valid = batch["token_mask"] & ~batch.get("target_mask", jnp.zeros_like(batch["token_mask"]))
        prefix = self.embed_prefix({**batch, "token_mask": prompt_valid, "target_mask": jnp.zeros_like(prompt_valid)})
        out, (k_prefix, v_prefix) = self.encode_prefix(prefix)
        b, n_prefix = prompt_valid.shape[0], prefix["x"].shape[1]
        last = jnp.max(jnp.where(prefix["valid"], jnp.arange(n_prefix), -1), axis=1)
        first_logits = self.decoder.logits(out[jnp.arange(b), last][:, None])[:, 0]
        n_valid = jnp.sum(prefix["valid"], axis=1)
        rng = jax.random.key(0) if rng is None else rng

        def pick(logits, key):
            if temperature == 0.0:
                return jnp.argmax(logits, axis=-1).astype(jnp.int32)
            return jax.random.categorical(key, logits / temperature).astype(jnp.int32)

        gen_shape = (k_prefix.shape[0], b, max_new_tokens, *k_prefix.shape[3:])
        rng, key = jax.random.split(rng)
        init = dict(i=jnp.int32(0), token=pick(first_logits, key), done=jnp.zeros((b,), bool),
                    out=jnp.zeros((b, max_new_tokens), jnp.int32), out_mask=jnp.zeros((b, max_new_tokens), bool),
                    k=jnp.zeros(gen_shape, k_prefix.dtype), v=jnp.zeros(gen_shape, v_prefix.dtype), rng=rng)

        def cond(s):
            return (s["i"] < max_new_tokens) & ~jnp.all(s["done"])

        def body(s):
            i, token = s["i"], s["token"]
            keep = ~s["done"]
            out = s["out"].at[:, i].set(jnp.where(keep, token, 0))
            out_mask = s["out_mask"].at[:, i].set(keep)
            done = s["done"] | (token == eos_id)
            cols = jnp.concatenate([prefix["valid"], jnp.broadcast_to(jnp.arange(max_new_tokens) < i,
                                                                      (b, max_new_tokens)),
                                    jnp.ones((b, 1), bool)], axis=1)
            cache = (jnp.concatenate([k_prefix, s["k"]], axis=2), jnp.concatenate([v_prefix, s["v"]], axis=2))
            (h, _), (k_new, v_new) = self.decoder([self.decoder.embed(token[:, None]), None],
                                                  (n_valid + i)[:, None], cols[:, None, :], kv_cache=cache)
            rng, key = jax.random.split(s["rng"])
            return dict(i=i + 1, token=pick(self.decoder.logits(h)[:, 0], key), done=done, out=out,
                        out_mask=out_mask, k=jax.lax.dynamic_update_slice_in_dim(s["k"], k_new, i, axis=2),
                        v=jax.lax.dynamic_update_slice_in_dim(s["v"], v_new, i, axis=2), rng=rng)

        final = jax.lax.while_loop(cond, body, init)
        return final["out"], final["out_mask"]


def both(a: jax.Array, b: jax.Array) -> jax.Array:
    """a & b of two boolean masks, computed as an int32 product: libtpu 0.0.42.1's TPU compiler
    aborts ("Cannot find a valid window") on the boolean AND of π0's [32, 48] text masks under
    the gradient, at 32 examples a chip."""
    return (a.astype(jnp.int32) * b.astype(jnp.int32)).astype(bool)


def chunked_nll(logits_fn, hidden: jax.Array, targets: jax.Array, weight: jax.Array, chunk: int
                ) -> tuple[jax.Array, jax.Array]:
    """Weighted cross-entropy of logits_fn(hidden) against targets, `chunk` positions at a time
    (0: all at once). hidden [B, S, W], targets int [B, S], weight f32 [B, S] -> per-example
    (sum of weighted NLL, sum of weights), each [B]. Positions padded to a whole number of chunks
    get weight 0; each chunk's logits are recomputed in the backward pass, not stored."""

    def nll(h, y, w):
        logits = logits_fn(h)  # [B, c, V] fp32
        target_logit = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
        return jnp.sum((jax.nn.logsumexp(logits, axis=-1) - target_logit) * w, axis=1)

    b, s = targets.shape
    if not chunk or chunk >= s:
        return nll(hidden, targets, weight), jnp.sum(weight, axis=1)
    n = -(-s // chunk)
    pad = n * chunk - s
    pad_seq = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    to_chunks = lambda x: jnp.swapaxes(pad_seq(x).reshape(b, n, chunk, *x.shape[2:]), 0, 1)
    body = jax.checkpoint(lambda total, xs: (total + nll(*xs), None))
    total, _ = jax.lax.scan(body, jnp.zeros((b,), jnp.float32),
                            (to_chunks(hidden), to_chunks(targets), to_chunks(weight)))
    return total, jnp.sum(weight, axis=1)


def flow_noise(rng: jax.Array, shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """The noise eps [B, H, A] and flow time t [B] of a training step, drawn from `rng` exactly as
    openpi's compute_loss draws them (the second and third of three splits), so an imported openpi
    model gives openpi's loss for the same key."""
    _, noise_rng, time_rng = jax.random.split(rng, 3)
    eps = jax.random.normal(noise_rng, shape, jnp.float32)
    return eps, jax.random.beta(time_rng, 1.5, 1.0, shape[:1]) * 0.999 + 0.001


def random_batch(cfg: VLAConfig, batch_size: int, seed: int = 0) -> dict[str, Any]:
    """A batch of the batch contract's shapes with random contents (numpy), for benchmarks, cost
    checks and tests: every image and action valid; text is a valid prompt, then targets, then padding."""
    rng = np.random.default_rng(seed)
    b, c, t, hw, n = batch_size, len(cfg.cameras), cfg.context_frames, cfg.image_size, cfg.max_text_tokens
    lengths = rng.integers(n // 2, n + 1, size=(b, 1))
    token_mask = np.arange(n)[None] < lengths
    return dict(
        images={cam: rng.integers(0, 256, (b, t, hw, hw, 3), dtype=np.uint8) for cam in cfg.cameras},
        image_mask=np.ones((b, c), bool),
        frame_mask=np.ones((b, c, t), bool),
        tokens=rng.integers(0, cfg.vocab_size, (b, n), dtype=np.int32),
        token_mask=token_mask,
        target_mask=token_mask & (np.arange(n)[None] >= lengths // 2),
        state=rng.standard_normal((b, cfg.state_dim), dtype=np.float32),
        actions=rng.standard_normal((b, cfg.action_horizon, cfg.action_dim), dtype=np.float32),
        action_mask=np.ones((b, cfg.action_horizon, cfg.action_dim), bool),
        source=np.zeros((b,), np.int32),
    )


def _pool_tokens(tokens: jax.Array, num_tokens: int) -> jax.Array:
    """Average-pools a square patch grid to num_tokens (a square). [..., P, W] -> [..., num_tokens, W]."""
    *lead, p, w = tokens.shape
    grid, side = math.isqrt(p), math.isqrt(num_tokens)
    x = tokens.reshape(*lead, side, grid // side, side, grid // side, w)
    return x.mean(axis=(-4, -2)).reshape(*lead, num_tokens, w)
