"""The per-example layout of the batch contract and the one image transform every input takes.

An example (the batch dimension is added by data/pipeline.py):

    images       {cam: uint8 [T, H, W, 3]}  every camera of the layout, H = W = image_size
    image_mask   bool [n_cams]
    frame_mask   bool [n_cams, T]            false before the episode start / for missing frames
    tokens, token_mask, target_mask  [L]     L = max_len
    state        f32 [S]                     normalized, padded to state_dim
    actions      f32 [H, A]                  normalized chunk at the control rate, padded
    action_mask  bool [H, A]

The training sources (data/sources.py) and the policy (vla/policy.py) both build examples
through `Layout`, so serving sees exactly what training saw.
"""
import dataclasses

import numpy as np
from PIL import Image


@dataclasses.dataclass(frozen=True)
class Layout:
    """Per-example shapes of the batch contract (built from a run config by configs/specs.py)."""

    cameras: tuple[str, ...]
    frames: int  # T
    image_size: int
    max_len: int  # L
    state_dim: int  # S
    action_dim: int  # A
    horizon: int  # H
    pi05: bool  # state bins in the prompt

    def spec(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """{key: (shape, dtype)} of one example; images flattened to "images/<cam>"."""
        n, t, s = len(self.cameras), self.frames, self.image_size
        out = {f"images/{c}": ((t, s, s, 3), np.dtype(np.uint8)) for c in self.cameras}
        out.update({
            "image_mask": ((n,), np.dtype(bool)), "frame_mask": ((n, t), np.dtype(bool)),
            "tokens": ((self.max_len,), np.dtype(np.int32)),
            "token_mask": ((self.max_len,), np.dtype(bool)),
            "target_mask": ((self.max_len,), np.dtype(bool)),
            "state": ((self.state_dim,), np.dtype(np.float32)),
            "actions": ((self.horizon, self.action_dim), np.dtype(np.float32)),
            "action_mask": ((self.horizon, self.action_dim), np.dtype(bool)),
        })
        return out

    def empty(self) -> dict:
        """An example with every part zero and masked."""
        ex = {k: np.zeros(shape, dtype) for k, (shape, dtype) in self.spec().items()}
        ex["images"] = {c: ex.pop(f"images/{c}") for c in self.cameras}
        return ex

    def camera_frames(self, frames: np.ndarray) -> np.ndarray:
        """uint8 [t, h, w, 3] (any t >= 1, any h, w) -> uint8 [T, S, S, 3]: the last T frames,
        resized with aspect-preserving zero padding (as openpi's resize_with_pad)."""
        frames = frames[-self.frames:]
        out = np.zeros((self.frames, self.image_size, self.image_size, 3), np.uint8)
        out[self.frames - len(frames):] = [resize_with_pad(f, self.image_size) for f in frames]
        return out


def resize_with_pad(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [h, w, 3] -> uint8 [size, size, 3], bilinear, centred, zero padding."""
    h, w = image.shape[:2]
    if h == w == size:
        return image
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    resized = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
    out = np.zeros((size, size, 3), np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top:top + nh, left:left + nw] = resized
    return out
