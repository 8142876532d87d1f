"""Checkpoint files read one tensor at a time: big_vision .npz, safetensors, Orbax PyTrees.

Every reader lists each tensor's shape and dtype without reading any data (`specs`), so a whole
import is checked before anything is assigned, then hands out one tensor at a time as a host
numpy array (`read`): peak host memory is the largest tensor, never the checkpoint. Paths go
through data/storage.py, so gs:// works: .npz and Orbax read the bucket directly (random access),
safetensors from a local copy (data.storage.stage), since safetensors maps files into memory.

    Npz(path)                        big_vision PaliGemma (keys without "params/")
    Safetensors(path)                a .safetensors file or a directory of (sharded) ones
    OrbaxTree(path, root="params")   an Orbax PyTree checkpoint's leaves under `root`: openpi's
                                     params/ directory, tools.import_weights' OUT/params, and a
                                     run's checkpoints/<step>/state
"""
from __future__ import annotations

import abc
import os
import pathlib
import zipfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from data import storage

Shape = tuple[int, ...]


class TensorFile(abc.ABC):
    """A checkpoint's tensors by key ("a/b/c")."""

    path: str

    @abc.abstractmethod
    def specs(self) -> dict[str, tuple[Shape, np.dtype]]:
        """Shape and dtype of every tensor, read from headers or metadata only."""

    @abc.abstractmethod
    def read(self, key: str) -> np.ndarray:
        """One tensor, on the host."""


class Npz(TensorFile):
    """A big_vision .npz (a zip of .npy members, "params/" prefixes dropped)."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self._zip = zipfile.ZipFile(storage.path(path).open("rb"))
        self._members = {name.removesuffix(".npy").removeprefix("params/"): name
                         for name in self._zip.namelist() if name.endswith(".npy")}
        self._specs = {key: self._header(member) for key, member in self._members.items()}

    def _header(self, member: str) -> tuple[Shape, np.dtype]:
        with self._zip.open(member) as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, _, dtype = read_header(f)
        return tuple(shape), _bfloat16_if_void(dtype)

    def specs(self) -> dict[str, tuple[Shape, np.dtype]]:
        return dict(self._specs)

    def read(self, key: str) -> np.ndarray:
        with self._zip.open(self._members[key]) as f:
            x = np.lib.format.read_array(f, allow_pickle=False)
        return x.view(jnp.bfloat16) if _bfloat16_if_void(x.dtype) != x.dtype else x


def _bfloat16_if_void(dtype: np.dtype) -> np.dtype:
    """np.savez writes bfloat16 as 2-byte void (numpy has no such type); it is read back as one."""
    return np.dtype(jnp.bfloat16) if dtype.kind == "V" and dtype.itemsize == 2 else np.dtype(dtype)


class Safetensors(TensorFile):
    """transformers' safetensors: one file, or every *.safetensors file of a directory."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        local = pathlib.Path(storage.stage(self.path) if storage.is_remote(self.path) else self.path)
        files = sorted(local.glob("*.safetensors")) if local.is_dir() else [local]
        if not files or not files[0].exists():
            raise FileNotFoundError(f"no *.safetensors files at {path}")
        from safetensors import safe_open  # optional dependency: the "hf" extra

        self._safe_open = safe_open
        self._file_of: dict[str, pathlib.Path] = {}
        self._specs: dict[str, tuple[Shape, np.dtype]] = {}
        for file in files:
            with safe_open(file, framework="numpy") as f:
                for key in f.keys():
                    tensor = f.get_slice(key)
                    self._file_of[key] = file
                    self._specs[key] = (tuple(tensor.get_shape()), _SAFETENSORS_DTYPES[tensor.get_dtype()])

    def specs(self) -> dict[str, tuple[Shape, np.dtype]]:
        return dict(self._specs)

    def read(self, key: str) -> np.ndarray:
        # The numpy reader cannot represent bfloat16; the flax one can (host memory only).
        with jax.default_device(jax.devices("cpu")[0]), \
                self._safe_open(self._file_of[key], framework="flax") as f:
            return np.asarray(f.get_tensor(key))


_SAFETENSORS_DTYPES = {"BF16": np.dtype(jnp.bfloat16), "F16": np.dtype(np.float16),
                       "F32": np.dtype(np.float32), "F64": np.dtype(np.float64),
                       "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "BOOL": np.dtype(bool),
                       "U8": np.dtype(np.uint8), "I8": np.dtype(np.int8)}


class OrbaxTree(TensorFile):
    """The leaves under `root` of an Orbax PyTree checkpoint directory.

    openpi's training checkpoints store nnx.State, whose leaves end in a "value" path element;
    like openpi's restore_params that suffix is dropped only when every leaf has it (the SigLIP
    attention has a sub-module named "value", so one such element means nothing).
    """

    def __init__(self, path: str | os.PathLike, root: str = "params"):
        self.path, self._root = str(path), root
        # Orbax wants absolute paths or URLs.
        self._dir = storage.path(self.path if storage.is_remote(self.path) else os.path.abspath(self.path))
        if not (self._dir / "_METADATA").exists():
            raise FileNotFoundError(f"{self.path} is not an Orbax checkpoint directory (no _METADATA)")
        self._checkpointer = ocp.PyTreeCheckpointer()
        tree = self._checkpointer.metadata(self._dir).item_metadata.tree
        if root not in tree:
            raise KeyError(f"{self.path} has no {root!r} entry at its top level (it has {sorted(tree)})")
        leaves = _flatten(tree[root])
        strip = bool(leaves) and all(path[-1] == "value" for path in leaves)
        self._paths = {"/".join(path[:-1] if strip else path): path for path in leaves}
        self._specs = {key: (tuple(leaves[path].shape), np.dtype(leaves[path].dtype))
                       for key, path in self._paths.items()}

    def specs(self) -> dict[str, tuple[Shape, np.dtype]]:
        return dict(self._specs)

    def read(self, key: str) -> np.ndarray:
        path = (self._root, *self._paths[key])
        item = _nest(path, 0)
        restore_args = _nest(path, ocp.RestoreArgs(restore_type=np.ndarray))
        restored = self._checkpointer.restore(self._dir, args=ocp.args.PyTreeRestore(
            item=item, restore_args=restore_args, partial_restore=True))
        for part in path:
            restored = restored[part]
        return np.asarray(restored)


def _flatten(tree: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for k, v in tree.items():
        out.update(_flatten(v, (*prefix, str(k))))
    return out


def _nest(path: tuple[str, ...], leaf: Any) -> dict:
    for part in reversed(path):
        leaf = {part: leaf}
    return leaf
