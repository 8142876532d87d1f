"""Checkpoints: exact restore onto a smaller mesh, and exact resume of `python -m vla.train` after
kill -9 and after SIGTERM (same per-step losses, bitwise-identical final state), with
training-time image augmentation on."""
import json
import os
import signal
import subprocess
import sys
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from vla import sharding
from vla.checkpoint import Checkpointer, abstract_like

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY = 6, 3


def test_restore_onto_a_smaller_mesh_is_exact(tmp_path):
    mesh8 = sharding.make_mesh({"fsdp": 8})
    mesh4 = sharding.make_mesh({"fsdp": 4}, jax.devices()[:4])
    x = jnp.arange(64 * 3, dtype=jnp.float32).reshape(64, 3) / 7
    state = {"w": jax.device_put(x, NamedSharding(mesh8, PartitionSpec("fsdp"))),
             "step": jnp.int32(5)}
    data = iter(grain.MapDataset.range(10).to_iter_dataset())
    next(data)
    ckpt = Checkpointer(str(tmp_path), keep=2)
    ckpt.save(5, state, data, {"note": "hello"})
    ckpt.wait()
    target = abstract_like({"w": jax.device_put(x, NamedSharding(mesh4, PartitionSpec("fsdp"))),
                            "step": jnp.int32(0)})
    fresh = iter(grain.MapDataset.range(10).to_iter_dataset())
    restored, meta = ckpt.restore(5, target, fresh)
    ckpt.close()
    assert meta == {"note": "hello"}
    assert restored["w"].sharding.mesh.devices.size == 4
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(x))
    assert next(fresh) == 1  # the data iterator continues where the saved one was


# ------------------------------------------------------------------------ exact resume (CLI)

def _flags(root: str) -> list[str]:
    overrides = {"data.root": root, "model.image_size": 32, "batch_size": 8, "total_steps": STEPS,
                 "log_every": 1, "checkpoint_every": EVERY, "eval_every": 1000, "eval_batches": 1,
                 "chip": "h100", "knobs.flow_steps": 2, "optimizer.warmup_steps": 2,
                 # Augmentation on: a resumed run must draw the same crops and colours.
                 "data.augment.crop_scale": 0.9, "data.augment.rotate_degrees": 5.0,
                 "data.augment.brightness": 0.3, "data.augment.saturation": 0.5}
    return [f"--config.{k}={v}" for k, v in overrides.items()]


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory) -> str:
    """One persistent compilation cache for the trainer processes: only the first compiles."""
    return str(tmp_path_factory.mktemp("jax_cache"))


def _start(workdir: str, root: str, cache: str) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache,
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    return subprocess.Popen([sys.executable, "-m", "vla.train", "--config", "configs/demo.py",
                             "--workdir", workdir, *_flags(root)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def _losses(workdir: str) -> dict[int, float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    losses = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    assert len(losses) == len(dict(losses)), "a step was logged twice"
    return dict(losses)


def _final_state(workdir: str) -> dict:
    path = os.path.join(workdir, "checkpoints", str(STEPS), "state")
    return ocp.StandardCheckpointer().restore(os.path.abspath(path))


def _wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"trainer exited before {what}: {proc.communicate()[0][-3000:]}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def reference(generated_root, compile_cache, tmp_path_factory):
    """An uninterrupted run of STEPS steps; started first, the interrupted runs start beside it."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    return workdir, _start(workdir, generated_root, compile_cache)


def _reference_result(reference):
    workdir, proc = reference
    if proc.returncode is None:
        _finish(proc)
    return _losses(workdir), _final_state(workdir)


def _assert_same_run(reference, workdir: str) -> None:
    ref_losses, ref_state = _reference_result(reference)
    assert _losses(workdir) == ref_losses
    assert sorted(ref_losses) == list(range(1, STEPS + 1))
    state = _final_state(workdir)
    ref_leaves = jax.tree_util.tree_leaves_with_path(ref_state)
    leaves = jax.tree.leaves(state)
    assert len(leaves) == len(ref_leaves)
    for (path, a), b in zip(ref_leaves, leaves):
        assert np.array_equal(np.asarray(a), np.asarray(b)), jax.tree_util.keystr(path)


def test_resume_after_kill_9_is_exact(reference, generated_root, compile_cache, tmp_path):
    workdir = str(tmp_path)
    proc = _start(workdir, generated_root, compile_cache)
    # kill -9 once checkpoint EVERY is complete (Orbax renames a finished save into place).
    _wait_for(lambda: os.path.isdir(os.path.join(workdir, "checkpoints", str(EVERY))), proc,
              f"checkpoint {EVERY}")
    proc.kill()
    proc.wait()
    assert str(STEPS) not in os.listdir(os.path.join(workdir, "checkpoints"))
    _finish(_start(workdir, generated_root, compile_cache))
    _assert_same_run(reference, workdir)


def test_resume_after_sigterm_is_exact(reference, generated_root, compile_cache, tmp_path):
    workdir = str(tmp_path)
    proc = _start(workdir, generated_root, compile_cache)
    _wait_for(lambda: os.path.exists(os.path.join(workdir, "metrics.jsonl"))
              and len(_losses(workdir)) >= 1, proc, "the first step")
    proc.send_signal(signal.SIGTERM)
    out = _finish(proc)
    assert "preempted" in out
    stopped = max(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")))
    assert stopped < STEPS
    _finish(_start(workdir, generated_root, compile_cache))
    _assert_same_run(reference, workdir)
