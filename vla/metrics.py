"""Where training metrics go: a JSONL file and TensorBoard in the workdir, optionally Weights &
Biases, and a loss-curve PNG.

    WORKDIR/metrics.jsonl        one {"step": n, name: value, ...} object per logged step
    WORKDIR/tensorboard/         one TensorBoard event file, written with plain file I/O:
                                 tensorboard's EventFileWriter opens files through TensorFlow
                                 whenever it is installed, and TensorFlow and MuJoCo cannot share
                                 a process
    WORKDIR/loss.png             loss curves, redrawn at every checkpoint
    WORKDIR/wandb_run_id         the W&B run's id (only with config.metrics.wandb_project), so a
                                 resumed job continues the same run

Only one process of a multi-process run writes (`enabled`).

Resume: every start keeps what was logged up to the restored step and drops the rest, since
those steps run again. metrics.jsonl is rewritten with the kept rows; the event files in
WORKDIR/tensorboard are replaced by a single new one holding the kept events (their wall times
too), so TensorBoard shows each step once. Event files of older versions, one per start, are
merged on the way: a later file supersedes an earlier one from its first step on, as a resumed
run supersedes the steps it replays. Both are replaced all or nothing (written beside, then
renamed), so a kill during the start loses nothing.

Storage: every path goes through data/storage.py, so WORKDIR may be a gs:// URL. Locally, rows
and events are appended and flushed at every write. GCS objects are immutable and gcsfs quietly
turns append mode into overwrite, so on gs:// every write re-uploads metrics.jsonl and the event
file whole from the history held in memory (events are framed once, when logged): an object is
always a complete file, at the cost of an upload that grows with the run, a few MB for 10^4
logged steps.

Weights & Biases (pip install -e ".[wandb]"; imported only when config.metrics.wandb_project is
set) gets the same rows, beside TensorBoard. The run id lives in the workdir and every start
resumes it (resume="allow"). W&B refuses steps below the last it holds, so after a resume only
steps past the last one logged before it (the old metrics.jsonl's last row, or the W&B server's
last step when online) are sent: W&B keeps the first values of the replayed steps, which an exact
resume reproduces anyway. (wandb's resume_from would rewind the run instead, but it is a beta
feature of the server and does not work offline.) The local run files go where wandb puts them:
$WANDB_DIR/wandb, else ./wandb; an offline run is uploaded later with `wandb sync`.
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import socket
import struct
import time
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

from etils import epath
from matplotlib.figure import Figure
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

from data import storage

WANDB_MODES = ("", "online", "offline", "disabled")


@dataclasses.dataclass(frozen=True)
class MetricsSpec:
    """Where metrics go besides the workdir (configs/base.py documents each key)."""

    wandb_project: str = ""  # "" = no W&B
    wandb_entity: str = ""
    wandb_name: str = ""  # "" = the workdir's basename
    wandb_mode: str = ""  # "" = wandb's default ($WANDB_MODE, else online)
    wandb_tags: tuple[str, ...] = ()

    def __post_init__(self):
        if self.wandb_mode not in WANDB_MODES:
            raise ValueError(f"metrics.wandb_mode={self.wandb_mode!r}: one of {WANDB_MODES}")


class MetricsWriter:
    def __init__(self, workdir: str, enabled: bool, resume_step: int = 0, spec: MetricsSpec = MetricsSpec(),
                 config: Mapping[str, Any] | None = None):
        """resume_step: the restored checkpoint's step (0 for a fresh run); config: the run's
        config as a dict, shown by W&B."""
        self.enabled = enabled
        self.history: list[dict[str, float]] = []
        if not enabled:
            return
        root = storage.path(workdir)
        self._remote = storage.is_remote(root)
        self._jsonl = root / "metrics.jsonl"
        rows = read_rows(self._jsonl)
        self.history = [r for r in rows if r["step"] <= resume_step]
        tb = storage.fresh(root / "tensorboard")  # gcsfs may hold an older listing of it
        tb.mkdir(parents=True, exist_ok=True)
        # (A gs:// "folder" exists only while it holds objects: mkdir makes none.)
        old = [p for p in tb.iterdir() if "tfevents" in p.name] if tb.exists() else []
        header = event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2")
        self._records = [_frame(header), *_kept_records(old, resume_step)]
        self._events = tb / f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.{os.getpid()}"
        _replace(self._jsonl, _jsonl(self.history))
        _replace(self._events, b"".join(self._records))
        for p in old:  # after the new file is whole: it holds everything they had up to resume_step
            p.unlink()
        if not self._remote:
            self._file = self._jsonl.open("a")
            self._tb_file = self._events.open("ab")
        self._wandb = None
        if spec.wandb_project:
            self._wandb = _wandb_run(root, spec, config)
            # W&B refuses steps below the last it has: only steps past everything logged before.
            self._wandb_after = max([r["step"] for r in rows] + [self._wandb.step - 1])

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: float(v) for k, v in scalars.items()}}
        self.history.append(row)
        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=k, simple_value=v)
                                             for k, v in row.items() if k != "step"])
        record = _frame(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))
        self._records.append(record)
        if self._remote:
            _replace(self._jsonl, _jsonl(self.history))
            _replace(self._events, b"".join(self._records))
        else:
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()
            self._tb_file.write(record)
            self._tb_file.flush()
        if self._wandb is not None and step > self._wandb_after:
            self._wandb.log({k: v for k, v in row.items() if k != "step"}, step=step)

    def plot(self, path: str | os.PathLike) -> None:
        """Training losses (total and per source) and held-out curves against step, as a PNG at
        path (local or gs://)."""
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
        with storage.path(path).open("wb") as f:
            fig.savefig(f, format="png", dpi=80)

    def close(self) -> None:
        if not self.enabled:
            return
        if not self._remote:
            self._file.close()
            self._tb_file.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_rows(path: epath.Path) -> list[dict[str, float]]:
    """metrics.jsonl's rows ([] when absent); a torn last line (a kill mid-write) is dropped."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _jsonl(rows: list[dict[str, float]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _frame(event: event_pb2.Event) -> bytes:
    """One event as an event-file record (TFRecord framing with its CRCs)."""
    buf = io.BytesIO()
    RecordWriter(buf).write(event.SerializeToString())
    return buf.getvalue()


def _records(data: bytes) -> Iterator[tuple[event_pb2.Event, bytes]]:
    """The events of an event file, each with its framed record: length (u64), its CRC, data,
    its CRC. A torn record at the end (a kill mid-write) ends the file."""
    pos = 0
    while pos + 12 <= len(data):
        (n,) = struct.unpack_from("<Q", data, pos)
        end = pos + 12 + n + 4
        if end > len(data):
            return
        yield event_pb2.Event.FromString(data[pos + 12:pos + 12 + n]), data[pos:end]
        pos = end


def _kept_records(files: list[epath.Path], resume_step: int) -> list[bytes]:
    """The summary records of old event files up to resume_step, each logged step once. Files
    are named by their creation time; a later one (a later start) supersedes the earlier ones
    from its first step on, since that start replayed those steps."""
    kept, floor = [], resume_step + 1
    for f in sorted(files, key=lambda p: p.name, reverse=True):
        events = [(e.step, r) for e, r in _records(f.read_bytes()) if e.HasField("summary")]
        kept = [r for step, r in events if step < floor] + kept
        floor = min([floor] + [step for step, _ in events])
    return kept


def _replace(path: epath.Path, data: bytes) -> None:
    """path's content becomes data, all or nothing. A GCS object appears whole when its upload
    completes; a local file is written beside and renamed over."""
    if storage.is_remote(path):
        path.write_bytes(data)
        return
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"  # no "tfevents": TensorBoard skips it
    tmp.write_bytes(data)
    tmp.replace(path)


def _wandb_run(root: epath.Path, spec: MetricsSpec, config: Mapping[str, Any] | None):
    """The workdir's W&B run: started on the first start, resumed (same id) on every later one."""
    import wandb  # an optional dependency, needed only when a project is set

    id_file = root / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:16]
    run = wandb.init(project=spec.wandb_project, entity=spec.wandb_entity or None,
                     name=spec.wandb_name or root.name, mode=spec.wandb_mode or None,
                     tags=list(spec.wandb_tags), id=run_id, resume="allow",
                     config=dict(config or {}),
                     allow_val_change=True)  # a resumed run may change keys (total_steps)
    id_file.write_text(run_id)
    return run
