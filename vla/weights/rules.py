"""How each checkpoint layout names our parameters: one Rule per parameter of ours.

A Rule says which file tensors (all of one shape) make one of our parameters and how:

    Rule("decoder/experts/0/q_einsum", ("llm/layers/attn/q_einsum/w",), (depth, N, W, D), only)

Layouts:
    big_vision  PaliGemma .npz: ViT blocks and Gemma layers scanned, MHA kernels [W, N, D]
    hf          transformers' PaliGemmaForConditionalGeneration: torch Linear weights [out, in],
                one tensor per layer, tensor names as in any transformers version
    openpi      an openpi π0 / π0.5 params tree: big_vision's layout under "PaliGemma/", the
                action expert as the same names with a "_1" suffix (adaRMSNorm as
                "<norm>_1/Dense_0/{kernel,bias}"), the action/state/time projections as ours
    vla         our own parameter paths (tools.import_weights output, another run)

The shapes come from the model config, so a file of another model fails on the parameter with
both shapes. PaliGemma layouts fill the ViT and the VLM (expert 0) only.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping

import numpy as np

from vla.models.variants import gemma_variant, vit_variant
from vla.models.vla import VLAConfig

FORMATS = ("big_vision", "hf", "openpi", "vla")
EMBEDDING = "decoder/embedder"  # the one parameter whose rows (the vocabulary) may be cut or padded

# The same tensors are named differently by transformers versions: hub files and 4.x
# ("language_model.model.layers", "vision_tower.vision_model"), in-memory names since 4.52
# ("model.language_model.layers") and 5.x saves ("vision_tower.embeddings"). Rules use the
# shortest form; these rewrites bring every variant to it.
_HF_RENAMES = (
    (re.compile(r"^model\."), ""),
    (re.compile(r"^language_model\.model\."), "language_model."),
    (re.compile(r"^language_model\.lm_head\."), "lm_head."),
    (re.compile(r"^vision_tower\.vision_model\."), "vision_tower."),
)
HF_TIED_HEAD = "lm_head.weight"  # our output head is the embedder, so the file's must equal it


@dataclasses.dataclass(frozen=True)
class Rule:
    """One of our parameters from file tensors that all have the same shape."""

    target: str
    sources: tuple[str, ...]
    shape: tuple[int, ...]
    convert: Callable[[list[np.ndarray]], np.ndarray]


def rules(layout: str, cfg: VLAConfig, targets: Mapping[str, tuple[int, ...]]) -> list[Rule]:
    """The rules of `layout` for the model `cfg`, whose parameters (path -> shape) are `targets`."""
    if layout == "big_vision":
        return _big_vision_rules(cfg)
    if layout == "hf":
        return _hf_rules(cfg)
    if layout == "openpi":
        return _openpi_rules(cfg)
    if layout == "vla":
        return [Rule(path, (path,), shape, _only) for path, shape in targets.items()]
    raise ValueError(f"unknown weight layout {layout!r}; choose from {FORMATS}")


def canonical_names(layout: str, keys: list[str]) -> dict[str, str]:
    """The name rules use -> the file's key (transformers' variants brought to one form)."""
    if layout != "hf":
        return {k: k for k in keys}
    names: dict[str, str] = {}
    for key in keys:
        short = key
        for pattern, replacement in _HF_RENAMES:
            short = pattern.sub(replacement, short)
        if short in names:
            raise ValueError(f"{names[short]!r} and {key!r} name the same parameter")
        names[short] = key
    return names


# ---------------------------------------------------------------------------------------- rules

def _only(xs: list[np.ndarray]) -> np.ndarray:
    return xs[0]


def _per_layer(f: Callable[[np.ndarray], np.ndarray]) -> Callable[[list[np.ndarray]], np.ndarray]:
    """Stacks f(layer tensor) over layers, our scanned layout."""
    return lambda xs: np.stack([f(x) for x in xs])


def _per_layer_pair(f: Callable[[np.ndarray], np.ndarray]) -> Callable[[list[np.ndarray]], np.ndarray]:
    """Sources = all layers of one tensor then all layers of another (k then v, gate then up)
    -> [layers, 2, ...], the layout of big_vision's kv_einsum and gating_einsum."""
    def stack(xs):
        n = len(xs) // 2
        return np.stack([np.stack([f(a), f(b)]) for a, b in zip(xs[:n], xs[n:])])
    return stack


def _transpose(x: np.ndarray) -> np.ndarray:
    return x.T


def _big_vision_rules(cfg: VLAConfig, prefix: str = "") -> list[Rule]:
    """big_vision PaliGemma: ViT blocks and Gemma layers scanned (stacked), MHA kernels [W, N, D].
    prefix: where the tree sits in the file (openpi: "PaliGemma/")."""
    vit, llm = vit_variant(cfg.vit), gemma_variant(cfg.vlm)  # lower-case sizes: ViT; big_*: LLM
    w, m, n, p, depth = vit.width, vit.mlp_dim, vit.num_heads, vit.patch, vit.depth
    d, tokens = w // n, (cfg.image_size // p) ** 2
    big_w, big_m, big_n, k, big_d, layers = (llm.width, llm.mlp_dim, llm.num_heads, llm.num_kv_heads,
                                             llm.head_dim, llm.depth)
    block, attn = "img/Transformer/encoderblock/", "img/Transformer/encoderblock/MultiHeadDotProductAttention_0/"
    expert = "decoder/experts/0/"

    def rule(target, source, shape, convert=_only):
        return Rule(target, (prefix + source,), shape, convert)

    return [
        rule("vit/patch_kernel", "img/embedding/kernel", (p, p, 3, w)),
        rule("vit/patch_bias", "img/embedding/bias", (w,)),
        rule("vit/pos_embedding", "img/pos_embedding", (1, tokens, w), lambda xs: xs[0][0]),
        rule("vit/ln1_scale", block + "LayerNorm_0/scale", (depth, w)),
        rule("vit/ln1_bias", block + "LayerNorm_0/bias", (depth, w)),
        rule("vit/q_kernel", attn + "query/kernel", (depth, w, n, d)),
        rule("vit/k_kernel", attn + "key/kernel", (depth, w, n, d)),
        rule("vit/v_kernel", attn + "value/kernel", (depth, w, n, d)),
        rule("vit/q_bias", attn + "query/bias", (depth, n, d)),
        rule("vit/k_bias", attn + "key/bias", (depth, n, d)),
        rule("vit/v_bias", attn + "value/bias", (depth, n, d)),
        rule("vit/o_kernel", attn + "out/kernel", (depth, n, d, w)),
        rule("vit/o_bias", attn + "out/bias", (depth, w)),
        rule("vit/ln2_scale", block + "LayerNorm_1/scale", (depth, w)),
        rule("vit/ln2_bias", block + "LayerNorm_1/bias", (depth, w)),
        rule("vit/mlp1_kernel", block + "MlpBlock_0/Dense_0/kernel", (depth, w, m)),
        rule("vit/mlp1_bias", block + "MlpBlock_0/Dense_0/bias", (depth, m)),
        rule("vit/mlp2_kernel", block + "MlpBlock_0/Dense_1/kernel", (depth, m, w)),
        rule("vit/mlp2_bias", block + "MlpBlock_0/Dense_1/bias", (depth, w)),
        rule("vit/final_ln_scale", "img/Transformer/encoder_norm/scale", (w,)),
        rule("vit/final_ln_bias", "img/Transformer/encoder_norm/bias", (w,)),
        rule("vit/head/kernel", "img/head/kernel", (w, big_w)),
        rule("vit/head/bias", "img/head/bias", (big_w,)),
        rule("decoder/embedder", "llm/embedder/input_embedding", (cfg.vocab_size, big_w)),
        rule(expert + "q_einsum", "llm/layers/attn/q_einsum/w", (layers, big_n, big_w, big_d)),
        rule(expert + "kv_einsum", "llm/layers/attn/kv_einsum/w", (layers, 2, k, big_w, big_d)),
        rule(expert + "attn_vec_einsum", "llm/layers/attn/attn_vec_einsum/w", (layers, big_n, big_d, big_w)),
        rule(expert + "gating_einsum", "llm/layers/mlp/gating_einsum", (layers, 2, big_w, big_m)),
        rule(expert + "linear", "llm/layers/mlp/linear", (layers, big_m, big_w)),
        rule(expert + "pre_attention_norm", "llm/layers/pre_attention_norm/scale", (layers, big_w)),
        rule(expert + "pre_ffw_norm", "llm/layers/pre_ffw_norm/scale", (layers, big_w)),
        rule(expert + "final_norm", "llm/final_norm/scale", (big_w,)),
    ]


def _hf_rules(cfg: VLAConfig) -> list[Rule]:
    """transformers' PaliGemmaForConditionalGeneration: torch Linear weights are [out, in], heads
    are the slow half of the out dimension, the patch conv is [out, in, h, w]."""
    vit, llm = vit_variant(cfg.vit), gemma_variant(cfg.vlm)  # lower-case sizes: ViT; big_*: LLM
    w, m, n, p = vit.width, vit.mlp_dim, vit.num_heads, vit.patch
    d, tokens = w // n, (cfg.image_size // p) ** 2
    big_w, big_m, big_n, k, big_d = llm.width, llm.mlp_dim, llm.num_heads, llm.num_kv_heads, llm.head_dim
    expert = "decoder/experts/0/"

    def block(name):
        return tuple(f"vision_tower.encoder.layers.{i}.{name}" for i in range(vit.depth))

    def layer(name):
        return tuple(f"language_model.layers.{i}.{name}" for i in range(llm.depth))

    def vit_heads_in(x):  # [N*D, W] -> [W, N, D]
        return x.T.reshape(w, n, d)

    def llm_heads_in(heads):  # [H*D, W] -> [H, W, D]
        return lambda x: x.reshape(heads, big_d, big_w).transpose(0, 2, 1)

    return [
        Rule("vit/patch_kernel", ("vision_tower.embeddings.patch_embedding.weight",), (w, 3, p, p),
              lambda xs: xs[0].transpose(2, 3, 1, 0)),
        Rule("vit/patch_bias", ("vision_tower.embeddings.patch_embedding.bias",), (w,), _only),
        Rule("vit/pos_embedding", ("vision_tower.embeddings.position_embedding.weight",), (tokens, w), _only),
        Rule("vit/ln1_scale", block("layer_norm1.weight"), (w,), np.stack),
        Rule("vit/ln1_bias", block("layer_norm1.bias"), (w,), np.stack),
        Rule("vit/q_kernel", block("self_attn.q_proj.weight"), (w, w), _per_layer(vit_heads_in)),
        Rule("vit/k_kernel", block("self_attn.k_proj.weight"), (w, w), _per_layer(vit_heads_in)),
        Rule("vit/v_kernel", block("self_attn.v_proj.weight"), (w, w), _per_layer(vit_heads_in)),
        Rule("vit/q_bias", block("self_attn.q_proj.bias"), (w,), _per_layer(lambda x: x.reshape(n, d))),
        Rule("vit/k_bias", block("self_attn.k_proj.bias"), (w,), _per_layer(lambda x: x.reshape(n, d))),
        Rule("vit/v_bias", block("self_attn.v_proj.bias"), (w,), _per_layer(lambda x: x.reshape(n, d))),
        Rule("vit/o_kernel", block("self_attn.out_proj.weight"), (w, w), _per_layer(lambda x: x.T.reshape(n, d, w))),
        Rule("vit/o_bias", block("self_attn.out_proj.bias"), (w,), np.stack),
        Rule("vit/ln2_scale", block("layer_norm2.weight"), (w,), np.stack),
        Rule("vit/ln2_bias", block("layer_norm2.bias"), (w,), np.stack),
        Rule("vit/mlp1_kernel", block("mlp.fc1.weight"), (m, w), _per_layer(_transpose)),
        Rule("vit/mlp1_bias", block("mlp.fc1.bias"), (m,), np.stack),
        Rule("vit/mlp2_kernel", block("mlp.fc2.weight"), (w, m), _per_layer(_transpose)),
        Rule("vit/mlp2_bias", block("mlp.fc2.bias"), (w,), np.stack),
        Rule("vit/final_ln_scale", ("vision_tower.post_layernorm.weight",), (w,), _only),
        Rule("vit/final_ln_bias", ("vision_tower.post_layernorm.bias",), (w,), _only),
        Rule("vit/head/kernel", ("multi_modal_projector.linear.weight",), (big_w, w), lambda xs: xs[0].T),
        Rule("vit/head/bias", ("multi_modal_projector.linear.bias",), (big_w,), _only),
        Rule("decoder/embedder", ("language_model.embed_tokens.weight",), (cfg.vocab_size, big_w), _only),
        Rule(expert + "q_einsum", layer("self_attn.q_proj.weight"), (big_n * big_d, big_w),
              _per_layer(llm_heads_in(big_n))),
        Rule(expert + "kv_einsum", layer("self_attn.k_proj.weight") + layer("self_attn.v_proj.weight"),
              (k * big_d, big_w), _per_layer_pair(llm_heads_in(k))),
        Rule(expert + "attn_vec_einsum", layer("self_attn.o_proj.weight"), (big_w, big_n * big_d),
              _per_layer(lambda x: x.T.reshape(big_n, big_d, big_w))),
        Rule(expert + "gating_einsum", layer("mlp.gate_proj.weight") + layer("mlp.up_proj.weight"),
              (big_m, big_w), _per_layer_pair(_transpose)),
        Rule(expert + "linear", layer("mlp.down_proj.weight"), (big_w, big_m), _per_layer(_transpose)),
        Rule(expert + "pre_attention_norm", layer("input_layernorm.weight"), (big_w,), np.stack),
        Rule(expert + "pre_ffw_norm", layer("post_attention_layernorm.weight"), (big_w,), np.stack),
        Rule(expert + "final_norm", ("language_model.norm.weight",), (big_w,), _only),
    ]


def _openpi_rules(cfg: VLAConfig) -> list[Rule]:
    """openpi's Pi0 params: PaliGemma in big_vision's layout, the action expert's weights beside
    expert 0's with a "_1" suffix (gemma.py's Module builds one set per expert), π0.5's
    adaRMSNorm as a Dense under each norm, the projections named as ours."""
    expert = gemma_variant(cfg.action_expert)
    w, m, n, k, d, layers = (expert.width, expert.mlp_dim, expert.num_heads, expert.num_kv_heads,
                             expert.head_dim, expert.depth)
    llm, ours = "PaliGemma/llm/", "decoder/experts/1/"

    def rule(target, source, shape):
        return Rule(target, (source,), shape, _only)

    out = _big_vision_rules(cfg, prefix="PaliGemma/") + [
        rule(ours + "q_einsum", llm + "layers/attn/q_einsum_1/w", (layers, n, w, d)),
        rule(ours + "kv_einsum", llm + "layers/attn/kv_einsum_1/w", (layers, 2, k, w, d)),
        rule(ours + "attn_vec_einsum", llm + "layers/attn/attn_vec_einsum_1/w", (layers, n, d, w)),
        rule(ours + "gating_einsum", llm + "layers/mlp_1/gating_einsum", (layers, 2, w, m)),
        rule(ours + "linear", llm + "layers/mlp_1/linear", (layers, m, w)),
    ]
    if cfg.mode == "pi05":  # adaRMSNorm: conditioned on the time MLP's output (width w)
        for target, norm, stacked in (("pre_attention_mod", "layers/pre_attention_norm_1", True),
                                      ("pre_ffw_mod", "layers/pre_ffw_norm_1", True),
                                      ("final_mod", "final_norm_1", False)):
            lead = (layers,) if stacked else ()
            out += [rule(f"{ours}{target}_kernel", f"{llm}{norm}/Dense_0/kernel", (*lead, w, 3 * w)),
                    rule(f"{ours}{target}_bias", f"{llm}{norm}/Dense_0/bias", (*lead, 3 * w))]
        projections = {"time_mlp_in": (w, w), "time_mlp_out": (w, w)}
    else:
        out += [rule(ours + "pre_attention_norm", llm + "layers/pre_attention_norm_1/scale", (layers, w)),
                rule(ours + "pre_ffw_norm", llm + "layers/pre_ffw_norm_1/scale", (layers, w)),
                rule(ours + "final_norm", llm + "final_norm_1/scale", (w,))]
        projections = {"state_proj": (cfg.state_dim, w), "action_time_mlp_in": (2 * w, w),
                       "action_time_mlp_out": (w, w)}
    projections.update(action_in_proj=(cfg.action_dim, w), action_out_proj=(w, cfg.action_dim))
    for name, (d_in, d_out) in projections.items():
        out += [rule(f"{name}/kernel", f"{name}/kernel", (d_in, d_out)), rule(f"{name}/bias", f"{name}/bias", (d_out,))]
    return out
