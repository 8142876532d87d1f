"""Tiny models and random batches that obey the batch contract, shared by the model tests."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vla.models import vla
from vla.models.vla import VLA, VLAConfig

TINY = dict(vit="tiny/8", vlm="gemma_tiny", action_expert="gemma_tiny_expert", image_size=32,
            cameras=("base", "wrist"), max_text_tokens=12, state_dim=6, action_dim=4, action_horizon=5,
            vocab_size=128, remat_policy="none")  # remat only slows compiles at these sizes


def tiny_config(**overrides) -> VLAConfig:
    return VLAConfig(**{**TINY, **overrides})


def random_batch(cfg: VLAConfig, batch_size: int = 2, seed: int = 0, num_sources: int = 2) -> dict:
    """The library's random batch with a fixed layout of what is masked: padding tokens after a
    3-token text target, camera -1 masked in example 0, the last action dim padded everywhere and
    the last 2 steps of example 1 past its episode end."""
    batch = vla.random_batch(cfg, batch_size, seed)
    b, length = batch_size, cfg.max_text_tokens
    n_valid = length - 3
    batch["tokens"] = np.maximum(batch["tokens"], 3)  # keep clear of pad/eos/bos ids
    batch["token_mask"] = np.broadcast_to(np.arange(length) < n_valid, (b, length)).copy()
    batch["target_mask"] = batch["token_mask"] & (np.arange(length) >= n_valid - 3)
    batch["image_mask"][0, -1] = False
    batch["actions"] = np.random.default_rng(seed).uniform(-1, 1, batch["actions"].shape).astype(np.float32)
    batch["action_mask"][:, :, -1] = False
    batch["action_mask"][1, -2:] = False
    batch["source"] = (np.arange(b) % num_sources).astype(np.int32)
    return jax.tree.map(jnp.asarray, batch)


def init_model(cfg: VLAConfig, seed: int = 0, randomize_zero_init: bool = True) -> VLA:
    """A model whose zero-initialized parameters (norm scales, adaRMS modulation) are randomized too,
    so every path carries signal and tests of what depends on what can fail. Traceable."""
    model = VLA(cfg, rngs=nnx.Rngs(seed))
    if randomize_zero_init:
        state = nnx.state(model, nnx.Param)
        leaves, treedef = jax.tree.flatten(state)
        keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
        leaves = [jnp.where(jnp.any(x), x, 0.1 * jax.random.normal(k, x.shape, x.dtype))
                  for x, k in zip(leaves, keys)]
        nnx.update(model, jax.tree.unflatten(treedef, leaves))
    return model


def make_model(cfg: VLAConfig, seed: int = 0, randomize_zero_init: bool = True) -> VLA:
    """init_model compiled once (eager initialization dispatches every op separately: slow)."""
    return nnx.jit(init_model, static_argnums=(0, 1, 2))(cfg, seed, randomize_zero_init)
