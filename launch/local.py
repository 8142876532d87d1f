r"""The trainer in P processes on this machine over loopback: a pod's code path on CPU devices.

    python -m launch.local --config configs/demo.py --workdir runs/local [--processes 2] \
        [--devices_per_process 4] [--grace_s 10] [--config.key=value ...]

Every process runs the same trainer command with JAX_PLATFORMS=cpu, its own forced host-device
count in XLA_FLAGS, and JAX_COORDINATOR_ADDRESS (a free loopback port), JAX_NUM_PROCESSES and
JAX_PROCESS_ID for jax.distributed, exactly as on a pod. Process 0's output is echoed with a
"[0] " prefix; each process logs to WORKDIR/logs/process_<i>.log. The workdir may be a gs:// URL
(checked writable before any process starts); a process's output streams into a local file, not
an object, so its logs then go to runs/gcs/BUCKET/PATH/logs/ below the current directory, and
the launcher prints where.

Failures: a process that exits non-zero or is killed ends the job (the others get SIGTERM, then
SIGKILL after --grace_s) and the launcher exits non-zero. SIGTERM or Ctrl-C to the launcher
reaches every process as SIGTERM: they save a checkpoint at the same step and exit 0. Running
the same command again resumes from the latest checkpoint.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import BinaryIO

from absl import app, flags
from ml_collections import config_flags

from configs import cli
from launch import common

_DEVICE_FLAG = "--xla_force_host_platform_device_count"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def worker_env(base: Mapping[str, str], process_id: int, processes: int, port: int,
               devices: int) -> dict[str, str]:
    """The environment of process `process_id`: CPU devices, and jax.distributed when P > 1.

    A persistent compilation cache (JAX_COMPILATION_CACHE_DIR) gets one subdirectory per process:
    only process 0 writes to it, and its executables, read by another process of a CPU job, hang
    that process's first collective.
    """
    xla_flags = [f for f in base.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_FLAG)]
    env = dict(base, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join([f"{_DEVICE_FLAG}={devices}", *xla_flags]))
    if processes > 1:
        env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(processes),
                   JAX_PROCESS_ID=str(process_id))
        if base.get("JAX_COMPILATION_CACHE_DIR"):
            env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(base["JAX_COMPILATION_CACHE_DIR"],
                                                            f"process_{process_id}_of_{processes}")
    return env


def log_dir(workdir: str) -> str:
    """WORKDIR/logs, on this machine (common.local_dir) for a gs:// workdir."""
    return os.path.join(common.local_dir(workdir), "logs")


def log_path(logs: str, process_id: int) -> str:
    return os.path.join(logs, f"process_{process_id}.log")


def _echo(pipe: BinaryIO, log: str, out: BinaryIO, prefix: bytes) -> None:
    """Copies a child's output to its log file and, prefixed at each line start, to `out`.
    Raw chunks, not lines: progress bars redraw with carriage returns."""
    at_line_start = True
    with open(log, "ab") as f:
        while chunk := os.read(pipe.fileno(), 1 << 16):
            f.write(chunk)
            f.flush()
            text = chunk.replace(b"\n", b"\n" + prefix)
            if at_line_start:
                text = prefix + text
            if text.endswith(prefix):
                text, at_line_start = text[:-len(prefix)], True
            else:
                at_line_start = False
            out.write(text)
            out.flush()


def launch(trainer: Sequence[str], logs: str, processes: int, devices_per_process: int,
           grace_s: float = 10.0, out: BinaryIO | None = None) -> int:
    """Runs `python <trainer...>` in `processes` processes, each logging to the local folder
    `logs`; returns 0 if all exited 0, else the first failure's exit code (1 for a process killed
    by a signal)."""
    if processes < 1 or devices_per_process < 1:
        raise ValueError(f"need at least one process and one device, got {processes} x {devices_per_process}")
    out = out if out is not None else sys.stdout.buffer
    port = free_port()
    procs: list[subprocess.Popen] = []
    for i in range(processes):
        env = worker_env(os.environ, i, processes, port, devices_per_process)
        procs.append(common.spawn([sys.executable, *trainer], env, log_path(logs, i), capture=i == 0))
        print(f"process {i}: pid {procs[i].pid}, log {log_path(logs, i)}", flush=True)
    echo = threading.Thread(target=_echo, args=(procs[0].stdout, log_path(logs, 0), out, b"[0] "),
                            daemon=True)
    echo.start()
    code = 0
    with common.forward_signals(lambda: procs):
        while True:
            codes = [p.poll() for p in procs]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                i, c = failed[0]
                reason = f"was killed by signal {-c}" if c < 0 else f"exited with code {c}"
                print(f"process {i} {reason}: stopping the others (see {log_path(logs, i)})", flush=True)
                common.terminate(procs, grace_s)
                code = c if c > 0 else 1
                break
            if all(c == 0 for c in codes):
                break
            time.sleep(0.2)
    echo.join()
    procs[0].stdout.close()
    return code


def main(argv: Sequence[str]) -> None:
    """Launches the trainer processes; exits with the first failure's code (0 if all succeeded)."""
    del argv
    f = flags.FLAGS
    config = f.config
    spec = config_flags.get_config_filename(f["config"])
    overrides = common.override_flags(config, list(config_flags.get_override_values(f["config"])))
    common.check_writable(f.workdir, "--workdir")
    logs = log_dir(f.workdir)
    code = launch(common.trainer_args(spec, f.workdir, overrides), logs, f.processes,
                  f.devices_per_process, f.grace_s)
    print(common.where(f.workdir, int(config.total_steps), os.path.join(logs, "process_*.log")))
    sys.exit(code)


def define_flags() -> None:
    """The command line: python -m launch.local --help."""
    cli.define_config_flag("Run config file, configs/FILE.py or configs/FILE.py:ARG "
                           "(required); override its values with --config.KEY=VALUE.")
    flags.DEFINE_string("workdir", None, "The run's directory, a local path or gs://BUCKET/PATH (required): "
                        "checkpoints, metrics, and one log per process in logs/ (for gs://, in "
                        "runs/gcs/BUCKET/PATH/logs/ below the current directory). Launching again with the same "
                        "one resumes from its latest checkpoint.")
    flags.DEFINE_integer("processes", 2, "Trainer processes to start on this machine (jax.distributed over "
                         "loopback; 1 runs a single process).")
    flags.DEFINE_integer("devices_per_process", 1, "CPU devices each process gets (forced with "
                         "--xla_force_host_platform_device_count).")
    flags.DEFINE_float("grace_s", 10.0, "Seconds the other processes get between SIGTERM (save and exit) and "
                       "SIGKILL when one process fails.")
    flags.mark_flags_as_required(["config", "workdir"])


if __name__ == "__main__":
    define_flags()
    app.run(common.usage_errors(main))
