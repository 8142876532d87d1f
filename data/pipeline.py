"""The training input pipeline: sources -> weighted mixture -> global batches -> this process's rows.

    it = make_pipeline(data, "train", process_index=i, process_count=n)   # data: DataSpec; or "eval"
    batch = next(it)                          # dict of numpy arrays, the batch contract
    it.metrics()                              # {"data/skipped/<source>": n, ...}
    element_spec(data)                        # global batch shapes, without opening data
    state = it.get_state(); it.set_state(s)   # JSON-able; grain.checkpoint handlers accept `it`

The global batch sequence is a function of (seed, global batch size, sources and weights) only:
not of the process count, nor of the number of reader workers. It is decided on indices, which
are cheap, and only then are examples read, which is the expensive part:

    per source: MapDataset.range(n).shuffle(seed, reshuffled every epoch).repeat() -> (source, i)
    IterDataset.mix of those index streams by weight -> global batches of indices
    -> rows [p*B/P, (p+1)*B/P) for process p of P -> read (bad records skipped) -> stacked batch

Every process walks the same index stream and reads only its own rows, which are the rows
jax.make_array_from_process_local_data expects from it when the batch is sharded over the data
axes in process order (vla/train.py), so P processes feed exactly the batches of one process.
The mixer's state is the position in every source's stream plus the mixer's own; a state saved
under other weights therefore restores (each source continues where it was, new weights apply
from then on), and it does not depend on P.

Batches are read ahead in a thread, or with DataSpec.workers > 0 in worker processes (Grain
mp_prefetch): each worker steps through the whole index stream and reads every workers-th batch,
and Grain's round-robin over the workers restores the global order. The iterator state's shape
depends on the number of workers, so a run resumes with the workers it saved with.

Bad data: reading an example that raises one of the bad-record errors (a CorruptRecordError
from data/rlds.py, an undecodable image) moves on to the first index of the source's next unit
(the next episode of a robot source, the next record of a text source), logs the bad unit once
and counts the skip; the count travels inside the example (so it survives worker processes) and
the iterator sums it per source over this process's rows. DataSpec.strict (config.data.strict)
re-raises the error instead, which names dataset, file, episode, step and the underlying error.
A source none of whose first few probed units can be read fails when the pipeline is built.

The "eval" role builds the same pipeline over the robot sources that can serve it: each reads
its eval split (DataSpec.eval_split_of: a named split such as "heldout" or "val", or a hash
hold-out "N%" of its train episodes, data/robot_data.py); sources without it, and text sources,
are left out, keeping their `source` index. A fresh iterator always yields the same batches, so
evaluations are comparable across steps.
"""
import contextlib
import dataclasses
import functools
from collections.abc import Iterator, Mapping
from typing import Any

import grain
import numpy as np
from absl import flags, logging
from PIL import UnidentifiedImageError

from data import fast_targets, rlds, robot_data, storage
from data import sources as sources_lib
from data.layout import Layout
from data.spec import DataSpec, SourceSpec
from data.tokenizer import Tokenizer

ROLES = robot_data.ROLES
# This many unreadable units (episodes) in a row means the dataset is broken, not unlucky.
MAX_BAD_IN_A_ROW = 64
# Units read at startup to tell a readable source from a wholly unreadable one.
PROBES = 8
_SKIPPED = "_skipped"


class _Read:
    """Index -> example of one source, with its mixture index; bad data skipped a whole unit
    (episode) at a time.

    A corrupt region of a shard makes every window of the episodes it covers unreadable, so a
    bad read moves on to the first index of the source's next unit (`source.next_unit`): the
    replacement is a fixed function of the index, which keeps the batches deterministic. Each
    unreadable unit is logged once per process, naming dataset, file, episode and cause.
    """

    def __init__(self, source, index: int, strict: bool, errors: tuple[type[Exception], ...]):
        self._source, self._index, self._strict, self._errors = source, index, strict, errors
        self._reported: set[int] = set()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_reported": set()}  # each process logs its own

    def __call__(self, i: int) -> dict:
        n = len(self._source)
        j, last = i % n, None
        for skipped in range(MAX_BAD_IN_A_ROW):
            try:
                ex = self._source[j]
            except self._errors as e:
                if self._strict:
                    raise
                self._report(j, e)
                j, last = self._source.next_unit(j) % n, e
                continue
            ex = dict(ex, source=np.int32(self._index))
            ex[_SKIPPED] = np.int32(skipped)
            return ex
        raise RuntimeError(f"source {self._source.name!r}: {MAX_BAD_IN_A_ROW} unreadable episodes in "
                           f"a row from index {i % n}; the dataset looks corrupt. Last error: {last}") from last

    def _report(self, j: int, error: Exception) -> None:
        unit = self._source.unit_of(j)
        if unit not in self._reported:
            self._reported.add(unit)
            logging.warning("source %r: skipping unreadable data (%s)", self._source.name, error)

    def check_readable(self) -> None:
        """Raises ValueError when none of a few evenly spaced units of the source can be read
        (a wrong or wholly corrupt file), so such a source fails at startup, not mid-run."""
        n = len(self._source)
        errors = []
        for j in dict.fromkeys(int(x) for x in np.linspace(0, n - 1, min(n, PROBES))):
            try:
                self._source[j]
                return
            except self._errors as e:
                errors.append(e)
        raise ValueError(f"source {self._source.name!r}: no readable data ({len(errors)} of its "
                         f"units tried, evenly spaced); first error: {errors[0]}") from errors[0]


def _tag(source: int, i: int) -> np.ndarray:
    """An index stream's element: (mixture index of the source, example index in it)."""
    return np.array([source, i], np.int64)


def _stack(examples: list[dict]) -> dict:
    """Examples (dicts of arrays, images a nested dict) -> one batch, stacked on a new axis 0."""
    first = examples[0]
    return {k: _stack([e[k] for e in examples]) if isinstance(first[k], dict)
            else np.stack([e[k] for e in examples]) for k in first}


class _ReadRows:
    """A global batch of (source, index) pairs -> this process's rows, read and stacked."""

    def __init__(self, reads: Mapping[int, _Read], rows: slice):
        self._reads, self._rows = dict(reads), rows

    def __call__(self, indices: np.ndarray) -> dict:
        return _stack([self._reads[int(k)](int(i)) for k, i in indices[self._rows]])


class _EveryNth(grain.IterDataset):
    """Passes every batch; in mp_prefetch worker w of W, only batches w, w + W, w + 2W, ...

    Grain slices a dataset per worker by calling set_slice(slice(w, None, W)) on it in the
    worker. Slicing the sources instead (Grain's default) would give every worker its own
    mixture, so the batches would depend on W; here each worker walks the whole (cheap) index
    stream, and Grain's round-robin over the workers yields the batches in the global order.
    """

    def __init__(self, parent: grain.IterDataset):
        super().__init__(parent)
        self._first, self._every = 0, 1

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        del sequential_slice  # batches are whole units either way
        self._first, self._every = sl.start or 0, sl.step or 1

    def __iter__(self) -> grain.DatasetIterator:
        return _EveryNthIterator(self._parent.__iter__(), self._first, self._every)


class _EveryNthIterator(grain.DatasetIterator):
    """Its state is the parent's, taken just before the next batch it will return."""

    def __init__(self, parent: grain.DatasetIterator, first: int, every: int):
        super().__init__(parent)
        self._every = every
        for _ in range(first):
            next(self._parent)

    def __next__(self):
        batch = next(self._parent)
        for _ in range(self._every - 1):
            next(self._parent)
        return batch

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)


class Pipeline(grain.DatasetIterator):
    """Iterator over batches; counts skipped records; carries what the trainer needs.

    Attributes: names (sorted source names; batch["source"] indexes them), tokenizer,
    normalizers {source: {"state", "actions": Normalizer}} and stats {source: stats.json}
    for robot sources, fast {source: FastActions} for robot sources with FAST targets,
    fast_token_start (lowest FAST id, the model's VLAConfig.fast_token_start; None without FAST
    targets), batch_size (per process), layout (per-example shapes).
    """

    def __init__(self, inner: grain.DatasetIterator, names: list[str], batch_size: int,
                 process_count: int, layout: Layout, tokenizer: Tokenizer | None = None,
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


def batch_spec(layout: Layout, batch_size: int
               ) -> dict[str, tuple[tuple[int, ...], Any]]:
    """{key: (shape, dtype)} of a batch of `batch_size` ("images/<cam>" for images[cam])."""
    spec = {k: ((batch_size,) + shape, dtype) for k, (shape, dtype) in layout.spec().items()}
    spec["source"] = ((batch_size,), np.dtype(np.int32))
    return spec


def element_spec(data: DataSpec) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Shapes and dtypes of a GLOBAL batch of the data, without opening any of it (model init)."""
    return batch_spec(data.layout, data.batch_size)


def mix(sources: Mapping[str, Any], weights: Mapping[str, float], layout: Layout,
        *, seed: int, batch_size: int, process_index: int = 0, process_count: int = 1,
        workers: int = 0, prefetch: int = 2, strict: bool = False,
        errors: tuple[type[Exception], ...] = (), names: list[str] | None = None,
        **attrs) -> Pipeline:
    """Mix random-access sources ({name: source with __len__, __getitem__ -> example, and
    unit_of / next_unit, the unit bad data is skipped by: sources.RobotSource, TextSource}).

    batch_size is the GLOBAL batch; the iterator yields this process's batch_size //
    process_count rows of it. names: the full sorted list of sources that batch["source"]
    indexes (default sorted(sources)); sources of weight 0 are left out of the mixture but keep
    their index. errors: exception types counted as bad records. attrs: passed to Pipeline
    (tokenizer, stats, normalizers, fast).
    """
    if batch_size % process_count:
        raise ValueError(f"batch_size {batch_size} is not divisible by {process_count} processes")
    names = names or sorted(sources)
    streams, stream_weights, reads = {}, {}, {}
    for name in sorted(sources):
        if weights[name] <= 0:
            continue
        k = names.index(name)
        ds = grain.MapDataset.range(len(sources[name]))
        # Distinct seeds per source: equal-length sources must not share one permutation.
        ds = ds.shuffle(seed=(seed * 1000003 + k) % 2**32).repeat().map(functools.partial(_tag, k))
        # Indices cost nothing to produce: no prefetch threads.
        streams[name] = ds.to_iter_dataset(grain.ReadOptions(num_threads=0,
                                                              prefetch_buffer_size=0))
        stream_weights[name] = float(weights[name])
        reads[k] = _Read(sources[name], k, strict, errors)
        reads[k].check_readable()
    if not streams:
        raise ValueError("no source has a positive weight")
    local = batch_size // process_count
    ds = grain.IterDataset.mix(streams, stream_weights).batch(batch_size, drop_remainder=True)
    ds = _EveryNth(ds).map(_ReadRows(reads, slice(process_index * local,
                                                  (process_index + 1) * local)))
    if workers > 0:
        # Grain's worker processes read absl flags; a program without absl.app has none parsed.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                         per_worker_buffer_size=prefetch))
    else:
        # Read the next batches in a thread while the trainer's step runs.
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
    return Pipeline(iter(ds), names, local, process_count, layout, **attrs)


def bad_record_errors() -> tuple[type[Exception], ...]:
    """The exceptions that mark a record as bad (skipped and counted, or raised if strict)."""
    return (rlds.CorruptRecordError, UnidentifiedImageError)


def make_pipeline(data: DataSpec, role: str = "train", *, process_index: int,
                  process_count: int) -> Pipeline:
    """The pipeline of a run's data: every source, mixed by weight. A gs:// data root is read
    from a local copy (data/storage.stage).

    Everything that can be wrong with the spec or the data files (unknown kind, missing path,
    dataset spec, statistics, tokenizer or FAST fit, shapes the data cannot serve) raises here,
    before any batch.
    Returns a Pipeline yielding this process's rows of every global batch: batch_size //
    process_count of them (the trainer passes jax.process_index() and jax.process_count()).

    π0.5 with FAST targets (data.fast_targets): robot examples carry FAST action tokens, the
    text tokenizer gets a FAST id range as large as the largest robot source's FAST
    vocabulary, and pipeline.fast_token_start is its lowest id. The tokenizer's id layout and
    every prompt follow data.prompt_format ("openpi": FAST ids on the SentencePiece model's
    last pieces, vocab_size = its piece count; data/tokenizer.py).
    """
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")
    if data.root is not None and storage.is_remote(data.root):
        data = dataclasses.replace(data, root=storage.stage(data.root))
    fast = {}
    if data.fast_targets:
        for source in data.robot_sources:
            with _naming_source(source):
                fast[source.name] = fast_targets.load_for_source(source, data)
    tokenizer = Tokenizer(data.tokenizer_path(),
                          n_fast_tokens=max((f.vocab_size for f in fast.values()), default=0),
                          id_layout=data.prompt_format)
    built = {}
    for source in data.sources:
        with _naming_source(source):
            if role == "eval" and (source.kind != "robot" or not robot_data.has_role(
                    data.dataset_dir(source), source.file_format, role, data.eval_split_of(source))):
                continue
            built[source.name] = sources_lib.make_source(source, data, role, tokenizer,
                                                         fast.get(source.name))
    if role == "eval" and not built:
        offered = {s.name: robot_data.splits(data.dataset_dir(s), s.file_format) for s in data.robot_sources}
        raise ValueError(f"no robot source has the evaluation split: eval_split "
                         f"{data.eval_split!r}, the robot sources' splits are {offered}; set "
                         f"--config.data.eval_split to one of them, or to a hold-out such as '5%'")
    robot = {n: s for n, s in built.items() if isinstance(s, sources_lib.RobotSource)}
    return mix(built, {n: data.source(n).weight for n in built}, data.layout, names=data.names,
               seed=data.seed, batch_size=data.batch_size,
               process_index=process_index, process_count=process_count,
               workers=data.workers, prefetch=data.prefetch, strict=data.strict,
               errors=bad_record_errors(),
               tokenizer=tokenizer, stats={n: s.stats for n, s in robot.items()},
               normalizers={n: s.normalizers for n, s in robot.items()},
               fast={n: f for n, f in fast.items() if n in built})


@contextlib.contextmanager
def _naming_source(source: SourceSpec) -> Iterator[None]:
    """Configuration and data-file errors, re-raised as ValueError naming the source."""
    try:
        yield
    except (ValueError, KeyError, OSError) as e:
        raise ValueError(f"config.data.sources.{source.name} = {source.entry()}: {e}") from e

