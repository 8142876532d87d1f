"""Benchmark a config's model on one device: compile time, train-step time, sample_actions latency,
peak memory. Wall time is shown beside process CPU time, because CPU timings swing with load.

    python -m tools.bench_model --config configs/pi0.py [--batch_size N] [--config.x=...]

CPU at openpi's debug shapes (So400m/14 at 224², 3 cameras, 64-wide Gemmas):
    python -m tools.bench_model --config configs/pi0.py --config.knobs.vlm=gemma_debug \
        --config.knobs.action_expert=gemma_debug_expert --config.model.vocab_size=1024 \
        --config.model.compute_dtype=float32 --batch_size 2

The train step is a jitted value_and_grad of model.loss plus an optax AdamW update on a random
batch of the config's shapes (the design's batch contract), parameters and optimizer state
donated as in a real trainer.
"""
from __future__ import annotations

import functools
import resource
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx

from configs import cli, specs
from vla.models.vla import VLA, random_batch


def _timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """(wall s, process CPU s, result) of fn, waiting for device work to finish."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = jax.block_until_ready(fn())
    return time.perf_counter() - wall, time.process_time() - cpu, out


def peak_memory() -> tuple[float, str]:
    """Peak device memory on accelerators; on CPU the process's max resident set size."""
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"], "device peak_bytes_in_use"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process max RSS"  # KiB on Linux


def benchmark(spec: specs.RunSpec, batch_size: int, steps: int, samples: int) -> dict[str, Any]:
    """Times compile, train steps and batch-1 sampling: rows {name: (wall s, cpu s)}, loss, params,
    peak memory."""
    cfg = spec.model
    graphdef, params = nnx.split(VLA(cfg, rngs=nnx.Rngs(spec.train.seed)))
    tx = optax.adamw(spec.optimizer.lr, weight_decay=spec.optimizer.weight_decay)
    opt_state = tx.init(params)
    batch = jax.tree.map(jnp.asarray, random_batch(cfg, batch_size))

    def train_step(params, opt_state, batch, rng):
        def loss_fn(p):
            return nnx.merge(graphdef, p).loss(batch, rng)[0]
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def sample(params, batch, rng):
        return nnx.merge(graphdef, params).sample_actions(batch, rng=rng, num_steps=spec.control.flow_steps)

    one = jax.tree.map(lambda x: x[:1], batch)
    rows: dict[str, tuple[float, float]] = {}
    rng = jax.random.key(0)
    wall, cpu, step = _timed(
        lambda: jax.jit(train_step, donate_argnums=(0, 1)).lower(params, opt_state, batch, rng).compile())
    rows["compile train step"] = (wall, cpu)
    wall, cpu, infer = _timed(lambda: jax.jit(sample).lower(params, one, rng).compile())
    rows["compile sample_actions"] = (wall, cpu)

    times = []
    for i in range(steps + 1):  # the first call is warmup
        wall, cpu, (params, opt_state, loss) = _timed(functools.partial(step, params, opt_state, batch,
                                                                        jax.random.key(i)))
        times.append((wall, cpu))
    walls, cpus = np.array(times[1:]).T
    rows[f"train step, batch {batch_size} (median of {steps})"] = (np.median(walls), np.median(cpus))

    times = [_timed(functools.partial(infer, params, one, jax.random.key(i)))[:2] for i in range(samples + 1)]
    walls, cpus = np.array(times[1:]).T
    rows[f"sample_actions, batch 1 (median of {samples})"] = (np.median(walls), np.median(cpus))
    rows["sample_actions, batch 1 (p99)"] = (np.percentile(walls, 99), np.percentile(cpus, 99))
    params_count = sum(x.size for x in jax.tree.leaves(params))
    return dict(rows=rows, loss=float(loss), params=params_count, memory=peak_memory(), cfg=cfg)


def format_table(result: dict[str, Any], device: str) -> str:
    cfg = result["cfg"]
    lines = [f"device {device}; {result['params']:,} parameters; ViT {cfg.vit} at {cfg.image_size}² x "
             f"{len(cfg.cameras)} cameras x {cfg.context_frames} frames; {cfg.vlm} + {cfg.action_expert}; "
             f"horizon {cfg.action_horizon}, action dim {cfg.action_dim}; {cfg.compute_dtype}",
             f"{'':44} {'wall':>10} {'cpu':>10}"]
    lines += [f"{name:44} {wall:>9.3f}s {cpu:>9.3f}s" for name, (wall, cpu) in result["rows"].items()]
    peak, how = result["memory"]
    lines += [f"{'peak memory (' + how + ')':44} {peak / 2**30:>8.2f}GiB", f"final loss {result['loss']:.4f}"]
    return "\n".join(lines)


def main(argv):
    """Runs the benchmark and prints the table."""
    del argv
    f = flags.FLAGS
    spec = specs.build(f.config)
    result = benchmark(spec, f.batch_size or spec.train.batch_size, f.steps, f.samples)
    device = jax.devices()[0]
    print(format_table(result, f"{device.platform} ({device.device_kind}, {jax.device_count()} devices visible)"))


def define_flags() -> None:
    """The command line: python -m tools.bench_model --help."""
    cli.define_config_flag("Config file, configs/FILE.py or configs/FILE.py:ARG "
                           "(required); override its values with --config.KEY=VALUE.", lock_config=False)
    flags.DEFINE_integer("batch_size", None, "Batch size of the timed train step (default: config.batch_size); "
                         "sampling is timed at batch 1.")
    flags.DEFINE_integer("steps", 3, "Timed train steps (after one untimed warmup step).")
    flags.DEFINE_integer("samples", 5, "Timed sample_actions calls (after one untimed warmup call).")
    flags.mark_flag_as_required("config")


if __name__ == "__main__":
    define_flags()
    app.run(main)
