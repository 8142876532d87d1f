"""LoRA (vla/models/lora.py): only adapters train, with no moments or EMA for the frozen base;
merging them (what tools.export does) leaves the model's outputs unchanged; bad targets fail."""
import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from configs import specs
from tests.model_util import random_batch, tiny_config
from tests.test_train import small_config
from vla import bundle as bundle_lib
from vla import optimizer as optimizer_lib
from vla import sharding
from vla import train as train_lib
from vla.models import lora
from vla.models import vla as vla_lib
from vla.models.gemma import Decoder
from vla.models.variants import gemma_variant
from vla.models.vla import VLA
from vla.sharding import DEFAULT_RULES

# Every projection of the action expert, two of the VLM's.
TARGETS = ("decoder/experts/1/", "decoder/experts/0/(q_einsum|linear)$")
LORA = tiny_config(lora_rank=3, lora_alpha=6.0, lora_targets=TARGETS)


def _path(key_path) -> str:
    return jax.tree_util.keystr(key_path, simple=True, separator="/")


def _flat(tree) -> dict[str, jax.Array]:
    return {_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _params(model) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


@jax.jit
def _outputs(params, batch):
    """(loss, sampled actions) of a LoRA-shaped or plain tiny model's parameters."""
    lora_on = "q_einsum_lora_a" in params["decoder"]["experts"][1]
    model = nnx.merge(_GRAPHDEFS[lora_on], params)
    noise = jax.random.normal(jax.random.key(1), (batch["tokens"].shape[0], LORA.action_horizon, LORA.action_dim))
    return model.loss(batch, jax.random.key(0))[0], model.sample_actions(batch, noise=noise, num_steps=2)


def _abstract(cfg):
    return nnx.eval_shape(lambda: VLA(cfg, rngs=nnx.Rngs(0)))


_GRAPHDEFS = {on: nnx.split(_abstract(c))[0]
              for on, c in ((True, LORA), (False, dataclasses.replace(LORA, lora_rank=0, lora_targets=())))}


@pytest.fixture(scope="module")
def fresh() -> dict:
    """Parameters of the LoRA model with random values (from numpy: no initialization to
    compile) and, as initialized, every B zero."""
    rng = np.random.default_rng(0)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros(x.shape) if _path(path).endswith(lora.B_SUFFIX)
        else jnp.asarray(0.1 * rng.standard_normal(x.shape, np.float32)), _params(_abstract(LORA)))


@pytest.fixture(scope="module")
def params(fresh) -> dict:
    """The same with non-zero adapters (as after training): they change the outputs, and both A
    and B get gradients."""
    rng = np.random.default_rng(1)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.3 * rng.standard_normal(x.shape, np.float32) if lora.is_adapter(_path(path)) else x,
        fresh)


def test_adapter_shapes_names_and_targets():
    fresh = _abstract(LORA)
    flat = _flat(_params(fresh))
    adapters = sorted(p for p in flat if lora.is_adapter(p))
    assert adapters == sorted(f"decoder/experts/{e}/{w}{s}" for e, ws in
                              ((0, ["q_einsum", "linear"]), (1, list(lora.EXPERT_WEIGHTS)))
                              for w in ws for s in (lora.A_SUFFIX, lora.B_SUFFIX))
    kv_a, kv_b = flat["decoder/experts/1/kv_einsum_lora_a"], flat["decoder/experts/1/kv_einsum_lora_b"]
    assert kv_a.shape == (2, 2, 32, 3) and kv_b.shape == (2, 2, 3, 1, 16)  # [L, 2, W, r], [L, 2, r, K, D]
    specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(fresh)))["decoder"]["experts"][1]
    assert tuple(specs["q_einsum_lora_b"]) == ("layers", "lora_rank", "heads", "head_dim")
    assert tuple(specs["attn_vec_einsum_lora_a"]) == ("layers", "heads", "head_dim", "lora_rank")
    assert dict(DEFAULT_RULES)["lora_rank"] is None


@functools.partial(jax.jit, static_argnums=0)
def _decoder_init(with_lora: bool) -> tuple[dict, jax.Array]:
    """A tiny decoder's parameters, and how many keys it drew from the params stream."""
    rngs = nnx.Rngs(0)
    variants = [gemma_variant(LORA.vlm), gemma_variant(LORA.action_expert)]
    decoder = Decoder(variants, LORA.vocab_size, rngs=rngs, lora=LORA.lora_experts() if with_lora else None)
    return _params(decoder), rngs.params.count[...]


def test_fresh_adapters_change_nothing_and_leave_the_base_init_alone(fresh):
    (on, on_draws), (off, off_draws) = _decoder_init(True), _decoder_init(False)
    assert int(on_draws) == int(off_draws)  # so every later parameter initializes the same too
    flat_on = _flat(on)
    for path, x in _flat(off).items():
        np.testing.assert_array_equal(flat_on[path], x, err_msg=path)
    adapters = {p: x for p, x in flat_on.items() if lora.is_adapter(p)}
    assert len(adapters) == 2 * (2 + len(lora.EXPERT_WEIGHTS))
    assert all(np.any(x) != p.endswith(lora.B_SUFFIX) for p, x in adapters.items())  # A random, B zero
    batch = random_batch(LORA)
    base = optimizer_lib.select(fresh, jax.tree.map(lambda p: not lora.is_adapter(p), optimizer_lib.param_paths(fresh)))
    for a, b in zip(_outputs(fresh, batch), _outputs(base, batch)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_merged_weights_give_the_unmerged_outputs(fresh, params):
    merged, cfg = lora.merge_lora(params, LORA)
    assert (cfg.lora_rank, cfg.lora_targets) == (0, ())
    assert not any(lora.is_adapter(p) for p in _flat(merged))
    batch = random_batch(LORA)
    (loss, actions), (merged_loss, merged_actions) = _outputs(params, batch), _outputs(merged, batch)
    assert abs(float(loss) - float(_outputs(fresh, batch)[0])) > 1e-3  # the adapters are not a no-op here
    np.testing.assert_allclose(merged_loss, loss, rtol=1e-5)
    np.testing.assert_allclose(merged_actions, actions, rtol=1e-4, atol=1e-5)
    bf16, _ = lora.merge_lora(jax.tree.map(lambda x: x.astype(jnp.bfloat16), params), LORA)
    assert {x.dtype for x in jax.tree.leaves(bf16)} == {jnp.dtype(jnp.bfloat16)}


@pytest.fixture(scope="module")
def stepped(params):
    """(state before, state after) one step of the trainer's own step, EMA on, on 2 devices."""
    spec = optimizer_lib.OptimizerSpec(lr=1e-2, warmup_steps=0, min_lr_ratio=1.0, b1=0.9, b2=0.95, eps=1e-8,
                                       weight_decay=0.1, clip_norm=1.0, ema_decay=0.5, grad_accum_steps=1,
                                       freeze=(), total_steps=10)
    mesh = sharding.make_mesh({"data": 2}, jax.devices()[:2])
    tx = optimizer_lib.make_optimizer(spec, params)
    before = jax.device_get(train_lib.init_state(spec, mesh, tx, jax.tree.map(jnp.copy, params)))
    step = jax.jit(train_lib.make_train_step(spec, 0, _GRAPHDEFS[True], tx, num_sources=2))
    with jax.set_mesh(mesh):
        after, metrics = step(jax.tree.map(jnp.asarray, before), random_batch(LORA))
    assert np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
    return before, jax.device_get(after)


def test_train_step_moves_only_the_adapters(stepped):
    before, after = map(_flat, (b["params"] for b in stepped))
    adapters = [p for p in before if lora.is_adapter(p)]
    assert len(adapters) == 2 * (2 + len(lora.EXPERT_WEIGHTS))
    for path, x in before.items():
        if lora.is_adapter(path):
            assert np.all(after[path] != x), path  # A and B alike: B is non-zero here
        else:
            assert after[path].tobytes() == x.tobytes(), path


def test_optimizer_state_and_ema_hold_only_adapters(stepped):
    state = stepped[1]
    adapters = {p: x for p, x in _flat(state["params"]).items() if lora.is_adapter(p)}
    size = sum(x.nbytes for x in adapters.values())
    moments = [x for x in jax.tree.leaves(state["opt_state"]) if x.ndim]  # less the step counters
    assert len(moments) == 2 * len(adapters) and sum(x.nbytes for x in moments) == 2 * size
    assert sum(x.nbytes for x in jax.tree.leaves(state["opt_state"])) < 2 * size + 64
    assert set(_flat(state["ema"])) == set(adapters)


def test_freeze_patterns_apply_on_top_of_lora():
    params = _params(_abstract(LORA))
    trainable = [p for p, t in _flat(optimizer_lib.trainable_mask(params, ("experts/0/",))).items() if t]
    assert trainable and all(lora.is_adapter(p) and p.startswith("decoder/experts/1/") for p in trainable)


@pytest.mark.parametrize("overrides, message", [
    (dict(lora_targets=("decoder/experts/2/",)), r"pattern 'decoder/experts/2/' matches no LoRA-capable weight; "
                                                 r"valid paths: \['decoder/experts/0/q_einsum'"),
    (dict(lora_targets=("vit/q_kernel",)), "decoder/experts/1/linear"),
    (dict(lora_targets=()), "needs both a rank > 0 and target patterns"),
    (dict(lora_rank=0), "needs both a rank > 0 and target patterns"),
    (dict(lora_alpha=0.0), "lora_alpha must be positive"),
])
def test_bad_lora_config_fails_in_words(overrides, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(LORA, **overrides)


def test_export_writes_merged_weights_the_plain_model_serves(generated_root, tmp_path):
    """A LoRA run through vla.train, exported: the bundle's model has no adapters and its
    exported sampler gives the training model's actions (its EMA weights, unmerged)."""
    workdir, out = str(tmp_path / "run"), str(tmp_path / "bundle")
    config = small_config(generated_root, total_steps=2, eval_batches=0, **{
        "model.lora_rank": 2, "model.lora_targets": ("decoder/experts/1/(q_einsum|linear)",),
        "optimizer.lr": 3e-2, "optimizer.warmup_steps": 0})
    train_lib.train(train_lib.prepare(config, workdir))
    saved = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", "2", "state"))
    adapters = sorted(p for p in _flat(saved["params"]) if lora.is_adapter(p))
    assert sorted(_flat(saved["ema"])) == adapters and len(adapters) == 4
    assert min(np.abs(x).max() for p, x in _flat(saved["ema"]).items() if p.endswith(lora.B_SUFFIX)) > 1e-4

    bundle_lib.export(workdir, out, progress=lambda line: None)
    assert (bundle_lib.read_config(out).model.lora_rank, tuple(bundle_lib.read_config(out).model.lora_targets)) \
        == (0, ())
    params = bundle_lib.read_params(out)
    assert not any(lora.is_adapter(p) for p in _flat(params))
    spec = specs.build(config)
    metadata = bundle_lib.read_json(out, bundle_lib.METADATA_FILE)
    batch = {k: v[:1] if k != "images" else {c: x[:1] for c, x in v.items()}
             for k, v in vla_lib.random_batch(spec.model, 1).items() if k in bundle_lib.SAMPLE_KEYS}
    noise = np.random.default_rng(0).standard_normal((1, spec.model.action_horizon, spec.model.action_dim),
                                                     np.float32)
    served = bundle_lib.read_exported(out).call(params, batch, noise)
    graphdef, _ = bundle_lib.abstract_model(spec.model)
    sampler = jax.jit(bundle_lib.action_sampler(graphdef, int(metadata["flow_steps"])))
    unmerged = sampler(optimizer_lib.overlay(saved["params"], saved["ema"]), batch, noise)
    np.testing.assert_allclose(served, unmerged, rtol=1e-4, atol=1e-5)


def test_also_train_keeps_named_parameters_training_beside_the_adapters(params):
    """openpi's LoRA recipe: the ViT and the projections train in full beside the adapters."""
    mask = _flat(optimizer_lib.trainable_mask(params, (), ("^vit/", "^action_")))
    assert mask["vit/patch_kernel"] and mask["action_in_proj/kernel"]
    assert not mask["decoder/experts/1/q_einsum"] and not mask["decoder/embedder"]
    assert all(t for p, t in mask.items() if lora.is_adapter(p))
    with pytest.raises(ValueError, match="optimizer.also_train pattern 'nope' matches no parameter"):
        optimizer_lib.trainable_mask(params, (), ("nope",))
