"""The trainer: python -m vla.train --config configs/FILE.py[:arg] --workdir DIR [--config.key=value]

Writes the resolved config to DIR/config.json and resumes from the newest checkpoint in
DIR/checkpoints. Every process of a multi-host run runs this same program (jax.distributed is
initialized from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID when set); each
feeds its own slice of the data, process 0 alone writes metrics and plots.

A step is a pure function (state, batch) -> (state, metrics), jitted with the state donated. The
state is {"step", "params", "opt_state"[, "ema"]} over the model's pure parameter dict; the
flow-matching noise of a step is drawn from (config.seed, step), so a resumed run continues with
exactly the numbers an uninterrupted one would have used.

Stops: at total_steps; on SIGTERM (all processes save at the same step, then exit 0); on a NaN or
Inf loss or gradient (raises FloatingPointError naming the step, without saving that state).
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from data import pipeline as pipeline_lib
from vla import cost, sharding
from vla import optimizer as optimizer_lib
from vla.checkpoint import Checkpointer, abstract_like
from vla.metrics import MetricsWriter
from vla.models.vla import VLA, VLAConfig, action_horizon

Batch = dict[str, Any]
State = dict[str, Any]
# An evaluation hook gets (step, model with the evaluated weights) and returns named scalars; the
# deployment work plugs closed-loop success rates in here.
EvalHook = Callable[[int, nnx.Module], Mapping[str, float]]
BATCH_AXES = ("data", "fsdp")


# ------------------------------------------------------------------------------- validation

def validate_config(config) -> None:
    """Knob combinations that cannot work, reported before any data is opened or code compiled."""
    k = config.knobs
    horizon = action_horizon(k.chunk_s, k.control_hz)
    if horizon < k.steps_executed:
        raise ValueError(f"knobs: a chunk of {k.chunk_s} s at {k.control_hz} Hz is {horizon} steps, "
                         f"fewer than steps_executed={k.steps_executed}")
    accum = int(config.optimizer.grad_accum_steps)
    if accum < 1 or config.batch_size % accum:
        raise ValueError(f"batch_size {config.batch_size} does not split into "
                         f"optimizer.grad_accum_steps={accum} microbatches")
    if config.total_steps < 1:
        raise ValueError(f"total_steps must be positive, got {config.total_steps}")
    for key in ("log_every", "checkpoint_every", "eval_every"):
        if config[key] < 1:
            raise ValueError(f"{key} must be >= 1, got {config[key]}")


def validate_data(config, tokenizer_vocab_size: int) -> None:
    if config.model.vocab_size < tokenizer_vocab_size:
        raise ValueError(f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's "
                         f"vocab_size={tokenizer_vocab_size}")


def validate_mesh(config, mesh: jax.sharding.Mesh) -> None:
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    micro = config.batch_size // config.optimizer.grad_accum_steps
    if micro % shards:
        raise ValueError(f"a microbatch of {micro} examples does not divide over the "
                         f"{shards} data x fsdp shards of mesh {dict(mesh.shape)}")


# ------------------------------------------------------------------------------- multi-host

def initialize_distributed() -> None:
    """jax.distributed from the launcher's environment; a single process needs nothing."""
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address:
        jax.distributed.initialize(address, int(os.environ["JAX_NUM_PROCESSES"]),
                                   int(os.environ["JAX_PROCESS_ID"]))


def global_batch(local: Batch, mesh: jax.sharding.Mesh) -> Batch:
    """This process's slice of the batch -> global arrays sharded over (data, fsdp)."""
    spec = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(spec, x), local)


def microbatches(batch: Batch, n: int) -> Batch:
    """[B, ...] -> [n, B/n, ...], microbatch i = examples i, i+n, ...: every device's shard
    contributes to every microbatch (a contiguous split makes XLA rematerialize under FSDP)."""
    return jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1),
                        batch)


# ------------------------------------------------------------------------------- state and step

def init_state(config, mesh: jax.sharding.Mesh, tx: optax.GradientTransformation, params: Any
               ) -> State:
    """Optimizer state and EMA next to the (already sharded) parameters; the shardings of the
    moments follow the parameters'."""
    ema_on = config.optimizer.ema_decay > 0

    def build(params):
        state = dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
        if ema_on:
            state["ema"] = jax.tree.map(jnp.copy, params)
        return state

    with jax.set_mesh(mesh):
        return jax.jit(build, donate_argnums=0)(params)


def make_train_step(config, graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    num_sources: int) -> Callable[[State, Batch], tuple[State, dict]]:
    accum = int(config.optimizer.grad_accum_steps)
    ema_decay = float(config.optimizer.ema_decay)
    schedule = optimizer_lib.learning_rate(config.optimizer, int(config.total_steps))
    seed = int(config.seed)

    def loss_fn(params, batch, rng):
        return nnx.merge(graphdef, params).loss(batch, rng, num_sources)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def sums(m):
        """Per-source (loss x count, count): they add up across microbatches."""
        return {name: (m[f"{name}_loss_per_source"] * m[f"{name}_count_per_source"],
                       m[f"{name}_count_per_source"]) for name in ("flow", "text")}

    def train_step(state: State, batch: Batch) -> tuple[State, dict]:
        rng = jax.random.fold_in(jax.random.key(seed), state["step"])
        params = state["params"]
        if accum == 1:
            (_, m), grads = grad_fn(params, batch, rng)
            scalars = {k: m[k] for k in ("loss", "flow_loss", "text_loss")}
            per_source = sums(m)
        else:
            def body(carry, xs):
                i, micro = xs
                (_, m), g = grad_fn(params, micro, jax.random.fold_in(rng, i))
                step_out = (g, {k: m[k] for k in ("loss", "flow_loss", "text_loss")}, sums(m))
                return jax.tree.map(jnp.add, carry, step_out), None

            first = (jax.tree.map(jnp.zeros_like, params),
                     {k: jnp.zeros((), jnp.float32) for k in ("loss", "flow_loss", "text_loss")},
                     {name: (jnp.zeros((num_sources,), jnp.float32),) * 2
                      for name in ("flow", "text")})
            (grads, scalars, per_source), _ = jax.lax.scan(
                body, first, (jnp.arange(accum), microbatches(batch, accum)))
            grads = jax.tree.map(lambda g: g / accum, grads)
            scalars = jax.tree.map(lambda s: s / accum, scalars)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        new_state = dict(step=state["step"] + 1, params=new_params, opt_state=opt_state)
        if "ema" in state:
            new_state["ema"] = optimizer_lib.ema_update(state["ema"], new_params, ema_decay, state["step"])
        metrics = dict(scalars, grad_norm=optax.tree.norm(grads),
                       update_norm=optax.tree.norm(updates), lr=schedule(state["step"]))
        for name, (total, count) in per_source.items():
            metrics[f"{name}_sum_per_source"], metrics[f"{name}_count_per_source"] = total, count
        return new_state, metrics

    return train_step


# ------------------------------------------------------------------------------- evaluation

class Evaluator:
    """Held-out loss per source and action error in the dataset's native units.

    The action error is the mean |sampled chunk - true chunk| over action_mask after undoing
    each source's normalization; the baseline predicts the dataset's mean action everywhere.
    The held-out iterator restarts every time, so every evaluation sees the same batches.
    """

    def __init__(self, config, graphdef: nnx.GraphDef, mesh: jax.sharding.Mesh,
                 heldout: pipeline_lib.Pipeline, hooks: Sequence[EvalHook] = ()):
        self._config, self._graphdef, self._mesh, self._hooks = config, graphdef, mesh, hooks
        self._data, self._start = heldout, heldout.get_state()
        self._names = heldout.names
        # Inputs that are not batches are replicated explicitly: in a multi-process run a jitted
        # function accepts only arrays placed on the global mesh.
        self._replicated = NamedSharding(mesh, PartitionSpec())
        self._tables = jax.device_put(self._native_tables(config, heldout), self._replicated)
        self._step = jax.jit(self._eval_step, out_shardings=self._replicated)

    @staticmethod
    def _native_tables(config, heldout: pipeline_lib.Pipeline) -> dict[str, np.ndarray]:
        """Per source: actions = normalized * scale + shift, and the mean action ([S, A] each);
        sources without statistics (no actions) keep the identity."""
        a, n = int(config.model.action_dim), len(heldout.names)
        scale, shift, mean = np.ones((n, a), np.float32), np.zeros((n, a), np.float32), np.zeros((n, a), np.float32)
        for i, name in enumerate(heldout.names):
            if name in heldout.normalizers:
                norm = heldout.normalizers[name]["actions"]
                scale[i, :norm.dim], shift[i, :norm.dim] = norm.scale, norm.shift
                stat = np.asarray(heldout.stats[name]["actions"]["mean"], np.float32)
                mean[i, :len(stat)] = stat
        return dict(scale=scale, shift=shift, mean=mean)

    def _eval_step(self, params, batch, tables, index):
        model = nnx.merge(self._graphdef, params)
        rng = jax.random.fold_in(jax.random.key(int(self._config.seed) + 1), index)
        loss_rng, noise_rng = jax.random.split(rng)
        _, m = model.loss(batch, loss_rng, len(self._names))
        pred = model.sample_actions(batch, rng=noise_rng, num_steps=int(self._config.knobs.flow_steps))
        src = batch["source"]
        scale, shift = tables["scale"][src][:, None], tables["shift"][src][:, None]
        true = batch["actions"] * scale + shift
        mask = batch["action_mask"].astype(jnp.float32)
        per_source = lambda v: jax.ops.segment_sum(v, src, num_segments=len(self._names))
        err = per_source(jnp.sum(jnp.abs(pred * scale + shift - true) * mask, axis=(1, 2)))
        base = per_source(jnp.sum(jnp.abs(tables["mean"][src][:, None] - true) * mask, axis=(1, 2)))
        out = dict(action_err=err, mean_action_err=base, action_count=per_source(jnp.sum(mask, axis=(1, 2))))
        for name in ("flow", "text"):
            count = m[f"{name}_count_per_source"]
            out[f"{name}_sum"], out[f"{name}_count"] = m[f"{name}_loss_per_source"] * count, count
        return out

    def __call__(self, step: int, params: Any) -> dict[str, float]:
        self._data.set_state(self._start)
        totals = None
        for i in range(int(self._config.eval_batches)):
            batch = global_batch(next(self._data), self._mesh)
            out = self._step(params, batch, self._tables, jax.device_put(np.int32(i), self._replicated))
            totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
        t = jax.tree.map(np.asarray, jax.device_get(totals))
        metrics = {}
        for i, name in enumerate(self._names):
            for loss in ("flow", "text"):
                if t[f"{loss}_count"][i]:
                    metrics[f"eval/{loss}_loss/{name}"] = t[f"{loss}_sum"][i] / t[f"{loss}_count"][i]
            if t["action_count"][i]:
                metrics[f"eval/action_mae/{name}"] = t["action_err"][i] / t["action_count"][i]
                metrics[f"eval/mean_action_mae/{name}"] = t["mean_action_err"][i] / t["action_count"][i]
        model = nnx.merge(self._graphdef, params)
        for hook in self._hooks:
            metrics.update({f"eval/{k}": v for k, v in hook(step, model).items()})
        return metrics


# ------------------------------------------------------------------------------- logging

class Interval:
    """Accumulates per-step metrics between log lines; checks every step for NaN/Inf."""

    def __init__(self, names: Sequence[str]):
        self._names = names
        self.reset()

    def reset(self) -> None:
        self.steps, self.data_wait, self.start = 0, 0.0, time.perf_counter()
        self._scalars: dict[str, float] = {}
        self._per_source: dict[str, np.ndarray] = {}

    def add(self, step: int, m: dict[str, np.ndarray], data_wait: float) -> None:
        for key in ("loss", "grad_norm"):
            if not np.isfinite(m[key]):
                raise FloatingPointError(f"step {step}: {key} is {float(m[key])}; stopping "
                                         f"(the last checkpoint holds the last good state)")
        self.steps += 1
        self.data_wait += data_wait
        for k, v in m.items():
            if np.ndim(v) == 0:
                self._scalars[k] = self._scalars.get(k, 0.0) + float(v)
            else:
                self._per_source[k] = self._per_source.get(k, 0.0) + np.asarray(v, np.float64)

    def summary(self) -> dict[str, float]:
        out = {k: v / self.steps for k, v in self._scalars.items()}
        for loss in ("flow", "text"):
            total, count = self._per_source[f"{loss}_sum_per_source"], self._per_source[f"{loss}_count_per_source"]
            out.update({f"{loss}_loss/{n}": total[i] / count[i] for i, n in enumerate(self._names) if count[i]})
        elapsed = time.perf_counter() - self.start
        out["step_time_s"] = elapsed / self.steps
        out["data_wait_s"] = self.data_wait / self.steps
        return out


def throughput(config, step_time: float, peak_flops: float) -> dict[str, float]:
    """Examples/s, model tokens/s and MFU from the analytic FLOPs of a training example."""
    cfg = VLAConfig.from_config(config)
    examples = config.batch_size / step_time
    return {"examples_per_s": examples,
            "tokens_per_s": examples * (cost.prefix_len(cfg) + cost.suffix_len(cfg)),
            "mfu": cost.train_flops_per_example(cfg) * examples / peak_flops}


def peak_flops(config) -> float:
    """The run's peak FLOP/s: every device's, or this machine's measured CPU throughput (the
    forced host devices of a CPU run share the same cores)."""
    if config.chip == "cpu":
        return cost.get_chip("cpu").peak_flops
    return cost.chip_peak_flops(config.chip) * jax.device_count()


# ------------------------------------------------------------------------------- the run

class _Stop:
    """SIGTERM in a single-process run (multi-process runs rely on JAX's preemption service)."""

    def __init__(self):
        self.requested = False
        if jax.process_count() == 1:
            signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        del signum, frame
        self.requested = True


def load_params(workdir: str, target: Any) -> Any:
    """The newest parameters of another run (config.init_from), e.g. π0.5 stage 1 -> stage 2."""
    other = Checkpointer(os.path.join(workdir, "checkpoints"), keep=1)
    step = other.latest_step()
    if step is None:
        raise ValueError(f"config.init_from={workdir!r} has no checkpoint")
    params = other.restore_params(step, target)
    other.close()
    return params


def write_config(config, workdir: str) -> None:
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))


@dataclasses.dataclass
class Run:
    """Everything the training loop needs, built by `prepare` (state restored when resuming)."""

    data: Any
    mesh: jax.sharding.Mesh
    rules: tuple
    graphdef: Any
    state: State
    train_step: Callable
    ckpt: Checkpointer
    metadata: dict
    start: int


def prepare(config, workdir: str) -> Run:
    """Validates the config, opens the data, builds the mesh and the directly sharded state
    (from init_from or the newest checkpoint in workdir) and jits the train step."""
    validate_config(config)
    os.makedirs(workdir, exist_ok=True)
    data = pipeline_lib.make_pipeline(config, "train")
    validate_data(config, data.tokenizer.vocab_size)
    # FAST action targets (π0.5) get ids the tokenizer reserves; the action expert must not see them.
    config.model.fast_token_start = data.fast_token_start
    mesh = sharding.make_mesh(dict(config.mesh))
    validate_mesh(config, mesh)
    write_config(config, workdir)
    rules = tuple(tuple(r) for r in config.sharding_rules)
    model_cfg = VLAConfig.from_config(config)

    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        model = sharding.init_sharded(lambda: VLA(model_cfg, rngs=nnx.Rngs(config.seed)), mesh, rules)
        graphdef, params = nnx.split(model)
        params = nnx.to_pure_dict(params)
        del model
        ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), int(config.keep_checkpoints))
        start = ckpt.latest_step() or 0
        if config.init_from and not start:
            params = load_params(config.init_from, abstract_like(params))
        tx = optimizer_lib.make_optimizer(config.optimizer, int(config.total_steps), params)
        state = init_state(config, mesh, tx, params)
        del params
        if start:
            target = abstract_like(state)
            del state
            state, _ = ckpt.restore(start, target, data)
        metadata = dict(config=json.loads(config.to_json_best_effort()), sources=data.names,
                        tokenizer=os.path.abspath(data.tokenizer.path),
                        tokenizer_vocab_size=data.tokenizer.vocab_size, stats=data.stats)
        # Pinned output shardings: the state keeps its layout step after step, and the metrics
        # are replicated so every process can read them.
        replicated = NamedSharding(mesh, PartitionSpec())
        train_step = jax.jit(make_train_step(config, graphdef, tx, len(data.names)), donate_argnums=0,
                             out_shardings=(jax.tree.map(lambda x: x.sharding, state), replicated))
    return Run(data, mesh, rules, graphdef, state, train_step, ckpt, metadata, start)


def train(config, workdir: str, eval_hooks: Sequence[EvalHook] = ()) -> dict[str, float]:
    """Trains to config.total_steps (or until SIGTERM); returns the last logged metrics."""
    run = prepare(config, workdir)
    if config.sim_eval.tasks:  # closed-loop Meta-World success rates; imports MuJoCo only when on
        from vla import sim_eval
        eval_hooks = (*eval_hooks, sim_eval.make_hook(config, run.metadata, os.path.join(workdir, "sim_eval")))
    writer = MetricsWriter(workdir, jax.process_index() == 0, run.start)
    with jax.set_mesh(run.mesh), nnx.logical_axis_rules(run.rules):
        evaluator = (Evaluator(config, run.graphdef, run.mesh, pipeline_lib.make_pipeline(config, "heldout"),
                               eval_hooks) if config.eval_batches else None)
        try:
            return _loop(config, workdir, run.state, run.data, run.train_step, evaluator, run.ckpt, writer,
                         run.metadata, run.start, run.mesh)
        finally:
            run.ckpt.wait()
            run.ckpt.close()
            writer.close()


def _loop(config, workdir, state, data, train_step, evaluator: Evaluator | None, ckpt, writer,
          metadata, start, mesh) -> dict[str, float]:
    chief, total = jax.process_index() == 0, int(config.total_steps)
    stop, interval = _Stop(), Interval(data.names)
    peak = peak_flops(config)
    last: dict[str, float] = {}
    pending = None  # (step, metrics, data wait): fetched one step late so host and device overlap
    bar = tqdm(total=total, initial=start, disable=not chief, desc="train", dynamic_ncols=True)

    def settle():
        """Pulls the pending step's metrics (waits for that step), checks them for NaN/Inf."""
        nonlocal pending
        if pending is not None:
            step, m, wait = pending
            pending = None
            interval.add(step, jax.device_get(m), wait)
            bar.update(1)

    def log(step):
        nonlocal last
        last = interval.summary()
        last.update(throughput(config, last["step_time_s"], peak))
        last.update(data.metrics())
        writer.write(step, last)
        bar.set_postfix(loss=f"{last['loss']:.4f}", refresh=False)
        interval.reset()

    def save(step):
        ckpt.save(step, state, data, metadata)
        writer.plot(os.path.join(workdir, "loss.png"))

    for step in range(start + 1, total + 1):
        t0 = time.perf_counter()
        batch = global_batch(next(data), mesh)
        wait = time.perf_counter() - t0
        state, metrics = train_step(state, batch)
        settle()
        pending = (step, metrics, wait)
        preempted = stop.requested or ckpt.reached_preemption(step)
        boundary = step % config.log_every == 0 or step == total or preempted
        if boundary or step % config.checkpoint_every == 0 or step % config.eval_every == 0:
            settle()  # a bad step must raise before its state is saved
            if interval.steps and boundary:
                log(step)
        paused = time.perf_counter()  # evaluation and saving do not count as step time
        if evaluator and (step % config.eval_every == 0 or step == total):
            results = evaluator(step, state.get("ema", state["params"]))
            writer.write(step, results)
            if chief:
                tqdm.write(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(results.items())))
            last.update(results)
        if step % config.checkpoint_every == 0 or step == total or preempted:
            save(step)
        interval.start += time.perf_counter() - paused
        if preempted:
            if chief:
                tqdm.write(f"stopping at step {step} (preempted); checkpoint saved")
            break
    bar.close()
    return last


# ------------------------------------------------------------------------------- command line

def main(argv: Sequence[str]) -> None:
    from absl import flags, logging

    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax and TFDS narrate every file at INFO
    initialize_distributed()
    train(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Run config file (configs/*.py[:arg]).",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Checkpoints, metrics and the resolved config go here.")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
