"""Compute normalization statistics (and, with config.data.fast_targets, fit the FAST action
tokenizer) for every robot source of a config; the statistics core is data/stats.py.

    python -m tools.stats --config configs/demo.py [--data_root DIR] [--workers N]

A gs:// data root is computed on a local copy (data/storage.stage) and the results are
written back into it. Writes <data_root>/<source path>/stats.json (see data/stats.py for contents and accuracy) and
<data_root>/<source path>/fast/h{H}_{hz}hz/ with meta.json holding fast_report (see
data/fast_targets.py).
"""
import dataclasses
import json
import os

from absl import app, flags

from configs import cli, specs
from data import fast_targets, rlds, robot_data, stats, storage
from data.spec import DataSpec


def compute_stats(data: DataSpec, workers: int | None = None, progress: bool = True
                  ) -> dict[str, dict]:
    """Compute and save stats.json for every robot source of the data (over its train episodes:
    evaluation episodes do not leak into normalization). Returns {source name: stats}.
    workers defaults to the data's reader workers."""
    workers = data.workers if workers is None else workers
    out = {}
    for source in data.robot_sources:
        directory = data.dataset_dir(source)
        opener = robot_data.robot_opener(directory, source.spec, source.file_format, "train",
                                         data.eval_split_of(source))
        out[source.name] = stats.dataset_stats(opener,
                                               workers=workers, progress=progress,
                                               errors=(rlds.CorruptRecordError,))
        stats.save_stats(directory, out[source.name])
    return out


def main(argv):
    """Computes (and writes) the statistics of every source and prints a summary of each."""
    del argv
    f = flags.FLAGS
    data = specs.build(f.config).data
    if f.data_root:
        data = dataclasses.replace(data, root=f.data_root)
    remote = data.root if storage.is_remote(data.root or "") else None
    if remote:  # computed on a local copy, the results written back beside the data
        data = dataclasses.replace(data, root=storage.stage(remote))
    result = compute_stats(data, workers=f.workers)
    for name, s in result.items():
        print(f"{name}: {s['num_episodes']} episodes, {s['num_steps']} steps")
        for key in stats.KEYS:
            print(f"  {key}: " + json.dumps({k: s[key][k] for k in ("mean", "std", "q01", "q99")}))
    if data.fast.enabled:
        for name, meta in fast_targets.fit_sources(data).items():
            print(f"{name}: FAST fit on {meta['fit_chunks']} chunks of horizon {meta['horizon']} "
                  f"at {meta['control_hz']:g} Hz, vocab {meta['vocab_size']}; fast_report on "
                  f"{meta['report_on']}: " + json.dumps(meta["report"]))
    if remote:
        for source in data.robot_sources:
            for name in (stats.STATS_FILE, fast_targets.FAST_DIR):
                local = os.path.join(data.dataset_dir(source), name)
                if os.path.exists(local):
                    storage.copy_tree(local, storage.join(remote, source.path, name))


def define_flags() -> None:
    """The command line: python -m tools.stats --help."""
    cli.define_config_flag("Config file, configs/FILE.py or configs/FILE.py:ARG "
                           "(required); override its values with --config.KEY=VALUE.", lock_config=False)
    flags.DEFINE_string("data_root", None, "Data root holding the config's sources; the results are written there "
                        "too (default: config.data.root).")
    flags.DEFINE_integer("workers", None, "Reader processes (default: config.data.workers).")
    flags.mark_flag_as_required("config")


if __name__ == "__main__":
    define_flags()
    app.run(main)
