"""Time arithmetic between a dataset's native control rate and the configured one (pure numpy).

Step j of an episode recorded at `native_hz` happens at time j / native_hz. A training window at
step i looks back at context frames spaced `stride_s` apart and forward at an action chunk
sampled every 1 / control_hz seconds. Everything here turns those times into step indices
(plus interpolation fractions) so that readers fetch only the steps a window needs.
"""
import numpy as np

# Positions within this many steps of an integer are that integer: 0.1 * 3 != 0.3 in floats,
# and a window must not lose its last chunk step (or gain a frame) to rounding noise.
_EPS = 1e-6


def context_indices(step: int, native_hz: float, frames: int, stride_s: float
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Native step indices of the context frames of `step`, current frame last.

    Frame j (0 <= j < frames) is the native step nearest to time t_step - (frames-1-j) * stride_s.
    Frames before the episode start are clamped to step 0 and masked.

    Returns (indices int64 [frames], mask bool [frames]).
    Raises ValueError when frames > 1 and the stride is finer than one native period: such
    frames would repeat native frames instead of showing history.
    """
    if frames < 1:
        raise ValueError(f"context_frames must be >= 1, got {frames}")
    stride_steps = stride_s * native_hz
    if frames > 1 and stride_steps < 1 - _EPS:
        raise ValueError(
            f"context_stride_s={stride_s} s is finer than the dataset's native period "
            f"1/{native_hz} Hz = {1 / native_hz:.6g} s; use a stride >= the native period")
    back = np.arange(frames - 1, -1, -1, dtype=np.float64) * stride_steps
    idx = step - np.floor(back + 0.5 + _EPS).astype(np.int64)
    mask = idx >= 0
    return np.maximum(idx, 0), mask


def chunk_positions(step: int, length: int, native_hz: float, control_hz: float, horizon: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Where the H chunk actions of `step` fall on the native step grid.

    Chunk action k is the action at time t_step + k / control_hz, i.e. at fractional native
    position p_k = step + k * native_hz / control_hz. It is valid only if p_k <= length - 1:
    past the last recorded step nothing is extrapolated.

    Returns (lo int64 [H], hi int64 [H], frac f32 [H], valid bool [H]) with p_k = lo + frac,
    hi = lo + 1 clamped to the episode; lo/hi are clamped into [0, length) also where invalid
    so they can be fetched unconditionally.
    """
    pos = step + np.arange(horizon, dtype=np.float64) * (native_hz / control_hz)
    valid = pos <= length - 1 + _EPS
    lo = np.floor(pos + _EPS).astype(np.int64)
    frac = np.where(pos - lo > 0, pos - lo, 0.0)
    lo = np.minimum(lo, length - 1)
    hi = np.minimum(lo + 1, length - 1)
    return lo, hi, frac.astype(np.float32), valid


def interpolate(at_lo: np.ndarray, at_hi: np.ndarray, frac: np.ndarray,
                hold_dims: tuple[int, ...] | list[int] = ()) -> np.ndarray:
    """Linear interpolation between native samples; `hold_dims` keep the earlier sample.

    Gripper commands are (near-)binary: interpolating them invents half-open commands the
    expert never sent, so they are held (zero-order hold) at the latest sample at or before t.

    at_lo, at_hi: f32 [H, A]; frac: f32 [H] in [0, 1). Returns f32 [H, A].
    """
    out = at_lo + frac[:, None] * (at_hi - at_lo)
    if len(hold_dims):
        hold = list(hold_dims)
        out[:, hold] = at_lo[:, hold]
    return out.astype(np.float32)
