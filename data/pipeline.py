"""The training input pipeline: sources -> weighted mixture -> per-process batches -> prefetch.

    it = make_pipeline(config)               # split="train"; or "heldout"
    batch = next(it)                          # dict of numpy arrays, the batch contract
    it.metrics()                              # {"data/skipped/<source>": n, ...}
    element_spec(config)                      # global batch shapes, without opening data
    state = it.get_state(); it.set_state(s)   # JSON-able; grain.checkpoint handlers accept `it`

Per source (Grain MapDataset over example indices): this process's slice of the indices
(process_index::process_count), shuffled by seed and reshuffled every epoch, repeated forever,
read (bad records skipped) -> IterDataset. The sources are mixed with IterDataset.mix, whose
state is the position in every source plus the mixer's; a state saved under other weights
therefore restores (each source continues where it was, new weights apply from then on).
Batches are a function of (seed, process_index, process_count, workers): Grain slices the
sources per worker, so changing config.data.workers changes the order (deterministically).
Then batches of batch_size // process_count and, with config.data.workers > 0, prefetch in
worker processes (Grain mp_prefetch: each worker reads a slice of every source).

Bad data: reading an example that raises one of the bad-record errors (a CorruptRecordError
from data/rlds.py, an undecodable image) moves on to the next index of the same source and
counts the skip; the count travels inside the example (so it survives worker processes) and
the iterator sums it per source. config.data.strict=True re-raises the error instead, which
names dataset, episode and step.

The heldout split builds the same pipeline over the sources that have a "heldout" split (the
robot datasets; sources without one are left out, keeping their `source` index): a fresh
iterator always yields the same batches, so evaluations are comparable across steps.
"""
import contextlib
import os
from typing import Any, Iterator, Mapping

import grain
import numpy as np
from absl import flags
from PIL import UnidentifiedImageError

from data import fast_targets
from data import sources as sources_lib
from data.tokenizer import Tokenizer

SPLITS = ("train", "heldout")
# A run of this many bad records in a row means the dataset is broken, not unlucky.
MAX_CONSECUTIVE_SKIPS = 64
_SKIPPED = "_skipped"


class _Read:
    """Index -> example of one source, with its mixture index and the bad records skipped."""

    def __init__(self, source, index: int, strict: bool, errors: tuple[type[Exception], ...]):
        self._source, self._index, self._strict, self._errors = source, index, strict, errors

    def __call__(self, i: int) -> dict:
        n = len(self._source)
        for skipped in range(MAX_CONSECUTIVE_SKIPS):
            try:
                ex = self._source[(i + skipped) % n]
            except self._errors:
                if self._strict:
                    raise
                continue
            ex = dict(ex, source=np.int32(self._index))
            ex[_SKIPPED] = np.int32(skipped)
            return ex
        raise RuntimeError(f"source {self._source.name!r}: {MAX_CONSECUTIVE_SKIPS} bad records in "
                           f"a row from index {i % n}; the dataset looks corrupt")


class Pipeline(grain.DatasetIterator):
    """Iterator over batches; counts skipped records; carries what the trainer needs.

    Attributes: names (sorted source names; batch["source"] indexes them), tokenizer,
    normalizers {source: {"state", "actions": Normalizer}} and stats {source: stats.json}
    for robot sources, fast {source: FastActions} for robot sources with FAST targets,
    fast_token_start (first FAST id, for config.model.fast_token_start; None without FAST
    targets), batch_size (per process), layout (per-example shapes).
    """

    def __init__(self, inner: grain.DatasetIterator, names: list[str], batch_size: int,
                 process_count: int, layout: sources_lib.Layout, tokenizer: Tokenizer | None = None,
                 stats: Mapping[str, dict] | None = None, normalizers: Mapping | None = None,
                 fast: Mapping[str, fast_targets.FastActions] | None = None):
        super().__init__(inner)
        self.names, self.batch_size, self.layout = names, batch_size, layout
        self.process_count = process_count
        self.tokenizer, self.stats, self.normalizers = tokenizer, dict(stats or {}), normalizers
        self.fast = dict(fast or {})
        self.fast_token_start = (tokenizer.fast_offset if tokenizer is not None
                                 and tokenizer.n_fast_tokens else None)
        self._skipped = {n: 0 for n in names}

    def __next__(self) -> dict:
        batch = next(self._parent)
        skipped = batch.pop(_SKIPPED)
        counts = np.bincount(batch["source"], weights=skipped, minlength=len(self.names))
        for name, c in zip(self.names, counts):
            self._skipped[name] += int(c)
        return batch

    def metrics(self) -> dict[str, int]:
        """Bad records skipped so far per source (restored with the iterator state)."""
        return {f"data/skipped/{n}": c for n, c in self._skipped.items()}

    def get_state(self) -> dict[str, Any]:
        return {"grain": self._parent.get_state(), "skipped": dict(self._skipped)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["grain"])
        self._skipped = {n: int(state["skipped"].get(n, 0)) for n in self.names}

    def element_spec(self, global_batch: bool = False) -> dict[str, tuple[tuple[int, ...], Any]]:
        """{key: (shape, dtype)} of a batch ("images/<cam>" for images[cam]); the per-process
        batch, or the global one (batch_size * process_count) with global_batch=True."""
        b = self.batch_size * (self.process_count if global_batch else 1)
        return batch_spec(self.layout, b)


def batch_spec(layout: sources_lib.Layout, batch_size: int
               ) -> dict[str, tuple[tuple[int, ...], Any]]:
    """{key: (shape, dtype)} of a batch of `batch_size` ("images/<cam>" for images[cam])."""
    spec = {k: ((batch_size,) + shape, dtype) for k, (shape, dtype) in layout.spec().items()}
    spec["source"] = ((batch_size,), np.dtype(np.int32))
    return spec


def element_spec(config) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Shapes and dtypes of a GLOBAL batch of a config, without opening any data (model init)."""
    return batch_spec(sources_lib.Layout.from_config(config), int(config.batch_size))


def mix(sources: Mapping[str, Any], weights: Mapping[str, float], layout: sources_lib.Layout,
        *, seed: int, batch_size: int, process_index: int = 0, process_count: int = 1,
        workers: int = 0, prefetch: int = 2, strict: bool = False,
        errors: tuple[type[Exception], ...] = (), names: list[str] | None = None,
        **attrs) -> Pipeline:
    """Mix random-access sources ({name: source with __len__/__getitem__ -> example}).

    batch_size is the per-process batch. names: the full sorted list of sources that
    batch["source"] indexes (default sorted(sources)); sources of weight 0 are left out of
    the mixture but keep their index. errors: exception types counted as bad records.
    attrs: passed to Pipeline (tokenizer, stats, normalizers, fast).
    """
    names = names or sorted(sources)
    parts, part_weights = {}, {}
    for name in sorted(sources):
        if weights[name] <= 0:
            continue
        k = names.index(name)
        n = len(sources[name])
        if n < process_count:
            raise ValueError(f"source {name!r} has {n} examples, fewer than {process_count} "
                             f"processes")
        ds = grain.MapDataset.range(n)[process_index::process_count]
        # Distinct seeds per source: equal-length sources must not share one permutation.
        ds = ds.shuffle(seed=(seed * 1000003 + k) % 2**32).repeat()
        ds = ds.map(_Read(sources[name], k, strict, errors))
        parts[name] = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=
                                                           max(4, batch_size)))
        part_weights[name] = float(weights[name])
    if not parts:
        raise ValueError("no source has a positive weight")
    ds = grain.IterDataset.mix(parts, part_weights).batch(batch_size, drop_remainder=True)
    if workers > 0:
        # Grain's worker processes read absl flags; a program without absl.app has none parsed.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                         per_worker_buffer_size=prefetch))
    return Pipeline(iter(ds), names, batch_size, process_count, layout, **attrs)


def bad_record_errors() -> tuple[type[Exception], ...]:
    """The exceptions that mark a record as bad (skipped and counted, or raised if strict)."""
    from data.rlds import CorruptRecordError

    return (CorruptRecordError, UnidentifiedImageError)


def make_pipeline(config, split: str = "train", process_index: int | None = None,
                  process_count: int | None = None, data_root: str | None = None) -> Pipeline:
    """The pipeline of a config: every source of config.data.sources, mixed by weight.

    Everything that can be wrong with the config or the data files (unknown kind, missing path,
    spec, statistics, tokenizer or FAST fit, shapes the data cannot serve) raises here, before
    any batch.
    Returns a Pipeline yielding per-process batches of batch_size // process_count.

    π0.5 with config.data.fast_targets: robot examples carry FAST action tokens, the text
    tokenizer gets a FAST id range as large as the largest robot source's FAST vocabulary, and
    pipeline.fast_token_start is its first id.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if config.batch_size % process_count:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by "
                         f"{process_count} processes")
    root = data_root or config.data.root
    cfg = {name: dict(src) for name, src in config.data.sources.items()}
    fast = {}
    if config.model.mode == "pi05" and config.data.fast_targets:
        for name, src in sorted(cfg.items()):
            if src.get("kind") == "robot":
                with _naming_source(name, src):
                    fast[name] = fast_targets.load_for_source(root, src, config)
    tokenizer = Tokenizer(os.path.join(root, config.data.tokenizer),
                          n_fast_tokens=max((f.vocab_size for f in fast.values()), default=0))
    layout = sources_lib.Layout.from_config(config)
    built = {}
    for name, src in sorted(cfg.items()):
        with _naming_source(name, src):
            # Heldout data exists for robot datasets; text datasets have only "train".
            if (split != "train" and src.get("kind") in sources_lib.KINDS
                    and not sources_lib.has_split(root, src, split)):
                continue
            built[name] = sources_lib.make_source(name, src, config, root, split, tokenizer,
                                                  fast.get(name))
    robot = {n: s for n, s in built.items() if isinstance(s, sources_lib.RobotSource)}
    return mix(built, {n: float(cfg[n]["weight"]) for n in built}, layout, names=sorted(cfg),
               seed=int(config.seed), batch_size=config.batch_size // process_count,
               process_index=process_index, process_count=process_count,
               workers=int(config.data.workers), prefetch=int(config.data.prefetch),
               strict=bool(config.data.get("strict", False)), errors=bad_record_errors(),
               tokenizer=tokenizer, stats={n: s.stats for n, s in robot.items()},
               normalizers={n: s.normalizers for n, s in robot.items()},
               fast={n: f for n, f in fast.items() if n in built})


@contextlib.contextmanager
def _naming_source(name: str, src: dict) -> Iterator[None]:
    """Configuration and data-file errors, re-raised as ValueError naming the source."""
    try:
        yield
    except (ValueError, KeyError, OSError) as e:
        raise ValueError(f"config.data.sources.{name} = {src}: {e}") from e

