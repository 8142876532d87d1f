"""Closed-loop Meta-World evaluation of a bundle (LeRobot's protocol; see vla/sim_eval.py).

    python -m tools.eval --bundle BUNDLE [--tasks mt10] [--episodes 10] [--seed 0]
        [--max_steps 500] [--gifs 2] [--mode sync|naive|rtc] [--inference_delay 0]
        [--steps_executed N] [--out DIR]

--tasks takes task and group names, comma-separated: mt10, mt50, easy, medium, hard, very_hard,
reach-v3, ... (default: the tasks the bundle's run trained on). Writes OUT/results.json (per task,
group and overall; every episode's seed, success and steps; policy metadata; timing),
OUT/results.md (the table, also printed) and OUT/gifs/ (the first --gifs episodes of each task).
OUT defaults to BUNDLE-eval next to the bundle.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from vla import bundle as bundle_lib
from vla import sim_eval


def default_out(bundle: str) -> str:
    return os.path.abspath(bundle).rstrip(os.sep) + "-eval"


def run(bundle: str, tasks: str = "", out: str | None = None, **kwargs: Any) -> dict[str, Any]:
    """Loads the bundle and runs sim_eval.evaluate_policy (kwargs: its options) into `out`."""
    from vla.policy import Policy

    tasks = tasks or ",".join(bundle_lib.read_config(bundle).data.tasks)
    sim_eval.resolve_tasks(tasks)  # a typo fails before the policy compiles
    policy = Policy.from_bundle(bundle, warmup=True)
    return sim_eval.evaluate_policy(policy, tasks, out_dir=out or default_out(bundle), **kwargs)


def main(argv: Sequence[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax narrates the parameter restore at INFO
    f = flags.FLAGS
    out = f.out or default_out(f.bundle)
    results = run(f.bundle, f.tasks, out, episodes=f.episodes, seed=f.seed,
                  max_steps=f.max_steps, gif_episodes=f.gifs, mode=f.mode,
                  inference_delay=f.inference_delay, steps_executed=f.steps_executed)
    t = results["timing"]
    print(sim_eval.format_table(results))
    print(f"{t['seconds']:.0f} s ({t['seconds_per_episode']:.2f} s an episode, "
          f"{t['ms_per_env_step']:.1f} ms an env step, {t['act_ms_per_tick']:.1f} ms per action); "
          f"results in {out}")


if __name__ == "__main__":
    from absl import app, flags, logging

    from vla.rtc import MODES

    flags.DEFINE_string("bundle", None, "Bundle directory (python -m tools.export).")
    flags.DEFINE_string("tasks", "", "Task and group names, comma-separated (default: the "
                        "bundle's training tasks).")
    flags.DEFINE_integer("episodes", sim_eval.EPISODES, "Episodes per task.")
    flags.DEFINE_integer("seed", 0, "Scene seed (episode seeds derive from it, the task and the index).")
    flags.DEFINE_integer("max_steps", sim_eval.MAX_STEPS, "Env steps (80 Hz) per episode.")
    flags.DEFINE_integer("gifs", 2, "Episodes per task saved as GIFs.")
    flags.DEFINE_enum("mode", "sync", list(MODES), "Chunk execution (vla/rtc.py).")
    flags.DEFINE_integer("inference_delay", 0, "Control ticks an inference takes (naive / rtc).")
    flags.DEFINE_integer("steps_executed", None, "Actions executed per chunk (default: the bundle's).")
    flags.DEFINE_string("out", None, "Output directory (default: BUNDLE-eval).")
    flags.mark_flag_as_required("bundle")
    app.run(main)
