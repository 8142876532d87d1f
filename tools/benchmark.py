"""A Meta-World benchmark, end to end and resumable: data, training, export, final evaluation.

    python -m tools.benchmark --config configs/metaworld.py:mt10 --workdir DIR [--config.key=value ...]

Stages, each a separate process (TensorFlow, which writes the datasets, and MuJoCo rendering
cannot share one), each skipped when its output is complete, so a killed benchmark is resumed
by running the same command again:
    generate   python -m tools.generate --config CONFIG --out DIR/data --overwrite
               (skipped once DIR/data/metaworld_rlds/stats.json, written last, exists)
    train      python -m vla.train --config CONFIG --workdir DIR --config.data.root=DIR/data
               (skipped once DIR holds the checkpoint of total_steps, else resumes from its
               newest; with config.sim_eval.tasks it evaluates the model in closed loop every
               sim_eval.every steps into DIR/sim_eval/step_N)
    export     python -m tools.export --workdir DIR --out DIR/bundle --overwrite
               (skipped when DIR/bundle holds the newest checkpoint's step)
    evaluate   python -m tools.eval --bundle DIR/bundle --episodes E --seed S --out DIR/eval/seed_S
               for each S in config.sim_eval.final_seeds, E = sim_eval.final_episodes, with
               sim_eval's max_steps, mode and inference_delay (LeRobot's protocol,
               vla/sim_eval.py; skipped per seed when its results are of the bundle's step)
then the report: DIR/benchmark.md and DIR/benchmark.json (success per task, per difficulty
group and overall, pooled over the seeds and per seed; the wall and CPU time of every stage),
DIR/success.png (closed-loop success against training step: the in-training evaluations and
the final one) and the failure GIFs under DIR/eval/seed_S/gifs/.

Stage times add up over resumed runs (a stage that is run again adds its new time).
"""
from __future__ import annotations

import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import ml_collections
from absl import app, flags

from configs import cli, specs
from data import storage
from vla import sim_eval

STAGES = ("generate", "train", "export", "evaluate")


@dataclasses.dataclass(frozen=True)
class Paths:
    """Where each stage writes, under the benchmark's workdir."""

    workdir: str

    def __getitem__(self, part: str) -> str:
        return os.path.join(self.workdir, part)

    @property
    def data(self) -> str:
        return self["data"]

    @property
    def bundle(self) -> str:
        return self["bundle"]

    def seed_dir(self, seed: int) -> str:
        return os.path.join(self.workdir, "eval", f"seed_{seed}")


def _run(command: list[str]) -> dict[str, float]:
    """Runs one stage to completion (a failure stops the benchmark); its wall and CPU seconds."""
    print("$ " + " ".join(command), flush=True)
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.time()
    subprocess.run(command, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"wall_s": time.time() - start,
            "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)}


def _read_json(path: str) -> dict[str, Any] | None:
    p = storage.path(path)
    return json.loads(p.read_text()) if p.exists() else None


def newest_checkpoint(workdir: str) -> int | None:
    """The newest step saved in WORKDIR/checkpoints (Orbax step directories), or None."""
    root = storage.path(workdir) / "checkpoints"
    steps = [int(p.name) for p in root.iterdir() if p.name.isdigit()] if root.exists() else []
    return max(steps, default=None)


def pool(per_seed: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Results of several seeds (sim_eval's results dicts, same tasks) as one: every episode
    counts, so rates are over episodes × seeds."""
    episodes = {task: [sim_eval.EpisodeResult(**e) for r in per_seed
                       for e in r["tasks"][task]["episode_results"]] for task in per_seed[0]["tasks"]}
    protocol = dict(per_seed[0]["protocol"], seed=[r["protocol"]["seed"] for r in per_seed],
                    episodes=sum(r["protocol"]["episodes"] for r in per_seed))
    return sim_eval.summarize(episodes, protocol, sum(r["timing"]["seconds"] for r in per_seed),
                              sum(r["timing"]["env_build_seconds"] for r in per_seed))


def success_curve(paths: Paths, final_step: int, final: dict[str, Any]
                  ) -> tuple[dict[int, dict[str, float]], dict[int, dict[str, float]]]:
    """({step: {"overall": rate, task: rate}} of the in-training evaluations in
    DIR/sim_eval/step_N, the same for the final evaluation at final_step)."""
    curve = {}
    sim = storage.path(paths["sim_eval"])
    for d in sim.iterdir() if sim.exists() else ():
        results = _read_json(os.path.join(paths["sim_eval"], d.name, "results.json"))
        if d.name.startswith("step_") and results:
            curve[int(d.name[5:])] = {"overall": results["overall"]["rate"],
                                      **{t: r["rate"] for t, r in results["tasks"].items()}}
    final_rates = {"overall": final["overall"]["rate"], **{t: r["rate"] for t, r in final["tasks"].items()}}
    return dict(sorted(curve.items())), {final_step: final_rates}


def plot_success(path: str, curve: dict[int, dict[str, float]], final: dict[int, dict[str, float]],
                 title: str) -> None:
    """success.png: overall (bold) and per-task success of the in-training evaluations against
    step, with the final evaluation (other scene seeds, more episodes) as stars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 5))
    steps = list(curve)
    tasks = sorted({k for rates in [*curve.values(), *final.values()] for k in rates} - {"overall"})
    cmap = plt.get_cmap("tab20")
    for i, task in enumerate(tasks):
        color = cmap(i % 20)
        if steps:
            ax.plot(steps, [100 * curve[s].get(task, float("nan")) for s in steps], color=color,
                    lw=1, alpha=0.7, label=task)
        for s, rates in final.items():
            ax.plot([s], [100 * rates.get(task, float("nan"))], "*", color=color, ms=8, alpha=0.7)
    if steps:
        ax.plot(steps, [100 * curve[s]["overall"] for s in steps], color="black", lw=3, marker="o",
                label="overall (in training)")
    for s, rates in final.items():
        ax.plot([s], [100 * rates["overall"]], "*", color="black", ms=16, label="overall (final)")
    ax.set(xlabel="training step", ylabel="closed-loop success (%)", ylim=(-3, 103), title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    storage.path(path).write_bytes(_png(fig))
    plt.close(fig)


def _png(fig) -> bytes:
    import io
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def format_report(config_name: str, pooled: dict[str, Any], per_seed: dict[int, dict[str, Any]],
                  stages: dict[str, dict[str, float]], step: int) -> str:
    """benchmark.md: the pooled table with a column per seed, the groups, and the stage times."""
    seeds = list(per_seed)
    head = "| task | group | success | " + " | ".join(f"seed {s}" for s in seeds) + " | mean steps |"
    lines = [f"# Meta-World benchmark: {config_name}, step {step}", "",
             f"{pooled['protocol']['episodes'] // len(seeds)} episodes a task for each of the scene "
             f"seeds {seeds} (LeRobot's protocol, vla/sim_eval.py).", "",
             head, "|---|---|---:|" + "---:|" * len(seeds) + "---:|"]
    for task, r in pooled["tasks"].items():
        cells = " | ".join(f"{100 * per_seed[s]['tasks'][task]['rate']:.1f}%" for s in seeds)
        lines.append(f"| {task} | {r['group']} | {100 * r['rate']:.1f}% ({r['successes']}/{r['episodes']}) "
                     f"| {cells} | {r['mean_steps']:.0f} |")
    lines += ["", "| group | tasks | success |", "|---|---:|---:|"]
    for name, g in pooled["groups"].items():
        lines.append(f"| {name} | {g['tasks']}/{g['of']} | {100 * g['rate']:.1f}% |")
    o = pooled["overall"]
    cells = ", ".join(f"seed {s}: {100 * per_seed[s]['overall']['rate']:.1f}%" for s in seeds)
    lines += [f"| **overall** | {len(pooled['tasks'])} | **{100 * o['rate']:.1f}%** "
              f"({o['successes']}/{o['episodes']}; {cells}) |", "",
              "| stage | wall | CPU |", "|---|---:|---:|"]
    for name in STAGES:
        if name in stages:
            lines.append(f"| {name} | {stages[name]['wall_s'] / 60:.1f} min | "
                         f"{stages[name]['cpu_s'] / 60:.1f} min |")
    wall, cpu = (sum(s[k] for s in stages.values()) for k in ("wall_s", "cpu_s"))
    lines.append(f"| **total** | **{wall / 60:.1f} min** | {cpu / 60:.1f} min |")
    return "\n".join(lines) + "\n"


def run(config: ml_collections.ConfigDict, config_arg: str, workdir: str,
        overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Runs (or resumes) every stage into workdir. config: the loaded config, which is
    `config_arg` ("FILE[:ARG]") with `overrides` ("--config.key=value" strings, what the stages'
    command lines get); returns benchmark.json's contents."""
    spec = specs.build(config)
    if not spec.generation.tasks:
        raise ValueError(f"{config_arg}: config.data.tasks is empty; a benchmark generates its "
                         f"data from Meta-World tasks")
    paths = Paths(workdir)
    python = sys.executable
    config_flags = ["--config", config_arg, *overrides]
    report = _read_json(paths["benchmark.json"]) or {}
    stages: dict[str, dict[str, float]] = report.get("stages", {})

    def timed(name: str, command: list[str]) -> None:
        t = _run(command)
        stages[name] = {k: stages.get(name, {}).get(k, 0.0) + v for k, v in t.items()}
        storage.path(workdir).mkdir(parents=True, exist_ok=True)
        storage.path(paths["benchmark.json"]).write_text(json.dumps(dict(report, stages=stages), indent=1))

    if not storage.path(os.path.join(paths.data, "metaworld_rlds", "stats.json")).exists():
        timed("generate", [python, "-m", "tools.generate", *config_flags, "--out", paths.data,
                           "--overwrite"])
    if newest_checkpoint(workdir) != spec.train.total_steps:
        timed("train", [python, "-m", "vla.train", *config_flags, "--workdir", workdir,
                        f"--config.data.root={paths.data}"])
    step = newest_checkpoint(workdir)
    bundle = _read_json(os.path.join(paths.bundle, "metadata.json"))
    if not bundle or bundle.get("step") != step:
        timed("export", [python, "-m", "tools.export", "--workdir", workdir, "--out", paths.bundle,
                         "--overwrite"])
    s = spec.sim_eval
    tasks = ",".join(spec.generation.tasks)
    per_seed = {}
    for seed in s.final_seeds:
        out = paths.seed_dir(seed)
        results = _read_json(os.path.join(out, "results.json"))
        if not results or results["policy"].get("step") != step \
                or results["protocol"]["episodes"] != s.final_episodes:
            timed("evaluate", [python, "-m", "tools.eval", "--bundle", paths.bundle, "--tasks", tasks,
                               "--episodes", str(s.final_episodes), "--seed", str(seed),
                               "--gifs", "0", "--failure_gifs", str(s.failure_gifs),
                               "--max_steps", str(s.max_steps),
                               "--mode", s.mode, "--inference_delay", str(s.inference_delay),
                               "--out", out])
            results = _read_json(os.path.join(out, "results.json"))
        per_seed[seed] = results
    pooled = pool(list(per_seed.values()))
    curve, final = success_curve(paths, step, pooled)
    plot_success(paths["success.png"], curve, final, f"{config_arg}: closed-loop success")
    table = format_report(config_arg, pooled, per_seed, stages, step)
    storage.path(paths["benchmark.md"]).write_text(table)
    report = dict(config=config_arg, overrides=list(overrides), step=step, stages=stages,
                  overall=pooled["overall"], groups=pooled["groups"],
                  tasks={t: {k: r[k] for k in ("group", "successes", "episodes", "rate", "mean_steps")}
                         for t, r in pooled["tasks"].items()},
                  per_seed={str(seed): r["overall"] for seed, r in per_seed.items()},
                  curve={str(k): v for k, v in curve.items()})
    storage.path(paths["benchmark.json"]).write_text(json.dumps(report, indent=1))
    print(table)
    print(f"success curve: {os.path.join(workdir, 'success.png')}; failure GIFs: {workdir}/eval/seed_*/gifs/")
    return report


def main(argv: Sequence[str]) -> None:
    """Runs the benchmark; the stages get the --config.key=value overrides exactly as given."""
    del argv
    f = flags.FLAGS
    overrides = [a for a in sys.argv[1:] if a.startswith("--config.")]
    if any("=" not in a for a in overrides):
        raise app.UsageError("give config overrides as --config.key=value (with '=')")
    run(f.config, f["config"].config_filename, f.workdir, overrides)


def define_flags() -> None:
    """The command line: python -m tools.benchmark --help."""
    cli.define_config_flag("Config file with its argument, e.g. configs/metaworld.py:mt10.")
    flags.DEFINE_string("workdir", None, "Where data, checkpoints, bundle, evaluations and the report go.")
    flags.mark_flags_as_required(["config", "workdir"])


if __name__ == "__main__":
    define_flags()
    app.run(main)
