r"""Compile a run's train step and policy sampler for a TPU topology on this (CPU) machine: per-chip
memory and fit, FLOPs against the cost model, XLA's step-time estimate and MFU, compile time.

    pip install -e ".[aot]"     # libtpu from PyPI: XLA's TPU compiler, no TPU needed
    python -m tools.aot --config configs/pi0.py --topology v5p:2x2x1 --batch 128 \
        [--slices N] [--out REPORT.json] [--no_sampler] [--config.mesh.tensor=2 ...]
    python -m tools.aot --config configs/pi0.py --topology v5p:4x4x4 --batch 256 --sweep \
        [--sweep_tensor 1,2,4] [--sweep_remat nothing_saveable,dots_with_no_batch_dims_saveable]

What is compiled is the trainer's own: vla.train.jit_train_step over the state vla.train builds
(state_builder: the moments' shardings propagated from the parameters' logical axes), donated,
with the config's mesh sized to the topology as launch.tpu sizes it (a -1 axis fills a slice;
with --slices, a config without dcn_* axes puts the slices on dcn_data). Nothing is allocated:
parameters, state and batch are ShapeDtypeStructs with their shardings. The sampler is the
bundle's (vla.bundle.action_sampler) at batch 1 on one chip, as the policy server runs it.

Figures, per chip:
- memory: XLA's buffer assignment (arguments, outputs, temporaries, aliased = donated state
  reused for the output, generated code); total = arguments + outputs - aliased + temporaries,
  against the chip's HBM; fits when it leaves HBM_HEADROOM free (the runtime's own buffers,
  fragmentation).
- FLOPs: XLA counts a loop body (a scanned layer stack, a text-loss chunk, a microbatch) once,
  whatever its trip count, so its figure is held against vla.cost.train_flops_as_counted (the
  cost model's count of the same program); the step's real FLOPs are the cost model's full
  count, `hardware` (with recomputation) and `model` (3x forward, what MFU divides by).
- time: XLA's roofline estimate of the compiled program (cost_analysis "optimal_seconds", loop
  bodies once) scaled by the cost model's full / counted FLOPs; MFU = model FLOPs / (time x
  chips x peak). An estimate from the compiler's cost model, not a measurement; for multislice
  programs libtpu 0.0.42.1 gives none (its cost model does not time the DCN collectives).
A step whose buffers exceed HBM is refused by the TPU compiler itself ("Ran out of memory");
the report then carries the compiler's figures (what needs how much of how much HBM).

--sweep compiles every layout x remat policy in a child process each (a compiler crash costs
that candidate only), prints the table and the --config overrides of the fastest candidate that
fits. --out writes the report (for --sweep: every candidate's) as JSON. A compiler crash is
reported with its last lines of output and exit code 3; a config that does not fit exits 2.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags, logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from ml_collections import config_flags

from configs import cli
from configs import specs as specs_lib
from launch import common
from vla import bundle as bundle_lib
from vla import cost, sharding
from vla import optimizer as optimizer_lib
from vla import train as train_lib
from vla.models.vla import random_batch

GIB = 2**30
HBM_HEADROOM = 0.05  # fraction of a chip's HBM a fitting step leaves free
# topology generation -> (cost.CHIPS name, HBM bytes per chip). Datasheet capacities.
GENERATIONS = {
    "v4": ("tpu_v4", 32 * GIB),
    "v5e": ("tpu_v5e", 16 * GIB),
    "v5p": ("tpu_v5p", 95 * GIB),
    "v6e": ("tpu_v6e", 32 * GIB),
}
EXIT_NO_FIT, EXIT_COMPILER = 2, 3


# ------------------------------------------------------------------------------- topology

@dataclasses.dataclass(frozen=True)
class Topology:
    """`slices` TPU slices of one topology (e.g. "v5p:4x4x4"): its devices and its chip."""

    name: str
    slices: int
    devices: tuple[Any, ...]
    chip: str  # a cost.CHIPS name
    hbm_bytes: int

    @property
    def devices_per_slice(self) -> int:
        return len(self.devices) // self.slices


def topology(name: str, slices: int = 1) -> Topology:
    """The devices of `slices` slices of topology `name` ("v5p:2x2x1", "v5e:16x16"), from libtpu."""
    generation = name.partition(":")[0]
    if generation not in GENERATIONS or ":" not in name:
        raise ValueError(f"topology {name!r}: expected GENERATION:SHAPE with GENERATION one of "
                         f"{sorted(GENERATIONS)}, e.g. v5p:4x4x4")
    # libtpu takes a lock file that lets one process per machine load it; compiling for a
    # topology opens no TPU, so sweeps, tests and a launch check may run side by side.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        from jax.experimental import topologies
        desc = topologies.get_topology_desc(platform="tpu", topology_name=name,
                                            **({"num_slices": slices} if slices > 1 else {}))
    except Exception as e:  # no libtpu, or a shape the generation does not have
        raise ValueError(f"cannot describe TPU topology {name!r} x {slices} slice(s): {e} (the TPU "
                         f"compiler comes with libtpu: pip install -e \".[aot]\")") from e
    chip, hbm = GENERATIONS[generation]
    return Topology(name, slices, tuple(desc.devices), chip, hbm)


def sized_config(config: ml_collections.ConfigDict, topo: Topology, batch: int | None
                 ) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
    """A copy of config with its mesh sized to the topology (launch.tpu's rule) and the batch;
    returns it with the overrides that did so."""
    config = ml_collections.ConfigDict(config.to_dict())
    overrides: dict[str, Any] = common.mesh_overrides(config.mesh, topo.devices_per_slice, topo.slices)
    if batch:
        overrides["batch_size"] = batch
    config.update_from_flattened_dict(overrides)
    return config, overrides


# ------------------------------------------------------------------------------- compiling

def _structs(values: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), values, shardings)


def _memory(compiled: Any, hbm_bytes: int) -> dict[str, Any]:
    m = compiled.memory_analysis()
    out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in
           ("argument", "output", "alias", "temp", "generated_code")}
    out["host_temp"] = int(getattr(m, "host_temp_size_in_bytes", 0))
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"] + out["generated_code"]
    out["capacity"] = hbm_bytes
    out["fits"] = out["total"] <= (1 - HBM_HEADROOM) * hbm_bytes
    return out


def _cost(compiled: Any) -> dict[str, float]:
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    return {"flops": float(analysis.get("flops", 0.0)),
            "optimal_seconds": float(analysis.get("optimal_seconds", 0.0)),
            "bytes_accessed": float(analysis.get("bytes accessed", 0.0))}


def run_spec(config: ml_collections.ConfigDict) -> specs_lib.RunSpec:
    """The run's specs, with the FAST id range the data would decide (the tokenizer's last
    fast_vocab_size ids below its reserved tail; it changes which targets are hidden, not a shape)."""
    spec = specs_lib.build(config)
    specs_lib.validate_training(spec)
    if spec.data.fast.enabled:
        spec = dataclasses.replace(spec, model=dataclasses.replace(
            spec.model, fast_token_start=spec.model.vocab_size - spec.data.fast.vocab_size))
    return spec


def compile_train_step(spec: specs_lib.RunSpec, topo: Topology) -> dict[str, Any]:
    """Compiles vla.train's step for the topology; the report's "train" section."""
    mesh = sharding.make_mesh(spec.mesh.axes, topo.devices)
    train_lib.validate_mesh(spec, mesh)
    rules = spec.mesh.rules
    # Concrete values (keys, dtypes) stay outside the TPU mesh: only structs enter it.
    graphdef, abstract, shardings = sharding.abstract_model(lambda: train_lib.make_model(spec), mesh, rules)
    params = _structs(nnx.to_pure_dict(abstract), nnx.to_pure_dict(shardings))
    tx = optimizer_lib.make_optimizer(spec.optimizer, params)
    example = random_batch(spec.model, 1)
    batch_sharding = sharding.batch_sharding(mesh, rules)
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct((spec.train.batch_size, *x.shape[1:]), x.dtype,
                                                        sharding=batch_sharding), example)
    start = time.perf_counter()
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        build = train_lib.state_builder(spec.optimizer, tx, jax.tree.map(lambda s: s.sharding, params))
        state = _structs(jax.eval_shape(build, params), jax.jit(build).lower(params).compile().output_shardings)
        step = train_lib.jit_train_step(spec, mesh, graphdef, tx, len(spec.data.sources),
                                        jax.tree.map(lambda s: s.sharding, state))
        lowered = step.lower(state, batch)
        try:
            compiled = lowered.compile()
        except jax.errors.JaxRuntimeError as e:
            compiled = out_of_memory(str(e))
    seconds = time.perf_counter() - start
    chips, cfg, b = len(topo.devices), spec.model, spec.train.batch_size
    micro = b // spec.optimizer.grad_accum_steps
    shape = {"compile_s": seconds, "params": sum(math.prod(x.shape) for x in jax.tree.leaves(params)),
             "mesh": dict(mesh.shape), "batch_size": b, "microbatch": micro}
    if isinstance(compiled, dict):  # the compiler refused: it does not fit
        return {"memory": compiled, "flops": None, "time": None, **shape}
    xla = _cost(compiled)
    flops = {
        "model_per_step": cost.train_flops_per_example(cfg) * b,
        "hardware_per_step": cost.train_flops_per_example(cfg, include_remat=True) * b,
        "cost_model_counted_per_chip": cost.train_flops_as_counted(cfg) * micro / chips,
        "xla_per_chip": xla["flops"],
    }
    flops["xla_over_cost_model"] = flops["xla_per_chip"] / flops["cost_model_counted_per_chip"]
    # Loop bodies are counted once: scale XLA's time by the trip counts the cost model knows.
    trips = flops["hardware_per_step"] / chips / flops["cost_model_counted_per_chip"]
    optimal = xla["optimal_seconds"]
    step_s = optimal * trips if optimal > 0 else None  # XLA's TPU cost model gives up on some ops
    peak = cost.chip_peak_flops(topo.chip)
    return {"memory": _memory(compiled, topo.hbm_bytes), "flops": flops,
            "time": {"xla_optimal_seconds_counted": optimal, "trip_count_scale": trips,
                     "step_s": step_s, "examples_per_s": b / step_s if step_s else None,
                     "mfu": flops["model_per_step"] / (step_s * chips * peak) if step_s else None},
            **shape}


_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_OOM = re.compile(r"memory required for (?P<what>[\w ]+?) \((?P<need>[\d.]+)(?P<nu>[KMGT])\) exceeds "
                  r"available HBM \((?P<have>[\d.]+)(?P<hu>[KMGT])\)")


def out_of_memory(message: str) -> dict[str, Any]:
    """The memory section of a step the TPU compiler refused for want of HBM ("Ran out of memory
    in memory space hbm ... required for HLO temporaries (20.08G) exceeds available HBM
    (15.75G)"); any other compiler error is raised."""
    match = _OOM.search(message)
    if "RESOURCE_EXHAUSTED" not in message or not match:
        raise RuntimeError(f"the TPU compiler failed: {message}")
    need = float(match["need"]) * _UNITS[match["nu"]]
    return {"fits": False, "total": need, "capacity": float(match["have"]) * _UNITS[match["hu"]],
            "compiler": f"{match['what']} need {match['need']}{match['nu']}, the chip has {match['have']}"
                        f"{match['hu']} of HBM"}


def compile_sampler(spec: specs_lib.RunSpec, topo: Topology) -> dict[str, Any]:
    """Compiles the policy's sampler (batch 1, the config's flow steps) for one chip."""
    mesh = sharding.make_mesh({"data": 1}, topo.devices[:1])
    graphdef, abstract, _ = sharding.abstract_model(lambda: train_lib.make_model(spec), mesh, spec.mesh.rules)
    one = NamedSharding(mesh, PartitionSpec())
    values = bundle_lib.string_keys(nnx.to_pure_dict(abstract))
    params = _structs(values, jax.tree.map(lambda _: one, values))
    cfg = spec.model
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), random_batch(cfg, 1))
    batch.pop("actions"), batch.pop("action_mask")
    noise = jax.ShapeDtypeStruct((1, cfg.action_horizon, cfg.action_dim), jnp.float32, sharding=one)
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        lowered = jax.jit(bundle_lib.action_sampler(graphdef, spec.control.flow_steps)).lower(params, batch, noise)
        try:
            compiled = lowered.compile()
        except jax.errors.JaxRuntimeError as e:
            return {"memory": out_of_memory(str(e)), "flops": None, "time": None,
                    "compile_s": time.perf_counter() - start, "flow_steps": spec.control.flow_steps}
    seconds = time.perf_counter() - start
    counted = cost.prefix_flops(cfg) + cost.flow_step_flops(cfg)  # the fori_loop body once
    xla = _cost(compiled)
    full = cost.inference_flops(cfg, spec.control.flow_steps)
    latency = xla["optimal_seconds"] * full / counted if xla["optimal_seconds"] > 0 else None
    roofline = cost.roofline(cfg, spec.control.flow_steps, cost.get_chip(topo.chip))
    return {"memory": _memory(compiled, topo.hbm_bytes),
            "flops": {"per_chunk": full, "cost_model_counted": counted, "xla_counted": xla["flops"],
                      "xla_over_cost_model": xla["flops"] / counted},
            "time": {"xla_optimal_seconds_counted": xla["optimal_seconds"], "chunk_s": latency,
                     "roofline_chunk_s": roofline["chunk_s"],
                     "realtime_budget_s": cost.realtime_budget_s(spec.control.steps_executed,
                                                                 spec.control.control_hz)},
            "compile_s": seconds, "flow_steps": spec.control.flow_steps}


def aot_report(config: ml_collections.ConfigDict, topo: Topology, batch: int | None = None,
               sampler: bool = True) -> dict[str, Any]:
    """Everything tools.aot prints for one configuration, as JSON-able data."""
    config, overrides = sized_config(config, topo, batch)
    spec = run_spec(config)
    report = {"topology": topo.name, "slices": topo.slices, "chips": len(topo.devices), "chip": topo.chip,
              "model": {"mode": spec.model.mode, "vit": spec.model.vit, "vlm": spec.model.vlm,
                        "action_expert": spec.model.action_expert, "remat_policy": spec.model.remat_policy,
                        "param_dtype": spec.model.param_dtype, "compute_dtype": spec.model.compute_dtype,
                        "mu_dtype": spec.optimizer.mu_dtype or spec.model.param_dtype,
                        "text_loss_chunk": spec.model.text_loss_chunk,
                        "flow_loss_weight": spec.model.flow_loss_weight},
              "overrides": overrides, "train": compile_train_step(spec, topo)}
    if sampler:
        report["sampler"] = compile_sampler(spec, topo)
    return report


# ------------------------------------------------------------------------------- printing

def _gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def summary_line(report: Mapping[str, Any]) -> str:
    t = report["train"]
    m, time_ = t["memory"], t["time"]
    mesh = " ".join(f"{k}={v}" for k, v in t["mesh"].items() if v > 1) or "1 chip"
    if time_ is None:
        return (f"{report['topology']:>12} x{report['slices']} | batch {t['batch_size']:>5} | {mesh:<24} | "
                f"{report['model']['remat_policy']:<32} | DOES NOT FIT: {m['compiler']}")
    return (f"{report['topology']:>12} x{report['slices']} | batch {t['batch_size']:>5} | {mesh:<24} | "
            f"{report['model']['remat_policy']:<32} | args {_gib(m['argument'])} temp {_gib(m['temp'])} "
            f"total {_gib(m['total'])} / {_gib(m['capacity'])} GiB {'fits' if m['fits'] else 'DOES NOT FIT'} | "
            f"step {_seconds(time_['step_s'])}, MFU {_percent(time_['mfu'])} | compile {t['compile_s']:.0f} s")


def _seconds(s: float | None) -> str:
    return "- (XLA gave no estimate)" if s is None else f"{s:.4f} s"


def _percent(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def print_report(report: Mapping[str, Any]) -> None:
    t = report["train"]
    m, f = t["memory"], t["flops"]
    print(f"train step: {report['model']['mode']} ({t['params']:,} parameters) on {report['topology']} "
          f"x {report['slices']} slice(s), {report['chips']} chips; mesh {t['mesh']}, global batch "
          f"{t['batch_size']} (microbatch {t['microbatch']})")
    if f is None:
        print(f"  DOES NOT FIT: the TPU compiler refused it ({m['compiler']}); compiled in {t['compile_s']:.0f} s")
        return
    print(f"  per chip HBM (GiB): arguments {_gib(m['argument'])}, outputs {_gib(m['output'])}, aliased "
          f"{_gib(m['alias'])}, temporaries {_gib(m['temp'])}, code {_gib(m['generated_code'])}, total "
          f"{_gib(m['total'])} of {_gib(m['capacity'])}: {'fits' if m['fits'] else 'DOES NOT FIT'}"
          + (f"; host (offloaded) {_gib(m['host_temp'])}" if m["host_temp"] else ""))
    print(f"  FLOPs per step: model {f['model_per_step']:.4g}, hardware {f['hardware_per_step']:.4g}; "
          f"XLA counts {f['xla_per_chip']:.4g} per chip (loop bodies once), the cost model "
          f"{f['cost_model_counted_per_chip']:.4g}: ratio {f['xla_over_cost_model']:.3f}")
    time_ = t["time"]
    print(f"  XLA-estimated step time {_seconds(time_['step_s'])} ({time_['examples_per_s'] or 0:.1f} "
          f"examples/s), MFU {_percent(time_['mfu'])}; compiled in {t['compile_s']:.0f} s")
    if "sampler" in report and report["sampler"]["time"] is None:
        print(f"sampler (batch 1, one chip): DOES NOT FIT: {report['sampler']['memory']['compiler']}")
    elif "sampler" in report:
        s = report["sampler"]
        chunk = s["time"]["chunk_s"]
        print(f"sampler (batch 1, {s['flow_steps']} flow steps, one chip): HBM {_gib(s['memory']['total'])} "
              f"GiB ({'fits' if s['memory']['fits'] else 'DOES NOT FIT'}); XLA-estimated chunk "
              f"{'-' if chunk is None else f'{1e3 * chunk:.2f} ms'} (roofline "
              f"{1e3 * s['time']['roofline_chunk_s']:.2f} ms, "
              f"real-time budget {1e3 * s['time']['realtime_budget_s']:.0f} ms); compiled in "
              f"{s['compile_s']:.0f} s")


# ------------------------------------------------------------------------------- sweeping

def candidates(devices_per_slice: int, slices: int, tensors: Sequence[int], remats: Sequence[str]
               ) -> list[dict[str, Any]]:
    """Override sets of the sweep: fsdp x tensor within a slice (data 1), slices on dcn_data or
    dcn_fsdp, for each remat policy."""
    out = []
    dcn_options = [{"mesh.dcn_data": slices, "mesh.dcn_fsdp": 1}]
    if slices > 1:
        dcn_options.append({"mesh.dcn_data": 1, "mesh.dcn_fsdp": slices})
    for tensor in tensors:
        if devices_per_slice % tensor:
            continue
        for dcn in dcn_options:
            for remat in remats:
                out.append({"mesh.data": 1, "mesh.fsdp": devices_per_slice // tensor, "mesh.tensor": tensor,
                            "mesh.dcn_tensor": 1, **dcn, "model.remat_policy": remat})
    return out


def override_flags(overrides: Mapping[str, Any]) -> list[str]:
    return [f"--config.{k}={common.format_value(v)}" for k, v in overrides.items()]


def child_report(config_spec: str, config_flags_: Sequence[str], topology_name: str, slices: int,
                 batch: int | None = None, sampler: bool = False, timeout_s: float | None = None
                 ) -> dict[str, Any]:
    """tools.aot in a child process (a compiler abort kills only it) for the config file with
    its --config.KEY=VALUE flags: its report, or {"error": ..., "exit_code": ...} with the
    child's last lines of output."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "report.json")
        argv = [sys.executable, "-m", "tools.aot", f"--config={config_spec}", f"--topology={topology_name}",
                f"--slices={slices}", f"--out={out}", "--nosampler" if not sampler else "--sampler",
                *(f"--batch={batch}",) * bool(batch), *config_flags_]
        try:
            proc = subprocess.run(argv, cwd=common.REPO, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"error": f"the compile did not finish in {timeout_s:.0f} s"}
        if os.path.exists(out):
            with open(out) as f:
                return json.load(f)
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
        return {"error": f"the compile failed with exit code {proc.returncode}:\n{tail}",
                "exit_code": proc.returncode}


def pick(reports: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The fastest (XLA-estimated step time) report that compiled and fits."""
    fitting = [r for r in reports if "error" not in r and r["train"]["memory"]["fits"]]
    return min(fitting, key=lambda r: r["train"]["time"]["step_s"], default=None)


# ------------------------------------------------------------------------------- command line

def main(argv: Sequence[str]) -> None:
    """Compiles (or sweeps) the config for the topology, prints the report, writes --out."""
    del argv
    logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS
    topo = topology(f.topology, f.slices)
    if f.sweep:
        spec_arg = common.repo_relative(config_flags.get_config_filename(f["config"]))
        base = {k: common.get_value(f.config, k) for k in config_flags.get_override_values(f["config"])}
        reports = []
        for overrides in candidates(topo.devices_per_slice, topo.slices, [int(t) for t in f.sweep_tensor],
                                    f.sweep_remat):
            print(f"compiling {' '.join(override_flags(overrides))}", flush=True)
            report = child_report(spec_arg, override_flags({**base, **overrides}), f.topology, f.slices, f.batch)
            report["overrides"] = {**base, **overrides}
            reports.append(report)
            print("  " + (report["error"] if "error" in report else summary_line(report)), flush=True)
        best = pick(reports)
        if f.out:
            _write(f.out, {"candidates": reports, "best": best})
        if best is None:
            print("no candidate fits", flush=True)
            sys.exit(EXIT_NO_FIT)
        print("fastest that fits:\n  " + summary_line(best))
        print("use: " + " ".join(override_flags(best["overrides"])))
        return
    report = aot_report(f.config, topo, f.batch, f.sampler)
    if f.out:
        _write(f.out, report)
    print_report(report)
    if not report["train"]["memory"]["fits"]:
        sys.exit(EXIT_NO_FIT)


def _write(path: str, report: Any) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2, default=float)
        f.write("\n")


def define_flags() -> None:
    """The command line: python -m tools.aot --help."""
    cli.define_config_flag("Run config file, configs/FILE.py or configs/FILE.py:ARG (required); override "
                           "its values with --config.KEY=VALUE.")
    flags.DEFINE_string("topology", None, "TPU topology of one slice, GENERATION:SHAPE, e.g. v5p:2x2x1 "
                        "(v5p-8), v5p:4x4x4 (v5p-128), v5e:16x16 (v5e-256), v6e:8x8 (v6e-64) (required).")
    flags.DEFINE_integer("slices", 1, "Number of slices (multislice over the data-center network).")
    flags.DEFINE_integer("batch", None, "Global batch size (default: the config's batch_size).")
    flags.DEFINE_string("out", None, "Write the report as JSON here.")
    flags.DEFINE_bool("sampler", True, "Also compile the policy's sampler (batch 1, one chip).")
    flags.DEFINE_bool("sweep", False, "Compile every mesh layout x remat policy and pick the fastest that fits.")
    flags.DEFINE_list("sweep_tensor", ["1", "2"], "Tensor-parallel sizes the sweep tries (fsdp fills the slice).")
    flags.DEFINE_list("sweep_remat", ["nothing_saveable", "dots_with_no_batch_dims_saveable",
                                      "offload_dots_with_no_batch_dims"], "Remat policies the sweep tries.")
    flags.mark_flags_as_required(["config", "topology"])


if __name__ == "__main__":
    define_flags()
    app.run(common.usage_errors(main))
