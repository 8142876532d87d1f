"""Training-time image augmentation: the input pipeline's last stage, run on the accelerator.

The recipe openpi trains π0 with: a random resized crop (a square of `crop_scale`..1 of the
side at a random place, resized back), a small rotation, and colour jitter (brightness,
contrast, saturation). Cameras in `color_only_cameras` (wrist views) get the colour jitter only.

It runs inside the jitted train step, on the batch the host pipeline delivered, because:
- determinism is structural: an example's transform is drawn from a key folded from (seed,
  step, global row), so a resumed run (which restores the step and the data iterator) sees
  exactly the pixels an uninterrupted run would have, on any number of hosts;
- the host's CPU, the bottleneck of the input pipeline on a pod, does no per-pixel work;
- evaluation, export and serving never call it: only the trainer's step does.

Within one example and camera, every context frame gets the same transform (one crop, angle
and set of colour factors; contrast pivots on the current frame's mean), so motion between
frames is preserved. Only rows of robot sources are augmented: vision-language targets such as
boxes and points are in pixel coordinates that a crop would invalidate. Frames that
frame_mask marks absent stay zero.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from data.spec import AugmentSpec

_STREAM = 0x6175_6703  # folded into the run's key so augmentation draws its own numbers
# A numpy constant: a jnp array made at import would start the XLA backend before
# jax.distributed.initialize (multi-process runs refuse that).
_GRAY = np.array([0.299, 0.587, 0.114], np.float32)


def example_keys(seed: int, step: jax.Array, batch_size: int) -> jax.Array:
    """Keys [B]: row i of step `step` gets fold_in(fold_in(fold_in(key(seed), stream), step), i)."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _STREAM), step)
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(batch_size))


def _affine(spec: AugmentSpec, key: jax.Array) -> jax.Array:
    """[2, 3]: output pixel (x, y, 1) in [-1, 1] coordinates -> input coordinates."""
    k_scale, k_x, k_y, k_angle = jax.random.split(key, 4)
    scale = jax.random.uniform(k_scale, (), minval=spec.crop_scale, maxval=1.0)
    # The crop's centre may move as far as keeps the (unrotated) square inside the image.
    cx = jax.random.uniform(k_x, (), minval=-1.0, maxval=1.0) * (1.0 - scale)
    cy = jax.random.uniform(k_y, (), minval=-1.0, maxval=1.0) * (1.0 - scale)
    angle = jax.random.uniform(k_angle, (), minval=-1.0, maxval=1.0) * math.radians(spec.rotate_degrees)
    cos, sin = jnp.cos(angle) * scale, jnp.sin(angle) * scale
    return jnp.array([[cos, -sin, cx], [sin, cos, cy]])


def _warp(frames: jax.Array, matrix: jax.Array) -> jax.Array:
    """frames f32 [T, H, W, 3] sampled bilinearly at matrix @ (x, y, 1) (edges clamped)."""
    _, h, w, _ = frames.shape
    ys, xs = jnp.meshgrid((jnp.arange(h) + 0.5) / h * 2 - 1, (jnp.arange(w) + 0.5) / w * 2 - 1,
                          indexing="ij")
    src = jnp.einsum("ij,jhw->ihw", matrix, jnp.stack([xs, ys, jnp.ones_like(xs)]))
    sx, sy = (src[0] + 1) / 2 * w - 0.5, (src[1] + 1) / 2 * h - 0.5
    x0, y0 = jnp.floor(sx), jnp.floor(sy)
    wx, wy = (sx - x0)[None, ..., None], (sy - y0)[None, ..., None]

    def at(y, x):
        return frames[:, jnp.clip(y, 0, h - 1).astype(jnp.int32), jnp.clip(x, 0, w - 1).astype(jnp.int32)]

    top = at(y0, x0) * (1 - wx) + at(y0, x0 + 1) * wx
    bottom = at(y0 + 1, x0) * (1 - wx) + at(y0 + 1, x0 + 1) * wx
    return top * (1 - wy) + bottom * wy


def _jitter(spec: AugmentSpec, frames: jax.Array, key: jax.Array) -> jax.Array:
    """Brightness, contrast, saturation factors drawn in [1 - x, 1 + x], one set for all frames."""
    kb, kc, ks = jax.random.split(key, 3)

    def factor(k, amount):
        return jax.random.uniform(k, (), minval=1.0 - amount, maxval=1.0 + amount)

    x = frames * factor(kb, spec.brightness)
    pivot = jnp.mean(x[-1] @ _GRAY)
    x = (x - pivot) * factor(kc, spec.contrast) + pivot
    gray = (x @ _GRAY)[..., None]
    return gray + (x - gray) * factor(ks, spec.saturation)


def augment_example(spec: AugmentSpec, frames: jax.Array, key: jax.Array, geometric: bool) -> jax.Array:
    """frames uint8 [T, H, W, 3] -> uint8 [T, H, W, 3], one transform for all T frames."""
    k_geo, k_color = jax.random.split(key)
    x = frames.astype(jnp.float32)
    if geometric and spec.geometric:
        x = _warp(x, _affine(spec, k_geo))
    if spec.color:
        x = _jitter(spec, x, k_color)
    return jnp.clip(jnp.round(x), 0, 255).astype(jnp.uint8)


def augment_batch(spec: AugmentSpec, batch: dict, seed: int, step: jax.Array,
                  cameras: tuple[str, ...], robot_sources: tuple[int, ...]) -> dict:
    """The batch with images[cam] (uint8 [B, T, H, W, 3]; cameras in the layout's order, which
    frame_mask [B, n_cams, T] follows) augmented on rows whose batch["source"] is one of
    robot_sources; everything else is passed through."""
    if not spec.enabled or not robot_sources:
        return batch
    keys = example_keys(seed, step, batch["source"].shape[0])
    robot = jnp.isin(batch["source"], jnp.asarray(robot_sources))
    images = dict(batch["images"])
    for c, cam in enumerate(cameras):
        cam_keys = jax.vmap(lambda k, c=c: jax.random.fold_in(k, c))(keys)
        out = jax.vmap(lambda f, k, cam=cam: augment_example(
            spec, f, k, cam not in spec.color_only_cameras))(images[cam], cam_keys)
        keep = robot[:, None] & batch["frame_mask"][:, c]
        images[cam] = jnp.where(keep[:, :, None, None, None], out, images[cam])
    return dict(batch, images=images)
