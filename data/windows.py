"""Training windows cut from robot episodes: context frames, state, resampled action chunk.

A window is taken at every NATIVE step of an episode (not only at multiples of the control
period): the chunk is interpolated anyway, so a window starting between two control ticks is a
valid sample of what the policy sees when inference starts at an arbitrary time, and no recorded
step is wasted. An episode of N native steps therefore yields N windows; windows near the end
carry shorter valid chunks (action_mask false past the last step, never extrapolated).

Pure numpy; an episode is anything with the small `Episode` interface below: data/rlds.py's
RobotEpisode, or `ArrayEpisode` held in memory.
"""
import dataclasses
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from data import resample


class Episode(Protocol):
    """Lazy random access to one episode's steps (data/rlds.py's RobotEpisode)."""

    length: int
    control_hz: float  # native rate at which steps were recorded
    instruction: str

    def steps(self, indices: Sequence[int]) -> dict:
        """images {cam: uint8 [n, h, w, 3]}, state f32 [n, S_native], actions f32 [n, A_native]
        for the n given step indices, and subtask (n strings) when the episode records one."""


class RobotData(Protocol):
    """A robot dataset split (data/rlds.py's RobotDataset)."""

    name: str
    control_hz: float
    state_dim: int
    action_dim: int
    episode_lengths: np.ndarray  # int64 [E], known without reading the episodes
    spec: object  # its data/transform.DatasetSpec (None for synthetic data: no delta actions)

    def __len__(self) -> int: ...

    def episode(self, index: int) -> Episode: ...

    def lowdim(self, index: int) -> dict:
        """Episode `index`'s {"state": f32 [N, S], "actions": f32 [N, A]}, no image decoded."""


@dataclasses.dataclass(frozen=True)
class ArrayEpisode:
    """An episode held in memory: frames {cam: [N, h, w, 3]}, states [N, S], acts [N, A],
    optionally the subtask at every step."""

    frames: dict
    states: np.ndarray
    acts: np.ndarray
    control_hz: float
    instruction: str = ""
    subtasks: tuple[str, ...] | None = None

    @property
    def length(self) -> int:
        return len(self.states)

    def steps(self, indices: Sequence[int]) -> dict:
        idx = np.asarray(indices, np.int64)
        out = dict(images={c: f[idx] for c, f in self.frames.items()}, state=self.states[idx],
                   actions=self.acts[idx])
        if self.subtasks is not None:
            out["subtask"] = [self.subtasks[i] for i in idx]
        return out


class ArrayDataset:
    """Episodes held in memory, with RobotDataset's interface (synthetic data, benchmarks)."""

    def __init__(self, episodes: Sequence[ArrayEpisode], name: str = "memory", spec: object = None):
        """spec: a data/transform.DatasetSpec (its hold and delta dims), or None: neither."""
        self._episodes = list(episodes)
        self.name = name
        self.control_hz = float(self._episodes[0].control_hz)
        self.state_dim = self._episodes[0].states.shape[-1]
        self.action_dim = self._episodes[0].acts.shape[-1]
        self.episode_lengths = np.array([ep.length for ep in self._episodes], np.int64)
        self.spec = spec

    def __len__(self) -> int:
        return len(self._episodes)

    def episode(self, index: int) -> ArrayEpisode:
        return self._episodes[index]

    def lowdim(self, index: int) -> dict:
        ep = self._episodes[index]
        return {"state": ep.states, "actions": ep.acts}


@dataclasses.dataclass(frozen=True)
class WindowSpec:
    """What a window contains: context frames, control rate and horizon (configs/specs.py builds
    it from the run's knobs, where the horizon is defined)."""

    frames: int  # T context frames per camera, current last
    stride_s: float  # seconds between context frames
    control_hz: float  # rate of the emitted action chunk
    horizon: int  # H action steps at control_hz
    cameras: tuple[str, ...]

    def check(self, native_hz: float) -> None:
        """Raise ValueError if this spec cannot be cut from a dataset recorded at native_hz."""
        resample.context_indices(0, native_hz, self.frames, self.stride_s)


def make_window(ep: Episode, step: int, spec: WindowSpec, hold_dims: Sequence[int] = (),
                lowdim: dict | None = None) -> dict:
    """The window of `ep` at native step `step`, in the dataset's own (unpadded) dims.

    lowdim: the whole episode's {"state": f32 [N, S], "actions": f32 [N, A]} when the caller
    holds them in memory; then only the context frames are read from `ep` (reading a step
    decodes its images, which dominates the cost of a window).

    Returns a dict:
      images       {cam: uint8 [T, h, w, 3]} for the spec's cameras the episode has
      frame_mask   bool [T]          false for frames before the episode start (clamped to 0)
      state        f32 [S_native]    at `step`
      actions      f32 [H, A_native] at t_step + k / control_hz; zero where invalid
      action_valid bool [H]          false past the episode end
      subtask      str               the subtask at `step` (only when the episode records them)
    """
    n = ep.length
    if not 0 <= step < n:
        raise IndexError(f"step {step} outside episode of length {n}")
    fidx, frame_mask = resample.context_indices(step, ep.control_hz, spec.frames, spec.stride_s)
    lo, hi, frac, valid = resample.chunk_positions(step, n, ep.control_hz, spec.control_hz,
                                                   spec.horizon)
    if lowdim is None:
        # One read covers the frames, the state and both neighbours of every chunk position;
        # the rows read are scattered into episode-length arrays, indexed by step below.
        need = np.unique(np.concatenate([fidx, [step], lo, hi]))
        data = ep.steps(need.tolist())
        lowdim = {}
        for k in ("state", "actions"):
            read = np.asarray(data[k], np.float32)
            lowdim[k] = np.zeros((n,) + read.shape[1:], np.float32)
            lowdim[k][need] = read
    else:
        need = np.unique(fidx)
        data = ep.steps(need.tolist())
    acts = np.asarray(lowdim["actions"], np.float32)
    actions = resample.interpolate(acts[lo], acts[hi], frac, hold_dims)
    actions[~valid] = 0.0
    frame_rows = np.searchsorted(need, fidx)
    window = dict(
        images={c: np.asarray(f)[frame_rows] for c, f in data["images"].items()
                if c in spec.cameras},
        frame_mask=frame_mask,
        state=np.asarray(lowdim["state"][step], np.float32),
        actions=actions,
        action_valid=valid,
    )
    if "subtask" in data:  # the current frame is always read, so its step's subtask is at hand
        window["subtask"] = data["subtask"][int(np.searchsorted(need, step))]
    return window


def hold_past_end(actions: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Chunk [H, A] with the steps past the episode end holding the last valid action.

    A discrete action target (FAST) has no mask: it must say something for every step, and
    "stay with the last command" is what the robot does when the episode is over; zeros
    would teach a jump to the normalization centre. valid[0] is always true (a window starts
    inside its episode)."""
    last = int(np.flatnonzero(valid)[-1])
    out = np.array(actions, np.float32)
    out[last + 1:] = out[last]
    return out


def pad_state(state: np.ndarray, dim: int) -> np.ndarray:
    """f32 [S_native] -> f32 [dim], zeros appended (multi-embodiment mixtures share one width)."""
    if state.shape[-1] > dim:
        raise ValueError(f"state has {state.shape[-1]} dims > model.state_dim={dim}")
    return np.pad(state.astype(np.float32), (0, dim - state.shape[-1]))


def pad_actions(actions: np.ndarray, valid: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """f32 [H, A_native], bool [H] -> (f32 [H, dim], action_mask bool [H, dim]).

    The mask is false past the episode end and on the padded dims.
    """
    h, a = actions.shape
    if a > dim:
        raise ValueError(f"actions have {a} dims > model.action_dim={dim}")
    out = np.zeros((h, dim), np.float32)
    out[:, :a] = np.where(valid[:, None], actions, 0.0)
    mask = np.zeros((h, dim), bool)
    mask[:, :a] = valid[:, None]
    return out, mask
