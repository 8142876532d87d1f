"""The one input transform: a robot's raw steps -> canonical steps -> model examples, and back.

A `DatasetSpec` (registered in data/robots.py, or given as a dict in a config) declares, per
dataset or robot, how its raw step becomes a canonical step, in this order:

  1. cameras       raw image keys -> model camera names (uint8 [h, w, 3], any size)
  2. state         the state keys' values, flattened and concatenated in order -> f32 [S_raw]
     actions       the same for the action keys -> f32 [A_raw]
  3. rotation      optionally, one rotation inside the vector converted to another format
                   (euler_xyz, quat_xyzw, quat_wxyz, axis_angle, matrix, rot6d), which changes
                   the vector's width: [S_raw] -> [S], [A_raw] -> [A]
  4. gripper       optionally, one dim mapped linearly from the dataset's (open, closed) values
                   to the canonical 0 = open, 1 = closed (datasets disagree on range and sign)

and, per window of a canonical episode (data/windows.py cuts them):

  5. delta         optionally, action dims made relative to the same state dims at the window's
                   current step (absolute joint targets -> deltas, as openpi's DeltaActions)
  6. normalize     state and actions with the source's statistics (data/normalize.py), which are
                   computed over canonical steps with the delta applied per step (data/stats.py)
  7. layout        images resized with aspect-preserving padding, state and actions padded to the
                   model's widths, masks (data/layout.Layout)

Readers (data/rlds.py, data/lerobot.py) apply 1-4 to the rows they read through `canonical`;
the training source (data/sources.RobotSource) and the policy (vla/policy.py) build the model
example through `model_example`, and the policy maps its chunk back to the robot's units with
`robot_actions` (the inverse of 6, 5, 4, 3). A served policy therefore reads the robot's own
observation layout (`observation`) and answers in its own action layout.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy.spatial.transform import Rotation as _R

from data import windows
from data.layout import Layout
from data.normalize import Normalizer

ROTATION_DIMS = {"euler_xyz": 3, "axis_angle": 3, "quat_xyzw": 4, "quat_wxyz": 4, "rot6d": 6, "matrix": 9}


@dataclasses.dataclass(frozen=True)
class Rotation:
    """The rotation at dims [start, start + ROTATION_DIMS[source]) of a vector, rewritten as
    `target` (euler_xyz: extrinsic x-y-z angles in radians; matrix: row-major 3x3; rot6d: its
    first two columns)."""

    start: int
    source: str
    target: str

    def __post_init__(self):
        for fmt in (self.source, self.target):
            if fmt not in ROTATION_DIMS:
                raise ValueError(f"unknown rotation format {fmt!r}; expected one of {sorted(ROTATION_DIMS)}")

    def forward(self, x: np.ndarray) -> np.ndarray:
        """f32 [..., D] -> [..., D - dims(source) + dims(target)]."""
        return self._convert(x, self.source, self.target)

    def inverse(self, x: np.ndarray) -> np.ndarray:
        return self._convert(x, self.target, self.source)

    def _convert(self, x: np.ndarray, source: str, target: str) -> np.ndarray:
        n = ROTATION_DIMS[source]
        if x.shape[-1] < self.start + n:
            raise ValueError(f"a {source} rotation at dim {self.start} needs {self.start + n} dims, "
                             f"the vector has {x.shape[-1]}")
        lead = x.shape[:-1]
        part = x[..., self.start:self.start + n].reshape(-1, n).astype(np.float64)
        rotated = _write_rotation(_read_rotation(part, source), target).reshape(*lead, -1)
        return np.concatenate([x[..., :self.start], rotated, x[..., self.start + n:]], -1).astype(np.float32)


def _read_rotation(x: np.ndarray, fmt: str) -> _R:
    if fmt == "euler_xyz":
        return _R.from_euler("xyz", x)
    if fmt == "axis_angle":
        return _R.from_rotvec(x)
    if fmt == "quat_xyzw":
        return _R.from_quat(x)
    if fmt == "quat_wxyz":
        return _R.from_quat(x[:, [1, 2, 3, 0]])
    if fmt == "matrix":
        return _R.from_matrix(x.reshape(-1, 3, 3))
    # rot6d: Gram-Schmidt on the two stored columns gives the third
    a, b = x[:, 0::2], x[:, 1::2]
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b - (a * b).sum(-1, keepdims=True) * a
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return _R.from_matrix(np.stack([a, b, np.cross(a, b)], -1))


def _write_rotation(r: _R, fmt: str) -> np.ndarray:
    if fmt == "euler_xyz":
        return r.as_euler("xyz")
    if fmt == "axis_angle":
        return r.as_rotvec()
    if fmt == "quat_xyzw":
        return r.as_quat(canonical=True)
    if fmt == "quat_wxyz":
        return r.as_quat(canonical=True)[:, [3, 0, 1, 2]]
    m = r.as_matrix()
    return m.reshape(-1, 9) if fmt == "matrix" else m[:, :, :2].reshape(-1, 6)


@dataclasses.dataclass(frozen=True)
class Gripper:
    """Dim `dim` of a (post-rotation) vector is a gripper whose raw value `open` means fully open
    and `closed` fully closed; canonical: 0 = open, 1 = closed, linear in between."""

    dim: int
    open: float
    closed: float

    def __post_init__(self):
        if self.open == self.closed:
            raise ValueError(f"gripper open and closed values are both {self.open}")

    def forward(self, x: np.ndarray) -> np.ndarray:
        out = np.array(x, np.float32)
        out[..., self.dim] = (out[..., self.dim] - self.open) / (self.closed - self.open)
        return out

    def inverse(self, x: np.ndarray) -> np.ndarray:
        out = np.array(x, np.float32)
        out[..., self.dim] = self.open + out[..., self.dim] * (self.closed - self.open)
        return out


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """How one dataset's (or robot's) raw steps become canonical steps; see the module docstring.

    Keys are a raw step's keys: '/'-separated paths into nested dicts ("observation/image", RLDS)
    or flat names ("observation.images.top", LeRobot); a flat key is tried before the path.
    """

    name: str
    camera_keys: Mapping[str, str]  # raw image key -> model camera name (from_fields: also (key, name) pairs)
    state_keys: tuple[str, ...]  # concatenated in this order
    action_keys: tuple[str, ...] = ("action",)  # concatenated in this order
    instruction_key: str = "language_instruction"  # a step key, or an episode key (RLDS metadata)
    subtask_key: str | None = None  # a per-step text key; None: no subtask targets
    control_hz: float | None = None  # None: the dataset's own (RLDS metadata, LeRobot info.json fps)
    state_rotation: Rotation | None = None
    action_rotation: Rotation | None = None
    state_gripper: Gripper | None = None
    action_gripper: Gripper | None = None
    delta_dims: tuple[int, ...] = ()  # canonical action dims made relative to the same state dims
    gripper_dims: tuple[int, ...] = ()  # canonical action dims held, not interpolated, when resampling
    state_dim: int | None = None  # canonical dims; checked against the data when given
    action_dim: int | None = None
    # A client's observation keys -> this spec's raw keys, for robots whose runtime names differ
    # from the dataset's (openpi's LIBERO client sends "observation/image" for the dataset's "image").
    request_keys: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any]) -> DatasetSpec:
        """From a dict of fields (a config entry or a bundle's metadata); nested rotation and
        gripper entries as dicts. Unknown fields raise ValueError listing the known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"unknown dataset spec field(s) {unknown}; fields: {sorted(known)}")
        out = dict(fields)
        for key in ("camera_keys", "request_keys"):
            if key in out:
                out[key] = dict(out[key])
        for key in ("state_keys", "action_keys", "delta_dims", "gripper_dims"):
            if key in out:
                out[key] = tuple(out[key])
        for key, kind in (("state_rotation", Rotation), ("action_rotation", Rotation),
                          ("state_gripper", Gripper), ("action_gripper", Gripper)):
            if isinstance(out.get(key), Mapping):
                out[key] = kind(**out[key])
        return cls(**out)

    def fields(self) -> dict[str, Any]:
        """JSON-able fields, as a JSON file gives them back; from_fields(spec.fields()) == spec."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @property
    def hold_dims(self) -> tuple[int, ...]:
        """Action dims held when resampling: gripper_dims and the canonical gripper."""
        extra = () if self.action_gripper is None else (self.action_gripper.dim,)
        return tuple(dict.fromkeys(self.gripper_dims + extra))

    def canonical_dims(self, key_dims: Mapping[str, int], where: str) -> tuple[int, int]:
        """(S, A) canonical widths from the raw keys' flattened widths; checked against the
        spec's state_dim / action_dim when it gives them."""
        out = []
        for what, keys, rotation, want in (("state", self.state_keys, self.state_rotation, self.state_dim),
                                           ("action", self.action_keys, self.action_rotation, self.action_dim)):
            n = sum(key_dims[k] for k in keys)
            if rotation is not None:
                n += ROTATION_DIMS[rotation.target] - ROTATION_DIMS[rotation.source]
            if want is not None and want != n:
                raise ValueError(f"spec {self.name!r} says {what} has {want} dims, {where!r} gives {n} "
                                 f"(keys {list(keys)})")
            out.append(n)
        return out[0], out[1]

    def raw_action_dim(self, action_dim: int) -> int:
        """A_raw, the robot's action width, from the canonical width A."""
        r = self.action_rotation
        return action_dim if r is None else action_dim - ROTATION_DIMS[r.target] + ROTATION_DIMS[r.source]

    def client_keys(self) -> tuple[str, ...]:
        """The keys a robot's observation carries in its own layout (cameras, then state), as the
        client names them (request_keys renamed back)."""
        back = {raw: client for client, raw in self.request_keys.items()}
        return tuple(back.get(k, k) for k in (*self.camera_keys, *self.state_keys))

    def lowdim_keys(self) -> tuple[str, ...]:
        """Every non-image key a canonical step reads (state, actions, subtask)."""
        return (*self.state_keys, *self.action_keys, *((self.subtask_key,) if self.subtask_key else ()))


# ------------------------------------------------------------------ raw -> canonical

def lookup(row: Mapping[str, Any], key: str, where: str = "step") -> Any:
    """row[key]: the flat key, else the '/'-separated path into nested dicts. A missing key raises
    KeyError listing the keys present."""
    found = _walk(row, key)
    if found is _MISSING:
        raise KeyError(f"{where} has no key {key!r}; keys present: {sorted(flat_keys(row))}")
    return found


_MISSING = object()


def _walk(node: Any, path: str) -> Any:
    """node[path], where any '/' may separate levels or belong to a key (TFDS allows
    "clip_function_input/base_pose_tool_reached" as one feature name)."""
    if not _is_map(node):
        return _MISSING
    if path in node:
        return node[path]
    head, _, rest = path.partition("/")
    while rest:
        if head in node:
            found = _walk(node[head], rest)
            if found is not _MISSING:
                return found
        part, _, rest = rest.partition("/")
        head = f"{head}/{part}"
    return _MISSING


def _is_map(node: Any) -> bool:
    """A dict, or dict-like (a TFDS FeaturesDict is not a Mapping)."""
    return hasattr(node, "keys") and hasattr(node, "__getitem__") and hasattr(node, "__contains__")


def flat_keys(tree: Mapping[str, Any], prefix: str = "") -> list[str]:
    """'/'-joined paths of every leaf of a nested dict."""
    if not _is_map(tree):
        return []
    out = []
    for k, v in tree.items():
        if _is_map(v):
            out += flat_keys(v, f"{prefix}{k}/")
        else:
            out.append(f"{prefix}{k}")
    return out


def _vectors(rows: Sequence[Mapping[str, Any]], keys: Sequence[str], where: str) -> np.ndarray:
    return np.stack([np.concatenate([np.ravel(np.asarray(lookup(r, k, where), np.float32)) for k in keys])
                     for r in rows]).astype(np.float32)


def canonical_state(spec: DatasetSpec, rows: Sequence[Mapping[str, Any]], where: str = "step") -> np.ndarray:
    """f32 [n, S] canonical state of n raw rows (steps 2-4)."""
    x = _vectors(rows, spec.state_keys, where)
    if spec.state_rotation is not None:
        x = spec.state_rotation.forward(x)
    return x if spec.state_gripper is None else spec.state_gripper.forward(x)


def canonical_actions(spec: DatasetSpec, rows: Sequence[Mapping[str, Any]], where: str = "step") -> np.ndarray:
    """f32 [n, A] canonical actions of n raw rows (steps 2-4)."""
    return actions_from_robot(spec, _vectors(rows, spec.action_keys, where))


def actions_from_robot(spec: DatasetSpec, x: np.ndarray) -> np.ndarray:
    """Steps 3-4 on actions already concatenated: f32 [n, A_raw] -> [n, A] (robot_actions' inverse
    before normalization; e.g. a previous chunk given back for real-time chunking)."""
    x = np.asarray(x, np.float32)
    if spec.action_rotation is not None:
        x = spec.action_rotation.forward(x)
    return x if spec.action_gripper is None else spec.action_gripper.forward(x)


def canonical_images(cameras: Mapping[str, str], rows: Sequence[Mapping[str, Any]], where: str = "step"
                     ) -> dict[str, np.ndarray]:
    """{camera: uint8 [n, h, w, 3]} of n raw rows; cameras: raw key -> camera (those present)."""
    out = {}
    for key, cam in cameras.items():
        frames = [np.asarray(lookup(r, key, where)) for r in rows]
        for f in frames:
            if f.dtype != np.uint8 or f.ndim != 3 or f.shape[-1] != 3:
                raise ValueError(f"{where}: image {key!r} must be uint8 [h, w, 3], got {f.dtype} {list(f.shape)}")
        out[cam] = np.stack(frames)
    return out


def observation(spec: DatasetSpec, request: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """A robot's raw observation (its own keys, spec.request_keys renamed) -> (images {camera:
    uint8 [t, h, w, 3]} for every camera of the spec, canonical state f32 [S]). An image may be
    [h, w, 3] or a history [t, h, w, 3], current frame last. Raises ValueError naming the problem."""
    raw = {spec.request_keys.get(k, k): v for k, v in request.items()}
    images = {}
    for key, cam in spec.camera_keys.items():
        try:
            image = lookup(raw, key, "observation")
        except KeyError as e:
            raise ValueError(e.args[0]) from None
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim not in (3, 4) \
                or image.shape[-1] != 3 or 0 in image.shape:
            got = f"{image.dtype} {list(image.shape)}" if isinstance(image, np.ndarray) else type(image).__name__
            raise ValueError(f"observation image {key!r} must be a uint8 array [h, w, 3] or [t, h, w, 3], got {got}")
        images[cam] = image[None] if image.ndim == 3 else image
    try:
        state = canonical_state(spec, [raw], "observation")[0]
    except KeyError as e:
        raise ValueError(e.args[0]) from None
    except (TypeError, ValueError) as e:
        raise ValueError(f"observation state {list(spec.state_keys)} is not numeric: {e}") from None
    if spec.state_dim is not None and state.shape != (spec.state_dim,):
        raise ValueError(f"observation state {list(spec.state_keys)} has {state.shape[0]} dims, the "
                         f"policy's robot has {spec.state_dim}")
    if not np.all(np.isfinite(state)):
        raise ValueError(f"observation state has non-finite values: {state.tolist()}")
    return images, state


# ------------------------------------------------------------------ canonical -> model and back

def delta(spec: DatasetSpec | None, actions: np.ndarray, state: np.ndarray) -> np.ndarray:
    """Step 5: actions minus state on spec.delta_dims: a chunk [H, A] and the current state [S],
    or n steps [n, A] and their own states [n, S] (statistics). spec None: unchanged."""
    if spec is None or not spec.delta_dims:
        return actions
    out = np.array(actions, np.float32)
    dims = list(spec.delta_dims)
    out[..., dims] -= np.asarray(state, np.float32)[..., dims]
    return out


def model_example(layout: Layout, images: Mapping[str, np.ndarray], state: np.ndarray,
                  normalizers: Mapping[str, Normalizer], spec: DatasetSpec,
                  frame_mask: Mapping[str, np.ndarray] | None = None,
                  actions: np.ndarray | None = None, action_valid: np.ndarray | None = None) -> dict:
    """Steps 5-7: a canonical window -> the batch contract's example, less the tokens.

    images {camera: uint8 [t, h, w, 3]} (cameras the layout lacks are ignored; missing ones stay
    zero and masked); frame_mask {camera: bool [t]} (default all true; frames before t are
    masked); state f32 [S] at the current step; actions f32 [H, A] and action_valid bool [H]
    (training) or None (serving: no actions in the example). Returns the example with "state"
    and, with actions, "actions"/"action_mask" normalized and padded, plus "_state" f32 [S], the
    normalized unpadded state the π0.5 prompt discretizes, and with actions "_actions" f32 [H, A],
    the normalized unpadded chunk FAST targets encode (callers pop both).
    """
    ex = layout.empty()
    for c, cam in enumerate(layout.cameras):
        if cam not in images:
            continue
        frames = layout.camera_frames(images[cam])
        t = min(len(images[cam]), layout.frames)
        ex["images"][cam] = frames
        ex["image_mask"][c] = True
        mask = np.ones(t, bool) if frame_mask is None else np.asarray(frame_mask[cam], bool)[-t:]
        ex["frame_mask"][c, layout.frames - t:] = mask
    normalized_state = normalizers["state"].normalize(state)
    ex["state"] = windows.pad_state(normalized_state, layout.state_dim)
    ex["_state"] = normalized_state
    if actions is None:
        del ex["actions"], ex["action_mask"]
    else:
        chunk = normalizers["actions"].normalize(delta(spec, actions, state))
        ex["actions"], ex["action_mask"] = windows.pad_actions(chunk, action_valid, layout.action_dim)
        ex["_actions"] = chunk
    return ex


def robot_actions(spec: DatasetSpec, chunk: np.ndarray, state: np.ndarray,
                  normalizers: Mapping[str, Normalizer]) -> np.ndarray:
    """The inverse of steps 6, 5, 4, 3: a normalized chunk f32 [H, >=A] (model width) and the
    canonical state f32 [S] it was sampled at -> f32 [H, A_raw] in the robot's units, its
    action keys concatenated in spec order."""
    a = normalizers["actions"].dim
    x = normalizers["actions"].unnormalize(np.asarray(chunk, np.float32)[:, :a])
    if spec.delta_dims:
        x[:, list(spec.delta_dims)] += np.asarray(state, np.float32)[list(spec.delta_dims)]
    if spec.action_gripper is not None:
        x = spec.action_gripper.inverse(x)
    if spec.action_rotation is not None:
        x = spec.action_rotation.inverse(x)
    return x
