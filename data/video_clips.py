"""Captioned video files (mp4 / webm / mkv, any codec PyAV decodes) as canonical text examples.

`decode_frames(path, timestamps_s)` is the general decoder: frames nearest given presentation
times (pts × time_base, in seconds, as LeRobot stores them), seeking to the keyframe before a
wanted time and decoding forward. Each process keeps a few containers open (an LRU), and a
reader remembers where its decoder stands, so reads moving forward through a file decode on
instead of seeking again.

`ClipSource` reads a folder of videos plus captions.jsonl / captions.csv (columns video,
caption, optional start_s, end_s): example i is window i % clips_per_video of caption entry
i // clips_per_video, `frames` frames `stride_s` apart, current (last) frame last, at native
size: {"images": {camera: uint8 [frames, h, w, 3]}, "prompt", "target": caption, "task"}.
"""
from __future__ import annotations

import collections
import csv
import json
import os
import threading
from collections.abc import Sequence
from typing import Any

import av
import numpy as np
from absl import logging
from av.video.reformatter import VideoReformatter

from data.rlds import CorruptRecordError

OPEN_CONTAINERS = 8  # per process; each holds a file descriptor and decoder buffers
# Wanted times further ahead than this from the decoder's position are reached by seeking
# rather than decoding every frame in between (keyframes of web video are ~0.5-10 s apart).
SEEK_AHEAD_S = 1.0


class _Reader:
    """One open video stream and where its decoder stands: the last two frames decoded."""

    def __init__(self, path: str):
        self.path = path
        self.container = av.open(path)
        if not self.container.streams.video:
            self.container.close()
            raise ValueError(f"{path}: no video stream")
        self.stream = s = self.container.streams.video[0]
        self.time_base = float(s.time_base)
        rate = s.average_rate or s.guessed_rate
        self.frame_s = float(1 / rate) if rate else 1 / 30
        self.start_pts = s.start_time or 0
        if s.duration is not None:
            end_s = (self.start_pts + s.duration) * self.time_base
        else:  # webm/mkv often give only the container's duration (in av.time_base units)
            end_s = (self.container.duration or 0) / av.time_base
        self.first_s = self.start_pts * self.time_base
        self.last_s = max(self.first_s, end_s - self.frame_s)  # the last frame's time, estimated
        self.lock = threading.Lock()
        # Kept: frame.to_ndarray builds a new swscale context per call, ~10x the cost of a
        # 64x64 frame's decode; a reformatter reuses its context while the size stays.
        self._rgb = VideoReformatter()
        self._frames = None  # decode iterator; None until the first seek
        self._prev: tuple[float, Any] | None = None  # (time, frame) before _cur
        self._cur: tuple[float, Any] | None = None  # None at the end of the stream

    def _step(self) -> None:
        self._prev = self._cur if self._cur is not None else self._prev
        try:
            frame = next(self._frames)
        except StopIteration:
            self._cur = None
            return
        pts = frame.pts if frame.pts is not None else frame.dts
        self._cur = (pts * self.time_base, frame)

    def _seek(self, t: float, to_start: bool = False) -> None:
        pts = self.start_pts if to_start else max(int(t / self.time_base), self.start_pts)
        self.container.seek(pts, stream=self.stream, backward=True)  # flushes the decoder
        self._frames = self.container.decode(self.stream)
        self._prev = self._cur = None
        self._step()

    def frame_at(self, t: float) -> np.ndarray:
        """uint8 [h, w, 3], the frame whose time is nearest t."""
        try:
            return self._frame_at(t)
        except Exception:
            self._frames = None  # position unknown after a failure: the next read seeks
            raise

    def _frame_at(self, t: float) -> np.ndarray:
        known = [f for f in (self._prev, self._cur) if f is not None]
        if self._frames is None or not any(ft <= t for ft, _ in known) or t - known[-1][0] > SEEK_AHEAD_S:
            for back in (0.0, 1.0, 10.0, None):  # landed past t (mp4 seeks by dts): back off
                self._seek(t - (back or 0.0), to_start=back is None)
                if self._cur is None or self._cur[0] <= t:
                    break
        while self._cur is not None and self._cur[0] < t:
            self._step()
        candidates = [f for f in (self._prev, self._cur) if f is not None]
        if not candidates:
            raise ValueError(f"{self.path}: no frame decoded near {t:.4f} s")
        time, frame = min(candidates, key=lambda f: abs(f[0] - t))  # a tie keeps the earlier frame
        if abs(time - t) > self.frame_s:
            raise ValueError(f"{self.path}: no frame at {t:.4f} s (frames span about "
                             f"{self.first_s:.4f}-{self.last_s:.4f} s, {1 / self.frame_s:.3g} fps)")
        return self._rgb.reformat(frame, format="rgb24").to_ndarray()

    def close(self) -> None:
        self.container.close()


_readers: collections.OrderedDict[str, _Reader] = collections.OrderedDict()
_readers_pid = os.getpid()
_readers_lock = threading.Lock()
_inherited: list[_Reader] = []


def _reader(path: str) -> _Reader:
    """This process's open reader of path. Readers inherited through fork are set aside, never
    used (they share the parent's file positions) nor freed: freeing a decoder joins its
    threads, which a forked child does not have, and hangs."""
    global _readers_pid, _readers_lock
    path = os.path.abspath(path)
    if _readers_pid != os.getpid():
        _readers_lock = threading.Lock()  # may have been held by another thread at the fork
        _inherited.extend(_readers.values())
        _readers.clear()
        _readers_pid = os.getpid()
    with _readers_lock:
        if path in _readers:
            _readers.move_to_end(path)
            return _readers[path]
        if not os.path.isfile(path):
            raise FileNotFoundError(f"video {path} does not exist")
        reader = _readers[path] = _Reader(path)
        while len(_readers) > OPEN_CONTAINERS:
            old = _readers.popitem(last=False)[1]
            with old.lock:  # not while another thread decodes from it
                old.close()
        return reader


def decode_frames(path: str | os.PathLike, timestamps_s: Sequence[float]) -> np.ndarray:
    """Frames of a video's first video stream nearest each timestamp (seconds of presentation
    time), in the order asked -> uint8 [n, h, w, 3] RGB. Raises ValueError naming the file and
    timestamp when one lies more than a frame period before the first frame or after the last,
    FileNotFoundError for a missing file, av.error.FFmpegError for an undecodable one."""
    reader = _reader(os.fspath(path))
    times = [float(t) for t in timestamps_s]
    out: list[np.ndarray | None] = [None] * len(times)
    with reader.lock:
        for k in sorted(range(len(times)), key=times.__getitem__):  # decode forward, once
            out[k] = reader.frame_at(times[k])
    if not out:
        return np.zeros((0, reader.stream.height, reader.stream.width, 3), np.uint8)
    return np.stack(out)


def video_span(path: str | os.PathLike) -> tuple[float, float]:
    """(first frame's time, last frame's time) in seconds, from the container's metadata."""
    reader = _reader(os.fspath(path))
    return reader.first_s, reader.last_s


# ------------------------------------------------------------------------------ captions
def _captions(path: str) -> list[dict[str, Any]]:
    """Entries of captions.jsonl / captions.csv, each with video, caption and optional
    start_s, end_s; raises ValueError naming file and line for a malformed one."""
    with open(path, newline="") as f:
        if path.endswith(".csv"):
            rows = [(n + 2, {k: v for k, v in r.items() if v not in ("", None)})
                    for n, r in enumerate(csv.DictReader(f))]
        else:
            rows = []
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append((n, json.loads(line)))
                    except ValueError as e:
                        raise ValueError(f"{path}:{n}: not a JSON object: {e}") from None
    out = []
    for n, row in rows:
        if not isinstance(row, dict) or "video" not in row or "caption" not in row:
            raise ValueError(f"{path}:{n}: needs keys 'video' and 'caption' (optional 'start_s', "
                             f"'end_s'); found {list(row) if isinstance(row, dict) else row!r}")
        try:
            span = [None if row.get(k) is None else float(row[k]) for k in ("start_s", "end_s")]
        except ValueError as e:
            raise ValueError(f"{path}:{n}: start_s / end_s must be numbers: {e}") from None
        out.append({"video": str(row["video"]), "caption": str(row["caption"]).strip(),
                    "start_s": span[0], "end_s": span[1]})
    return out


class ClipSource:
    """Random access to captioned clips of a folder of videos.

    root: the folder; captions: its captions file (default root/captions.jsonl, else
    root/captions.csv), video paths relative to root. frames, stride_s: frames per example and
    their spacing in seconds; clips_per_video: windows per caption entry, their last frames
    spread evenly over the entry's [start_s, end_s] (default the whole video). A window reaching
    before the entry's start repeats its first frame. Entries whose video is missing are left
    out with a warning. entries: the captions file's rows given directly ({"video", "caption",
    "start_s", "end_s"}; data/lerobot.clip_source makes them from a LeRobot dataset's episodes)."""

    def __init__(self, root: str | os.PathLike, captions: str | os.PathLike | None = None,
                 frames: int = 4, stride_s: float = 0.5, clips_per_video: int = 1,
                 prompt: str = "describe the video", camera: str = "image",
                 task: str | None = None, name: str | None = None, entries: list[dict] | None = None):
        self.root = os.path.abspath(os.fspath(root))
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"video folder {self.root} does not exist")
        if entries is not None:
            captions = f"the episodes of {self.root}"
        elif captions is None:
            found = [p for p in (os.path.join(self.root, f"captions.{e}") for e in ("jsonl", "csv"))
                     if os.path.isfile(p)]
            if not found:
                raise FileNotFoundError(f"{self.root} has no captions.jsonl or captions.csv (lines "
                                        '{"video": "rel/path.mp4", "caption": "..."}); pass captions=')
            captions = found[0]
        if entries is None:
            captions = os.path.join(self.root, os.fspath(captions))
            if not os.path.isfile(captions):
                raise FileNotFoundError(f"captions file {captions} does not exist")
        if frames < 1 or stride_s < 0 or clips_per_video < 1:
            raise ValueError(f"need frames >= 1, stride_s >= 0, clips_per_video >= 1; got {frames}, "
                             f"{stride_s}, {clips_per_video}")
        entries = _captions(captions) if entries is None else [dict(e) for e in entries]
        for e in entries:
            e["video"] = os.path.join(self.root, e["video"])
        present = [e for e in entries if os.path.isfile(e["video"])]
        if not present:
            raise FileNotFoundError(f"none of the {len(entries)} videos listed in {captions} exist "
                                    f"(first: {entries[0]['video'] if entries else 'no entries'})")
        if len(present) < len(entries):
            missing = [e["video"] for e in entries if not os.path.isfile(e["video"])]
            logging.warning("%s: %d of %d listed videos are missing and left out (first: %s)",
                            captions, len(missing), len(entries), missing[0])
        self._entries = present
        self.name = name or os.path.basename(self.root)
        self.task = task or self.name
        self.frames, self.stride_s, self.clips_per_video = frames, stride_s, clips_per_video
        self.prompt, self.camera = prompt, camera

    def __len__(self) -> int:
        return len(self._entries) * self.clips_per_video

    def timestamps(self, i: int) -> tuple[str, list[float]]:
        """Example i -> (its video, the times of its frames in seconds, last = current)."""
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} clips")
        entry = self._entries[i // self.clips_per_video]
        first, last = video_span(entry["video"])
        lo = first if entry["start_s"] is None else max(entry["start_s"], first)
        hi = last if entry["end_s"] is None else min(entry["end_s"], last)
        if hi < lo:
            raise ValueError(f"{entry['video']}: caption span {entry['start_s']}-{entry['end_s']} s "
                             f"lies outside the video ({first:.3f}-{last:.3f} s)")
        span = (self.frames - 1) * self.stride_s
        earliest = min(lo + span, hi)  # the first end leaving the whole window inside the entry
        k = i % self.clips_per_video
        end = earliest + (hi - earliest) * (k + 0.5) / self.clips_per_video
        return entry["video"], [max(end - self.stride_s * (self.frames - 1 - j), lo)
                                for j in range(self.frames)]

    def __getitem__(self, i: int) -> dict[str, Any]:
        entry = self._entries[i // self.clips_per_video] if 0 <= i < len(self) else None
        if entry is None:
            raise IndexError(f"index {i} out of range for {len(self)} clips")
        try:
            path, times = self.timestamps(i)
            frames = decode_frames(path, times)
        except (OSError, ValueError, av.error.FFmpegError) as e:
            raise CorruptRecordError(self.name, i, None, e, entry["video"]) from e
        return {"images": {self.camera: frames}, "prompt": self.prompt, "target": entry["caption"],
                "task": self.task}
