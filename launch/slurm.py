r"""Training on a GPU cluster with SLURM: writes an sbatch script and submits it.

    python -m launch.slurm --config configs/FILE.py[:arg] --workdir /shared/DIR \
        [--nodes N] [--gpus_per_node 8] [--per_gpu] [--time 24:00:00] [--partition P] \
        [--account A] [--job_name NAME] [--env KEY=VALUE ...] [--config.key=value ...] [--dry_run]

Run it from the checkout on the cluster's shared filesystem. The script (WORKDIR/slurm/train.sbatch)
installs this checkout with the CUDA extra into a virtual environment (--venv, created once),
sets JAX_COORDINATOR_ADDRESS (the first node), JAX_NUM_PROCESSES (SLURM_NTASKS) and, in each
task, JAX_PROCESS_ID (SLURM_PROCID) for jax.distributed, then starts one trainer per node (or,
with --per_gpu, one per GPU, each seeing its own GPU through JAX_LOCAL_DEVICE_IDS). The mesh is
sized to nodes x GPUs with explicit --config.mesh.* overrides. --dry_run prints the script and
the sbatch command instead.

Failures: srun --kill-on-bad-exit ends every task when one fails. SLURM's SIGTERM (preemption,
scancel, or --signal 2 minutes before the time limit) makes every process save at the same step
and exit; the job is requeued on preemption, and submitting the same command again resumes from
the latest checkpoint. Logs: WORKDIR/logs/slurm-<job id>.out.

WORKDIR may be gs://BUCKET/PATH: the trainers write checkpoints and metrics there (the nodes need
gcsfs and credentials), but sbatch reads its script and SLURM writes its logs on a filesystem, so
those two go to runs/gcs/BUCKET/PATH/{slurm,logs}/ below the current directory: the checkout, on
the shared filesystem, which the job runs from. Either way the workdir is checked writable
before submitting.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence

from absl import app, flags
from ml_collections import config_flags

from configs import cli
from data import storage
from launch import common


def script(*, job_name: str, nodes: int, gpus_per_node: int, per_gpu: bool, trainer: Sequence[str],
           logs: str, venv: str, time_limit: str, env: Mapping[str, str], partition: str | None = None,
           account: str | None = None, command: str = "") -> str:
    """The sbatch script; `trainer` is the trainer's own flags (--config ... --workdir ...), `logs`
    the shared folder SLURM writes the job's output to."""
    tasks = gpus_per_node if per_gpu else 1
    options = [f"--job-name={job_name}", f"--nodes={nodes}", f"--ntasks-per-node={tasks}",
               f"--gpus-per-node={gpus_per_node}", f"--time={time_limit}",
               f"--output={logs}/slurm-%j.out", "--open-mode=append",
               "--signal=TERM@120", "--requeue"]
    options += [f"--partition={partition}"] * bool(partition) + [f"--account={account}"] * bool(account)
    process_env = "JAX_PROCESS_ID=$SLURM_PROCID" + (" JAX_LOCAL_DEVICE_IDS=$SLURM_LOCALID" if per_gpu else "")
    python = f"{venv}/bin/python"
    run = shlex.join([python, "-m", common.TRAINER_MODULE, *trainer])
    lines = ["#!/bin/bash", f"# Written by: {command}" if command else "# Written by launch.slurm",
             *(f"#SBATCH {o}" for o in options),
             "set -euo pipefail",
             'cd "$SLURM_SUBMIT_DIR"',
             "# This checkout with the CUDA extra, in a virtual environment on the shared filesystem.",
             f"[ -x {python} ] || python3 -m venv {venv}",
             f"{python} -m pip install -q -e '.[cuda]'",
             *(f"export {k}={shlex.quote(v)}" for k, v in env.items()),
             "# jax.distributed from SLURM's variables: the first node coordinates; one process per task.",
             ('export JAX_COORDINATOR_ADDRESS="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)'
              ':$((20000 + SLURM_JOB_ID % 20000))"'),
             'export JAX_NUM_PROCESSES="$SLURM_NTASKS"',
             f"srun --kill-on-bad-exit=1 bash -c {shlex.quote(f'{process_env} exec {run}')}"]
    return "\n".join(lines) + "\n"


def script_path(workdir: str) -> str:
    """WORKDIR/slurm/train.sbatch; sbatch reads a file, so for a gs:// workdir common.local_dir's."""
    return os.path.join(common.local_dir(workdir), "slurm", "train.sbatch")


def log_dir(workdir: str) -> str:
    """WORKDIR/logs; SLURM writes files, so for a gs:// workdir common.local_dir's."""
    return os.path.join(common.local_dir(workdir), "logs")


def submit(text: str, workdir: str) -> str:
    """Writes the script, submits it from this checkout; returns SLURM's job id."""
    path = script_path(workdir)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.makedirs(log_dir(workdir), exist_ok=True)  # SLURM does not create it
    with open(path, "w") as f:
        f.write(text)
    proc = subprocess.run(["sbatch", "--parsable", path], check=False, cwd=common.REPO,
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"sbatch {path} failed: {proc.stderr.strip()}")
    return proc.stdout.strip().split(";")[0]


def main(argv: Sequence[str]) -> None:
    """Writes the sbatch script and submits it (or, with --dry_run, prints both)."""
    del argv
    f = flags.FLAGS
    config, spec = f.config, common.repo_relative(config_flags.get_config_filename(f["config"]))
    gpus = f.gpus_per_node
    slices = common.slices(config.mesh)  # multi-node meshes may put a dcn_* axis across processes
    mesh = common.mesh_overrides(config.mesh, f.nodes * gpus // slices, slices)
    config.update_from_flattened_dict(mesh)
    keys = [k for k in config_flags.get_override_values(f["config"]) if k not in mesh] + list(mesh)
    workdir = os.fspath(storage.path(f.workdir))  # absolute, or a gs:// URL; other schemes fail here
    text = script(job_name=f.job_name or storage.path(workdir).name, nodes=f.nodes,
                  gpus_per_node=gpus, per_gpu=f.per_gpu,
                  trainer=common.trainer_flags(spec, workdir, common.override_flags(config, keys)),
                  logs=log_dir(workdir), venv=f.venv, time_limit=f.time, env=dict(e.split("=", 1) for e in f.env),
                  partition=f.partition, account=f.account,
                  command=shlex.join(["python", "-m", "launch.slurm",
                                      *(a for a in sys.argv[1:] if a.lstrip("-") not in ("dry_run", "nodry_run"))]))
    if f.dry_run:
        print(f"# {script_path(workdir)}\n{text}$ sbatch --parsable {script_path(workdir)}")
        return
    common.check_writable(workdir, "--workdir")
    job = submit(text, workdir)
    print(f"submitted job {job}: {script_path(workdir)}\n"
          + common.where(workdir, int(config.total_steps), os.path.join(log_dir(workdir), f"slurm-{job}.out")))


def define_flags() -> None:
    """The command line: python -m launch.slurm --help."""
    cli.define_config_flag("Run config file, configs/FILE.py or configs/FILE.py:ARG "
                           "(required); override its values with --config.KEY=VALUE.")
    flags.DEFINE_string("workdir", None, "The run's directory on the filesystem every node shares, or "
                        "gs://BUCKET/PATH (required): checkpoints, metrics, slurm/train.sbatch and logs/ (for "
                        "gs://, the last two in runs/gcs/BUCKET/PATH/ below the current directory).")
    flags.DEFINE_integer("nodes", 1, "Number of nodes (machines) the job runs on.")
    flags.DEFINE_integer("gpus_per_node", 8, "GPUs on each node; the mesh is sized to nodes x this.")
    flags.DEFINE_bool("per_gpu", False, "Start one trainer process per GPU (each seeing only its GPU) instead of "
                      "one per node seeing all of them.")
    flags.DEFINE_string("time", "24:00:00", "SLURM time limit, HH:MM:SS or D-HH:MM:SS; the trainer gets SIGTERM "
                        "(save and exit) 2 minutes before it.")
    flags.DEFINE_string("partition", None, "SLURM partition (default: the cluster's default partition).")
    flags.DEFINE_string("account", None, "SLURM account to charge (default: your default account).")
    flags.DEFINE_string("job_name", None, "SLURM job name (default: the workdir's last path component).")
    flags.DEFINE_string("venv", ".venv-cuda", "Virtual environment with the CUDA extra, relative to the checkout; "
                        "created on the first run.")
    flags.DEFINE_multi_string("env", [], "KEY=VALUE: an environment variable exported for every task")
    flags.DEFINE_bool("dry_run", False, "Print the sbatch script and the sbatch command instead of submitting.")
    flags.mark_flags_as_required(["config", "workdir"])


if __name__ == "__main__":
    define_flags()
    app.run(common.usage_errors(main))
