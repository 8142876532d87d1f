"""The README's demo, end to end on a 2-core CPU: data, training, export, closed-loop evaluation.

    python -m tools.demo [--workdir runs/demo] [--regenerate] [--episodes 30]

It is tools.benchmark on configs/demo.py: generate the data (skipped if WORKDIR/data holds it),
train (resuming from WORKDIR's newest checkpoint), export WORKDIR/bundle, and evaluate it on
--episodes episodes a task for each of the config's two held-out scene seeds (LeRobot's
protocol), then print the success table with the wall and CPU time of each stage. Running the
demo again after it finished only prints the report; WORKDIR/benchmark.md keeps it.
"""
import os
import shutil

from absl import app, flags

import configs
from configs.demo import get_config
from tools import benchmark

DEMO_CONFIG = os.path.join(os.path.dirname(configs.__file__), "demo.py")


def main(argv: list[str]) -> None:
    del argv
    f = flags.FLAGS
    data = os.path.join(f.workdir, "data")
    if f.regenerate and os.path.exists(data):
        shutil.rmtree(data)
    config = get_config()
    config.sim_eval.final_episodes = f.episodes
    report = benchmark.run(config, DEMO_CONFIG, f.workdir, [f"--config.sim_eval.final_episodes={f.episodes}"])
    wall = sum(s["wall_s"] for s in report["stages"].values())
    print(f"demo done: {100 * report['overall']['rate']:.1f}% in {wall / 60:.1f} min. Loss curves: "
          f"{f.workdir}/loss.png; bundle: {f.workdir}/bundle; report: {f.workdir}/benchmark.md")


def define_flags() -> None:
    """The command line: python -m tools.demo --help."""
    flags.DEFINE_string("workdir", "runs/demo", "Where the data (WORKDIR/data), checkpoints, logs, bundle "
                        "(WORKDIR/bundle), evaluations (WORKDIR/eval) and the report go.")
    flags.DEFINE_bool("regenerate", False, "Generate the data again even if WORKDIR/data already holds it.")
    flags.DEFINE_integer("episodes", 30, "Closed-loop evaluation episodes per task and scene seed.")


if __name__ == "__main__":
    define_flags()
    app.run(main)
