r"""Training on a Cloud TPU pod: one slice (a TPU VM) or several (a queued resource, multislice).

    python -m launch.tpu --tpu NAME --zone ZONE [--accelerator v5p-128] [--slices N] \
        --config configs/FILE.py[:arg] --workdir /shared/DIR [--config.key=value ...] \
        [--project P] [--runtime_version V] [--spot] [--env KEY=VALUE ...] [--dry_run] \
        [--attach | --stop | --delete] [--xpk_cluster CLUSTER] [--aot-check]

With --aot-check, the train step is first compiled here for the slice's TPU topology
(tools.aot: libtpu's compiler on this CPU), and a config that does not fit in HBM, or does not
compile, is refused with the numbers before any TPU is created.

Steps, all through gcloud (--dry_run prints them instead):
  1. reuse the TPU VM / queued resource if it exists, else create it (a queued resource is
     waited for until ACTIVE; a preempted one is deleted and created again);
  2. ship the code: a wheel of this checkout plus the config file, copied to ~/vla/ship on every
     worker, installed with the TPU extra into ~/vla/venv (Python 3.11 via uv);
  3. start the trainer on all workers at once, detached, through launch.autodetect
     (jax.distributed finds the coordinator and process ids in the TPU metadata; multislice
     also gets MEGASCALE_* from the queued resource), with explicit --config.mesh.* overrides
     that size the mesh to the slice (the config's -1 axis fills a slice, dcn_* span slices);
  4. stream worker 0's log (~/vla/train.log) until the trainer exits; Ctrl-C stops only the
     streaming, --attach resumes it.
--stop sends SIGTERM to the trainer on every worker (all save at the same step and exit);
--delete deletes the TPU VM / queued resource. A preempted or failed worker ends the whole job
(jax.distributed); running the same command again resumes from the latest checkpoint.

On a GKE cluster with TPU node pools, --xpk_cluster CLUSTER hands the job to xpk instead
(`xpk workload create`: an image of this checkout on python:3.11, the trainer in every slice's
pods, jax.distributed detecting GKE's TPU environment); --stop and --delete delete the workload.

WORKDIR and config.data.root are gs:// URLs (the usual case: the trainer writes checkpoints and
metrics through data/storage.py and stages a gs:// data root onto each worker once) or absolute
paths that every worker sees (Filestore, a Cloud Storage FUSE mount); other URL schemes and
relative paths are refused. A gs:// workdir is checked writable from here before anything starts.
"""
from __future__ import annotations

import dataclasses
import math
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

from absl import app, flags
from ml_collections import config_flags

from configs import cli
from data import storage
from launch import common
from tools import aot

REMOTE = "~/vla"  # on every worker: ship/ (wheel + config), venv/, train.log, train.pid, train.exit
PYTHON_VERSION = "3.11"  # setup.py's python_requires; TPU VM images ship an older python3


# ------------------------------------------------------------------------------- accelerators

@dataclasses.dataclass(frozen=True)
class Accelerator:
    """One slice of an accelerator type: chips, JAX devices, TPU VM workers (hosts)."""

    name: str
    chips: int
    devices: int
    hosts: int
    runtime_version: str


# generation -> (the type's number counts TensorCores, cores per chip, JAX devices per chip,
# chips per host, runtime version). v4 and v5p fuse a chip's two cores into one device
# (megacore); v5e and v6e types count chips, and up to 8 chips sit on one host.
_GENERATIONS = {
    "v2": (True, 2, 2, 4, "tpu-ubuntu2204-base"),
    "v3": (True, 2, 2, 4, "tpu-ubuntu2204-base"),
    "v4": (True, 2, 1, 4, "tpu-ubuntu2204-base"),
    "v5p": (True, 2, 1, 4, "v2-alpha-tpuv5"),
    "v5litepod": (False, 1, 1, 4, "v2-alpha-tpuv5-lite"),
    "v6e": (False, 1, 1, 4, "v2-alpha-tpuv6e"),
}


def accelerator(name: str) -> Accelerator:
    """'v5p-128' -> 64 chips, 64 devices, 16 hosts."""
    generation, _, count = name.rpartition("-")
    if generation not in _GENERATIONS or not count.isdigit():
        raise ValueError(f"unknown accelerator type {name!r}; expected <{'|'.join(_GENERATIONS)}>-<count>")
    counts_cores, cores_per_chip, devices_per_chip, chips_per_host, runtime = _GENERATIONS[generation]
    chips = int(count) // cores_per_chip if counts_cores else int(count)
    if chips < 1:
        raise ValueError(f"accelerator type {name!r} has no whole chip")
    hosts = 1 if not counts_cores and chips <= 8 else math.ceil(chips / chips_per_host)
    return Accelerator(name, chips, chips * devices_per_chip, hosts, runtime)


# The TPU topology names libtpu (and tools.aot) know a slice by, per generation: v4 and v5p are
# 3D tori (v5p-8 = 2x2x1, v5p-128 = 4x4x4), v5e and v6e 2D (v5litepod-256 = 16x16).
_TOPOLOGY_GENERATIONS = {"v4": ("v4", 3), "v5p": ("v5p", 3), "v5litepod": ("v5e", 2), "v6e": ("v6e", 2)}


def topology_name(a: Accelerator) -> str:
    """'v5p-128' -> 'v5p:4x4x4' (the slice shape GKE and TPU VMs give that type)."""
    generation = a.name.rpartition("-")[0]
    if generation not in _TOPOLOGY_GENERATIONS or a.chips & (a.chips - 1):
        raise ValueError(f"no TPU topology known for {a.name} (generations {sorted(_TOPOLOGY_GENERATIONS)}, "
                         f"a power-of-two chip count)")
    name, rank = _TOPOLOGY_GENERATIONS[generation]
    if rank == 3 and a.chips <= 4:  # the smallest 3D slices are flat: 2x2x1
        dims = {1: [1, 1, 1], 2: [1, 2, 1], 4: [2, 2, 1]}[a.chips]
    else:
        dims = [2, 2, 2] if rank == 3 else [1, 1]
        while math.prod(dims) < a.chips:  # double the last of the smallest sides
            smallest = min(dims)
            dims[max(i for i, d in enumerate(dims) if d == smallest)] *= 2
    return f"{name}:{'x'.join(map(str, dims))}"


# ------------------------------------------------------------------------------- the pod

@dataclasses.dataclass(frozen=True)
class Pod:
    """A TPU VM (one slice) or a queued resource of `slices` slices named NAME-0, NAME-1, ..."""

    name: str
    zone: str
    accelerator: Accelerator
    slices: int = 1
    project: str | None = None
    runtime_version: str | None = None
    spot: bool = False

    @property
    def multislice(self) -> bool:
        return self.slices > 1

    def gcloud(self, verb: str, *args: str) -> list[str]:
        kind = "queued-resources" if self.multislice else "tpu-vm"
        scope = [f"--zone={self.zone}"] + ([f"--project={self.project}"] if self.project else [])
        return ["gcloud", "compute", "tpus", kind, verb, *args, *scope]

    def describe(self) -> list[str]:
        state = "state.state" if self.multislice else "state"
        return self.gcloud("describe", self.name, f"--format=value({state})")

    def create(self) -> list[str]:
        runtime = self.runtime_version or self.accelerator.runtime_version
        spot = ["--spot"] if self.spot else []
        if self.multislice:
            return self.gcloud("create", self.name, f"--accelerator-type={self.accelerator.name}",
                               f"--runtime-version={runtime}", f"--node-count={self.slices}",
                               f"--node-prefix={self.name}", *spot)
        return self.gcloud("create", self.name, f"--accelerator-type={self.accelerator.name}",
                           f"--version={runtime}", *spot)

    def delete(self) -> list[str]:
        return self.gcloud("delete", self.name, "--quiet", *(["--force"] if self.multislice else []))

    def _workers(self, everywhere: bool) -> list[str]:
        which = "all" if everywhere else "0"
        return [f"--worker={which}"] + ([f"--node={which}"] if self.multislice else [])

    def ssh(self, command: str, everywhere: bool = True) -> list[str]:
        """`command` on every worker of every slice at once (or on worker 0 of slice 0)."""
        return self.gcloud("ssh", self.name, *self._workers(everywhere), f"--command={command}")

    def scp(self, local: str, remote: str) -> list[str]:
        return self.gcloud("scp", "--recurse", local, f"{self.name}:{remote}", *self._workers(True))


# ------------------------------------------------------------------------------- remote scripts

def prepare_script() -> str:
    """Refuses to ship over a running trainer; clears the previous shipment."""
    return (f"mkdir -p {REMOTE} && cd {REMOTE} && "
            "if [ -f train.pid ] && kill -0 \"$(cat train.pid)\" 2>/dev/null; then "
            "echo \"a trainer is still running on $(hostname): stop it with --stop\" >&2; exit 1; fi && "
            "rm -rf ship")


def install_script() -> str:
    return (f"cd {REMOTE} && python3 -m pip install -q --user uv && "
            f"{{ [ -x venv/bin/python ] || python3 -m uv venv -q --python {PYTHON_VERSION} venv; }} && "
            "python3 -m uv pip install -q --python venv/bin/python --reinstall-package vla "
            "\"$(ls ship/vla-*.whl)[tpu]\"")


def start_script(trainer: Sequence[str], env: Mapping[str, str]) -> str:
    """Starts the trainer (its own flags: --config ... --workdir ...) detached, so that it outlives
    the ssh session, and records its pid and, once it ends, its exit code."""
    run = shlex.join(["venv/bin/python", "-m", "launch.autodetect", common.TRAINER_MODULE, *trainer])
    job = f"{run} & echo $! > train.pid; wait $!; echo $? > train.exit"
    assignments = "".join(f"{k}={shlex.quote(v)} " for k, v in env.items())
    return (f"cd {REMOTE} && rm -f train.pid train.exit && "
            f"({assignments}setsid nohup bash -c {shlex.quote(job)} > train.log 2>&1 < /dev/null &)")


def stream_script() -> str:
    """Worker 0's log until the trainer exits, then its exit code."""
    return (f"cd {REMOTE} && while [ ! -s train.pid ]; do sleep 1; done && "
            "tail -n +1 -F --pid=\"$(cat train.pid)\" train.log; "
            "for i in $(seq 30); do [ -f train.exit ] && break; sleep 1; done; "
            "exit \"$(cat train.exit 2>/dev/null || echo 1)\"")


def stop_script() -> str:
    return f"cd {REMOTE} && kill -TERM \"$(cat train.pid)\""


# ------------------------------------------------------------------------------- the plan

@dataclasses.dataclass(frozen=True)
class Step:
    note: str
    argv: list[str]


def stage_dir(pod: Pod) -> str:
    return os.path.join("runs", "launch", pod.name)


def ship_steps(pod: Pod, config_file: str, python: str) -> list[Step]:
    stage = stage_dir(pod)
    return [
        Step("build a wheel of this checkout", ["rm", "-rf", stage]),
        Step("", [python, "-m", "pip", "wheel", "-q", "--no-deps", "--wheel-dir", stage, "."]),
        Step("", ["cp", config_file, stage]),
        Step("copy it and the config file to every worker", pod.ssh(prepare_script())),
        Step("", pod.scp(stage, f"{REMOTE.removeprefix('~/')}/ship")),
        Step("install the package with the TPU extra on every worker", pod.ssh(install_script())),
    ]


def run_steps(pod: Pod, trainer: Sequence[str], env: Mapping[str, str]) -> list[Step]:
    return [Step("start the trainer on every worker at once", pod.ssh(start_script(trainer, env))),
            Step("stream worker 0's log until the trainer exits", pod.ssh(stream_script(), everywhere=False))]


def remote_trainer(config_spec: str, workdir: str, flags: Sequence[str]) -> list[str]:
    """The trainer's flags on a worker, where the config file sits in ship/."""
    path, sep, arg = config_spec.partition(":")
    return common.trainer_flags(f"ship/{os.path.basename(path)}{sep}{arg}", workdir, flags)


def check_paths(workdir: str, data_root: str) -> None:
    """Raises ValueError unless both are paths every worker resolves alike: gs:// URLs or absolute
    paths (a relative one would land in each worker's ~/vla; storage.path refuses other schemes)."""
    for what, path in (("--workdir", workdir), ("config.data.root", data_root)):
        storage.path(path)
        if not (storage.is_remote(path) or os.path.isabs(path)):
            raise ValueError(f"{what}={path!r}: give a gs:// URL or an absolute path that every worker "
                             f"sees (a Filestore or Cloud Storage FUSE mount)")


def describe_pod(pod: Pod, mesh: Mapping[str, int], queued: bool = True) -> str:
    a = pod.accelerator
    nodes = f" (queued resource, nodes {pod.name}-0..{pod.slices - 1})" if queued else ""
    slices = f" x {pod.slices} slices{nodes}" if pod.multislice else ""
    sizes = " ".join(f"{k.removeprefix('mesh.')}={v}" for k, v in mesh.items())
    return (f"# {a.name}: {a.chips} chips, {a.devices} JAX devices, {a.hosts} workers per slice{slices}; "
            f"{a.hosts * pod.slices} processes\n# mesh: {sizes}")


def print_plan(pod: Pod, steps: Sequence[Step], mesh: Mapping[str, int]) -> None:
    """What --dry_run shows: the pod, then every command in order."""
    print(describe_pod(pod, mesh))
    print("# reuse the TPU if this succeeds" + (" (its state must be ACTIVE)" if pod.multislice else ""))
    print("$ " + shlex.join(pod.describe()))
    print("# otherwise create it" + (", then repeat describe until ACTIVE" if pod.multislice else ""))
    print("$ " + shlex.join(pod.create()))
    for step in steps:
        if step.note:
            print(f"# {step.note}")
        print("$ " + shlex.join(step.argv))


def xpk(pod: Pod, cluster: str, verb: str, trainer: Sequence[str] = (), env: Mapping[str, str] = ()
        ) -> list[str]:
    """`xpk workload create` (trainer: its flags, with the config path inside this checkout) or
    `xpk workload delete` of the workload named like the pod."""
    scope = [f"--cluster={cluster}", f"--workload={pod.name}", f"--zone={pod.zone}"]
    scope += [f"--project={pod.project}"] if pod.project else []
    if verb == "delete":
        return ["xpk", "workload", "delete", *scope]
    run = shlex.join(["python", "-m", "launch.autodetect", common.TRAINER_MODULE, *trainer])
    assignments = "".join(f"{k}={shlex.quote(v)} " for k, v in dict(env).items())
    return ["xpk", "workload", "create", *scope, f"--tpu-type={pod.accelerator.name}",
            f"--num-slices={pod.slices}", f"--base-docker-image=python:{PYTHON_VERSION}", "--script-dir=.",
            f"--command=pip install -q '.[tpu]' && {assignments}{run}"]


# ------------------------------------------------------------------------------- AOT check

def aot_check(config_spec: str, config_flags: Sequence[str], pod: Pod) -> None:
    """Compiles the trainer's step for the pod's topology here (tools.aot, libtpu's compiler, no
    TPU) and raises SystemExit, with the numbers, when it does not fit or does not compile."""
    name = topology_name(pod.accelerator)
    print(f"# AOT check: compiling the train step for {name} x {pod.slices} slice(s) on this machine "
          f"(minutes at full size)", flush=True)
    report = aot.child_report(config_spec, config_flags, name, pod.slices)
    if "error" in report:
        raise SystemExit(f"AOT check: {report['error']}")
    print("# " + aot.summary_line(report), flush=True)
    memory = report["train"]["memory"]
    if not memory["fits"]:
        detail = memory.get("compiler") or (f"arguments {memory['argument'] / aot.GIB:.2f} GiB, temporaries "
                                            f"{memory['temp'] / aot.GIB:.2f} GiB")
        raise SystemExit(
            f"AOT check: refusing to launch: the train step needs {memory['total'] / aot.GIB:.2f} GiB per chip "
            f"({detail}) of {memory['capacity'] / aot.GIB:.2f} GiB on {pod.accelerator.name}. Lower batch_size, raise "
            f"optimizer.grad_accum_steps, or find a layout that fits: python -m tools.aot --config "
            f"{config_spec} --topology {name} --slices {pod.slices} --sweep")


# ------------------------------------------------------------------------------- running it

def _run(argv: Sequence[str], check: bool = True, capture: bool = False, dry_run: bool = False
         ) -> subprocess.CompletedProcess | None:
    """Prints the command, then runs it from this checkout (not with dry_run)."""
    print("$ " + shlex.join(argv), flush=True)
    if dry_run:
        return None
    proc = subprocess.run(list(argv), check=False, cwd=common.REPO, text=True,
                          stdout=subprocess.PIPE if capture else None)
    if check and proc.returncode:
        raise SystemExit(f"command failed with exit code {proc.returncode}: {shlex.join(argv)}")
    return proc


def ensure_pod(pod: Pod, poll_s: float = 30.0) -> None:
    """Reuses the TPU if it is usable, otherwise (re)creates it and waits until it is."""
    proc = _run(pod.describe(), check=False, capture=True)
    state = proc.stdout.strip() if proc.returncode == 0 else None
    if state in ("PREEMPTED", "TERMINATED", "FAILED", "SUSPENDED"):
        print(f"{pod.name} is {state}: deleting it to create it again", flush=True)
        _run(pod.delete())
        state = None
    if state is None:
        _run(pod.create())
    elif state not in ("READY", "ACTIVE"):
        print(f"{pod.name} is {state}", flush=True)
    if pod.multislice:
        while state != "ACTIVE":
            time.sleep(poll_s)
            state = _run(pod.describe(), capture=True).stdout.strip()
            print(f"{pod.name}: {state}", flush=True)
            if state in ("FAILED", "SUSPENDED"):
                raise SystemExit(f"queued resource {pod.name} is {state}; see gcloud compute tpus "
                                 f"queued-resources describe {pod.name} --zone={pod.zone}")


def stream(pod: Pod, workdir: str | None) -> int:
    code = _run(pod.ssh(stream_script(), everywhere=False), check=False).returncode
    print(f"trainer on worker 0 exited with code {code}\nlogs: {REMOTE}/train.log on every worker "
          f"(stream again with --attach)\ncheckpoints: {workdir or 'WORKDIR'}/checkpoints; running the "
          f"same launch command again resumes from the latest one", flush=True)
    return code


def main(argv: Sequence[str]) -> None:
    """Launches (or attaches to, stops, deletes) the training job on the pod or the xpk cluster."""
    del argv
    f = flags.FLAGS
    pod = Pod(f.tpu, f.zone, accelerator(f.accelerator), f.slices, f.project, f.runtime_version,
              f.spot)
    dry_run, cluster = f.dry_run, f.xpk_cluster
    if cluster and (f.delete or f.stop):
        _run(xpk(pod, cluster, "delete"), dry_run=dry_run)
        return
    if f.delete or f.stop or f.attach:
        if f.attach and not dry_run:
            sys.exit(stream(pod, f.workdir))
        _run(pod.delete() if f.delete else pod.ssh(stop_script()) if f.stop else
             pod.ssh(stream_script(), everywhere=False), dry_run=dry_run)
        return
    config, spec = f.config, common.repo_relative(config_flags.get_config_filename(f["config"]))
    if config is None or f.workdir is None:
        raise flags.ValidationError("--config and --workdir are required to launch")
    check_paths(f.workdir, config.data.root)
    if storage.is_remote(f.workdir) and not dry_run:  # a local path is the workers' mount, not ours
        common.check_writable(f.workdir, "--workdir")
    mesh = common.mesh_overrides(config.mesh, pod.accelerator.devices, pod.slices)
    config.update_from_flattened_dict(mesh)
    keys = [k for k in config_flags.get_override_values(f["config"]) if k not in mesh] + list(mesh)
    flags_ = common.override_flags(config, keys)
    env = dict(item.split("=", 1) for item in f.env)
    if f["aot-check"].value:
        aot_check(spec, flags_, pod)
    if cluster:
        print(describe_pod(pod, mesh, queued=False), flush=True)
        _run(xpk(pod, cluster, "create", common.trainer_flags(spec, f.workdir, flags_), env), dry_run=dry_run)
        return
    trainer = remote_trainer(spec, f.workdir, flags_)
    steps = ship_steps(pod, spec.partition(":")[0], sys.executable) + run_steps(pod, trainer, env)
    if dry_run:
        print_plan(pod, steps, mesh)
        return
    print(describe_pod(pod, mesh), flush=True)
    ensure_pod(pod)
    for step in steps[:-1]:
        _run(step.argv)
    sys.exit(stream(pod, f.workdir))


def define_flags() -> None:
    """The command line: python -m launch.tpu --help."""
    cli.define_config_flag("Run config file, configs/FILE.py or configs/FILE.py:ARG "
                           "(required to launch, not with --attach, --stop or --delete); override its "
                           "values with --config.KEY=VALUE.")
    flags.DEFINE_string("workdir", None, "The run's directory: gs://BUCKET/PATH, or an absolute path every worker "
                        "sees, e.g. a Filestore mount (required to launch).")
    flags.DEFINE_string("tpu", None, "Name of the TPU VM (one slice) or queued resource (multislice; its slices "
                        "are NAME-0, NAME-1, ...); with --xpk_cluster, the workload's name (required).")
    flags.DEFINE_string("zone", None, "Google Cloud zone of the TPU, e.g. us-east5-a (required).")
    flags.DEFINE_string("accelerator", "v5p-128", "Accelerator type of one slice, GENERATION-COUNT with GENERATION "
                        f"one of {', '.join(_GENERATIONS)}, e.g. v5p-128 or v5litepod-16.")
    flags.DEFINE_integer("slices", 1, "Number of slices; more than one makes a multislice queued resource.")
    flags.DEFINE_string("project", None, "Google Cloud project (default: gcloud's configured project).")
    flags.DEFINE_string("runtime_version", None, "TPU software version of the VMs (default: the accelerator "
                        "generation's, e.g. v2-alpha-tpuv5 for v5p).")
    flags.DEFINE_bool("spot", False, "Use spot capacity: cheaper but preemptible (relaunch to resume).")
    flags.DEFINE_multi_string("env", [], "KEY=VALUE: an environment variable set for the trainer on every worker")
    flags.DEFINE_bool("dry_run", False, "Print every command instead of running it.")
    flags.DEFINE_bool("aot-check", False, "Before creating anything, compile the train step for the "
                      "accelerator's TPU topology on this machine (tools.aot; needs the aot extra) and "
                      "refuse, with the numbers, a config that does not fit.")
    flags.DEFINE_bool("attach", False, "Only stream worker 0's log of the running trainer (until it exits).")
    flags.DEFINE_bool("stop", False, "Send SIGTERM to the trainer on every worker (all save a checkpoint and "
                      "exit); with --xpk_cluster, delete the workload.")
    flags.DEFINE_bool("delete", False, "Delete the TPU VM / queued resource; with --xpk_cluster, the workload.")
    flags.DEFINE_string("xpk_cluster", None, "GKE cluster with TPU node pools: run as an xpk workload there "
                        "instead of on TPU VMs (default: TPU VMs through gcloud).")
    flags.mark_flags_as_required(["tpu", "zone"])


if __name__ == "__main__":
    define_flags()
    app.run(common.usage_errors(main))
