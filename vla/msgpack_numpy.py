"""NumPy arrays over msgpack, wire-compatible with openpi's `openpi_client.msgpack_numpy`.

An ndarray travels as the map {b"__ndarray__": True, b"data": raw C-order bytes,
b"dtype": dtype.str (e.g. "<f4", "|u1"), b"shape": [dims]}; a NumPy scalar as
{b"__npgeneric__": True, b"data": scalar.item(), b"dtype": dtype.str}. The marker keys are
msgpack bin (bytes), so they never collide with the str keys of ordinary dicts. Everything else
is plain msgpack (str keys, use_bin_type), so a client in any language can speak it.

Decoding accepts untrusted input: object, void (structured) and complex dtypes are refused both
ways (openpi refuses them when packing), and a malformed array map raises ValueError (TypeError
for a field of the wrong type) instead of building an array from whatever the sender claims.
Decoded arrays are zero-copy, read-only views of the message.
"""
import math
from typing import Any

import msgpack
import numpy as np

# Object arrays would be rebuilt from raw bytes (pointers); void and complex have no use here.
_REFUSED_KINDS = ("O", "V", "c")


def _dtype(spec: Any) -> np.dtype:
    if not isinstance(spec, str):
        raise TypeError(f"array dtype must be a string like '<f4', got {type(spec).__name__}")
    try:
        dtype = np.dtype(spec)
    except TypeError as e:
        raise ValueError(f"unknown array dtype {spec!r}") from e
    if dtype.kind in _REFUSED_KINDS:
        raise ValueError(f"unsupported array dtype {spec!r}")
    return dtype


def pack_array(obj: Any) -> Any:
    """msgpack `default` hook: ndarray / NumPy scalar -> its marker map; other objects unchanged."""
    if isinstance(obj, (np.ndarray, np.generic)) and obj.dtype.kind in _REFUSED_KINDS:
        raise ValueError(f"unsupported array dtype {obj.dtype}")
    if isinstance(obj, np.ndarray):
        return {b"__ndarray__": True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": obj.shape}
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    return obj


def unpack_array(obj: dict) -> Any:
    """msgpack `object_hook`: marker map -> ndarray / NumPy scalar; other maps unchanged."""
    if b"__ndarray__" in obj:
        dtype = _dtype(obj.get(b"dtype"))
        data, shape = obj.get(b"data"), obj.get(b"shape")
        if not isinstance(data, bytes):
            raise TypeError(f"array data must be bytes, got {type(data).__name__}")
        if not isinstance(shape, (list, tuple)):
            raise TypeError(f"array shape must be a list, got {type(shape).__name__}")
        if not all(type(d) is int and d >= 0 for d in shape):
            raise ValueError(f"array shape must be non-negative ints, got {shape!r}")
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes != len(data):
            raise ValueError(f"array of shape {list(shape)} and dtype {dtype.str} needs {nbytes} bytes, "
                             f"got {len(data)}")
        return np.ndarray(buffer=data, dtype=dtype, shape=tuple(shape))
    if b"__npgeneric__" in obj:
        return _dtype(obj.get(b"dtype")).type(obj.get(b"data"))
    return obj


class Packer(msgpack.Packer):
    """A reusable packer (saves re-creating msgpack's buffer per message) that knows arrays."""

    def __init__(self) -> None:
        super().__init__(default=pack_array)


def packb(obj: Any) -> bytes:
    """obj (nested dicts / lists / scalars / str / bytes / ndarrays) -> msgpack bytes."""
    return msgpack.packb(obj, default=pack_array)


def unpackb(data: bytes) -> Any:
    """msgpack bytes -> obj; raises ValueError, TypeError or msgpack's own exceptions on malformed input."""
    return msgpack.unpackb(data, object_hook=unpack_array)
