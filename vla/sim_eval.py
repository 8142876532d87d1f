"""Closed-loop evaluation on Meta-World: success rate per task and difficulty group.

The command line is tools/eval.py; the trainer's command line adds `make_hook` (config.sim_eval).

Protocol (LeRobot's Meta-World evaluation): the scenes of data/metaworld_env.py (camera `corner2`
moved to [0.75, 0.075, 0.7], corner images flipped, state = hand xyz + gripper, 4-d actions
clipped to [-1, 1]); 10 episodes per task by default; an episode succeeds if the env reports
success at any step, and ends there or after `max_steps` env steps (500: LeRobot's rollout runs
`env._max_episode_steps`, which its Meta-World env sets to Meta-World's max_path_length = 500).
Tasks are grouped as MT10 (metaworld's own list) and the MT50 difficulty groups easy / medium /
hard / very_hard of Seo et al. (2022) that LeRobot reports. The prompt is the task instruction
the training data used (data/metaworld_env.TASKS), not LeRobot's description strings: a policy
trained here has only ever seen ours.

Seeds: episode i of a task resets to `episode_seed(seed, task, i)`, a function of the task's
name rather than its position in the list, so a task sees the same scenes in every run whatever
else is evaluated. The scene is a deterministic function of the seed (MetaWorldEnv.reset).

Control rate: the env steps at its native 80 Hz; the policy acts at its own control_hz. The
training windows (data/resample.chunk_positions) put chunk action k at time t + k / control_hz,
sampled from the native action sequence, and a native action is the command held for one 80 Hz
step. So here the policy is asked for an action at control tick k, i.e. at the first env step
at or after time k / control_hz, and that action is held until the next tick (4 env steps at the
demo's 20 Hz). Context frames (knobs.context_frames > 1) are the env steps that
data/resample.context_indices picks for the tick, exactly as in training; frames before the
episode start are left out (training masks them). Only the steps some tick looks at are rendered.

Any `ActionSource` (reset() per episode, act(observation) per tick) plays the episodes: the
trained policy through vla.rtc.ChunkExecutor (`evaluate_policy`; a fresh executor per episode,
its sampling noise seeded from the episode seed), or the scripted expert (`ExpertSource`).

Trainer hook (`make_hook`, on when config.sim_eval.tasks is non-empty): every process of a
multi-process run plays the same episodes with the replicated policy, because each inference is
one jitted computation over the global mesh that all processes must enter together; and since
rendering or numerics could differ across hosts, episodes then run to max_steps instead of
stopping at success, so every process makes the same number of inferences (success still counts
at its first step). Only process 0 writes results and GIFs.
"""
from __future__ import annotations

import atexit
import dataclasses
import json
import math
import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol, Self

import imageio.v3 as iio
import jax
import numpy as np
from metaworld.env_dict import MT10_V3, MT50_V3
from tqdm import tqdm

from configs.specs import RunSpec
from data import resample, storage
from data.metaworld_env import ACTION_DIM, CONTROL_HZ, MetaWorldEnv
from vla.evaluator import EvalHook
from vla.policy import Policy
from vla.rtc import MODES, ChunkExecutor

MAX_STEPS = 500  # Meta-World's max_path_length: the env refuses to step further
EPISODES = 10
MT10 = tuple(MT10_V3)
MT50 = tuple(MT50_V3)
# The MT50 difficulty groups of Seo et al., "Masked World Models for Visual Control" (2022).
DIFFICULTY: dict[str, tuple[str, ...]] = {
    "easy": (
        "button-press-topdown-v3", "button-press-topdown-wall-v3", "button-press-v3",
        "button-press-wall-v3", "coffee-button-v3", "dial-turn-v3", "door-close-v3",
        "door-lock-v3", "door-open-v3", "door-unlock-v3", "drawer-close-v3", "drawer-open-v3",
        "faucet-close-v3", "faucet-open-v3", "handle-press-side-v3", "handle-press-v3",
        "handle-pull-side-v3", "handle-pull-v3", "lever-pull-v3", "peg-unplug-side-v3",
        "plate-slide-back-side-v3", "plate-slide-back-v3", "plate-slide-side-v3",
        "plate-slide-v3", "reach-v3", "reach-wall-v3", "window-close-v3", "window-open-v3"),
    "medium": (
        "basketball-v3", "bin-picking-v3", "box-close-v3", "coffee-pull-v3", "coffee-push-v3",
        "hammer-v3", "peg-insert-side-v3", "push-wall-v3", "soccer-v3", "sweep-into-v3",
        "sweep-v3"),
    "hard": ("assembly-v3", "hand-insert-v3", "pick-out-of-hole-v3", "pick-place-v3",
             "push-back-v3", "push-v3"),
    "very_hard": ("disassemble-v3", "pick-place-wall-v3", "shelf-place-v3", "stick-pull-v3",
                  "stick-push-v3"),
}
GROUPS: dict[str, tuple[str, ...]] = {"mt10": MT10, "mt50": MT50, **DIFFICULTY}
_DIFFICULTY_OF = {task: group for group, tasks in DIFFICULTY.items() for task in tasks}


# ------------------------------------------------------------------------------- tasks and seeds

def resolve_tasks(names: str | Iterable[str]) -> tuple[str, ...]:
    """Task and group names ("mt10", "easy", "reach-v3,drawer-open-v3", or a sequence of them)
    -> task names in the given order, without repeats. Unknown names raise ValueError."""
    items = names.split(",") if isinstance(names, str) else list(names)
    tasks: list[str] = []
    for raw in items:
        name = raw.strip().lower()
        if not name:
            continue
        if name in GROUPS:
            expanded = GROUPS[name]
        elif name in _DIFFICULTY_OF:
            expanded = (name,)
        else:
            raise ValueError(f"unknown Meta-World task or group {raw.strip()!r}; groups: "
                             f"{sorted(GROUPS)}; tasks: {sorted(MT50)}")
        tasks += [t for t in expanded if t not in tasks]
    if not tasks:
        raise ValueError(f"no tasks given; name tasks or groups ({sorted(GROUPS)})")
    return tuple(tasks)


def difficulty(task: str) -> str:
    return _DIFFICULTY_OF[task]


def episode_seed(seed: int, task: str, index: int) -> int:
    """The reset seed of episode `index` of `task`: fixed per (seed, task name, index)."""
    return int(np.random.SeedSequence([seed, zlib.crc32(task.encode()), index])
               .generate_state(1)[0])


# ------------------------------------------------------------------------------- what the policy sees

@dataclasses.dataclass(frozen=True)
class PolicySpec:
    """The policy's inputs and rate: cameras rendered at image_size², action every tick."""

    cameras: tuple[str, ...]
    image_size: int
    control_hz: float
    context_frames: int = 1
    context_stride_s: float = 0.0

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> PolicySpec:
        """From a policy's metadata (vla.bundle.describe)."""
        return cls(tuple(metadata["cameras"]), int(metadata["image_size"]),
                   float(metadata["control_hz"]), int(metadata["context_frames"]),
                   float(metadata["context_stride_s"]))


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Per env step of an episode: does the policy act, which steps are rendered.

    ticks: env steps where an action is asked for (held until the next tick)
    context: tick -> env steps of its context frames, oldest first, current last
    """

    ticks: frozenset[int]
    context: dict[int, tuple[int, ...]]
    render: frozenset[int]
    max_steps: int

    @classmethod
    def build(cls, spec: PolicySpec, native_hz: float, max_steps: int) -> Schedule:
        if not 0 < spec.control_hz <= native_hz:
            raise ValueError(f"control_hz={spec.control_hz} must be in (0, {native_hz}] (the "
                             f"env's native rate): an env step cannot hold several actions")
        if not 1 <= max_steps <= MAX_STEPS:
            raise ValueError(f"max_steps={max_steps} must be in [1, {MAX_STEPS}] (Meta-World's "
                             f"max_path_length)")
        period = native_hz / spec.control_hz
        ticks = sorted({math.ceil(k * period - 1e-6)
                        for k in range(math.ceil(max_steps / period) + 1)} & set(range(max_steps)))
        context = {}
        for t in ticks:
            idx, valid = resample.context_indices(t, native_hz, spec.context_frames,
                                                  spec.context_stride_s)
            context[t] = tuple(int(i) for i in idx[valid])
        render = frozenset(i for steps in context.values() for i in steps)
        return cls(frozenset(ticks), context, render, max_steps)

    def lookback(self) -> int:
        """How many steps before a tick its oldest context frame is."""
        return max(t - c[0] for t, c in self.context.items())


# ------------------------------------------------------------------------------- episodes

class ActionSource(Protocol):
    """Anything that plays an episode: vla.rtc.ChunkExecutor, ExpertSource."""

    def reset(self) -> None: ...

    def act(self, observation: dict[str, Any]) -> np.ndarray:
        """observation {"images": {cam: uint8 [h, w, 3] or [t, h, w, 3]}, "state": f32 [4],
        "prompt": str} -> action f32 [4]."""


class ExpertSource:
    """The env's scripted expert (ignores the observation; reads the simulator state)."""

    def __init__(self, env: MetaWorldEnv):
        self._env = env

    def reset(self) -> None:
        pass

    def act(self, observation: dict[str, Any]) -> np.ndarray:
        del observation
        return self._env.expert_action()


@dataclasses.dataclass
class EpisodeResult:
    index: int
    seed: int
    success: bool
    steps: int  # env steps up to and including the first success, else max_steps
    seconds: float
    act_seconds: float  # of which in the action source (inference)
    ticks: int  # actions asked for
    source_stats: dict[str, float] | None = None  # the source's stats() (ChunkExecutor's)


def run_episode(env: MetaWorldEnv, source: ActionSource, seed: int, schedule: Schedule,
                index: int = 0, keep_frames: bool = False, stop_at_success: bool = True
                ) -> tuple[EpisodeResult, list[np.ndarray]]:
    """Plays one episode (see the module docstring for rates and context frames); with
    stop_at_success=False it plays on to max_steps after a success.

    Returns the result and, with keep_frames, the current frame of every tick (cameras side by
    side, uint8 [h, n_cams * w, 3]) for a GIF.
    """
    start = time.perf_counter()
    source.reset()
    obs = env.reset(seed)
    frames = {0: obs["images"]}  # env step -> {cam: image}, only steps some tick looks at
    lookback = schedule.lookback()
    gif: list[np.ndarray] = []
    act_seconds, ticks, action, first_success, step = 0.0, 0, None, None, 0
    while step < schedule.max_steps and (first_success is None or not stop_at_success):
        if step in schedule.ticks:
            context = schedule.context[step]
            images = {c: (frames[step][c] if len(context) == 1
                          else np.stack([frames[i][c] for i in context])) for c in env.cameras}
            t0 = time.perf_counter()
            action = np.asarray(source.act({"images": images, "state": obs["state"],
                                            "prompt": env.instruction}), np.float32)
            act_seconds += time.perf_counter() - t0
            ticks += 1
            if action.shape != (ACTION_DIM,):
                raise ValueError(f"the action source returned shape {list(action.shape)}; "
                                 f"Meta-World takes [{ACTION_DIM}]")
            if keep_frames:
                gif.append(np.concatenate([frames[step][c] for c in env.cameras], axis=1))
            for old in [i for i in frames if i < step - lookback]:
                del frames[old]
        obs, _, success, _ = env.step(np.clip(action, -1.0, 1.0),
                                      render=step + 1 in schedule.render)
        step += 1
        if obs["images"]:
            frames[step] = obs["images"]
        if success and first_success is None:
            first_success = step
    stats = getattr(source, "stats", None)
    return EpisodeResult(index, seed, first_success is not None, first_success or step,
                         time.perf_counter() - start, act_seconds, ticks,
                         stats() if stats else None), gif


# ------------------------------------------------------------------------------- evaluation

class EnvCache:
    """One MetaWorldEnv per task, built on first use and reset for every episode (building is
    the slow part: ~1.5 s a task)."""

    def __init__(self, cameras: Sequence[str], image_size: int):
        self.cameras, self.image_size = tuple(cameras), int(image_size)
        self._envs: dict[str, MetaWorldEnv] = {}
        self.build_seconds = 0.0

    def get(self, task: str) -> MetaWorldEnv:
        if task not in self._envs:
            start = time.perf_counter()
            self._envs[task] = MetaWorldEnv(task, self.cameras, self.image_size, MAX_STEPS)
            self.build_seconds += time.perf_counter() - start
        return self._envs[task]

    def close(self) -> None:
        for env in self._envs.values():
            env.close()
        self._envs.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def evaluate(make_source: Callable[[MetaWorldEnv, int], ActionSource],
             tasks: str | Sequence[str], spec: PolicySpec, *, episodes: int = EPISODES, seed: int = 0,
             max_steps: int = MAX_STEPS, gif_episodes: int = 0, gif_dir: str | None = None,
             envs: EnvCache | None = None, stop_at_success: bool = True, progress: bool = True,
             failure_gifs: int = 0) -> dict[str, Any]:
    """Plays `episodes` seeded episodes of every task, each with the actions of
    make_source(env, episode seed).

    envs: reuse environments across calls (the trainer hook); else built here and closed.
    gif_dir: where the first `gif_episodes` episodes of each task are written as GIFs
    (TASK_epI_success.gif / _failure.gif, real time at control_hz), and also the first
    `failure_gifs` failed episodes of each task (what one looks at to see why a task fails).
    Returns the JSON-able results (see `summarize`).
    """
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    tasks = resolve_tasks(tasks)
    schedule = Schedule.build(spec, CONTROL_HZ, max_steps)
    own_envs = envs is None
    if own_envs:
        envs = EnvCache(spec.cameras, spec.image_size)
    if (envs.cameras, envs.image_size) != (spec.cameras, spec.image_size):
        raise ValueError(f"env cache renders {envs.cameras} at {envs.image_size}², the policy "
                         f"wants {spec.cameras} at {spec.image_size}²")
    if gif_dir and (gif_episodes or failure_gifs):
        storage.path(gif_dir).mkdir(parents=True, exist_ok=True)
    start, build_before = time.perf_counter(), envs.build_seconds
    results: dict[str, list[EpisodeResult]] = {}
    bar = tqdm(total=len(tasks) * episodes, desc="sim eval", unit="episode", disable=not progress,
               dynamic_ncols=True)
    try:
        for task in tasks:
            env = envs.get(task)
            results[task] = []
            failures_shown = 0
            for i in range(episodes):
                first = i < gif_episodes
                keep = bool(gif_dir) and (first or failures_shown < failure_gifs)
                ep_seed = episode_seed(seed, task, i)
                result, frames = run_episode(env, make_source(env, ep_seed), ep_seed, schedule,
                                             i, keep_frames=keep, stop_at_success=stop_at_success)
                results[task].append(result)
                failed = keep and not result.success and failures_shown < failure_gifs
                failures_shown += failed
                if keep and (first or failed):
                    write_gif(storage.join(
                        gif_dir, f"{task}_ep{i}_{'success' if result.success else 'failure'}.gif"),
                        frames, spec.control_hz)
                done = [r.success for rs in results.values() for r in rs]
                bar.set_postfix(task=task, success=f"{np.mean(done):.0%}", refresh=False)
                bar.update()
    finally:
        bar.close()
        if own_envs:
            envs.close()
    protocol = dict(episodes=episodes, seed=seed, max_steps=max_steps, native_hz=CONTROL_HZ,
                    **dataclasses.asdict(spec))
    return summarize(results, protocol, time.perf_counter() - start,
                     envs.build_seconds - build_before)


def summarize(results: Mapping[str, Sequence[EpisodeResult]], protocol: dict[str, Any],
              seconds: float, build_seconds: float) -> dict[str, Any]:
    """{"protocol", "tasks": {task: {group, successes, episodes, rate, mean_steps,
    episode_results}}, "groups": {name: {tasks, of, successes, episodes, rate}} for every group
    with an evaluated task, "overall": {successes, episodes, rate}, "timing"}."""
    tasks = {}
    for task, rs in results.items():
        n, wins = len(rs), sum(r.success for r in rs)
        tasks[task] = {"group": difficulty(task), "successes": wins, "episodes": n,
                       "rate": wins / n, "mean_steps": float(np.mean([r.steps for r in rs])),
                       "episode_results": [dataclasses.asdict(r) for r in rs]}

    def pooled(names: Sequence[str]) -> dict[str, Any]:
        wins, n = sum(tasks[t]["successes"] for t in names), sum(tasks[t]["episodes"] for t in names)
        return {"successes": wins, "episodes": n, "rate": wins / n}

    groups = {}
    for name, members in GROUPS.items():
        evaluated = [t for t in members if t in tasks]
        if evaluated:
            groups[name] = {"tasks": len(evaluated), "of": len(members), **pooled(evaluated)}
    every = [r for rs in results.values() for r in rs]
    steps = sum(r.steps for r in every)
    played = sum(r.seconds for r in every)
    timing = {"seconds": seconds, "env_build_seconds": build_seconds,
              "seconds_per_episode": played / len(every), "ms_per_env_step": 1e3 * played / steps,
              "act_ms_per_tick": 1e3 * sum(r.act_seconds for r in every)
              / max(1, sum(r.ticks for r in every))}
    return {"protocol": protocol, "tasks": tasks, "groups": groups, "overall": pooled(list(tasks)),
            "timing": timing}


def evaluate_policy(policy: Policy, tasks: str | Sequence[str], *, episodes: int = EPISODES,
                    seed: int = 0, max_steps: int = MAX_STEPS, gif_episodes: int = 0,
                    out_dir: str | None = None, mode: str = "sync", inference_delay: int = 0,
                    steps_executed: int | None = None, envs: EnvCache | None = None,
                    stop_at_success: bool = True, progress: bool = True,
                    failure_gifs: int = 0) -> dict[str, Any]:
    """`evaluate` with a vla.policy.Policy run by vla.rtc.ChunkExecutor(mode, inference_delay,
    steps_executed: default the policy's), one executor per episode with the episode's seed.

    out_dir: results.json, results.md and gifs/ are written there. Returns the results with the
    policy's metadata ("policy") and the executor settings ("executor") added.
    """
    metadata = policy.metadata
    steps = int(steps_executed or metadata["steps_executed"])
    ChunkExecutor(policy, steps, mode, inference_delay)  # bad settings fail before any env is built

    def make_source(env: MetaWorldEnv, ep_seed: int) -> ChunkExecutor:
        del env
        return ChunkExecutor(policy, steps, mode, inference_delay, seed=ep_seed)

    results = evaluate(make_source, resolve_tasks(tasks), PolicySpec.from_metadata(metadata),
                       episodes=episodes, seed=seed, max_steps=max_steps,
                       gif_episodes=gif_episodes, failure_gifs=failure_gifs,
                       gif_dir=storage.join(out_dir, "gifs") if out_dir else None, envs=envs,
                       stop_at_success=stop_at_success, progress=progress)
    results["executor"] = {"mode": mode, "steps_executed": steps, "inference_delay": inference_delay}
    results["policy"] = dict(metadata)
    if out_dir:
        write_results(out_dir, results)
    return results


def make_hook(spec: RunSpec, metadata: dict[str, Any], out_dir: str | None = None) -> EvalHook:
    """The trainer's closed-loop hook (vla.evaluator.EvalHook) for spec.sim_eval.

    Every spec.sim_eval.every steps (and at the last step) it evaluates the model it is given
    as Policy.from_model(spec, model, metadata) and returns {"sim/success/<task>": rate,
    "sim/success": overall rate}; process 0 writes out_dir/step_<N>/. The hook runs inside the
    trainer's evaluator, so `every` must be a multiple of eval_every and eval_batches > 0.
    Environments are built at the first evaluation and reused.
    """
    s, t = spec.sim_eval, spec.train
    tasks = resolve_tasks(s.tasks)
    every = s.every
    if every < 1 or every % t.eval_every:
        raise ValueError(f"sim_eval.every={every} must be a positive multiple of "
                         f"eval_every={t.eval_every}: the hook runs at evaluations")
    if not t.eval_batches:
        raise ValueError("sim_eval needs eval_batches > 0: the closed-loop hook runs inside the "
                         "trainer's evaluator, which eval_batches=0 turns off")
    # Checked here, before training starts, rather than at the first evaluation.
    if s.episodes < 1 or not 1 <= s.max_steps <= MAX_STEPS or s.mode not in MODES:
        raise ValueError(f"sim_eval: need episodes >= 1 (got {s.episodes}), max_steps in "
                         f"[1, {MAX_STEPS}] (got {s.max_steps}), mode in {MODES} (got {s.mode!r})")
    total, chief = t.total_steps, jax.process_index() == 0
    envs: EnvCache | None = None

    def hook(step: int, model) -> dict[str, float]:
        nonlocal envs
        if step % every and step != total:
            return {}
        # Compiled at the first inference: only the path the executor's mode takes.
        policy = Policy.from_model(spec, model, metadata, step=step, warmup=False)
        first = envs is None
        if first:
            played = PolicySpec.from_metadata(policy.metadata)
            envs = EnvCache(played.cameras, played.image_size)
        results = evaluate_policy(
            policy, tasks, episodes=s.episodes, seed=s.seed, max_steps=s.max_steps,
            gif_episodes=s.gif_episodes,
            out_dir=storage.join(out_dir, f"step_{step}") if out_dir and chief else None,
            mode=s.mode, inference_delay=s.inference_delay, envs=envs,
            stop_at_success=jax.process_count() == 1, progress=chief)
        if first:  # GL contexts left to the interpreter's exit complain; registered after
            atexit.register(envs.close)  # MuJoCo's EGL exit handler, so it runs before that one
        return {"sim/success": results["overall"]["rate"],
                **{f"sim/success/{t}": r["rate"] for t, r in results["tasks"].items()}}

    return hook


# ------------------------------------------------------------------------------- outputs

def write_gif(path: str, frames: Sequence[np.ndarray], fps: float) -> None:
    storage.path(path).write_bytes(iio.imwrite("<bytes>", np.stack(frames), extension=".gif",
                                               duration=1000.0 / fps, loop=0))


def format_table(results: dict[str, Any]) -> str:
    """Markdown: one row per task (group, success %, successes / episodes, mean steps), then
    one per group with its coverage, then the overall rate."""
    lines = ["| task | group | success | episodes | mean steps |", "|---|---|---:|---:|---:|"]
    for task, r in results["tasks"].items():
        lines.append(f"| {task} | {r['group']} | {100 * r['rate']:.1f}% | "
                     f"{r['successes']}/{r['episodes']} | {r['mean_steps']:.0f} |")
    lines += ["", "| group | tasks | success | episodes |", "|---|---:|---:|---:|"]
    for name, g in results["groups"].items():
        lines.append(f"| {name} | {g['tasks']}/{g['of']} | {100 * g['rate']:.1f}% | "
                     f"{g['successes']}/{g['episodes']} |")
    o = results["overall"]
    lines.append(f"| **overall** | {len(results['tasks'])} | **{100 * o['rate']:.1f}%** | "
                 f"{o['successes']}/{o['episodes']} |")
    return "\n".join(lines) + "\n"


def write_results(out_dir: str, results: dict[str, Any]) -> str:
    """out_dir/results.json (everything) and out_dir/results.md (the table); returns the table."""
    out = storage.path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=_jsonable))
    table = format_table(results)
    p, t = results["protocol"], results["timing"]
    (out / "results.md").write_text(
        f"# Meta-World closed-loop evaluation\n\n{p['episodes']} episodes per task (seed "
        f"{p['seed']}), at most {p['max_steps']} env steps at {p['native_hz']:g} Hz, "
        f"policy at {p['control_hz']:g} Hz; {t['seconds']:.0f} s.\n\n{table}")
    return table


def _jsonable(value: Any) -> Any:
    """numpy scalars and arrays in the policy metadata -> JSON."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return str(value)
