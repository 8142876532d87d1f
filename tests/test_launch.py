"""Launchers: sweep expansion and names, TPU and SLURM dry runs (golden files), gs:// workdirs and
sweep roots on a GCS API emulator (progress, manifest, summary, local logs, refused schemes), the
local multi-process launcher (2 processes train like 1), preemption by SIGTERM and resume, and the
demo knob sweep end to end with its summary.

Regenerate the golden files after an intended change with
    UPDATE_GOLDEN=1 python -m pytest -q tests/test_launch.py -k golden
"""
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request

import jax
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from configs import demo, grid
from data import storage
from launch import common, local, slurm, summary, sweep, tpu
from vla import sharding

REPO = common.REPO
GOLDEN = os.path.join(REPO, "tests", "golden")
DEMO = os.path.join(REPO, "configs", "demo.py")
TIMEOUT = 900  # hang guard for subprocess trainers on a loaded 2-core machine


def tiny_flags(root: str, **overrides) -> list[str]:
    """The demo config shrunk to seconds (tiny model at 32², batch 8), as trainer flags."""
    values = {"data.root": root, "model.image_size": 32, "batch_size": 8, "total_steps": 2,
              "log_every": 1, "checkpoint_every": 2, "eval_batches": 0, "chip": "h100",
              "knobs.flow_steps": 2, "optimizer.warmup_steps": 2, **overrides}
    return [f"--config.{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    """The subprocess trainers' environment, for speed: XLA's CPU backend at optimization level 0
    (half the compile time; the same numbers to 1e-6 here), and one persistent compilation cache
    for the module, so that a relaunch, and a sweep run with the shapes of an earlier run, load
    the compiled step instead of compiling it again."""
    return dict(os.environ, XLA_FLAGS=f"{os.environ['XLA_FLAGS']} --xla_backend_optimization_level=0",
                JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")))


def loss_rows(workdir) -> list[dict]:
    """Training rows of metrics.jsonl (a line being written while we read is left out)."""
    path, rows = os.path.join(workdir, "metrics.jsonl"), []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    break
    return [r for r in rows if "loss" in r]


def start(*argv: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", *argv], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, out[-4000:]
    return out


# ------------------------------------------------------------------------------- sweeps

def test_product_and_zipped_build_override_sets():
    sets = grid.product(grid.zipped({"a": [1, 2], "b": ["x", "y"]}), {"c": [True, False]})
    assert sets == [{"a": 1, "b": "x", "c": True}, {"a": 1, "b": "x", "c": False},
                    {"a": 2, "b": "y", "c": True}, {"a": 2, "b": "y", "c": False}]
    assert grid.product({"a": [1, 2], "c": [3]}) == [{"a": 1, "c": 3}, {"a": 2, "c": 3}]
    with pytest.raises(ValueError, match="differ in length"):
        grid.zipped({"a": [1, 2]}, {"b": [1]})
    with pytest.raises(ValueError, match="more than one axis"):
        grid.product({"a": [1]}, {"a": [2]})
    with pytest.raises(TypeError, match="must be a list"):
        grid.product({"a": "tiny/8"})


def test_run_names_are_readable_stable_and_unique():
    names = sweep.run_names(demo.sweep())
    assert names == sweep.run_names(demo.sweep()) and len(set(names)) == len(names) == 8
    # The model-size keys are zipped: only the first names the run.
    assert names[0] == "vit=tiny-8_context_frames=1_control_hz=20"
    assert "vit=mu-8_context_frames=2_control_hz=40" in names
    assert sweep.run_names([{"model.size": 1, "data.size": 2}, {"model.size": 1, "data.size": 3}]) == \
        ["model.size=1_data.size=2", "model.size=1_data.size=3"]
    assert sweep.run_names([{}]) == ["base"]
    with pytest.raises(ValueError, match="both named"):
        sweep.run_names([{"knobs.vit": "a/b"}, {"knobs.vit": "a-b"}])


def _run(name: str, workdir: str, status: str = "pending") -> sweep.Run:
    return sweep.Run(name, {}, workdir, [], {}, total_steps=4, log="", status=status)


def test_status_comes_from_the_final_checkpoint_and_the_previous_manifest(tmp_path):
    names = ["done", "crashed", "interrupted", "new"]
    runs = [_run(n, str(tmp_path / n)) for n in names]
    os.makedirs(tmp_path / "done" / "checkpoints" / "4")
    os.makedirs(tmp_path / "interrupted" / "checkpoints" / "2")
    previous = {"runs": [{"name": "done", "status": "running", "returncode": None},
                         {"name": "crashed", "status": "failed", "returncode": 1},
                         {"name": "interrupted", "status": "running", "returncode": None},
                         {"name": "gone", "status": "finished", "returncode": 0}]}
    sweep.restore_status(runs, previous)
    assert [r.status for r in runs] == ["finished", "failed", "pending", "pending"]
    selected, todo = sweep.to_run(runs, select="^(crashed|interrupted|new)$", retry=False)
    assert [r.name for r in selected] == names[1:] and [r.name for r in todo] == ["interrupted", "new"]
    assert [r.name for r in sweep.to_run(runs, None, retry=True)[1]] == names[1:]
    finished = _run("y", str(tmp_path / "done"))
    finished.returncode = 0
    assert sweep.outcome(finished, "local", False) == "finished"
    stopped = _run("z", str(tmp_path / "interrupted"))
    stopped.returncode = 0
    assert [sweep.outcome(stopped, b, False) for b in ("local", "slurm")] == ["pending", "submitted"]
    stopped.returncode = -9
    assert [sweep.outcome(stopped, "local", i) for i in (False, True)] == ["failed", "pending"]


def test_override_flags_parse_back_to_the_same_config():
    """What a launcher passes as --config.key=value is what the trainer's flag parser reads."""
    overrides = {"knobs.vit": "mu/8", "knobs.control_hz": 40, "model.cameras": ("a", "b"),
                 "model.knowledge_insulation": True, "optimizer.lr": 2.5e-5}
    config = demo.get_config()
    config.lock()
    config.update_from_flattened_dict(overrides)
    argv = common.override_flags(config, list(overrides))
    command_line = ["prog", "--config", DEMO, *argv]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True, sys_argv=command_line)
    values(command_line)
    for key, value in overrides.items():
        assert common.get_value(values.config, key) == common.get_value(config, key) == value, key
    assert isinstance(values.config.knobs.control_hz, float)


# ------------------------------------------------------------------------------- meshes and pods

def test_accelerators_and_meshes_are_sized_to_the_slice():
    v5p = tpu.accelerator("v5p-128")
    assert (v5p.chips, v5p.devices, v5p.hosts) == (64, 64, 16)
    assert (tpu.accelerator("v5litepod-8").hosts, tpu.accelerator("v5litepod-16").hosts) == (1, 4)
    assert tpu.accelerator("v3-8").devices == 8 and tpu.accelerator("v4-32").devices == 16
    demo_mesh = demo.get_config().mesh
    assert common.mesh_overrides(demo_mesh, 64) == {
        "mesh.data": 64, "mesh.fsdp": 1, "mesh.tensor": 1, "mesh.dcn_data": 1, "mesh.dcn_fsdp": 1,
        "mesh.dcn_tensor": 1}
    two = common.mesh_overrides({"data": 1, "fsdp": -1, "tensor": 1}, 64, slices=2)
    assert (two["mesh.fsdp"], two["mesh.dcn_data"]) == (64, 2)
    with pytest.raises(ValueError, match="spans 4 slices"):
        common.mesh_overrides({"data": -1, "dcn_fsdp": 4}, 64, slices=2)
    with pytest.raises(ValueError, match="needs 128 devices, have 64"):
        common.mesh_overrides({"data": 128}, 64)
    # One process has one process-granule: a two-slice mesh cannot be built from it.
    with pytest.raises(ValueError, match="form 1 processes"):
        sharding.make_mesh({"data": -1, "dcn_data": 2})
    assert sharding.make_mesh({"fsdp": -1, "dcn_data": 1}).shape == {"data": 1, "fsdp": jax.device_count(),
                                                                      "tensor": 1}


GOLDEN_COMMANDS = {
    "tpu_single_slice.txt": ["launch.tpu", "--tpu", "vla-pod", "--zone", "us-east5-a", "--accelerator", "v5p-128"],
    "tpu_multislice.txt": ["launch.tpu", "--tpu", "vla-ms", "--zone", "us-east5-a", "--accelerator", "v5p-128",
                           "--slices", "2", "--spot", "--env",
                           "LIBTPU_INIT_ARGS=--xla_tpu_enable_async_collective_fusion=true"],
    "tpu_xpk.txt": ["launch.tpu", "--tpu", "vla-xpk", "--zone", "us-east5-a", "--accelerator", "v5p-128",
                    "--slices", "2", "--xpk_cluster", "vla-cluster"],
    "slurm.txt": ["launch.slurm", "--nodes", "4", "--gpus_per_node", "8", "--partition", "gpu",
                  "--env", "NCCL_DEBUG=WARN"],
}


def test_tpu_and_slurm_dry_runs_match_golden_files():
    run = ["--config", "configs/pi0.py", "--workdir", "/shared/runs/pi0", "--config.batch_size=256",
           "--config.data.root=/shared/data/metaworld", "--dry_run"]
    procs = {name: start(*argv, *run) for name, argv in GOLDEN_COMMANDS.items()}
    outputs = {name: finish(p).replace(sys.executable, "python") for name, p in procs.items()}
    single, multi, slurm = outputs["tpu_single_slice.txt"], outputs["tpu_multislice.txt"], outputs["slurm.txt"]
    # The facts, stated once more outside the golden files: workers, environment, trainer flags.
    assert "16 workers per slice; 16 processes" in single and "x 2 slices" in multi and "32 processes" in multi
    assert "tpu-vm create vla-pod --accelerator-type=v5p-128" in single
    assert "queued-resources create vla-ms --accelerator-type=v5p-128" in multi and "--node-count=2" in multi
    assert single.count("--worker=all") == 4 and multi.count("--worker=all --node=all") == 4
    assert "LIBTPU_INIT_ARGS=--xla_tpu_enable_async_collective_fusion=true setsid" in multi
    for text, dcn in ((single, 1), (multi, 2)):
        assert ("launch.autodetect vla.train --config ship/pi0.py --workdir /shared/runs/pi0 "
                "--config.batch_size=256 --config.data.root=/shared/data/metaworld --config.mesh.data=1 "
                f"--config.mesh.fsdp=64 --config.mesh.tensor=1 --config.mesh.dcn_data={dcn} ") in text
    assert ("xpk workload create --cluster=vla-cluster --workload=vla-xpk --zone=us-east5-a --tpu-type=v5p-128 "
            "--num-slices=2") in outputs["tpu_xpk.txt"]
    assert "launch.autodetect vla.train --config configs/pi0.py" in outputs["tpu_xpk.txt"]
    assert "#SBATCH --nodes=4\n#SBATCH --ntasks-per-node=1\n#SBATCH --gpus-per-node=8\n" in slurm
    assert "pip install -q -e '.[cuda]'" in slurm and 'JAX_NUM_PROCESSES="$SLURM_NTASKS"' in slurm
    assert "JAX_PROCESS_ID=$SLURM_PROCID exec .venv-cuda/bin/python -m vla.train --config configs/pi0.py" in slurm
    assert "--config.mesh.fsdp=32" in slurm and "export NCCL_DEBUG=WARN" in slurm
    for name, text in outputs.items():
        path = os.path.join(GOLDEN, name)
        if os.environ.get("UPDATE_GOLDEN"):
            with open(path, "w") as f:
                f.write(text)
        with open(path) as f:
            assert text == f.read(), f"{name} differs from the golden file (UPDATE_GOLDEN=1 rewrites it)"


def test_pod_launchers_take_gs_urls_or_absolute_paths_every_worker_sees():
    tpu.check_paths("gs://bucket/run", "gs://bucket/data")
    tpu.check_paths("/shared/run", "/shared/data")
    for url in ("s3://bucket/run", "gs:/bucket/run"):
        with pytest.raises(ValueError, match="unsupported storage URL"):
            tpu.check_paths(url, "/data")
    with pytest.raises(ValueError, match="config.data.root"):
        tpu.check_paths("/shared/run", "runs/demo/data")


# ------------------------------------------------------------------------------- gs:// workdirs

def _upload(gcs, url: str, data: bytes) -> None:
    """Writes an object through the emulator's JSON API directly: another client, as a trainer
    process is to the launcher."""
    bucket, _, name = url.removeprefix("gs://").partition("/")
    query = urllib.parse.urlencode({"uploadType": "media", "name": name})
    request = urllib.request.Request(f"{gcs.url}/upload/storage/v1/b/{bucket}/o?{query}", data=data, method="POST")
    urllib.request.urlopen(request, timeout=10).read()


def test_progress_of_a_gs_workdir_counts_committed_checkpoints_seen_fresh(gcs):
    """On gs:// Orbax writes a step in place and its commit marker last: a step without one is
    being written. Steps another process commits later are seen although the folder was listed."""
    workdir = gcs.bucket("progress") + "/run"
    assert common.latest_step(workdir) is None and not common.is_finished(workdir, 4)
    storage.path(f"{workdir}/checkpoints/2/{common.COMMIT_FILE}").write_text("ok")
    assert common.latest_step(workdir) == 2 and not common.is_finished(workdir, 4)
    _upload(gcs, f"{workdir}/checkpoints/4/state/array", b"\0")
    assert common.latest_step(workdir) == 2 and not common.is_finished(workdir, 4)
    _upload(gcs, f"{workdir}/checkpoints/4/{common.COMMIT_FILE}", b"ok")
    assert common.latest_step(workdir) == 4 and common.is_finished(workdir, 4)
    assert common.where(workdir, 4, "LOGS") == f"logs: LOGS\ncheckpoints: {workdir}/checkpoints (latest step 4 of 4)"


def test_a_gs_sweep_root_holds_manifest_and_workdirs_while_logs_stay_local(gcs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = gcs.bucket("sweep") + "/knobs"
    runs = sweep.expand(DEMO, demo.get_config(), [], root)
    here = tmp_path / "runs" / "gcs" / "sweep" / "knobs"
    for run in runs:
        assert run.workdir == f"{root}/{run.name}" and run.log == str(here / run.name / "output.log")
        assert run.command[run.command.index("--workdir") + 1] == run.workdir
    assert sweep.read_manifest(root) is None
    runs[2].status, runs[2].returncode = "failed", 1
    sweep.write_manifest(root, "configs/demo.py", "local", runs)
    expected = {"config": "configs/demo.py", "backend": "local", "runs": [dataclasses.asdict(r) for r in runs]}
    assert sweep.read_manifest(root) == expected
    assert [p.name for p in storage.path(root).iterdir()] == [sweep.MANIFEST]  # written in one go, no .tmp
    _upload(gcs, f"{runs[1].workdir}/checkpoints/{runs[1].total_steps}/{common.COMMIT_FILE}", b"ok")
    again = sweep.expand(DEMO, demo.get_config(), [], root)
    sweep.restore_status(again, sweep.read_manifest(root))
    assert [r.status for r in again[:4]] == ["pending", "finished", "failed", "pending"]
    sweep.write_manifest(root, "configs/demo.py", "local", again)
    assert [r["status"] for r in sweep.read_manifest(root)["runs"][:3]] == ["pending", "finished", "failed"]
    # The local processes' logs: runs/gcs/BUCKET/PATH below the current directory.
    assert local.log_dir(f"{root}/run") == str(here / "run" / "logs")
    assert slurm.script_path(f"{root}/run") == str(here / "run" / "slurm" / "train.sbatch")
    assert local.log_dir("/shared/run") == "/shared/run/logs" and slurm.log_dir("rel") == str(tmp_path / "rel" / "logs")


def test_summary_reads_gs_run_dirs_and_writes_its_files_next_to_them(gcs):
    root = gcs.bucket("summary") + "/sweep"
    runs = []
    for frames, loss in ((1, 0.5), (2, 0.25)):
        config = demo.get_config()
        config.update_from_flattened_dict({"knobs.context_frames": frames})
        workdir = f"{root}/frames={frames}"
        rows = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": loss}]
        storage.path(f"{workdir}/metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        runs.append(sweep.Run(f"frames={frames}", {"knobs.context_frames": frames}, workdir, [],
                              common.resolved(config), 2, "", status="finished"))
    sweep.write_manifest(root, "configs/demo.py", "local", runs)
    paths = summary.write(root)
    assert paths == {kind: f"{root}/summary.{kind}" for kind in ("csv", "md", "png")}
    csv_lines = storage.path(paths["csv"]).read_text().splitlines()
    assert csv_lines[0] == "run,status,step,knobs.context_frames,loss,params,chunk_ms_h100,realtime"
    assert csv_lines[1].startswith("frames=1,finished,2,1,0.5,")
    assert csv_lines[2].startswith("frames=2,finished,2,2,0.25,")
    assert "| frames=2 | finished | 2 | 2 | 0.25 |" in storage.path(paths["md"]).read_text()
    assert storage.path(paths["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_launchers_refuse_urls_they_cannot_write_and_route_gs_at_startup(tmp_path):
    """From the command line, in a scratch directory: a typo'd URL is a one-line usage error
    before anything starts; a SLURM dry run with a gs:// workdir passes it to the trainer, the
    script and SLURM's logs going below the current directory; nothing named 'gs:' appears here.
    (Two launchers only: each start imports JAX. The others take the same checks in-process.)"""
    env = dict(os.environ, PYTHONPATH=REPO)
    trainer = ["--config", DEMO, "--config.data.root=/shared/data"]
    commands = {"local": ["launch.local", *trainer, "--workdir", "gs:/bucket/run"],
                "slurm": ["launch.slurm", *trainer, "--workdir", "gs://bucket/run", "--dry_run"]}
    procs = {k: subprocess.Popen([sys.executable, "-m", *argv], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True) for k, argv in commands.items()}
    out = {k: p.communicate(timeout=TIMEOUT)[0] for k, p in procs.items()}
    assert {k: p.returncode for k, p in procs.items()} == {"local": 1, "slurm": 0}, out
    assert "'gs:/bucket/run': unsupported storage URL" in out["local"]
    here = tmp_path / "runs" / "gcs" / "bucket" / "run"
    assert f"# {here}/slurm/train.sbatch\n" in out["slurm"] and f"--output={here}/logs/slurm-%j.out" in out["slurm"]
    assert "--job-name=run" in out["slurm"] and " --workdir gs://bucket/run " in out["slurm"]
    assert not [p for p in tmp_path.rglob("*") if "gs:" in p.name]
    for url in ("s3://bucket/sweep", "gs:/bucket/sweep"):  # what launch.sweep and launch.local check first
        with pytest.raises(ValueError, match="unsupported storage URL"):
            common.check_writable(url, "--root")


# ------------------------------------------------------------------------------- local processes

def test_two_processes_train_like_one_process(generated_root, tmp_path, env):
    """launch.local over loopback: 2 processes x 4 devices on a two-slice mesh (data across the
    processes, fsdp within) give the losses of 1 process x 8 devices; process 0 alone writes
    metrics; the checkpoint holds both processes' data-iterator states."""
    multi, single = tmp_path / "2x4", tmp_path / "1x8"
    procs = [start("launch.local", "--config", "configs/demo.py", "--workdir", str(multi), "--processes", "2",
                   "--devices_per_process", "4", *tiny_flags(generated_root), "--config.mesh.data=1",
                   "--config.mesh.fsdp=-1", "--config.mesh.dcn_data=2", env=env),
             start("launch.local", "--config", "configs/demo.py", "--workdir", str(single), "--processes", "1",
                   "--devices_per_process", "8", *tiny_flags(generated_root), env=env)]
    out = finish(procs[0])
    finish(procs[1])
    assert "[0] " in out and f"checkpoints: {multi}/checkpoints (latest step 2 of 2)" in out
    rows = {d: loss_rows(d) for d in (multi, single)}
    assert [r["step"] for r in rows[multi]] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows[multi])
    np.testing.assert_allclose([r["loss"] for r in rows[multi]], [r["loss"] for r in rows[single]], rtol=1e-5)
    assert sorted(os.listdir(multi / "checkpoints" / "2" / "data")) == [
        "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]
    assert os.path.getsize(multi / "logs" / "process_1.log") > 0


def _lines(proc: subprocess.Popen) -> list[str]:
    """Collects a process's output lines as they come (read in a thread: nothing blocks)."""
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()
    return lines


def _wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _steps(workdir) -> list[int]:
    return [r["step"] for r in loss_rows(workdir)]


def test_sigterm_to_one_worker_saves_everywhere_and_relaunch_resumes(generated_root, tmp_path, env):
    """A preempted host: SIGTERM to process 1 alone makes both processes save at the same step
    (JAX's preemption service) and exit 0. The same command again resumes from that step;
    SIGTERM to the launcher then reaches both processes, which save again and exit 0."""
    workdir = tmp_path / "run"
    command = ["launch.local", "--config", "configs/demo.py", "--workdir", str(workdir), "--processes", "2",
               "--devices_per_process", "2",
               *tiny_flags(generated_root, total_steps=100_000, checkpoint_every=100_000)]
    first = start(*command, env=env)
    lines = _lines(first)
    _wait_for(lambda: _steps(workdir), "the first logged step")
    pid = int(next(re.match(r"process 1: pid (\d+)", line).group(1) for line in lines
                   if line.startswith("process 1: pid")))
    os.kill(pid, signal.SIGTERM)
    assert first.wait(timeout=TIMEOUT) == 0, "".join(lines)[-4000:]
    stopped = common.latest_step(str(workdir))
    assert stopped is not None and stopped < 100_000
    assert _steps(workdir) == list(range(1, stopped + 1))
    saved = set(os.listdir(workdir / "checkpoints" / str(stopped) / "data"))
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= saved
    assert f"stopping at step {stopped} (preempted)" in (workdir / "logs" / "process_0.log").read_text()
    assert f"latest step {stopped} of 100000; run the same command again to resume" in "".join(lines)

    second = start(*command, env=env)
    lines = _lines(second)
    _wait_for(lambda: (_steps(workdir) or [0])[-1] > stopped, "a step after the resumed one")
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=TIMEOUT) == 0, "".join(lines)[-4000:]
    again = common.latest_step(str(workdir))
    assert again > stopped and _steps(workdir) == list(range(1, again + 1))  # resumed at stopped + 1
    log = (workdir / "logs" / "process_0.log").read_text()
    assert f"stopping at step {again} (preempted)" in log


# ------------------------------------------------------------------------------- the demo sweep

def test_demo_knob_sweep_runs_end_to_end_and_resumes(generated_root, tmp_path, env):
    """Two runs of the demo's knob sweep (context frames 1 and 2), two at a time: manifest, final
    checkpoints, summary table and plot; invoking it again skips both. (The first run has the
    shapes of the single-process run above: with the shared cache it does not compile again.)"""
    root = tmp_path / "sweep"
    command = ["launch.sweep", "--config", "configs/demo.py", "--root", str(root), "--parallel", "2",
               "--select", "^vit=tiny-8_context_frames=._control_hz=20$", *tiny_flags(generated_root)]
    out = finish(start(*command, env=env))
    manifest = json.loads((root / "manifest.json").read_text())
    runs = {r["name"]: r for r in manifest["runs"]}
    assert len(runs) == 8 and manifest["config"] == "configs/demo.py"
    done = ["vit=tiny-8_context_frames=1_control_hz=20", "vit=tiny-8_context_frames=2_control_hz=20"]
    assert [n for n, r in runs.items() if r["status"] == "finished"] == done
    assert {r["status"] for n, r in runs.items() if n not in done} == {"pending"}
    first = runs[done[1]]
    assert first["overrides"] == {"knobs.vit": "tiny/8", "knobs.vlm": "gemma_tiny",
                                  "knobs.action_expert": "gemma_tiny_expert", "knobs.context_frames": 2,
                                  "knobs.control_hz": 20.0}
    assert first["config"]["knobs"]["context_frames"] == 2 and first["config"]["total_steps"] == 2
    assert first["command"][1:5] == ["-m", "vla.train", "--config", "configs/demo.py"]
    assert "--config.knobs.context_frames=2" in first["command"] and first["returncode"] == 0
    assert os.path.isdir(os.path.join(first["workdir"], "checkpoints", "2"))
    assert "2 finished" in out

    csv_lines = (root / "summary.csv").read_text().splitlines()
    assert csv_lines[0] == ("run,status,step,knobs.vit,knobs.vlm,knobs.action_expert,knobs.context_frames,"
                            "knobs.control_hz,loss,examples_per_s,params,chunk_ms_h100,realtime")
    assert len(csv_lines) == 9
    table = (root / "summary.md").read_text()
    assert f"| {done[0]} | finished | 2 |" in table
    assert (root / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _, rows = summary.table(manifest, summary.DEFAULT_METRICS, "h100")
    finished = [r for r in rows if r["status"] == "finished"]
    assert all(np.isfinite(r["loss"]) and r["params"] > 0 and r["chunk_ms_h100"] > 0 for r in finished)

    again = finish(start(*command, env=env))
    assert "0 to run; skipped: 2 finished" in again
    assert json.loads((root / "manifest.json").read_text())["runs"] == manifest["runs"]
