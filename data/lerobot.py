"""LeRobot datasets (codebase v2.1 and v3.0; v2.0 reads as v2.1) as canonical robot episodes.

    data = LeRobotDataset("path/to/lerobot_dataset", spec=dict(name="mine",
        camera_keys={"observation.images.top": "base"}, state_keys=("observation.state",),
        action_keys=("action",), instruction_key="task"))
    ep = data.episode(0); ep.steps([0, 5])   # {"images": {"base": uint8 [2, h, w, 3]}, ...}

Layouts (file paths come from info.json's data_path / video_path templates):

  v2.1  meta/info.json; meta/episodes.jsonl {episode_index, tasks, length}; meta/tasks.jsonl
        {task_index, task}; data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet,
        one episode per file; videos/chunk-{episode_chunk:03d}/{video_key}/episode_{..}.mp4,
        one episode per file, its first frame at 0 s.
  v3.0  meta/info.json; meta/episodes/chunk-XXX/file-XXX.parquet, per episode its length, tasks,
        data/{chunk,file}_index, dataset_{from,to}_index and per camera
        videos/<key>/{chunk_index, file_index, from_timestamp, to_timestamp}; meta/tasks.parquet
        (pandas index = the task string, column task_index); data/chunk-XXX/file-XXX.parquet and
        videos/<key>/chunk-XXX/file-XXX.mp4, many episodes per file, back to back.

A data row holds every non-video feature under its flat name ("observation.state", "action",
an "image" feature as a PNG struct {bytes, path}) plus timestamp, frame_index, episode_index,
index and task_index. A "video" feature's frame for a row is the frame nearest
from_timestamp (v3.0; 0 in v2.1) + the row's timestamp in that camera's mp4, decoded by
data/video_clips.decode_frames. Raw rows are dicts keyed by those flat names; they become
canonical steps only through data/transform.py's canonical_*.

The episode index (per episode: length, data file and first row in it, tasks, per camera the
video file and time range; per video file its frame count) is built from meta/ and the video
headers alone, and cached by data/storage.cached_json as <root>/.vla_index/lerobot_episodes.json
(or under storage.cache_dir() when the dataset folder is read-only), keyed by the size and
modification time of every file under meta/, data/ and videos/: a second open reads no table.

Bad data: a wrong path, version, split or spec key raises ValueError / FileNotFoundError when
the dataset is opened; a parquet file or row that cannot be read, an undecodable frame, or a
video whose frames in the episode's time range disagree with the episode's row count raises
data.rlds.CorruptRecordError when that episode is read (the pipeline skips and counts it).
"""
from __future__ import annotations

import collections
import io
import json
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from data import storage, transform, video_clips
from data.rlds import CorruptRecordError
from data.robots import get_spec
from data.transform import DatasetSpec

VERSIONS = ("v2.0", "v2.1", "v3.0")  # v2.0 differs from v2.1 only in its statistics files
INDEX_NAME = "lerobot_episodes"
INDEX_VERSION = 1
TASK = "task"  # spec.instruction_key / subtask_key naming the LeRobot task (via task_index)
ROW_CACHE_BYTES = 256 << 20  # decoded parquet column chunks kept per process


def read_info(path: str) -> dict[str, Any]:
    """meta/info.json of the LeRobot dataset at `path`, its codebase_version checked."""
    info_path = os.path.join(path, "meta", "info.json")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"LeRobot dataset path {path!r} does not exist")
    if not os.path.isfile(info_path):
        raise ValueError(f"{path!r} is not a LeRobot dataset: no meta/info.json (a LeRobot dataset "
                         f"root holds meta/info.json, data/ and, for video features, videos/)")
    with open(info_path) as f:
        info = json.load(f)
    version = info.get("codebase_version")
    if version not in VERSIONS:
        raise ValueError(f"{info_path}: codebase_version {version!r} is not supported (supported: "
                         f"{', '.join(VERSIONS)}); convert the dataset with LeRobot's "
                         f"lerobot.datasets.v30.convert_dataset_v21_to_v30 (or the v2.0 -> v2.1 script)")
    for key in ("fps", "features", "data_path"):
        if key not in info:
            raise ValueError(f"{info_path}: no {key!r} entry; is this a LeRobot {version} dataset?")
    return info


def splits(path: str) -> list[str]:
    """The named splits of a LeRobot dataset (info.json "splits", e.g. {"train": "0:6"})."""
    return list(read_info(_local(path)).get("splits") or {"train": None})


def _local(path: str) -> str:
    return storage.stage(path) if storage.is_remote(path) else os.path.abspath(path)


def _split_range(info: Mapping[str, Any], split: str, path: str) -> range:
    spec = (info.get("splits") or {}).get(split)
    if spec is None:
        if info.get("splits") or split != "train":
            raise ValueError(f"LeRobot dataset {path!r} has no split {split!r}; splits in "
                             f"meta/info.json: {sorted(info.get('splits') or {})}")
        return range(int(info.get("total_episodes", 1 << 62)))
    try:
        start, stop = (int(x) for x in str(spec).split(":"))
    except ValueError:
        raise ValueError(f"{path}/meta/info.json: split {split!r} is {spec!r}; expected "
                         f"'start:stop' episode indices") from None
    return range(start, stop)


# ------------------------------------------------------------------------------ episode index
def _dataset_files(root: str) -> list[str]:
    """Every file the index depends on (meta/, data/, videos/), sorted: the cache key."""
    out = []
    for sub in ("meta", "data", "videos"):
        for d, dirs, files in os.walk(os.path.join(root, sub)):
            dirs.sort()
            out += [os.path.join(d, f) for f in sorted(files) if not f.startswith(".")]
    return out


def _jsonl(path: str) -> list[dict[str, Any]]:
    if not os.path.isfile(path):
        raise ValueError(f"LeRobot dataset file {path} is missing")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _video_keys(info: Mapping[str, Any]) -> list[str]:
    return [k for k, f in info["features"].items() if f.get("dtype") == "video"]


def _episodes_v2(root: str, info: Mapping[str, Any]) -> tuple[list[dict], dict[int, str]]:
    tasks = {int(t["task_index"]): t["task"] for t in _jsonl(os.path.join(root, "meta", "tasks.jsonl"))}
    chunks = int(info.get("chunks_size", 1000))
    episodes = []
    for e in sorted(_jsonl(os.path.join(root, "meta", "episodes.jsonl")), key=lambda e: e["episode_index"]):
        i = int(e["episode_index"])
        where = dict(episode_chunk=i // chunks, episode_index=i)
        episodes.append({
            "episode_index": i, "length": int(e["length"]), "tasks": list(e.get("tasks", [])),
            "data": info["data_path"].format(**where), "row": 0,
            "videos": {k: [info["video_path"].format(video_key=k, **where), 0.0, None]
                       for k in _video_keys(info)},
        })
    return episodes, tasks


def _read_columns(path: str, wanted: Sequence[str], required: Sequence[str]) -> dict[str, list]:
    present = pq.read_schema(path).names
    missing = [c for c in required if c not in present]
    if missing:
        raise ValueError(f"LeRobot metadata file {path} has no column(s) {missing}; columns: {present}")
    return pq.read_table(path, columns=[c for c in wanted if c in present]).to_pydict()


def _episodes_v3(root: str, info: Mapping[str, Any]) -> tuple[list[dict], dict[int, str]]:
    tasks_path = os.path.join(root, "meta", "tasks.parquet")
    if not os.path.isfile(tasks_path):
        raise ValueError(f"LeRobot dataset file {tasks_path} is missing")
    table = pq.read_table(tasks_path)
    names = [c for c in table.column_names if c != "task_index"]  # "task", or pandas' index column
    if "task_index" not in table.column_names or not names:
        raise ValueError(f"{tasks_path}: expected a task_index column and the task strings (its pandas "
                         f"index); columns: {table.column_names}")
    text = table.column("task" if "task" in names else names[0]).to_pylist()
    tasks = dict(zip((int(i) for i in table.column("task_index").to_pylist()), text))

    meta_dir = os.path.join(root, "meta", "episodes")
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(meta_dir) for f in fs if f.endswith(".parquet"))
    if not files:
        raise ValueError(f"LeRobot dataset {root!r}: no meta/episodes/chunk-*/file-*.parquet")
    base = ["episode_index", "length", "tasks", "data/chunk_index", "data/file_index", "dataset_from_index"]
    vids = _video_keys(info)
    per_video = [f"videos/{k}/{c}" for k in vids for c in ("chunk_index", "file_index", "from_timestamp",
                                                           "to_timestamp")]
    rows: dict[str, list] = collections.defaultdict(list)
    for f in files:
        for c, values in _read_columns(f, base + per_video, base + per_video).items():
            rows[c] += values
    episodes = []
    for j in range(len(rows["episode_index"])):
        r = {c: v[j] for c, v in rows.items()}
        episodes.append({
            "episode_index": int(r["episode_index"]), "length": int(r["length"]),
            "tasks": list(r["tasks"] or []), "from_index": int(r["dataset_from_index"]),
            "data": info["data_path"].format(chunk_index=r["data/chunk_index"], file_index=r["data/file_index"]),
            "videos": {k: [info["video_path"].format(video_key=k, chunk_index=r[f"videos/{k}/chunk_index"],
                                                     file_index=r[f"videos/{k}/file_index"]),
                           float(r[f"videos/{k}/from_timestamp"]), float(r[f"videos/{k}/to_timestamp"])]
                       for k in vids},
        })
    # An episode's first row in its data file: episodes fill a file in order, so the file's first
    # episode starts at its row 0 (checked against the episode_index column whenever rows are read).
    first = {}
    for e in episodes:
        first[e["data"]] = min(first.get(e["data"], e["from_index"]), e["from_index"])
    for e in episodes:
        e["row"] = e.pop("from_index") - first[e["data"]]
    episodes.sort(key=lambda e: e["episode_index"])
    return episodes, tasks


def _probe_video(path: str) -> dict[str, Any]:
    """Frame count and rate of a video file from its header (no frame decoded)."""
    if not os.path.isfile(path):
        return {"error": f"video {path} does not exist"}
    try:
        with av.open(path) as c:
            s = c.streams.video[0]
            fps = float(s.average_rate or s.guessed_rate or 0)
            frames = int(s.frames)
            if not frames and s.duration is not None:  # containers without a frame count
                frames = int(round(float(s.duration * s.time_base) * fps))
            return {"frames": frames, "fps": fps}
    except (av.error.FFmpegError, IndexError, OSError) as e:
        return {"error": f"video {path} is unreadable: {type(e).__name__}: {e}"}


def build_index(root: str, info: Mapping[str, Any]) -> dict[str, Any]:
    """The episode index of a LeRobot dataset from meta/ and the video headers (JSON-able)."""
    read = _episodes_v3 if info["codebase_version"] == "v3.0" else _episodes_v2
    episodes, tasks = read(root, info)
    videos = sorted({v[0] for e in episodes for v in e["videos"].values()})
    return {"version": INDEX_VERSION, "episodes": episodes, "tasks": {str(k): v for k, v in tasks.items()},
            "videos": {v: _probe_video(os.path.join(root, v)) for v in videos}}


def load_index(root: str, info: Mapping[str, Any]) -> dict[str, Any]:
    """build_index's result, cached beside the data (data/storage.cached_json)."""
    index = storage.cached_json(root, INDEX_NAME, _dataset_files(root), lambda: build_index(root, info))
    if index.get("version") != INDEX_VERSION:  # an index of an older reader: rebuild
        index = build_index(root, info)
    return index


def clip_source(path: str, camera_key: str | None = None, **clips: Any) -> Any:
    """A LeRobot dataset's videos as captioned clips, actions unused (a kind "video" source of
    format "lerobot"): one data/video_clips.ClipSource entry per episode, its span in the mp4
    (v3.0: from/to timestamps; v2.1: the whole per-episode file), its task(s) as the caption.
    camera_key: the video feature (default the first); clips: ClipSource's other arguments."""
    root = _local(path)
    info = read_info(root)
    keys = _video_keys(info)
    if not keys or (camera_key is not None and camera_key not in keys):
        raise ValueError(f"LeRobot dataset {path!r}: no video feature {camera_key or ''!r}; its video features: {keys}")
    key = camera_key or keys[0]
    index = load_index(root, info)
    tasks = {int(k): v for k, v in index["tasks"].items()}
    entries = [{"video": os.path.join(root, e["videos"][key][0]), "start_s": e["videos"][key][1],
                "end_s": e["videos"][key][2],
                "caption": "; ".join(str(t) for t in e["tasks"]) or tasks.get(0, "")} for e in index["episodes"]]
    return video_clips.ClipSource(root, entries=entries, name=clips.pop("name", os.path.basename(root)), **clips)


# ------------------------------------------------------------------------------ parquet rows
class _Rows:
    """Per-process reader of parquet columns: open files and decoded column chunks (one per
    file, row group and column) in an LRU bounded by bytes, so the windows of one episode read
    its row groups once. Forked children drop what they inherited."""

    def __init__(self):
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._files: collections.OrderedDict[str, tuple[pq.ParquetFile, np.ndarray]] = collections.OrderedDict()
        self._chunks: collections.OrderedDict[tuple, np.ndarray] = collections.OrderedDict()
        self._bytes = 0

    def _file(self, path: str) -> tuple[pq.ParquetFile, np.ndarray]:
        if path not in self._files:
            pf = pq.ParquetFile(path)
            sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
            self._files[path] = (pf, np.cumsum([0] + sizes))
            while len(self._files) > 32:
                self._files.popitem(last=False)
        self._files.move_to_end(path)
        return self._files[path]

    def _chunk(self, path: str, group: int, column: str) -> np.ndarray:
        key = (path, group, column)
        if key not in self._chunks:
            pf, _ = self._file(path)
            values = _column_values(pf.read_row_group(group, columns=[column]).column(0), column)
            self._chunks[key] = values
            self._bytes += _nbytes(values)
            while self._bytes > ROW_CACHE_BYTES and len(self._chunks) > 1:
                self._bytes -= _nbytes(self._chunks.popitem(last=False)[1])
        self._chunks.move_to_end(key)
        return self._chunks[key]

    def take(self, path: str, rows: np.ndarray, columns: Sequence[str]) -> dict[str, np.ndarray]:
        """{column: values at the given rows of the file} (numbers: [n, ...]; text, images: object [n])."""
        with self._lock:
            if self._pid != os.getpid():
                self.__init__()
            _, starts = self._file(path)
            if len(rows) and (rows.min() < 0 or rows.max() >= starts[-1]):
                raise IndexError(f"rows {rows.min()}-{rows.max()} outside the file's {starts[-1]} rows")
            groups = np.searchsorted(starts, rows, side="right") - 1
            out = {}
            for c in columns:
                parts = {int(g): self._chunk(path, int(g), c) for g in np.unique(groups)}
                first = next(iter(parts.values())) if parts else np.zeros(0)
                values = np.empty((len(rows),) + first.shape[1:], first.dtype)
                for g, chunk in parts.items():
                    sel = groups == g
                    values[sel] = chunk[rows[sel] - starts[g]]
                out[c] = values
            return out


def _nbytes(values: np.ndarray) -> int:
    if values.dtype != object:
        return values.nbytes
    return sum(len(v) if isinstance(v, (bytes, str)) else 64 for v in values) + 8 * len(values)


def _column_values(column: pa.ChunkedArray, name: str) -> np.ndarray:
    """A parquet column chunk as numpy: fixed-width lists -> [n, d...]; numbers -> [n]; images
    (struct {bytes, path}) -> object [n] of bytes, or of {"path"} when only a path is stored;
    text -> object [n] of str. A null entry raises ValueError naming the column and row."""
    arr = column.combine_chunks()
    if arr.null_count:
        row = int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])
        raise ValueError(f"column {name!r} is null at row {row} of its row group")
    t = arr.type
    if pa.types.is_struct(t):
        items = arr.to_pylist()
        return np.array([i.get("bytes") if i.get("bytes") is not None else {"path": i.get("path")}
                         for i in items] + [None], object)[:-1]
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t):
        return np.array(arr.to_pylist() + [None], object)[:-1]
    if pa.types.is_fixed_size_list(t) or pa.types.is_list(t) or pa.types.is_large_list(t):
        inner = _column_values(pa.chunked_array([arr.flatten()]), name)
        if len(arr) and len(inner) % len(arr):
            raise ValueError(f"column {name!r} has lists of unequal length")
        out = inner.reshape((len(arr), -1) + inner.shape[1:]) if len(arr) else inner.reshape(0, 0)
        if not pa.types.is_fixed_size_list(t):  # variable-length lists: every one must be full
            lengths = np.diff(arr.offsets.to_numpy())
            if len(lengths) and (lengths != lengths[0]).any():
                raise ValueError(f"column {name!r} has lists of unequal length {sorted(set(lengths))}")
        return out
    return arr.to_numpy(zero_copy_only=False)


_ROWS = _Rows()


def _decode_image(value: Any, root: str) -> np.ndarray:
    """PNG/JPEG bytes (or a stored path, relative to the dataset root) -> uint8 [h, w, 3]."""
    if isinstance(value, dict):
        path = os.path.join(root, value["path"] or "")
        if not value["path"] or not os.path.isfile(path):
            raise ValueError(f"image has no bytes and its path {value['path']!r} is not a file")
        with open(path, "rb") as f:
            value = f.read()
    with Image.open(io.BytesIO(value)) as image:
        return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))


# ------------------------------------------------------------------------------ the reader
class LeRobotDataset:
    """Lazy random access to the episodes of one split of a LeRobot dataset, in the canonical
    robot episode format (data/windows.RobotData, like data/rlds.RobotDataset). Picklable: files
    are opened in the process that reads them."""

    def __init__(self, path: str, spec: str | DatasetSpec | Mapping[str, Any], split: str = "train"):
        self.path, self.spec, self.split = path, get_spec(spec), split
        self.root = _local(path)
        info = read_info(self.root)
        self.version = info["codebase_version"]
        self.name = os.path.basename(os.path.normpath(self.root))
        self.control_hz = float(self.spec.control_hz or info["fps"])
        self._features = info["features"]
        self._check_spec()
        index = load_index(self.root, info)
        wanted = _split_range(info, split, path)
        self._episodes = [e for e in index["episodes"] if e["episode_index"] in wanted]
        self._tasks = {int(k): v for k, v in index["tasks"].items()}
        self._videos = index["videos"]
        self.num_episodes = len(self._episodes)
        self.episode_lengths = np.array([e["length"] for e in self._episodes], np.int64)

    def _check_spec(self) -> None:
        s, features = self.spec, self._features
        where = f"LeRobot dataset {self.path!r} (meta/info.json)"
        image_keys = [k for k, f in features.items() if f.get("dtype") in ("image", "video")]
        present = [k for k in s.camera_keys if k in image_keys]
        if not present:
            raise ValueError(f"spec {s.name!r}: none of its camera keys {list(s.camera_keys)} is an image or "
                             f"video feature of {where}; image/video features: {image_keys}")
        missing = [k for k in (*s.state_keys, *s.action_keys) if k not in features or k in image_keys]
        for key in (s.instruction_key, s.subtask_key):
            if key is not None and key != TASK and key not in features:
                missing.append(key)
        if missing:
            hint = "" if s.instruction_key in (TASK, *features) else \
                f" (LeRobot keeps the instruction as the episode's task: instruction_key={TASK!r})"
            raise ValueError(f"spec {s.name!r}: keys {missing} are not features of {where}; features: "
                             f"{sorted(features)}{hint}")
        self.cameras = {k: s.camera_keys[k] for k in present}  # dataset key -> our camera name
        self.state_dim, self.action_dim = s.canonical_dims(
            {k: int(np.prod(features[k]["shape"])) for k in (*s.state_keys, *s.action_keys)}, self.path)
        self._video_cams = [k for k in present if features[k]["dtype"] == "video"]
        self._image_cams = [k for k in present if features[k]["dtype"] == "image"]
        text = [k for k in (s.instruction_key, s.subtask_key) if k is not None and k != TASK]
        need_task = TASK in (s.instruction_key, s.subtask_key)
        self._columns = list(dict.fromkeys(
            [*s.state_keys, *s.action_keys, *text, "episode_index"]
            + (["task_index"] if need_task else []) + (["timestamp"] if self._video_cams else [])))

    def __len__(self) -> int:
        return self.num_episodes

    def file_of(self, index: int) -> str:
        """The parquet file holding episode `index`'s rows."""
        return os.path.join(self.root, self._entry(index)["data"])

    def _entry(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.num_episodes:
            raise IndexError(f"episode {index} out of range [0, {self.num_episodes}) in {self.name!r}")
        return self._episodes[index]

    def episode(self, index: int) -> LeRobotEpisode:
        return LeRobotEpisode(self, index)

    def lowdim(self, index: int) -> dict[str, np.ndarray]:
        """Episode `index`'s canonical {"state": f32 [N, S], "actions": f32 [N, A]} (LeRobotEpisode.lowdim)."""
        return self.episode(index).lowdim()

    def task(self, task_index: int) -> str:
        if task_index not in self._tasks:
            raise KeyError(f"task_index {task_index} is not in the tasks of {self.name!r} ({len(self._tasks)} tasks)")
        return self._tasks[task_index]


class LeRobotEpisode:
    """One episode: its index entry at once, rows and frames only when asked for."""

    def __init__(self, dataset: LeRobotDataset, index: int):
        self._ds, self._entry = dataset, dataset._entry(index)
        self.dataset = dataset.name
        self.episode_index = index  # position in the split (the LeRobot index is _entry["episode_index"])
        self.length = int(self._entry["length"])
        self.control_hz = dataset.control_hz
        self.gripper_dims = dataset.spec.hold_dims
        self._file = os.path.join(dataset.root, self._entry["data"])
        self._lowdim_rows: dict[str, np.ndarray] | None = None
        self._instruction: str | None = None
        for cam in dataset._video_cams:
            self._check_video(cam)

    def _corrupt(self, cause: BaseException, step: int | None = None, file: str | None = None) -> CorruptRecordError:
        return CorruptRecordError(self.dataset, self.episode_index, step, cause, file or self._file)

    def _check_video(self, cam: str) -> None:
        rel, start, end = self._entry["videos"][cam]
        probe = self._ds._videos[rel]
        file = os.path.join(self._ds.root, rel)
        if "error" in probe:
            raise self._corrupt(FileNotFoundError(probe["error"]), file=file)
        fps = probe["fps"] or self._ds.control_hz
        last = probe["frames"] if end is None else min(probe["frames"], int(round(end * fps)))
        available = last - int(round(start * fps))
        if available != self.length:
            span = f"[{start:.3f}, {'end' if end is None else f'{end:.3f}'}) s"
            raise self._corrupt(ValueError(
                f"video {file} ({cam!r}) holds {available} frames in the episode's time range {span}, the table has "
                f"{self.length} rows for LeRobot episode {self._entry['episode_index']}; re-encode the video or "
                f"drop the episode"), file=file)

    def _rows(self, steps: np.ndarray, columns: Sequence[str]) -> dict[str, np.ndarray]:
        try:
            return _ROWS.take(self._file, self._entry["row"] + steps, columns)
        except Exception as e:  # arrow I/O and decode errors come in assorted types
            raise self._corrupt(e) from e

    def _lowdim_columns(self) -> dict[str, np.ndarray]:
        """Every non-image column the spec reads, for the whole episode (checked to be its rows)."""
        if self._lowdim_rows is None:
            rows = self._rows(np.arange(self.length), self._ds._columns)
            found = np.unique(rows["episode_index"])
            if len(found) != 1 or int(found[0]) != self._entry["episode_index"]:
                raise self._corrupt(ValueError(
                    f"rows {self._entry['row']}-{self._entry['row'] + self.length - 1} hold episode_index "
                    f"{found.tolist()[:5]}, meta/ says LeRobot episode {self._entry['episode_index']}: the "
                    f"metadata and data disagree (delete {INDEX_NAME}.json if the dataset was rewritten)"))
            self._lowdim_rows = rows
        return self._lowdim_rows

    @property
    def instruction(self) -> str:
        if self._instruction is None:
            key, tasks = self._ds.spec.instruction_key, self._entry["tasks"]
            if key == TASK and len(tasks) == 1:
                self._instruction = str(tasks[0])  # from meta/ alone
            else:
                self._instruction = self._texts(key, np.zeros(1, np.int64))[0]
        return self._instruction

    def _texts(self, key: str, steps: np.ndarray) -> list[str]:
        columns = self._lowdim_columns()
        if key != TASK:
            return [v.decode() if isinstance(v, bytes) else str(v) for v in columns[key][steps]]
        try:
            return [self._ds.task(int(i)) for i in columns["task_index"][steps]]
        except KeyError as e:
            raise self._corrupt(e) from e

    def _raw_rows(self, steps: np.ndarray, images: bool) -> list[dict[str, Any]]:
        """Raw rows {flat feature name: value} of the given steps; images decoded when asked."""
        columns = self._lowdim_columns()
        rows = [{k: v[s] for k, v in columns.items()} for s in steps]
        if not images:
            return rows
        unique, inverse = np.unique(steps, return_inverse=True)
        for cam in self._ds._image_cams:
            encoded = self._rows(unique, [cam])[cam]
            frames = []
            for j, s in enumerate(unique):
                try:
                    frames.append(_decode_image(encoded[j], self._ds.root))
                except Exception as e:  # PIL raises assorted types for bad bytes
                    raise self._corrupt(e, step=int(s)) from e
            for r, j in enumerate(inverse):
                rows[r][cam] = frames[j]
        for cam in self._ds._video_cams:
            rel, start, _ = self._entry["videos"][cam]
            file = os.path.join(self._ds.root, rel)
            times = [start + float(t) for t in columns["timestamp"][unique]]
            try:
                frames = video_clips.decode_frames(file, times)  # sorted times: decodes forward once
            except Exception as e:  # FFmpeg, missing file or a time outside the video
                raise self._corrupt(e, file=file) from e
            for r, j in enumerate(inverse):
                rows[r][cam] = frames[j]
        return rows

    def steps(self, indices: Sequence[int]) -> dict[str, Any]:
        """images {camera: uint8 [n, h, w, 3]}, state f32 [n, S], actions f32 [n, A] (canonical,
        data/transform.py) for the given step indices (any order, repeats allowed), and subtask
        (n strings) when the spec names a subtask key."""
        steps = np.asarray(list(indices), np.int64).reshape(-1)
        bad = steps[(steps < 0) | (steps >= self.length)]
        if len(bad):
            raise IndexError(f"step {int(bad[0])} out of range [0, {self.length}) in episode "
                             f"{self.episode_index} of {self.dataset!r}")
        spec, where = self._ds.spec, f"dataset {self.dataset!r} episode {self.episode_index}"
        rows = self._raw_rows(steps, images=True)
        try:
            images = transform.canonical_images(self._ds.cameras, rows, where)
            out = {"images": images, "state": transform.canonical_state(spec, rows, where),
                   "actions": transform.canonical_actions(spec, rows, where)}
        except ValueError as e:  # a frame or vector of the wrong shape
            raise self._corrupt(e) from e
        if spec.subtask_key:
            out["subtask"] = self._texts(spec.subtask_key, steps)
        return out

    def lowdim(self) -> dict[str, np.ndarray]:
        """The whole episode's canonical {"state": f32 [N, S], "actions": f32 [N, A]}; no image
        or video frame is decoded."""
        spec, where = self._ds.spec, f"dataset {self.dataset!r} episode {self.episode_index}"
        rows = self._raw_rows(np.arange(self.length), images=False)
        try:
            return {"state": transform.canonical_state(spec, rows, where),
                    "actions": transform.canonical_actions(spec, rows, where)}
        except ValueError as e:
            raise self._corrupt(e) from e
