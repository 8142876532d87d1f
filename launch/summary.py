r"""A sweep's results in one table (CSV and Markdown) and one plot against the swept knob.

    python -m launch.summary --root runs/sweep [--x knobs.context_frames] \
        [--metrics 'loss,eval/action_mae/*'] [--chip h100]

One row per run of ROOT/manifest.json: its swept values, status and last step, its final metrics
(the last value of each metric in WORKDIR/metrics.jsonl whose name matches a --metrics pattern),
and the cost model's view of its config (vla.cost): parameters, the inference latency bound of
an action chunk on --chip, and whether that fits the real-time budget of its control rate.
Writes ROOT/summary.csv, ROOT/summary.md and ROOT/summary.png: one panel per metric against the
--x knob (default: the first swept key that varies), one line per combination of the others.
ROOT and the runs' workdirs may be gs:// URLs: everything is read and written through
data/storage.py.
"""
from __future__ import annotations

import csv
import fnmatch
import io
import json
import math
from collections.abc import Sequence
from typing import Any

from absl import app, flags
from matplotlib.figure import Figure
from ml_collections import ConfigDict

from configs import specs
from configs.grid import informative_keys
from data import storage
from launch import common
from vla import cost
from vla.metrics import read_rows

# Closed-loop success (config.sim_eval) is listed when the runs logged it.
DEFAULT_METRICS = ("loss", "eval/action_mae/*", "eval/mean_action_mae/*", "eval/sim/success", "examples_per_s")


def final_metrics(workdir: str) -> dict[str, float]:
    """The last logged value of every metric, and the last logged step."""
    out: dict[str, float] = {}
    for row in read_rows(storage.fresh(workdir) / "metrics.jsonl"):
        out.update(row)
    return out


def table(manifest: dict[str, Any], patterns: Sequence[str], chip_name: str) -> tuple[list[str], list[dict]]:
    """(columns, rows) of a sweep manifest."""
    chip = cost.get_chip(chip_name)
    runs = manifest["runs"]
    keys = list(dict.fromkeys(k for r in runs for k in r["overrides"]))
    finals = [final_metrics(r["workdir"]) for r in runs]
    logged = list(dict.fromkeys(k for m in finals for k in m))
    metrics = list(dict.fromkeys(k for p in patterns for k in logged if fnmatch.fnmatchcase(k, p)))
    latency = f"chunk_ms_{chip_name}"
    rows = []
    for run, final in zip(runs, finals):
        r = cost.report(specs.build(ConfigDict(run["config"])), chip, chip_name)
        row = {"run": run["name"], "status": run["status"], "step": final.get("step"),
               **{k: run["overrides"].get(k) for k in keys}, **{m: final.get(m) for m in metrics},
               "params": r["params"]["total"], latency: r["latency"]["chunk_s"] * 1e3,
               "realtime": "yes" if r["realtime"]["fits"] else "no"}
        rows.append(row)
    return ["run", "status", "step", *keys, *metrics, "params", latency, "realtime"], rows


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10_000:
        return f"{value:,}"
    return str(value)


def write_csv(path: str, columns: Sequence[str], rows: Sequence[dict]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, columns)
    writer.writeheader()
    writer.writerows(rows)
    storage.path(path).write_text(text.getvalue())


def markdown(columns: Sequence[str], rows: Sequence[dict]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_text(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot(path: str, rows: Sequence[dict], x: str, series: Sequence[str], panels: Sequence[str]) -> None:
    """One panel per column in `panels` against x; one line per combination of `series` values."""
    values = list(dict.fromkeys(r[x] for r in rows))
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    position = {v: (v if numeric else i) for i, v in enumerate(values)}
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(", ".join(f"{k.rsplit('.', 1)[-1]}={r[k]}" for k in series) or "all", []).append(r)
    cols = min(3, len(panels))
    rows_n = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(5 * cols, 3.6 * rows_n))
    axes = fig.subplots(rows_n, cols, squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        for label, members in groups.items():
            points = sorted((position[r[x]], r[panel]) for r in members if isinstance(r.get(panel), (int, float)))
            if points:
                ax.plot(*zip(*points), "o-", label=label)
        ax.set_title(panel, fontsize=9)
        ax.set_xlabel(x)
        ax.set_xticks(list(position.values()), [str(v) for v in values])
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    with storage.path(path).open("wb") as f:
        fig.savefig(f, format="png", dpi=90)


def write(root: str, x: str | None = None, patterns: Sequence[str] = DEFAULT_METRICS,
          chip: str = "h100") -> dict[str, str]:
    """Writes ROOT/summary.{csv,md,png}; returns their paths. The plot shows the finished runs."""
    path = storage.fresh(root) / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run launch.sweep with --root {root} first")
    manifest = json.loads(path.read_text())
    columns, rows = table(manifest, patterns, chip)
    keys = list(dict.fromkeys(k for r in manifest["runs"] for k in r["overrides"]))
    shown = [r for r in rows if r["status"] == "finished"] or rows
    varying = [k for k in informative_keys([{k: r[k] for k in keys} for r in shown])
               if len({repr(r[k]) for r in shown}) > 1]
    x = x or (varying[0] if varying else keys[0] if keys else None)
    if x not in keys:
        raise ValueError(f"--x={x!r} is not a swept key; swept: {keys}")
    paths = {kind: storage.join(root, f"summary.{kind}") for kind in ("csv", "md", "png")}
    write_csv(paths["csv"], columns, rows)
    storage.path(paths["md"]).write_text(markdown(columns, rows))
    panels = [c for c in columns[3 + len(keys):] if any(isinstance(r.get(c), (int, float)) for r in shown)]
    plot(paths["png"], shown, x, [k for k in varying if k != x], panels)
    return paths


def main(argv: Sequence[str]) -> None:
    """Writes ROOT/summary.{csv,md,png} and prints the table and the paths."""
    del argv
    f = flags.FLAGS
    paths = write(f.root, f.x, [p.strip() for p in f.metrics.split(",") if p.strip()], f.chip)
    print(storage.path(paths["md"]).read_text())
    print("\n".join(paths.values()))


def define_flags() -> None:
    """The command line: python -m launch.summary --help."""
    flags.DEFINE_string("root", None, "Sweep directory, the one holding manifest.json (required); the summary "
                        "files are written there.")
    flags.DEFINE_string("x", None, "Swept config key on the plot's x axis, e.g. knobs.context_frames (default: "
                        "the first swept key that varies).")
    flags.DEFINE_string("metrics", ",".join(DEFAULT_METRICS), "Comma-separated metric name patterns (fnmatch "
                        "wildcards) whose final values become columns.")
    flags.DEFINE_string("chip", "h100", "Chip for the cost model's latency column: a name in vla.cost.CHIPS "
                        "(h100, h200, tpu_v4, ...) or cpu.")
    flags.mark_flag_as_required("root")


if __name__ == "__main__":
    define_flags()
    app.run(common.usage_errors(main))
