"""Where files live: local paths and gs:// URLs, through one abstraction (etils.epath).

Orbax, Grain and TFDS already open files through etils.epath, so a `gs://bucket/run` workdir,
data root, bundle or sweep directory works the same as a local folder once every path of ours
goes through `path()`. A URL scheme we cannot write (s3://, http://, a typo like gs:/bucket) is
refused here with a clear error, never turned into a local folder named after it.

Datasets are the exception: ArrayRecord's reader opens local files only, so a gs:// data root is
staged (`stage`) into a local cache, $VLA_DATA_CACHE or ~/.cache/vla/data, once per machine;
files already there with the same size are not fetched again.

epath reaches gs:// through gcsfs (`pip install gcsfs`), which honours STORAGE_EMULATOR_HOST;
Orbax writes arrays through tensorstore, which honours TENSORSTORE_GCS_HTTP_URL. epath would
otherwise prefer tf.io.gfile whenever TensorFlow is importable, whose GCS client knows no
emulator and cannot share a process with MuJoCo, so EPATH_USE_TF defaults to false here (epath
reads it at every call).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from etils import epath
from etils.epath import backend as epath_backend
from tqdm import tqdm

os.environ.setdefault("EPATH_USE_TF", "false")

SCHEMES = ("gs",)
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):/")


def is_remote(p: str | os.PathLike) -> bool:
    """True for a gs:// URL."""
    return os.fspath(p).startswith(tuple(f"{s}://" for s in SCHEMES))


def path(p: str | os.PathLike) -> epath.Path:
    """p as an epath.Path: a gs:// URL, or a local path made absolute.

    Raises ValueError for any other URL scheme (or a malformed one such as gs:/bucket), and
    ImportError naming the package when gs:// is used without gcsfs installed.
    """
    s = os.fspath(p)
    url = _URL.match(s)
    if url and not is_remote(s):
        raise ValueError(f"{s!r}: unsupported storage URL (only local paths and "
                         f"{', '.join(f'{x}://bucket/...' for x in SCHEMES)} are)")
    if url:
        try:
            import gcsfs  # noqa: F401  (epath's fsspec backend needs it for gs://)
        except ImportError as e:
            raise ImportError(f"{s!r}: gs:// paths need gcsfs (pip install gcsfs)") from e
        return epath.Path(s)
    return epath.Path(os.path.abspath(s))


def fresh(p: str | os.PathLike) -> epath.Path:
    """path(p), for reading what other processes wrote since this one last looked: gcsfs keeps
    every gs:// listing it made for the life of the process, so a launcher checking its trainers'
    checkpoints would never see a step appear in a folder it had listed. Drops those first."""
    out = path(p)
    if is_remote(out):
        epath_backend.fsspec_backend.fs(os.fspath(out)).invalidate_cache()
    return out


def join(p: str | os.PathLike, *parts: str) -> str:
    """str(path(p) / parts...): for APIs that take strings."""
    return os.fspath(path(p).joinpath(*parts))


def check_writable(directory: str | os.PathLike) -> epath.Path:
    """Creates directory if needed and proves it writable by writing and removing a probe file;
    raises OSError naming the directory and the cause. Run at startup, before any work."""
    d = path(directory)
    probe = d / f".write-probe-{uuid.uuid4().hex}"
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except Exception as e:  # noqa: BLE001  (gcsfs, fsspec and os raise unrelated types)
        raise OSError(f"cannot write to {os.fspath(d)!r}: {type(e).__name__}: {e}") from e
    return d


def files_under(directory: epath.Path) -> list[epath.Path]:
    """Every file below a directory (epath refuses recursive globs on gs://)."""
    out = []
    for p in directory.iterdir():
        out.extend(files_under(p) if p.is_dir() else [p])
    return out


def cache_dir() -> str:
    """Where gs:// trees are staged on this machine."""
    return os.environ.get("VLA_DATA_CACHE") or os.path.expanduser("~/.cache/vla/data")


def stage(root: str) -> str:
    """A local copy of a gs:// directory tree (returned as its local path); a local root is
    returned as is. Files are fetched into a temporary name and renamed, so processes staging
    the same root on one machine never see half a file."""
    if not is_remote(root):
        return root
    remote = fresh(root)  # what is there now, not what this process listed before
    if not remote.is_dir():
        raise FileNotFoundError(f"{root!r} does not exist")
    local = os.path.join(cache_dir(), *root.split("://", 1)[1].strip("/").split("/"))
    files = files_under(remote)
    for f in tqdm(files, desc=f"staging {root}", unit="file", leave=False):
        target = os.path.join(local, os.fspath(f.relative_to(remote)))
        if os.path.exists(target) and os.path.getsize(target) == f.stat().length:
            continue
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = f"{target}.{uuid.uuid4().hex}.tmp"
        with f.open("rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 16 << 20)
        os.replace(tmp, target)
    return local


INDEX_DIR = ".vla_index"


def cached_json(directory: str, name: str, files: Sequence[str], build: Callable[[], Any]) -> Any:
    """build()'s JSON-able result, cached as <directory>/.vla_index/<name>.json, or under
    cache_dir() when the dataset directory is not writable, and rebuilt when any of `files`
    (the data it was computed from) changed size or modification time since. Written to a
    temporary name and renamed, so concurrent readers never see half an index."""
    key = [[os.path.basename(f), os.path.getsize(f), os.stat(f).st_mtime_ns] for f in files]
    places = [os.path.join(directory, INDEX_DIR),
              os.path.join(cache_dir(), "index", hashlib.sha1(os.path.abspath(directory).encode()).hexdigest())]
    for place in places:
        try:
            with open(os.path.join(place, f"{name}.json")) as f:
                cached = json.load(f)
            if cached["files"] == key:
                return cached["value"]
        except (OSError, ValueError, KeyError):
            continue
    value = build()
    for place in places:
        try:
            os.makedirs(place, exist_ok=True)
            tmp = os.path.join(place, f"{name}.{uuid.uuid4().hex}.tmp")
            with open(tmp, "w") as f:
                json.dump({"files": key, "value": value}, f)
            os.replace(tmp, os.path.join(place, f"{name}.json"))
            break
        except OSError:
            continue
    return value


def copy_tree(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copies a file or directory tree between any two locations (local or gs://)."""
    s, d = path(src), path(dst)
    if s.is_file():
        d.parent.mkdir(parents=True, exist_ok=True)
        with s.open("rb") as r, d.open("wb") as w:
            shutil.copyfileobj(r, w, 16 << 20)
        return
    for f in files_under(s):
        copy_tree(f, d / f.relative_to(s))
