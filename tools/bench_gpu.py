r"""Benchmark π0 on an NVIDIA H100/H200: sample_actions latency at batch 1, and the train step's
throughput and MFU. The results go into BENCHMARKS.md.

On the GPU machine, from the repository root:

    pip install -e ".[cuda]"
    python -m tools.bench_gpu [--train_batch 32] [--n 100] [--steps 10] [--config.KEY=VALUE ...]

The default config is configs/pi0.py, used as is: So400m/14 at 224², 3 cameras, gemma_2b +
gemma_300m, horizon 50, 10 flow steps, bfloat16 compute. Nothing is set for XLA. JAX reserves 75%
of GPU memory at start. If a larger --train_batch runs out of memory, you may raise that share
with XLA_PYTHON_CLIENT_MEM_FRACTION=0.95. A step that runs out of device memory is reported as
such; the sampler's figures are still written. CPU at tiny shapes (tests/test_bench_gpu.py):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu python -m tools.bench_gpu \
        --config.knobs.vit=tiny/8 --config.knobs.vlm=gemma_tiny \
        --config.knobs.action_expert=gemma_tiny_expert --config.model.image_size=32 \
        --config.model.vocab_size=512 --config.knobs.max_text_tokens=16 --config.knobs.chunk_s=0.2 \
        --config.knobs.steps_executed=5 --n 3 --steps 2 --train_batch 8 --no_write

Measured:
- sampler: the policy's own function, vla.bundle.action_sampler(graphdef, flow_steps), jitted. It
  runs on the first device with parameters in --sampler_param_dtype, because a deployment bundle
  stores its weights in bfloat16. Each call gets its inputs as arguments: random uint8 images,
  state, tokens (random_batch, the bundle's SAMPLE_KEYS) and noise. A few distinct sets are cycled.
  Never use closed-over constants: XLA once skipped most of the ViT on constant all-ones images.
  Reported: compile time, then median / p99 / max ms of --n calls after --warmup untimed ones. The
  cost model's roofline (vla.cost.roofline) is the lower bound to compare against.
- train step: vla.train's own pieces, as prepare() builds them: a sharded init on a mesh over
  all local devices, the optimizer, state_builder's state, and jit_train_step with the state
  donated. Distinct random batches of --train_batch are passed as arguments. --steps steps are
  timed after --warmup untimed steps, blocking on each step's metrics. MFU = model FLOPs (3x
  forward, vla.cost.train_flops_per_example) x batch / step time / (chip peak x devices). HFU
  counts the remat policy's recomputation too.
- peak device memory: the allocator's high-water mark (memory_stats, absent on CPU), so the
  train figure covers the whole run.
The chip peak comes from the device kind (H100 -> h100, H200 -> h200 in vla.cost.CHIPS). On CPU
the peak is measured, as vla.cost.get_chip("cpu") does.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from configs import cli
from configs import specs as specs_lib
from launch import common
from tools.aot import run_spec
from vla import bundle as bundle_lib
from vla import cost, sharding
from vla import optimizer as optimizer_lib
from vla import train as train_lib
from vla.models.vla import VLAConfig, random_batch

DEFAULT_CONFIG = os.path.join(common.REPO, "configs", "pi0.py")
BEGIN, END = "<!-- bench_gpu:begin -->", "<!-- bench_gpu:end -->"
INPUT_SETS = 4  # distinct random inputs cycled through the timed calls and steps
GIB = 2**30
_START = time.perf_counter()
SECTION = f"""## GPU: `python -m tools.bench_gpu`

π0 as configs/pi0.py defines it. Reported: sample_actions latency at batch 1, with the
policy's own sampler, bfloat16 weights, and random inputs passed as arguments. Also the train step
of vla.train on a mesh over all local devices: step time, examples/s, and MFU against the chip's
datasheet peak. HFU counts the remat recomputation too. Each run replaces the table below. The
tools/bench_gpu.py docstring says what is timed and how. JAX reserves 75% of GPU memory;
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 leaves more for a larger --train_batch.

    pip install -e ".[cuda]"
    python -m tools.bench_gpu

{BEGIN}
{END}
"""


# ------------------------------------------------------------------------------- the chip

def chip_name(device: jax.Device) -> str:
    """The vla.cost.CHIPS name of a device ("cpu" on CPU, measured there)."""
    if device.platform == "cpu":
        return "cpu"
    for kind, name in (("H100", "h100"), ("H200", "h200")):
        if kind in device.device_kind:
            return name
    raise ValueError(f"no datasheet peak for device kind {device.device_kind!r}; vla.cost.CHIPS has "
                     f"{sorted(cost.CHIPS)}")


def peak_bytes(devices: Sequence[jax.Device]) -> int | None:
    """The largest per-device peak_bytes_in_use, or None where devices report no memory stats."""
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in devices]
    return max(peaks) if peaks and None not in peaks else None


def progress(message: str) -> None:
    """A progress line with the seconds since start: a GPU run's compiles take minutes."""
    print(f"[{time.perf_counter() - _START:7.1f} s] {message}", flush=True)


def _median_p99_max(seconds: Sequence[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    return {"median_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99)), "max_ms": float(ms.max())}


def _compiled(what: str, lower: Callable[[], Any]) -> tuple[Any, float]:
    progress(f"{what}: compiling ...")
    start = time.perf_counter()
    compiled = lower().compile()
    seconds = time.perf_counter() - start
    progress(f"{what}: compiled in {seconds:.1f} s")
    return compiled, seconds


# ------------------------------------------------------------------------------- sampler

def sampler_inputs(cfg: VLAConfig, seed: int, device: jax.Device) -> tuple[dict[str, jax.Array], jax.Array]:
    """(batch, noise) on device: the bundle signature's random batch of 1, noise f32 [1, H, A]."""
    batch = {k: v for k, v in random_batch(cfg, 1, seed).items() if k in bundle_lib.SAMPLE_KEYS}
    noise = np.random.default_rng(seed).standard_normal((1, cfg.action_horizon, cfg.action_dim), np.float32)
    return jax.device_put((batch, noise), device)


def bench_sampler(spec: specs_lib.RunSpec, chip: cost.Chip, param_dtype: str, n: int, warmup: int,
                  seed: int) -> dict[str, Any]:
    """Latency of the policy's jitted sampler at batch 1 on the first device, plus the roofline."""
    device = jax.devices()[0]
    spec = dataclasses.replace(spec, model=dataclasses.replace(spec.model, param_dtype=param_dtype))
    cfg, flow_steps = spec.model, spec.control.flow_steps
    progress(f"sampler: initializing {param_dtype} parameters on {device.device_kind}")
    mesh = sharding.make_mesh({"data": 1}, [device])
    graphdef, state = nnx.split(sharding.init_sharded(lambda: train_lib.make_model(spec), mesh, spec.mesh.rules))
    params = bundle_lib.string_keys(nnx.to_pure_dict(state))
    del state
    inputs = [sampler_inputs(cfg, seed + i, device) for i in range(INPUT_SETS)]
    sample, compile_s = _compiled(f"sampler (batch 1, {flow_steps} flow steps)", lambda: jax.jit(
        bundle_lib.action_sampler(graphdef, flow_steps)).lower(params, *inputs[0]))
    seconds = []
    for i in range(warmup + n):
        start = time.perf_counter()
        jax.block_until_ready(sample(params, *inputs[i % INPUT_SETS]))
        if i >= warmup:
            seconds.append(time.perf_counter() - start)
    progress(f"sampler: timed {n} calls after {warmup} warmup, median {1e3 * statistics.median(seconds):.2f} ms")
    return {"param_dtype": param_dtype, "flow_steps": flow_steps, "compile_s": compile_s, "n": n,
            **_median_p99_max(seconds), "roofline_ms": 1e3 * cost.roofline(cfg, flow_steps, chip)["chunk_s"],
            "peak_bytes": peak_bytes([device])}


# ------------------------------------------------------------------------------- train step

def bench_train(spec: specs_lib.RunSpec, chip: cost.Chip, cpu: bool, steps: int, warmup: int,
                seed: int) -> dict[str, Any]:
    """Step time, examples/s, MFU and HFU of vla.train's jitted step on a mesh of all local devices."""
    mesh = sharding.make_mesh(spec.mesh.axes)
    train_lib.validate_mesh(spec, mesh)
    rules, batch_size = spec.mesh.rules, spec.train.batch_size
    progress(f"train: initializing the sharded state on mesh {dict(mesh.shape)}")
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        graphdef, params = nnx.split(sharding.init_sharded(lambda: train_lib.make_model(spec), mesh, rules))
        params = nnx.to_pure_dict(params)
        tx = optimizer_lib.make_optimizer(spec.optimizer, params)
        state = train_lib.init_state(spec.optimizer, mesh, tx, params)  # consumes params
        del params
        step_fn = train_lib.jit_train_step(spec, mesh, graphdef, tx, len(spec.data.sources),
                                           jax.tree.map(lambda x: x.sharding, state))
        batch_sharding = sharding.batch_sharding(mesh, rules)
        batches = [sharding.global_batch(random_batch(spec.model, batch_size, seed + i), batch_sharding)
                   for i in range(INPUT_SETS)]
        step, compile_s = _compiled(f"train step (batch {batch_size})", lambda: step_fn.lower(state, batches[0]))
        seconds = []
        for i in range(warmup + steps):
            start = time.perf_counter()
            state, metrics = jax.block_until_ready(step(state, batches[i % INPUT_SETS]))
            loss = float(metrics["loss"])
            if i >= warmup:
                seconds.append(time.perf_counter() - start)
                progress(f"train: step {i - warmup + 1}/{steps} {seconds[-1]:.3f} s, loss {loss:.4f}")
    step_s = statistics.median(seconds)
    # CPU devices forced by XLA_FLAGS share the cores the measured peak already covers.
    peak = chip.peak_flops * (1 if cpu else mesh.size)
    rate = lambda flops: flops * batch_size / step_s / peak
    return {"batch_size": batch_size, "devices": mesh.size, "mesh": dict(mesh.shape), "compile_s": compile_s,
            "steps": steps, "step_s": step_s, "examples_per_s": batch_size / step_s,
            "mfu": rate(cost.train_flops_per_example(spec.model)),
            "hfu": rate(cost.train_flops_per_example(spec.model, include_remat=True)),
            "peak_flops": peak, "loss": loss, "peak_bytes": peak_bytes(mesh.devices.flat)}


def bench_train_or_oom(spec: specs_lib.RunSpec, chip: cost.Chip, cpu: bool, steps: int, warmup: int,
                       seed: int) -> dict[str, Any]:
    """bench_train, or {"error": ...} when the step does not fit in device memory. The sampler's
    figures, measured first, are still worth writing."""
    try:
        return bench_train(spec, chip, cpu, steps, warmup, seed)
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        progress(f"train: out of device memory at batch {spec.train.batch_size}: {str(e)[:500]}")
        return {"batch_size": spec.train.batch_size, "error": f"out of device memory at batch "
                f"{spec.train.batch_size} (lower --train_batch)"}


# ------------------------------------------------------------------------------- BENCHMARKS.md

def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def table(r: dict[str, Any]) -> str:
    """The results of one run as a markdown table (figure | value)."""
    s, t = r["sampler"], r["train"]
    rows = [("machine", f"{r['machine']} × {r['devices']} ({r['platform']})"), ("date", r["date"]),
            ("jax", r["jax"]), ("command", f"`{r['command']}`"), ("config", r["config"]),
            ("sampler compile", f"{s['compile_s']:.1f} s (batch 1, {s['flow_steps']} flow steps, "
                                f"{s['param_dtype']} weights)"),
            (f"sampler latency median / p99 / max ({s['n']} calls)",
             f"{s['median_ms']:.2f} / {s['p99_ms']:.2f} / {s['max_ms']:.2f} ms"),
            (f"sampler roofline ({r['chip']} cost model)", f"{s['roofline_ms']:.2f} ms")]
    if s["peak_bytes"] is not None:
        rows.append(("sampler peak device memory", _gib(s["peak_bytes"])))
    if "error" in t:
        rows.append((f"train step, batch {t['batch_size']}", t["error"]))
    else:
        mesh = " ".join(f"{k}={v}" for k, v in t["mesh"].items())
        rows += [(f"train step, batch {t['batch_size']}, mesh {mesh}",
                  f"{t['step_s']:.4f} s (median of {t['steps']}); compile {t['compile_s']:.1f} s"),
                 ("examples/s", f"{t['examples_per_s']:.2f}"),
                 (f"MFU (model FLOPs; peak {t['peak_flops'] / 1e12:.4g} TFLOP/s)", f"{100 * t['mfu']:.3g}%"),
                 ("HFU (with remat recomputation)", f"{100 * t['hfu']:.3g}%")]
        if t["peak_bytes"] is not None:
            rows.append(("train peak device memory (per device, whole run)", _gib(t["peak_bytes"])))
    return "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


def with_table(text: str, new_table: str) -> str:
    """text with the table between the markers replaced, the section appended first if absent."""
    if BEGIN not in text:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + SECTION
    head, _, rest = text.partition(BEGIN)
    if END not in rest:
        raise ValueError(f"{BEGIN} without {END} after it")
    return f"{head}{BEGIN}\n{new_table}\n{END}{rest.partition(END)[2]}"


def write_benchmarks(path: str, new_table: str) -> None:
    """Puts new_table into the markdown file at path (created when missing)."""
    text = open(path).read() if os.path.exists(path) else ""
    with open(path, "w") as f:
        f.write(with_table(text, new_table))


# ------------------------------------------------------------------------------- command line

def run(config: ml_collections.ConfigDict, config_file: str, train_batch: int, n: int, steps: int, warmup: int,
        seed: int, sampler_param_dtype: str) -> dict[str, Any]:
    """The sampler, then the train step (its larger state never shares memory with the sampler's)."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.batch_size = train_batch
    spec = run_spec(config)
    device = jax.devices()[0]
    name = chip_name(device)
    chip = cost.get_chip(name)
    m = spec.model
    result = {"machine": device.device_kind, "platform": device.platform, "devices": jax.local_device_count(),
              "chip": name, "date": datetime.date.today().isoformat(), "jax": jax.__version__,
              "command": shlex.join(["python", "-m", "tools.bench_gpu", *sys.argv[1:]]),
              "config": f"{config_file}: {m.vit} + {m.vlm} + {m.action_expert}, {len(m.cameras)} cameras at "
                        f"{m.image_size}², horizon {m.action_horizon}, {m.compute_dtype} compute"}
    result["sampler"] = bench_sampler(spec, chip, sampler_param_dtype, n, warmup, seed)
    result["train"] = bench_train_or_oom(spec, chip, name == "cpu", steps, warmup, seed)
    return result


def main(argv: Sequence[str]) -> None:
    """Runs both benchmarks, prints the table (and JSON), writes it into --benchmarks."""
    del argv
    logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS
    if min(f.n, f.steps) < 1 or f.warmup < 0 or f.train_batch < 1:
        raise ValueError(f"need --n, --steps, --train_batch >= 1 and --warmup >= 0; got {f.n}, {f.steps}, "
                         f"{f.train_batch}, {f.warmup}")
    config_file = common.repo_relative(config_flags.get_config_filename(f["config"]))
    result = run(f.config, config_file, f.train_batch, f.n, f.steps, f.warmup, f.seed, f.sampler_param_dtype)
    new_table = table(result)
    print(new_table)
    if not f.no_write:
        write_benchmarks(f.benchmarks, new_table)
        progress(f"wrote {f.benchmarks}")
    if f.json:
        print(json.dumps(result))  # one line, the last: `| tail -1` reads it


def with_default_config(argv: Sequence[str]) -> list[str]:
    """argv with --config=configs/pi0.py first when it names no config file. This is not done with a
    flag default, because the config flag would parse that default and its overrides at definition
    time, outside app.run, and a bad key would print a traceback instead of a usage error."""
    named = any(re.match(r"--?config(=|$)", arg) for arg in argv[1:])
    return list(argv) if named else [argv[0], f"--config={DEFAULT_CONFIG}", *argv[1:]]


def define_flags() -> None:
    """The command line: python -m tools.bench_gpu --help."""
    cli.define_config_flag("Run config file, configs/FILE.py or configs/FILE.py:ARG (default configs/pi0.py); "
                           "override its values with --config.KEY=VALUE.")
    flags.DEFINE_integer("train_batch", 32, "Global batch of the timed train step (openpi's π0 default).")
    flags.DEFINE_integer("n", 100, "Timed sampler calls.")
    flags.DEFINE_integer("steps", 10, "Timed train steps.")
    flags.DEFINE_integer("warmup", 3, "Untimed sampler calls and train steps after each compile.")
    flags.DEFINE_integer("seed", 0, "Seed of the random inputs.")
    flags.DEFINE_enum("sampler_param_dtype", "bfloat16", bundle_lib.DTYPES,
                      "Parameter dtype of the sampler (a bundle's; the train step keeps the config's).")
    flags.DEFINE_string("benchmarks", os.path.join(common.REPO, "BENCHMARKS.md"),
                        "Markdown file whose bench_gpu table is replaced (the section is appended if absent).")
    flags.DEFINE_bool("no_write", False, "Only print; leave --benchmarks as it is.")
    flags.DEFINE_bool("json", False, "Also print the results as JSON (the last line).")


if __name__ == "__main__":
    define_flags()
    # sys.argv stays as typed: the command recorded in the table, where the config flag also
    # reads its --config.KEY overrides from.
    app.run(common.usage_errors(main), argv=with_default_config(sys.argv))
