"""The trainer: python -m vla.train --config configs/FILE.py[:arg] --workdir DIR [--config.key=value]

Resumes from the newest checkpoint in DIR/checkpoints (refused, in words, when it holds another
model config), then writes the resolved config to DIR/config.json. DIR may be a gs:// URL
(data/storage.py); a scheme that cannot be written fails before any work. Every process of a
multi-host run runs this same program (jax.distributed is initialized from
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID when set); each feeds its own slice
of the data, process 0 alone writes metrics and plots.

A step is a pure function (state, batch) -> (state, metrics), jitted with the state donated. The
state is {"step", "params", "opt_state"[, "ema"]} over the model's pure parameter dict; the
flow-matching noise of a step is drawn from (seed, step), so a resumed run continues with
exactly the numbers an uninterrupted one would have used.

The config is read once, into typed specs (configs/specs.py); everything below takes those.
`prepare` builds a `Run` (data, mesh, sharded state, jitted step); `train(run, eval_hooks)`
runs it. The command line adds the closed-loop Meta-World hook when config.sim_eval.tasks is set.

Each checkpoint is saved before the evaluation of its step, and a failing evaluation is logged
and counted (eval/failures), never fatal. Stops: at total_steps; on SIGTERM (all processes save
at the same step, then exit 0); on a NaN or Inf loss, gradient or parameter after the update
(raises FloatingPointError naming the step, without saving that state, so every checkpoint on
disk is finite); on a data error that is not skipped (strict mode), with the step noted.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from configs import cli
from configs import specs as specs_lib
from data import pipeline as pipeline_lib
from data import storage
from data.spec import AugmentSpec
from vla import augment as augment_lib
from vla import cost, sharding
from vla import optimizer as optimizer_lib
from vla.checkpoint import Checkpointer, abstract_like
from vla.evaluator import EvalHook, Evaluator
from vla.metrics import MetricsWriter, read_rows
from vla.models.vla import LOSSES, SCALAR_METRICS, VLA, VLAConfig, per_source_key
from vla.weights import load as weights

Batch = dict[str, Any]
State = dict[str, Any]


# ------------------------------------------------------------------------------- validation

def validate_data(model: VLAConfig, tokenizer_vocab_size: int) -> None:
    if model.vocab_size < tokenizer_vocab_size:
        raise ValueError(f"model.vocab_size={model.vocab_size} is smaller than the tokenizer's "
                         f"vocab_size={tokenizer_vocab_size}")


def validate_mesh(spec: specs_lib.RunSpec, mesh: jax.sharding.Mesh) -> None:
    shards = sharding.batch_shards(mesh, spec.mesh.rules)
    micro = spec.train.batch_size // spec.optimizer.grad_accum_steps
    if micro % shards:
        raise ValueError(f"a microbatch of {micro} examples does not divide over the "
                         f"{shards} {' x '.join(spec.mesh.batch_axes)} shards of mesh "
                         f"{dict(mesh.shape)}")


# ------------------------------------------------------------------------------- multi-host

def initialize_distributed() -> None:
    """jax.distributed from the launcher's environment; a single process needs nothing."""
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address:
        jax.distributed.initialize(address, int(os.environ["JAX_NUM_PROCESSES"]),
                                   int(os.environ["JAX_PROCESS_ID"]))


def microbatches(batch: Batch, n: int) -> Batch:
    """[B, ...] -> [n, B/n, ...], microbatch i = examples i, i+n, ...: every device's shard
    contributes to every microbatch (a contiguous split makes XLA rematerialize under FSDP)."""
    return jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1),
                        batch)


# ------------------------------------------------------------------------------- state and step

def state_builder(optimizer: optimizer_lib.OptimizerSpec, tx: optax.GradientTransformation,
                  param_shardings: Any) -> Callable[[Any], State]:
    """params -> the training state: optimizer state and EMA next to the parameters, every
    moment sharded as its parameter (`param_shardings`: the parameters' NamedShardings). The
    EMA covers the trainable parameters only (a frozen one's average is itself):
    `optimizer_lib.overlay(params, ema)` are the averaged weights."""

    def build(params):
        # Moments start as zeros, which carry no sharding of their own: without the constraint
        # XLA replicates them, four times the FSDP-sharded parameters on a v5p-8 at π0's size.
        opt_state = shard_like_params(tx.init(params), param_shardings)
        state = dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state)
        if optimizer.ema_decay > 0:
            trainable = optimizer_lib.trainable_mask(params, optimizer.freeze, optimizer.also_train)
            state["ema"] = jax.tree.map(jnp.copy, optimizer_lib.select(params, trainable))
        return state

    return build


def shard_like_params(opt_state: Any, param_shardings: Any) -> Any:
    """Constrains every optimizer-state leaf that stands for a parameter (its path ends in the
    parameter's keys, e.g. opt_state[1][0].mu["decoder"]["embedder"], also inside
    multi_transform's per-label states) to that parameter's sharding; counts stay as they are."""
    by_keys = {tuple(k.key for k in path): sharding_ for path, sharding_ in
               jax.tree_util.tree_flatten_with_path(param_shardings)[0]
               if isinstance(sharding_, NamedSharding)}  # a parameter on one device leaves XLA free

    def place(path, leaf):
        keys = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
        for start in range(len(keys)):  # leading keys of the optimizer's own (multi_transform labels)
            if keys[start:] in by_keys:
                return jax.lax.with_sharding_constraint(leaf, by_keys[keys[start:]])
        return leaf

    return jax.tree_util.tree_map_with_path(place, opt_state)


def init_state(optimizer: optimizer_lib.OptimizerSpec, mesh: jax.sharding.Mesh,
               tx: optax.GradientTransformation, params: Any) -> State:
    """The training state around the (already sharded) parameters, which it consumes."""
    with jax.set_mesh(mesh):
        return jax.jit(state_builder(optimizer, tx, jax.tree.map(lambda x: x.sharding, params)),
                       donate_argnums=0)(params)


def _count_nonfinite(state: State) -> jax.Array:
    """NaN or Inf values among a state's parameters and EMA (int32 scalar)."""
    trees = [state["params"], state.get("ema", {})]
    return sum((jnp.sum(~jnp.isfinite(x)) for x in jax.tree.leaves(trees)), jnp.zeros((), jnp.int32))


def make_train_step(optimizer: optimizer_lib.OptimizerSpec, seed: int, graphdef: nnx.GraphDef,
                    tx: optax.GradientTransformation, num_sources: int,
                    augment: AugmentSpec | None = None, cameras: tuple[str, ...] = (),
                    robot_sources: tuple[int, ...] = ()
                    ) -> Callable[[State, Batch], tuple[State, dict]]:
    """The step: augment the robot rows' images (vla/augment.py; `cameras` in the layout's
    order), then loss, gradients (accumulated over microbatches) and the optimizer update."""
    accum = optimizer.grad_accum_steps
    schedule = optimizer_lib.learning_rate(optimizer)

    def loss_fn(trainable, params, batch, rng):
        """The loss as a function of the trainable subtree: no gradient of a frozen weight is
        ever computed (with LoRA, the backward pass runs for activations and adapters only)."""
        return nnx.merge(graphdef, optimizer_lib.overlay(params, trainable)).loss(batch, rng, num_sources)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def sums(m):
        """Per-source (loss x count, count): they add up across microbatches."""
        return {name: (m[per_source_key(name, "loss")] * m[per_source_key(name, "count")],
                       m[per_source_key(name, "count")]) for name in LOSSES}

    def train_step(state: State, batch: Batch) -> tuple[State, dict]:
        rng = jax.random.fold_in(jax.random.key(seed), state["step"])
        if augment is not None:
            batch = augment_lib.augment_batch(augment, batch, seed, state["step"], cameras, robot_sources)
        params = state["params"]
        mask = optimizer_lib.trainable_mask(params, optimizer.freeze, optimizer.also_train)
        trainable = optimizer_lib.select(params, mask)
        if accum == 1:
            (_, m), grads = grad_fn(trainable, params, batch, rng)
            scalars = {k: m[k] for k in SCALAR_METRICS}
            per_source = sums(m)
        else:
            def body(carry, xs):
                i, micro = xs
                (_, m), g = grad_fn(trainable, params, micro, jax.random.fold_in(rng, i))
                step_out = (g, {k: m[k] for k in SCALAR_METRICS}, sums(m))
                return jax.tree.map(jnp.add, carry, step_out), None

            first = (jax.tree.map(jnp.zeros_like, trainable),
                     {k: jnp.zeros((), jnp.float32) for k in SCALAR_METRICS},
                     {name: (jnp.zeros((num_sources,), jnp.float32),) * 2 for name in LOSSES})
            (grads, scalars, per_source), _ = jax.lax.scan(
                body, first, (jnp.arange(accum), microbatches(batch, accum)))
            grads = jax.tree.map(lambda g: g / accum, grads)
            scalars = jax.tree.map(lambda s: s / accum, scalars)
        # The optimizer takes whole trees: frozen leaves get zero gradients (constants it
        # discards) and their parameters pass through untouched.
        all_grads = optimizer_lib.overlay(jax.tree.map(jnp.zeros_like, params), grads)
        updates, opt_state = tx.update(all_grads, state["opt_state"], params)
        updates = optimizer_lib.select(updates, mask)
        new_trainable = optax.apply_updates(trainable, updates)
        new_state = dict(step=state["step"] + 1, params=optimizer_lib.overlay(params, new_trainable),
                         opt_state=opt_state)
        if "ema" in state:
            new_state["ema"] = optimizer_lib.ema_update(state["ema"], new_trainable, optimizer.ema_decay,
                                                        state["step"])
        metrics = dict(scalars, grad_norm=optax.tree.norm(grads), update_norm=optax.tree.norm(updates),
                       lr=schedule(state["step"]), nonfinite_params=_count_nonfinite(new_state))
        for name, (total, count) in per_source.items():
            metrics[per_source_key(name, "sum")], metrics[per_source_key(name, "count")] = total, count
        return new_state, metrics

    return train_step


def jit_train_step(spec: specs_lib.RunSpec, mesh: jax.sharding.Mesh, graphdef: nnx.GraphDef,
                   tx: optax.GradientTransformation, num_sources: int, state_shardings: Any
                   ) -> Callable[[State, Batch], tuple[State, dict]]:
    """The jitted step the trainer runs (and tools.aot compiles for a TPU topology): the state
    donated, its output shardings pinned so it keeps its layout step after step, the metrics
    replicated so every process can read them."""
    step_fn = make_train_step(spec.optimizer, spec.train.seed, graphdef, tx, num_sources,
                              spec.data.augment, spec.model.cameras, spec.data.robot_source_ids)
    return jax.jit(step_fn, donate_argnums=0,
                   out_shardings=(state_shardings, NamedSharding(mesh, PartitionSpec())))


def make_model(spec: specs_lib.RunSpec) -> VLA:
    """A new model of the run's config, drawn from its seed (call under sharding.init_sharded
    or sharding.abstract_model)."""
    return VLA(spec.model, rngs=nnx.Rngs(spec.train.seed))


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
        # The loss and gradient come from the parameters before the update; the count covers the
        # parameters (and EMA) the step leaves behind, which a save would write.
        bad = [f"{key} is {float(m[key])}" for key in ("loss", "grad_norm") if not np.isfinite(m[key])]
        if m["nonfinite_params"]:
            bad.append(f"{int(m['nonfinite_params'])} parameter values are not finite after the update")
        if bad:
            raise FloatingPointError(f"step {step}: {'; '.join(bad)}; stopping (the last checkpoint "
                                     f"holds the last good state)")
        self.steps += 1
        self.data_wait += data_wait
        for k, v in m.items():
            if np.ndim(v) == 0:
                self._scalars[k] = self._scalars.get(k, 0.0) + float(v)
            else:
                self._per_source[k] = self._per_source.get(k, 0.0) + np.asarray(v, np.float64)

    def state(self) -> dict[str, Any]:
        """The sums so far (JSON): a run stopped mid-interval saves them, so that after the
        resume the interval's log row averages the same steps as an uninterrupted run's."""
        return dict(steps=self.steps, data_wait=self.data_wait, scalars=self._scalars,
                    per_source={k: v.tolist() for k, v in self._per_source.items()})

    def restore(self, state: dict[str, Any]) -> None:
        self.steps, self.data_wait = state["steps"], state["data_wait"]
        self._scalars = dict(state["scalars"])
        self._per_source = {k: np.asarray(v, np.float64) for k, v in state["per_source"].items()}

    def summary(self) -> dict[str, float]:
        out = {k: v / self.steps for k, v in self._scalars.items()}
        for loss in LOSSES:
            total = self._per_source[per_source_key(loss, "sum")]
            count = self._per_source[per_source_key(loss, "count")]
            out.update({f"{loss}_loss/{n}": total[i] / count[i] for i, n in enumerate(self._names) if count[i]})
        elapsed = time.perf_counter() - self.start
        out["step_time_s"] = elapsed / self.steps
        out["data_wait_s"] = self.data_wait / self.steps
        return out


def throughput(model: VLAConfig, batch_size: int, step_time: float, peak_flops: float
               ) -> dict[str, float]:
    """Examples/s, model tokens/s and MFU from the analytic FLOPs of a training example."""
    examples = batch_size / step_time
    return {"examples_per_s": examples,
            "tokens_per_s": examples * (cost.prefix_len(model) + cost.suffix_len(model)),
            "mfu": cost.train_flops_per_example(model) * examples / peak_flops}


def peak_flops(chip: str) -> float:
    """The run's peak FLOP/s: every device's, or this machine's measured CPU throughput (the
    forced host devices of a CPU run share the same cores)."""
    if chip == "cpu":
        return cost.get_chip("cpu").peak_flops
    return cost.chip_peak_flops(chip) * jax.device_count()


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


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_model_matches(ckpt: Checkpointer, step: int, params: Any, config: dict, what: str) -> None:
    """Raises ValueError, in words, when the parameters of checkpoint `step` do not fit this
    config's model: which parameters differ and which model keys of the two configs differ.
    Reads metadata only, so a mismatch costs no restore (and leaves the workdir untouched)."""
    mismatches = ckpt.shape_mismatches(step, "params", params)
    if not mismatches:
        return
    theirs, ours = _flat(ckpt.saved_config(step)), _flat(config)
    keys = [k for k in sorted(set(theirs) | set(ours))
            if k.startswith(("model.", "knobs.")) and theirs.get(k) != ours.get(k)]
    shown = "\n  ".join(mismatches[:5]) + (f"\n  ... and {len(mismatches) - 5} more"
                                           if len(mismatches) > 5 else "")
    differ = "; ".join(f"{k}: {theirs.get(k)!r} there, {ours.get(k)!r} here" for k in keys) \
        or "no model or knobs key (the model code changed)"
    raise ValueError(f"{what} (step {step}) came from another model config, so its parameters "
                     f"cannot be loaded into this one:\n  {shown}\nConfig keys that differ: {differ}.\n"
                     f"Use the config it was trained with, or another --workdir.")


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    if jax.process_index() == 0:
        (storage.path(workdir) / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))


@dataclasses.dataclass
class Run:
    """Everything the training loop needs, built by `prepare` (state restored when resuming).

    spec.model is the config's model with what the data decides (the FAST id range) filled in.
    """

    spec: specs_lib.RunSpec
    workdir: str
    data: pipeline_lib.Pipeline
    mesh: jax.sharding.Mesh
    graphdef: nnx.GraphDef
    state: State
    train_step: Callable[[State, Batch], tuple[State, dict]]
    ckpt: Checkpointer
    metadata: dict
    start: int
    interval: dict | None = None  # the log interval's sums when the restored save was mid-interval


def prepare(config: ml_collections.ConfigDict, workdir: str) -> Run:
    """Builds the specs (refusing knobs that cannot work), opens the data, builds the mesh and
    the directly sharded state (the newest checkpoint in workdir, or a new one with config.init's
    weight sources applied; their report goes to WORKDIR/init.json) and jits the train step."""
    spec = specs_lib.build(config)
    specs_lib.validate_training(spec)
    weights.check_prompt_format(spec.train.init, spec.data.prompt_format)
    storage.check_writable(workdir)  # a bad URL or bucket fails here, before any work
    if spec.data.root is not None:  # a gs:// root staged once, for the train and held-out pipelines
        spec = dataclasses.replace(spec, data=dataclasses.replace(spec.data, root=storage.stage(spec.data.root)))
    data = pipeline_lib.make_pipeline(spec.data, "train", process_index=jax.process_index(),
                                      process_count=jax.process_count())
    validate_data(spec.model, data.tokenizer.vocab_size)
    # FAST action targets (π0.5) get ids the tokenizer reserves; the action expert must not see them.
    spec = dataclasses.replace(spec, model=dataclasses.replace(
        spec.model, fast_token_start=data.fast_token_start))
    mesh = sharding.make_mesh(spec.mesh.axes)
    validate_mesh(spec, mesh)
    rules = spec.mesh.rules
    config_dict = json.loads(config.to_json_best_effort())

    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        model = sharding.init_sharded(lambda: make_model(spec), mesh, rules)
        graphdef, params = nnx.split(model)
        params = nnx.to_pure_dict(params)
        del model
        ckpt = Checkpointer(storage.join(workdir, "checkpoints"), spec.train.keep_checkpoints)
        start = ckpt.latest_step() or 0
        if start:
            check_model_matches(ckpt, start, abstract_like(params), config_dict,
                                f"the checkpoint in {storage.join(workdir, 'checkpoints')}")
        elif spec.train.init:
            params, reports = weights.init_params(spec.train.init, spec.model, params)
            if jax.process_index() == 0:
                (storage.path(workdir) / "init.json").write_text(json.dumps(reports, indent=2) + "\n")
        tx = optimizer_lib.make_optimizer(spec.optimizer, params)
        state = init_state(spec.optimizer, mesh, tx, params)
        del params
        if start:
            target = abstract_like(state)
            del state
            state, saved = ckpt.restore(start, target, data)
        metadata = dict(config=config_dict, sources=data.names,
                        tokenizer=os.path.abspath(data.tokenizer.path),
                        tokenizer_vocab_size=data.tokenizer.vocab_size,
                        fast_token_start=data.fast_token_start, stats=data.stats)
        train_step = jit_train_step(spec, mesh, graphdef, tx, len(data.names),
                                    jax.tree.map(lambda x: x.sharding, state))
    # Only now, with the checkpoint known to fit: the workdir's config.json describes its checkpoints.
    write_config(config, workdir)
    return Run(spec, workdir, data, mesh, graphdef, state, train_step, ckpt, metadata, start,
               saved.get("interval") if start else None)


def train(run: Run, eval_hooks: Sequence[EvalHook] = ()) -> dict[str, float]:
    """Trains a prepared run to total_steps (or until SIGTERM); returns the last logged metrics.
    eval_hooks run at every evaluation (vla/evaluator.py)."""
    spec = run.spec
    writer = MetricsWriter(run.workdir, jax.process_index() == 0, run.start, spec.metrics,
                           run.metadata["config"])
    with jax.set_mesh(run.mesh), nnx.logical_axis_rules(spec.mesh.rules):
        evaluator = None
        if spec.train.eval_batches:
            heldout = pipeline_lib.make_pipeline(spec.data, "eval", process_index=jax.process_index(),
                                                 process_count=jax.process_count())
            evaluator = Evaluator(run.graphdef, run.mesh, spec.mesh.rules, heldout,
                                  batches=spec.train.eval_batches, seed=spec.train.seed,
                                  flow_steps=spec.control.flow_steps,
                                  action_dim=spec.model.action_dim, hooks=eval_hooks)
        try:
            return _loop(run, evaluator, writer)
        finally:
            run.ckpt.wait()
            run.ckpt.close()
            writer.close()


def _evaluated(workdir: str, step: int) -> bool:
    """Whether WORKDIR/metrics.jsonl holds the evaluation of `step` (every process reads it, so
    all agree on whether to run an evaluation they must enter together)."""
    rows = read_rows(storage.path(workdir) / "metrics.jsonl")
    return any(r["step"] == step and any(k.startswith("eval/") for k in r) for r in rows)


def _loop(run: Run, evaluator: Evaluator | None, writer: MetricsWriter) -> dict[str, float]:
    t, data, ckpt = run.spec.train, run.data, run.ckpt
    state = run.state
    chief, total = jax.process_index() == 0, t.total_steps
    stop, interval = _Stop(), Interval(data.names)
    if run.interval:
        interval.restore(run.interval)
    peak = peak_flops(t.chip)
    last: dict[str, float] = {}
    pending = None  # (step, metrics, data wait): fetched one step late so host and device overlap
    bar = tqdm(total=total, initial=run.start, disable=not chief, desc="train", dynamic_ncols=True)
    batch_sharding = sharding.batch_sharding(run.mesh, run.spec.mesh.rules)

    def settle(draw: bool = True):
        """Pulls the pending step's metrics (waits for that step), checks them for NaN/Inf;
        draw=False leaves advancing the bar to log(), which first sets the step's loss."""
        nonlocal pending
        if pending is not None:
            step, m, wait = pending
            pending = None
            interval.add(step, jax.device_get(m), wait)
            if draw:
                bar.update(1)

    def log(step):
        nonlocal last
        last = interval.summary()
        last.update(throughput(run.spec.model, t.batch_size, last["step_time_s"], peak))
        last.update(data.metrics())
        writer.write(step, last)
        bar.set_postfix(loss=f"{last['loss']:.4f}", refresh=False)
        bar.update(1)  # the bar reaches this step showing this step's loss
        interval.reset()

    def run_evaluation(step):
        results = evaluator(step, optimizer_lib.overlay(state["params"], state["ema"]) if "ema" in state
                            else state["params"])
        writer.write(step, results)
        if chief:
            tqdm.write(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(results.items())))
        last.update(results)

    # A run killed between a save and the evaluation of that step evaluates it now.
    if (evaluator and run.start and (run.start % t.eval_every == 0 or run.start == total)
            and not _evaluated(run.workdir, run.start)):
        run_evaluation(run.start)

    for step in range(run.start + 1, total + 1):
        t0 = time.perf_counter()
        try:
            batch = sharding.global_batch(next(data), batch_sharding)
        except Exception as e:
            e.add_note(f"(while reading the batch of training step {step})")
            raise
        wait = time.perf_counter() - t0
        state, metrics = run.train_step(state, batch)
        settle()
        pending = (step, metrics, wait)
        preempted = stop.requested or ckpt.reached_preemption(step)
        # A preempted step is not a log step: its partial interval is saved and continued.
        boundary = step % t.log_every == 0 or step == total
        save = step % t.checkpoint_every == 0 or step == total or preempted
        evaluate = evaluator is not None and (step % t.eval_every == 0 or step == total)
        if boundary or save or evaluate:
            settle(draw=not boundary)  # a bad step must raise before its state is saved
            if boundary:
                log(step)
        paused = time.perf_counter()  # evaluation and saving do not count as step time
        # Saved before evaluating: no evaluation failure can cost training work.
        if save:
            ckpt.save(step, state, data, dict(run.metadata, interval=interval.state()) if interval.steps
                      else run.metadata)
        if evaluate:
            run_evaluation(step)
        if save:
            writer.plot(storage.join(run.workdir, "loss.png"))
        interval.start += time.perf_counter() - paused
        if preempted:
            if chief:
                tqdm.write(f"stopping at step {step} (preempted); checkpoint saved")
            break
    bar.close()
    return last


# ------------------------------------------------------------------------------- command line

def main(argv: Sequence[str]) -> None:
    """Trains config in workdir (resuming from its newest checkpoint), as this process's share of the job."""
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax and TFDS narrate every file at INFO
    initialize_distributed()
    f = flags.FLAGS
    run = prepare(f.config, f.workdir)
    hooks = []
    if run.spec.sim_eval.tasks:
        from vla import sim_eval  # MuJoCo: imported only when closed-loop evaluation is on
        hooks.append(sim_eval.make_hook(run.spec, run.metadata, storage.join(f.workdir, "sim_eval")))
    train(run, hooks)


def define_flags() -> None:
    """The command line: python -m vla.train --help."""
    cli.define_config_flag("Run config file, configs/FILE.py or configs/FILE.py:ARG "
                           "(required); override its values with --config.KEY=VALUE.")
    flags.DEFINE_string("workdir", None, "The run's directory (required): checkpoints/, metrics, plots and the "
                        "resolved config.json go here; training resumes from its newest checkpoint.")
    flags.mark_flags_as_required(["config", "workdir"])


if __name__ == "__main__":
    define_flags()
    app.run(main)
