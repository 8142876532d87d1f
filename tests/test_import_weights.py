"""PaliGemma import (vla/weights): a random tiny transformers PaliGemma and our VLA give the same
logits; the same weights in the big_vision layout import to identical parameters; bad files fail
before anything is assigned, naming the parameter and both shapes; vocabulary rows are cut or
padded only when asked; tools.import_weights' output is itself a weight source."""
from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import save_file  # noqa: E402

from configs import demo, specs  # noqa: E402
from tools.import_weights import import_to_directory  # noqa: E402
from vla.models.vla import VLA, VLAConfig  # noqa: E402
from vla.weights.files import Safetensors  # noqa: E402
from vla.weights.load import InitSource, WeightImportError, init_params  # noqa: E402

# Matches vit "tiny/8" and vlm "gemma_tiny" at 32² images.
VOCAB, IMAGE_TOKEN, IMAGE, PATCH, TEXT = 300, 299, 32, 8, 8
NUM_IMAGE_TOKENS = (IMAGE // PATCH) ** 2
CFG = VLAConfig(vit="tiny/8", vlm="gemma_tiny", vocab_size=VOCAB, image_size=IMAGE, cameras=("base",),
                max_text_tokens=TEXT)


def _hf_model() -> transformers.PaliGemmaForConditionalGeneration:
    vision = transformers.SiglipVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                             intermediate_size=64, patch_size=PATCH, image_size=IMAGE,
                                             vision_use_head=False)
    text = transformers.GemmaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=1, head_dim=16, intermediate_size=128,
                                    vocab_size=VOCAB, hidden_activation="gelu_pytorch_tanh")
    config = transformers.PaliGemmaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                                          image_token_id=IMAGE_TOKEN, projection_dim=64)
    torch.manual_seed(0)
    model = transformers.PaliGemmaForConditionalGeneration(config).float().eval()
    # Norm scales start at 1 (or 0 for Gemma's 1+scale) and biases at 0; perturb every tensor so a
    # mapping that swaps or drops one of them changes the output.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """(transformers model, its save_pretrained directory)."""
    model = _hf_model()
    path = tmp_path_factory.mktemp("paligemma_hf")
    model.save_pretrained(path)
    return model, path


@pytest.fixture(scope="module")
def fresh():
    """A randomly initialized VLA; tests import into clones of it (building one is the slow part)."""
    return VLA(CFG, rngs=nnx.Rngs(0))


def import_into(model: VLA, fmt: str, path, cfg: VLAConfig = CFG, **source) -> tuple[VLA, dict]:
    """A copy of `model` with the source applied through config.init's code, and its report."""
    graphdef, state = nnx.split(nnx.clone(model))
    copy = jax.tree.map(jnp.copy, nnx.to_pure_dict(state))  # clones share arrays; init_params consumes its input
    params, (report,) = init_params([InitSource(fmt, str(path), **source)], cfg, copy)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state), report


@pytest.fixture(scope="module")
def imported(hf, fresh):
    return import_into(fresh, "hf", hf[1])


def _flat_params(model: VLA) -> dict[str, np.ndarray]:
    return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def to_big_vision(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF tensors -> big_vision .npz layout: the inverse of transformers'
    convert_paligemma_weights_to_hf.py (Dense kernels [in, out], MHA [W, N, D], scanned layers)."""
    sd = {k.removeprefix("model."): v for k, v in state_dict.items()}
    vit_layers = lambda name: np.stack([sd[f"vision_tower.encoder.layers.{i}.{name}"] for i in range(2)])
    llm_layers = lambda name: np.stack([sd[f"language_model.layers.{i}.{name}"] for i in range(2)])
    swap = lambda x: x.transpose(0, 2, 1)  # per layer [out, in] -> [in, out]
    w, n, d = 32, 2, 16  # ViT width, heads, head_dim
    big_w, big_n, k, big_d = 64, 4, 1, 16
    block = "img/Transformer/encoderblock/"
    attn, mlp = block + "MultiHeadDotProductAttention_0/", block + "MlpBlock_0/"
    out = {
        "img/embedding/kernel": sd["vision_tower.embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0),
        "img/embedding/bias": sd["vision_tower.embeddings.patch_embedding.bias"],
        "img/pos_embedding": sd["vision_tower.embeddings.position_embedding.weight"][None],
        block + "LayerNorm_0/scale": vit_layers("layer_norm1.weight"),
        block + "LayerNorm_0/bias": vit_layers("layer_norm1.bias"),
        block + "LayerNorm_1/scale": vit_layers("layer_norm2.weight"),
        block + "LayerNorm_1/bias": vit_layers("layer_norm2.bias"),
        attn + "out/kernel": swap(vit_layers("self_attn.out_proj.weight")).reshape(2, n, d, w),
        attn + "out/bias": vit_layers("self_attn.out_proj.bias"),
        mlp + "Dense_0/kernel": swap(vit_layers("mlp.fc1.weight")),
        mlp + "Dense_0/bias": vit_layers("mlp.fc1.bias"),
        mlp + "Dense_1/kernel": swap(vit_layers("mlp.fc2.weight")),
        mlp + "Dense_1/bias": vit_layers("mlp.fc2.bias"),
        "img/Transformer/encoder_norm/scale": sd["vision_tower.post_layernorm.weight"],
        "img/Transformer/encoder_norm/bias": sd["vision_tower.post_layernorm.bias"],
        "img/head/kernel": sd["multi_modal_projector.linear.weight"].T,
        "img/head/bias": sd["multi_modal_projector.linear.bias"],
        "llm/embedder/input_embedding": sd["language_model.embed_tokens.weight"],
        "llm/layers/attn/q_einsum/w": llm_layers("self_attn.q_proj.weight").reshape(2, big_n, big_d, big_w)
        .transpose(0, 1, 3, 2),
        "llm/layers/attn/kv_einsum/w": np.stack(
            [llm_layers(f"self_attn.{x}_proj.weight").reshape(2, k, big_d, big_w).transpose(0, 1, 3, 2)
             for x in "kv"], axis=1),
        "llm/layers/attn/attn_vec_einsum/w": swap(llm_layers("self_attn.o_proj.weight"))
        .reshape(2, big_n, big_d, big_w),
        "llm/layers/mlp/gating_einsum": np.stack([swap(llm_layers("mlp.gate_proj.weight")),
                                                  swap(llm_layers("mlp.up_proj.weight"))], axis=1),
        "llm/layers/mlp/linear": swap(llm_layers("mlp.down_proj.weight")),
        "llm/layers/pre_attention_norm/scale": llm_layers("input_layernorm.weight"),
        "llm/layers/pre_ffw_norm/scale": llm_layers("post_attention_layernorm.weight"),
        "llm/final_norm/scale": sd["language_model.norm.weight"],
    }
    for x, name in (("q", "query"), ("k", "key"), ("v", "value")):
        out[attn + f"{name}/kernel"] = swap(vit_layers(f"self_attn.{x}_proj.weight")).reshape(2, w, n, d)
        out[attn + f"{name}/bias"] = vit_layers(f"self_attn.{x}_proj.bias").reshape(2, n, d)
    return out


@pytest.fixture(scope="module")
def big_vision_tensors(hf):
    return to_big_vision({k: v.numpy() for k, v in hf[0].state_dict().items()})


def save_npz(path, tensors: dict, dtype=np.float32):
    np.savez(path, **{f"params/{k}": v.astype(dtype) if v.dtype.kind == "f" else v for k, v in tensors.items()})
    return path


@nnx.jit  # one compilation instead of one per eager op
def _prefix_logits(model: VLA, batch: dict) -> jax.Array:
    out, _ = model.encode_prefix(model.embed_prefix(batch))
    return model.decoder.logits(out)


@pytest.mark.parametrize("num_targets", [0, 3])
def test_logits_match_transformers(hf, imported, num_targets):
    """Same image and tokens -> same logits. With targets, the last text tokens are causal (HF:
    token_type_ids 1), the rest of the prefix is bidirectional (token_type_ids 0)."""
    model, _ = imported
    rng = np.random.default_rng(num_targets)
    images = rng.integers(0, 256, (2, IMAGE, IMAGE, 3), dtype=np.uint8)
    tokens = rng.integers(0, IMAGE_TOKEN, (2, TEXT)).astype(np.int32)
    target = np.zeros((2, TEXT), bool)
    target[:, TEXT - num_targets:] = True
    batch = dict(images={"base": jnp.asarray(images[:, None])}, tokens=jnp.asarray(tokens),
                 token_mask=jnp.ones((2, TEXT), bool), target_mask=jnp.asarray(target))
    ours = np.asarray(_prefix_logits(model, batch))

    input_ids = np.concatenate([np.full((2, NUM_IMAGE_TOKENS), IMAGE_TOKEN), tokens], axis=1)
    token_type_ids = np.concatenate([np.zeros((2, NUM_IMAGE_TOKENS), int), target], axis=1)
    with torch.no_grad():
        theirs = hf[0](input_ids=torch.tensor(input_ids), token_type_ids=torch.tensor(token_type_ids),
                       pixel_values=torch.tensor(images / 127.5 - 1.0, dtype=torch.float32).permute(0, 3, 1, 2),
                       attention_mask=torch.ones(input_ids.shape, dtype=torch.long)).logits.numpy()
    assert ours.shape == theirs.shape == (2, NUM_IMAGE_TOKENS + TEXT, VOCAB)
    assert np.abs(theirs).max() > 0.1  # a real signal, not near-zero logits
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_report_lists_imported_kept_and_ignored(imported, fresh):
    model, report = imported
    assert "vit/head/kernel" in report["imported"] and "decoder/experts/0/q_einsum" in report["imported"]
    assert all(name.startswith(("decoder/experts/1/", "action_", "state_proj")) for name in report["kept"])
    ours, initial = _flat_params(model), _flat_params(fresh)
    assert ours.keys() == set(report["imported"]) | set(report["kept"])
    for name in report["kept"]:
        np.testing.assert_array_equal(ours[name], initial[name], err_msg=name)
    assert set(report["ignored"]) <= {"lm_head.weight", "language_model.lm_head.weight"}  # tied, if stored
    json.dumps(report)


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_big_vision_imports_identical_parameters(tmp_path, fresh, imported, big_vision_tensors, dtype):
    """The same weights written as a big_vision .npz (with big_vision's "params/" prefix; bf16 as
    numpy stores it, 2-byte void) import to the same parameters."""
    model, _ = import_into(fresh, "big_vision", save_npz(tmp_path / "pg.npz", big_vision_tensors, dtype))
    ours, reference = _flat_params(model), _flat_params(imported[0])
    for name in imported[1]["imported"]:
        np.testing.assert_array_equal(ours[name], reference[name].astype(dtype).astype(np.float32), err_msg=name)


def test_every_problem_is_named_before_anything_is_assigned(tmp_path, fresh, big_vision_tensors):
    """A wrong shape, a missing tensor and a non-float tensor: one error listing all three; an
    unexpected tensor is only reported as ignored."""
    tensors = dict(big_vision_tensors, **{"llm/layers/mlp/linear": np.zeros((2, 96, 64), np.float32),
                                          "img/head/kernel": np.zeros((32, 64), np.int32)})
    del tensors["img/head/bias"]
    with pytest.raises(WeightImportError) as error:
        import_into(fresh, "big_vision", save_npz(tmp_path / "bad.npz", tensors))
    message = str(error.value)
    assert "nothing was assigned" in message
    assert ("decoder/experts/0/linear: llm/layers/mlp/linear has shape (2, 96, 64), the model needs "
            "(2, 128, 64)") in message
    assert "vit/head/bias: img/head/bias is not in the file" in message
    assert "vit/head/kernel: img/head/kernel has dtype int32, the model's is float32" in message

    extra = save_npz(tmp_path / "extra.npz", dict(big_vision_tensors, **{"llm/extra/w": np.zeros(3, np.float32)}))
    assert import_into(fresh, "big_vision", extra)[1]["ignored"] == ["llm/extra/w"]


def test_hf_key_layouts_vocab_rows_and_config_mismatch(tmp_path, hf, fresh, imported):
    """Hub files (`language_model.model.*`, `vision_tower.vision_model.*`, a stored tied
    `language_model.lm_head`) and transformers' in-memory names import the same as 5.x files. A
    larger vocabulary imports only with vocab="truncate", a smaller one only with vocab="pad"
    (the extra rows keep their initialization). An untied head and a config that does not fit
    are errors naming the file key."""
    reader = Safetensors(hf[1])
    tensors = {k: reader.read(k) for k in reader.specs()}
    legacy = {k.replace("vision_tower.", "vision_tower.vision_model."): v for k, v in tensors.items()}
    legacy["language_model.lm_head.weight"] = legacy["language_model.model.embed_tokens.weight"]
    in_memory = {k: v.numpy() for k, v in hf[0].state_dict().items()}  # "model.language_model.*", "lm_head"
    reference = _flat_params(imported[0])
    for i, (layout, head) in enumerate(((legacy, "language_model.lm_head.weight"), (in_memory, "lm_head.weight"))):
        save_file(layout, tmp_path / f"layout{i}.safetensors")
        model, report = import_into(fresh, "hf", tmp_path / f"layout{i}.safetensors")
        assert report["ignored"] == [head]
        ours = _flat_params(model)
        assert all(np.array_equal(ours[k], reference[k]) for k in reference)

    key = "language_model.model.embed_tokens.weight"
    padded = dict(tensors, **{key: np.concatenate([tensors[key], np.ones((20, 64), np.float32)])})
    save_file(padded, tmp_path / "padded.safetensors")
    with pytest.raises(WeightImportError, match=r"has 320 rows, the model vocab_size=300 \(set vocab='truncate'"):
        import_into(fresh, "hf", tmp_path / "padded.safetensors")
    model, report = import_into(fresh, "hf", tmp_path / "padded.safetensors", vocab="truncate")
    assert f"{key}[{VOCAB}:]" in report["ignored"]
    np.testing.assert_array_equal(_flat_params(model)["decoder/embedder"], reference["decoder/embedder"])

    bigger = dataclasses.replace(CFG, vocab_size=VOCAB + 12)
    bigger_model = VLA(bigger, rngs=nnx.Rngs(0))
    with pytest.raises(WeightImportError, match=r"has 300 rows, the model vocab_size=312 \(set vocab='pad'"):
        import_into(bigger_model, "hf", hf[1], bigger)
    model, report = import_into(bigger_model, "hf", hf[1], bigger, vocab="pad")
    embedding = _flat_params(model)["decoder/embedder"]
    np.testing.assert_array_equal(embedding[:VOCAB], reference["decoder/embedder"])
    np.testing.assert_array_equal(embedding[VOCAB:], _flat_params(bigger_model)["decoder/embedder"][VOCAB:])
    assert report["embedding_rows"] == VOCAB

    legacy["language_model.lm_head.weight"] = legacy["language_model.lm_head.weight"] + 1
    save_file(legacy, tmp_path / "untied.safetensors")
    with pytest.raises(WeightImportError, match="lm_head.weight differs from the input embedding"):
        import_into(fresh, "hf", tmp_path / "untied.safetensors")
    other = dataclasses.replace(CFG, vit="tiny/16")
    with pytest.raises(WeightImportError, match=r"vit/patch_kernel: vision_tower.embeddings.patch_embedding.weight "
                                                r"has shape \(32, 3, 8, 8\), the model needs \(32, 3, 16, 16\)"):
        import_into(VLA(other, rngs=nnx.Rngs(0)), "hf", hf[1], other)


def test_import_to_directory_output_is_a_weight_source(tmp_path, hf, imported):
    """What the command line does, on the demo config at the test shapes: OUT/params, used as a
    format "vla" source, gives the imported parameters."""
    config = demo.get_config()
    config.model.image_size, config.model.vocab_size, config.model.cameras = IMAGE, VOCAB, ("base",)
    spec = specs.build(config)
    out = str(tmp_path / "out")
    report = import_to_directory(spec, InitSource("hf", str(hf[1])), out)
    assert json.loads((tmp_path / "out" / "import.json").read_text()) == json.loads(json.dumps(report))
    assert report["format"] == "hf" and report["model"]["vocab_size"] == VOCAB

    fresh = VLA(spec.model, rngs=nnx.Rngs(1))
    model, again = import_into(fresh, "vla", out, spec.model)
    assert again["kept"] == [] and again["ignored"] == []
    ours, reference = _flat_params(model), _flat_params(imported[0])
    for name in report["imported"]:
        np.testing.assert_array_equal(ours[name], reference[name], err_msg=name)
    with pytest.raises(ValueError, match="is a tools.import_weights output; it has no steps"):
        import_into(fresh, "vla", out, spec.model, step=3)
