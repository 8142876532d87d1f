"""TFDS datasets in TFRecord (as Open X-Embodiment publishes them) -> ArrayRecord, no TensorFlow.

Our readers open TFDS datasets with `builder_from_directory(dir).as_data_source()` (random
access), which refuses TFRecord. A TFDS TFRecord shard and a TFDS ArrayRecord shard hold the
same serialized tf.train.Example records, so conversion copies each shard's records into an
ArrayRecord shard of the same name pattern and rewrites dataset_info.json's fileFormat:

    python -m tools.convert rlds --src ~/oxe/bridge/0.1.0 --out ~/data/bridge/0.1.0

- TFRecord framing is read here (u64 length, masked crc32c of the length, data, masked crc32c
  of the data; both CRCs checked), so converting needs neither TensorFlow nor apache_beam.
- Shards convert in parallel (one process each), each written as `<shard>.partial` and renamed
  when complete, then recorded by a marker `.convert/<split>-<index>.json`; a rerun skips shards
  whose marker and output agree, so a killed conversion resumes where it stopped.
- Every output shard's record count is checked against the input shard's and against
  dataset_info.json's shard_lengths; dataset_info.json is written last, so `out` opens as a
  dataset only once every shard is there.
- RLDS datasets (a "steps" Dataset feature) get their episode lengths per split written into
  metadata.json ({"episode_lengths": {split: [int, ...]}}, what data/rlds.RobotDataset reads),
  counted from one scalar step field per record without decoding an image.
"""
from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import os
import queue
import shutil
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import google_crc32c  # C crc32c (a dependency of google-cloud-storage, hence of gcsfs)

CONVERT_COMMAND = "python -m tools.convert rlds --src {path} --out OUT"
MARKER_DIR = ".convert"
# As TFDS writes ArrayRecord (file_adapters.ArrayRecordFileAdapter): one record per chunk, so
# reading one record decodes only that record.
ARRAY_RECORD_OPTIONS = "group_size:1"
_LENGTH_KEYS = ("is_first", "is_last", "is_terminal", "reward", "discount")  # RLDS scalars
_MASK_DELTA = 0xA282EAD8


class ConversionError(ValueError):
    """A dataset that cannot be converted as it is; the message names the dataset or shard file."""


# ---------------------------------------------------------------------------------- the check
def require_random_access(builder: Any, path: str) -> None:
    """Raises ValueError when the TFDS builder's files are TFRecord (no random access), naming
    the dataset and the command that converts it."""
    fmt = getattr(builder.info.file_format, "value", builder.info.file_format)
    if str(fmt or "tfrecord").lower() == "tfrecord":
        raise ValueError(
            f"dataset {path!r} is stored as TFRecord (as Open X-Embodiment publishes it), which "
            f"TFDS cannot read with random access; convert it once to ArrayRecord with "
            f"`{CONVERT_COMMAND.format(path=path)}` and point the config at OUT")


# ---------------------------------------------------------------------------------- TFRecord
def _masked_crc(data: bytes | memoryview) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def read_tfrecord(path: str, verify: bool = True) -> Iterator[bytes]:
    """The records of a TFRecord file, in order. Every length CRC is checked (a wrong one means
    the framing is lost); with verify, every data CRC too. Raises ConversionError naming the
    file, the record and its byte offset."""
    with open(path, "rb", buffering=1 << 20) as f:
        index = offset = 0
        while True:
            header = f.read(12)
            if not header:
                return
            if len(header) < 12:
                raise _corrupt(path, index, offset, "file ends inside a record header (truncated)")
            length, length_crc = struct.unpack("<QI", header)
            if _masked_crc(header[:8]) != length_crc:
                hint = " (it is GZIP-compressed; decompress it first)" if header[:2] == b"\x1f\x8b" else ""
                raise _corrupt(path, index, offset, f"length CRC mismatch, not a TFRecord file or corrupt{hint}")
            data = f.read(length)
            footer = f.read(4)
            if len(data) < length or len(footer) < 4:
                raise _corrupt(path, index, offset, f"file ends inside a {length}-byte record (truncated)")
            if verify and _masked_crc(data) != struct.unpack("<I", footer)[0]:
                raise _corrupt(path, index, offset, "data CRC mismatch (corrupt bytes)")
            yield data
            index += 1
            offset += 16 + length


def write_tfrecord(path: str, records: Sequence[bytes]) -> None:
    """Records into a TFRecord file (for tests and small tools; TFDS writes the real ones)."""
    with open(path, "wb") as f:
        for r in records:
            head = struct.pack("<Q", len(r))
            f.write(head + struct.pack("<I", _masked_crc(head)) + r + struct.pack("<I", _masked_crc(r)))


def _corrupt(path: str, index: int, offset: int, what: str) -> ConversionError:
    return ConversionError(f"corrupt TFRecord shard {path}: record {index} at byte {offset}: {what}; "
                           f"download this shard again and rerun (finished shards are kept)")


# ---------------------------------------------------------------------------------- tf.train.Example
def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of the protobuf message buf[start:end]: value is an int
    (varint), a (start, end) slice (length-delimited) or None (fixed width, skipped)."""
    pos = start
    while pos < end:
        tag, pos = _varint(buf, pos)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = (pos, pos + n), pos + n
        elif wire in (1, 5):
            value, pos = None, pos + (8 if wire == 1 else 4)
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} at byte {pos}")
        yield field, wire, value


def feature_value_count(record: bytes, key: str) -> int | None:
    """How many values the serialized tf.train.Example `record` holds under feature `key`
    (None when it has no such feature). Walks the wire format and skips every other feature's
    bytes, so an episode's images are never parsed."""
    buf, want = memoryview(record), key.encode()
    for f1, _, features in _fields(buf, 0, len(buf)):  # Example.features = 1
        if f1 != 1:
            continue
        for f2, _, entry in _fields(buf, *features):  # Features.feature = 1 (map entries)
            if f2 != 1:
                continue
            name = value = None
            for f3, _, v in _fields(buf, *entry):  # entry: key = 1, value = 2
                if f3 == 1:
                    name = v
                elif f3 == 2:
                    value = v
            if name is None or buf[name[0]:name[1]] != want:
                continue
            return 0 if value is None else _list_count(buf, value)
    return None


def _list_count(buf: memoryview, feature: tuple[int, int]) -> int:
    """Values in a Feature message: bytes_list = 1, float_list = 2, int64_list = 3, each a
    repeated field 1 (packed or not)."""
    count = 0
    for kind, _, lst in _fields(buf, *feature):
        for f, wire, v in _fields(buf, *lst):
            if f != 1:
                continue
            if kind == 1 or wire in (0, 5):
                count += 1
            elif kind == 2:  # packed floats
                count += (v[1] - v[0]) // 4
            else:  # packed varints: one value per byte below 0x80
                count += sum(1 for b in buf[v[0]:v[1]] if b < 0x80)
    return count


# ---------------------------------------------------------------------------------- one shard
@dataclasses.dataclass(frozen=True)
class _Shard:
    split: str
    index: int
    src: str
    out: str
    expected: int | None  # records per dataset_info.json's shard_lengths
    length_key: str | None  # serialized feature counting an episode's steps (RLDS), else None
    per_step: int  # values of that feature per step

    @property
    def marker(self) -> str:
        return os.path.join(os.path.dirname(self.out), MARKER_DIR, f"{self.split}-{self.index:05d}.json")


def _done(shard: _Shard) -> dict | None:
    """The shard's marker when it and the output shard agree (else the shard is redone)."""
    try:
        with open(shard.marker) as f:
            marker = json.load(f)
        ok = (marker["src"] == os.path.basename(shard.src) and marker["src_bytes"] == os.path.getsize(shard.src)
              and marker["out_bytes"] == os.path.getsize(shard.out))
    except (OSError, ValueError, KeyError):
        return None
    return marker if ok else None


def _convert_shard(shard: _Shard, report: Callable[[int, int], None]) -> dict:
    """Copies one TFRecord shard into ArrayRecord (`.partial`, renamed when complete), checks the
    counts and writes the shard's marker. report(records, bytes) is called as records go."""
    from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

    partial = shard.out + ".partial"
    lengths: list[int] | None = [] if shard.length_key else None
    count = pending_records = pending_bytes = 0
    writer = ArrayRecordWriter(partial, ARRAY_RECORD_OPTIONS)
    try:
        for record in read_tfrecord(shard.src):
            writer.write(record)
            if lengths is not None:
                lengths.append(_episode_length(record, shard, count))
            count += 1
            pending_records, pending_bytes = pending_records + 1, pending_bytes + len(record) + 16
            if pending_bytes >= 1 << 22:
                report(pending_records, pending_bytes)
                pending_records = pending_bytes = 0
    finally:
        writer.close()
    report(pending_records, pending_bytes)
    reader = ArrayRecordReader(partial)
    written = reader.num_records()
    reader.close()
    if written != count:
        raise ConversionError(f"ArrayRecord shard {partial} holds {written} records, {count} were written")
    if shard.expected is not None and count != shard.expected:
        raise ConversionError(
            f"shard {shard.src} holds {count} records, but dataset_info.json says split "
            f"{shard.split!r} shard {shard.index} has {shard.expected} (incomplete download?)")
    os.replace(partial, shard.out)
    marker = {"src": os.path.basename(shard.src), "src_bytes": os.path.getsize(shard.src),
              "out_bytes": os.path.getsize(shard.out), "records": count, "episode_lengths": lengths}
    _write_json(shard.marker, marker)
    return marker


def _episode_length(record: bytes, shard: _Shard, index: int) -> int:
    n = feature_value_count(record, shard.length_key)
    if n is None or n % shard.per_step:
        got = "no such feature" if n is None else f"{n} values, not a multiple of {shard.per_step}"
        raise ConversionError(f"shard {shard.src}, record {index}: cannot count the episode's steps "
                              f"from feature {shard.length_key!r} ({got})")
    return n // shard.per_step


_progress_queue: Any = None


def _init_worker(progress: Any) -> None:
    global _progress_queue
    _progress_queue = progress


def _worker(shard: _Shard) -> tuple[_Shard, dict]:
    return shard, _convert_shard(shard, lambda r, b: _progress_queue.put((r, b)))


def _write_json(path: str, value: Any) -> None:
    """Atomically: a reader sees the old file or the new one, never half of one."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------- a dataset
def dataset_dir(path: str) -> str:
    """The directory holding dataset_info.json: `path` itself or its newest version folder."""
    if "://" in path:
        raise ConversionError(f"{path!r}: conversion reads and writes local files; copy the dataset "
                              f"down first (e.g. gsutil -m cp -r {path} LOCAL_DIR) and upload OUT after")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"dataset path {path!r} does not exist")
    if os.path.exists(os.path.join(path, "dataset_info.json")):
        return path
    versions = sorted(d for d in os.listdir(path) if os.path.exists(os.path.join(path, d, "dataset_info.json")))
    if not versions:
        raise ConversionError(f"{path!r} is not a TFDS dataset directory (no dataset_info.json in it "
                              f"or in a version folder below it)")
    return os.path.join(path, versions[-1])


def _length_feature(features: Any) -> tuple[str | None, int]:
    """(serialized key, values per step) of a fixed-shape step field of an RLDS dataset, or
    (None, 1) when the dataset has no "steps" Dataset feature."""
    import tensorflow_datasets as tfds

    steps = features["steps"] if "steps" in features else None
    if not isinstance(steps, tfds.features.Dataset):
        return None, 1
    leaves: dict[str, Any] = {}

    def walk(feature: Any, prefix: str) -> None:
        if isinstance(feature, tfds.features.FeaturesDict):
            for k, sub in feature.items():
                walk(sub, f"{prefix}/{k}")
        else:
            leaves[prefix] = feature

    walk(steps.feature, "steps")
    fixed = {k: f for k, f in leaves.items() if type(f) in (tfds.features.Tensor, tfds.features.Scalar)
             and all(isinstance(d, int) for d in f.shape)}
    for name in (*(f"steps/{k}" for k in _LENGTH_KEYS), *sorted(fixed)):
        if name in fixed:
            return name, max(1, math.prod(fixed[name].shape))
    raise ConversionError(f"no fixed-shape tensor among the step features {sorted(leaves)} to count "
                          f"episode lengths with")


def _shards(src: str, out: str, builder: Any) -> list[_Shard]:
    length_key, per_step = _length_feature(builder.info.features)
    shards, missing = [], []
    for split, info in builder.info.splits.items():
        sources = [os.fspath(p) for p in info.filepaths]
        template = dataclasses.replace(info.filename_template, data_dir=out, filetype_suffix="array_record")
        outs = [os.fspath(p) for p in template.sharded_filepaths(len(sources))]
        expected = list(info.shard_lengths) or [None] * len(sources)
        if len(expected) != len(sources):
            raise ConversionError(f"{src}: dataset_info.json lists {len(expected)} shard lengths for "
                                  f"split {split!r} but names {len(sources)} shard files")
        for i, (s, o, n) in enumerate(zip(sources, outs, expected)):
            if not os.path.isfile(s):
                missing.append(os.path.basename(s))
            shards.append(_Shard(split, i, s, o, None if n is None else int(n), length_key, per_step))
    if missing:
        raise ConversionError(f"{src}: {len(missing)} shard file(s) named by dataset_info.json are missing "
                              f"(incomplete download?): {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return shards


def convert(src: str, out: str, *, workers: int = 0, progress: bool = True,
            on_shard: Callable[[str], None] | None = None) -> dict:
    """Converts the TFDS TFRecord dataset in `src` (a dataset directory or its parent holding
    version folders) into an ArrayRecord dataset written directly in `out`; resumable.

    workers: shard processes; 0 = min(shards, CPUs); 1 = in this process. on_shard(path) is
    called after each shard is done (a hook for tests). Returns the report: {"src", "out",
    "shards", "converted", "skipped", "records", "bytes" (TFRecord bytes converted this run),
    "seconds", "mb_per_s", "splits": {split: records}}.
    """
    import tensorflow_datasets as tfds

    start = time.perf_counter()
    src = dataset_dir(src)
    out = os.path.abspath(out)
    if "://" in out:
        raise ConversionError(f"{out!r}: write the converted dataset locally, then copy it up")
    if os.path.realpath(out) == os.path.realpath(src):
        raise ConversionError(f"--out must differ from --src ({src})")
    builder = tfds.builder_from_directory(src)
    fmt = getattr(builder.info.file_format, "value", builder.info.file_format) or "tfrecord"
    if fmt != "tfrecord":
        raise ConversionError(f"{src} is already stored as {fmt}; open it directly, no conversion needed")
    os.makedirs(os.path.join(out, MARKER_DIR), exist_ok=True)
    shards = _shards(src, out, builder)
    results = {s: m for s in shards if (m := _done(s)) is not None}
    todo = [s for s in shards if s not in results]
    for s in todo:  # a shard killed mid-write left its .partial file
        if os.path.exists(s.out + ".partial"):
            os.remove(s.out + ".partial")
    total_bytes = sum(os.path.getsize(s.src) for s in todo)
    converted = _run(todo, workers, progress, total_bytes, builder.info.name, results, on_shard)
    report = _finish(src, out, builder, shards, results)
    seconds = time.perf_counter() - start
    report.update(shards=len(shards), converted=converted, skipped=len(shards) - len(todo),
                  bytes=total_bytes, seconds=round(seconds, 2),
                  mb_per_s=round(total_bytes / 1e6 / seconds, 1) if seconds else 0.0)
    return report


def _run(todo: list[_Shard], workers: int, progress: bool, total_bytes: int, name: str,
         results: dict[_Shard, dict], on_shard: Callable[[str], None] | None) -> int:
    """Converts the shards (in a pool when workers > 1) into `results`; returns how many."""
    from tqdm import tqdm

    if not todo:
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = min(len(todo), workers or cpus)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1000, desc=f"converting {name}",
               disable=not progress, smoothing=0.05, dynamic_ncols=True)
    records = [0]

    def advance(n: int, nbytes: int) -> None:
        records[0] += n
        bar.update(nbytes)
        rate = records[0] / max(bar.format_dict["elapsed"], 1e-9)
        bar.set_postfix_str(f"{records[0]} records, {rate:.1f} rec/s, {len(results)} shards done", refresh=False)

    def finished(shard: _Shard, marker: dict) -> None:
        results[shard] = marker
        advance(0, 0)  # the shard count in the postfix
        if on_shard is not None:
            on_shard(shard.out)

    try:
        if workers <= 1:
            for shard in todo:
                finished(shard, _convert_shard(shard, advance))
            return len(todo)
        ctx = multiprocessing.get_context("spawn")  # the caller may hold JAX or TF threads: no fork
        updates = ctx.Queue()
        stop = threading.Event()

        def drain() -> None:
            while not stop.is_set():
                try:
                    advance(*updates.get(timeout=0.2))
                except queue.Empty:
                    pass

        drainer = threading.Thread(target=drain, daemon=True)
        drainer.start()
        pool = ctx.Pool(workers, initializer=_init_worker, initargs=(updates,))
        try:
            for shard, marker in pool.imap_unordered(_worker, todo):
                finished(shard, marker)
            pool.close()
        finally:
            pool.terminate()  # on an error, stops the other shards now (their .partial files are redone)
            pool.join()
            stop.set()
            drainer.join()
        return len(todo)
    finally:
        bar.close()


def _finish(src: str, out: str, builder: Any, shards: list[_Shard], results: dict[_Shard, dict]) -> dict:
    """Checks the split totals, copies the metadata files and writes dataset_info.json last."""
    with open(os.path.join(src, "dataset_info.json")) as f:
        info = json.load(f)
    splits: dict[str, list[_Shard]] = {}
    for s in shards:
        splits.setdefault(s.split, []).append(s)
    lengths: dict[str, list[int]] = {}
    for split_json in info.get("splits", []):
        name = split_json["name"]
        counts = [results[s]["records"] for s in splits[name]]
        want = builder.info.splits[name].num_examples
        if want and sum(counts) != want:
            raise ConversionError(f"split {name!r} of {src}: {sum(counts)} records converted, "
                                  f"dataset_info.json says {want}")
        split_json["shardLengths"] = [str(n) for n in counts]
        split_json["numBytes"] = str(sum(results[s]["out_bytes"] for s in splits[name]))
        split_json.pop("numShards", None)  # legacy field, superseded by shardLengths
        if shards and shards[0].length_key:
            lengths[name] = [n for s in splits[name] for n in results[s]["episode_lengths"]]
    shard_names = {os.path.basename(s.src) for s in shards}
    for entry in os.listdir(src):  # features.json, metadata.json, label and image files, ...
        path = os.path.join(src, entry)
        if entry not in shard_names and entry != "dataset_info.json" and os.path.isfile(path):
            shutil.copy2(path, os.path.join(out, entry))
    if lengths:
        meta_path = os.path.join(out, "metadata.json")
        metadata = {}
        if os.path.exists(meta_path):
            with open(meta_path) as f:
                metadata = json.load(f)
        _write_json(meta_path, {**metadata, "episode_lengths": lengths})
    info["fileFormat"] = "array_record"
    info.pop("alternativeFileFormats", None)
    _write_json(os.path.join(out, "dataset_info.json"), info)
    return {"src": src, "out": out, "name": builder.info.name,
            "records": sum(sum(results[s]["records"] for s in ss) for ss in splits.values()),
            "splits": {k: sum(results[s]["records"] for s in ss) for k, ss in splits.items()}}
