"""Video clips of Meta-World rollouts, without actions, with narration targets.

Behaviours: the scripted expert, a noisy expert (Gaussian action noise, often fails), a
wrong-target mover (goes to a random point away from the object, always fails) and smooth
random motion. Each clip is T frames, `stride` control steps apart (current frame last); its
target answers one question, chosen per clip:
  "what is the robot doing?"       -> the task attempted (or "moving randomly", ...)
  "what is the current subtask?"   -> ground-truth phase at the last frame ("reach the button")
  "has the robot succeeded?"       -> "yes" / "no" at the last frame
Stored as canonical text examples: images {cam: uint8 [T, H, W, 3]}, prompt, target, task.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from data.metaworld_env import MetaWorldEnv, Policy, Rollout, expert

BEHAVIOURS = ("expert", "noisy", "wrong_target", "random")


def behaviour_policy(kind: str, env: MetaWorldEnv, rng: np.random.Generator) -> Policy:
    """A policy for one rollout of behaviour `kind` (state lives in the closure)."""
    if kind == "expert":
        return expert
    if kind == "noisy":
        scale = rng.uniform(0.5, 1.0)
        return lambda e: e.expert_action() + rng.normal(0, scale, 4).astype(np.float32)
    if kind == "wrong_target":
        target = np.array([rng.uniform(-0.2, 0.2), rng.uniform(0.4, 0.6), rng.uniform(0.1, 0.3)])

        def go_to(e: MetaWorldEnv) -> np.ndarray:
            move = np.clip((target - e.gripper_position()) * 10.0, -1, 1)
            return np.append(move, -1.0).astype(np.float32)
        return go_to
    if kind == "random":
        action = np.zeros(4, np.float32)

        def wander(e: MetaWorldEnv) -> np.ndarray:
            # Ornstein-Uhlenbeck: smooth, camera-visible motion rather than per-step jitter.
            action[:] = 0.9 * action + rng.normal(0, 0.3, 4)
            return np.clip(action, -1, 1)
        return wander
    raise ValueError(f"unknown behaviour {kind!r}; known: {BEHAVIOURS}")


def describe(kind: str, env: MetaWorldEnv) -> str:
    """What the robot is doing under behaviour `kind`, as narration."""
    if kind in ("expert", "noisy"):
        return env.instruction
    if kind == "wrong_target":
        return f"moving the arm away from the {env.object_label}"
    return "moving randomly"


def clip_ends(length: int, frames: int, stride: int, count: int,
              rng: np.random.Generator) -> list[int]:
    """`count` distinct last-frame steps (sorted) of clips that fit in `length` steps."""
    first = (frames - 1) * stride
    if length <= first:
        return []
    ends = rng.choice(np.arange(first, length), size=min(count, length - first), replace=False)
    return sorted(int(e) for e in ends)


def clip_steps(end: int, frames: int, stride: int) -> list[int]:
    return [end - stride * (frames - 1 - k) for k in range(frames)]


def clips(rollout: Rollout, kind: str, env: MetaWorldEnv, ends: Sequence[int], frames: int,
          stride: int, rng: np.random.Generator) -> list[dict]:
    """Canonical text examples for the clips ending at `ends` (their frames must have been
    rendered). images: {cam: uint8 [frames, H, W, 3]}."""
    out = []
    for end in ends:
        steps = clip_steps(end, frames, stride)
        questions = [("what is the robot doing?", describe(kind, env)),
                     ("has the robot succeeded?", "yes" if rollout.succeeded[end] else "no")]
        if kind in ("expert", "noisy"):
            questions.append(("what is the current subtask?", rollout.subtasks[end]))
        question, answer = questions[rng.integers(len(questions))]
        out.append({
            "images": {cam: np.stack([rollout.frames[s][cam] for s in steps])
                       for cam in env.cameras},
            "prompt": f"answer en {question}", "target": answer, "task": env.task,
            "kind": f"video_{kind}"})
    return out
