"""Web image-text data as canonical text examples: webdataset tar shards and parquet files.

Both give random access (Grain samples indices in any order) with the interface of
data/tfds_image_text.ImageTextSource: `name`, `len`, and [i] -> {"images": {camera: uint8
[1, h, w, 3]}, "prompt": str, "target": str, "task": str}. They are picklable: files are opened
lazily in the process that reads, and never pickled. A record that cannot be read raises
data.rlds.CorruptRecordError (the pipeline skips and counts it); a wrong path, column or key
raises FileNotFoundError / ValueError when the source is built.

Keys name where the text lives: for webdataset a member extension ("txt") or a field inside a
JSON member ("json/caption"); for parquet a column ("text") or a field of a struct column
("meta/caption"). A list value (several captions) contributes its first element. `prompt` is a
template whose {fields} are such keys, e.g. "answer en {json/question}".
"""
from __future__ import annotations

import bisect
import collections
import functools
import io
import json
import os
import re
import string
import tarfile
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from absl import logging
from PIL import Image

from data import storage
from data.rlds import CorruptRecordError
from data.transform import lookup

PathsOrDir = str | os.PathLike | Sequence[str | os.PathLike]


# ------------------------------------------------------------------------------ shared helpers
def list_files(paths_or_dir: PathsOrDir, suffix: str) -> list[str]:
    """The files of a source: a directory (every `suffix` file below it, sorted; hidden files
    and folders skipped) or an explicit list of files. Raises FileNotFoundError naming what is
    missing or what the directory holds instead."""
    if isinstance(paths_or_dir, (str, os.PathLike)):
        root = os.fspath(paths_or_dir)
        if storage.is_remote(root):  # tar and parquet readers seek in local files
            root = storage.stage(root)
        if not os.path.isdir(root):
            if os.path.isfile(root):
                return [os.path.abspath(root)]
            raise FileNotFoundError(f"{root!r} does not exist")
        found = []
        for d, dirs, files in os.walk(root):
            dirs[:] = sorted(x for x in dirs if not x.startswith("."))
            found += [os.path.join(d, f) for f in files if f.endswith(suffix) and not f.startswith(".")]
        if not found:
            present = sorted({os.path.splitext(f)[1] or f for _, _, fs in os.walk(root) for f in fs})
            raise FileNotFoundError(f"no {suffix} files under {root!r} (file types there: {present})")
        return sorted(os.path.abspath(f) for f in found)
    files = [os.path.abspath(os.fspath(p)) for p in paths_or_dir]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing or not files:
        raise FileNotFoundError(f"source files missing: {missing[:5] or 'none given'}")
    return files


def _default_name(paths_or_dir: PathsOrDir, files: Sequence[str]) -> str:
    if isinstance(paths_or_dir, (str, os.PathLike)):
        return os.path.basename(os.path.normpath(os.fspath(paths_or_dir)))
    return os.path.basename(os.path.dirname(files[0]))


def template_fields(prompt: str) -> list[str]:
    """The {fields} of a prompt template, in order."""
    return [name for _, name, _, _ in string.Formatter().parse(prompt) if name]


def as_text(value: Any) -> str:
    """A text value as str, stripped: bytes are UTF-8, a list gives its first element, None ""."""
    if isinstance(value, (list, tuple, np.ndarray)):
        value = value[0] if len(value) else ""
    if value is None:
        return ""
    return (value.decode("utf-8") if isinstance(value, bytes) else str(value)).strip()


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes (any format PIL reads) -> uint8 [h, w, 3] RGB."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _check_keys(source: Any) -> None:
    """Reads the first record, so that a key naming no field fails when the source is built
    (ValueError listing the fields there) rather than as every record skipped as corrupt."""
    try:
        source[0]
    except CorruptRecordError as e:
        if isinstance(e.cause, KeyError):
            raise ValueError(f"{source.name!r} ({e.file}): {e.cause.args[0]}; set "
                             "text_key / text_column / prompt to fields present") from e
        # other damage to record 0 is the pipeline's to skip and count


def _example(image: np.ndarray, camera: str, prompt: str, fields: dict[str, str], target: str,
             task: str) -> dict[str, Any]:
    return {"images": {camera: image[None]}, "prompt": prompt.format_map(fields), "target": target,
            "task": task}


class _Open:
    """The few files a source has open in this process, most recently used kept (a dataset of
    thousands of shards must not hold thousands of descriptors); not pickled."""

    def __init__(self, opener: Callable[[int], Any], size: int = 8):
        self._opener, self._size = opener, size
        self._items: collections.OrderedDict[int, Any] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {"_opener": self._opener, "_size": self._size}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["_opener"], state["_size"])

    def get(self, key: int) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            item = self._items[key] = self._opener(key)
            while len(self._items) > self._size:
                old = self._items.popitem(last=False)[1]
                if hasattr(old, "close"):
                    old.close()
            return item


# ------------------------------------------------------------------------------ webdataset
# The webdataset convention: a member's key is its path up to the first dot of its basename,
# the rest is its extension ("a/000123.seg.png" -> key "a/000123", ext "seg.png"); consecutive
# members with one key form a sample.
_KEY_EXT = re.compile(r"^((?:.*/|)[^./][^.]*)\.([^/]*)$")


def _scan_shard(path: str) -> list[list]:
    """Every sample of a tar shard: [[key, {ext: [data offset, size]}], ...] in shard order."""
    try:
        tar = tarfile.open(path, "r:")  # plain tar only: compressed members cannot be seeked
    except tarfile.ReadError as e:
        raise ValueError(f"{path}: not an uncompressed tar ({e}); random access needs plain .tar "
                         "shards (decompress .tar.gz shards first, e.g. gunzip)") from e
    samples: list[list] = []
    with tar:
        for m in tar:
            match = _KEY_EXT.match(m.name) if m.isfile() else None
            if match is None:  # folders, links, __meta__ files, names without an extension
                continue
            key, ext = match.groups()
            if not samples or samples[-1][0] != key:
                samples.append([key, {}])
            samples[-1][1][ext] = [m.offset_data, m.size]
    return samples


def shard_index(shards: Sequence[str]) -> dict[str, list[list]]:
    """shard path -> its samples (as _scan_shard). Each shard's index is cached beside it
    (data/storage.cached_json: <dir>/.vla_index/, or the data cache when the folder is
    read-only) and rebuilt only when that shard's size or mtime changed, so adding shards to a
    folder scans just the new ones."""
    return {s: storage.cached_json(os.path.dirname(s), f"webdataset.{os.path.basename(s)}", [s],
                                   functools.partial(_scan_shard, s))
            for s in shards}


def _open_shard(shards: Sequence[str], s: int) -> Any:
    return open(shards[s], "rb")


def _ext_of(key: str) -> tuple[str, str]:
    """"json/caption" -> ("json", "caption"); "txt" -> ("txt", "")."""
    ext, _, field = key.partition("/")
    return ext, field


class WebDatasetSource:
    """Random access to image-text samples in webdataset tar shards.

    paths_or_dir: a folder of .tar shards (searched recursively) or a list of shard paths.
    image_key: the image member's extension ("jpg", "png", "webp"); text_key: the target's
    extension ("txt") or JSON field ("json/caption"); prompt: template over such keys.
    The (shard, offset, size) index is built once per shard with tarfile and cached in
    <dir>/.vla_index/ (or under data.storage.cache_dir() when the folder is read-only).
    Samples lacking a member the source needs are left out, with a warning counting them."""

    def __init__(self, paths_or_dir: PathsOrDir, image_key: str = "jpg", text_key: str = "txt",
                 prompt: str = "caption en", camera: str = "image", task: str | None = None,
                 name: str | None = None):
        self._shards = list_files(paths_or_dir, ".tar")
        self.name = name or _default_name(paths_or_dir, self._shards)
        self.task = task or self.name
        self.camera, self.prompt = camera, prompt
        self._image_ext, self._text_key = image_key, text_key
        self._field_keys = template_fields(prompt)
        needed = sorted({image_key, _ext_of(text_key)[0], *(_ext_of(k)[0] for k in self._field_keys)})
        # Compacted shard by shard into arrays: a big dataset's index as Python lists would
        # cost ~10x the memory, in every worker process it is shipped to.
        shard_of, keys, spans, seen, total = [], [], {e: [] for e in needed}, set(), 0
        for s, shard in enumerate(self._shards):
            samples = shard_index([shard])[shard]
            total += len(samples)
            complete = []
            for key, members in samples:
                seen.update(members)
                if all(e in members for e in needed):
                    complete.append((key, members))
            shard_of.append(np.full(len(complete), s, np.int32))
            keys.append(np.array([k.encode() for k, _ in complete], np.bytes_).reshape(-1))
            for e in needed:
                spans[e].append(np.asarray([m[e] for _, m in complete], np.int64).reshape(-1, 2))
        self._shard_of = np.concatenate(shard_of)
        if not len(self._shard_of):
            raise ValueError(f"webdataset {self.name!r}: no sample has all of the members {needed} "
                             f"(extensions present in {self._shards[0]}...: {sorted(seen)}); "
                             "set image_key / text_key / prompt to those")
        if len(self._shard_of) < total:
            logging.warning("webdataset %r: %d of %d samples lack one of %s and are left out",
                            self.name, total - len(self._shard_of), total, needed)
        self._keys = np.concatenate(keys)  # bytes: for error messages
        self._spans = {e: np.concatenate(v) for e, v in spans.items()}
        self._files = _Open(functools.partial(_open_shard, self._shards))
        _check_keys(self)

    def __len__(self) -> int:
        return len(self._keys)

    def _member(self, i: int, ext: str) -> bytes:
        f = self._files.get(int(self._shard_of[i]))
        offset, size = self._spans[ext][i]
        # pread: no shared file position, so threads (and processes forked with the file
        # open) read the same shard safely.
        data = os.pread(f.fileno(), int(size), int(offset))
        if len(data) != size:
            raise EOFError(f"member {self._keys[i].decode()}.{ext} truncated: {len(data)} of {size} bytes")
        return data

    def _value(self, i: int, key: str, decoded: dict[str, Any]) -> str:
        ext, field = _ext_of(key)
        if ext not in decoded:
            raw = self._member(i, ext)
            decoded[ext] = json.loads(raw) if ext == "json" else raw
        return as_text(lookup(decoded[ext], field, f"sample {ext}") if field else decoded[ext])

    def __getitem__(self, i: int) -> dict[str, Any]:
        ext = self._image_ext
        try:
            image = decode_image(self._member(i, ext))
            decoded: dict[str, Any] = {}
            fields = {k: self._value(i, k, decoded) for k in self._field_keys}
            target = self._value(i, self._text_key, decoded)
        except Exception as e:  # PIL, JSON, UTF-8, key and I/O errors alike mark the sample bad
            shard = self._shards[int(self._shard_of[i])]
            raise CorruptRecordError(self.name, i, None, e, f"{shard}, sample {self._keys[i].decode()}") from e
        return _example(image, self.camera, self.prompt, fields, target, self.task)


# ------------------------------------------------------------------------------ parquet
class _ParquetFile:
    """An open parquet file and the row group read from it last: (index, {column: array})."""

    def __init__(self, path: str):
        import pyarrow.parquet as pq

        self.file = pq.ParquetFile(path)
        self.cached: tuple[int, dict[str, Any]] | None = None

    def close(self) -> None:
        self.file.close()


def _open_parquet(files: Sequence[str], f: int) -> _ParquetFile:
    return _ParquetFile(files[f])


class ParquetImageTextSource:
    """Random access to image-text rows of parquet files.

    paths_or_dir: a folder of .parquet files (searched recursively) or a list of them.
    image_column: encoded image bytes, as a binary column or a struct {"bytes", "path"} (how HF
    datasets and LeRobot store images; a row with only a path reads that file, relative to the
    parquet file's folder). text_column / prompt fields: columns, or "column/field" in a struct.
    The index (file, row group, first row) comes from the files' metadata only; a read loads one
    row group (of the needed columns) and keeps the last one per file, so reads in row order are
    cheap and shuffled reads cost one row group each (HF datasets writes 100-row groups for
    image data)."""

    def __init__(self, paths_or_dir: PathsOrDir, image_column: str = "image", text_column: str = "text",
                 prompt: str = "caption en", camera: str = "image", task: str | None = None,
                 name: str | None = None):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._files = list_files(paths_or_dir, ".parquet")
        self.name = name or _default_name(paths_or_dir, self._files)
        self.task = task or self.name
        self.camera, self.prompt = camera, prompt
        self._image_column, self._text_column = image_column, text_column
        self._field_keys = template_fields(prompt)
        self._columns = sorted({k.split("/")[0] for k in (image_column, text_column, *self._field_keys)})
        starts, groups, total = [], [], 0  # groups[g] = (file, row group); starts[g] = first index
        self._file_starts = []  # index of each file's first row
        for f, path in enumerate(self._files):
            self._file_starts.append(total)
            try:
                meta = pq.ParquetFile(path)
            except (OSError, pa.ArrowException) as e:
                raise ValueError(f"{path}: not a readable parquet file: {e}") from e
            present = meta.schema_arrow.names
            for col in self._columns:
                if col not in present:
                    raise ValueError(f"{path}: no column {col!r} (asked for by image_column / "
                                     f"text_column / prompt); columns present: {present}")
            image_type = meta.schema_arrow.field(image_column.split("/")[0]).type
            if not (pa.types.is_binary(image_type) or pa.types.is_large_binary(image_type)
                    or (pa.types.is_struct(image_type) and image_type.get_field_index("bytes") >= 0)):
                raise ValueError(f"{path}: image column {image_column!r} is {image_type}; expected "
                                 "binary (encoded image bytes) or struct<bytes, path>")
            for g in range(meta.metadata.num_row_groups):
                starts.append(total)
                groups.append((f, g))
                total += meta.metadata.row_group(g).num_rows
        if total == 0:
            raise ValueError(f"parquet source {self.name!r}: the files hold no rows ({self._files[:3]}...)")
        self._starts, self._groups, self._len = starts, groups, total
        # Few files open: each holds a decoded row group in memory.
        self._open = _Open(functools.partial(_open_parquet, self._files), size=4)
        _check_keys(self)

    def __len__(self) -> int:
        return self._len

    def locate(self, i: int) -> tuple[str, int]:
        """Record i -> (its file, its row in that file)."""
        if not 0 <= i < self._len:
            raise IndexError(f"index {i} out of range for {self._len} rows")
        f = bisect.bisect_right(self._file_starts, i) - 1  # a file without rows is passed over
        return self._files[f], i - self._file_starts[f]

    def _row(self, i: int) -> dict[str, Any]:
        g = bisect.bisect_right(self._starts, i) - 1
        f, group = self._groups[g]
        entry = self._open.get(f)
        cached = entry.cached  # one read of the attribute: another thread may replace it
        if cached is None or cached[0] != group:
            table = entry.file.read_row_group(group, columns=self._columns)
            cached = entry.cached = (group, {c: table.column(c) for c in self._columns})
        return {c: cached[1][c][i - self._starts[g]].as_py() for c in self._columns}

    def _image(self, row: dict[str, Any], file: str) -> np.ndarray:
        value = lookup(row, self._image_column, "row")
        if isinstance(value, dict):
            data, path = value.get("bytes"), value.get("path")
            if data is None and path:  # HF datasets keeps only the path for local image files
                with open(os.path.join(os.path.dirname(file), path), "rb") as f:
                    data = f.read()
            value = data
        if value is None:
            raise ValueError(f"no image in column {self._image_column!r}")
        return decode_image(value)

    def __getitem__(self, i: int) -> dict[str, Any]:
        file, row_in_file = self.locate(i)
        try:
            row = self._row(i)
            image = self._image(row, file)
            fields = {k: as_text(lookup(row, k, "row")) for k in self._field_keys}
            target = as_text(lookup(row, self._text_column, "row"))
        except Exception as e:  # arrow I/O, PIL and key errors alike mark the row bad
            raise CorruptRecordError(self.name, i, None, e, f"{file}, row {row_in_file}") from e
        return _example(image, self.camera, self.prompt, fields, target, self.task)
