"""Executing action chunks on a robot: synchronous, naive asynchronous, and real-time chunking.

A policy predicts a chunk of H actions per inference; the robot executes s = steps_executed of them
open-loop, then switches to a new chunk. Three ways to switch, one control tick per `act` call:

    sync   infer, execute s actions, infer again: the robot waits while the policy runs.
    naive  asynchronous: after s actions of the current chunk the next inference starts (in a
           background thread, on the latest observation); for the d = inference_delay ticks it
           takes, the current chunk keeps executing (its actions s .. s+d-1), then the executor
           switches to the new chunk at its index d (the new chunk's step 0 is the tick its
           observation was taken). The new chunk knows nothing of the old one: its first action
           can jump away from the last executed one (a different mode of a multimodal policy).
    rtc    real-time chunking (Black, Galliker, Levine 2025): like naive, but the inference gets the
           old chunk's actions s .. H-1 (which the new chunk's steps 0 .. H-s-1 overlap) and d; the
           policy freezes the first d steps (they are executed from the old chunk anyway) and
           inpaints the rest by guided flow sampling (VLA.sample_actions with the weights
           `guidance_weights` gives), so the new chunk continues the old one.

Delays are counted in control ticks, not wall time, so runs are deterministic: after d ticks the
executor waits for the inference if it is still running and counts a late switch.
"""
from __future__ import annotations

import dataclasses
import math
import threading
import time
from typing import Any

import numpy as np

MODES = ("sync", "naive", "rtc")


def guidance_weights(horizon: int, inference_delay: int, overlap: int) -> np.ndarray:
    """RTC's soft-masking weights f32 [horizon] for the steps of the next chunk.

    1 on the first `inference_delay` steps (frozen: the previous chunk executes them), then an
    exponential decay c_i (e^{c_i} - 1) / (e - 1) with c_i = (overlap - i) / (overlap - d + 1) over
    the rest of the overlap with the previous chunk, 0 from `overlap` on (nothing to agree with).
    """
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    if not 0 <= inference_delay <= overlap <= horizon:
        raise ValueError("need 0 <= inference_delay <= overlap <= horizon, got "
                         f"inference_delay={inference_delay}, overlap={overlap}, horizon={horizon}")
    i = np.arange(horizon)
    c = (overlap - i) / (overlap - inference_delay + 1)
    decay = c * np.expm1(c) / math.expm1(1.0)
    return np.where(i < inference_delay, 1.0, np.where(i < overlap, decay, 0.0)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Switch:
    """One chunk boundary: the control tick of the first action of the new chunk, the jump
    ||a_first_new - a_last_old|| (native units), whether the inference outlasted its d ticks, how
    long the executor waited for it and how long it took."""

    tick: int
    jump: float
    late: bool
    wait_ms: float
    infer_ms: float


class _Inference(threading.Thread):
    """One policy.infer call in the background; `result()` joins it and re-raises its error."""

    def __init__(self, infer, observation: dict, kwargs: dict):
        super().__init__(daemon=True)
        self._call = lambda: infer(observation, **kwargs)
        self._out: dict | None = None
        self._error: BaseException | None = None

    def run(self):
        try:
            self._out = self._call()
        except BaseException as e:  # noqa: BLE001 - handed to the control thread
            self._error = e

    def result(self) -> dict:
        self.join()
        if self._error is not None:
            raise self._error
        return self._out


class ChunkExecutor:
    """Turns a chunk policy into one action per control tick (see the module docstring).

    policy: a vla.policy.Policy (anything with `.metadata["action_horizon"]` and
    `.infer(observation, *, rng_seed, prefix_actions, inference_delay) -> {"actions": [H, A], ...}`).
    seed: when given, inference n uses rng_seed = seed + n, so runs in different modes see the same
    sampling noise; None leaves the noise to the policy.
    """

    def __init__(self, policy: Any, steps_executed: int, mode: str = "sync", inference_delay: int = 0,
                 *, seed: int | None = None):
        horizon = int(policy.metadata["action_horizon"])
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not 1 <= steps_executed <= horizon:
            raise ValueError(f"steps_executed must be in [1, action_horizon={horizon}], got {steps_executed}")
        if mode == "sync" and inference_delay:
            raise ValueError(f"inference_delay={inference_delay} needs an asynchronous mode (naive or rtc): "
                             "in sync mode the robot waits for every inference")
        if inference_delay < 0 or inference_delay > steps_executed:
            raise ValueError(f"inference_delay must be in [0, steps_executed={steps_executed}] (the next "
                             f"inference starts at step steps_executed of a chunk that begins at step "
                             f"inference_delay), got {inference_delay}")
        if steps_executed + inference_delay > horizon:
            raise ValueError(f"steps_executed + inference_delay = {steps_executed} + {inference_delay} exceeds "
                             f"action_horizon={horizon}: the current chunk runs out during the delay")
        self.policy, self.mode, self.seed = policy, mode, seed
        self.horizon, self.steps_executed, self.inference_delay = horizon, steps_executed, inference_delay
        self.switches: list[Switch] = []
        self.infer_ms: list[float] = []
        self._steps: list[float] = []  # ||a_k - a_{k-1}|| inside chunks, the baseline for jumps
        self._inferences = 0
        self._pending: _Inference | None = None
        self._ticks_left = 0  # control ticks until the pending inference's chunk takes over
        self._chunk: np.ndarray | None = None  # [H, A] being executed
        self._index = 0  # its next step
        self._last: np.ndarray | None = None  # the action executed at the previous tick
        self._tick = 0

    def reset(self) -> None:
        """Starts a new episode: the next `act` infers a fresh chunk (statistics are kept)."""
        if self._pending is not None:
            self._pending.join()  # an inference cannot be cancelled; its chunk is dropped
        self._pending, self._ticks_left = None, 0
        self._chunk, self._index, self._last, self._tick = None, 0, None, 0

    def act(self, observation: dict) -> np.ndarray:
        """The action [A_native] to execute at this control tick, given the current observation.

        An inference started at this tick reads `observation` in the background during the next d
        ticks: pass fresh arrays, not buffers the caller overwrites in place."""
        s, d = self.steps_executed, self.inference_delay
        boundary = False
        if self._chunk is None:  # episode start: nothing to execute until the first chunk exists
            self._chunk, self._index = self._record(self._infer(observation, None)), 0
        if self._pending is not None and self._ticks_left == 0:
            late = self._pending.is_alive()
            start = time.perf_counter()
            chunk = self._record(self._pending.result())
            self._switch(chunk, d, late, (time.perf_counter() - start) * 1e3)
            self._pending, boundary = None, True
        if self._pending is None and self._index == s:
            prefix = self._chunk[s:] if self.mode == "rtc" else None
            if d == 0:  # sync (or an instantaneous policy): infer now, start the new chunk at step 0
                self._switch(self._record(self._infer(observation, prefix)), 0, False, 0.0)
                boundary = True
            else:
                self._pending = _Inference(self.policy.infer, observation, self._infer_kwargs(prefix))
                self._pending.start()
                self._ticks_left = d
        action = self._chunk[self._index]
        if self._last is not None and not boundary:
            self._steps.append(float(np.linalg.norm(action - self._last)))
        self._index += 1
        if self._pending is not None:
            self._ticks_left -= 1
        self._tick += 1
        self._last = action
        return action

    def stats(self) -> dict[str, float]:
        """Boundary statistics so far: mean/max jump at switches against the mean step inside chunks
        (native units, L2 over action dims), switch and late-switch counts, inference time."""
        jumps = [sw.jump for sw in self.switches]
        mean = lambda v: float(np.mean(v)) if v else float("nan")
        return {"switches": len(jumps), "late_switches": sum(sw.late for sw in self.switches),
                "mean_jump": mean(jumps), "max_jump": max(jumps, default=float("nan")),
                "mean_step": mean(self._steps), "mean_wait_ms": mean([sw.wait_ms for sw in self.switches]),
                "mean_infer_ms": mean(self.infer_ms), "inferences": self._inferences}

    # ------------------------------------------------------------------ internals

    def _infer_kwargs(self, prefix: np.ndarray | None) -> dict:
        kwargs: dict[str, Any] = {}
        if self.seed is not None:
            kwargs["rng_seed"] = self.seed + self._inferences
        if prefix is not None:
            kwargs.update(prefix_actions=prefix, inference_delay=self.inference_delay)
        self._inferences += 1
        return kwargs

    def _infer(self, observation: dict, prefix: np.ndarray | None) -> dict:
        return self.policy.infer(observation, **self._infer_kwargs(prefix))

    def _record(self, out: dict) -> np.ndarray:
        chunk = np.asarray(out["actions"], np.float32)
        if chunk.ndim != 2 or chunk.shape[0] != self.horizon:
            raise ValueError(f"policy returned actions of shape {chunk.shape}, expected [{self.horizon}, A]")
        self.infer_ms.append(float(out.get("infer_ms", float("nan"))))
        return chunk

    def _switch(self, chunk: np.ndarray, index: int, late: bool, wait_ms: float) -> None:
        self.switches.append(Switch(tick=self._tick, jump=float(np.linalg.norm(chunk[index] - self._last)),
                                    late=late, wait_ms=wait_ms, infer_ms=self.infer_ms[-1]))
        self._chunk, self._index = chunk, index
