"""Benchmark a config's real trainer: steps/s, examples/s, MFU, data wait, checkpoint saves, compile.

    python -m tools.bench_train --config configs/demo.py --config.data.root=runs/demo/data \
        [--steps 30] [--warmup 3] [--saves 2] [--workdir DIR] [--config.x=...]

The pieces are vla.train's own: the config's pipeline, mesh, sharded init, optimizer and state,
the jitted train step with the state donated and the output shardings pinned, and the
Checkpointer, run in a temporary workdir (or --workdir, which must not hold checkpoints). The
timed loop is the trainer's: each step's metrics are fetched one step late, so host work (the
next batch) overlaps the device's; a step's time is the interval between consecutive loop
iterations, and its data wait is the time blocked in next(pipeline) (plus making global arrays).

A checkpoint save is timed twice: the blocking part (how long ckpt.save holds the training loop:
copying the arrays to host, the data-iterator state, the metadata) and until the asynchronous
write is on disk (ckpt.wait()). Wall time is shown beside process CPU time (all threads), because
CPU timings swing with load.
"""
from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from flax import nnx

from configs import cli
from vla import sharding
from vla import train as train_lib


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float]) -> tuple[float, float]:
    wall, cpu = _clock()
    return wall - start[0], cpu - start[1]


def _timed(fn: Callable[[], Any]) -> tuple[tuple[float, float], Any]:
    """((wall s, process CPU s), result) of fn, waiting for device work to finish."""
    start = _clock()
    out = jax.block_until_ready(fn())
    return _since(start), out


def benchmark(config: ml_collections.ConfigDict, steps: int = 30, warmup: int = 3, saves: int = 2,
              workdir: str | None = None) -> dict[str, Any]:
    """Rows {name: (wall s, cpu s)} and rates {name: value} of the config's trainer."""
    if steps < 1 or warmup < 0 or saves < 0:
        raise ValueError(f"need steps >= 1, warmup >= 0, saves >= 0; got {steps}, {warmup}, {saves}")
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        return _benchmark(config, steps, warmup, saves, workdir or tmp)


def _benchmark(config: ml_collections.ConfigDict, steps: int, warmup: int, saves: int, workdir: str) -> dict[str, Any]:
    rows: dict[str, tuple[float, float]] = {}
    start = _clock()
    run = train_lib.prepare(config, workdir)
    rows["setup: pipeline, sharded init, optimizer state"] = _since(start)
    if run.start:
        raise ValueError(f"{workdir} already holds checkpoints; benchmark in an empty workdir")
    data, mesh, ckpt, state = run.data, run.mesh, run.ckpt, run.state
    try:
        rules = run.spec.mesh.rules
        batch_sharding = sharding.batch_sharding(mesh, rules)
        with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
            batch = sharding.global_batch(next(data), batch_sharding)
            rows["compile train step"], step_fn = _timed(
                lambda: run.train_step.lower(state, batch).compile())

            # The trainer's loop: dispatch step i, then fetch step i-1's metrics.
            marks, waits, pending, loss = [], [], None, float("nan")
            for i in range(warmup + steps + 1):
                marks.append(_clock())
                if i == warmup + steps:
                    break
                t0 = time.perf_counter()
                if i:  # the first batch is the one compiled against
                    batch = sharding.global_batch(next(data), batch_sharding)
                waits.append(time.perf_counter() - t0)
                state, metrics = step_fn(state, batch)
                if pending is not None:
                    loss = float(jax.device_get(pending)["loss"])
                pending = metrics
            loss = float(jax.device_get(pending)["loss"])
            marks[-1] = _clock()  # the last interval ends when its step has finished
            walls = np.diff([m[0] for m in marks])[warmup:]
            cpus = np.diff([m[1] for m in marks])[warmup:]
            waits_t = np.array(waits[warmup:])
            step_wall, step_cpu = float(np.median(walls)), float(np.median(cpus))
            rows[f"train step (median of {steps})"] = (step_wall, step_cpu)
            rows["  data wait in next(pipeline) (median)"] = (float(np.median(waits_t)), float("nan"))

            save_rows = []
            for k in range(saves):
                jax.block_until_ready(state)
                step = warmup + steps + k
                t0 = _clock()
                ckpt.save(step, state, data, run.metadata)
                blocking = _since(t0)
                ckpt.wait()
                save_rows.append((blocking, _since(t0)))
                if k + 1 < saves:  # a new step to save: one more train step
                    state, _ = step_fn(state, sharding.global_batch(next(data), batch_sharding))
            if save_rows:
                block = np.median([r[0] for r in save_rows], axis=0)
                total = np.median([r[1] for r in save_rows], axis=0)
                rows[f"checkpoint save, blocking (median of {saves})"] = tuple(map(float, block))
                rows[f"checkpoint save, until on disk (median of {saves})"] = tuple(map(float, total))
                rows["checkpoint save, first: blocking"] = save_rows[0][0]
                rows["checkpoint save, first: until on disk"] = save_rows[0][1]
    finally:
        ckpt.wait()
        ckpt.close()

    t = run.spec.train
    peak = train_lib.peak_flops(t.chip)
    tp = train_lib.throughput(run.spec.model, t.batch_size, step_wall, peak)
    rates = {"steps/s": 1.0 / step_wall, "examples/s": tp["examples_per_s"],
             "tokens/s": tp["tokens_per_s"], "MFU": tp["mfu"],
             "data-wait fraction": float(waits_t.sum() / walls.sum()),
             "peak FLOP/s": peak}
    return dict(rows=rows, rates=rates, loss=loss, params=sum(x.size for x in jax.tree.leaves(state["params"])),
                batch_size=t.batch_size, chip=t.chip, mesh=dict(mesh.shape))


def format_table(result: dict[str, Any], device: str) -> str:
    r = result["rates"]
    lines = [(f"device {device}; mesh {result['mesh']}; {result['params']:,} parameters; "
              f"batch {result['batch_size']}"),
             f"{'':52} {'wall':>10} {'cpu':>10}"]
    for name, (wall, cpu) in result["rows"].items():
        cpu_s = f"{cpu:>9.3f}s" if np.isfinite(cpu) else f"{'':>10}"
        lines.append(f"{name:52} {wall:>9.3f}s {cpu_s}")
    peak_how = "measured fp32 matmul" if result["chip"] == "cpu" else f"{result['chip']} datasheet"
    mfu_label = f"MFU (peak {r['peak FLOP/s'] / 1e9:,.0f} GFLOP/s, {peak_how})"
    lines += [f"{'steps/s':52} {r['steps/s']:>10.2f}",
              f"{'examples/s':52} {r['examples/s']:>10.1f}",
              f"{'tokens/s':52} {r['tokens/s']:>10.0f}",
              f"{mfu_label:52} {100 * r['MFU']:>9.1f}%",
              f"{'data-wait fraction (wait / step wall, timed steps)':52} {100 * r['data-wait fraction']:>9.1f}%",
              f"final loss {result['loss']:.4f}"]
    return "\n".join(lines)


def main(argv) -> None:
    """Runs the benchmark and prints the table."""
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax narrates every file at INFO
    f = flags.FLAGS
    result = benchmark(f.config, f.steps, f.warmup, f.saves, f.workdir)
    device = jax.devices()[0]
    print(format_table(result, f"{device.platform} ({device.device_kind}, "
                               f"{jax.device_count()} devices)"))


def define_flags() -> None:
    """The command line: python -m tools.bench_train --help."""
    cli.define_config_flag("Run config file, configs/FILE.py or configs/FILE.py:ARG "
                           "(required); override its values with --config.KEY=VALUE.")
    flags.DEFINE_integer("steps", 30, "Timed train steps (after the warmup steps and the compile).")
    flags.DEFINE_integer("warmup", 3, "Untimed train steps after the compile.")
    flags.DEFINE_integer("saves", 2, "Checkpoint saves timed (one train step between them; 0 times none).")
    flags.DEFINE_string("workdir", None, "Where the checkpoints go; it must not hold checkpoints already "
                        "(default: a temporary directory, deleted afterwards).")
    flags.mark_flags_as_required(["config"])


if __name__ == "__main__":
    define_flags()
    app.run(main)
