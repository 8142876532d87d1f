"""Closed-loop Meta-World evaluation of a bundle (LeRobot's protocol; see vla/sim_eval.py).

    python -m tools.eval --bundle BUNDLE [--tasks mt10] [--episodes 10] [--seed 0]
        [--max_steps 500] [--gifs 2] [--failure_gifs 0] [--mode sync|naive|rtc] [--inference_delay 0]
        [--steps_executed N] [--out DIR]

--tasks takes task and group names, comma-separated: mt10, mt50, easy, medium, hard, very_hard,
reach-v3, ... (default: the tasks the bundle's run trained on). Writes OUT/results.json (per task,
group and overall; every episode's seed, success and steps; policy metadata; timing),
OUT/results.md (the table, also printed) and OUT/gifs/ (the first --gifs episodes of each task,
and its first --failure_gifs failed ones).
OUT defaults to BUNDLE-eval next to the bundle.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from absl import app, flags, logging

from configs import specs
from data import storage
from vla import bundle as bundle_lib
from vla import sim_eval
from vla.policy import Policy
from vla.rtc import MODES


def default_out(bundle: str) -> str:
    return os.fspath(storage.path(bundle)).rstrip("/") + "-eval"


def run(bundle: str, tasks: str = "", out: str | None = None, **kwargs: Any) -> dict[str, Any]:
    """Loads the bundle and runs sim_eval.evaluate_policy (kwargs: its options) into `out`."""
    tasks = tasks or ",".join(specs.build(bundle_lib.read_config(bundle)).generation.tasks)
    sim_eval.resolve_tasks(tasks)  # a typo fails before the policy compiles
    policy = Policy.from_bundle(bundle, warmup=True)
    return sim_eval.evaluate_policy(policy, tasks, out_dir=out or default_out(bundle), **kwargs)


def main(argv: Sequence[str]) -> None:
    """Evaluates the bundle, prints the success table and writes the results to --out."""
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax narrates the parameter restore at INFO
    f = flags.FLAGS
    out = f.out or default_out(f.bundle)
    results = run(f.bundle, f.tasks, out, episodes=f.episodes, seed=f.seed,
                  max_steps=f.max_steps, gif_episodes=f.gifs, failure_gifs=f.failure_gifs, mode=f.mode,
                  inference_delay=f.inference_delay, steps_executed=f.steps_executed)
    t = results["timing"]
    print(sim_eval.format_table(results))
    print(f"{t['seconds']:.0f} s ({t['seconds_per_episode']:.2f} s an episode, "
          f"{t['ms_per_env_step']:.1f} ms an env step, {t['act_ms_per_tick']:.1f} ms per action); "
          f"results in {out}")


def define_flags() -> None:
    """The command line: python -m tools.eval --help."""
    flags.DEFINE_string("bundle", None, "Bundle directory written by python -m tools.export (required).")
    flags.DEFINE_string("tasks", "", "Task and group names, comma-separated: mt10, mt50, easy, medium, hard, "
                        "very_hard, reach-v3, ... (default: the tasks the bundle's run trained on).")
    flags.DEFINE_integer("episodes", sim_eval.EPISODES, "Episodes per task.")
    flags.DEFINE_integer("seed", 0, "Scene seed; each episode's seed derives from it, the task and the episode's "
                         "index.")
    flags.DEFINE_integer("max_steps", sim_eval.MAX_STEPS, "Env steps (80 Hz) per episode at most; an episode that "
                         "has not succeeded by then fails.")
    flags.DEFINE_integer("gifs", 2, "Episodes per task saved as GIFs in OUT/gifs/ (the first ones).")
    flags.DEFINE_integer("failure_gifs", 0, "Failed episodes per task saved as GIFs in OUT/gifs/ too (the first "
                         "ones that fail).")
    flags.DEFINE_enum("mode", "sync", list(MODES), "How action chunks are executed (vla/rtc.py): sync waits for "
                      "each inference; naive and rtc run the next inference while the current chunk executes "
                      "(rtc, real-time chunking, makes the new chunk continue the old one).")
    flags.DEFINE_integer("inference_delay", 0, "Control ticks an inference takes in the naive and rtc modes "
                         "(simulated: counted in ticks, not wall time).")
    flags.DEFINE_integer("steps_executed", None, "Actions executed per chunk before the next one (default: the "
                         "bundle's).")
    flags.DEFINE_string("out", None, "Output directory for results.json, results.md and gifs/ (default: "
                        "BUNDLE-eval next to the bundle).")
    flags.mark_flag_as_required("bundle")


if __name__ == "__main__":
    define_flags()
    app.run(main)
