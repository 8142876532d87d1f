"""Opening a robot source's episodes: its format's reader, then its split (named or hash-held-out).

    data = open_robot(path, spec, "rlds", "train", eval_split="5%")   # a windows.RobotData

Formats: "rlds" (TFDS RLDS datasets in ArrayRecord, data/rlds.py; TFRecord ones convert with
`python -m tools.convert rlds`) and "lerobot" (LeRobot v2.1 / v3.0 directories, data/lerobot.py).

Splits. The training pipeline asks for the role "train" or "eval"; the source's eval_split says
what "eval" is:
    a split name ("heldout", "val", ...)   eval reads that split; train reads "train"
    "N%" (e.g. "5%")                      a deterministic hash hold-out of N% of the "train"
                                          split's episodes: eval reads those, train the others
The hold-out is decided per episode index by a hash salted with the dataset's name, so it does
not change with the order sources are listed in, the machine or the process count.
"""
from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from data import lerobot, rlds
from data.robots import get_spec
from data.transform import DatasetSpec

FORMATS = ("rlds", "lerobot")
ROLES = ("train", "eval")


def parse_eval_split(eval_split: str) -> tuple[str | None, float | None]:
    """'val' -> ('val', None); '5%' -> (None, 0.05). Raises ValueError on a bad percentage."""
    if not eval_split.endswith("%"):
        return eval_split, None
    try:
        fraction = float(eval_split[:-1]) / 100
    except ValueError:
        fraction = -1.0
    if not 0 < fraction < 1:
        raise ValueError(f"eval_split {eval_split!r}: a hold-out must be a percentage in (0, 100), e.g. '5%'")
    return None, fraction


def held_out(num_episodes: int, fraction: float, salt: str) -> np.ndarray:
    """bool [E]: the episodes a hash hold-out of `fraction` puts in eval (at least one)."""
    u = np.array([int.from_bytes(hashlib.blake2b(f"{salt}/{i}".encode(), digest_size=8).digest(), "little")
                  / 2.0**64 for i in range(num_episodes)])
    out = u < fraction
    if not out.any() and num_episodes > 1:
        out[int(np.argmin(u))] = True
    return out


class EpisodeSubset:
    """RobotData over some episodes of another (a hash hold-out or its complement)."""

    def __init__(self, data: Any, episodes: np.ndarray):
        self._data, self._episodes = data, np.asarray(episodes, np.int64)
        for attr in ("name", "path", "spec", "split", "control_hz", "state_dim", "action_dim", "cameras"):
            setattr(self, attr, getattr(data, attr))

    def __len__(self) -> int:
        return len(self._episodes)

    @property
    def episode_lengths(self) -> np.ndarray:
        return np.asarray(self._data.episode_lengths)[self._episodes]

    def episode(self, index: int):
        return self._data.episode(int(self._episodes[index]))

    def lowdim(self, index: int) -> dict[str, np.ndarray]:
        return self._data.lowdim(int(self._episodes[index]))

    def file_of(self, index: int) -> str:
        return self._data.file_of(int(self._episodes[index]))


def _reader(path: str, spec: DatasetSpec, fmt: str, split: str):
    if fmt == "rlds":
        return rlds.RobotDataset(path, spec, split)
    if fmt == "lerobot":
        return lerobot.LeRobotDataset(path, spec, split)
    raise ValueError(f"unknown robot data format {fmt!r}; expected one of {FORMATS}")


def splits(path: str, fmt: str) -> list[str]:
    """The named splits of a robot dataset."""
    if fmt == "lerobot":
        return lerobot.splits(path)
    return rlds.splits(path)


def has_role(path: str, fmt: str, role: str, eval_split: str) -> bool:
    """Whether the dataset can serve `role` ("eval" needs the named split, or a hold-out)."""
    name, fraction = parse_eval_split(eval_split)
    return role == "train" or fraction is not None or name in splits(path, fmt)


def open_robot(path: str, spec: str | DatasetSpec | Mapping[str, Any] | None, fmt: str = "rlds",
               role: str = "train", eval_split: str = "heldout") -> Any:
    """The episodes of one role of the robot dataset at `path` (a windows.RobotData with spec,
    cameras, file_of and lowdim). spec: a registered name (data/robots.py), fields, or a DatasetSpec."""
    if spec is None:
        raise ValueError(f"robot source at {path!r} has no spec (a dataset spec name from data/robots.py "
                         f"or a dict of its fields)")
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")
    spec = get_spec(spec)
    name, fraction = parse_eval_split(eval_split)
    if fraction is None:
        return _reader(path, spec, fmt, "train" if role == "train" else name)
    data = _reader(path, spec, fmt, "train")
    held = held_out(len(data), fraction, data.name)
    return EpisodeSubset(data, np.flatnonzero(held if role == "eval" else ~held))


def robot_opener(path: str, spec: str | DatasetSpec | Mapping[str, Any] | None, fmt: str = "rlds",
                 role: str = "train", eval_split: str = "heldout") -> Callable[[], Any]:
    """Picklable zero-argument callable: open_robot with these arguments (Grain workers reopen)."""
    return functools.partial(open_robot, path, spec, fmt, role, eval_split)
