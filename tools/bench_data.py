"""Input pipeline throughput: examples/s per source and for the mixture, by worker count.

    python -m tools.bench_data --config configs/demo.py [--data_root DIR] [--workers 0,1,2]
    # π0 shapes on the same data (missing cameras are zero and masked but still batched):
    python -m tools.bench_data --config configs/demo.py --config.model.image_size=224 \
        --config.model.cameras="('corner2','corner3','gripperPOV')"

Each row builds a fresh pipeline (source alone = that source at weight 1), discards the first
--warmup batches (worker start-up, file opening) and times the next --batches batches.
Wall time and this process's CPU time are both printed: on a shared machine wall time swings.
"""
import dataclasses
import os
import time

from absl import app, flags, logging

from configs import cli, specs
from data import pipeline
from data.spec import DataSpec


def measure(data: DataSpec, batches: int, warmup: int) -> tuple[float, float]:
    """(examples/s by wall time, main-process CPU seconds per example) of one pipeline."""
    it = pipeline.make_pipeline(data, process_index=0, process_count=1)
    try:
        for _ in range(warmup):
            next(it)
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(batches):
            next(it)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        it.close()
    n = batches * data.batch_size
    return n / wall, cpu / n


def main(argv):
    """Prints one row per source (and the mixture) and worker count."""
    del argv
    logging.set_verbosity(logging.WARNING)  # TFDS logs every dataset opening at INFO
    f = flags.FLAGS
    data = specs.build(f.config).data
    if f.data_root:
        data = dataclasses.replace(data, root=f.data_root)
    rows = [(s.name, tuple(dataclasses.replace(o, weight=float(o is s)) for o in data.sources))
            for s in data.sources]
    rows.append(("mixture", data.sources))
    lay = data.layout
    print(f"batch {data.batch_size}, {len(lay.cameras)} cameras x {lay.frames} frames at "
          f"{lay.image_size}^2, {os.cpu_count()} CPUs")
    print(f"{'source':<16}{'workers':>8}{'examples/s':>12}{'main CPU ms/ex':>16}")
    for label, sources in rows:
        for workers in map(int, f.workers):
            rate, cpu = measure(dataclasses.replace(data, sources=sources, workers=workers),
                                f.batches, f.warmup)
            print(f"{label:<16}{workers:>8}{rate:>12.1f}{cpu * 1e3:>16.2f}", flush=True)


def define_flags() -> None:
    """The command line: python -m tools.bench_data --help."""
    cli.define_config_flag("Config file, configs/FILE.py or configs/FILE.py:ARG "
                           "(required); override its values with --config.KEY=VALUE.", lock_config=False)
    flags.DEFINE_string("data_root", None, "Data root holding the config's sources (default: config.data.root).")
    flags.DEFINE_list("workers", ["0", "1", "2"], "Comma-separated reader worker counts to compare, one row each "
                      "(0: read ahead in a thread of this process).")
    flags.DEFINE_integer("batches", 20, "Timed batches per row.")
    flags.DEFINE_integer("warmup", 2, "Untimed batches per row, before the timed ones (worker start-up, file "
                         "opening).")
    flags.mark_flag_as_required("config")


if __name__ == "__main__":
    define_flags()
    app.run(main)
