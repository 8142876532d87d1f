"""Normalization statistics of a robot dataset's state and actions, streaming and in parallel.

Per array (state, actions) and per dim: mean, std (population, ddof=0), q01, q99, min, max, count.

Two passes over the episodes, each split into shards that worker processes read in parallel:
  1. exact moments: per-shard count/mean/M2/min/max, merged with Chan et al.'s parallel update
     (numerically equal to numpy's mean/std up to float64 rounding);
  2. quantiles: per-shard histograms of BINS fixed bins spanning [min, max] of pass 1, summed;
     a quantile is read off the cumulative counts with linear interpolation inside its bin, so
     |q_hist - q_exact| <= (max - min) / BINS per dim (BINS = 8192: 0.012% of the range).
Statistics are over the recorded native steps (not the resampled chunks: interpolation does not
leave the range of recorded values, and every step counts once).

Stored as JSON beside the dataset: <data.root>/<source path>/stats.json (see `stats_path`), or
read from any stats.json a robot source names with its `stats` key (DataSpec.stats_file), e.g. an
imported checkpoint's statistics converted by `from_openpi`.
"""
import concurrent.futures
import dataclasses
import functools
import json
import multiprocessing
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tqdm

from data import normalize, storage, transform

BINS = 8192
KEYS = ("state", "actions")
STATS_FILE = "stats.json"


@dataclasses.dataclass
class Moments:
    """Mergeable exact moments of rows x [n, D]."""

    count: int
    mean: np.ndarray  # f64 [D]
    m2: np.ndarray  # f64 [D], sum of squared deviations from the mean
    min: np.ndarray
    max: np.ndarray

    @classmethod
    def of(cls, x: np.ndarray) -> "Moments":
        x = np.asarray(x, np.float64)
        mean = x.mean(0)
        return cls(len(x), mean, ((x - mean) ** 2).sum(0), x.min(0), x.max(0))

    def merge(self, other: "Moments") -> "Moments":
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + delta ** 2 * (self.count * other.count / n)
        return Moments(n, mean, m2, np.minimum(self.min, other.min),
                       np.maximum(self.max, other.max))


def histogram(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, bins: int = BINS) -> np.ndarray:
    """Per-dim counts of x [n, D] in `bins` equal bins over [lo, hi] -> int64 [D, bins]."""
    x = np.asarray(x, np.float64)
    d = x.shape[1]
    width = hi - lo
    scale = np.divide(bins, width, out=np.zeros_like(width), where=width > 0)
    idx = np.clip(np.floor((x - lo) * scale), 0, bins - 1).astype(np.int64)
    flat = (idx + np.arange(d) * bins).ravel()
    return np.bincount(flat, minlength=d * bins).reshape(d, bins)


def hist_quantile(counts: np.ndarray, lo: np.ndarray, hi: np.ndarray, q: float) -> np.ndarray:
    """Quantile q per dim from counts [D, bins] over [lo, hi] -> f64 [D].

    numpy's linear method interpolates between the sorted values at ranks floor(r) and ceil(r),
    r = q * (n - 1). Each of the two is located in its bin (so is off by at most one bin width)
    and the same interpolation is applied: the result is within one bin width of numpy's.
    """
    d, bins = counts.shape
    cum = np.cumsum(counts, 1)
    width = (hi - lo) / bins

    def value_at_rank(j: int, k: int) -> float:
        b = int(np.searchsorted(cum[j], k, side="right"))  # first bin holding rank k
        below = cum[j, b - 1] if b > 0 else 0
        return lo[j] + (b + (k - below + 0.5) / counts[j, b]) * width[j]

    out = np.empty(d)
    for j in range(d):
        r = q * (cum[j, -1] - 1)
        f, c = int(np.floor(r)), int(np.ceil(r))
        vf, vc = value_at_rank(j, f), value_at_rank(j, c)
        out[j] = vf + (r - f) * (vc - vf)
    return np.clip(out, lo, hi)


# ------------------------------------------------------------------ parallel passes over episodes
# A worker opens the dataset once (in its initializer) and then reads shards of episode ids.
_dataset = None
_errors: tuple[type[Exception], ...] = ()


def _open(open_dataset: Callable[[], Any], errors: tuple[type[Exception], ...]) -> None:
    global _dataset, _errors
    _dataset, _errors = open_dataset(), errors


def _episode_arrays(ids: Sequence[int]):
    """{"state", "actions"} of each non-empty episode of a shard, read without decoding an image,
    actions as the model is trained on them (data/transform.delta); None for an unreadable one
    (both passes skip the same episodes)."""
    lengths = _dataset.episode_lengths
    for e in ids:
        if not lengths[int(e)]:
            continue
        try:
            arrays = _dataset.lowdim(int(e))
        except _errors:
            yield None
            continue
        yield {"state": arrays["state"],
               "actions": transform.delta(_dataset.spec, arrays["actions"], arrays["state"])}


def _moments_pass(ids: Sequence[int]) -> dict:
    out = {k: Moments(0, 0, 0, 0, 0) for k in KEYS}
    out["skipped"] = 0
    for arrays in _episode_arrays(ids):
        if arrays is None:
            out["skipped"] += 1
        else:
            for k in KEYS:
                out[k] = out[k].merge(Moments.of(arrays[k]))
    return out


def _hist_pass(ids: Sequence[int], ranges: dict, bins: int) -> dict:
    out = {k: np.zeros((len(ranges[k][0]), bins), np.int64) for k in KEYS}
    for arrays in filter(None, _episode_arrays(ids)):
        for k in KEYS:
            out[k] += histogram(arrays[k], *ranges[k], bins)
    return out


def _run(fn, shards, pool, desc, progress):
    bar = tqdm.tqdm(total=sum(map(len, shards)), desc=desc, disable=not progress, unit="ep")
    futures = [pool.submit(fn, s) for s in shards] if pool else None
    results = []
    for i, s in enumerate(shards):
        results.append(futures[i].result() if pool else fn(s))
        bar.update(len(s))
    bar.close()
    return results


def dataset_stats(open_dataset: Callable[[], Any], workers: int = 0, bins: int = BINS,
                  progress: bool = True, errors: tuple[type[Exception], ...] = ()) -> dict:
    """Statistics of every episode of a robot dataset.

    open_dataset: picklable zero-argument callable returning a dataset with len() and
      .episode(i).steps(indices) -> {"state": [n, S], "actions": [n, A], ...} (data/rlds.py's
      RobotDataset); each worker process calls it once.
    workers: processes reading shards in parallel (0 = this process).
    errors: exception types of unreadable episodes; these are skipped and counted.
    Returns {"state": {...}, "actions": {...}, "num_episodes", "num_steps", "skipped_episodes",
    "quantile_method"}; each array's entry holds lists mean, std, q01, q99, min, max [D] and
    an int count.
    """
    n = len(open_dataset())
    if n == 0:
        raise ValueError("dataset has no episodes")
    nshards = max(1, min(n, 4 * max(workers, 1)))
    shards = [s.tolist() for s in np.array_split(np.arange(n), nshards)]
    pool = None
    if workers > 0:
        # spawn, not fork: the parent may hold threads (grain, TFDS) that fork would deadlock on.
        pool = concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"), initializer=_open,
            initargs=(open_dataset, errors))
    else:
        _open(open_dataset, errors)
    try:
        parts = _run(_moments_pass, shards, pool, "stats 1/2 moments", progress)
        moments = {k: functools.reduce(Moments.merge, [p[k] for p in parts]) for k in KEYS}
        if moments["state"].count == 0:
            raise ValueError("dataset has no readable steps")
        ranges = {k: (moments[k].min, moments[k].max) for k in KEYS}
        fn = functools.partial(_hist_pass, ranges=ranges, bins=bins)
        hists = _run(fn, shards, pool, "stats 2/2 quantiles", progress)
    finally:
        if pool:
            pool.shutdown()
    out = dict(num_episodes=n, num_steps=moments["state"].count,
               skipped_episodes=sum(p["skipped"] for p in parts),
               quantile_method=f"histogram, {bins} bins over [min, max] per dim; "
                               f"error <= (max - min) / {bins}")
    for k in KEYS:
        m = moments[k]
        lo, hi = ranges[k]
        counts = sum(h[k] for h in hists)
        out[k] = dict(mean=m.mean.tolist(), std=np.sqrt(m.m2 / m.count).tolist(),
                      q01=hist_quantile(counts, lo, hi, 0.01).tolist(),
                      q99=hist_quantile(counts, lo, hi, 0.99).tolist(),
                      min=m.min.tolist(), max=m.max.tolist(), count=int(m.count))
    return out


def stats_path(dataset_dir: str) -> str:
    """Where a dataset's statistics live: beside its data, <dataset_dir>/stats.json."""
    return os.path.join(dataset_dir, STATS_FILE)


def save_stats(dataset_dir: str, stats: dict) -> str:
    return write(stats_path(dataset_dir), stats)


def load_stats(dataset_dir: str) -> dict:
    return read(stats_path(dataset_dir))


def write(path: str | os.PathLike, stats: dict) -> str:
    """Writes a stats.json to path (local or gs://); a local file appears whole or not at all."""
    out = storage.path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(stats, indent=1)
    if storage.is_remote(out):
        out.write_text(text)  # a gs:// object is replaced whole by a write anyway
    else:
        tmp = out.parent / (out.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out)  # readers never see a half-written file
    return os.fspath(out)


def read(path: str | os.PathLike) -> dict:
    """A stats.json from path (local or gs://); FileNotFoundError names it."""
    p = storage.path(path)
    if not p.exists():
        raise FileNotFoundError(f"no normalization statistics at {os.fspath(p)}; a dataset's "
                                f"own come from `python -m tools.stats --config ...`")
    return json.loads(p.read_text())


# ------------------------------------------------------------------ openpi's statistics
OPENPI_FIELDS = ("mean", "std", "q01", "q99")  # openpi shared/normalize.py NormStats
# Our fields openpi does not record; None (JSON null) says they are unknown, and nothing that
# normalizes reads them.
OPENPI_LACKS = ("min", "max", "count")


def from_openpi(path: str | os.PathLike) -> dict:
    """openpi's norm_stats.json (openpi.shared.normalize.save: {"norm_stats": {"state": {mean,
    std, q01, q99}, "actions": {...}}}, e.g. a checkpoint's assets/<asset_id>/norm_stats.json)
    -> our stats.json contents, for data/normalize.py and `write`.

    Per array: mean, std, q01, q99 [D] as openpi has them (openpi writes q01/q99 as null when it
    computed none; such statistics serve "meanstd" normalization only, and `check` refuses them
    for "quantile"); min, max and count, which openpi does not record, are None. Top level:
    num_episodes, num_steps and skipped_episodes None, quantile_method naming openpi's, and
    from_openpi = the file read. Other keys of openpi's file are left out.
    """
    where = os.fspath(storage.path(path))
    norm_stats = read(path).get("norm_stats")
    missing = [k for k in KEYS if not isinstance((norm_stats or {}).get(k), dict)]
    if missing:
        raise ValueError(f"{where}: not an openpi norm_stats.json, no norm_stats entry for "
                         f"{missing}")
    out = dict(num_episodes=None, num_steps=None, skipped_episodes=None,
               quantile_method="openpi (shared/normalize.py RunningStats: 5000-bin histograms "
                               "over [min, max] per dim)",
               from_openpi=where)
    for k in KEYS:
        entry = norm_stats[k]
        absent = [f for f in ("mean", "std") if entry.get(f) is None]
        if absent:
            raise ValueError(f"{where}: norm_stats.{k} has no {absent}")
        out[k] = {f: _floats(entry.get(f)) for f in OPENPI_FIELDS}
        out[k].update(dict.fromkeys(OPENPI_LACKS))
    return out


def _floats(values: Any) -> list[float] | None:
    return None if values is None else np.asarray(values, np.float64).reshape(-1).tolist()


def check(stats: dict, normalization: str, state_dim: int, action_dim: int, where: str) -> None:
    """Raises ValueError, prefixed by `where` (the file and the source), when statistics cannot
    normalize a dataset of these native dims in this mode: a field the mode needs is absent or
    null, or the dims differ."""
    needs = {"quantile": ("q01", "q99"), "meanstd": ("mean", "std")}.get(normalization)
    if needs is None:
        raise ValueError(f"unknown normalization {normalization!r}; expected one of "
                         f"{normalize.MODES}")
    for k in KEYS:
        absent = [f for f in needs if (stats.get(k) or {}).get(f) is None]
        if absent:
            raise ValueError(f"{where}: {k} has no {absent}, which {normalization!r} "
                             f"normalization needs")
    dims = {k: len(stats[k][needs[0]]) for k in KEYS}
    native = {"state": state_dim, "actions": action_dim}
    if dims != native:
        raise ValueError(f"{where}: statistics have dims {dims}, the dataset has {native} "
                         f"(recompute the dataset's own with tools.stats, or name statistics of "
                         f"its dims in the source's `stats`)")
