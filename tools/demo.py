"""The README's demo, end to end on a 2-core CPU: data, training, export, closed-loop evaluation.

    python -m tools.demo [--workdir runs/demo] [--regenerate] [--episodes 10]

Runs, as separate processes (TensorFlow, which writes the datasets, and MuJoCo rendering cannot
share a process):
    python -m tools.generate --config configs/demo.py --out WORKDIR/data      (skipped if present)
    python -m vla.train --config configs/demo.py --workdir WORKDIR --config.data.root=WORKDIR/data
    python -m tools.export --workdir WORKDIR --out WORKDIR/bundle --overwrite
    python -m tools.eval --bundle WORKDIR/bundle --episodes 10 --out WORKDIR/eval
and prints the success table with the time each stage took. The trainer resumes from WORKDIR's
latest checkpoint, so running the demo again only re-exports and re-evaluates a finished run.
"""
import os
import subprocess
import sys
import time

from absl import app, flags

import configs

DEMO_CONFIG = os.path.join(os.path.dirname(configs.__file__), "demo.py")


def _run(command: list[str]) -> float:
    """Runs one stage, failing the demo if it fails; returns its wall time in seconds."""
    print("$ " + " ".join(command), flush=True)
    start = time.time()
    subprocess.run(command, check=True)
    return time.time() - start


def main(argv: list[str]) -> None:
    """Runs the four stages and prints the time each took."""
    del argv
    f = flags.FLAGS
    workdir = f.workdir
    data, bundle, results = (os.path.join(workdir, d) for d in ("data", "bundle", "eval"))
    python = sys.executable
    seconds = {}
    if f.regenerate or not os.path.exists(os.path.join(data, "metaworld_rlds", "stats.json")):
        seconds["generate"] = _run([python, "-m", "tools.generate", "--config", DEMO_CONFIG,
                                    "--out", data, "--overwrite"])
    seconds["train"] = _run([python, "-m", "vla.train", "--config", DEMO_CONFIG, "--workdir", workdir,
                             f"--config.data.root={data}"])
    seconds["export"] = _run([python, "-m", "tools.export", "--workdir", workdir, "--out", bundle,
                              "--overwrite"])
    seconds["evaluate"] = _run([python, "-m", "tools.eval", "--bundle", bundle, "--episodes",
                                str(f.episodes), "--out", results])
    stages = ", ".join(f"{name} {s / 60:.1f}" for name, s in seconds.items())
    print(f"demo done in {sum(seconds.values()) / 60:.1f} min ({stages}). Loss curves: "
          f"{workdir}/loss.png; bundle: {bundle}; success table, JSON and rollout GIFs: {results}")


def define_flags() -> None:
    """The command line: python -m tools.demo --help."""
    flags.DEFINE_string("workdir", "runs/demo", "Where the data (WORKDIR/data), checkpoints, logs, bundle "
                        "(WORKDIR/bundle) and evaluation results (WORKDIR/eval) go.")
    flags.DEFINE_bool("regenerate", False, "Generate the data again even if WORKDIR/data already holds it.")
    flags.DEFINE_integer("episodes", 10, "Closed-loop evaluation episodes per task (LeRobot's protocol: 10).")


if __name__ == "__main__":
    define_flags()
    app.run(main)
