"""Where training metrics go: a JSONL file and TensorBoard in the workdir, stdout, a loss-curve PNG.

    WORKDIR/metrics.jsonl        one {"step": n, name: value, ...} object per logged step
    WORKDIR/tensorboard/         TensorBoard event files, written with plain file I/O: tensorboard's
                                 EventFileWriter opens files through TensorFlow whenever it is
                                 installed, and TensorFlow and MuJoCo cannot share a process
    WORKDIR/loss.png             loss curves, redrawn at every checkpoint

Only one process of a multi-process run writes (`enabled`). On resume the rows past the restored
step are dropped: those steps run again and would otherwise appear twice.
"""
from __future__ import annotations

import json
import math
import os
import socket
import time
from collections.abc import Mapping

from matplotlib.figure import Figure
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter


class MetricsWriter:
    def __init__(self, workdir: str, enabled: bool, resume_step: int = 0):
        self.enabled = enabled
        self.history: list[dict[str, float]] = []
        if not enabled:
            return
        self._path = os.path.join(workdir, "metrics.jsonl")
        if os.path.exists(self._path):
            with open(self._path) as f:
                rows = [json.loads(line) for line in f if line.strip()]
            self.history = [r for r in rows if r["step"] <= resume_step]
            with open(self._path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.history)
        self._file = open(self._path, "a")
        self._tb_file = _event_file(os.path.join(workdir, "tensorboard"))
        self._tb = RecordWriter(self._tb_file)
        self._tb.write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString())

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: float(v) for k, v in scalars.items()}}
        self.history.append(row)
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=k, simple_value=v)
                                             for k, v in row.items() if k != "step"])
        self._tb.write(event_pb2.Event(wall_time=time.time(), step=step, summary=summary).SerializeToString())
        self._tb_file.flush()

    def plot(self, path: str) -> None:
        """Training losses (total and per source) and held-out curves against step."""
        if not self.enabled or not self.history:
            return
        names = sorted({k for row in self.history for k in row
                        if "loss" in k or k.startswith("eval/action_mae")})
        panels = {"train": [n for n in names if not n.startswith("eval/")],
                  "held-out": [n for n in names if n.startswith("eval/")]}
        panels = {title: keys for title, keys in panels.items() if keys}
        fig = Figure(figsize=(6 * len(panels), 4))
        axes = fig.subplots(1, len(panels), squeeze=False)
        for ax, (title, keys) in zip(axes[0], panels.items()):
            for key in keys:
                points = [(r["step"], r[key]) for r in self.history
                          if key in r and math.isfinite(r[key]) and r[key] > 0]
                if points:
                    ax.plot(*zip(*points), label=key, marker="." if len(points) < 30 else None)
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.set_yscale("log")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=80)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            self._tb_file.close()


def _event_file(logdir: str):
    """A new event file named the way TensorBoard looks for them."""
    os.makedirs(logdir, exist_ok=True)
    name = f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.{os.getpid()}"
    return open(os.path.join(logdir, name), "wb")
