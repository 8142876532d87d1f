"""Input pipeline throughput: examples/s per source and for the mixture, by worker count.

    python -m tools.bench_data --config configs/demo.py [--data_root DIR] [--workers 0,1,2]
    # π0 shapes on the same data (missing cameras are zero and masked but still batched):
    python -m tools.bench_data --config configs/demo.py --config.model.image_size=224 \
        --config.model.cameras="('corner2','corner3','gripperPOV')"

Each row builds a fresh pipeline (source alone = that source at weight 1), discards the first
--warmup batches (worker start-up, file opening) and times the next --batches batches.
Wall time and this process's CPU time are both printed: on a shared machine wall time swings.
"""
import copy
import os
import time

from absl import app, flags, logging
from ml_collections import config_flags

from data import pipeline

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=False)
_ROOT = flags.DEFINE_string("data_root", None, "Data root; default config.data.root.")
_WORKERS = flags.DEFINE_list("workers", ["0", "1", "2"], "Worker counts to compare.")
_BATCHES = flags.DEFINE_integer("batches", 20, "Timed batches per row.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed batches per row.")


def measure(config, workers: int, batches: int, warmup: int, data_root: str | None
            ) -> tuple[float, float]:
    """(examples/s by wall time, main-process CPU seconds per example) of one pipeline."""
    config = copy.deepcopy(config)
    config.data.workers = workers
    it = pipeline.make_pipeline(config, process_index=0, process_count=1, data_root=data_root)
    try:
        for _ in range(warmup):
            next(it)
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(batches):
            next(it)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        it.close()
    n = batches * config.batch_size
    return n / wall, cpu / n


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # TFDS logs every dataset opening at INFO
    config = _CONFIG.value
    names = sorted(config.data.sources)
    rows = [(name, {n: float(n == name) for n in names}) for name in names]
    rows.append(("mixture", {n: float(config.data.sources[n]["weight"]) for n in names}))
    print(f"batch {config.batch_size}, {len(config.model.cameras)} cameras x "
          f"{config.knobs.context_frames} frames at {config.model.image_size}^2, "
          f"{os.cpu_count()} CPUs")
    print(f"{'source':<16}{'workers':>8}{'examples/s':>12}{'main CPU ms/ex':>16}")
    for label, weights in rows:
        cfg = copy.deepcopy(config)
        for n, w in weights.items():
            cfg.data.sources[n]["weight"] = w
        for workers in map(int, _WORKERS.value):
            rate, cpu = measure(cfg, workers, _BATCHES.value, _WARMUP.value, _ROOT.value)
            print(f"{label:<16}{workers:>8}{rate:>12.1f}{cpu * 1e3:>16.2f}", flush=True)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
