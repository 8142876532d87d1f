"""FAST action tokens as π0.5 training targets: fit per robot dataset at the configured knobs,
stored beside its normalization statistics, loaded only for the knobs they were fit at.

    <dataset dir>/fast/h{H}_{control_hz}hz/
        bpe.model, fast.json   the FAST tokenizer (data/fast.py)
        meta.json              horizon, control_hz, action_dim, normalization, scale, vocab_size,
                               chunks fit on, and fast_report (tokens per chunk, round-trip error)

The chunks are exactly the pipeline's targets (`target_chunk`): the window's action chunk
(data/windows.py) resampled to the window's control rate and horizon H, normalized
with the statistics the source trains with (the dataset's stats.json, or the source's `stats`
file: DataSpec.stats_file), steps past the episode end holding the last action. FAST decodes
any token sequence into whatever [H, A] it is asked for, so a tokenizer fit at another horizon
would decode into a wrong trajectory without complaint: fits are keyed by (H, rate) and `load`
finds no other.

Cost: a fit reads whole episodes (reading a step decodes its images), about
WINDOWS_PER_EPISODE windows from each episode it reads, at most DataSpec.fast.fit_chunks windows.
"""
import dataclasses
import json
import os
from collections.abc import Sequence

import numpy as np

from data import fast, normalize, prompt, rlds, robot_data, stats, transform, windows
from data.spec import DataSpec, SourceSpec
from data.tokenizer import Tokenizer

FAST_DIR = "fast"
META_FILE = "meta.json"
WINDOWS_PER_EPISODE = 8
REPORT_CHUNKS = 1000


@dataclasses.dataclass(frozen=True)
class FastActions:
    """A fitted FAST tokenizer bound to the chunk shape and normalization it was fit for."""

    tokenizer: fast.FastTokenizer
    horizon: int
    action_dim: int  # the dataset's native action dims
    control_hz: float
    normalization: str

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def encode(self, chunk: np.ndarray) -> list[int]:
        """Normalized chunk [H, A_native] -> FAST token indices."""
        chunk = np.asarray(chunk)
        if chunk.shape != (self.horizon, self.action_dim):
            raise ValueError(f"FAST tokenizer fit for chunks {(self.horizon, self.action_dim)}, "
                             f"got {chunk.shape}")
        return self.tokenizer.encode(chunk)

    def decode(self, tokens: Sequence[int]) -> np.ndarray:
        """FAST token indices -> normalized chunk f32 [H, A_native]."""
        return self.tokenizer.decode(tokens, self.horizon, self.action_dim)

    def decode_generated(self, text_tokenizer: Tokenizer, tokens: Sequence[int]) -> np.ndarray:
        """Model ids of a generated π0.5 sequence (up to its first EOS; text ids ignored) ->
        normalized chunk f32 [H, A_native]; the policy unnormalizes it with the source's stats."""
        return self.decode(prompt.parse_fast_from_tokens(text_tokenizer, tokens))


def target_chunk(actions: np.ndarray, valid: np.ndarray, normalizer: normalize.Normalizer
                 ) -> np.ndarray:
    """A window's FAST target: its native chunk [H, A] normalized, held past the episode end."""
    return windows.hold_past_end(normalizer.normalize(actions), valid)


def fit_dir(dataset_dir: str, horizon: int, control_hz: float) -> str:
    return os.path.join(dataset_dir, FAST_DIR, f"h{horizon}_{control_hz:g}hz")


def sample_chunks(dataset: windows.RobotData, spec: windows.WindowSpec, hold_dims: Sequence[int],
                  normalizer: normalize.Normalizer, max_chunks: int, seed: int = 0,
                  errors: tuple[type[Exception], ...] = ()) -> np.ndarray:
    """Up to max_chunks target chunks f32 [N, H, A] of a dataset: a random subset of its
    episodes, each read once, and random steps of those (windows start at every native step).
    Episodes raising one of `errors` (unreadable records) are skipped, as data/stats.py does."""
    rng = np.random.default_rng(seed)
    lengths = np.asarray(dataset.episode_lengths)
    n_episodes = min(len(lengths), max(1, -(-max_chunks // WINDOWS_PER_EPISODE)))
    episodes = np.sort(rng.choice(len(lengths), n_episodes, replace=False))
    # Windows drawn uniformly over the chosen episodes' steps.
    starts = np.concatenate([[0], np.cumsum(lengths[episodes])])
    picks = np.sort(rng.choice(starts[-1], min(max_chunks, starts[-1]), replace=False))
    chunks = []
    for k, e in enumerate(episodes):
        steps = picks[(picks >= starts[k]) & (picks < starts[k + 1])] - starts[k]
        if not len(steps):
            continue
        try:
            arrays = dataset.lowdim(int(e))
        except errors:
            continue
        # In memory without images: the window code runs unchanged and reads nothing more.
        lowdim = windows.ArrayEpisode({}, arrays["state"], arrays["actions"], dataset.control_hz)
        for step in steps:
            w = windows.make_window(lowdim, int(step), spec, hold_dims)
            actions = transform.delta(dataset.spec, w["actions"], w["state"])
            chunks.append(target_chunk(actions, w["action_valid"], normalizer))
    if not chunks:
        raise ValueError(f"dataset {dataset.name!r}: no readable window to fit FAST on")
    return np.stack(chunks)


def fit_source(source: SourceSpec, data: DataSpec) -> dict:
    """Fit, save and report the FAST tokenizer of one robot source at the data's window.

    Fit on the train episodes; fast_report on windows of the eval episodes when the dataset has
    them (data.eval_split_of(source)), else on the fit sample. Returns the saved meta.json contents."""
    ddir, spec = data.dataset_dir(source), data.window
    fmt, eval_split = source.file_format, data.eval_split_of(source)
    train = robot_data.open_robot(ddir, source.spec, fmt, "train", eval_split)
    stats_file = data.stats_file(source)
    source_stats = stats.read(stats_file)
    stats.check(source_stats, data.normalization, train.state_dim, train.action_dim,
                f"source {source.name!r} (statistics {stats_file})")
    normalizer = normalize.normalizers(source_stats, data.normalization)["actions"]
    sample = sample_chunks(train, spec, train.spec.hold_dims, normalizer,
                           data.fast.fit_chunks, data.seed, (rlds.CorruptRecordError,))
    tokenizer = fast.fit(sample, data.fast.vocab_size, data.fast.scale)
    if robot_data.has_role(ddir, fmt, "eval", eval_split):
        heldout = robot_data.open_robot(ddir, source.spec, fmt, "eval", eval_split)
        report_on, report_chunks = eval_split, sample_chunks(
            heldout, spec, heldout.spec.hold_dims, normalizer, REPORT_CHUNKS, data.seed,
            (rlds.CorruptRecordError,))
    else:
        report_on, report_chunks = "train (the fit sample)", sample
    meta = dict(horizon=spec.horizon, control_hz=spec.control_hz, action_dim=train.action_dim,
                normalization=data.normalization, scale=tokenizer.scale,
                vocab_size=tokenizer.vocab_size, fit_chunks=len(sample), report_on=report_on,
                report=fast.fast_report(tokenizer, report_chunks))
    path = fit_dir(ddir, spec.horizon, spec.control_hz)
    tokenizer.save(path)
    with open(os.path.join(path, META_FILE + ".tmp"), "w") as f:
        json.dump(meta, f, indent=1)
    # meta.json last and atomically: its presence marks a complete fit.
    os.replace(os.path.join(path, META_FILE + ".tmp"), os.path.join(path, META_FILE))
    return meta


def fit_sources(data: DataSpec) -> dict[str, dict]:
    """fit_source for every robot source of the data: {name: meta}."""
    return {source.name: fit_source(source, data) for source in data.robot_sources}


def load(dataset_dir: str, horizon: int, control_hz: float, normalization: str) -> FastActions:
    """The FAST tokenizer fit at (horizon, control_hz) on normalization-normalized chunks.

    Raises FileNotFoundError naming the fits that do exist when there is none for these knobs,
    ValueError when the fit's normalization differs."""
    path = fit_dir(dataset_dir, horizon, control_hz)
    meta_path = os.path.join(path, META_FILE)
    if not os.path.isfile(meta_path):
        root = os.path.join(dataset_dir, FAST_DIR)
        present = sorted(os.listdir(root)) if os.path.isdir(root) else []
        raise FileNotFoundError(
            f"no FAST tokenizer for horizon {horizon} at {control_hz:g} Hz ({path}); fits "
            f"present: {present or 'none'}. A fit for other knobs cannot decode these chunks: "
            f"run `python -m tools.stats --config ... --config.data.fast_targets=True`")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta["normalization"] != normalization:
        raise ValueError(f"FAST tokenizer at {path} was fit on {meta['normalization']!r}-"
                         f"normalized actions, config.data.normalization is {normalization!r}; "
                         f"rerun tools.stats")
    return FastActions(fast.FastTokenizer.load(path), int(meta["horizon"]),
                       int(meta["action_dim"]), float(meta["control_hz"]), normalization)


def load_for_source(source: SourceSpec, data: DataSpec) -> FastActions:
    """load() at the data's window for one of its robot sources."""
    return load(data.dataset_dir(source), data.window.horizon, data.window.control_hz,
                data.normalization)
