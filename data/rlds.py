"""Robot episodes as RLDS-layout TFDS datasets in ArrayRecord: a writer and a lazy reader.

Layout written (one record per episode, the RLDS / Open X-Embodiment convention):

    steps: Dataset of {observation: {<camera>: Image [H, W, 3], state: f32 [S]},
                       action: f32 [A], language_instruction: str,
                       [language_subtask: str,]  (the phase at that step; when recorded)
                       reward: f32, discount: f32, is_first, is_last, is_terminal: bool}
    episode_metadata: {task: str, success: bool, seed: int64}

The dataset directory itself holds dataset_info.json, so `tfds.builder_from_directory(path)
.as_data_source()` opens it without TensorFlow; metadata.json carries the native control rate
and the episode lengths per split (read without touching a record).

Writing needs TensorFlow (TFDS serializes with it), in a child process; reading never does.
"""
from __future__ import annotations

import io
import itertools
import multiprocessing
import os
import shutil
import sys
import tempfile
import traceback
from collections.abc import Iterable, Iterator, Mapping, Sequence
from queue import Empty, Full
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import logging as absl_logging
from etils import epath
from PIL import Image

from data import storage, transform
from data.robots import get_spec
from data.transform import DatasetSpec

VERSION = "1.0.0"


class CorruptRecordError(RuntimeError):
    """A record or image of a dataset could not be read. `step` is None when the whole
    episode record is unreadable; `file` is the shard holding the record, when known."""

    def __init__(self, dataset: str, episode: int, step: int | None, cause: BaseException,
                 file: str | None = None):
        self.dataset, self.episode, self.step, self.cause, self.file = dataset, episode, step, cause, file
        where = f"episode {episode}" + ("" if step is None else f", step {step}")
        in_file = "" if file is None else f" (file {file})"
        super().__init__(f"corrupt record in dataset {dataset!r}, {where}{in_file}: "
                         f"{type(cause).__name__}: {cause}")

    def __reduce__(self):  # crosses process boundaries (Grain workers) intact
        return CorruptRecordError, (self.dataset, self.episode, self.step, self.cause, self.file)


def shard_of(split: tfds.core.SplitInfo, index: int) -> str:
    """The file of a split that holds record `index` (for error messages)."""
    shard = int(np.searchsorted(np.cumsum(split.shard_lengths), index, side="right"))
    return os.fspath(split.filepaths[min(shard, len(split.filepaths) - 1)])


# ---------------------------------------------------------------------------------- writing
def encode_png(image: np.ndarray) -> bytes:
    """uint8 [H, W, 3] -> PNG bytes (TFDS Image features accept encoded bytes, so workers can
    compress in parallel and the writing process only copies bytes)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


class TfdsWriter:
    """Writes TFDS datasets (ArrayRecord, records in the order given) from a spawned process.

    TensorFlow lives only in that process: its bundled LLVM and Mesa's (MuJoCo's EGL renderer)
    segfault when loaded into one process, and callers render. One writer serves several
    datasets, so TensorFlow is imported once (it starts importing as soon as the writer is
    created, while the caller is still producing examples)."""

    def __init__(self):
        ctx = multiprocessing.get_context("spawn")
        self._inbox, self._outbox = ctx.Queue(maxsize=16), ctx.Queue()
        self._process = ctx.Process(target=_writer_process, args=(self._inbox, self._outbox),
                                    daemon=True)
        self._process.start()

    def __enter__(self) -> TfdsWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._process.is_alive():
            self._put(("stop", None))
            self._process.join()

    def _put(self, message: tuple[str, Any]) -> None:
        while True:
            try:
                return self._inbox.put(message, timeout=1.0)
            except Full:
                if not self._process.is_alive():
                    raise RuntimeError(f"TFDS writer process died (exit code {self._process.exitcode})"
                                       f"{self._failure()}") from None

    def _failure(self) -> str:
        """The traceback the writer process reported before it stopped, if it did."""
        try:
            status, detail = self._outbox.get(timeout=1.0)
        except Empty:
            return ""
        return f":\n{detail}" if status == "error" else ""

    def write(self, path: str, features: tfds.features.FeaturesDict,
              splits: Mapping[str, Iterable[dict[str, Any]]], metadata: Mapping[str, Any],
              description: str) -> None:
        """A dataset whose files and dataset_info.json sit directly in `path` (its basename is
        the dataset name). `splits`: split name -> examples, consumed lazily one split after
        the other; `metadata` is read after the last example, so it may fill in meanwhile."""
        path = os.path.abspath(path)
        if os.path.exists(path):
            raise FileExistsError(f"{path} exists; refusing to overwrite a dataset")
        self._put(("dataset", (path, features.to_json(), list(splits), description)))
        for split, examples in splits.items():
            count = 0
            for example in examples:
                self._put(("example", example))
                count += 1
            if not count:
                self._process.kill()
                raise ValueError(f"split {split!r} of {path} has no examples (TFDS stores none)")
            self._put(("end", split))
        self._put(("metadata", dict(metadata)))
        status, detail = self._outbox.get()
        if status != "done":
            raise RuntimeError(f"TFDS writer failed on {path}:\n{detail}")


def write_tfds(path: str, features: tfds.features.FeaturesDict,
               splits: Mapping[str, Iterable[dict[str, Any]]], metadata: Mapping[str, Any],
               description: str) -> None:
    """One dataset with a writer of its own (see TfdsWriter.write)."""
    with TfdsWriter() as writer:
        writer.write(path, features, splits, metadata, description)


def _writer_process(inbox: Any, outbox: Any) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.stdout = open(os.devnull, "w")  # TFDS prints per dataset; failures travel via outbox
    absl_logging.set_verbosity(absl_logging.WARNING)
    tfds.display_progress_bar(False)
    while True:
        kind, payload = inbox.get()
        if kind == "stop":
            return
        try:
            _write_one(*payload, inbox)
            outbox.put(("done", None))
        except Exception:  # reported to the caller, who raises
            outbox.put(("error", traceback.format_exc()))
            return


def _write_one(path: str, features_json: dict, split_names: list[str], description: str,
               inbox: Any) -> None:
    features = tfds.features.FeatureConnector.from_json(features_json)
    metadata = tfds.core.MetadataDict()

    def examples(split: str) -> Iterator[tuple[int, dict[str, Any]]]:
        for key in itertools.count():
            kind, payload = inbox.get()
            if kind == "end":
                assert payload == split, (payload, split)
                if split == split_names[-1]:
                    metadata.update(inbox.get()[1])  # TFDS saves metadata after the splits
                return
            yield key, payload

    class _Builder(tfds.dataset_builders.AdhocBuilder, skip_registration=True):
        def _info(self) -> tfds.core.DatasetInfo:
            return tfds.core.DatasetInfo(builder=self, description=description,
                                         features=features, disable_shuffling=True,
                                         metadata=metadata)

    name = os.path.basename(path)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as tmp:
        builder = _Builder(name=name, version=VERSION, features=features, data_dir=tmp,
                           split_datasets={s: examples(s) for s in split_names},
                           file_format="array_record", disable_shuffling=True)
        builder.download_and_prepare(file_format="array_record")
        shutil.move(os.fspath(builder.data_dir), path)


def robot_features(cameras: Sequence[str], image_size: int, state_dim: int,
                   action_dim: int, subtasks: bool = False) -> tfds.features.FeaturesDict:
    """subtasks: steps carry a language_subtask (see rlds_episode)."""
    f = tfds.features
    return f.FeaturesDict({
        "steps": f.Dataset({
            "observation": f.FeaturesDict({
                **{cam: f.Image(shape=(image_size, image_size, 3), encoding_format="png")
                   for cam in cameras},
                "state": f.Tensor(shape=(state_dim,), dtype=np.float32),
            }),
            "action": f.Tensor(shape=(action_dim,), dtype=np.float32),
            "language_instruction": f.Text(),
            **({"language_subtask": f.Text()} if subtasks else {}),
            "reward": f.Scalar(dtype=np.float32),
            "discount": f.Scalar(dtype=np.float32),
            "is_first": f.Scalar(dtype=np.bool_),
            "is_last": f.Scalar(dtype=np.bool_),
            "is_terminal": f.Scalar(dtype=np.bool_),
        }),
        "episode_metadata": f.FeaturesDict({
            "task": f.Text(),
            "success": f.Scalar(dtype=np.bool_),
            "seed": f.Scalar(dtype=np.int64),
        }),
    })


def rlds_episode(images: Mapping[str, Sequence[bytes | np.ndarray]], state: np.ndarray,
                 actions: np.ndarray, rewards: np.ndarray, instruction: str, task: str,
                 success: bool, seed: int, subtasks: Sequence[str] | None = None
                 ) -> dict[str, Any]:
    """One episode in the RLDS layout. images: camera -> N frames (PNG bytes or uint8
    [H, W, 3]); state f32 [N, S]; actions f32 [N, A] (action taken at step i); rewards [N];
    subtasks: N phrases, the subtask in progress at each step (robot_features(subtasks=True)).
    The last step is terminal when the episode ended in success."""
    n = len(state)
    steps = [{
        "observation": {**{cam: frames[i] for cam, frames in images.items()},
                        "state": np.asarray(state[i], np.float32)},
        "action": np.asarray(actions[i], np.float32),
        "language_instruction": instruction,
        **({"language_subtask": subtasks[i]} if subtasks is not None else {}),
        "reward": np.float32(rewards[i]),
        "discount": np.float32(1.0),
        "is_first": i == 0,
        "is_last": i == n - 1,
        "is_terminal": bool(success) and i == n - 1,
    } for i in range(n)]
    return {"steps": steps,
            "episode_metadata": {"task": task, "success": bool(success), "seed": int(seed)}}


# ---------------------------------------------------------------------------------- reading
def _flat_features(feature: tfds.features.FeatureConnector, prefix: str = "") -> dict[str, Any]:
    if isinstance(feature, tfds.features.FeaturesDict):
        out = {}
        for key, sub in feature.items():
            out.update(_flat_features(sub, f"{prefix}{key}/"))
        return out
    return {prefix.rstrip("/"): feature}


def _skip_images(feature: tfds.features.FeatureConnector) -> Any:
    """A decoders tree skipping every Image of a FeaturesDict (their bytes are left undecoded)."""
    if isinstance(feature, tfds.features.FeaturesDict):
        tree = {k: _skip_images(v) for k, v in feature.items()}
        return {k: v for k, v in tree.items() if v is not None} or None
    if isinstance(feature, tfds.features.Dataset):
        return _skip_images(feature.feature)
    return tfds.decode.SkipDecoding() if isinstance(feature, tfds.features.Image) else None


def open_builder(path: str) -> tfds.core.DatasetBuilder:
    """The TFDS builder of a dataset directory, with a clear error for a wrong path and for a
    TFRecord dataset (no random access: data/convert_rlds.py converts it)."""
    p = epath.Path(path)
    if not p.exists():
        raise FileNotFoundError(f"dataset path {path!r} does not exist")
    if not (p / "dataset_info.json").exists():
        versions = sorted(d for d in p.iterdir() if (d / "dataset_info.json").exists()) \
            if p.is_dir() else []
        if not versions:
            raise ValueError(f"{path!r} is not a TFDS dataset directory (no dataset_info.json "
                             f"in it or in a version folder below it)")
        p = versions[-1]
    builder = tfds.builder_from_directory(os.fspath(p))
    from data.convert_rlds import require_random_access  # local: keeps data.convert_rlds free of us
    require_random_access(builder, path)  # TFRecord (Open X-Embodiment) -> the convert command
    return builder


def splits(path: str) -> list[str]:
    """The split names of the TFDS dataset directory `path`."""
    return list(open_builder(path).info.splits)


class RobotDataset:
    """Lazy random access to the episodes of one split of an RLDS dataset, in the canonical
    robot episode format (docs/data_contract.md); raw steps become canonical steps through
    data/transform.py as the spec declares. Picklable: the data source opens lazily."""

    def __init__(self, path: str, spec: str | DatasetSpec | Mapping[str, Any] = "metaworld",
                 split: str = "train"):
        self.path, self.spec, self.split = path, get_spec(spec), split
        builder = open_builder(path)
        self.name = builder.info.name
        if split not in builder.info.splits:
            raise ValueError(f"{path!r} has no split {split!r}; "
                             f"splits: {list(builder.info.splits)}")
        self._check_spec(builder)
        metadata = builder.info.metadata or {}
        self.control_hz = float(self.spec.control_hz or metadata.get("control_hz") or 0)
        if not self.control_hz:
            raise ValueError(f"spec {self.spec.name!r} sets no control_hz and {path!r} has no "
                             f"control_hz in its metadata")
        self.num_episodes = builder.info.splits[split].num_examples
        lengths = metadata.get("episode_lengths", {}).get(split)
        self._lengths = None if lengths is None else np.asarray(lengths, np.int64)
        self._builder_dir = os.fspath(builder.data_dir)
        self._split_info = builder.info.splits[split]
        self._decoders = _skip_images(builder.info.features)
        self._source = self._lowdim_source = None

    def _check_spec(self, builder: tfds.core.DatasetBuilder) -> None:
        features = builder.info.features
        if "steps" not in features or not isinstance(features["steps"], tfds.features.Dataset):
            raise ValueError(f"{self.path!r} is not an RLDS dataset: no 'steps' Dataset feature "
                             f"(features: {list(features)})")
        step_keys = _flat_features(features["steps"].feature)
        episode_keys = _flat_features(features)
        s = self.spec
        present_cams = [k for k in s.camera_keys if k in step_keys]
        if not present_cams:
            raise ValueError(f"spec {s.name!r}: none of its camera keys {list(s.camera_keys)} is "
                             f"a step feature of {self.path!r}; step features: {sorted(step_keys)}")
        missing = [k for k in s.lowdim_keys() if k not in step_keys]
        if s.instruction_key not in step_keys and s.instruction_key not in episode_keys:
            missing.append(s.instruction_key)
        if missing:
            raise ValueError(f"spec {s.name!r}: keys {missing} are not features of "
                             f"{self.path!r}; step features: {sorted(step_keys)}")
        self.cameras = {k: s.camera_keys[k] for k in present_cams}  # dataset key -> our name
        self.state_dim, self.action_dim = s.canonical_dims(
            {k: int(np.prod(step_keys[k].shape)) for k in (*s.state_keys, *s.action_keys)}, self.path)
        self._instruction_in_steps = s.instruction_key in step_keys

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_source": None, "_lowdim_source": None}

    @property
    def source(self):
        if self._source is None:
            self._source = tfds.builder_from_directory(self._builder_dir).as_data_source(
                split=self.split)
        return self._source

    @property
    def lowdim_source(self):
        """The same records with every image left undecoded (statistics, low-dim caches)."""
        if self._lowdim_source is None:
            self._lowdim_source = tfds.builder_from_directory(self._builder_dir).as_data_source(
                split=self.split, decoders=self._decoders)
        return self._lowdim_source

    def __len__(self) -> int:
        return self.num_episodes

    @property
    def episode_lengths(self) -> np.ndarray:
        """int64 [E]: from metadata.json (written by us and by tools.convert), else from the
        episode index cached beside the data (data/storage.cached_json), built once by parsing
        every record without decoding an image."""
        if self._lengths is None:
            self._lengths = np.asarray(storage.cached_json(
                self._builder_dir, f"episode_lengths.{self.split}",
                [os.fspath(f) for f in self._split_info.filepaths],
                lambda: [len(self._record(i, lowdim=True)["steps"]) for i in range(len(self))]), np.int64)
        return self._lengths

    def _record(self, index: int, lowdim: bool = False) -> dict[str, Any]:
        if not 0 <= index < self.num_episodes:
            raise IndexError(f"episode {index} out of range [0, {self.num_episodes})")
        try:
            return (self.lowdim_source if lowdim else self.source)[index]
        except Exception as e:  # riegeli/proto errors surface as assorted types
            raise CorruptRecordError(self.name, index, None, e, self.file_of(index)) from e

    def file_of(self, index: int) -> str:
        """The shard file holding episode `index`."""
        return shard_of(self._split_info, index)

    def episode(self, index: int) -> RobotEpisode:
        return RobotEpisode(self, index, self._record(index))

    def lowdim(self, index: int) -> dict[str, np.ndarray]:
        """Episode `index`'s canonical {"state": f32 [N, S], "actions": f32 [N, A]}, no image decoded."""
        record = self._record(index, lowdim=True)
        rows = [record["steps"][i] for i in range(len(record["steps"]))]
        where = f"dataset {self.name!r} episode {index}"
        return {"state": transform.canonical_state(self.spec, rows, where),
                "actions": transform.canonical_actions(self.spec, rows, where)}


class RobotEpisode:
    """One episode: metadata eagerly, steps decoded only when asked for."""

    def __init__(self, dataset: RobotDataset, index: int, record: dict[str, Any]):
        self._ds, self._steps = dataset, record["steps"]
        self._record = record
        self.dataset = dataset.name
        self.episode_index = index
        self.length = len(self._steps)
        self.control_hz = dataset.control_hz
        self.gripper_dims = dataset.spec.hold_dims
        self._instruction: str | None = None

    @property
    def instruction(self) -> str:
        if self._instruction is None:
            key = self._ds.spec.instruction_key
            value = transform.lookup(self._step(0), key) if self._ds._instruction_in_steps \
                else transform.lookup(self._record, key, "episode")
            self._instruction = _text(value)
        return self._instruction

    def _step(self, i: int) -> dict[str, Any]:
        try:
            return self._steps[i]
        except Exception as e:  # an undecodable image or truncated step
            raise CorruptRecordError(self.dataset, self.episode_index, i, e,
                                     self._ds.file_of(self.episode_index)) from e

    def steps(self, indices: Sequence[int]) -> dict[str, Any]:
        """images {camera: uint8 [n, h, w, 3]}, state f32 [n, S], actions f32 [n, A] (canonical,
        data/transform.py) for the given step indices (any order, repeats allowed), and subtask
        (n strings) when the spec names a subtask key."""
        spec = self._ds.spec
        for i in indices:
            if not 0 <= i < self.length:
                raise IndexError(f"step {i} out of range [0, {self.length}) in episode "
                                 f"{self.episode_index} of {self.dataset!r}")
        decoded = {i: self._step(int(i)) for i in dict.fromkeys(indices)}
        rows = [decoded[i] for i in indices]
        where = f"dataset {self.dataset!r} episode {self.episode_index}"
        try:
            images = transform.canonical_images(self._ds.cameras, rows, where)
        except ValueError as e:  # an image that decoded to nothing usable
            raise CorruptRecordError(self.dataset, self.episode_index, None, e,
                                     self._ds.file_of(self.episode_index)) from e
        out = {"images": images, "state": transform.canonical_state(spec, rows, where),
               "actions": transform.canonical_actions(spec, rows, where)}
        if spec.subtask_key:
            out["subtask"] = [_text(transform.lookup(r, spec.subtask_key, where)) for r in rows]
        return out


def _text(value: Any) -> str:
    """A TFDS Text feature as read without TensorFlow (bytes) or from memory (str)."""
    return value.decode() if isinstance(value, bytes) else str(value)
