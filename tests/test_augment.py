"""Training-time image augmentation (vla/augment.py): deterministic per (seed, step, row), one
transform for all frames of a window, robot rows only, reaches the train step, never the policy.
(Exact resume with augmentation on: tests/test_checkpoint.py runs its resume tests with it.)"""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data.spec import AugmentSpec
from tests.model_util import make_model, random_batch, tiny_config
from vla import augment
from vla import optimizer as optimizer_lib
from vla import train as train_lib
from vla.policy import Policy

OPENPI = AugmentSpec(crop_scale=0.95, rotate_degrees=5.0, brightness=0.3, contrast=0.4, saturation=0.5)
CAMERAS = ("corner2", "wrist")


def _batch(b: int = 4, t: int = 2, size: int = 24, seed: int = 0) -> dict:
    """Random frames where every context frame of a row equals the current one."""
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, (b, 1, size, size, 3), dtype=np.uint8).repeat(t, axis=1)
    images = {c: jnp.asarray(frames if c == "corner2" else frames[:, :, ::-1]) for c in CAMERAS}
    return {"images": images, "frame_mask": jnp.ones((b, len(CAMERAS), t), bool),
            "source": jnp.zeros((b,), jnp.int32)}


def _augmented(batch: dict, step: int, spec: AugmentSpec = OPENPI, seed: int = 0,
               robot_sources=(0,)) -> dict:
    out = jax.jit(lambda b, s: augment.augment_batch(spec, b, seed, s, CAMERAS, robot_sources))(
        batch, jnp.int32(step))
    return {c: np.asarray(v) for c, v in out["images"].items()}


def test_same_seed_step_and_row_give_the_same_pixels_and_anything_else_differs():
    batch = _batch()
    a, again = _augmented(batch, 7), _augmented(batch, 7)
    for cam in CAMERAS:
        np.testing.assert_array_equal(a[cam], again[cam])
        assert not np.array_equal(a[cam], np.asarray(batch["images"][cam]))
    other_step, other_seed = _augmented(batch, 8), _augmented(batch, 7, seed=1)
    assert not np.array_equal(a["corner2"], other_step["corner2"])
    assert not np.array_equal(a["corner2"], other_seed["corner2"])
    # A row's transform depends on its index: the same image in rows 0 and 1 comes out differently.
    same_rows = dict(batch, images={c: v.at[1].set(v[0]) for c, v in batch["images"].items()})
    rows = _augmented(same_rows, 7)["corner2"]
    assert not np.array_equal(rows[0], rows[1])
    np.testing.assert_array_equal(rows[0], a["corner2"][0])  # and only on it, not on its neighbours


def test_every_context_frame_of_a_window_gets_the_same_transform():
    out = _augmented(_batch(t=3), 3)
    for cam in CAMERAS:
        for t in (1, 2):
            np.testing.assert_array_equal(out[cam][:, t], out[cam][:, 0])


def test_only_robot_rows_and_present_frames_change():
    batch = _batch(b=4)
    frame_mask = batch["frame_mask"].at[2, 0, 0].set(False)
    batch = dict(batch, source=jnp.array([0, 1, 0, 2]), frame_mask=frame_mask)
    out = _augmented(batch, 5, robot_sources=(0, 2))
    raw = {c: np.asarray(v) for c, v in batch["images"].items()}
    np.testing.assert_array_equal(out["corner2"][1], raw["corner2"][1])  # a VL row
    np.testing.assert_array_equal(out["corner2"][2, 0], raw["corner2"][2, 0])  # an absent frame
    assert not np.array_equal(out["corner2"][2, 1], raw["corner2"][2, 1])
    assert not np.array_equal(out["corner2"][3], raw["corner2"][3])


def test_color_only_cameras_keep_their_geometry():
    """Colour jitter is a per-pixel map: pixels that were equal stay equal; a crop or rotation
    would move them."""
    size = 24
    image = np.zeros((1, 1, size, size, 3), np.uint8)
    image[..., : size // 2, :, :] = 200  # top half bright
    batch = {"images": {c: jnp.asarray(image) for c in CAMERAS}, "frame_mask": jnp.ones((1, 2, 1), bool),
             "source": jnp.zeros((1,), jnp.int32)}
    spec = AugmentSpec(crop_scale=0.7, rotate_degrees=20.0, brightness=0.3,
                       color_only_cameras=("wrist",))
    for step in range(4):
        out = _augmented(batch, step, spec)
        wrist = out["wrist"][0, 0]
        assert (wrist[: size // 2] == wrist[0, 0]).all() and (wrist[size // 2:] == wrist[-1, 0]).all()
        if not np.array_equal(out["corner2"], out["wrist"]):
            return
    pytest.fail("the geometric transform never moved corner2's edge")


def test_neutral_spec_is_off_and_bad_values_are_refused():
    batch = _batch()
    out = _augmented(batch, 1, AugmentSpec())
    for cam in CAMERAS:
        np.testing.assert_array_equal(out[cam], np.asarray(batch["images"][cam]))
    for bad in (dict(crop_scale=0.0), dict(crop_scale=1.5), dict(rotate_degrees=-1.0),
                dict(brightness=1.0), dict(saturation=-0.1)):
        with pytest.raises(ValueError, match="config.data.augment"):
            AugmentSpec(**bad)


def test_the_train_step_sees_augmented_images():
    """The same state and batch give another loss with augmentation on: it is in the step."""
    cfg = tiny_config()
    graphdef, params = nnx.split(make_model(cfg))
    params = nnx.to_pure_dict(params)
    spec = optimizer_lib.OptimizerSpec(lr=1e-3, warmup_steps=0, min_lr_ratio=1.0, b1=0.9, b2=0.95,
                                       eps=1e-8, weight_decay=0.0, clip_norm=1.0, ema_decay=0.0,
                                       grad_accum_steps=1, freeze=(), total_steps=10)
    tx = optimizer_lib.make_optimizer(spec, params)
    state = dict(step=jnp.int32(0), params=params, opt_state=tx.init(params))
    batch = random_batch(cfg, batch_size=4)
    losses = [float(jax.jit(train_lib.make_train_step(spec, 0, graphdef, tx, 2, aug, cfg.cameras, (0, 1)))(
        state, batch)[1]["loss"]) for aug in (AugmentSpec(), OPENPI, OPENPI)]
    assert losses[0] != losses[1] == losses[2]


def test_the_policy_never_augments(bundle_dir, tmp_path):
    """A bundle whose run trained with augmentation infers exactly as the same bundle without."""
    augmented = str(tmp_path / "bundle")
    shutil.copytree(bundle_dir, augmented)
    path = os.path.join(augmented, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["data"]["augment"] = dict(crop_scale=0.8, rotate_degrees=10.0, brightness=0.5,
                                     contrast=0.5, saturation=0.5, color_only_cameras=[])
    with open(path, "w") as f:
        json.dump(config, f)
    rng = np.random.default_rng(0)
    plain, aug = Policy.from_bundle(bundle_dir), Policy.from_bundle(augmented)
    m = plain.metadata
    obs = {"images": {c: rng.integers(0, 256, (m["image_size"], m["image_size"], 3), np.uint8)
                      for c in m["cameras"]},
           "state": rng.normal(size=m["state_dim"]).astype(np.float32), "prompt": "press the button"}
    np.testing.assert_array_equal(plain.infer(obs, rng_seed=3)["actions"],
                                  aug.infer(obs, rng_seed=3)["actions"])
