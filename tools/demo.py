"""The README's demo, end to end on a 2-core CPU: generate Meta-World data, then train the demo.

    python -m tools.demo [--workdir runs/demo] [--regenerate]

Runs, as separate processes (TensorFlow, which writes the datasets, and MuJoCo rendering cannot
share a process):
    python -m tools.generate --config configs/demo.py --out WORKDIR/data     (skipped if present)
    python -m vla.train --config configs/demo.py --workdir WORKDIR --config.data.root=WORKDIR/data
The trainer resumes from WORKDIR's latest checkpoint, so running the demo again continues it.
"""
import os
import subprocess
import sys
import time

from absl import app, flags

import configs

DEMO_CONFIG = os.path.join(os.path.dirname(configs.__file__), "demo.py")


def _run(command: list[str]) -> None:
    print("$ " + " ".join(command), flush=True)
    subprocess.run(command, check=True)


def main(argv: list[str]) -> None:
    del argv
    start = time.time()
    workdir = flags.FLAGS.workdir
    data = os.path.join(workdir, "data")
    if flags.FLAGS.regenerate or not os.path.exists(os.path.join(data, "metaworld_rlds", "stats.json")):
        _run([sys.executable, "-m", "tools.generate", "--config", DEMO_CONFIG, "--out", data, "--overwrite"])
    _run([sys.executable, "-m", "vla.train", "--config", DEMO_CONFIG, "--workdir", workdir,
          f"--config.data.root={data}"])
    print(f"demo done in {(time.time() - start) / 60:.1f} min; logs, checkpoints and loss curves in {workdir}")


if __name__ == "__main__":
    flags.DEFINE_string("workdir", "runs/demo", "Where data, checkpoints and logs go.")
    flags.DEFINE_bool("regenerate", False, "Generate the data again even if it exists.")
    app.run(main)
