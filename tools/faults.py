r"""Fault injection for the trainer, from the outside: kill -9, kills during checkpoint saves,
SIGTERM, corrupted train and held-out shards, a forced NaN; each checked against an
uninterrupted reference run.

    python -m tools.faults --config configs/demo.py --workdir DIR --config.data.root=/tmp/demo_data \
        [--steps 40] [--kills 5] [--save_kills 6] [--sigterms 1] [--seed 0] [--nan_lrs 1e40,1e30] \
        [--scenarios reference,kill,save_kill,sigterm,corrupt_train,corrupt_heldout,nan] \
        [--run_timeout 1200] [--config.KEY=VALUE ...]

Every scenario runs `python -m vla.train --config FILE --workdir DIR/<case>` as subprocesses
(own process group; stdout and stderr in DIR/<case>/<launch>.{stdout,stderr}.log, the command
line in <launch>.cmd) with --config.total_steps=STEPS and, unless given, --config.checkpoint_every=5
--config.log_every=5 --config.eval_every=20, plus every --config.KEY=VALUE given here (checked
here first, so a wrong key fails at once, then passed through). DIR must be a local folder
(the tool watches the files the trainer writes). Scenarios (--scenarios picks some; kill,
save_kill and sigterm compare with the reference, which then always runs first):

    reference        one uninterrupted run: its metrics.jsonl rows and final checkpoint are the baseline
    kill             --kills runs SIGKILLed (the whole process group) at a time drawn uniformly
                     between this run's first metrics row and (that + the reference's first-to-last
                     row time), relaunched to completion (the trainer resumes from its newest
                     checkpoint), then compared bitwise with the reference: the metrics.jsonl rows
                     (every field but the timing ones, TIMING_KEYS), the final checkpoint's whole
                     state (params, opt_state, EMA, step) and its data-iterator state
    save_kill        --save_kills runs SIGKILLed while a checkpoint is being written: DIR/checkpoints
                     is polled (every 2 ms) for Orbax's `<step>.orbax-checkpoint-tmp*` directory of a
                     drawn save step (or a later one) and the run is killed a drawn delay after it
                     appears (0 to the reference's median save time); relaunched and compared as kill
    sigterm          --sigterms runs sent SIGTERM (the trainer's process) at a time drawn as for kill:
                     each must save at the step it stops at and exit 0; relaunched, compared as kill
    corrupt_train    the data root mirrored in the case folder (the shard copied, the rest symlinked)
                     and 4 KiB in the middle of the copy of each robot source's
                     *-train.array_record-* shard overwritten with random bytes: the run
                     must complete total_steps; its "skipped" metrics and skip warnings are reported
    corrupt_heldout  the same on the *-heldout.array_record-* shard: the run must complete and its
                     final checkpoint exist; evaluation rows, eval/failures and skips are reported
    nan              per --nan_lrs value, --config.optimizer.lr=LR --config.checkpoint_every=1: the
                     trainer must exit non-zero with an error naming the step, and every checkpoint
                     on disk must hold only finite params (and EMA); 1e40 is infinite in float32,
                     so it fails at step 1 with nothing saved, 1e30 diverges after a few saves

Random times, save steps and corruption bytes are drawn from --seed. Every launch has a time-out
(--run_timeout), so the tool never hangs. It prints a progress line per launch and result
("[elapsed] i/n scenario: ..."), then the table

    scenario          tried  survived  lost  missed
    reference             1         1     0       0
    kill                  5         4     1       0
    ...

and one line per lost or missed case with its reason (missed: the fault never landed, e.g. the
run finished before the kill time; lost: the trainer did not survive it). The same results, with
each case's details (step at the signal, checkpoints then, step resumed from, ...), are in
DIR/faults.json, rewritten after every case. The exit status is 0 whatever the outcome.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from configs import cli
from data import storage
from vla.metrics import read_rows

SCENARIOS = ("reference", "kill", "save_kill", "sigterm", "corrupt_train", "corrupt_heldout", "nan")
COMPARED = ("kill", "save_kill", "sigterm")
# Per-row fields of metrics.jsonl that depend on wall time (vla/train.py: Interval.summary,
# throughput); everything else must match bit for bit.
TIMING_KEYS = frozenset({"step_time_s", "data_wait_s", "examples_per_s", "tokens_per_s", "mfu"})
# Overrides every launch gets unless the command line sets them: saves, logs and evaluations often.
DEFAULT_INTERVALS = {"checkpoint_every": 5, "log_every": 5, "eval_every": 20}
CORRUPT_BYTES = 4096
TMP_MARK = ".orbax-checkpoint-tmp"
POLL_S = 0.002  # while watching for a save's temporary directory
_TQDM = re.compile(r"(\d+)/(\d+) \[")


# ------------------------------------------------------------------------------- pure helpers

def comparable(row: Mapping[str, Any]) -> dict[str, Any]:
    """A metrics row without its timing-dependent fields."""
    return {k: v for k, v in row.items() if k not in TIMING_KEYS}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return a == b


def read_metrics(path: str) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl ([] when absent); a torn last line (killed mid-write) is dropped."""
    return read_rows(storage.path(path))


def compare_metrics(reference: Sequence[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]],
                    limit: int = 3) -> list[str]:
    """Differences between two runs' metrics rows (timing fields ignored), in words; [] = identical.

    Rows are matched by step and, within a step, in order (a step can have a training row and an
    evaluation row)."""
    def by_step(rs):
        out: dict[int, list[dict]] = {}
        for r in rs:
            out.setdefault(int(r["step"]), []).append(comparable(r))
        return out

    ref, got = by_step(reference), by_step(rows)
    problems = []
    missing, extra = sorted(set(ref) - set(got)), sorted(set(got) - set(ref))
    if missing:
        problems.append(f"rows missing at steps {missing}")
    if extra:
        problems.append(f"extra rows at steps {extra}")
    diffs = []
    for step in sorted(set(ref) & set(got)):
        a, b = ref[step], got[step]
        if len(a) != len(b):
            kinds = lambda rs: [_kind(r) for r in rs]
            lost = [k for k in kinds(a) if k not in kinds(b)]
            more = [k for k in kinds(b) if k not in kinds(a)]
            diffs.append(f"step {step}: {len(b)} rows, reference {len(a)}"
                         + (f" (missing the {', '.join(lost)} row)" if lost else "")
                         + (f" (extra {', '.join(more)} row)" if more else ""))
            continue
        for ra, rb in zip(a, b):
            keys = sorted(set(ra) | set(rb), key=lambda k: (k not in ("loss",), k))
            bad = [k for k in keys if k not in ra or k not in rb or not _same(ra[k], rb[k])]
            if bad:
                k = bad[0]
                diffs.append(f"step {step} {k}={rb.get(k, 'absent')!r} vs {ra.get(k, 'absent')!r}"
                             + (f" (+{len(bad) - 1} more fields)" if len(bad) > 1 else ""))
    if diffs:
        problems.append(f"{len(diffs)} row(s) differ (" + "; ".join(diffs[:limit])
                        + ("; ..." if len(diffs) > limit else "") + ")")
    return problems


def _kind(row: Mapping[str, Any]) -> str:
    """What a metrics row holds, in words: "eval/*" for evaluation rows, "training" otherwise."""
    prefixes = sorted({k.split("/")[0] for k in row if "/" in k and k.startswith("eval")})
    return ", ".join(f"{p}/*" for p in prefixes) if prefixes else "training"


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}/"))
        return out
    if isinstance(tree, list | tuple):
        out = {}
        for i, v in enumerate(tree):
            out.update(_flatten(v, f"{prefix}{i}/"))
        return out
    return {prefix.rstrip("/"): tree}


def compare_states(reference: Mapping[str, Any], state: Mapping[str, Any]) -> list[str]:
    """Bitwise differences between two restored states (nested dicts of numpy arrays), per
    top-level entry (params, opt_state, ema, step); [] = identical."""
    a, b = _flatten(reference), _flatten(state)
    problems = []
    if set(a) != set(b):
        only_ref, only_new = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        problems.append(f"state structure differs (only in reference: {only_ref[:3]}, only here: {only_new[:3]})")
    per_entry: dict[str, list[str]] = {}
    totals: dict[str, int] = {}
    for path in sorted(set(a) & set(b)):
        entry = path.split("/")[0]
        totals[entry] = totals.get(entry, 0) + 1
        x, y = np.asarray(a[path]), np.asarray(b[path])
        if x.shape != y.shape or x.dtype != y.dtype:
            per_entry.setdefault(entry, []).append(f"{path}: {y.dtype}{list(y.shape)} vs {x.dtype}{list(x.shape)}")
        elif x.tobytes() != y.tobytes():
            diff = float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))) if x.size else 0.0
            per_entry.setdefault(entry, []).append(f"{path}: max |diff| {diff:.3g}")
    order = ("params", "ema", "opt_state", "step")
    for entry in sorted(per_entry, key=lambda e: (order.index(e) if e in order else len(order), e)):
        bad = per_entry[entry]
        problems.append(f"{entry}: {len(bad)}/{totals[entry]} arrays differ (first {bad[0]})")
    return problems


def nonfinite(state: Mapping[str, Any]) -> list[str]:
    """'path: count' for every params / EMA array of a state holding NaN or Inf."""
    out = []
    for entry in ("params", "ema"):
        for path, x in _flatten(state.get(entry, {}), f"{entry}/").items():
            x = np.asarray(x)
            if np.issubdtype(x.dtype, np.inexact) and not np.all(np.isfinite(x)):
                out.append(f"{path}: {int(np.sum(~np.isfinite(x)))}")
    return out


def corrupt_middle(path: str, rng: np.random.Generator, nbytes: int = CORRUPT_BYTES) -> int:
    """Overwrites nbytes in the middle of a file with random bytes (the file keeps its size);
    returns the offset."""
    size = os.path.getsize(path)
    nbytes = min(nbytes, size)
    offset = max(0, size // 2 - nbytes // 2)
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(rng.integers(0, 256, nbytes, dtype=np.uint8).tobytes())
    return offset


def find_shard(dataset_dir: str, split: str) -> str:
    """The (first) ArrayRecord shard of a split in a TFDS dataset directory."""
    names = sorted(n for n in os.listdir(dataset_dir) if f"-{split}.array_record-" in n)
    if not names:
        raise FileNotFoundError(f"no *-{split}.array_record-* shard in {dataset_dir}")
    return os.path.join(dataset_dir, names[0])


def mirror(src: str, dst: str, copy: Sequence[str]) -> None:
    """Makes dst a copy of the tree src in which the files `copy` (paths under src) are real
    copies and everything else is a symlink to the original (cheap for big datasets)."""
    src = os.path.abspath(src)
    copy = {os.path.abspath(c) for c in copy}
    os.makedirs(dst, exist_ok=True)
    for name in sorted(os.listdir(src)):
        s, d = os.path.join(src, name), os.path.join(dst, name)
        if s in copy:
            shutil.copyfile(s, d)
        elif os.path.isdir(s) and any(c.startswith(s + os.sep) for c in copy):
            mirror(s, d, sorted(copy))
        else:
            os.symlink(s, d)


def override_args(overrides: Mapping[str, Any]) -> list[str]:
    """{key: value} -> ["--config.key=value", ...] as ml_collections parses them back."""
    return [f"--config.{k}={v if isinstance(v, str) else repr(v)}" for k, v in overrides.items()]


def checkpoint_steps(directory: str) -> list[int]:
    """Complete checkpoint steps in a checkpoints directory (temporary directories excluded)."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def tmp_dirs(directory: str) -> list[str]:
    try:
        return sorted(n for n in os.listdir(directory) if TMP_MARK in n)
    except FileNotFoundError:
        return []


def tqdm_steps(text: str) -> list[int]:
    """The step counts of the trainer's progress bar in its stderr."""
    return [int(m.group(1)) for m in _TQDM.finditer(text)]


def last_error(text: str) -> str:
    """The last meaningful line of a trainer's stderr (progress-bar and absl noise skipped)."""
    for line in reversed(re.split(r"[\r\n]", text)):
        line = line.strip()
        if not line or _TQDM.search(line) or line.startswith(("W1", "I1", "WARNING:", "INFO:")):
            continue
        return line[:300]
    return ""


# ------------------------------------------------------------------------------- launches

@dataclasses.dataclass
class Launch:
    """One trainer process (its own process group) with its log files."""

    proc: subprocess.Popen
    workdir: str
    name: str
    started: float

    @property
    def stderr_path(self) -> str:
        return os.path.join(self.workdir, f"{self.name}.stderr.log")

    def stderr(self) -> str:
        try:
            with open(self.stderr_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def stdout(self) -> str:
        try:
            with open(os.path.join(self.workdir, f"{self.name}.stdout.log"), errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def rows(self) -> list[dict[str, Any]]:
        return read_metrics(os.path.join(self.workdir, "metrics.jsonl"))

    def step(self) -> int | None:
        """The newest step of the progress bar (None before the loop starts)."""
        steps = tqdm_steps(self.stderr()[-4000:])
        return steps[-1] if steps else None

    def kill(self, sig: int = signal.SIGKILL, group: bool = True) -> None:
        if self.proc.poll() is not None:
            return
        try:
            if group:
                os.killpg(self.proc.pid, sig)
            else:
                self.proc.send_signal(sig)
        except ProcessLookupError:
            pass

    def wait(self, timeout: float) -> int | None:
        """Exit status, or None after killing it on time-out."""
        try:
            return self.proc.wait(max(1.0, timeout - self.elapsed()))
        except subprocess.TimeoutExpired:
            self.kill()
            self.proc.wait()
            return None


class Runner:
    """Launches `python -m vla.train` with the config file and the merged overrides."""

    def __init__(self, config_file: str, overrides: Mapping[str, Any], timeout: float):
        self.config_file, self.overrides, self.timeout = config_file, dict(overrides), timeout
        self.launches: list[Launch] = []

    def launch(self, workdir: str, name: str, extra: Mapping[str, Any] | None = None) -> Launch:
        os.makedirs(workdir, exist_ok=True)
        args = [sys.executable, "-m", "vla.train", "--config", self.config_file, "--workdir", workdir,
                *override_args({**self.overrides, **(extra or {})})]
        with open(os.path.join(workdir, f"{name}.cmd"), "w") as f:
            f.write(" ".join(args) + "\n")
        out = open(os.path.join(workdir, f"{name}.stdout.log"), "w")
        err = open(os.path.join(workdir, f"{name}.stderr.log"), "w")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        try:
            proc = subprocess.Popen(args, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env,
                                    start_new_session=True)
        finally:
            out.close()
            err.close()
        launch = Launch(proc, workdir, name, time.monotonic())
        self.launches.append(launch)
        return launch

    def kill_all(self) -> None:
        """SIGKILLs every launch still running (when the tool itself stops early)."""
        for launch in self.launches:
            if launch.proc.poll() is None:
                launch.kill()
                launch.proc.wait()

    def watch(self, launch: Launch, until: Callable[[], bool], poll: float = 0.05) -> bool:
        """Polls until `until()` (True), the process exits or the time-out passes (False)."""
        while launch.proc.poll() is None and launch.elapsed() < self.timeout:
            if until():
                return True
            time.sleep(poll)
        return False


# ------------------------------------------------------------------------------- checkpoints

def load_checkpoint(step_dir: str) -> tuple[dict[str, Any], Any]:
    """(state as nested dicts of numpy arrays, data-iterator JSON or None) of a checkpoint step."""
    import jax
    import orbax.checkpoint as ocp

    path = os.path.join(step_dir, "state")
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)  # Orbax narrates every restore
    try:
        ckptr = ocp.PyTreeCheckpointer()
        meta = ckptr.metadata(path)
        tree = getattr(meta, "item_metadata", meta)
        tree = getattr(tree, "tree", tree)
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        state = ckptr.restore(path, restore_args=args)
    finally:
        logging.set_verbosity(verbosity)
    data = None
    data_dir = os.path.join(step_dir, "data")
    if os.path.isdir(data_dir):
        data = {}
        for n in sorted(os.listdir(data_dir)):
            if n.endswith(".json"):
                with open(os.path.join(data_dir, n)) as f:
                    data[n] = json.load(f)
    return state, data


# ------------------------------------------------------------------------------- scenarios

@dataclasses.dataclass
class Case:
    scenario: str
    name: str
    outcome: str  # survived | lost | missed
    reason: str = ""
    details: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Reference:
    rows: list[dict[str, Any]]
    state: dict[str, Any]
    data: Any
    first_row_s: float  # seconds from launch to the first metrics row
    last_row_s: float  # ... to the last (step total)
    save_s: float  # median time a save's temporary directory lived


class Faults:
    """The scenarios of one invocation, their cases and the report."""

    def __init__(self, runner: Runner, workdir: str, steps: int, seed: int, data_root: str | None,
                 robot_dirs: Sequence[str], intervals: Mapping[str, int], scenarios: Sequence[str]):
        self.runner, self.workdir, self.steps = runner, workdir, steps
        self.seed = seed
        self.data_root, self.robot_dirs, self.intervals = data_root, list(robot_dirs), dict(intervals)
        self.scenarios = list(scenarios)
        self.cases: list[Case] = []
        self.start = time.monotonic()
        self.reference: Reference | None = None
        self.meta: dict[str, Any] = {}

    # -- output
    def say(self, scenario: str, text: str) -> None:
        i = self.scenarios.index(scenario) + 1
        print(f"[{time.monotonic() - self.start:7.1f}s] {i}/{len(self.scenarios)} {scenario}: {text}", flush=True)

    def record(self, case: Case) -> None:
        self.cases.append(case)
        self.say(case.scenario, f"{case.name}: {case.outcome.upper()}" + (f" ({case.reason})" if case.reason else ""))
        self.write_json()

    def summary(self) -> list[dict[str, Any]]:
        out = []
        for s in self.scenarios:
            cs = [c for c in self.cases if c.scenario == s]
            out.append(dict(scenario=s, tried=len(cs), **{k: sum(c.outcome == k for c in cs)
                                                           for k in ("survived", "lost", "missed")}))
        return out

    def write_json(self) -> None:
        result = dict(self.meta, wall_s=round(time.monotonic() - self.start, 1), summary=self.summary(),
                      cases=[dataclasses.asdict(c) for c in self.cases])
        tmp = os.path.join(self.workdir, "faults.json.tmp")
        with open(tmp, "w") as f:
            json.dump(result, f, indent=2, default=str)
        os.replace(tmp, os.path.join(self.workdir, "faults.json"))

    def table(self) -> str:
        lines = [f"{'scenario':<16} {'tried':>6} {'survived':>9} {'lost':>5} {'missed':>7}"]
        for r in self.summary():
            lines.append(f"{r['scenario']:<16} {r['tried']:>6} {r['survived']:>9} {r['lost']:>5} {r['missed']:>7}")
        bad = [c for c in self.cases if c.outcome != "survived"]
        if bad:
            lines.append("")
            lines += [f"{c.outcome} {c.scenario}/{c.name}: {c.reason}" for c in bad]
        lines.append(f"\nwall time {time.monotonic() - self.start:.0f} s; details in "
                     f"{os.path.join(self.workdir, 'faults.json')}")
        return "\n".join(lines)

    # -- helpers
    def case_dir(self, name: str) -> str:
        path = os.path.join(self.workdir, name)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.makedirs(path)
        return path

    def finish(self, launch: Launch) -> tuple[int | None, str]:
        rc = launch.wait(self.runner.timeout)
        if rc is None:
            return None, f"{launch.name} timed out after {self.runner.timeout:.0f} s"
        if rc != 0:
            return rc, f"{launch.name} exited {rc}: {last_error(launch.stderr())}"
        return rc, ""

    def compare(self, scenario: str, name: str, workdir: str, details: dict[str, Any]) -> Case:
        """Relaunches a faulted run to completion and compares it with the reference."""
        ref = self.reference
        assert ref is not None
        details["checkpoints_after_fault"] = checkpoint_steps(os.path.join(workdir, "checkpoints"))
        details["tmp_dirs_after_fault"] = tmp_dirs(os.path.join(workdir, "checkpoints"))
        self.say(scenario, f"{name}: relaunching ({details.get('fault', '')})")
        relaunch = self.runner.launch(workdir, "resume")
        rc, err = self.finish(relaunch)
        steps = tqdm_steps(relaunch.stderr())
        details["resumed_from"] = steps[0] if steps else None
        if err:
            return Case(scenario, name, "lost", err, details)
        problems = []
        final = os.path.join(workdir, "checkpoints", str(self.steps))
        problems += [f"metrics: {p}" for p in compare_metrics(ref.rows, relaunch.rows())]
        if not os.path.isdir(final):
            problems.append(f"no final checkpoint {self.steps}")
        else:
            state, data = load_checkpoint(final)
            problems += compare_states(ref.state, state)
            if data != ref.data:
                problems.append("data-iterator state of the final checkpoint differs")
        if problems and all(p.startswith("metrics:") for p in problems):
            problems.append("final state and data iterator identical")
        return Case(scenario, name, "lost" if problems else "survived", "; ".join(problems), details)

    # -- scenarios
    def run_reference(self) -> None:
        s = "reference"
        workdir = self.case_dir(s)
        self.say(s, f"launching an uninterrupted {self.steps}-step run")
        launch = self.runner.launch(workdir, "train")
        ckpts = os.path.join(workdir, "checkpoints")
        first = last = None
        seen: dict[str, float] = {}
        lifetimes: list[float] = []
        size = -1
        while launch.proc.poll() is None and launch.elapsed() < self.runner.timeout:
            now = launch.elapsed()
            metrics = os.path.join(workdir, "metrics.jsonl")
            if os.path.exists(metrics) and os.path.getsize(metrics) != size:
                size = os.path.getsize(metrics)
                rows = read_metrics(metrics)
                if rows and first is None:
                    first = now
                if rows and int(rows[-1]["step"]) >= self.steps and last is None:
                    last = now
            current = set(tmp_dirs(ckpts))
            for n in current - set(seen):
                seen[n] = now
            for n in [n for n in seen if n not in current]:
                lifetimes.append(now - seen.pop(n))
            time.sleep(0.01)
        rc, err = self.finish(launch)
        rows = launch.rows()
        details = dict(first_row_s=first, last_row_s=last, save_s=lifetimes, rows=len(rows),
                       launch_s=round(launch.elapsed(), 1))
        final = os.path.join(ckpts, str(self.steps))
        if not err and not os.path.isdir(final):
            err = f"no final checkpoint {self.steps}"
        if err:
            self.record(Case(s, "run", "lost", err, details))
            return
        state, data = load_checkpoint(final)
        self.reference = Reference(rows, state, data, first or 0.0, last or launch.elapsed(),
                                   statistics.median(lifetimes) if lifetimes else 0.05)
        self.record(Case(s, "run", "survived", "", details))

    def rng(self, scenario: str) -> np.random.Generator:
        """A scenario's own draws: the same whichever other scenarios run."""
        return np.random.default_rng([self.seed, SCENARIOS.index(scenario)])

    def _kill_time(self, rng: np.random.Generator) -> float:
        ref = self.reference
        return float(rng.uniform(0.0, max(0.1, ref.last_row_s - ref.first_row_s)))

    def run_kill(self, n: int, sig: int = signal.SIGKILL) -> None:
        s = "kill" if sig == signal.SIGKILL else "sigterm"
        rng = self.rng(s)
        for i in range(n):
            name = f"{s}_{i}"
            workdir = self.case_dir(name)
            delay = self._kill_time(rng)
            self.say(s, f"{name} ({i + 1}/{n}): launching; {signal.Signals(sig).name} {delay:.1f} s after the "
                        "first metrics row")
            launch = self.runner.launch(workdir, "train")
            details: dict[str, Any] = dict(delay_after_first_row_s=round(delay, 2))
            if not self.runner.watch(launch, lambda launch=launch: bool(launch.rows())):
                rc, err = self.finish(launch)
                self.record(Case(s, name, "lost" if err else "missed",
                                 err or "the run ended before its first metrics row", details))
                continue
            t_kill = launch.elapsed() + delay
            self.runner.watch(launch, lambda launch=launch, t=t_kill: launch.elapsed() >= t)
            if launch.proc.poll() is not None:
                rc, err = self.finish(launch)
                self.record(Case(s, name, "lost" if err else "missed",
                                 err or "the run finished before the signal", details))
                continue
            details["step_at_signal"] = launch.step()
            details["checkpoints_at_signal"] = checkpoint_steps(os.path.join(workdir, "checkpoints"))
            details["fault"] = (f"{signal.Signals(sig).name} at step ~{details['step_at_signal']}, "
                                f"newest checkpoint {max(details['checkpoints_at_signal'], default=None)}")
            if sig == signal.SIGKILL:
                launch.kill(signal.SIGKILL)
                launch.proc.wait()
            else:
                launch.kill(signal.SIGTERM, group=False)
                rc, err = self.finish(launch)
                stopped = re.search(r"stopping at step (\d+)", launch.stdout() + launch.stderr())
                details["stopped_at"] = int(stopped.group(1)) if stopped else None
                details["fault"] += f", stopped at {details['stopped_at']} (rc {rc})"
                if err:
                    self.record(Case(s, name, "lost", f"after SIGTERM: {err}", details))
                    continue
                if details["stopped_at"] is not None and details["stopped_at"] not in checkpoint_steps(
                        os.path.join(workdir, "checkpoints")):
                    self.record(Case(s, name, "lost", f"exited 0 without a checkpoint at step "
                                     f"{details['stopped_at']}", details))
                    continue
            self.record(self.compare(s, name, workdir, details))

    def run_save_kill(self, n: int) -> None:
        s = "save_kill"
        every = self.intervals["checkpoint_every"]
        saves = sorted(set(range(every, self.steps + 1, every)) | {self.steps})
        rng = self.rng(s)
        targets = rng.choice(saves, n, replace=n > len(saves))
        for i, target in enumerate(int(t) for t in targets):
            name = f"save_kill_{i}"
            workdir = self.case_dir(name)
            delay = float(rng.uniform(0.0, self.reference.save_s))
            self.say(s, f"{name} ({i + 1}/{n}): launching; SIGKILL {delay * 1000:.0f} ms into the save of step "
                        f"{target} (or the next save seen)")
            launch = self.runner.launch(workdir, "train")
            ckpts = os.path.join(workdir, "checkpoints")
            found: list[str] = []

            def saving(ckpts=ckpts, target=target, found=found) -> bool:
                hits = [n for n in tmp_dirs(ckpts) if n.split(".")[0].isdigit() and int(n.split(".")[0]) >= target]
                found[:] = hits
                return bool(hits)

            details: dict[str, Any] = dict(target_save=target, delay_s=round(delay, 4))
            if not self.runner.watch(launch, saving, poll=POLL_S):
                rc, err = self.finish(launch)
                self.record(Case(s, name, "lost" if err else "missed",
                                 err or f"no save at or after step {target} was seen in progress", details))
                continue
            if delay:
                time.sleep(delay)
            launch.kill(signal.SIGKILL)
            launch.proc.wait()
            step = int(found[0].split(".")[0])
            still = [n for n in tmp_dirs(ckpts) if n == found[0]]
            details.update(killed_in_save=step, tmp_dir_left=bool(still))
            details["fault"] = (f"SIGKILL {delay * 1000:.0f} ms into the save of step {step}"
                                + ("" if still else " (the save had already finished)"))
            self.record(self.compare(s, name, workdir, details))

    def _corrupt_copy(self, s: str, split: str) -> tuple[str, dict[str, Any]]:
        workdir = self.case_dir(s)
        root = os.path.join(workdir, "data")
        shards = [find_shard(os.path.join(self.data_root, d), split) for d in self.robot_dirs]
        self.say(s, f"mirroring {self.data_root} in {root} (the {split} shards copied, the rest linked)")
        mirror(self.data_root, root, shards)
        details: dict[str, Any] = {}
        rng = self.rng(s)
        for original in shards:
            shard = os.path.join(root, os.path.relpath(original, self.data_root))
            offset = corrupt_middle(shard, rng)
            details.setdefault("corrupted", []).append(f"{os.path.relpath(shard, root)} bytes "
                                                       f"[{offset}, {offset + CORRUPT_BYTES})")
        return workdir, details

    def run_corrupt(self, split: str) -> None:
        s = f"corrupt_{split}"
        if not self.data_root or "://" in self.data_root or not self.robot_dirs:
            self.record(Case(s, "run", "missed", f"needs a local data root holding a robot source "
                             f"(data.root={self.data_root!r}, robot source paths {self.robot_dirs})"))
            return
        workdir, details = self._corrupt_copy(s, split)
        self.say(s, f"training on the copy ({'; '.join(details['corrupted'])})")
        launch = self.runner.launch(workdir, "train", {"data.root": os.path.join(workdir, "data")})
        rc, err = self.finish(launch)
        rows = launch.rows()
        err_text = launch.stderr()
        details["skip_warnings"] = len(re.findall(r"skipping unreadable", err_text))
        last_train = next((r for r in reversed(rows) if "loss" in r), {})
        details["last_step"] = last_train.get("step")
        details["skipped"] = {k: v for k, v in last_train.items() if "skipped" in k}
        evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
        details["eval_rows"] = [r["step"] for r in evals]
        details["eval_failures"] = {r["step"]: r[k] for r in evals for k in r if "failure" in k}
        details["eval_skipped"] = {r["step"]: {k: r[k] for k in r if "skipped" in k} for r in evals
                                   if any("skipped" in k for k in r)}
        final = os.path.join(workdir, "checkpoints", str(self.steps))
        details["final_checkpoint"] = os.path.isdir(final)
        shown = (f"skipped {details['skipped'] or 'not reported'}, "
                 f"{details['skip_warnings']} 'skipping unreadable' log warning(s)")
        if split == "heldout":
            shown += (f", eval rows at {details['eval_rows']}, eval failures {details['eval_failures'] or 'none'}"
                      f", eval skip metrics {details['eval_skipped'] or 'none'}")
        if err:
            self.record(Case(s, "run", "lost", f"{err} ({shown})", details))
        elif split == "train" and details["last_step"] != self.steps:
            self.record(Case(s, "run", "lost", f"last logged step {details['last_step']}, not {self.steps}", details))
        elif not details["final_checkpoint"]:
            self.record(Case(s, "run", "lost", f"no final checkpoint {self.steps} ({shown})", details))
        else:
            self.record(Case(s, "run", "survived", shown, details))

    def run_nan(self, lrs: Sequence[float]) -> None:
        for lr in lrs:
            self._run_nan(lr)

    def _run_nan(self, lr: float) -> None:
        s = "nan"
        name = f"lr_{lr:g}"
        workdir = self.case_dir(f"nan_{name}")
        self.say(s, f"{name}: launching with optimizer.lr={lr:g}, checkpoint_every=1")
        launch = self.runner.launch(workdir, "train", {"optimizer.lr": lr, "checkpoint_every": 1})
        rc = launch.wait(self.runner.timeout)
        err_line = last_error(launch.stderr())
        ckpts = os.path.join(workdir, "checkpoints")
        steps = checkpoint_steps(ckpts)
        details: dict[str, Any] = dict(rc=rc, error=err_line, checkpoints=steps, tmp_dirs=tmp_dirs(ckpts))
        problems = []
        if rc is None:
            problems.append(f"timed out after {self.runner.timeout:.0f} s")
        elif rc == 0:
            problems.append(f"exited 0 (ran to step {max(steps, default=None)})")
        elif not re.search(r"step \d+", err_line):
            problems.append(f"exited {rc} without naming the step: {err_line!r}")
        bad = {}
        for step in steps:
            try:
                state, _ = load_checkpoint(os.path.join(ckpts, str(step)))
            except Exception as e:  # an unreadable checkpoint is a finding, not a crash of the tool
                bad[step] = [f"unreadable: {type(e).__name__}: {e}"[:200]]
                continue
            found = nonfinite(state)
            if found:
                bad[step] = found
        details["nonfinite"] = bad
        if bad:
            step = min(bad)
            problems.append(f"{len(bad)} of {len(steps)} checkpoints hold non-finite values (step {step}: "
                            f"{len(bad[step])} arrays, first {bad[step][0]})")
        shown = ""
        if not problems:
            shown = (f"exit {rc}: {err_line[:120]!r}; " + (f"checkpoints {steps} all finite" if steps else
                     "no checkpoint on disk, so the finiteness check is vacuous"))
        self.record(Case(s, name, "lost" if problems else "survived", "; ".join(problems) or shown, details))


# ------------------------------------------------------------------------------- command line

def main(argv: Sequence[str]) -> None:
    """Runs the chosen scenarios in --workdir, prints the table and writes faults.json."""
    del argv
    logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS
    config = f.config
    if "://" in f.workdir:
        raise app.UsageError(f"--workdir must be a local folder (the tool watches its files), not {f.workdir}")
    user = dict(config_flags.get_override_values(f["config"]))
    if "total_steps" in user and user["total_steps"] != f.steps:
        raise app.UsageError(f"give the run length as --steps, not --config.total_steps={user['total_steps']}")
    intervals = {k: int(user.get(k, v)) for k, v in DEFAULT_INTERVALS.items()}
    overrides = {**intervals, **user, "total_steps": f.steps}
    scenarios = [s for s in SCENARIOS if s in f.scenarios]
    unknown = set(f.scenarios) - set(SCENARIOS)
    if unknown:
        raise app.UsageError(f"unknown scenarios {sorted(unknown)}; choose from {list(SCENARIOS)}")
    if any(s in COMPARED for s in scenarios) and "reference" not in scenarios:
        scenarios.insert(0, "reference")
    counts = {"kill": f.kills, "save_kill": f.save_kills, "sigterm": f.sigterms}
    scenarios = [s for s in scenarios if counts.get(s, 1) > 0]

    data_root = config.data.root
    robot_dirs = [src.path for src in config.data.sources.values() if src.get("kind") == "robot"]
    if data_root and any(os.path.isabs(p) for p in robot_dirs):
        robot_dirs = []  # an absolute source path lives outside the root that gets copied
    workdir = os.path.abspath(f.workdir)
    os.makedirs(workdir, exist_ok=True)
    runner = Runner(config_flags.get_config_filename(f["config"]), overrides, f.run_timeout)
    faults = Faults(runner, workdir, f.steps, f.seed, data_root, robot_dirs, intervals, scenarios)
    faults.meta = dict(config=runner.config_file, overrides=overrides, steps=f.steps, kills=f.kills,
                       save_kills=f.save_kills, sigterms=f.sigterms, nan_lrs=f.nan_lrs, seed=f.seed,
                       scenarios=scenarios)
    print(f"tools.faults: {', '.join(scenarios)} on {runner.config_file} ({f.steps} steps) in {workdir}",
          flush=True)
    # SIGTERM (or Ctrl-C) to the tool ends it through the `finally` below, taking its trainers along.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        for s in scenarios:
            if s in COMPARED and faults.reference is None:
                faults.record(Case(s, "all", "missed", "no reference run to compare with"))
            elif s == "reference":
                faults.run_reference()
            elif s == "kill":
                faults.run_kill(f.kills)
            elif s == "save_kill":
                faults.run_save_kill(f.save_kills)
            elif s == "sigterm":
                faults.run_kill(f.sigterms, signal.SIGTERM)
            elif s == "corrupt_train":
                faults.run_corrupt("train")
            elif s == "corrupt_heldout":
                faults.run_corrupt("heldout")
            elif s == "nan":
                faults.run_nan([float(x) for x in f.nan_lrs])
    finally:
        runner.kill_all()  # a tool stopped early (Ctrl-C, an error) leaves no trainer behind
        faults.write_json()
    print()
    print(faults.table(), flush=True)


def define_flags() -> None:
    """The command line: python -m tools.faults --help."""
    cli.define_config_flag("Run config file, configs/FILE.py or configs/FILE.py:ARG (required); "
                           "--config.KEY=VALUE overrides are checked here and passed to every trainer launch.")
    flags.DEFINE_string("workdir", None, "Folder for the scenarios' run folders and faults.json (required).")
    flags.DEFINE_integer("steps", 40, "total_steps of every run.")
    flags.DEFINE_integer("kills", 5, "Random kill -9 points.")
    flags.DEFINE_integer("save_kills", 6, "kill -9 during checkpoint saves.")
    flags.DEFINE_integer("sigterms", 1, "SIGTERMs at random times.")
    flags.DEFINE_list("nan_lrs", ["1e40", "1e30"], "optimizer.lr of each nan case: 1e40 overflows float32, so the "
                      "warmup's first step is already NaN (nothing saved); 1e30 lets finite checkpoints reach the "
                      "disk first, then diverges.")
    flags.DEFINE_integer("seed", 0, "Seed of the kill times, save steps and corruption bytes.")
    flags.DEFINE_list("scenarios", list(SCENARIOS), f"Scenarios to run, of {', '.join(SCENARIOS)}.")
    flags.DEFINE_float("run_timeout", 1200.0, "Seconds one trainer launch may take before it is killed.")
    flags.mark_flags_as_required(["config", "workdir"])


if __name__ == "__main__":
    define_flags()
    app.run(main)
