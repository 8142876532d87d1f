"""The trainer on the tiny generated dataset: outputs, config errors, optimizer pieces, NaN stop."""
import contextlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.data_fixtures import tiny_config
from vla import optimizer as optimizer_lib
from vla import train as train_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_config(root: str, **overrides):
    """The demo config shrunk to seconds: tiny model at 32², batch 8, a handful of steps."""
    c = tiny_config()
    c.data.root = root
    c.batch_size = 8
    c.total_steps = 4
    c.log_every = 1
    c.checkpoint_every = 2
    c.eval_every = 1000  # evaluate once, at the end
    c.eval_batches = 1
    c.chip = "h100"  # a table entry: no CPU measurement at start
    c.knobs.flow_steps = 2
    c.optimizer.warmup_steps = 2
    for key, value in overrides.items():
        target = c
        *path, last = key.split(".")
        for p in path:
            target = target[p]
        target[last] = value
    return c


def read_metrics(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def crashing_hook(step, model):
    """An evaluation hook that dies (a simulator crashing mid-evaluation)."""
    raise RuntimeError("simulator crashed")


@pytest.fixture(scope="module")
def trained(generated_root, tmp_path_factory):
    """A 4-step run whose final evaluation has a crashing hook; what it printed (the progress
    bar on stderr, absl's log) is kept."""
    workdir = str(tmp_path_factory.mktemp("train"))
    stderr = io.StringIO()
    log = logging.StreamHandler(stderr)
    logging.getLogger("absl").addHandler(log)
    try:
        with contextlib.redirect_stderr(stderr):
            final = train_lib.train(train_lib.prepare(small_config(generated_root), workdir),
                                    eval_hooks=[crashing_hook])
    finally:
        logging.getLogger("absl").removeHandler(log)
    return workdir, final, stderr.getvalue()


def test_run_writes_config_metrics_plot_and_checkpoints(trained):
    workdir, final, _ = trained
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["batch_size"] == 8
    rows = [r for r in read_metrics(workdir) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("grad_norm", "lr", "examples_per_s", "tokens_per_s", "mfu", "step_time_s",
                "data_wait_s", "flow_loss/metaworld", "data/skipped/metaworld"):
        assert key in rows[-1], key
    assert all(np.isfinite(r["loss"]) for r in rows)
    assert rows[0]["lr"] == 0.0 and rows[1]["lr"] > 0  # warmup starts at zero
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
    assert os.path.getsize(os.path.join(workdir, "loss.png")) > 0
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    # Held-out metrics at the end: loss and native-unit action error beside the mean-action baseline.
    for key in ("eval/flow_loss/metaworld", "eval/action_mae/metaworld", "eval/mean_action_mae/metaworld"):
        assert np.isfinite(final[key]), key


def test_evaluation_failure_is_counted_and_never_costs_the_final_checkpoint(trained):
    """The final evaluation's hook crashed: the run still finished, saved step 4 (saving comes
    first) and reported the held-out metrics beside one counted failure."""
    workdir, final, stderr = trained
    assert final["eval/failures"] == 1
    assert "evaluation hook crashing_hook failed (RuntimeError: simulator crashed)" in stderr
    assert "4" in os.listdir(os.path.join(workdir, "checkpoints"))


def test_progress_bar_shows_the_loss_of_the_step_it_shows(trained):
    workdir, _, stderr = trained
    losses = {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}
    drawn = re.findall(r"(\d+)/4 \[[^\]]*loss=([\d.]+)\]", stderr)
    assert drawn
    for step, loss in drawn:
        assert loss == f"{losses[int(step)]:.4f}", (step, loss)


def test_checkpoint_metadata_carries_config_stats_and_tokenizer(trained):
    workdir, _, _ = trained
    with open(os.path.join(workdir, "checkpoints", "4", "metadata", "metadata")) as f:
        meta = json.load(f)
    assert meta["config"]["total_steps"] == 4
    assert meta["sources"] == ["metaworld", "rollout_video", "scenes_vl"]
    assert os.path.exists(meta["tokenizer"])
    assert "actions" in meta["stats"]["metaworld"]


def test_rerun_of_finished_workdir_resumes_at_the_end(trained, generated_root):
    workdir, _, _ = trained
    before = read_metrics(workdir)
    train_lib.train(train_lib.prepare(small_config(generated_root), workdir))
    after = [r for r in read_metrics(workdir) if "loss" in r]
    assert [r["step"] for r in after] == [1, 2, 3, 4]
    assert [r["loss"] for r in after] == [r["loss"] for r in before if "loss" in r]


def test_checkpoint_of_another_model_size_is_refused_in_words_before_touching_the_workdir(
        trained, generated_root, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(trained[0], workdir)
    with open(os.path.join(workdir, "config.json")) as f:
        config_json = f.read()
    with pytest.raises(ValueError) as info:
        train_lib.prepare(small_config(generated_root, **{"knobs.vit": "mu/8"}), workdir)
    message = str(info.value)
    assert "(step 4) came from another model config" in message
    assert re.search(r"vit/\S+: \[[\d, ]+\] in the checkpoint, \[[\d, ]+\] in this config", message)
    assert "knobs.vit: 'tiny/8' there, 'mu/8' here" in message
    with open(os.path.join(workdir, "config.json")) as f:
        assert f.read() == config_json  # still describes the checkpoints


def test_inconsistent_knobs_fail_before_anything_runs(tmp_path):
    c = small_config("/nonexistent")
    c.knobs.chunk_s, c.knobs.control_hz, c.knobs.steps_executed = 0.25, 20.0, 10
    with pytest.raises(ValueError, match="fewer than steps_executed"):
        train_lib.prepare(c, str(tmp_path))
    c = small_config("/nonexistent", **{"optimizer.grad_accum_steps": 3})
    with pytest.raises(ValueError, match="microbatches"):
        train_lib.prepare(c, str(tmp_path))


def test_vocab_smaller_than_tokenizer_is_an_error(generated_root, tmp_path):
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        train_lib.prepare(small_config(generated_root, **{"model.vocab_size": 16}), str(tmp_path))


def test_context_stride_finer_than_dataset_rate_is_an_error(generated_root, tmp_path):
    with pytest.raises(ValueError, match="finer than the dataset"):
        train_lib.prepare(small_config(generated_root, **{"knobs.context_frames": 2,
                                                          "knobs.context_stride_s": 0.001}),
                          str(tmp_path))


def test_unknown_config_key_is_rejected_on_the_command_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vla.train", "--config", "configs/demo.py",
                           "--workdir", str(tmp_path), "--config.optimizer.learning_rate=1"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "learning_rate" in proc.stderr
    assert not os.listdir(tmp_path)


def test_nan_stops_with_the_step_and_keeps_the_last_good_checkpoint(generated_root, tmp_path):
    # lr this large overflows within a few steps: the run must name the step and save nothing bad.
    c = small_config(generated_root, total_steps=12, checkpoint_every=1, eval_batches=0,
                     **{"optimizer.lr": 1e30, "optimizer.warmup_steps": 0, "optimizer.clip_norm": 1e30})
    with pytest.raises(FloatingPointError, match=r"step \d+") as info:
        train_lib.train(train_lib.prepare(c, str(tmp_path)))
    bad = int(re.search(r"step (\d+)", str(info.value)).group(1))
    steps = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints"))
    assert steps and steps[-1] == bad - 1


def test_nan_check_covers_the_update_so_no_checkpoint_on_disk_is_nan(generated_root, tmp_path):
    """lr overflows float32 at step 1: that step's loss and gradient (taken before the update) are
    finite, its update and new parameters are not, and checkpoint 1 must never be written."""
    c = small_config(generated_root, total_steps=3, checkpoint_every=1, eval_batches=0,
                     **{"optimizer.lr": 1e40, "optimizer.warmup_steps": 0})
    with pytest.raises(FloatingPointError, match="step 1: "):
        train_lib.train(train_lib.prepare(c, str(tmp_path)))
    for step in os.listdir(tmp_path / "checkpoints"):
        state = ocp.StandardCheckpointer().restore(tmp_path / "checkpoints" / step / "state")
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(state)), step


def test_microbatches_are_strided_so_every_shard_feeds_each_one():
    batch = {"x": jnp.arange(8)[:, None] * jnp.ones((1, 3)), "images": {"cam": jnp.arange(8)}}
    micro = train_lib.microbatches(batch, 2)
    np.testing.assert_array_equal(micro["images"]["cam"], [[0, 2, 4, 6], [1, 3, 5, 7]])
    assert micro["x"].shape == (2, 4, 3)


def test_decay_mask_skips_norms_biases_and_embeddings():
    params = {"vit": {"ln1_scale": jnp.ones((2, 4)), "q_kernel": jnp.ones((2, 4, 4)),
                      "pos_embedding": jnp.ones((4, 4)), "head": {"bias": jnp.ones(4),
                                                                   "kernel": jnp.ones((4, 4))}},
              "decoder": {"embedder": jnp.ones((8, 4)), "experts": {"0": {"pre_ffw_norm": jnp.ones((2, 4)),
                                                                         "linear": jnp.ones((2, 4, 4))}}}}
    mask = optimizer_lib.decay_mask(params)
    assert mask["vit"]["q_kernel"] and mask["vit"]["head"]["kernel"] and mask["decoder"]["experts"]["0"]["linear"]
    assert not any([mask["vit"]["ln1_scale"], mask["vit"]["pos_embedding"], mask["vit"]["head"]["bias"],
                    mask["decoder"]["embedder"], mask["decoder"]["experts"]["0"]["pre_ffw_norm"]])


def _optimizer(**fields) -> optimizer_lib.OptimizerSpec:
    return optimizer_lib.OptimizerSpec(**{**dict(
        lr=0.1, warmup_steps=0, min_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1,
        clip_norm=1.0, ema_decay=0.0, grad_accum_steps=1, freeze=(), total_steps=10), **fields})


def test_frozen_parameters_do_not_move_and_bad_patterns_fail():
    params = {"vit": {"w": jnp.ones((3, 3))}, "decoder": {"w": jnp.ones((3, 3))}}
    opt = _optimizer(freeze=("^vit/",))
    tx = optimizer_lib.make_optimizer(opt, params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert not np.any(updates["vit"]["w"]) and np.all(updates["decoder"]["w"] < 0)
    with pytest.raises(ValueError, match="matches no parameter"):
        optimizer_lib.make_optimizer(_optimizer(freeze=("^nothing/",)), params)


def test_learning_rate_warms_up_then_decays_to_the_floor():
    sched = optimizer_lib.learning_rate(_optimizer(lr=1.0, warmup_steps=10, total_steps=100))
    assert float(sched(0)) == 0.0 and float(sched(10)) == pytest.approx(1.0)
    assert float(sched(100)) == pytest.approx(0.1) and float(sched(55)) < 1.0


def test_init_from_a_run_loads_parameters_and_accumulation_runs(trained, generated_root, tmp_path):
    """A run started from another's newest parameters (π0.5 stage 2: config.init of format vla),
    with two microbatches per step."""
    source, _, _ = trained
    c = small_config(generated_root, total_steps=1, eval_batches=0, batch_size=16,
                     init=(dict(format="vla", path=source),),
                     **{"optimizer.lr": 0.0,  # a zero step: the parameters stay as loaded
                        "optimizer.grad_accum_steps": 2})
    final = train_lib.train(train_lib.prepare(c, str(tmp_path)))
    assert np.isfinite(final["loss"]) and final["grad_norm"] > 0 and final["flow_loss/metaworld"] > 0
    load = lambda d, s: ocp.StandardCheckpointer().restore(os.path.join(d, "checkpoints", s, "state"))
    theirs, ours = load(source, "4")["params"], load(str(tmp_path), "1")["params"]
    for a, b in zip(jax.tree.leaves(theirs), jax.tree.leaves(ours)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_optimizer_moments_are_sharded_like_their_parameters():
    # Zeros carry no sharding: unconstrained, XLA replicated both AdamW moments on every device.
    from flax import nnx

    from configs import specs
    from vla import sharding
    config = tiny_config()
    config.mesh.data, config.mesh.fsdp = 1, -1
    config.model.lora_rank, config.model.lora_targets = 2, ("decoder/experts/1/",)  # masked states too
    spec = specs.build(config)
    mesh = sharding.make_mesh(spec.mesh.axes)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(spec.mesh.rules):
        model = sharding.init_sharded(lambda: train_lib.make_model(spec), mesh, spec.mesh.rules)
        params = nnx.to_pure_dict(nnx.split(model)[1])
        tx = optimizer_lib.make_optimizer(spec.optimizer, params)
        trained = jax.tree.leaves(optimizer_lib.select(params, optimizer_lib.trainable_mask(params, (), ())))
        state = train_lib.init_state(spec.optimizer, mesh, tx, jax.tree.map(jnp.copy, params))
    # AdamW's state flattens to its count, then mu and nu in the parameters' order.
    moments = [leaf for leaf in jax.tree.leaves(state["opt_state"]) if leaf.ndim]
    assert len(moments) == 2 * len(trained)
    assert any(p.sharding.spec != jax.sharding.PartitionSpec() for p in trained)
    for moment, param in zip(moments, trained * 2):
        assert moment.shape == param.shape and moment.sharding.is_equivalent_to(param.sharding, param.ndim)
