"""Generating the local training data: Meta-World expert episodes (RLDS), scene VL examples, videos.

The command line is tools/generate.py, which also ships the tokenizer, the statistics and the
FAST fits (its `postprocess`). Writes under the output directory:
    metaworld_rlds/   RLDS episodes of the scripted experts; splits "train" and "heldout";
                      every step records its ground-truth subtask ("reach the button", ...)
    scenes_vl/        captions, VQA, detection and pointing on frames of the train episodes
    rollout_video/    narrated clips of expert, noisy, wrong-target and random rollouts
    tokenizer.model   SentencePiece model trained on all generated text (data.tokenizer)
    <source>/stats.json  normalization statistics of each robot source (data.stats)
    <source>/fast/       the FAST action tokenizer at the run's window, when FAST targets
                         are on (data.fast_targets)

Every rollout has its own seed derived from (spec.seed, task, stream, index), so the output
is identical for any --processes. Failed expert episodes are dropped and counted.
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from data import metaworld_env, rlds, scenes, video  # noqa: E402
from data.spec import GenerationSpec  # noqa: E402
from data.tfds_image_text import encode_text_example, text_features  # noqa: E402

ROBOT_DIR, SCENES_DIR, VIDEO_DIR = "metaworld_rlds", "scenes_vl", "rollout_video"
_TRAIN, _HELDOUT, _VIDEO = 0, 1, 2  # seed streams
_SCENE_WINDOW = 48  # scene frames are drawn from the first steps: every expert is busy that long


@dataclasses.dataclass(frozen=True)
class Settings:
    """What a worker needs (plain values: pickled to spawned processes)."""
    cameras: tuple[str, ...]
    image_size: int
    max_steps: int = 500
    steps_after_success: int = 10
    scene_frames_per_episode: int = 2
    clip_frames: int = 4
    clip_stride: int = 8
    clips_per_rollout: int = 2
    video_steps: int = 120


@dataclasses.dataclass(frozen=True)
class Job:
    task: str
    split: str  # "train" | "heldout" | "video"
    index: int
    seed: int
    behaviour: str = "expert"


@dataclasses.dataclass
class Result:
    job: Job
    success: bool
    episode: dict[str, Any] | None  # RLDS episode (PNG frames) when kept
    length: int
    scene_examples: list[dict[str, Any]]
    video_examples: list[dict[str, Any]]


def rollout_seed(base: int, task_index: int, stream: int, index: int) -> int:
    return int(np.random.SeedSequence([base, task_index, stream, index]).generate_state(1)[0])


def plan(spec: GenerationSpec, video_rollouts_per_task: int) -> list[Job]:
    """All rollouts in output order: train episodes, heldout episodes, video rollouts."""
    jobs = []
    for split, stream, count in (("train", _TRAIN, spec.episodes_per_task),
                                 ("heldout", _HELDOUT, spec.heldout_episodes_per_task)):
        jobs += [Job(task, split, i, rollout_seed(spec.seed, t, stream, i))
                 for t, task in enumerate(spec.tasks) for i in range(count)]
    non_expert = video.BEHAVIOURS[1:]
    jobs += [Job(task, "video", i, rollout_seed(spec.seed, t, _VIDEO, i),
                 non_expert[i % len(non_expert)])
             for t, task in enumerate(spec.tasks) for i in range(video_rollouts_per_task)]
    return jobs


# --------------------------------------------------------------------------- worker side
_SETTINGS: Settings | None = None
_ENVS: dict[str, metaworld_env.MetaWorldEnv] = {}


def _init_worker(settings: Settings) -> None:
    global _SETTINGS
    _SETTINGS = settings
    _ENVS.clear()


def _env(task: str) -> metaworld_env.MetaWorldEnv:
    if task not in _ENVS:  # built once per process, reset for every rollout
        _ENVS[task] = metaworld_env.MetaWorldEnv(task, _SETTINGS.cameras, _SETTINGS.image_size,
                                                 _SETTINGS.max_steps)
    return _ENVS[task]


def run_job(job: Job) -> Result:
    s, env = _SETTINGS, _env(job.task)
    rng = np.random.default_rng([job.seed, 1])  # scene/clip choices; the scene uses job.seed
    if job.split == "video":
        ends = video.clip_ends(s.video_steps, s.clip_frames, s.clip_stride, s.clips_per_rollout,
                               rng)
        render = {t for e in ends for t in video.clip_steps(e, s.clip_frames, s.clip_stride)}
        policy = video.behaviour_policy(job.behaviour, env, rng)
        rollout = metaworld_env.run_episode(env, job.seed, policy, s.video_steps, None, render)
        clips = video.clips(rollout, job.behaviour, env, ends, s.clip_frames, s.clip_stride, rng)
        return Result(job, rollout.success, None, len(rollout.state), [],
                      [encode_text_example(c, env.cameras) for c in clips])

    scene_steps = set(rng.choice(_SCENE_WINDOW, s.scene_frames_per_episode, replace=False)
                      .tolist()) if job.split == "train" else set()
    scene_examples: list[dict[str, Any]] = []

    def capture(t: int, obs: metaworld_env.Observation) -> None:
        if t in scene_steps:
            for cam in env.cameras:
                scene_examples.extend(scenes.scene_examples(env, cam, obs["images"][cam], rng))

    rollout = metaworld_env.run_episode(env, job.seed, metaworld_env.expert, s.max_steps,
                                        s.steps_after_success, on_step=capture)
    n = len(rollout.state)
    if not rollout.success:
        return Result(job, False, None, n, [], [])
    clips = []
    if job.split == "train":
        ends = video.clip_ends(n, s.clip_frames, s.clip_stride, s.clips_per_rollout, rng)
        clips = video.clips(rollout, "expert", env, ends, s.clip_frames, s.clip_stride, rng)
    images = {cam: [rlds.encode_png(rollout.frames[t][cam]) for t in range(n)]
              for cam in env.cameras}
    episode = rlds.rlds_episode(images, rollout.state, rollout.actions, rollout.rewards,
                                env.instruction, job.task, True, job.seed, rollout.subtasks)
    return Result(job, True, episode, n, [encode_text_example(e, env.cameras) for e in scene_examples],
                  [encode_text_example(c, env.cameras) for c in clips])


# --------------------------------------------------------------------------- driver side
def _results(jobs: list[Job], settings: Settings, processes: int) -> Iterator[Result]:
    """Results in job order. Rendering always happens in worker processes, never in the
    caller's: the caller's TFDS writer needs TensorFlow, which cannot share a process with
    MuJoCo's EGL renderer. Spawned, because GL contexts do not survive fork."""
    bar = tqdm(total=len(jobs), desc="rollouts", unit="rollout", smoothing=0.1)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(max(processes, 1), initializer=_init_worker, initargs=(settings,)) as pool:
        for result in pool.imap(run_job, jobs, chunksize=1):
            yield result
            bar.update()
    bar.close()


def generate(spec: GenerationSpec, out: str, processes: int = 1, overwrite: bool = False,
             settings: Settings | None = None, video_rollouts_per_task: int | None = None
             ) -> dict[str, Any]:
    """Plays, renders and writes everything under `out` (see module docstring).
    Returns a summary: per task kept/dropped, example counts, texts, seconds."""
    start = time.time()
    settings = settings or Settings(spec.cameras, spec.image_size)
    if video_rollouts_per_task is None:
        video_rollouts_per_task = max(1, spec.episodes_per_task // 4)
    for sub in (ROBOT_DIR, SCENES_DIR, VIDEO_DIR):
        path = os.path.join(out, sub)
        if os.path.exists(path):
            if not overwrite:
                raise FileExistsError(f"{path} exists (pass --overwrite to replace it)")
            shutil.rmtree(path)
    os.makedirs(out, exist_ok=True)

    jobs = plan(spec, video_rollouts_per_task)
    results = _results(jobs, settings, processes)  # lazy: starts when the writer pulls
    kept, dropped = Counter(), Counter()
    lengths: dict[str, list[int]] = {"train": [], "heldout": []}
    scene_examples: list[dict[str, Any]] = []
    video_examples: list[dict[str, Any]] = []
    texts: list[str] = [metaworld_env.instruction(t) for t in spec.tasks]

    def episodes(split: str, count: int) -> Iterable[dict[str, Any]]:
        # Streams straight from the workers into the writer; the side outputs are kept.
        for _ in range(count):
            r = next(results)
            assert r.job.split == split, (r.job, split)
            scene_examples.extend(r.scene_examples)
            video_examples.extend(r.video_examples)
            if r.success:
                kept[r.job.task] += 1
                lengths[split].append(r.length)
                yield r.episode
            else:
                dropped[r.job.task] += 1

    n_tasks = len(spec.tasks)
    with rlds.TfdsWriter() as writer:
        writer.write(
            os.path.join(out, ROBOT_DIR),
            rlds.robot_features(settings.cameras, settings.image_size, metaworld_env.STATE_DIM,
                                metaworld_env.ACTION_DIM, subtasks=True),
            {"train": episodes("train", n_tasks * spec.episodes_per_task),
             **({"heldout": episodes("heldout", n_tasks * spec.heldout_episodes_per_task)}
                if spec.heldout_episodes_per_task else {})},
            # episode_lengths fills in while the splits stream; it is saved after them.
            {"control_hz": metaworld_env.CONTROL_HZ, "episode_lengths": lengths,
             "tasks": list(spec.tasks), "image_size": settings.image_size},
            "Meta-World v3 scripted-expert episodes (LeRobot camera protocol), 80 Hz.")
        for r in results:  # the video rollouts
            video_examples.extend(r.video_examples)
        features = text_features(settings.cameras, settings.image_size)
        for sub, examples, what in ((SCENES_DIR, scene_examples, "captions, VQA, boxes, points"),
                                    (VIDEO_DIR, video_examples, "narrated rollout clips")):
            writer.write(os.path.join(out, sub), features, {"train": examples},
                         {"kinds": sorted(Counter(e["kind"] for e in examples).items())},
                         f"Meta-World {what}, labelled from simulator ground truth.")
            texts += [t for e in examples for t in (e["prompt"], e["target"])]
    return {"kept": dict(kept), "dropped": dict(dropped), "scene_examples": len(scene_examples),
            "video_examples": len(video_examples), "texts": texts,
            "seconds": time.time() - start}
