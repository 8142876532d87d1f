"""Compute normalization statistics (and, with config.data.fast_targets, fit the FAST action
tokenizer) for every robot source of a config.

    python -m tools.stats --config configs/demo.py [--data_root DIR] [--workers N]

Writes <data_root>/<source path>/stats.json (see data/stats.py for contents and accuracy) and
<data_root>/<source path>/fast/h{H}_{hz}hz/ with meta.json holding fast_report (see
data/fast_targets.py).
"""
import json

from absl import app, flags
from ml_collections import config_flags

from data import fast_targets, stats

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=False)
_ROOT = flags.DEFINE_string("data_root", None, "Data root; default config.data.root.")
_WORKERS = flags.DEFINE_integer("workers", None, "Reader processes; default config.data.workers.")


def main(argv):
    del argv
    config = _CONFIG.value
    root = _ROOT.value or config.data.root
    result = stats.compute_stats(root, config, workers=_WORKERS.value)
    for name, s in result.items():
        print(f"{name}: {s['num_episodes']} episodes, {s['num_steps']} steps")
        for key in stats.KEYS:
            print(f"  {key}: " + json.dumps({k: s[key][k] for k in ("mean", "std", "q01", "q99")}))
    if config.data.fast_targets:
        for name, meta in fast_targets.fit_sources(root, config).items():
            print(f"{name}: FAST fit on {meta['fit_chunks']} chunks of horizon {meta['horizon']} "
                  f"at {meta['control_hz']:g} Hz, vocab {meta['vocab_size']}; fast_report on "
                  f"{meta['report_on']}: " + json.dumps(meta["report"]))


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
