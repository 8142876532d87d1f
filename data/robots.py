"""The registered dataset specs (data/transform.DatasetSpec): one per dataset or robot layout.

A robot source names one (`spec="bridge"`) or gives the fields inline as a dict, which is also how
a user adds a dataset without touching this file:

    c.data.sources.mine = dict(kind="robot", format="rlds", path="my_dataset/1.0.0", weight=1.0,
        spec=dict(name="mine", camera_keys={"observation/image": "base"},
                  state_keys=("observation/state",), action_keys=("action",),
                  action_gripper=dict(dim=6, open=1.0, closed=0.0)))

Keys with dots (LeRobot's "observation.images.top") cannot be dict keys in a config (ConfigDict
refuses them): give camera_keys and request_keys as pairs there, e.g.
camera_keys=(("observation.images.top", "base"), ("observation.images.wrist", "left_wrist")).

To register one here instead, add a `register(DatasetSpec(...))` below, written from the
dataset's feature structure (an RLDS dataset's dataset_info.json / features.json, a LeRobot
dataset's meta/info.json; a spec naming a key the data lacks is refused with the keys present;
TFDS's catalog pages list every Open X-Embodiment dataset's features). Camera
names are the model's (config.model.cameras): the π0 configs use base / left_wrist / right_wrist.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from data.transform import DatasetSpec, Gripper

SPECS: dict[str, DatasetSpec] = {}


def register(spec: DatasetSpec) -> DatasetSpec:
    SPECS[spec.name] = spec
    return spec


def get_spec(spec: str | DatasetSpec | Mapping[str, Any]) -> DatasetSpec:
    """A registered name, a DatasetSpec, or a dict of DatasetSpec fields (from a config)."""
    if isinstance(spec, DatasetSpec):
        return spec
    if isinstance(spec, str):
        if spec not in SPECS:
            raise KeyError(f"no dataset spec named {spec!r}; registered: {sorted(SPECS)} (or give the "
                           f"spec's fields as a dict, see data/robots.py)")
        return SPECS[spec]
    return DatasetSpec.from_fields(spec)


# Our own Meta-World data (tools.generate): every camera it can render; actions 4-d in [-1, 1]
# (xyz, gripper with +1 closing) kept in the environment's units.
register(DatasetSpec(
    name="metaworld",
    camera_keys={"observation/corner2": "corner2", "observation/corner3": "corner3",
                 "observation/corner4": "corner4", "observation/topview": "topview",
                 "observation/gripperPOV": "gripperPOV", "observation/behindGripper": "behindGripper",
                 "observation/corner": "corner"},
    state_keys=("observation/state",),
    action_keys=("action",),
    subtask_key="language_subtask",
    gripper_dims=(3,),
    state_dim=4,
    action_dim=4,
))

# Our Meta-World data as tools.convert lerobot-export writes it (data/lerobot_export.py): cameras
# observation.images.<camera>, the subtask as a per-frame string feature.
register(DatasetSpec(
    name="metaworld_lerobot",
    camera_keys={f"observation.images.{c}": c for c in ("corner2", "corner3", "corner4", "topview", "gripperPOV",
                                                          "behindGripper", "corner")},
    state_keys=("observation.state",),
    action_keys=("action",),
    instruction_key="task",
    subtask_key="language_subtask",
    gripper_dims=(3,),
    state_dim=4,
    action_dim=4,
))

# LIBERO as openpi fine-tunes on it (the LeRobot dataset physical-intelligence/libero: "image",
# "wrist_image" 256² uint8, "state" f32 [8] = eef pos 3 + axis-angle 3 + gripper qpos 2, "actions"
# f32 [7] = delta eef 6 + gripper in [-1 (open), 1 (closed)], 10 fps, tasks as instructions), and
# as openpi's LIBERO client sends observations: "observation/image", "observation/wrist_image",
# "observation/state", "prompt".
register(DatasetSpec(
    name="libero",
    camera_keys={"image": "base", "wrist_image": "left_wrist"},
    state_keys=("state",),
    action_keys=("actions",),
    instruction_key="task",
    action_gripper=Gripper(dim=6, open=-1.0, closed=1.0),
    state_dim=8,
    action_dim=7,
    request_keys={"observation/image": "image", "observation/wrist_image": "wrist_image",
                  "observation/state": "state"},
))


# ====================================================================== Open X-Embodiment
# Written from the datasets' feature structure as the TFDS catalog prints it
# (tensorflow/datasets docs/catalog/<name>.md; the rtx.py builders themselves read their features
# from gs://gresearch/robotics at run time). OXE publishes TFRecord: convert once with
# `python -m tools.convert rlds --src DIR --out OUT`. control_hz from the OXE dataset overview
# spreadsheet. Camera slots are the π0 configs' (base / left_wrist / right_wrist).

# bridge (BridgeData V2, WidowX; TFDS `bridge`, the same layout as rail-berkeley's bridge_dataset
# / OpenVLA's bridge_orig): steps/observation/image_0..3 Image 256x256 (jpeg), observation/state
# f32 [7] = eef xyz + euler xyz + gripper, action f32 [7] = delta xyz + delta euler + gripper,
# language_instruction per step; 5 Hz. Gripper action: 1 = open, 0 = close (Octo's and OpenVLA's
# bridge transforms). Cameras: image_0 is the fixed over-the-shoulder view (base); image_1 the
# second third-person view most episodes have takes the right_wrist slot, as Octo pairs image_0
# (primary) with image_1 (secondary); image_2 / image_3 are absent (black) in many episodes
# (episode_metadata/has_image_*), so they are left out. The state's gripper value is kept raw.
register(DatasetSpec(
    name="bridge",
    camera_keys={"observation/image_0": "base", "observation/image_1": "right_wrist"},
    state_keys=("observation/state",),
    action_keys=("action",),
    instruction_key="language_instruction",
    control_hz=5.0,
    action_gripper=Gripper(dim=6, open=1.0, closed=0.0),
    state_dim=7,
    action_dim=7,
))

# fractal (RT-1, Everyday Robots; TFDS `fractal20220817_data`): steps/observation/image Image
# 256x320 (jpeg), observation/base_pose_tool_reached f32 [7] = eef xyz + quaternion,
# observation/gripper_closed f32 [1] (1 = closed), natural_language_instruction inside the
# observation; action a dict: world_vector [3], rotation_delta [3] (rpy), gripper_closedness_action
# [1], terminate_episode [3], base_displacement_* (the last two left out); 3 Hz.
# gripper_closedness_action: +1 = close, -1 = open (RT-1; 0 = keep, a relative command that the
# linear map sends to 0.5, Octo converts it to absolute with rel2abs_gripper_actions).
register(DatasetSpec(
    name="fractal",
    camera_keys={"observation/image": "base"},
    state_keys=("observation/base_pose_tool_reached", "observation/gripper_closed"),
    action_keys=("action/world_vector", "action/rotation_delta", "action/gripper_closedness_action"),
    instruction_key="observation/natural_language_instruction",
    control_hz=3.0,
    state_gripper=Gripper(dim=7, open=0.0, closed=1.0),
    action_gripper=Gripper(dim=6, open=-1.0, closed=1.0),
    state_dim=8,
    action_dim=7,
))

# droid (Franka, TFDS `droid` / `droid_100`): steps/observation/exterior_image_1_left,
# exterior_image_2_left, wrist_image_left Image 180x320, joint_position f64 [7], gripper_position
# f64 [1], cartesian_position f64 [6]; action_dict of joint_position / joint_velocity [7],
# cartesian_position / cartesian_velocity [6], gripper_position / gripper_velocity [1];
# language_instruction (and _2, _3) per step; 15 Hz. Gripper position 0 = open, 1 = closed (DROID).
# Actions as openpi's π0 DROID policy: joint velocities + absolute gripper position. Cameras:
# exterior 1 -> base, the wrist camera -> left_wrist, exterior 2 -> right_wrist (the model's third
# slot; openpi's DROID policy leaves that slot empty instead).
register(DatasetSpec(
    name="droid",
    camera_keys={"observation/exterior_image_1_left": "base", "observation/wrist_image_left": "left_wrist",
                 "observation/exterior_image_2_left": "right_wrist"},
    state_keys=("observation/joint_position", "observation/gripper_position"),
    action_keys=("action_dict/joint_velocity", "action_dict/gripper_position"),
    instruction_key="language_instruction",
    control_hz=15.0,
    state_gripper=Gripper(dim=7, open=0.0, closed=1.0),
    action_gripper=Gripper(dim=7, open=0.0, closed=1.0),
    gripper_dims=(7,),
    state_dim=8,
    action_dim=8,
))
# kuka (QT-Opt) is not registered: its action dict is fractal's, but its state
# (observation/clip_function_input/base_pose_tool_reached, a feature name with a '/' in it, which
# transform.lookup resolves) is stored differently in the published files than the catalog says
# (Octo decodes it first); give it as fields once checked on the real data.
