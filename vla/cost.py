"""Cost model: parameters, FLOPs, memory and a real-time roofline for a VLA config.

Conventions (stated once, used everywhere):
- FLOPs count matmuls and convolutions only (2*m*n*k); attention QK^T and PV use the actual
  sequence lengths with masks ignored; norms, softmax, RoPE, pooling and other elementwise work
  are left out (a few percent at real widths; tests check the total against XLA's cost analysis).
- Every camera and every context frame goes through the ViT at full resolution (past frames are
  pooled only afterwards), so the ViT cost grows linearly in context_frames.
- Training: backward = 2x forward, so model FLOPs = 3x forward (the number MFU divides by). A remat
  policy that recomputes adds the recomputed part of the scanned layers once more on top
  ("hardware FLOPs"): nothing_saveable recomputes whole layers, dots_with_no_batch_dims_saveable
  only the attention einsums (offload_dots_with_no_batch_dims too), dots_saveable/
  everything_saveable/none nothing that is a matmul; the text loss, scored a chunk of positions at
  a time, recomputes its logits. XLA's cost analysis counts a loop body once, whatever its trip
  count: `train_flops_as_counted` is the figure to hold its count against.
- Inference (sample_actions): the prefix (ViT + VLM) runs once into a KV cache, then every flow
  step runs only the action expert against that cache. Each step must re-read the expert's weights
  and the cache, which is why the roofline is per phase: max(FLOPs / peak, bytes / bandwidth).
- Weights are read in the config's param dtype (what the model stores); activations and the KV
  cache are in the compute dtype.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs.specs import RunSpec
from vla.models.variants import GemmaVariant, gemma_variant, vit_variant
from vla.models.vla import VLA, VLAConfig

# ---------------------------------------------------------------------------------------- chips

@dataclasses.dataclass(frozen=True)
class Chip:
    peak_flops: float  # dense bf16 FLOP/s
    hbm_bytes_per_s: float


# Vendor datasheet numbers (dense, no sparsity): H100/H200 SXM; TPU per chip.
CHIPS = {
    "h100": Chip(989e12, 3.35e12),
    "h200": Chip(989e12, 4.8e12),
    "tpu_v4": Chip(275e12, 1.2e12),
    "tpu_v5e": Chip(197e12, 0.819e12),
    "tpu_v5p": Chip(459e12, 2.765e12),
    "tpu_v6e": Chip(918e12, 1.64e12),
}


def chip_peak_flops(name: str) -> float:
    """Peak dense bf16 FLOP/s of a named chip ("cpu" is measured here, see measure_cpu)."""
    return get_chip(name).peak_flops


def get_chip(name: str, cpu_gflops: float | None = None) -> Chip:
    """A chip from the table, or "cpu": this machine, measured now (peak optionally given)."""
    if name == "cpu":
        return measure_cpu(cpu_gflops)
    if name not in CHIPS:
        raise ValueError(f"unknown chip {name!r}; choose from {sorted(CHIPS) + ['cpu']}")
    return CHIPS[name]


def measure_cpu(gflops: float | None = None) -> Chip:
    """Best-of-a-few fp32 matmul throughput and memcpy bandwidth of this machine (~1 s).

    Best rather than median because other processes only ever make a probe slower.
    """
    if gflops is None:
        n = 1024
        a = jnp.ones((n, n), jnp.float32)
        matmul = jax.jit(lambda x: x @ x)
        matmul(a).block_until_ready()
        best = min(_timed(lambda: matmul(a).block_until_ready()) for _ in range(5))
        gflops = 2 * n**3 / best / 1e9
    src = np.ones(32 * 2**20, np.float32)  # 128 MiB: well past the caches
    dst = np.empty_like(src)
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(3))
    return Chip(gflops * 1e9, 2 * src.nbytes / best)  # a copy reads and writes every byte


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ----------------------------------------------------------------------------------- parameters

def param_counts(cfg: VLAConfig) -> dict[str, int]:
    """Parameters per component, counted from the model itself (abstract init, nothing allocated).

    vit: the encoder without its output head; vlm: token embedding + expert 0; action_expert:
    expert 1; projections: the ViT head and the action/state/time projections.
    """
    model = nnx.eval_shape(lambda: VLA(cfg, rngs=nnx.Rngs(0)))
    counts = dict(vit=0, vlm=0, action_expert=0, projections=0)
    for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]:
        keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        counts[_component(keys)] += math.prod(leaf.shape)
    counts["total"] = sum(counts.values())
    return counts


def _component(keys: list) -> str:
    if keys[0] == "vit":
        return "projections" if keys[1] == "head" else "vit"
    if keys[0] == "decoder":
        return "action_expert" if keys[1] == "experts" and keys[2] == 1 else "vlm"
    return "projections"


# ---------------------------------------------------------------------------------------- shapes

def vit_tokens(cfg: VLAConfig) -> int:
    """Patches per image."""
    return (cfg.image_size // vit_variant(cfg.vit).patch) ** 2


def prefix_len(cfg: VLAConfig) -> int:
    """Prefix tokens: image tokens of all cameras and frames, then the text budget."""
    return cfg.image_tokens + cfg.max_text_tokens


def suffix_len(cfg: VLAConfig) -> int:
    """π0: a state token then the action tokens; π0.5: the action tokens only."""
    return cfg.action_horizon + (cfg.mode == "pi0")


# ----------------------------------------------------------------------------------------- FLOPs
# Everything below is per example; split into "layers" (inside the scanned stacks, what remat
# recomputes) and "attention" (the QK/PV part of those layers, recomputed by more policies).

def _vit_flops(cfg: VLAConfig) -> dict[str, float]:
    v, p, w0 = vit_variant(cfg.vit), vit_tokens(cfg), gemma_variant(cfg.vlm).width
    hd = v.num_heads * (v.width // v.num_heads)
    images = len(cfg.cameras) * cfg.context_frames
    per_layer = 2 * p * v.width * (4 * hd + 2 * v.mlp_dim)
    attention = 4 * p * p * hd * v.depth
    outside = 2 * p * v.patch**2 * 3 * v.width + 2 * p * v.width * w0  # patch embedding, head
    return {"layers": images * (v.depth * per_layer + attention), "attention": images * attention,
            "outside": images * outside}


def _decoder_flops(experts: list[tuple[GemmaVariant, int, bool]], keys: int,
                   outputs_needed: bool = True) -> dict[str, float]:
    """One pass of the decoder for streams (variant, tokens, adaRMS?) attending to `keys` keys.

    outputs_needed=False: only the KV cache is used (encode_prefix in sample_actions), so XLA
    drops the last layer's queries, attention, output projection and MLP; count what runs.
    """
    first = experts[0][0]
    nd, kd = first.num_heads * first.head_dim, first.num_kv_heads * first.head_dim
    kv, rest = 0.0, 0.0  # per layer: the K/V projections, and everything after them
    for v, s, adarms in experts:
        kv += 2 * s * v.width * 2 * kd
        rest += 2 * s * v.width * 2 * nd + 6 * s * v.width * v.mlp_dim
        rest += 2 * (2 * v.width * 3 * v.width) if adarms else 0  # per example, not per token
    queries = sum(s for _, s, _ in experts)
    attention_layers = first.depth if outputs_needed else first.depth - 1
    attention = 4 * queries * keys * nd * attention_layers
    layers = first.depth * kv + attention_layers * rest + attention
    final = sum(2 * v.width * 3 * v.width for v, _, adarms in experts if adarms) if outputs_needed else 0.0
    return {"layers": layers, "attention": attention, "outside": final}


def _suffix_embed_flops(cfg: VLAConfig) -> float:
    """Action/state/time projections in and the velocity projection out, one evaluation."""
    w, h, a = gemma_variant(cfg.action_expert).width, cfg.action_horizon, cfg.action_dim
    flops = 2 * h * a * w * 2  # action_in_proj, action_out_proj
    if cfg.mode == "pi05":
        return flops + 2 * 2 * w * w  # time MLP, once per example
    return flops + 2 * cfg.state_dim * w + 2 * h * 2 * w * w + 2 * h * w * w


def _add(*parts: dict[str, float]) -> dict[str, float]:
    return {k: sum(p.get(k, 0.0) for p in parts) for k in ("layers", "attention", "outside")}


def _text_positions(cfg: VLAConfig) -> tuple[int, int]:
    """(text positions the loss scores, chunks they are scored in: VLA._text_nll)."""
    positions = cfg.max_text_tokens - 1
    chunk = cfg.text_loss_chunk
    return positions, (-(-positions // chunk) if chunk and chunk < positions else 1)


def _forward_stacks(cfg: VLAConfig) -> dict[str, dict[str, float]]:
    """The training forward per example by part: the ViT and decoder stacks (their "layers" and
    "attention" are inside the scanned layer loops, "outside" is not), and the text logits."""
    vlm, expert = gemma_variant(cfg.vlm), gemma_variant(cfg.action_expert)
    sp, ss = prefix_len(cfg), suffix_len(cfg)
    # Without a flow loss (π0.5 stage 1) the action expert does not run.
    streams = [(vlm, sp, False)] + ([(expert, ss, cfg.mode == "pi05")] if cfg.flow_loss_weight else [])
    decoder = _decoder_flops(streams, sp + (ss if cfg.flow_loss_weight else 0))
    decoder["outside"] += _suffix_embed_flops(cfg) if cfg.flow_loss_weight else 0.0
    logits = 2 * _text_positions(cfg)[0] * vlm.width * cfg.vocab_size if cfg.text_loss_weight else 0.0
    return {"vit": _vit_flops(cfg), "decoder": decoder, "logits": {"outside": logits}}


def forward_flops(cfg: VLAConfig) -> dict[str, float]:
    """Training forward (the loss) per example: ViT, joint prefix+suffix decoder, text logits."""
    parts = _add(*_forward_stacks(cfg).values())
    return {**parts, "total": parts["layers"] + parts["outside"]}


def _recomputed(cfg: VLAConfig, part: dict[str, float]) -> float:
    """What the remat policy recomputes of a scanned stack in the backward pass."""
    key = {"nothing_saveable": "layers", "dots_with_no_batch_dims_saveable": "attention",
           "offload_dots_with_no_batch_dims": "attention"}.get(cfg.remat_policy)
    return part.get(key, 0.0) if key else 0.0


def train_flops_per_example(cfg: VLAConfig, include_remat: bool = False) -> float:
    """Training FLOPs per example: 3x forward (model FLOPs, for MFU); include_remat adds what the
    model's remat policy recomputes in the backward pass, and the chunked text loss's logits
    (hardware FLOPs)."""
    stacks = _forward_stacks(cfg)
    model = 3 * forward_flops(cfg)["total"]
    if not include_remat:
        return model
    chunked = _text_positions(cfg)[1] > 1
    return model + _recomputed(cfg, stacks["vit"]) + _recomputed(cfg, stacks["decoder"]) + \
        (stacks["logits"]["outside"] if chunked else 0.0)


def train_flops_as_counted(cfg: VLAConfig) -> float:
    """The hardware FLOPs of one training example as XLA's cost analysis counts them: a loop
    body (a scanned layer stack's, forward and backward; a chunk of the text loss) once, whatever
    its trip count. The gradient-accumulation loop is counted once too: multiply by a device's
    share of one microbatch. tools.aot checks XLA's figure against this one."""
    stacks = _forward_stacks(cfg)
    depths = {"vit": vit_variant(cfg.vit).depth, "decoder": gemma_variant(cfg.vlm).depth}
    counted = 0.0
    for name in ("vit", "decoder"):
        part = stacks[name]
        body = 3 * part["layers"] + _recomputed(cfg, part)
        counted += 3 * part["outside"] + (body / depths[name] if cfg.scan_layers else body)
    logits, chunks = stacks["logits"]["outside"], _text_positions(cfg)[1]
    return counted + (4 * logits / chunks if chunks > 1 else 3 * logits)


def prefix_flops(cfg: VLAConfig) -> float:
    """sample_actions' first phase per example: ViT + the VLM over the prefix, into the KV cache."""
    sp = prefix_len(cfg)
    parts = _add(_vit_flops(cfg), _decoder_flops([(gemma_variant(cfg.vlm), sp, False)], sp, outputs_needed=False))
    return parts["layers"] + parts["outside"]


def flow_step_flops(cfg: VLAConfig) -> float:
    """One Euler step per example: the action expert over the suffix, attending to cache + suffix."""
    ss = suffix_len(cfg)
    decoder = _decoder_flops([(gemma_variant(cfg.action_expert), ss, cfg.mode == "pi05")], prefix_len(cfg) + ss)
    return decoder["layers"] + decoder["outside"] + _suffix_embed_flops(cfg)


def inference_flops(cfg: VLAConfig, flow_steps: int) -> float:
    """FLOPs of one action chunk per example: prefix once, then flow_steps expert passes."""
    return prefix_flops(cfg) + flow_steps * flow_step_flops(cfg)


# ---------------------------------------------------------------------------------------- memory

def _bytes(dtype: str) -> int:
    return jnp.dtype(dtype).itemsize


def kv_cache_bytes(cfg: VLAConfig) -> int:
    """The prefix KV cache of one example: keys and values of every layer, compute dtype."""
    v = gemma_variant(cfg.vlm)
    return 2 * v.depth * prefix_len(cfg) * v.num_kv_heads * v.head_dim * _bytes(cfg.compute_dtype)


def _layer_activations(cfg: VLAConfig, training: bool) -> list[tuple[int, dict[str, float]]]:
    """(depth, bytes one layer produces per example, by kind) for the ViT and the decoder.

    Kinds follow what remat policies keep: "residual" (the layer input), "dots" (outputs of weight
    matmuls), "attention" (fp32 logits, probabilities, PV output), "other" (norms, GELU, gating).
    """
    cb = _bytes(cfg.compute_dtype)
    v = vit_variant(cfg.vit)
    images, p = len(cfg.cameras) * cfg.context_frames, vit_tokens(cfg)
    hd = v.num_heads * (v.width // v.num_heads)
    vit = {"residual": images * p * v.width * cb,
           "dots": images * p * (3 * hd + 2 * v.width + v.mlp_dim) * cb,
           "attention": images * (v.num_heads * p * p * (4 + cb) + p * hd * cb),
           "other": images * p * (2 * v.width + v.mlp_dim) * cb}
    vlm, expert = gemma_variant(cfg.vlm), gemma_variant(cfg.action_expert)
    streams = [(vlm, prefix_len(cfg)), (expert, suffix_len(cfg))] if training else [(vlm, prefix_len(cfg))]
    queries = sum(s for _, s in streams)
    nd, kd = vlm.num_heads * vlm.head_dim, vlm.num_kv_heads * vlm.head_dim
    dec = {"residual": sum(s * e.width for e, s in streams) * cb,
           "dots": sum(s * (nd + 2 * kd + 2 * e.width + 2 * e.mlp_dim) for e, s in streams) * cb,
           "attention": vlm.num_heads * queries * queries * (4 + cb) + queries * nd * cb,
           "other": sum(s * (2 * e.width + 2 * e.mlp_dim) for e, s in streams) * cb}
    return [(v.depth, vit), (vlm.depth, dec)]


_KEPT_BY_POLICY = {  # activation kinds a remat policy stores for the backward pass
    "nothing_saveable": ("residual",),
    "dots_with_no_batch_dims_saveable": ("residual", "dots"),
    "offload_dots_with_no_batch_dims": ("residual",),  # the dots wait in host memory
    "dots_saveable": ("residual", "dots", "attention"),
    "everything_saveable": ("residual", "dots", "attention", "other"),
    "none": ("residual", "dots", "attention", "other"),
}


def train_activation_bytes(cfg: VLAConfig) -> float:
    """Activations held for the backward pass per example (estimate): what the remat policy keeps
    for every layer, plus the layer being differentiated, whose values and cotangents are live
    together. (XLA's temp buffers for a small config's gradient came within 5% of this with
    nothing_saveable; "none" keeps more fp32 transients than counted here, ~1.4x.)"""
    kept = _KEPT_BY_POLICY[cfg.remat_policy]
    stacks = _layer_activations(cfg, training=True)
    stored = sum(depth * sum(layer[k] for k in kept) for depth, layer in stacks)
    # The text loss materializes fp32 logits over the vocabulary, and their gradient, for
    # text_loss_chunk positions at a time.
    positions, chunks = _text_positions(cfg)
    live = cfg.text_loss_chunk if chunks > 1 else positions
    logits = 2 * live * cfg.vocab_size * 4 if cfg.text_loss_weight else 0
    return stored + 2 * max(sum(layer.values()) for _, layer in stacks) + logits


def inference_activation_bytes(cfg: VLAConfig) -> float:
    """Peak live activations of the prefix phase at batch 1 (one layer at a time, no backward)."""
    return max(sum(layer.values()) for _, layer in _layer_activations(cfg, training=False))


def weight_bytes(cfg: VLAConfig, counts: dict[str, int]) -> dict[str, float]:
    """Bytes of weights each inference phase reads (param dtype), from param_counts(cfg).

    The token embedding table is left out: sample_actions gathers only the prompt's rows.
    """
    pb = _bytes(cfg.param_dtype)
    v = gemma_variant(cfg.vlm)
    vit_head = vit_variant(cfg.vit).width * v.width + v.width
    embedder = cfg.vocab_size * v.width
    return {"prefix": (counts["vit"] + vit_head + counts["vlm"] - embedder) * pb,
            "flow_step": (counts["action_expert"] + counts["projections"] - vit_head) * pb}


# -------------------------------------------------------------------------------------- roofline

def roofline(cfg: VLAConfig, flow_steps: int, chip: Chip, counts: dict[str, int] | None = None) -> dict[str, Any]:
    """Lower bound on sample_actions latency at batch 1 (seconds), phase by phase."""
    weights, cache = weight_bytes(cfg, counts or param_counts(cfg)), kv_cache_bytes(cfg)
    phases = {"prefix": (prefix_flops(cfg), weights["prefix"] + cache),  # the cache is written once
              "flow_step": (flow_step_flops(cfg), weights["flow_step"] + cache)}  # and read every step
    out = {}
    for name, (flops, moved) in phases.items():
        compute_s, memory_s = flops / chip.peak_flops, moved / chip.hbm_bytes_per_s
        out[f"{name}_s"] = max(compute_s, memory_s)
        out[f"{name}_bound"] = "compute" if compute_s >= memory_s else "memory"
    out["chunk_s"] = out["prefix_s"] + flow_steps * out["flow_step_s"]
    return out


def realtime_budget_s(steps_executed: int, control_hz: float) -> float:
    """Seconds until the next chunk is needed: the robot executes steps_executed actions first."""
    return steps_executed / control_hz


# ---------------------------------------------------------------------------------------- report

def report(spec: RunSpec, chip: Chip, chip_name: str) -> dict[str, Any]:
    """Everything the trade-offs tool prints, as a JSON-able dict: the run's model at the
    control-frequency knobs inference runs it at."""
    cfg, counts = spec.model, param_counts(spec.model)
    flow_steps, steps_executed = spec.control.flow_steps, spec.control.steps_executed
    control_hz = spec.control.control_hz
    latency = roofline(cfg, flow_steps, chip, counts)
    budget = realtime_budget_s(steps_executed, control_hz)
    return {
        "params": counts,
        "tokens": {"prefix": prefix_len(cfg), "suffix": suffix_len(cfg), "image": cfg.image_tokens,
                   "action_horizon": cfg.action_horizon},
        "flops": {
            "forward_per_example": forward_flops(cfg)["total"],
            "train_model_per_example": train_flops_per_example(cfg),
            "train_hardware_per_example": train_flops_per_example(cfg, include_remat=True),
            "inference_prefix": prefix_flops(cfg),
            "inference_flow_step": flow_step_flops(cfg),
            "inference_per_chunk": inference_flops(cfg, flow_steps),
        },
        "memory_bytes": {
            "weights": counts["total"] * _bytes(cfg.param_dtype),
            "kv_cache": kv_cache_bytes(cfg),
            "inference_activations": inference_activation_bytes(cfg),
            "train_activations_per_example": train_activation_bytes(cfg),
        },
        "chip": {"name": chip_name, "peak_flops": chip.peak_flops, "hbm_bytes_per_s": chip.hbm_bytes_per_s},
        "latency": latency,
        "realtime": {
            "control_hz": control_hz, "steps_executed": steps_executed, "flow_steps": flow_steps,
            "budget_s": budget, "fits": latency["chunk_s"] <= budget and steps_executed <= cfg.action_horizon,
            "steps_executed_within_horizon": steps_executed <= cfg.action_horizon,
        },
    }
