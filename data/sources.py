"""Mixture components: random-access sources that emit single examples of the batch contract.

Every source maps an index in [0, len) to one example laid out by data/layout.Layout (the
per-example shapes of the batch contract; the batch dimension is added by data/pipeline.py).

Kinds (SourceSpec.kind, data/spec.py):
    robot   windows over RLDS episodes (data/rlds.py): one example per (episode, native step);
            π0: prompt = instruction, no text target; π0.5: prompt = instruction + state bins,
            targets = the step's subtask (datasets that record one) and, with a FAST tokenizer
            (data/fast_targets.py), the chunk's FAST tokens; normalized with the dataset's
            stats.json or the source's `stats` file (DataSpec.stats_file)
    vl      vision-language examples: ours (written by data/scenes.py, format "tfds"), or
            webdataset tar shards / parquet files (format "webdataset" / "parquet",
            data/web_image_text.py): prompt -> target text
    video   video clips: ours (written by data/video.py, format "tfds"), real mp4 clips with a
            captions file (format "clips", data/video_clips.py), or a LeRobot dataset's videos
            (format "lerobot", data/lerobot.clip_source): t frames, prompt -> target
    tfds    any TFDS image-text dataset: path = its directory, or its registered name with
            data_dir; fields = dict of data/tfds_image_text.FieldMap (image_key, prompt
            template, target_key)
Foreign text formats take their reader's keyword arguments as `fields`.
Text examples keep frames of a camera the model has under that camera, else put their (first)
view in the first camera; other cameras, state and actions are zero and masked. Prompts follow
DataSpec.prompt_format (data/prompt.py).

Sources hold only picklable recipes (paths, spec values) and open their readers lazily in the
process that reads, so Grain can ship them to worker processes.
"""
import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from data import lerobot, normalize, prompt, robot_data, transform, video_clips, windows
from data import stats as stats_lib
from data import tfds_image_text as tit
from data import web_image_text as web
from data.fast_targets import FastActions
from data.layout import Layout
from data.spec import KINDS, DataSpec, SourceSpec
from data.tokenizer import Tokenizer


# ------------------------------------------------------------------ sources
class _Lazy:
    """Holds an opener; opens once per process and is pickled without the opened object."""

    def __init__(self, opener: Callable[[], Any]):
        self._opener = opener
        self._opened = None

    def get(self):
        if self._opened is None:
            self._opened = self._opener()
        return self._opened

    def __getstate__(self):
        return {"_opener": self._opener, "_opened": None}


# Episodes' state/actions are kept in memory per process when the whole dataset's fit in this
# budget: a window then decodes only its context frames instead of every chunk step's images.
LOWDIM_CACHE_BYTES = 256 << 20
# Decoded episodes, images included, kept per process when the whole dataset fits (the demo's
# 64² data is ~120 MB); reading and PNG-decoding an episode record dominates a window otherwise.
EPISODE_CACHE_BYTES = 1 << 30


class RobotSource:
    """Windows over a robot dataset: a flat index over (episode, native step) pairs.

    Per process, each episode is read once (decoding the episode) and kept: whole, images
    included, when the decoded dataset fits EPISODE_CACHE_BYTES (then a window is array
    indexing); else its state, actions and instruction, if those fit LOWDIM_CACHE_BYTES (then a
    window decodes only its context frames). An episode whose full read fails (a corrupt step) is
    read per window instead, so only the windows that touch the bad step fail.
    """

    def __init__(self, name: str, open_dataset: Callable[[], windows.RobotData], layout: Layout,
                 window: windows.WindowSpec, stats: dict,
                 normalization: str, tokenizer: Tokenizer, fast: FastActions | None = None,
                 prompt_format: str = "vla", stats_file: str = "stats.json"):
        """open_dataset: opens the episodes (data/robot_data.robot_opener), whose `spec` (a
        data/transform.DatasetSpec) turns windows into examples. fast: data/fast_targets.FastActions
        of this dataset at `window`'s horizon (π0.5 FAST targets; the tokenizer's FAST id range
        must hold its vocabulary), or None. stats_file: where `stats` came from, for messages."""
        self.name = name
        self._dataset = _Lazy(open_dataset)
        ds = self._dataset.get()
        lengths = np.asarray(ds.episode_lengths, np.int64)
        if lengths.sum() == 0:
            raise ValueError(f"source {name!r}: dataset has no steps")
        window.check(ds.control_hz)  # e.g. a context stride finer than the native period
        stats_lib.check(stats, normalization, ds.state_dim, ds.action_dim,
                        f"source {name!r} (statistics {stats_file})")
        self.stats = stats
        self.normalizers = normalize.normalizers(stats, normalization)
        native = {"state": ds.state_dim, "actions": ds.action_dim}
        if fast is not None and (fast.horizon, fast.action_dim) != (window.horizon, ds.action_dim):
            raise ValueError(f"source {name!r}: FAST tokenizer fit for chunks "
                             f"{(fast.horizon, fast.action_dim)}, windows are "
                             f"{(window.horizon, ds.action_dim)}")
        if fast is not None and fast.vocab_size > tokenizer.n_fast_tokens:
            raise ValueError(f"source {name!r}: FAST vocabulary {fast.vocab_size} exceeds the "
                             f"tokenizer's FAST range {tokenizer.n_fast_tokens}")
        if ds.state_dim > layout.state_dim or ds.action_dim > layout.action_dim:
            raise ValueError(f"source {name!r}: data dims {native} exceed model.state_dim="
                             f"{layout.state_dim} / model.action_dim={layout.action_dim}")
        self._starts = np.concatenate([[0], np.cumsum(lengths)])
        self.spec = ds.spec
        self._layout, self._window = layout, window
        self._hold = () if ds.spec is None else ds.spec.hold_dims
        self._tokenizer, self._fast, self._prompt_format = tokenizer, fast, prompt_format
        self._cache_on = lengths.sum() * (ds.state_dim + ds.action_dim) * 4 <= LOWDIM_CACHE_BYTES
        self._cache: dict[int, tuple | None] = {}
        self._keep_images: bool | None = None  # decided at the first episode read

    def __getstate__(self):
        return {**self.__dict__, "_cache": {}}  # each process fills its own

    def __len__(self) -> int:
        return int(self._starts[-1])

    def locate(self, i: int) -> tuple[int, int]:
        """Flat index -> (episode, step)."""
        e = int(np.searchsorted(self._starts, i, side="right")) - 1
        return e, int(i - self._starts[e])

    def unit_of(self, i: int) -> int:
        """The episode of index i: the unit bad data is skipped by."""
        return self.locate(i)[0]

    def next_unit(self, i: int) -> int:
        """The first index of the episode after i's (len(self) after the last)."""
        return int(self._starts[self.unit_of(i) + 1])

    def _episode(self, e: int) -> tuple:
        """(episode to cut windows from, its {"state", "actions"} or None, instruction)."""
        ep = self._dataset.get().episode(e)
        if not self._cache_on:
            return ep, None, ep.instruction
        if e not in self._cache:
            try:
                # Once images are known not to fit, the cache needs no frame: none is decoded.
                arrays = self._dataset.get().lowdim(e) if self._keep_images is False \
                    else ep.steps(range(ep.length))
            except Exception:  # noqa: BLE001 - whatever it is, the per-window read reports it
                self._cache[e] = None
            else:
                self._cache[e] = self._held(ep, arrays)
        hit = self._cache[e]
        return (ep, None, ep.instruction) if hit is None else hit

    def _held(self, ep, arrays: dict) -> tuple:
        """What the cache keeps of a fully read episode: all of it if the dataset fits."""
        lowdim = {k: np.asarray(arrays[k], np.float32) for k in ("state", "actions")}
        if self._keep_images is None:
            step_bytes = sum(f.nbytes for f in arrays["images"].values()) / max(ep.length, 1)
            self._keep_images = step_bytes * len(self) <= EPISODE_CACHE_BYTES
        if not self._keep_images:
            return ep, lowdim, ep.instruction
        subtasks = arrays.get("subtask")
        held = windows.ArrayEpisode(frames=arrays["images"], states=lowdim["state"], acts=lowdim["actions"],
                                    control_hz=ep.control_hz, instruction=ep.instruction,
                                    subtasks=None if subtasks is None else tuple(subtasks))
        return held, None, ep.instruction

    def __getitem__(self, i: int) -> dict:
        e, step = self.locate(i)
        ep, lowdim, instruction = self._episode(e)
        w = windows.make_window(ep, step, self._window, self._hold, lowdim)
        lay = self._layout
        # The policy builds its model input through the same call (vla/policy.py).
        ex = transform.model_example(lay, w["images"], w["state"], self.normalizers, self.spec,
                                     frame_mask={c: w["frame_mask"] for c in w["images"]},
                                     actions=w["actions"], action_valid=w["action_valid"])
        state, actions = ex.pop("_state"), ex.pop("_actions")
        if lay.pi05:
            fast_ids = None if self._fast is None else self._fast.encode(
                windows.hold_past_end(actions, w["action_valid"]))
            ex.update(_tokens(self._tokenizer, instruction, w.get("subtask"), lay.max_len,
                              self._prompt_format,
                              prompt.state_bins(state, self._prompt_format), fast_ids))
        else:
            ex.update(_tokens(self._tokenizer, instruction, None, lay.max_len,
                              self._prompt_format))
        return ex


class TextSource:
    """Canonical text examples ({images: {cam: [t, h, w, 3]}, prompt, target}) -> examples."""

    def __init__(self, name: str, open_examples: Callable[[], Sequence[dict]], layout: Layout,
                 tokenizer: Tokenizer, prompt_format: str = "vla"):
        self.name = name
        self._examples = _Lazy(open_examples)
        self._len = len(self._examples.get())
        if self._len == 0:
            raise ValueError(f"source {name!r}: dataset has no examples")
        self._layout, self._tokenizer, self._prompt_format = layout, tokenizer, prompt_format

    def __len__(self) -> int:
        return self._len

    def unit_of(self, i: int) -> int:
        """Records are the unit bad data is skipped by."""
        return i

    def next_unit(self, i: int) -> int:
        return i + 1

    def __getitem__(self, i: int) -> dict:
        item = self._examples.get()[i]
        lay = self._layout
        ex = lay.empty()
        # A camera with no frames has no view of this example (datasets of several cameras).
        images = {c: v for c, v in item.get("images", {}).items() if len(v)}
        # Frames of a model camera stay in that camera; otherwise the first view goes first.
        placed = {c: images[c] for c in lay.cameras if c in images}
        if images and not placed:
            placed = {lay.cameras[0]: next(iter(images.values()))}
        for c, cam in enumerate(lay.cameras):
            if cam in placed:
                frames = np.asarray(placed[cam])
                ex["images"][cam] = lay.camera_frames(frames)
                ex["image_mask"][c] = True
                ex["frame_mask"][c, lay.frames - min(len(frames), lay.frames):] = True
        ex.update(_tokens(self._tokenizer, item["prompt"], item["target"], lay.max_len,
                          self._prompt_format))
        return ex


def _tokens(tokenizer, text, target, max_len, prompt_format, state_bins=None,
            fast_tokens=None) -> dict:
    out = prompt.build_tokens(tokenizer, text, target, max_len, state_bins=state_bins,
                              fast_tokens=fast_tokens, prompt_format=prompt_format)
    return {k: out[k] for k in ("tokens", "token_mask", "target_mask")}


# ------------------------------------------------------------------ construction from a spec
def _text_opener(source: SourceSpec, data: DataSpec) -> Callable[[], Sequence[dict]]:
    """vl / video in our TFDS layout; a foreign TFDS image-text dataset (kind tfds: a directory or,
    with data_dir, a registered name, read through data/tfds_image_text.FieldMap fields); webdataset
    tar shards or parquet files (data/web_image_text.py) and folders of video clips with captions
    (data/video_clips.py), each taking its constructor's keyword arguments as `fields`. Clips
    default to the model's context frames at the run's context stride. Text sources serve
    training only: their "train" split."""
    fields = dict(source.fields or {})
    fmt = source.file_format
    if fmt == "webdataset":
        return functools.partial(web.WebDatasetSource, data.dataset_dir(source), **fields)
    if fmt == "parquet":
        return functools.partial(web.ParquetImageTextSource, data.dataset_dir(source), **fields)
    if fmt in ("clips", "lerobot"):  # video kind: a folder of clips, or a LeRobot dataset's videos
        fields = {"frames": data.layout.frames, "stride_s": data.window.stride_s, **fields}
        make = video_clips.ClipSource if fmt == "clips" else lerobot.clip_source
        return functools.partial(make, data.dataset_dir(source), **fields)
    if source.kind in ("vl", "video"):
        return functools.partial(tit.ImageTextSource, data.dataset_dir(source), split="train")
    where = source.path if source.data_dir else data.dataset_dir(source)
    return functools.partial(tit.ImageTextSource, where, split="train", data_dir=source.data_dir,
                             fields=tit.FieldMap(**fields))


def make_source(source: SourceSpec, data: DataSpec, role: str, tokenizer: Tokenizer,
                fast: FastActions | None = None) -> RobotSource | TextSource:
    """Build one source; raises (before any batch) on an unknown kind, a missing path or spec,
    missing statistics (the dataset's stats.json or the source's `stats` file), statistics of
    other dims, or dims/strides the spec cannot serve. fast: the robot source's FastActions
    when π0.5 examples carry FAST targets. tokenizer: in data.prompt_format's id layout.
    role: "train" or "eval" (robot sources: their eval_split, data/robot_data.py; text sources
    serve training only)."""
    name = source.name
    if source.kind not in KINDS:
        raise ValueError(f"source {name!r}: unknown kind {source.kind!r}; expected one of {KINDS}")
    path = source.data_dir if source.data_dir else data.dataset_dir(source)
    if not os.path.exists(path):
        raise FileNotFoundError(f"source {name!r}: dataset path {path} does not exist")
    if source.kind != "robot":
        return TextSource(name, _text_opener(source, data), data.layout, tokenizer,
                          data.prompt_format)
    opener = robot_data.robot_opener(path, source.spec, source.file_format, role, data.eval_split_of(source))
    opener()  # a wrong path, spec or split is reported before missing statistics
    stats_file = data.stats_file(source)
    return RobotSource(name, opener, data.layout, data.window, stats_lib.read(stats_file),
                       data.normalization, tokenizer, fast, data.prompt_format, stats_file)
