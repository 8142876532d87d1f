"""Import PaliGemma weights into a VLA, from big_vision .npz files or Hugging Face safetensors.

The SigLIP tower and its projection to the LLM width go to `vla.vit` (the projection is
`vit.head`); the Gemma LLM goes to expert 0 of `vla.decoder` and its tied embedder. The action
expert and the action/state/time projections keep their initialization: PaliGemma has nothing
for them.

Both layouts are mapped by rules onto our parameter paths ("vit/q_kernel",
"decoder/experts/0/q_einsum", ...). Every file tensor is checked against the shape the model's
config implies before anything is assigned, so a wrong file or config fails with the key, the
expected and the found shape, and the missing and unexpected keys, instead of half-loading.

    model = VLA(cfg, rngs=nnx.Rngs(0))        # or sharding.init_sharded(...): shardings are kept
    summary = import_paligemma(model, "pt_224.npz", "big_vision")

`import_to_directory` is the command line's body (tools/import_weights.py): build, import, save
with Orbax plus a JSON report.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from vla.models.variants import gemma_variant, vit_variant
from vla.models.vla import VLA, VLAConfig

FORMATS = ("big_vision", "hf")

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
_HF_TIED_HEAD = "lm_head.weight"  # our output head is the embedder, so the file's must equal it
_EMBEDDING = {"big_vision": "llm/embedder/input_embedding", "hf": "language_model.embed_tokens.weight"}


class WeightImportError(ValueError):
    """The checkpoint does not fit the model: wrong shapes, missing or unexpected keys."""


@dataclasses.dataclass(frozen=True)
class ImportSummary:
    source: str
    format: str
    imported: dict[str, tuple[int, ...]]  # our parameter path -> shape, taken from the file
    kept: tuple[str, ...]  # our parameters left as initialized
    ignored: tuple[str, ...]  # file keys (or rows "key[n:]") read but not needed

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "imported": {k: list(v) for k, v in self.imported.items()}}


@dataclasses.dataclass(frozen=True)
class _Rule:
    """One of our parameters from file tensors that all have the same shape."""

    target: str
    sources: tuple[str, ...]
    shape: tuple[int, ...]
    convert: Callable[[list[np.ndarray]], np.ndarray]


def import_paligemma(model: VLA, path: str | os.PathLike, fmt: str, *, truncate_vocab: bool = False) -> ImportSummary:
    """Overwrites the ViT and the VLM expert of `model` with a PaliGemma checkpoint, in place.

    path: a big_vision .npz file, or a safetensors file or a directory of (sharded) ones.
    truncate_vocab: keep the first vocab_size rows of a larger embedding (transformers' PaliGemma
    appends <image> and padding rows: 257216 vs big_vision's 257152).
    Parameters keep their dtype and sharding. Raises WeightImportError if the file does not fit.
    """
    params, ignored = convert(read_tensors(path, fmt), fmt, model.cfg, truncate_vocab=truncate_vocab)
    variables = {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    for name, value in params.items():
        current = variables[name].get_value()
        if value.shape != current.shape:  # the rules disagree with the model: a bug here, not in the file
            raise WeightImportError(f"{name}: converted shape {value.shape}, the model has {current.shape}")
        value = value.astype(current.dtype)
        # Every process holds the whole file; each device takes its shard (multi-host safe).
        variables[name].set_value(jax.make_array_from_callback(value.shape, current.sharding, value.__getitem__))
    return ImportSummary(source=str(path), format=fmt, imported={k: v.shape for k, v in params.items()},
                         kept=tuple(sorted(variables.keys() - params.keys())), ignored=tuple(ignored))


def import_to_directory(cfg: VLAConfig, seed: int, path: str | os.PathLike, fmt: str, out: str | os.PathLike,
                        *, truncate_vocab: bool = False) -> dict:
    """A VLA initialized from `seed` with the PaliGemma file imported, saved under `out`:

        params/       Orbax (StandardCheckpointer) save of nnx.state(model, nnx.Param)
        import.json   the ImportSummary plus the model variants and the seed

    Returns the JSON report. Restore with the abstract state of the same config:
    `StandardCheckpointer().restore(out/"params", nnx.state(nnx.eval_shape(make_model), nnx.Param))`.
    """
    model = VLA(cfg, rngs=nnx.Rngs(seed))
    summary = import_paligemma(model, path, fmt, truncate_vocab=truncate_vocab)
    # Orbax wants an absolute path or a URL; tools.import_weights passes data/storage.path(--out).
    directory = epath.Path(out if isinstance(out, epath.Path) else os.path.abspath(out))
    directory.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory / "params", nnx.state(model, nnx.Param))
    checkpointer.wait_until_finished()
    report = {**summary.to_json(), "vit": cfg.vit, "vlm": cfg.vlm, "action_expert": cfg.action_expert,
              "image_size": cfg.image_size, "vocab_size": cfg.vocab_size, "seed": seed}
    (directory / "import.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def read_tensors(path: str | os.PathLike, fmt: str) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint by its key in the file (big_vision: without "params/")."""
    if fmt == "big_vision":
        with np.load(path, allow_pickle=False) as f:
            return {k.removeprefix("params/"): _recover_bfloat16(f[k]) for k in f.files}
    if fmt == "hf":
        return _read_safetensors(pathlib.Path(path))
    raise ValueError(f"unknown weight format {fmt!r}; choose from {FORMATS}")


def convert(tensors: Mapping[str, np.ndarray], fmt: str, cfg: VLAConfig, *,
            truncate_vocab: bool = False) -> tuple[dict[str, np.ndarray], list[str]]:
    """File tensors -> (our parameters by path, file keys or rows read but not needed).

    Checks every key and shape first and raises one WeightImportError listing all problems.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}; choose from {FORMATS}")
    if fmt == "hf":
        names = _hf_canonical_names(tensors)
        rules = _hf_rules(cfg)
    else:
        names = {k: k for k in tensors}
        rules = _big_vision_rules(cfg)
    by_name = {short: tensors[key] for short, key in names.items()}
    ignored = []
    if fmt == "hf" and _HF_TIED_HEAD in by_name:
        _check_tied_head(by_name, names)
        ignored.append(names.pop(_HF_TIED_HEAD))
    embedding = _EMBEDDING[fmt]
    extra_rows = by_name[embedding].shape[0] - cfg.vocab_size if embedding in by_name else 0
    if truncate_vocab and extra_rows > 0:
        by_name[embedding] = by_name[embedding][:cfg.vocab_size]
        ignored.append(f"{names[embedding]}[{cfg.vocab_size}:]")
        extra_rows = 0

    missing, wrong = [], []
    for rule in rules:
        for key in rule.sources:
            if key not in names:
                missing.append(key)
            elif tuple(by_name[key].shape) != rule.shape:
                hint = " (truncate_vocab keeps the first rows)" if key == embedding and extra_rows > 0 else ""
                wrong.append(f"{names[key]}: expected shape {rule.shape}, found {tuple(by_name[key].shape)}{hint}")
    used = {key for rule in rules for key in rule.sources}
    unexpected = sorted(names[k] for k in names.keys() - used)
    if missing or wrong or unexpected:
        raise WeightImportError(_problems(fmt, cfg, wrong, missing, unexpected))
    return {rule.target: rule.convert([by_name[k] for k in rule.sources]) for rule in rules}, ignored


def _problems(fmt: str, cfg: VLAConfig, wrong: list[str], missing: list[str], unexpected: list[str]) -> str:
    def listing(title, items, limit=12):
        more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
        return f"  {title} ({len(items)}):\n" + "\n".join(f"    {i}" for i in items[:limit]) + more

    parts = [f"{fmt} checkpoint does not fit vit={cfg.vit!r} vlm={cfg.vlm!r} image_size={cfg.image_size} "
             f"vocab_size={cfg.vocab_size}:"]
    for title, items in (("shape mismatches", wrong), ("missing keys", missing), ("unexpected keys", unexpected)):
        if items:
            parts.append(listing(title, items))
    return "\n".join(parts)


def _read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open  # optional dependency: the "hf" extra

    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files:
        raise WeightImportError(f"no *.safetensors files in {path}")
    tensors = {}
    # The numpy reader of safetensors cannot represent bfloat16; the flax one can. Host memory
    # only: the arrays are assigned to their (possibly sharded) places afterwards.
    with jax.default_device(jax.devices("cpu")[0]):
        for file in files:
            with safe_open(file, framework="flax") as f:
                tensors.update({key: np.asarray(f.get_tensor(key)) for key in f.keys()})
    return tensors


def _recover_bfloat16(x: np.ndarray) -> np.ndarray:
    """np.savez writes bfloat16 as 2-byte void (it has no such type); view it back."""
    return x.view(jnp.bfloat16) if x.dtype.kind == "V" and x.dtype.itemsize == 2 else x


def _hf_canonical_names(tensors: Mapping[str, np.ndarray]) -> dict[str, str]:
    names: dict[str, str] = {}
    for key in tensors:
        short = key
        for pattern, replacement in _HF_RENAMES:
            short = pattern.sub(replacement, short)
        if short in names:
            raise WeightImportError(f"{names[short]!r} and {key!r} name the same parameter")
        names[short] = key
    return names


def _check_tied_head(tensors: Mapping[str, np.ndarray], names: Mapping[str, str]) -> None:
    embedding = tensors.get("language_model.embed_tokens.weight")
    head = tensors[_HF_TIED_HEAD]
    if embedding is not None and (head.shape != embedding.shape or not np.array_equal(head, embedding)):
        raise WeightImportError(f"{names[_HF_TIED_HEAD]} differs from the input embedding; the VLA ties "
                                "its output head to the embedder and cannot hold a separate one")


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


def _big_vision_rules(cfg: VLAConfig) -> list[_Rule]:
    """big_vision PaliGemma: ViT blocks and Gemma layers scanned (stacked), MHA kernels [W, N, D]."""
    vit, llm = vit_variant(cfg.vit), gemma_variant(cfg.vlm)  # lower-case sizes: ViT; big_*: LLM
    w, m, n, p, depth = vit.width, vit.mlp_dim, vit.num_heads, vit.patch, vit.depth
    d, tokens = w // n, (cfg.image_size // p) ** 2
    big_w, big_m, big_n, k, big_d, layers = (llm.width, llm.mlp_dim, llm.num_heads, llm.num_kv_heads,
                                             llm.head_dim, llm.depth)
    block, attn = "img/Transformer/encoderblock/", "img/Transformer/encoderblock/MultiHeadDotProductAttention_0/"
    expert = "decoder/experts/0/"

    def rule(target, source, shape, convert=_only):
        return _Rule(target, (source,), shape, convert)

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


def _hf_rules(cfg: VLAConfig) -> list[_Rule]:
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
        _Rule("vit/patch_kernel", ("vision_tower.embeddings.patch_embedding.weight",), (w, 3, p, p),
              lambda xs: xs[0].transpose(2, 3, 1, 0)),
        _Rule("vit/patch_bias", ("vision_tower.embeddings.patch_embedding.bias",), (w,), _only),
        _Rule("vit/pos_embedding", ("vision_tower.embeddings.position_embedding.weight",), (tokens, w), _only),
        _Rule("vit/ln1_scale", block("layer_norm1.weight"), (w,), np.stack),
        _Rule("vit/ln1_bias", block("layer_norm1.bias"), (w,), np.stack),
        _Rule("vit/q_kernel", block("self_attn.q_proj.weight"), (w, w), _per_layer(vit_heads_in)),
        _Rule("vit/k_kernel", block("self_attn.k_proj.weight"), (w, w), _per_layer(vit_heads_in)),
        _Rule("vit/v_kernel", block("self_attn.v_proj.weight"), (w, w), _per_layer(vit_heads_in)),
        _Rule("vit/q_bias", block("self_attn.q_proj.bias"), (w,), _per_layer(lambda x: x.reshape(n, d))),
        _Rule("vit/k_bias", block("self_attn.k_proj.bias"), (w,), _per_layer(lambda x: x.reshape(n, d))),
        _Rule("vit/v_bias", block("self_attn.v_proj.bias"), (w,), _per_layer(lambda x: x.reshape(n, d))),
        _Rule("vit/o_kernel", block("self_attn.out_proj.weight"), (w, w), _per_layer(lambda x: x.T.reshape(n, d, w))),
        _Rule("vit/o_bias", block("self_attn.out_proj.bias"), (w,), np.stack),
        _Rule("vit/ln2_scale", block("layer_norm2.weight"), (w,), np.stack),
        _Rule("vit/ln2_bias", block("layer_norm2.bias"), (w,), np.stack),
        _Rule("vit/mlp1_kernel", block("mlp.fc1.weight"), (m, w), _per_layer(_transpose)),
        _Rule("vit/mlp1_bias", block("mlp.fc1.bias"), (m,), np.stack),
        _Rule("vit/mlp2_kernel", block("mlp.fc2.weight"), (w, m), _per_layer(_transpose)),
        _Rule("vit/mlp2_bias", block("mlp.fc2.bias"), (w,), np.stack),
        _Rule("vit/final_ln_scale", ("vision_tower.post_layernorm.weight",), (w,), _only),
        _Rule("vit/final_ln_bias", ("vision_tower.post_layernorm.bias",), (w,), _only),
        _Rule("vit/head/kernel", ("multi_modal_projector.linear.weight",), (big_w, w), lambda xs: xs[0].T),
        _Rule("vit/head/bias", ("multi_modal_projector.linear.bias",), (big_w,), _only),
        _Rule("decoder/embedder", ("language_model.embed_tokens.weight",), (cfg.vocab_size, big_w), _only),
        _Rule(expert + "q_einsum", layer("self_attn.q_proj.weight"), (big_n * big_d, big_w),
              _per_layer(llm_heads_in(big_n))),
        _Rule(expert + "kv_einsum", layer("self_attn.k_proj.weight") + layer("self_attn.v_proj.weight"),
              (k * big_d, big_w), _per_layer_pair(llm_heads_in(k))),
        _Rule(expert + "attn_vec_einsum", layer("self_attn.o_proj.weight"), (big_w, big_n * big_d),
              _per_layer(lambda x: x.T.reshape(big_n, big_d, big_w))),
        _Rule(expert + "gating_einsum", layer("mlp.gate_proj.weight") + layer("mlp.up_proj.weight"),
              (big_m, big_w), _per_layer_pair(_transpose)),
        _Rule(expert + "linear", layer("mlp.down_proj.weight"), (big_w, big_m), _per_layer(_transpose)),
        _Rule(expert + "pre_attention_norm", layer("input_layernorm.weight"), (big_w,), np.stack),
        _Rule(expert + "pre_ffw_norm", layer("post_attention_layernorm.weight"), (big_w,), np.stack),
        _Rule(expert + "final_norm", ("language_model.norm.weight",), (big_w,), _only),
    ]
