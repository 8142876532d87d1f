r"""Sweeps from config files: every override set of the config's `sweep()` becomes one run.

    python -m launch.sweep --config configs/demo.py[:arg] --root runs/sweep \
        [--backend local|tpu|slurm] [--parallel K] [--select REGEX] [--retry] [--dry_run] \
        [--config.key=value ...] [-- BACKEND FLAGS]

Each run gets a readable name from its swept values (vit=tiny-8_context_frames=2_control_hz=20;
keys zipped one-to-one with an earlier key are left out) and the workdir ROOT/NAME. Its command:
  local  python -m vla.train --config FILE --workdir ROOT/NAME --config.key=value ...
  tpu    python -m launch.tpu ... --tpu PREFIX-<index> BACKEND FLAGS   (-- --tpu PREFIX --zone Z ...)
  slurm  python -m launch.slurm ... BACKEND FLAGS                       (-- --nodes 4 ...)
with the command line's --config.* overrides first, then the run's. K commands run at a time,
each logging to ROOT/NAME/output.log. ROOT/manifest.json lists every run of the sweep: name,
overrides, workdir, command, resolved config, status (pending, running, finished, failed, or
submitted for SLURM) and exit code; it is rewritten whenever a status changes.

ROOT may be gs://BUCKET/PATH for every backend (checked writable before any run starts): the
manifest, the runs' workdirs and the summary go there, and the commands' output.log files, which
stream into local files, to runs/gcs/BUCKET/PATH/NAME/ below the current directory.

Invoking the same command again resumes: finished runs (their final checkpoint exists) are
skipped, interrupted ones continue from their latest checkpoint, failed ones are listed and run
again only with --retry (which also resubmits unfinished SLURM runs). --select runs only the runs
whose names match. SIGTERM or Ctrl-C stops the running trainers cleanly (they save) and the
sweep. After a local sweep the summary (launch.summary) is written to ROOT.

sweep() takes the config file's argument when one is given (FILE:arg) and returns a list of
override sets; configs.grid's product and zipped build them.
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import json
import os
import re
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from absl import app, flags
from ml_collections import config_flags
from tqdm import tqdm

from configs import cli
from configs.grid import informative_keys
from data import storage
from launch import common, summary

BACKENDS = ("local", "tpu", "slurm")
MANIFEST = "manifest.json"


# ------------------------------------------------------------------------------- names

def _clean(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "-".join(_clean(v) for v in value)
    return re.sub(r"[^A-Za-z0-9.+-]", "-", str(value).replace("/", "-"))


def run_names(sets: Sequence[Mapping[str, Any]]) -> list[str]:
    """Readable, stable names: label=value for each informative key, joined by '_'. The label is
    the key's last part (the whole key where two keys share it). Duplicates are an error."""
    shown = informative_keys(sets)
    last = collections.Counter(k.rsplit(".", 1)[-1] for k in shown)
    label = {k: k.rsplit(".", 1)[-1] if last[k.rsplit(".", 1)[-1]] == 1 else k for k in shown}
    names = ["_".join(f"{label[k]}={_clean(s[k])}" for k in shown if k in s) or "base" for s in sets]
    seen: dict[str, Mapping[str, Any]] = {}
    for name, s in zip(names, sets):
        if name in seen:
            raise ValueError(f"two runs of the sweep are both named {name!r}: {dict(seen[name])} and {dict(s)}")
        seen[name] = s
    return names


# ------------------------------------------------------------------------------- runs

@dataclasses.dataclass
class Run:
    name: str
    overrides: dict[str, Any]  # the swept values, as sweep() gave them
    workdir: str
    command: list[str]
    config: dict[str, Any]  # resolved: the config file, command-line overrides, then the run's
    total_steps: int
    log: str
    status: str = "pending"
    returncode: int | None = None


def expand(spec: str, base, common_keys: Sequence[str], root: str, backend: str = "local",
           backend_flags: Sequence[str] = (), python: str = sys.executable) -> list[Run]:
    """The runs of `spec`'s sweep(); `base` is the config with the command line's overrides
    (common_keys) applied."""
    module, arg = common.load_module(spec)
    if not hasattr(module, "sweep"):
        raise ValueError(f"{spec.partition(':')[0]} defines no sweep()")
    sets = module.sweep(arg) if arg is not None else module.sweep()
    if not sets:
        raise ValueError(f"{spec}: sweep() returned no runs")
    runs = []
    for index, (name, overrides) in enumerate(zip(run_names(sets), sets)):
        both = set(overrides) & set(common_keys)
        if both:
            raise ValueError(f"{sorted(both)} are swept and also set on the command line")
        config = copy.deepcopy(base)
        config.update_from_flattened_dict(dict(overrides))
        workdir = storage.join(root, name)
        flags = common.override_flags(config, [*common_keys, *overrides])
        if backend == "local":
            command = [python, *common.trainer_args(spec, workdir, flags)]
        else:
            extra = _per_run_tpu(backend_flags, index) if backend == "tpu" else list(backend_flags)
            command = [python, "-m", f"launch.{backend}", *common.trainer_flags(spec, workdir, flags), *extra]
        runs.append(Run(name, dict(overrides), workdir, command, common.resolved(config),
                        int(config.total_steps), os.path.join(common.local_dir(workdir), "output.log")))
    return runs


def _per_run_tpu(flags: Sequence[str], index: int) -> list[str]:
    """Every run gets its own TPU: --tpu PREFIX becomes --tpu=PREFIX-<index>."""
    out, i, prefix = [], 0, None
    while i < len(flags):
        if flags[i] == "--tpu" and i + 1 < len(flags):
            prefix, i = flags[i + 1], i + 2
        elif flags[i].startswith("--tpu="):
            prefix, i = flags[i].split("=", 1)[1], i + 1
        else:
            out.append(flags[i])
            i += 1
    if prefix is None:
        raise ValueError("the tpu backend needs the TPU name prefix after '--': -- --tpu PREFIX --zone ZONE ...")
    return [f"--tpu={prefix}-{index}", *out]


# ------------------------------------------------------------------------------- manifest

def read_manifest(root: str) -> dict[str, Any] | None:
    path = storage.fresh(root) / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


def write_manifest(root: str, spec: str, backend: str, runs: Sequence[Run]) -> None:
    """Whole or not at all, so that a reader never sees half a file: locally through a temporary
    file renamed into place; on gs://, which has no rename but replaces an object only once its
    upload is complete, directly."""
    directory = storage.path(root)
    directory.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"config": spec, "backend": backend, "runs": [dataclasses.asdict(r) for r in runs]},
                      indent=1)
    if storage.is_remote(directory):
        (directory / MANIFEST).write_text(text)
        return
    tmp = directory / f"{MANIFEST}.tmp"
    tmp.write_text(text)
    os.replace(tmp, directory / MANIFEST)


def restore_status(runs: Sequence[Run], previous: Mapping[str, Any] | None) -> None:
    """Status from disk and the previous manifest: finished if the final checkpoint exists; a
    failed or submitted run stays so; anything else (never run, interrupted) is pending."""
    before = {r["name"]: r for r in (previous or {}).get("runs", [])}
    for run in runs:
        old = before.get(run.name, {})
        if common.is_finished(run.workdir, run.total_steps):
            run.status = "finished"
        elif old.get("status") in ("failed", "submitted"):
            run.status = old["status"]
        run.returncode = old.get("returncode")
    dropped = set(before) - {r.name for r in runs}
    if dropped:
        print(f"{len(dropped)} run(s) of the previous manifest are no longer in the sweep (their "
              f"workdirs are kept): {', '.join(sorted(dropped))}")


# ------------------------------------------------------------------------------- running

def outcome(run: Run, backend: str, interrupted: bool) -> str:
    if run.returncode == 0:
        if common.is_finished(run.workdir, run.total_steps):
            return "finished"
        return "submitted" if backend == "slurm" else "pending"  # stopped early: resumes next time
    return "pending" if interrupted else "failed"


def execute(runs: Sequence[Run], todo: Sequence[Run], root: str, spec: str, backend: str,
            parallel: int) -> bool:
    """Runs `todo`, `parallel` at a time; False if interrupted by a signal."""
    queue, active = collections.deque(todo), {}
    with common.forward_signals(lambda: list(active)) as received, \
            tqdm(total=len(todo), desc="sweep", unit="run", dynamic_ncols=True) as bar:
        while queue or active:
            while queue and len(active) < parallel and not received:
                run = queue.popleft()
                run.status = "running"
                active[common.spawn(run.command, os.environ, run.log)] = run
                write_manifest(root, spec, backend, runs)
                tqdm.write(f"started {run.name} (log {run.log})")
            for proc in [p for p in active if p.poll() is not None]:
                run = active.pop(proc)
                run.returncode = proc.returncode
                run.status = outcome(run, backend, bool(received))
                write_manifest(root, spec, backend, runs)
                bar.update(1)
                tqdm.write(f"{run.status}: {run.name}" + (f" (exit {run.returncode}, see {run.log})"
                                                          if run.status == "failed" else ""))
            if received and not active:
                break
            time.sleep(0.5)
    return not received


def to_run(runs: Sequence[Run], select: str | None, retry: bool) -> tuple[list[Run], list[Run]]:
    """(selected runs, those to run now): pending ones, and with `retry` failed and submitted ones."""
    selected = [r for r in runs if select is None or re.search(select, r.name)]
    wanted = ("pending", "failed", "submitted") if retry else ("pending",)
    return selected, [r for r in selected if r.status in wanted]


def report(runs: Sequence[Run]) -> str:
    counts = collections.Counter(r.status for r in runs)
    lines = [", ".join(f"{n} {s}" for s, n in sorted(counts.items()))]
    lines += [f"  failed: {r.name} (exit {r.returncode}, log {r.log})" for r in runs if r.status == "failed"]
    return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
    """Runs (or submits) the sweep's pending runs; argv[1:] (after `--`) goes to the backend launcher."""
    f = flags.FLAGS
    backend, root, dry_run = f.backend, f.root, f.dry_run
    storage.path(root)  # only local paths and gs:// URLs
    if backend != "local" and not (storage.is_remote(root) or os.path.isabs(root)):
        raise flags.ValidationError(f"--root={root!r}: the {backend} backend needs gs://BUCKET/PATH or an "
                                    f"absolute path on storage the machines share")
    spec = config_flags.get_config_filename(f["config"])
    runs = expand(spec, f.config, list(config_flags.get_override_values(f["config"])), root, backend,
                  argv[1:])
    restore_status(runs, read_manifest(root))
    selected, todo = to_run(runs, f.select, f.retry)
    print(f"{len(runs)} runs in the sweep, {len(selected)} selected; {len(todo)} to run; "
          f"skipped: {sum(r.status == 'finished' for r in selected)} finished, "
          f"{sum(r.status in ('failed', 'submitted') and r not in todo for r in selected)} failed or submitted"
          + ("" if f.retry else " (--retry runs them again)"))
    if dry_run:
        for r in selected:
            print(f"[{r.status}] {r.name}\n  $ {shlex.join(r.command)}")
        return
    common.check_writable(root, "--root")
    write_manifest(root, spec, backend, runs)
    complete = execute(runs, todo, root, spec, backend, f.parallel)
    print(report(selected))
    if backend == "local" and any(r.status == "finished" for r in runs):
        paths = summary.write(root)
        print("summary: " + ", ".join(paths.values()))
    print(f"manifest: {storage.join(root, MANIFEST)}")
    print(f"logs: {os.path.join(common.local_dir(root), '*', 'output.log')}")
    sys.exit(0 if complete and all(r.status in ("finished", "submitted") for r in selected) else 1)


def define_flags() -> None:
    """The command line: python -m launch.sweep --help."""
    cli.define_config_flag("Config file that defines a sweep(), configs/FILE.py or "
                           "configs/FILE.py:ARG (ARG goes to sweep()) (required); --config.KEY=VALUE "
                           "overrides apply to every run.")
    flags.DEFINE_string("root", None, "Sweep directory, a local path or gs://BUCKET/PATH: ROOT/manifest.json and "
                        "one workdir ROOT/NAME per run (required; for the tpu and slurm backends gs:// or an "
                        "absolute path on shared storage).")
    flags.DEFINE_enum("backend", "local", BACKENDS, "Where runs go: local (trainers on this machine), tpu "
                      "(launch.tpu, one TPU per run), slurm (launch.slurm, one job per run). Flags after `--` go "
                      "to that launcher.")
    flags.DEFINE_integer("parallel", 1, "Runs started at a time.")
    flags.DEFINE_string("select", None, "Only the runs whose names match this regular expression (re.search; "
                        "default: all runs).")
    flags.DEFINE_bool("retry", False, "Run failed runs again, and resubmit unfinished SLURM runs.")
    flags.DEFINE_bool("dry_run", False, "Print the runs, their status and commands; run nothing.")
    flags.mark_flags_as_required(["config", "root"])


if __name__ == "__main__":
    define_flags()
    app.run(common.usage_errors(main))
