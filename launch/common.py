"""What every launcher shares: config files and overrides, the trainer's command line, the mesh
for a given set of devices, a run's progress on disk, and child processes that stop together.

The trainer command is always `python -m vla.train --config FILE[:arg] --workdir DIR
--config.key=value ...`; launchers only decide where and how many times it runs. A workdir or
sweep root is a local path or a gs:// URL: every path goes through data/storage.py, which
refuses any other scheme. What must be a local file (the output of processes spawned here,
streamed into a file descriptor) lives in `local_dir(workdir)`.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import signal
import subprocess
import time
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import ml_collections
from absl import app
from etils import epath

from data import storage
from vla import sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINER_MODULE = "vla.train"
GCS_LOCAL = os.path.join("runs", "gcs")  # below the current directory: local_dir of gs:// workdirs
COMMIT_FILE = "commit_success.txt"  # Orbax's marker of a complete checkpoint on gs://


# ------------------------------------------------------------------------------- command lines

def usage_errors(main: Callable[[Sequence[str]], None]) -> Callable[[Sequence[str]], None]:
    """A CLI's main whose bad-input errors (ValueError, FileNotFoundError) print as absl usage
    errors: the message, without a traceback."""

    @functools.wraps(main)
    def wrapped(argv: Sequence[str]) -> None:
        try:
            main(argv)
        except (ValueError, FileNotFoundError) as e:
            raise app.UsageError(str(e)) from e

    return wrapped


# ------------------------------------------------------------------------------- configs

def load_module(spec: str) -> tuple[types.ModuleType, str | None]:
    """'configs/demo.py[:arg]' -> (the config module, arg)."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} not found")
    module_spec = importlib.util.spec_from_file_location(
        "launch_config_" + os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module, arg or None


def get_value(config: ml_collections.ConfigDict, key: str) -> Any:
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def format_value(value: Any) -> str:
    """A config value as the trainer's --config.key=VALUE flag parses it back."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return str(value) if isinstance(value, str) else repr(value)
    if isinstance(value, (tuple, list)):
        return repr(tuple(value))
    raise TypeError(f"cannot pass a {type(value).__name__} ({value!r}) as a --config override")


def override_flags(config: ml_collections.ConfigDict, keys: Sequence[str]) -> list[str]:
    """--config.key=value for each key, with the value the (typed) config holds."""
    return [f"--config.{key}={format_value(get_value(config, key))}" for key in keys]


def repo_relative(spec: str) -> str:
    """'FILE[:arg]' with FILE relative to this checkout's root if inside it (how commands that run
    from the checkout, here or on another machine, see it), absolute otherwise."""
    path, sep, arg = spec.partition(":")
    full = os.path.abspath(path)
    inside = os.path.commonpath([full, REPO]) == REPO
    return (os.path.relpath(full, REPO) if inside else full) + sep + arg


def trainer_flags(config_spec: str, workdir: str, flags: Sequence[str]) -> list[str]:
    """The trainer's own arguments: --config FILE[:arg] --workdir DIR --config.key=value ..."""
    return ["--config", config_spec, "--workdir", workdir, *flags]


def trainer_args(config_spec: str, workdir: str, flags: Sequence[str]) -> list[str]:
    """What follows `python` to run the trainer: -m vla.train --config ... --workdir ... flags."""
    return ["-m", TRAINER_MODULE, *trainer_flags(config_spec, workdir, flags)]


def resolved(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as JSON-able data (what the trainer writes to WORKDIR/config.json)."""
    return json.loads(config.to_json_best_effort())


# ------------------------------------------------------------------------------- mesh

def slices(mesh: Mapping[str, int]) -> int:
    """How many slices the config's dcn_* mesh axes span (1 without multislice)."""
    return math.prod(int(mesh.get(name, 1)) for name in sharding.DCN_AXES)


def mesh_overrides(mesh: Mapping[str, int], devices_per_slice: int, slices: int = 1) -> dict[str, int]:
    """Explicit mesh.* overrides for `slices` slices of `devices_per_slice` devices each.

    The config's -1 axis fills the slice; its dcn_* axes must span `slices`, except that a config
    without any (all 1) puts every slice on dcn_data: data parallelism across slices.
    """
    sizes = dict(mesh)
    dcn = [int(sizes.get(name, 1)) for name in sharding.DCN_AXES]
    if slices > 1 and dcn == [1] * len(dcn):
        sizes["dcn_data"] = slices
    elif dcn != [1] * len(dcn) and math.prod(dcn) != slices:
        raise ValueError(f"the config's mesh {dict(zip(sharding.DCN_AXES, dcn))} spans {math.prod(dcn)} "
                         f"slices, but {slices} slice(s) were asked for")
    ici, dcn = sharding.mesh_shape(sizes, devices_per_slice * slices)
    return {f"mesh.{name}": size for name, size in zip(sharding.MESH_AXES + sharding.DCN_AXES, ici + dcn)}


# ------------------------------------------------------------------------------- storage

def check_writable(directory: str, what: str) -> None:
    """storage.check_writable as a usage error naming the flag: a bad bucket or an unwritable
    folder stops a launcher before any job starts."""
    try:
        storage.check_writable(directory)
    except OSError as e:
        raise app.UsageError(f"{what}: {e}") from e


def local_dir(workdir: str) -> str:
    """A folder on this machine for what a launcher keeps next to a run and must be a local file:
    the workdir itself (absolute) when local; for gs://BUCKET/PATH, whose objects a child's output
    cannot stream into, runs/gcs/BUCKET/PATH below the current directory."""
    if not storage.is_remote(workdir):
        return os.fspath(storage.path(workdir))
    bucket_and_path = os.fspath(storage.path(workdir)).split("://", 1)[1].strip("/")
    return os.path.abspath(os.path.join(GCS_LOCAL, *bucket_and_path.split("/")))


# ------------------------------------------------------------------------------- progress

def _complete(step: epath.Path) -> bool:
    """A local checkpoint is complete once it has its step's name (Orbax renames it into place);
    on gs://, where Orbax writes in place, once its commit marker (written last) exists."""
    return (step / COMMIT_FILE).exists() if storage.is_remote(step) else step.is_dir()


def latest_step(workdir: str) -> int | None:
    """The newest complete checkpoint in WORKDIR/checkpoints, as the trainers wrote it so far."""
    directory = storage.fresh(workdir) / "checkpoints"
    if not directory.is_dir():
        return None
    steps = [int(p.name) for p in directory.iterdir() if p.name.isdigit() and _complete(p)]
    return max(steps) if steps else None


def is_finished(workdir: str, total_steps: int) -> bool:
    """The run saved its final checkpoint (the trainer always saves at total_steps)."""
    return _complete(storage.fresh(workdir) / "checkpoints" / str(total_steps))


def where(workdir: str, total_steps: int, logs: str) -> str:
    """Where a run's logs and checkpoints are, and how far it got."""
    step = latest_step(workdir)
    state = ("no checkpoint yet" if step is None else f"latest step {step} of {total_steps}"
             + ("" if step >= total_steps else "; run the same command again to resume from it"))
    return f"logs: {logs}\ncheckpoints: {storage.join(workdir, 'checkpoints')} ({state})"


# ------------------------------------------------------------------------------- processes

def spawn(argv: Sequence[str], env: Mapping[str, str], log_path: str | None,
          capture: bool = False) -> subprocess.Popen:
    """A child in its own session (a terminal's Ctrl-C reaches only the launcher, which decides
    what the children get); output to log_path, or to a pipe with `capture`."""
    kwargs = {"env": dict(env), "stderr": subprocess.STDOUT, "stdin": subprocess.DEVNULL, "start_new_session": True}
    if capture:
        return subprocess.Popen(list(argv), stdout=subprocess.PIPE, **kwargs)
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "ab") as out:  # the child keeps its own descriptor
        return subprocess.Popen(list(argv), stdout=out, **kwargs)


def terminate(procs: Sequence[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM to the running ones (the trainer saves and exits), SIGKILL after grace_s."""
    running = [p for p in procs if p.poll() is None]
    for p in running:
        p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in running:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@contextmanager
def forward_signals(children: Callable[[], Sequence[subprocess.Popen]]) -> Iterator[list[int]]:
    """While active, SIGTERM or SIGINT to the launcher sends SIGTERM to every running child (they
    save a checkpoint and exit); a second signal kills them. Yields the signals received."""
    received: list[int] = []

    def handle(signum, frame):
        del frame
        received.append(signum)
        for p in children():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM if len(received) == 1 else signal.SIGKILL)

    previous = {s: signal.signal(s, handle) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
