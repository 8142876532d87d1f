"""Real-time chunking: guided flow sampling, and chunk execution with a real trained policy.

The policy here is trained for RTC_TRAIN_STEPS steps with RTC_FLOW_STEPS flow steps instead of
using the shared 4-step `bundle_dir`: that model samples per-step noise (its within-chunk step is
as large as any boundary jump, so no switching scheme can be smoother than another), and with its
2 flow steps the single guided step from t=1 overshoots the guide.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import specs
from data.metaworld_env import CONTROL_HZ, MetaWorldEnv
from tests.data_fixtures import TINY_TASKS
from tests.model_util import make_model, random_batch, tiny_config
from tests.test_train import small_config
from vla import bundle
from vla import train as train_lib
from vla.policy import Policy
from vla.rtc import ChunkExecutor, guidance_weights

MODES = ("pi0", "pi05")
FLOW_STEPS = 5  # of the model-level samplers
RTC_TRAIN_STEPS = 200
RTC_FLOW_STEPS = 10
TICKS = 40  # control ticks per observation stream


def test_guidance_weights():
    w = guidance_weights(10, 2, 6)
    assert w.dtype == np.float32 and w.shape == (10,)
    np.testing.assert_array_equal(w[:2], 1.0)
    np.testing.assert_array_equal(w[6:], 0.0)
    assert np.all(np.diff(w[1:7]) < 0) and 0 < w[5] < w[2] < 1
    c = (6 - 3) / (6 - 2 + 1)
    np.testing.assert_allclose(w[3], c * (np.exp(c) - 1) / (np.e - 1), rtol=1e-6)
    np.testing.assert_array_equal(guidance_weights(5, 3, 3), [1, 1, 1, 0, 0])
    assert 0 < guidance_weights(5, 0, 5)[0] < 1  # no delay: even step 0 is only softly guided
    for bad in ((0, 0, 0), (5, 3, 2), (5, 2, 6), (5, -1, 3)):
        with pytest.raises(ValueError, match="horizon|inference_delay"):
            guidance_weights(*bad)


# ---------------------------------------------------------------------------- a trained policy

@pytest.fixture(scope="module")
def trained_bundle(generated_root, tmp_path_factory) -> str:
    workdir = str(tmp_path_factory.mktemp("rtc_train"))
    config = small_config(generated_root, total_steps=RTC_TRAIN_STEPS, checkpoint_every=RTC_TRAIN_STEPS,
                          log_every=RTC_TRAIN_STEPS, eval_batches=0, **{"knobs.flow_steps": RTC_FLOW_STEPS})
    train_lib.train(train_lib.prepare(config, workdir))
    return bundle.export(workdir, os.path.join(workdir, "bundle"), dtype="float32", batch_size=1,
                         progress=lambda _: None)


@pytest.fixture(scope="module")
def policy(trained_bundle):
    return Policy.from_bundle(trained_bundle)


@pytest.fixture(scope="module")
def streams(policy) -> list[list[dict]]:
    """Observations at the policy's control rate while the scripted expert drives the arm (2 tasks x
    2 scenes): every executor sees the same observations, so modes compare switch by switch."""
    m = policy.metadata
    hold = round(CONTROL_HZ / m["control_hz"])  # env steps per control tick
    out = []
    for task in TINY_TASKS:
        env = MetaWorldEnv(task, tuple(m["cameras"]), m["image_size"])
        try:
            for seed in range(2):
                obs, stream = env.reset(seed), []
                for _ in range(TICKS):
                    stream.append({**obs, "prompt": env.instruction})
                    for j in range(hold):
                        obs, *_ = env.step(env.expert_action(), render=j == hold - 1)
                out.append(stream)
        finally:
            env.close()
    return out


# ---------------------------------------------------------------------------- guided sampling

@pytest.fixture(scope="module", params=MODES)
def guided(request):
    """Unguided, zero-weight and first-2-steps-guided samples (cached and uncached) of one model:
    π0 is the trained policy's model on an observation of its task, π0.5 a random tiny model whose
    zero-initialized adaRMS gates are randomized (else they silence the action expert's layers)."""
    if request.param == "pi0":
        path = request.getfixturevalue("trained_bundle")
        graphdef, _ = bundle.abstract_model(bundle.model_spec(
            specs.build(bundle.read_config(path)), bundle.read_json(path, bundle.METADATA_FILE)))
        model = nnx.merge(graphdef, nnx.restore_int_paths(bundle.read_params(path)))
        policy, streams = request.getfixturevalue("policy"), request.getfixturevalue("streams")
        batch = jax.tree.map(jnp.asarray, policy.batch(streams[0][5]))
        shape = (1, model.cfg.action_horizon, model.cfg.action_dim)
    else:
        cfg = tiny_config(mode="pi05")
        model, batch = make_model(cfg), random_batch(cfg)
        shape = batch["actions"].shape
    noise = jax.random.normal(jax.random.key(5), shape)
    guide = jax.random.uniform(jax.random.key(6), shape, minval=-1.0, maxval=1.0)
    weights = jnp.zeros(shape[:2]).at[:, :2].set(1.0)

    @nnx.jit  # one compilation for all four samplers: compiles dominate this file's time
    def samples(m):
        sample = lambda w, cache=True: m.sample_actions(batch, noise, num_steps=FLOW_STEPS, use_cache=cache,
                                                        guide_actions=guide, guide_weights=w)
        return {"plain": m.sample_actions(batch, noise, num_steps=FLOW_STEPS), "zero": sample(0 * weights),
                "cached": sample(weights), "uncached": sample(weights, cache=False)}

    return dict(model=model, batch=batch, guide=guide, **samples(model))


def test_zero_guidance_weights_are_unguided_sampling(guided):
    np.testing.assert_array_equal(guided["zero"], guided["plain"])


def test_guidance_pulls_weighted_steps_to_the_guide(guided):
    guide, plain, cached = guided["guide"], guided["plain"], guided["cached"]
    assert np.all(np.isfinite(cached))  # the first step (t = 1) has an infinite raw guidance weight
    err = lambda x: float(jnp.mean(jnp.abs(x[:, :2] - guide[:, :2])))
    # Measured: 0.27x (trained π0: its denoiser depends little on x early on), 0.05x (random π0.5).
    assert err(cached) < 0.4 * err(plain), (err(cached), err(plain))
    # Unweighted steps stay samples of the model, not copies of the guide.
    assert float(jnp.mean(jnp.abs(cached[:, 2:] - guide[:, 2:]))) > 0.3
    np.testing.assert_allclose(cached, guided["uncached"], atol=1e-4)


def test_guidance_inputs_are_checked(guided):
    model, batch, guide = guided["model"], guided["batch"], guided["guide"]
    with pytest.raises(ValueError, match="both guide_actions and guide_weights"):
        model.sample_actions(batch, rng=jax.random.key(0), guide_actions=guide)
    with pytest.raises(ValueError, match="guide_weights has shape"):
        model.sample_actions(batch, rng=jax.random.key(0), guide_actions=guide, guide_weights=jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="guide_actions has shape"):
        model.sample_actions(batch, rng=jax.random.key(0), guide_actions=guide[:, :3],
                             guide_weights=jnp.ones(guide.shape[:2]))


# ---------------------------------------------------------------------------- chunk execution

@pytest.mark.parametrize("mode,delay", [("sync", 0), ("naive", 2), ("rtc", 2)])
def test_executor_follows_the_tick_schedule(policy, streams, mode, delay):
    """Chunk n is inferred from the observation at tick n*s (rtc: guided by the rest of chunk n-1)
    and executed from tick n*s + d at its step d; the executor matches those direct inferences."""
    s, stream, seed = 3, streams[0][:20], 7
    executor = ChunkExecutor(policy, s, mode, delay, seed=seed)
    executed = np.stack([executor.act(o) for o in stream])
    executor.reset()
    chunks = []
    for n in range((len(stream) - 1 - delay) // s + 1):
        guide = {"prefix_actions": chunks[-1][s:], "inference_delay": delay} if mode == "rtc" and chunks else {}
        chunks.append(policy.infer(stream[n * s], rng_seed=seed + n, **guide)["actions"])
    for k, action in enumerate(executed):
        n = max(0, (k - delay) // s)
        np.testing.assert_allclose(action, chunks[n][k - n * s], atol=1e-5, err_msg=f"tick {k}")
    assert [sw.tick for sw in executor.switches] == list(range(s + delay, len(stream), s))
    for sw in executor.switches:
        np.testing.assert_allclose(sw.jump, np.linalg.norm(executed[sw.tick] - executed[sw.tick - 1]), rtol=1e-6)


def test_executor_checks_its_arguments(policy):
    h = policy.metadata["action_horizon"]
    for args, match in (((0,), "steps_executed"), ((h + 1,), "steps_executed"), ((3, "fast"), "mode"),
                        ((3, "sync", 1), "asynchronous"), ((3, "naive", 4), "inference_delay"),
                        ((3, "rtc", -1), "inference_delay"), ((h - 2, "rtc", 3), "exceeds action_horizon")):
        with pytest.raises(ValueError, match=match):
            ChunkExecutor(policy, *args)


def test_rtc_reduces_the_jump_at_chunk_boundaries(policy, streams):
    """Same observations, same sampling noise, same delay: only the guidance differs. (Without it
    the two modes would execute identical actions.)"""
    s, d = 2, 1
    stats = {}
    for mode in ("naive", "rtc"):
        executor = ChunkExecutor(policy, s, mode, d, seed=0)
        for stream in streams:
            executor.reset()
            for observation in stream:
                executor.act(observation)
        executor.reset()
        stats[mode] = executor.stats()
        assert stats[mode]["switches"] == len(streams) * len(range(s + d, TICKS, s))
    naive, rtc = stats["naive"]["mean_jump"], stats["rtc"]["mean_jump"]
    print(f"boundary jumps (s={s}, d={d}): naive {stats['naive']}, rtc {stats['rtc']}")
    assert rtc < 0.8 * naive, stats
