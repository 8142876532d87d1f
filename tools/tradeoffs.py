"""Trade-offs of a config: parameters, FLOPs, memory, and whether inference fits the real-time budget.

    python -m tools.tradeoffs --config configs/pi0.py [--json] [--chip h100|h200|tpu_v4|...|cpu]
    python -m tools.tradeoffs --config configs/pi0.py --sweep knobs.flow_steps=1,5,10,20 [--out FILE]

Any config value can be overridden (--config.knobs.control_hz=30). --sweep varies one config
value, prints one row per value and plots latency and FLOPs against it. Conventions: vla/cost.py.
"""
from __future__ import annotations

import copy
import json
from typing import Any

from absl import app, flags
from matplotlib.figure import Figure

from configs import cli, specs
from data import storage
from vla import cost


def _si(x: float, unit: str) -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {prefix}{unit}"
    return f"{x:.0f} {unit}"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def format_report(r: dict[str, Any]) -> str:
    """A readable table of one report."""
    p, f, m, lat, rt = r["params"], r["flops"], r["memory_bytes"], r["latency"], r["realtime"]
    rows = [("parameters", "")]
    rows += [(f"  {name}", f"{n:,}") for name, n in p.items()]
    rows += [("tokens", f"prefix {r['tokens']['prefix']} (images {r['tokens']['image']}), "
                        f"suffix {r['tokens']['suffix']}, horizon {r['tokens']['action_horizon']}")]
    rows += [("FLOPs per example", ""),
             ("  training forward", _si(f["forward_per_example"], "FLOP")),
             ("  training step (3x fwd, MFU)", _si(f["train_model_per_example"], "FLOP")),
             ("  training step incl. remat", _si(f["train_hardware_per_example"], "FLOP")),
             ("  inference prefix", _si(f["inference_prefix"], "FLOP")),
             ("  inference flow step", _si(f["inference_flow_step"], "FLOP")),
             (f"  inference chunk ({rt['flow_steps']} steps)", _si(f["inference_per_chunk"], "FLOP"))]
    rows += [("memory", "")] + [(f"  {name}", _si(b, "B")) for name, b in m.items()]
    chip = r["chip"]
    rows += [(f"latency bound on {chip['name']}",
              f"{_si(chip['peak_flops'], 'FLOP/s')}, {_si(chip['hbm_bytes_per_s'], 'B/s')}"),
             ("  prefix", f"{_ms(lat['prefix_s'])} ({lat['prefix_bound']}-bound)"),
             ("  flow step", f"{_ms(lat['flow_step_s'])} ({lat['flow_step_bound']}-bound)"),
             ("  chunk", _ms(lat["chunk_s"])),
             ("real-time budget", f"{rt['steps_executed']} steps at {rt['control_hz']:g} Hz = {_ms(rt['budget_s'])}"),
             ("  fits", "yes" if rt["fits"] else "NO" + ("" if rt["steps_executed_within_horizon"]
                                                          else " (steps_executed > action horizon)"))]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _parse_sweep(spec: str, config) -> tuple[str, list]:
    """'knobs.flow_steps=1,5,10' -> ('knobs.flow_steps', [1, 5, 10]) typed like the config value."""
    key, sep, values = spec.partition("=")
    if not sep or not values:
        raise app.UsageError(f"--sweep expects KEY=v1,v2,..., got {spec!r}")
    kind = type(_get(config, key))
    if kind is bool:
        return key, [v.lower() in ("1", "true", "yes") for v in values.split(",")]
    if kind not in (int, float, str):
        raise app.UsageError(f"--sweep takes a number, string or bool config value; {key} is a {kind.__name__}")
    try:
        return key, [kind(v) for v in values.split(",")]
    except ValueError as e:
        raise app.UsageError(f"--sweep values for {key} must be {kind.__name__}s: {e}") from e


def _get(config, key: str):
    node = config
    for part in key.split("."):
        if part not in node:
            raise app.UsageError(f"config has no key {key!r}")
        node = node[part]
    return node


def sweep(config, key: str, values: list, chip: cost.Chip, chip_name: str) -> list[dict[str, Any]]:
    """One report per value of a config key (a dotted path such as knobs.control_hz)."""
    *parents, leaf = key.split(".")
    reports = []
    for value in values:
        c = copy.deepcopy(config)
        node = c
        for part in parents:
            node = node[part]
        node[leaf] = value
        reports.append(cost.report(specs.build(c), chip, chip_name))
    return reports


def format_sweep(key: str, values: list, reports: list[dict[str, Any]]) -> str:
    header = f"{key:>20} {'params':>10} {'train/ex':>12} {'infer/chunk':>12} {'prefix':>10} {'step':>10} " \
             f"{'chunk':>10} {'budget':>10}  fits"
    lines = [header]
    for value, r in zip(values, reports):
        lat, rt = r["latency"], r["realtime"]
        lines.append(f"{value!s:>20} {_si(r['params']['total'], ''):>10} "
                     f"{_si(r['flops']['train_model_per_example'], 'F'):>12} "
                     f"{_si(r['flops']['inference_per_chunk'], 'F'):>12} {_ms(lat['prefix_s']):>10} "
                     f"{_ms(lat['flow_step_s']):>10} {_ms(lat['chunk_s']):>10} {_ms(rt['budget_s']):>10}  "
                     f"{'yes' if rt['fits'] else 'NO'}")
    return "\n".join(lines)


def plot_sweep(key: str, values: list, reports: list[dict[str, Any]], path: str) -> None:
    """Latency (with the real-time budget) and FLOPs against the swept value, as a PNG."""
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    xs = values if numeric else list(range(len(values)))  # names (variants) go on evenly spaced ticks
    fig = Figure(figsize=(11, 4))
    ax_t, ax_f = fig.subplots(1, 2)
    ax_t.plot(xs, [r["latency"]["chunk_s"] * 1e3 for r in reports], "o-", label="chunk (roofline)")
    ax_t.plot(xs, [r["latency"]["prefix_s"] * 1e3 for r in reports], "s--", label="prefix")
    ax_t.plot(xs, [r["realtime"]["budget_s"] * 1e3 for r in reports], "k:", label="real-time budget")
    ax_t.set_ylabel(f"ms at batch 1 on {reports[0]['chip']['name']}")
    ax_t.set_yscale("log")
    ax_f.plot(xs, [r["flops"]["train_model_per_example"] for r in reports], "o-", label="training / example")
    ax_f.plot(xs, [r["flops"]["inference_per_chunk"] for r in reports], "s--", label="inference / chunk")
    ax_f.set_ylabel("FLOPs")
    ax_f.set_yscale("log")
    for ax in (ax_t, ax_f):
        ax.set_xlabel(key)
        if not numeric:
            ax.set_xticks(xs, [str(v) for v in values])
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with storage.path(path).open("wb") as f:
        fig.savefig(f, format="png", dpi=100)


def main(argv):
    """Prints the config's report, or with --sweep one row per value and the plot's path."""
    del argv
    f = flags.FLAGS
    config = f.config
    chip = cost.get_chip(f.chip, f.cpu_gflops)
    if f.sweep is None:
        r = cost.report(specs.build(config), chip, f.chip)
        print(json.dumps(r, indent=2) if f.json else format_report(r))
        return
    key, values = _parse_sweep(f.sweep, config)
    reports = sweep(config, key, values, chip, f.chip)
    path = f.out or f"tradeoffs_{key.split('.')[-1]}.png"
    plot_sweep(key, values, reports, path)
    if f.json:
        print(json.dumps({"key": key, "values": values, "reports": reports, "plot": path}, indent=2))
    else:
        print(format_sweep(key, values, reports))
        print(f"plot: {path}")


def define_flags() -> None:
    """The command line: python -m tools.tradeoffs --help."""
    cli.define_config_flag("Config file, configs/FILE.py or configs/FILE.py:ARG "
                           "(required); override its values with --config.KEY=VALUE.", lock_config=False)
    flags.DEFINE_bool("json", False, "Print a machine-readable JSON dict instead of a table.")
    flags.DEFINE_enum("chip", "h100", sorted(cost.CHIPS) + ["cpu"], "Chip for the latency roofline (cpu: this "
                      "machine, with a measured matmul rate).")
    flags.DEFINE_float("cpu_gflops", None, "With --chip=cpu: use this matmul rate in GFLOP/s instead of "
                       "measuring it.")
    flags.DEFINE_string("sweep", None, "Vary one config value: KEY=v1,v2,... e.g. knobs.flow_steps=1,5,10 (values "
                        "typed like the config's; default: no sweep, one report).")
    flags.DEFINE_string("out", None, "Path of the sweep's PNG plot (default: ./tradeoffs_<last part of KEY>.png).")
    flags.mark_flag_as_required("config")


if __name__ == "__main__":
    define_flags()
    app.run(main)
