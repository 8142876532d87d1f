"""Compute normalization statistics for every robot source of a config.

    python -m tools.stats --config configs/demo.py [--data_root DIR] [--workers N]

Writes <data_root>/<source path>/stats.json (see data/stats.py for contents and accuracy).
"""
import json

from absl import app, flags
from ml_collections import config_flags

from data import stats

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


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
