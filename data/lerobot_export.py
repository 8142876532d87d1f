"""Our RLDS robot datasets written as LeRobot datasets (codebase v3.0, or v2.1), which LeRobot's
own loader reads frame for frame and data/lerobot.LeRobotDataset reads back.

    report = export("data/metaworld_rlds", "out/metaworld_lerobot")   # v3.0, AV1 mp4 per camera
    LeRobotDataset("out/metaworld_lerobot", report["spec"])            # the spec to read it with

What is written (the layouts of data/lerobot.py's docstring): one feature per camera,
"observation.images.<camera>" (video: yuv420p mp4 encoded with PyAV, as LeRobot encodes, by
default libsvtav1 with keyframes every 2 frames and crf 30; or PNG in the parquet with
video=False), "observation.state" and "action" (the canonical vectors of data/transform.py),
"language_subtask" when the steps record one, and LeRobot's timestamp, frame_index,
episode_index, index, task_index. Tasks are the episodes' instructions; fps is the dataset's
control rate (LeRobot needs a whole number). Statistics (min, max, mean, std, count and, in
v3.0, the 1/10/50/90/99% quantiles) per episode and for the dataset, images per channel in
[0, 1] on up to 100 frames an episode, as LeRobot computes them.
"""
from __future__ import annotations

import fractions
import io
import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from typing import Any

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from data import rlds

CHUNKS_SIZE = 1000  # files per chunk folder, as LeRobot
DATA_FILE_MB, VIDEO_FILE_MB = 100, 200  # a v3.0 file is closed past this size
QUANTILES = (0.01, 0.10, 0.50, 0.90, 0.99)
IMAGE_STAT_FRAMES = 100  # frames per episode sampled for image statistics
SUBTASK = "language_subtask"
CODECS = ("libsvtav1", "h264", "hevc")  # those LeRobot's loader knows
os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints its configuration to stderr unless told to keep to errors


def _cam_key(cam: str) -> str:
    return f"observation.images.{cam}"


def _features(cameras: Sequence[str], size: tuple[int, int], state_dim: int, action_dim: int,
              subtasks: bool, video: dict[str, Any] | None) -> dict[str, Any]:
    """info.json "features" (LeRobot's layout: dtype, shape, names; video ones with an info block)."""
    h, w = size
    out: dict[str, Any] = {}
    for cam in cameras:
        f = {"dtype": "video" if video else "image", "shape": [h, w, 3], "names": ["height", "width", "channels"]}
        if video:
            f["info"] = {"video.height": h, "video.width": w, "video.codec": video["codec"],
                         "video.pix_fmt": "yuv420p", "video.is_depth_map": False, "video.fps": video["fps"],
                         "video.channels": 3, "has_audio": False}
        out[_cam_key(cam)] = f
    for key, dim, name in (("observation.state", state_dim, "state"), ("action", action_dim, "action")):
        out[key] = {"dtype": "float32", "shape": [dim], "names": [f"{name}_{i}" for i in range(dim)]}
    if subtasks:
        out[SUBTASK] = {"dtype": "string", "shape": [1], "names": None}
    out["timestamp"] = {"dtype": "float32", "shape": [1], "names": None}
    for k in ("frame_index", "episode_index", "index", "task_index"):
        out[k] = {"dtype": "int64", "shape": [1], "names": None}
    return out


def _hf_features(features: Mapping[str, Any]) -> dict[str, Any]:
    """The HF datasets schema LeRobot stores in each data parquet's metadata."""
    out = {}
    for k, f in features.items():
        if f["dtype"] == "video":
            continue
        if f["dtype"] == "image":
            out[k] = {"_type": "Image"}
        elif f["shape"] == [1]:
            out[k] = {"dtype": f["dtype"], "_type": "Value"}
        else:
            out[k] = {"feature": {"dtype": f["dtype"], "_type": "Value"}, "length": f["shape"][0], "_type": "List"}
    return out


# ------------------------------------------------------------------------------ statistics
def _stats(x: np.ndarray, quantiles: bool) -> dict[str, Any]:
    """LeRobot's per-feature statistics of x [n, ...] over axis 0 (images: x [n, 3] channel
    values in [0, 1] -> shapes [3, 1, 1])."""
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    out = {"min": x.min(0), "max": x.max(0), "mean": x.mean(0), "std": x.std(0), "count": np.array([len(x)])}
    if quantiles:
        out.update({f"q{int(round(q * 100)):02d}": np.quantile(x, q, axis=0) for q in QUANTILES})
    return out


def _image_stats(frames: np.ndarray, quantiles: bool) -> dict[str, Any]:
    """Per-channel statistics of uint8 frames [n, h, w, 3], in [0, 1], shaped [3, 1, 1]."""
    pick = np.unique(np.linspace(0, len(frames) - 1, min(len(frames), IMAGE_STAT_FRAMES)).astype(int))
    pixels = frames[pick].reshape(-1, 3).astype(np.float64) / 255.0
    out = _stats(pixels, quantiles)
    out = {k: (v if k == "count" else v.reshape(3, 1, 1)) for k, v in out.items()}
    out["count"] = np.array([len(pick)])
    return out


def _episode_stats(columns: Mapping[str, np.ndarray], frames: Mapping[str, np.ndarray], quantiles: bool) -> dict:
    stats = {k: _stats(v, quantiles) for k, v in columns.items()}
    stats.update({_cam_key(c): _image_stats(f, quantiles) for c, f in frames.items()})
    return stats


def _merge_stats(per_episode: Sequence[Mapping[str, Mapping[str, np.ndarray]]]) -> dict[str, Any]:
    """Dataset statistics from per-episode ones, as LeRobot aggregates them: min of mins, max of
    maxes, count-weighted mean, pooled std, count-weighted quantiles."""
    out = {}
    for key in per_episode[0]:
        parts = [s[key] for s in per_episode]
        n = np.array([p["count"][0] for p in parts], np.float64)
        w = (n / n.sum()).reshape((-1,) + (1,) * np.ndim(parts[0]["mean"]))
        means, stds = np.stack([p["mean"] for p in parts]), np.stack([p["std"] for p in parts])
        mean = (w * means).sum(0)
        var = (w * (stds**2 + (means - mean) ** 2)).sum(0)
        merged = {"min": np.min([p["min"] for p in parts], 0), "max": np.max([p["max"] for p in parts], 0),
                  "mean": mean, "std": np.sqrt(var), "count": np.array([int(n.sum())])}
        for q in (k for k in parts[0] if k.startswith("q")):
            merged[q] = (w * np.stack([p[q] for p in parts])).sum(0)
        out[key] = merged
    return out


def _jsonable(stats: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, Any]:
    return {k: {s: np.asarray(v).tolist() for s, v in d.items()} for k, d in stats.items()}


# ------------------------------------------------------------------------------ files
def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


class _Video:
    """One mp4 being encoded: frames appended with consecutive pts at 1/fps."""

    def __init__(self, path: str, size: tuple[int, int], fps: int, codec: str, crf: int | None, gop: int | None):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.path, self.frames, self._bytes = path, 0, 0
        self._out = av.open(path, "w")
        options = {k: str(v) for k, v in (("g", gop), ("crf", crf)) if v is not None}
        if codec == "libsvtav1":
            options["preset"] = "12"  # LeRobot's choice: fastest, and small images lose nothing to it
        self._stream = self._out.add_stream(codec, rate=fps, options=options)
        self._stream.pix_fmt, self._stream.height, self._stream.width = "yuv420p", size[0], size[1]
        self._time_base = fractions.Fraction(1, fps)

    def add(self, frames: np.ndarray) -> None:
        for image in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            frame.pts, frame.time_base = self.frames, self._time_base
            self._mux(self._stream.encode(frame))
            self.frames += 1

    def _mux(self, packets: list[av.Packet]) -> None:
        self._bytes += sum(p.size for p in packets)  # the muxer may not have created the file yet
        self._out.mux(packets)

    def size_mb(self) -> float:
        return self._bytes / 2**20

    def close(self) -> None:
        self._mux(self._stream.encode())  # flush the encoder
        self._out.close()


class _DataFile:
    """One data parquet being written, a row group per episode."""

    def __init__(self, path: str, schema: pa.Schema):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.path, self.rows = path, 0
        self._writer = pq.ParquetWriter(path, schema)

    def add(self, table: pa.Table) -> None:
        self._writer.write_table(table)
        self.rows += table.num_rows

    def size_mb(self) -> float:
        return os.path.getsize(self.path) / 2**20

    def close(self) -> None:
        self._writer.close()


def _next_file(chunk: int, file: int) -> tuple[int, int]:
    return (chunk, file + 1) if file + 1 < CHUNKS_SIZE else (chunk + 1, 0)


def _episode_table(schema: pa.Schema, features: Mapping[str, Any], arrays: Mapping[str, Any], n: int, fps: int,
                   episode: int, first: int, task: int) -> tuple[pa.Table, dict[str, np.ndarray]]:
    """The data rows of one episode, and its numeric columns (for statistics)."""
    numeric = {
        "observation.state": arrays["state"].astype(np.float32),
        "action": arrays["actions"].astype(np.float32),
        "timestamp": (np.arange(n) / fps).astype(np.float32),
        "frame_index": np.arange(n, dtype=np.int64),
        "episode_index": np.full(n, episode, np.int64),
        "index": np.arange(first, first + n, dtype=np.int64),
        "task_index": np.full(n, task, np.int64),
    }
    columns: dict[str, pa.Array] = {}
    for key, f in features.items():
        if f["dtype"] == "video":
            continue
        if f["dtype"] == "image":
            cam = key[len("observation.images."):]
            columns[key] = pa.array([{"bytes": _png(im), "path": f"frame-{i:06d}.png"}
                                     for i, im in enumerate(arrays["images"][cam])], schema.field(key).type)
        elif key == SUBTASK:
            columns[key] = pa.array([str(s) for s in arrays["subtask"]], pa.string())
        elif numeric[key].ndim == 2:
            columns[key] = pa.FixedSizeListArray.from_arrays(pa.array(numeric[key].reshape(-1)), numeric[key].shape[1])
        else:
            columns[key] = pa.array(numeric[key])
    return pa.Table.from_pydict(columns, schema=schema), numeric


def _schema(features: Mapping[str, Any]) -> pa.Schema:
    types = {"float32": pa.float32(), "int64": pa.int64(), "string": pa.string()}
    fields = []
    for k, f in features.items():
        if f["dtype"] == "video":
            continue
        if f["dtype"] == "image":
            t = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
        elif f["shape"] == [1]:
            t = types[f["dtype"]]
        else:
            t = pa.list_(types[f["dtype"]], f["shape"][0])
        fields.append(pa.field(k, t))
    meta = {"huggingface": json.dumps({"info": {"features": _hf_features(features)}})}
    return pa.schema(fields, metadata=meta)


def _write_json(path: str, value: Any) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(value, f, indent=4)


def _write_jsonl(path: str, rows: Sequence[Mapping[str, Any]]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def _write_tasks_parquet(path: str, tasks: Sequence[str]) -> None:
    """meta/tasks.parquet as pandas writes a DataFrame indexed by task (LeRobot reads it with
    pandas and takes the index as the task string)."""
    pandas_meta = {"index_columns": ["__index_level_0__"],
                   "column_indexes": [{"name": None, "field_name": None, "pandas_type": "unicode",
                                       "numpy_type": "object", "metadata": {"encoding": "UTF-8"}}],
                   "columns": [{"name": "task_index", "field_name": "task_index", "pandas_type": "int64",
                                "numpy_type": "int64", "metadata": None},
                               {"name": None, "field_name": "__index_level_0__", "pandas_type": "unicode",
                                "numpy_type": "object", "metadata": None}],
                   "attributes": {}, "creator": {"library": "pyarrow", "version": pa.__version__},
                   "pandas_version": "2.2.0"}
    table = pa.table({"task_index": pa.array(range(len(tasks)), pa.int64()),
                      "__index_level_0__": pa.array(list(tasks), pa.string())})
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(table.replace_schema_metadata({"pandas": json.dumps(pandas_meta)}), path)


# ------------------------------------------------------------------------------ export
def export(src: str, out: str, *, spec: str | None = None, split: str = "train", codebase_version: str = "v3.0",
           video: bool = True, vcodec: str = "libsvtav1", crf: int | None = 30, gop: int | None = 2,
           robot_type: str = "unknown", overwrite: bool = False) -> dict[str, Any]:
    """Writes split `split` of the RLDS dataset at `src` (read with spec `spec`, default
    "metaworld") as a LeRobot dataset at `out`, all episodes in LeRobot's "train" split.

    video: cameras as mp4 (vcodec one of CODECS; crf, gop as LeRobot's encoder options) or, when
    False, PNG images in the parquet. Returns {"path", "codebase_version", "episodes", "frames",
    "tasks", "fps", "seconds", "spec": the DatasetSpec fields that read it back with
    data/lerobot.LeRobotDataset}.
    """
    start = time.time()
    if codebase_version not in ("v2.1", "v3.0"):
        raise ValueError(f"codebase_version {codebase_version!r}: export writes 'v3.0' or 'v2.1'")
    if video and vcodec not in CODECS:
        raise ValueError(f"vcodec {vcodec!r}: LeRobot's loader knows {CODECS}")
    if os.path.exists(out):
        if not overwrite:
            raise FileExistsError(f"{out} exists (pass overwrite=True to replace it)")
        shutil.rmtree(out)
    data = rlds.RobotDataset(src, spec or "metaworld", split)
    if len(data) == 0:
        raise ValueError(f"{src!r} split {split!r} has no episodes")
    fps = int(round(data.control_hz))
    if abs(fps - data.control_hz) > 1e-6:
        raise ValueError(f"{src!r} records at {data.control_hz} Hz; LeRobot's fps is a whole number "
                         f"(resample the dataset first)")
    writer = _Writer(out, data, fps, codebase_version, video, vcodec, crf, gop, robot_type)
    try:
        for i in range(len(data)):
            writer.add(data.episode(i))
    finally:
        writer.close()
    report = writer.finish()
    spec_fields = {
        "name": f"{data.spec.name}_lerobot",
        "camera_keys": {_cam_key(c): c for c in writer.cameras},
        "state_keys": ["observation.state"], "action_keys": ["action"], "instruction_key": "task",
        "subtask_key": SUBTASK if writer.subtasks else None,
        "gripper_dims": list(data.spec.hold_dims), "state_dim": data.state_dim, "action_dim": data.action_dim,
    }
    return {**report, "path": out, "codebase_version": codebase_version, "fps": fps,
            "seconds": time.time() - start, "spec": spec_fields}


class _Writer:
    """Appends episodes to the files of one LeRobot dataset and writes its meta/ at the end."""

    def __init__(self, out: str, data: rlds.RobotDataset, fps: int, version: str, video: bool, vcodec: str,
                 crf: int | None, gop: int | None, robot_type: str):
        self.out, self.data, self.fps, self.version = out, data, fps, version
        self.video, self.vcodec, self.crf, self.gop, self.robot_type = video, vcodec, crf, gop, robot_type
        self.cameras = list(data.cameras.values())
        self.subtasks = bool(data.spec.subtask_key)
        self.features: dict[str, Any] | None = None  # from the first episode (image size)
        self.tasks: dict[str, int] = {}
        self.episodes: list[dict[str, Any]] = []
        self.stats: list[dict[str, Any]] = []
        self.frames = 0
        self._data: _DataFile | None = None
        self._data_at = (0, 0)  # (chunk, file) of the open data file (v3.0)
        self._videos: dict[str, _Video] = {}
        self._video_at: dict[str, tuple[int, int]] = {}

    # paths of LeRobot's templates
    def _data_path(self, chunk: int, file: int, episode: int) -> str:
        if self.version == "v3.0":
            return f"data/chunk-{chunk:03d}/file-{file:03d}.parquet"
        return f"data/chunk-{episode // CHUNKS_SIZE:03d}/episode_{episode:06d}.parquet"

    def _video_path(self, key: str, chunk: int, file: int, episode: int) -> str:
        if self.version == "v3.0":
            return f"videos/{key}/chunk-{chunk:03d}/file-{file:03d}.mp4"
        return f"videos/chunk-{episode // CHUNKS_SIZE:03d}/{key}/episode_{episode:06d}.mp4"

    def _start(self, images: Mapping[str, np.ndarray]) -> None:
        size = next(iter(images.values())).shape[1:3]
        if self.video and (size[0] % 2 or size[1] % 2):
            raise ValueError(f"{self.data.path!r}: images are {size[0]}x{size[1]}; yuv420p video needs even "
                             f"sizes (export with video=False for PNG)")
        codec = {"libsvtav1": "av1", "h264": "h264", "hevc": "hevc"}[self.vcodec]
        self.features = _features(self.cameras, tuple(size), self.data.state_dim, self.data.action_dim,
                                  self.subtasks, {"codec": codec, "fps": self.fps} if self.video else None)
        self.schema = _schema(self.features)

    def add(self, ep: Any) -> None:
        n, e = ep.length, len(self.episodes)
        arrays = ep.steps(range(n))
        if self.features is None:
            self._start(arrays["images"])
        task = self.tasks.setdefault(ep.instruction, len(self.tasks))
        table, numeric = _episode_table(self.schema, self.features, arrays, n, self.fps, e, self.frames, task)
        entry: dict[str, Any] = {"episode_index": e, "tasks": [ep.instruction], "length": n}
        # data rows: v3.0 appends to the open file until it passes DATA_FILE_MB; v2.1 a file per episode
        if self._data is None or self.version != "v3.0" or self._data.size_mb() > DATA_FILE_MB:
            if self._data is not None:
                self._data.close()
                self._data_at = _next_file(*self._data_at)
            self._data = _DataFile(os.path.join(self.out, self._data_path(*self._data_at, e)), self.schema)
        entry.update({"data/chunk_index": self._data_at[0], "data/file_index": self._data_at[1],
                      "dataset_from_index": self.frames, "dataset_to_index": self.frames + n})
        self._data.add(table)
        if self.video:
            for cam in self.cameras:
                self._add_video(_cam_key(cam), arrays["images"][cam], e, entry)
        self.frames += n
        self.episodes.append(entry)
        self.stats.append(_episode_stats(numeric, arrays["images"], self.version == "v3.0"))

    def _add_video(self, key: str, frames: np.ndarray, e: int, entry: dict[str, Any]) -> None:
        v = self._videos.get(key)
        if v is None or self.version != "v3.0" or v.size_mb() > VIDEO_FILE_MB:
            at = self._video_at.get(key)
            if v is not None:
                v.close()
            at = (0, 0) if at is None else _next_file(*at)
            self._video_at[key] = at
            v = self._videos[key] = _Video(os.path.join(self.out, self._video_path(key, *at, e)),
                                           frames.shape[1:3], self.fps, self.vcodec, self.crf, self.gop)
        chunk, file = self._video_at[key]
        entry.update({f"videos/{key}/chunk_index": chunk, f"videos/{key}/file_index": file,
                      f"videos/{key}/from_timestamp": v.frames / self.fps,
                      f"videos/{key}/to_timestamp": (v.frames + len(frames)) / self.fps})
        v.add(frames)

    def close(self) -> None:
        if self._data is not None:
            self._data.close()
        for v in self._videos.values():
            v.close()

    def finish(self) -> dict[str, Any]:
        """Writes meta/ (info, tasks, episodes, statistics); returns the counts."""
        meta = os.path.join(self.out, "meta")
        tasks = sorted(self.tasks, key=self.tasks.get)
        n_eps = len(self.episodes)
        info = {
            "codebase_version": self.version, "robot_type": self.robot_type, "total_episodes": n_eps,
            "total_frames": self.frames, "total_tasks": len(tasks), "chunks_size": CHUNKS_SIZE, "fps": self.fps,
            "splits": {"train": f"0:{n_eps}"},
            "data_path": ("data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet" if self.version == "v3.0"
                          else "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"),
            "video_path": None if not self.video else (
                "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4" if self.version == "v3.0"
                else "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"),
            "features": self.features,
        }
        if self.version == "v3.0":
            info.update({"data_files_size_in_mb": DATA_FILE_MB, "video_files_size_in_mb": VIDEO_FILE_MB})
            self._finish_v30(meta, tasks)
        else:
            info.update({"total_chunks": (n_eps - 1) // CHUNKS_SIZE + 1,
                         "total_videos": n_eps * len(self.cameras) if self.video else 0})
            self._finish_v21(meta, tasks)
        _write_json(os.path.join(meta, "stats.json"), _jsonable(_merge_stats(self.stats)))
        _write_json(os.path.join(meta, "info.json"), info)
        return {"episodes": n_eps, "frames": self.frames, "tasks": len(tasks)}

    def _finish_v30(self, meta: str, tasks: Sequence[str]) -> None:
        _write_tasks_parquet(os.path.join(meta, "tasks.parquet"), tasks)
        rows = []
        for entry, stats in zip(self.episodes, self.stats):
            row = dict(entry)
            for key, s in stats.items():
                row.update({f"stats/{key}/{k}": np.asarray(v).tolist() for k, v in s.items()})
            row.update({"meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0})
            rows.append(row)
        table = pa.Table.from_pylist(rows)
        os.makedirs(os.path.join(meta, "episodes", "chunk-000"), exist_ok=True)
        pq.write_table(table, os.path.join(meta, "episodes", "chunk-000", "file-000.parquet"))

    def _finish_v21(self, meta: str, tasks: Sequence[str]) -> None:
        _write_jsonl(os.path.join(meta, "tasks.jsonl"), [{"task_index": i, "task": t} for i, t in enumerate(tasks)])
        _write_jsonl(os.path.join(meta, "episodes.jsonl"),
                     [{"episode_index": e["episode_index"], "tasks": e["tasks"], "length": e["length"]}
                      for e in self.episodes])
        _write_jsonl(os.path.join(meta, "episodes_stats.jsonl"),
                     [{"episode_index": e["episode_index"], "stats": _jsonable(s)}
                      for e, s in zip(self.episodes, self.stats)])
