"""Input pipeline benchmarks: throughput per source, format and mixture; LeRobot decoding against
LeRobot's own loader; TFRecord conversion; start-up time.

Throughput (default): examples/s per source and for the mixture, by worker count.

    python -m tools.bench_data --config configs/demo.py [--data_root DIR] [--workers 0,1,2]
    # π0 shapes on the same data (missing cameras are zero and masked but still batched):
    python -m tools.bench_data --config configs/demo.py --config.model.image_size=224 \
        --config.model.cameras="('corner2','corner3','gripperPOV')"
    # a source in another format, added to the config's sources (weight 0: its own row only,
    # left out of the mixture); the same NAME replaces a source, NAME=none removes one:
    python -m tools.bench_data --config configs/demo.py --data_root DIR --source \
        'lerobot={"kind": "robot", "format": "lerobot", "path": "metaworld_lerobot",
                  "spec": "metaworld_lerobot", "stats": "metaworld_rlds/stats.json", "weight": 0}'
    # only some rows: --rows metaworld,mixture

Each row builds a fresh pipeline (a source alone at weight 1; the mixture of the sources of
positive weight), discards the first --warmup batches (worker start-up, file opening) and times
the next --batches batches. Printed: examples/s by wall time, CPU ms per example of this process
and its worker processes together ("all") and of this process alone ("main", the trainer's
share), and examples/s per core (1000 / all-CPU ms per example: what a host with more cores
could scale to). On a shared machine wall time swings; the CPU columns are steadier.

LeRobot decoding, ours (data/lerobot.py) and LeRobot's own loader (PyPI lerobot-dataset 0.4.4,
`ledataset`, run in a child process with a stand-in torchvision and PyAV video decoding, as
tests/test_lerobot.py runs it), on the same items of the same dataset:

    python -m tools.bench_data --lerobot_decode DIR [--lerobot_spec metaworld_lerobot] [--items 300]

Conversion rate of `tools.convert rlds` (TFRecord -> ArrayRecord) into a temporary folder:

    python -m tools.bench_data --convert TFRECORD_DIR [--convert_workers 1,2]   # 0: the tool's default

Start-up: from a fresh process to the first batch of make_pipeline, per robot source of the
config alone, with its episode lengths in metadata.json (RLDS, when present), and on a
hard-linked copy without them: the index built by parsing ("cold"), then cached beside the data
("warm"). tools/make_bench_data.py writes a 10k-episode dataset and prints the command.

    python -m tools.bench_data --config configs/demo.py --data_root DIR --startup [--source ...]
"""
from __future__ import annotations

import ast
import contextlib
import dataclasses
import json
import os
import pickle
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import psutil
from absl import app, flags, logging

from configs import cli, specs
from data import pipeline
from data.spec import DataSpec, SourceSpec
from tools import reference_loaders

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIXTURE = "mixture"


# ------------------------------------------------------------------ config: sources
def _literal(node: ast.AST) -> Any:
    """ast.literal_eval, also accepting dict(key=literal, ...) calls, as configs write sources."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args:
        return {k.arg: _literal(k.value) for k in node.keywords}
    if isinstance(node, ast.Dict):
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values)}
    return ast.literal_eval(node)


def parse_entry(text: str) -> dict[str, Any] | None:
    """A --source value: a JSON object, a Python dict literal or dict(...) call; "none" or "" ->
    None (remove the source)."""
    text = text.strip()
    if text.lower() in ("", "none"):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        try:
            value = _literal(ast.parse(text, mode="eval").body)
        except (ValueError, SyntaxError, TypeError) as e:
            raise app.UsageError(f"--source value {text!r} is neither JSON nor a Python dict: {e}") from e
    if not isinstance(value, dict):
        raise app.UsageError(f"--source value {text!r} is not a dict of config.data.sources keys")
    return value


def apply_sources(config: Any, items: Sequence[str]) -> None:
    """--source NAME=ENTRY items: add or replace config.data.sources.NAME; NAME=none removes it."""
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name.strip():
            raise app.UsageError(f"--source {item!r}: expected NAME=ENTRY (ENTRY a dict, or none)")
        name, entry = name.strip(), parse_entry(text)
        if name in config.data.sources:
            del config.data.sources[name]
        elif entry is None:
            raise app.UsageError(f"--source {item!r}: no source {name!r} to remove; sources: "
                                 f"{sorted(config.data.sources)}")
        if entry is not None:
            config.data.sources[name] = entry


def rows(data: DataSpec, only: Sequence[str] = ()) -> list[tuple[str, DataSpec]]:
    """(label, data) per source alone at weight 1, and the mixture of the positive-weight
    sources; only: the labels to keep (source names, "mixture"), default all."""
    out = [(s.name, dataclasses.replace(data, sources=(dataclasses.replace(s, weight=1.0),)))
           for s in data.sources]
    mixed = tuple(s for s in data.sources if s.weight > 0)
    if mixed:
        out.append((MIXTURE, dataclasses.replace(data, sources=mixed)))
    unknown = set(only) - {label for label, _ in out}
    if unknown:
        raise app.UsageError(f"--rows {sorted(unknown)}: not a source of the config nor {MIXTURE!r}; rows: "
                             f"{[label for label, _ in out]}")
    return [(label, d) for label, d in out if not only or label in only]


def describe(sources: Sequence[SourceSpec]) -> str:
    """"metaworld rlds 0.8 + scenes_vl tfds 0.1": what a row reads."""
    return " + ".join(f"{s.name} {s.file_format} {s.weight:g}" for s in sources)


# ------------------------------------------------------------------ throughput
def _cpu_by_process() -> dict[int, float]:
    """User + system CPU seconds of this process and of each of its descendants, by pid."""
    me = psutil.Process()
    out = {}
    for p in [me, *me.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
    return out


@dataclasses.dataclass
class Rate:
    examples_per_s: float  # wall
    cpu_ms: float  # per example, this process and its workers
    main_cpu_ms: float  # per example, this process

    @property
    def per_core(self) -> float:
        return 1e3 / self.cpu_ms if self.cpu_ms > 0 else float("inf")


def measure(data: DataSpec, batches: int, warmup: int) -> Rate:
    """Throughput of one pipeline over `batches` batches after `warmup` untimed ones."""
    it = pipeline.make_pipeline(data, process_index=0, process_count=1)
    try:
        for _ in range(warmup):
            next(it)
        cpu0, main0, wall = _cpu_by_process(), time.process_time(), time.perf_counter()
        for _ in range(batches):
            next(it)
        wall, main, cpu1 = time.perf_counter() - wall, time.process_time() - main0, _cpu_by_process()
    finally:
        it.close()
    cpu = sum(t - cpu0.get(pid, 0.0) for pid, t in cpu1.items())
    n = batches * data.batch_size
    return Rate(n / wall, cpu / n * 1e3, main / n * 1e3)


def throughput(data: DataSpec, only: Sequence[str], workers: Sequence[int], batches: int, warmup: int) -> None:
    lay = data.layout
    print(f"batch {data.batch_size}, {len(lay.cameras)} cameras x {lay.frames} frames at {lay.image_size}^2, "
          f"{os.cpu_count()} CPUs; {batches} timed batches after {warmup}")
    print(f"{MIXTURE}: {describe([s for s in data.sources if s.weight > 0])}")
    print(f"{'source':<18}{'format':<10}{'workers':>8}{'examples/s':>12}{'CPU ms/ex all':>15}"
          f"{'main':>8}{'ex/s/core':>11}")
    for label, d in rows(data, only):
        fmt = d.sources[0].file_format if label != MIXTURE else "mix"
        for w in workers:
            r = measure(dataclasses.replace(d, workers=w), batches, warmup)
            print(f"{label:<18}{fmt:<10}{w:>8}{r.examples_per_s:>12.1f}{r.cpu_ms:>15.2f}{r.main_cpu_ms:>8.2f}"
                  f"{r.per_core:>11.1f}", flush=True)


# ------------------------------------------------------------------ start-up
_STARTUP_CHILD = textwrap.dedent("""
    import time
    t0, c0 = time.perf_counter(), time.process_time()
    import json, pickle, sys
    from absl import logging
    from data import pipeline
    logging.set_verbosity(logging.WARNING)
    t1 = time.perf_counter()
    with open(sys.argv[1], "rb") as f:
        data = pickle.load(f)
    it = pipeline.make_pipeline(data, process_index=0, process_count=1)
    t2 = time.perf_counter()
    next(it)
    t3, c3 = time.perf_counter(), time.process_time()
    print(json.dumps({"end": time.time(), "imports": t1 - t0, "make_pipeline": t2 - t1,
                      "first_batch": t3 - t2, "cpu": c3 - c0}), flush=True)
    it.close()
""")


def startup_run(data: DataSpec, scratch: str) -> dict[str, float]:
    """A fresh Python process building `data`'s pipeline and reading its first batch:
    {"total" (process start to the first batch), "imports", "make_pipeline", "first_batch",
    "cpu" (that process's CPU seconds up to the first batch)}."""
    spec_file = os.path.join(scratch, "data.pkl")
    with open(spec_file, "wb") as f:
        pickle.dump(data, f)
    start = time.time()
    run = subprocess.run([sys.executable, "-c", _STARTUP_CHILD, spec_file], cwd=ROOT, capture_output=True,
                         text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    if run.returncode or not lines:
        raise RuntimeError(f"start-up child failed ({run.returncode}):\n{run.stderr[-3000:]}")
    out = json.loads(lines[-1])
    out["total"] = out.pop("end") - start
    return out


def linked_copy(src: str, dst: str) -> str:
    """dst: a copy of the dataset folder src whose files are hard links where possible,
    without the cached index (data/storage.INDEX_DIR)."""
    from data import storage

    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, dst, copy_function=link, ignore=shutil.ignore_patterns(storage.INDEX_DIR))
    return dst


def drop_episode_lengths(builder_dir: str) -> None:
    """Removes episode_lengths from metadata.json (replacing the file: it may be a hard link)."""
    path = os.path.join(builder_dir, "metadata.json")
    with open(path) as f:
        metadata = json.load(f)
    metadata.pop("episode_lengths", None)
    os.remove(path)
    with open(path, "w") as f:
        json.dump(metadata, f)


def _builder_dir(path: str) -> str:
    from data import rlds

    return os.fspath(rlds.open_builder(path).data_dir)


def startup_cases(data: DataSpec, source: SourceSpec, scratch: str) -> Iterator[tuple[str, SourceSpec]]:
    """(case, source) to time, in order: as given when its lengths are in metadata.json, then a
    copy without them (or, LeRobot, without its cached index): cold, then warm."""
    path = data.dataset_dir(source)
    if source.file_format == "rlds":
        builder = _builder_dir(path)
        with open(os.path.join(builder, "metadata.json")) as f:
            if "episode_lengths" in json.load(f):
                yield "lengths in metadata.json", source
        copy = linked_copy(builder, os.path.join(scratch, os.path.basename(builder)))
        drop_episode_lengths(copy)
    else:
        copy = linked_copy(path, os.path.join(scratch, os.path.basename(os.path.normpath(path))))
    moved = dataclasses.replace(source, path=copy)
    yield "index cold (built)", moved
    yield "index warm (cached)", moved


def startup(data: DataSpec, only: Sequence[str], workers: Sequence[int]) -> None:
    robots = [s for s in data.sources if s.kind == "robot" and (not only or s.name in only)]
    if not robots:
        raise app.UsageError("--startup times robot sources; none selected")
    print(f"fresh process -> first batch (batch {data.batch_size}); seconds")
    print(f"{'source':<14}{'format':<9}{'episodes':>9}{'workers':>8}  {'case':<26}{'total':>7}{'imports':>9}"
          f"{'pipeline':>9}{'batch 1':>8}{'CPU':>7}")
    for source in robots:
        episodes = _episodes(data, source)
        for w in workers:
            with tempfile.TemporaryDirectory(prefix="bench_startup_") as scratch:
                for case, s in startup_cases(data, source, scratch):
                    d = dataclasses.replace(data, sources=(dataclasses.replace(s, weight=1.0),), workers=w)
                    r = startup_run(d, scratch)
                    print(f"{source.name:<14}{source.file_format:<9}{episodes:>9}{w:>8}  {case:<26}{r['total']:>7.2f}"
                          f"{r['imports']:>9.2f}{r['make_pipeline']:>9.2f}{r['first_batch']:>8.2f}{r['cpu']:>7.2f}",
                          flush=True)


def _episodes(data: DataSpec, source: SourceSpec) -> int:
    from data import robot_data

    return len(robot_data.open_robot(data.dataset_dir(source), source.spec, source.file_format))


# ------------------------------------------------------------------ LeRobot decoding
def _timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def decode_orders(lengths: np.ndarray, items: int, seed: int = 0) -> dict[str, list[int]]:
    """Global frame indices: the first `items` in order, and `items` drawn at random."""
    total = int(lengths.sum())
    n = min(items, total)
    rng = np.random.default_rng(seed)
    return {"in order": list(range(n)), "random": rng.choice(total, n, replace=False).tolist()}


def reference_decode(path: str, orders: dict[str, list[int]], scratch: str) -> dict[str, Any]:
    """LeRobot's own loader on the same items, timed in a child process (tools/reference_loaders.py)."""
    out = reference_loaders.lerobot("time", [path, json.dumps(orders)], scratch)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"the reference loader printed no timings:\n{out[-3000:]}")
    return json.loads(lines[-1])


def lerobot_decode(path: str, spec: str, items: int, seed: int = 0) -> None:
    """Frames/s of ours and of LeRobot's loader on the same items of the LeRobot dataset at path."""
    from data import lerobot

    path = os.path.abspath(path)
    with tempfile.TemporaryDirectory(prefix="bench_lerobot_") as scratch:
        copy = linked_copy(path, os.path.join(scratch, "dataset"))  # both open without a cached index
        wall, cpu = time.perf_counter(), time.process_time()
        ds = lerobot.LeRobotDataset(copy, spec)
        ours = {"open": [time.perf_counter() - wall, time.process_time() - cpu]}
        starts = np.concatenate([[0], np.cumsum(ds.episode_lengths)])
        orders = decode_orders(ds.episode_lengths, items, seed)
        cams = len(ds.cameras)

        def read(order: list[int]) -> None:
            for i in order:
                e = int(np.searchsorted(starts, i, side="right")) - 1
                ds.episode(e).steps([i - int(starts[e])])
        for name, order in orders.items():
            ours[name] = list(_timed(lambda order=order: read(order)))
        episodes = range(max(1, int(np.searchsorted(starts[1:], len(orders["in order"]), side="right"))))
        whole = _timed(lambda: [ds.episode(e).steps(range(int(ds.episode_lengths[e]))) for e in episodes])
        whole_frames = int(ds.episode_lengths[list(episodes)].sum())
        ref = reference_decode(copy, orders, scratch)
    info = ds.episode(0).steps([0])["images"]
    shape = next(iter(info.values())).shape[1:]
    print(f"{path}: LeRobot {ds.version}, {len(ds)} episodes, {int(starts[-1])} frames, {cams} cameras "
          f"{shape[0]}x{shape[1]}; {len(orders['in order'])} items (a frame of every camera, state, action)")
    print(f"{'reader':<28}{'access':<22}{'frames/s':>10}{'CPU ms/frame':>14}")
    for label, r in (("ours (data/lerobot.py)", ours), ("LeRobot 0.4.4 (ledataset)", ref)):
        for name, order in orders.items():
            wall, cpu = r[name]
            frames = len(order) * cams
            print(f"{label:<28}{name + ' items':<22}{frames / wall:>10.1f}{cpu / frames * 1e3:>14.2f}")
        print(f"{label:<28}{'open (index built)':<22}{'':>10}{'':>14}   {r['open'][0]:.2f} s wall, "
              f"{r['open'][1]:.2f} s CPU")
    frames = whole_frames * cams
    print(f"{'ours (data/lerobot.py)':<28}{'whole episodes':<22}{frames / whole[0]:>10.1f}"
          f"{whole[1] / frames * 1e3:>14.2f}   ({len(episodes)} episodes, as the episode cache reads them)")


# ------------------------------------------------------------------ conversion
def _children_cpu() -> float:
    """CPU seconds of this process's children that have exited (and their waited-for children)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return children.ru_utime + children.ru_stime


def convert(src: str, workers: Sequence[int]) -> None:
    """MB/s of `python -m tools.convert rlds --src SRC --out TMP --workers W`, the command itself run
    once per worker count (after one read of the source files, so every row finds them in the
    page cache)."""
    from data import convert_rlds

    src = convert_rlds.dataset_dir(src)
    for name in sorted(os.listdir(src)):
        with open(os.path.join(src, name), "rb") as f:
            while f.read(16 << 20):
                pass
    print(f"{src}\n{'workers':>8}{'MB':>9}{'seconds':>9}{'MB/s':>8}{'CPU s':>8}{'MB/CPU-s':>10}   (seconds, MB/s: "
          f"the tool's own; CPU: the whole command)")
    for w in workers:
        with tempfile.TemporaryDirectory(prefix="bench_convert_") as scratch:
            cpu = _children_cpu()
            run = subprocess.run([sys.executable, "-m", "tools.convert", "rlds", "--src", src, "--out",
                                  os.path.join(scratch, "out"), f"--workers={w}"], cwd=ROOT, capture_output=True,
                                 text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
            cpu = _children_cpu() - cpu
        found = re.search(r"([\d.]+) MB in ([\d.]+) s = ([\d.]+) MB/s", run.stdout)
        if run.returncode or not found:
            raise RuntimeError(f"tools.convert failed ({run.returncode}):\n{run.stdout[-1000:]}{run.stderr[-2000:]}")
        mb, seconds, rate = map(float, found.groups())
        print(f"{w:>8}{mb:>9.1f}{seconds:>9.2f}{rate:>8.1f}{cpu:>8.2f}{mb / cpu:>10.1f}", flush=True)


# ------------------------------------------------------------------ command line
def main(argv: Sequence[str]) -> None:
    """One benchmark per invocation: throughput (default), --startup, --lerobot_decode or --convert."""
    del argv
    logging.set_verbosity(logging.WARNING)  # TFDS logs every dataset opening at INFO
    f = flags.FLAGS
    workers = [int(w) for w in f.workers]
    if sum(map(bool, (f.startup, f.lerobot_decode, f.convert))) > 1:
        raise app.UsageError("give one of --startup, --lerobot_decode, --convert")
    if f.lerobot_decode:
        return lerobot_decode(f.lerobot_decode, f.lerobot_spec, f.items)
    if f.convert:
        return convert(f.convert, [int(w) for w in f.convert_workers])
    if f.config is None:
        raise app.UsageError("--config is required (throughput and --startup)")
    apply_sources(f.config, f.source)
    data = specs.build(f.config).data
    if f.data_root:
        data = dataclasses.replace(data, root=f.data_root)
    if f.startup:
        return startup(data, f.rows, workers)
    throughput(data, f.rows, workers, f.batches, f.warmup)


def define_flags() -> None:
    """The command line: python -m tools.bench_data --help."""
    cli.define_config_flag("Config file, configs/FILE.py or configs/FILE.py:ARG (throughput and --startup); "
                           "override its values with --config.KEY=VALUE.", lock_config=False)
    flags.DEFINE_string("data_root", None, "Data root holding the config's sources (default: config.data.root).")
    flags.DEFINE_multi_string("source", [], "NAME=ENTRY: add config.data.sources.NAME, or replace it, with "
                              "ENTRY, a JSON object or Python dict (or dict(...)) of source keys (kind, format, "
                              "path, spec, weight, stats, fields, ...); NAME=none removes it. Repeatable.")
    flags.DEFINE_list("rows", [], "Rows to run: source names and/or 'mixture' (default: all). With "
                      "--startup: the robot sources to time.")
    flags.DEFINE_list("workers", ["0", "1", "2"], "Comma-separated reader worker counts to compare, one row each "
                      "(0: read ahead in a thread of this process).")
    flags.DEFINE_integer("batches", 20, "Timed batches per row.")
    flags.DEFINE_integer("warmup", 2, "Untimed batches per row, before the timed ones (worker start-up, file "
                         "opening).")
    flags.DEFINE_bool("startup", False, "Time a fresh process to its first batch, per robot source: "
                      "episode lengths from metadata.json, index built (cold) and cached (warm).")
    flags.DEFINE_string("lerobot_decode", None, "A LeRobot dataset directory: frames/s of our reader and of "
                        f"LeRobot's own loader ({reference_loaders.LEROBOT}) on the same items.")
    flags.DEFINE_string("lerobot_spec", "metaworld_lerobot", "--lerobot_decode: the dataset spec (data/robots.py "
                        "name) our reader reads it with.")
    flags.DEFINE_integer("items", 300, "--lerobot_decode: items read per access order.")
    flags.DEFINE_string("convert", None, "A TFRecord TFDS dataset directory: MB/s of tools.convert rlds.")
    flags.DEFINE_list("convert_workers", ["1", "2"], "--convert: worker process counts, one row each.")


if __name__ == "__main__":
    define_flags()
    app.run(main)
