"""The VLA's attention structure, caching, knowledge insulation and sharding (tiny fp32 models)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tests.model_util import init_model, make_model, random_batch, tiny_config
from vla import sharding
from vla.sharding import DEFAULT_RULES

MODES = ("pi0", "pi05")


@nnx.jit
def _outputs(model, batch, x_t, t):
    """(prefix outputs with invalid positions zeroed, velocity) of one joint forward."""
    prefix = model.embed_prefix(batch)
    prefix_out, suffix_out = model._joint(prefix, model.embed_suffix(batch["state"], x_t, t))
    return jnp.where(prefix["valid"][..., None], prefix_out, 0.0), model._velocity(suffix_out)


@nnx.jit
def _loss(model, batch):
    return model.loss(batch, jax.random.key(0))


@pytest.fixture(scope="module", params=MODES)
def setup(request):
    cfg = tiny_config(mode=request.param, context_frames=2)
    model = make_model(cfg)
    batch = random_batch(cfg)
    x_t = jax.random.normal(jax.random.key(3), batch["actions"].shape)
    t = jnp.array([0.3, 0.8])
    return model, batch, x_t, t


def test_prefix_ignores_state_and_actions(setup):
    model, batch, x_t, t = setup
    prefix_a, v_a = _outputs(model, batch, x_t, t)
    prefix_b, v_b = _outputs(model, {**batch, "state": batch["state"] + 1.0}, x_t + 1.0, t * 0.5)
    np.testing.assert_array_equal(prefix_a, prefix_b)
    assert np.abs(v_a - v_b).max() > 1e-3  # the perturbation is not a no-op for the action block


def test_padding_tokens_and_masked_cameras_change_nothing(setup):
    model, batch, x_t, t = setup
    prefix_a, v_a = _outputs(model, batch, x_t, t)
    loss_a, _ = _loss(model, batch)
    pad = ~batch["token_mask"]
    masked_cam = batch["image_mask"][0, -1] == 0
    assert masked_cam
    cam = model.cfg.cameras[-1]
    perturbed = dict(batch, tokens=jnp.where(pad, 7, batch["tokens"]),
                     images={**batch["images"], cam: batch["images"][cam].at[0].set(255 - batch["images"][cam][0])})
    prefix_b, v_b = _outputs(model, perturbed, x_t, t)
    loss_b, _ = _loss(model, perturbed)
    np.testing.assert_allclose(prefix_a, prefix_b, atol=1e-6)
    np.testing.assert_allclose(v_a, v_b, atol=1e-6)
    np.testing.assert_allclose(loss_a, loss_b, atol=1e-6)


def test_actions_see_the_prefix_and_prompt_ignores_targets(setup):
    model, batch, x_t, t = setup
    prefix_a, v_a = _outputs(model, batch, x_t, t)
    prompt_token = jnp.argmax(batch["token_mask"] & ~batch["target_mask"], axis=1)  # first prompt token
    changed_prompt = dict(batch, tokens=batch["tokens"].at[jnp.arange(2), prompt_token].add(1))
    assert np.abs(_outputs(model, changed_prompt, x_t, t)[1] - v_a).max() > 1e-4
    changed_image = dict(batch, images={c: 255 - im for c, im in batch["images"].items()})
    assert np.abs(_outputs(model, changed_image, x_t, t)[1] - v_a).max() > 1e-4
    # Text targets are causal: changing the last target token leaves every earlier output alone.
    last_target = batch["target_mask"].shape[1] - 1 - jnp.argmax(batch["target_mask"][:, ::-1], axis=1)
    changed_target = dict(batch, tokens=batch["tokens"].at[jnp.arange(2), last_target].add(1))
    prefix_b, _ = _outputs(model, changed_target, x_t, t)
    n_img = prefix_a.shape[1] - batch["tokens"].shape[1]
    for i in range(2):
        end = n_img + int(last_target[i])
        np.testing.assert_allclose(prefix_a[i, :end], prefix_b[i, :end], atol=1e-6)


def test_cached_sampling_equals_uncached_forward(setup):
    model, batch, _, _ = setup
    noise = jax.random.normal(jax.random.key(5), batch["actions"].shape)
    cached = nnx.jit(lambda m, b, n: m.sample_actions(b, n, num_steps=4))(model, batch, noise)
    uncached = nnx.jit(lambda m, b, n: m.sample_actions(b, n, num_steps=4, use_cache=False))(model, batch, noise)
    assert np.abs(cached - noise).max() > 1e-2
    np.testing.assert_allclose(cached, uncached, atol=1e-5)


def _grads(model, batch):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(p):
        return nnx.merge(graphdef, p, rest).loss(batch, jax.random.key(1))[0]

    return jax.jit(jax.grad(loss_fn))(params)


def test_knowledge_insulation_stops_flow_gradient_into_vlm():
    batch = None
    for insulate in (True, False):
        cfg = tiny_config(mode="pi05", knowledge_insulation=insulate, text_loss_weight=0.0,
                          remat_policy="nothing_saveable")
        model = make_model(cfg)
        batch = batch or random_batch(cfg)
        g = _grads(model, batch)
        vlm = [g["decoder"]["experts"][0], g["decoder"]["embedder"], g["vit"]]
        vlm_norm = sum(float(jnp.sum(jnp.abs(x))) for x in jax.tree.leaves(vlm))
        expert_norm = sum(float(jnp.sum(jnp.abs(x))) for x in jax.tree.leaves(g["decoder"]["experts"][1]))
        assert expert_norm > 0
        assert (vlm_norm == 0.0) == insulate, (insulate, vlm_norm)
    # The last action dim is padding in every example: its output weights get no gradient.
    assert float(jnp.abs(g["action_out_proj"]["kernel"][...][:, -1]).max()) == 0.0
    assert float(jnp.abs(g["action_out_proj"]["bias"][...][-1])) == 0.0
    assert float(jnp.abs(g["action_out_proj"]["kernel"][...][:, 0]).max()) > 0.0


def test_fast_targets_are_hidden_from_the_action_expert():
    cfg = tiny_config(fast_token_start=100)
    model = make_model(cfg)
    batch = random_batch(cfg)
    x_t = jax.random.normal(jax.random.key(3), batch["actions"].shape)
    t = jnp.array([0.3, 0.8])
    target = batch["target_mask"]
    fast_a = dict(batch, tokens=jnp.where(target, 110, batch["tokens"]))
    fast_b = dict(batch, tokens=jnp.where(target, 120, batch["tokens"]))
    text_b = dict(batch, tokens=jnp.where(target, 20, batch["tokens"]))
    v_a = _outputs(model, fast_a, x_t, t)[1]
    np.testing.assert_allclose(v_a, _outputs(model, fast_b, x_t, t)[1], atol=1e-6)
    assert np.abs(v_a - _outputs(model, text_b, x_t, t)[1]).max() > 1e-4  # text targets stay visible


def _put_batch(batch, mesh):
    spec = lambda x: NamedSharding(mesh, P(("data", "fsdp")) if x.shape[0] % 4 == 0 else P())
    return jax.tree.map(lambda x: jax.device_put(x, spec(x)), batch)


@pytest.mark.parametrize("mode", MODES)
def test_mesh_fsdp4_tensor2_matches_single_device(mode):
    cfg = tiny_config(mode=mode, context_frames=2)
    reference = make_model(cfg)
    batch = random_batch(cfg, batch_size=4)
    rng = jax.random.key(2)
    loss_ref, metrics_ref = nnx.jit(lambda m, b: m.loss(b, rng, num_sources=2))(reference, batch)
    noise = jax.random.normal(jax.random.key(4), batch["actions"].shape)
    actions_ref = nnx.jit(lambda m, b: m.sample_actions(b, noise, num_steps=3))(reference, batch)

    mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    sharded = sharding.init_sharded(lambda: init_model(cfg), mesh, DEFAULT_RULES)
    q = sharded.decoder.experts[0].q_einsum[...]
    assert q.sharding.spec == P(None, "tensor", "fsdp", None)  # (layers, heads, embed, head_dim)
    assert sharded.decoder.embedder[...].sharding.spec == P("tensor", "fsdp")  # (vocab, embed)
    assert sharded.decoder.experts[1].linear[...].sharding.spec == P(None, "tensor", "fsdp")  # (layers, mlp, embed)
    assert sharded.vit.pos_embedding[...].sharding.spec == P(None, "fsdp")
    assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape[1:3] == (2, 16)
    np.testing.assert_array_equal(np.asarray(q), np.asarray(reference.decoder.experts[0].q_einsum[...]))

    with jax.set_mesh(mesh), nnx.logical_axis_rules(DEFAULT_RULES):
        placed = _put_batch(batch, mesh)
        loss, metrics = nnx.jit(lambda m, b: m.loss(b, rng, num_sources=2))(sharded, placed)
        actions = nnx.jit(lambda m, b: m.sample_actions(b, noise, num_steps=3))(sharded, placed)
    # Sharded contractions sum in another order: equal to fp32 rounding (relative 1e-5).
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
    np.testing.assert_allclose(metrics["flow_loss_per_source"], metrics_ref["flow_loss_per_source"], rtol=1e-5)
    np.testing.assert_allclose(metrics["text_loss_per_source"], metrics_ref["text_loss_per_source"], rtol=1e-5)
    np.testing.assert_allclose(actions, actions_ref, rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="past_frame_tokens"):
        tiny_config(context_frames=2, past_frame_tokens=3)
    with pytest.raises(ValueError, match="divisible"):
        tiny_config(image_size=30)
    with pytest.raises(ValueError, match="unknown Gemma variant"):
        tiny_config(vlm="gemma_7x")
    cfg = tiny_config()
    model = make_model(cfg, randomize_zero_init=False)
    batch = random_batch(cfg)
    with pytest.raises(ValueError, match="wrist"):
        model.loss(dict(batch, images={"base": batch["images"]["base"]}), jax.random.key(0))


# ---------------------------------------------------------------------------- overfitting


@pytest.fixture(scope="module")
def overfit():
    """A tiny π0.5 model trained on one fixed batch until it has memorized actions and text.

    π0.5 because adaRMS lets flow time scale the action expert's activations directly: near t=0 the
    target velocity is (x_t - a) / t, and π0's time MLP fits that gain less precisely (its flow loss
    plateaued near 3e-3 where π0.5 reaches 6e-4 to 1.3e-3 with the same steps, depending on the
    training draws).
    """
    steps = 6000
    cfg = dataclasses.replace(tiny_config(mode="pi05"), cameras=("base",))
    model = make_model(cfg, randomize_zero_init=False)
    batch = random_batch(cfg, batch_size=2, seed=1)
    batch = dict(batch, image_mask=jnp.ones_like(batch["image_mask"]),
                 action_mask=jnp.ones_like(batch["action_mask"]))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adam(optax.warmup_cosine_decay_schedule(0.0, 3e-3, 100, steps, 3e-5))
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, key):
        def loss_fn(p):
            return nnx.merge(graphdef, p, rest).loss(batch, key)

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics

    key = jax.random.key(0)
    for _ in range(steps):
        key, sub = jax.random.split(key)
        params, opt_state, _ = step(params, opt_state, sub)
    return nnx.merge(graphdef, params, rest), batch


def test_overfits_one_batch(overfit):
    model, batch = overfit
    evaluate = nnx.jit(lambda m, key: m.loss(batch, key)[1])
    losses = [evaluate(model, jax.random.key(100 + i)) for i in range(16)]
    flow = float(np.mean([m["flow_loss"] for m in losses]))
    text = float(np.mean([m["text_loss"] for m in losses]))
    assert flow < 2e-3, flow
    assert text < 1e-2, text
    sampled = nnx.jit(lambda m: m.sample_actions(batch, rng=jax.random.key(7), num_steps=10))(model)
    assert float(jnp.mean(jnp.square(sampled - batch["actions"]))) < 1e-2


def test_generate_text_reproduces_memorized_target(overfit):
    model, batch = overfit
    eos = 1
    target = batch["target_mask"]
    n = int(target[0].sum())
    tokens, mask = jax.jit(lambda b: model.generate_text(b, max_new_tokens=n + 2, eos_id=eos))(batch)
    for i in range(2):
        expected = np.asarray(batch["tokens"][i])[np.asarray(target[i])]
        np.testing.assert_array_equal(np.asarray(tokens[i, :n]), expected)


def test_text_only_loss_skips_the_action_expert_and_matches_joint_text_loss():
    cfg = tiny_config(mode="pi05")
    batch = random_batch(cfg)
    joint = _loss(make_model(cfg), batch)[1]
    text_only = _loss(make_model(dataclasses.replace(cfg, flow_loss_weight=0.0)), batch)[1]
    assert float(joint["flow_loss"]) > 0 and float(text_only["flow_loss"]) == 0.0
    np.testing.assert_allclose(text_only["loss"], joint["text_loss"], rtol=1e-6)


def test_chunked_text_loss_equals_the_full_one_with_gradients():
    # Chunks of 4 over 11 scored positions: two whole chunks and a padded one. The chunk size
    # changes no parameter, so both models hold the same weights.
    cfg = tiny_config(mode="pi05", text_loss_chunk=0)
    batch = random_batch(cfg)

    def text_loss(chunk):
        graphdef, params = nnx.split(make_model(dataclasses.replace(cfg, text_loss_chunk=chunk)))
        loss = lambda p: nnx.merge(graphdef, p).loss(batch, jax.random.key(0))[1]["text_loss"]
        return jax.jit(jax.value_and_grad(loss))(params)

    full, full_grad = text_loss(0)
    chunked, chunked_grad = text_loss(4)
    assert cfg.max_text_tokens - 1 == 11 and float(full) > 0
    np.testing.assert_allclose(chunked, full, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), chunked_grad, full_grad)
