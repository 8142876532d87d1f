"""RLDS writer and reader: layout, TF-free access, lazy steps, bad input, corruption."""
import dataclasses
import json
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from data import rlds, robots
from data.rlds import CorruptRecordError, RobotDataset
from data.transform import DatasetSpec
from tests.data_fixtures import TINY_IMAGE_SIZE

_READ_WITHOUT_TF = """
import sys, json
import tensorflow_datasets as tfds
src = tfds.builder_from_directory(sys.argv[1]).as_data_source()
ep = src["train"][0]
step = ep["steps"][0]
print(json.dumps({
    "splits": sorted(src), "n": len(src["train"]), "len": len(ep["steps"]),
    "step": sorted(step), "obs": sorted(step["observation"]),
    "meta": sorted(ep["episode_metadata"]), "image": list(step["observation"]["corner2"].shape),
    "first": bool(step["is_first"]), "last": bool(ep["steps"][len(ep["steps"]) - 1]["is_last"]),
    "tensorflow_imported": "tensorflow" in sys.modules,
}))
"""


def test_opens_without_tensorflow_with_rlds_fields(metaworld_rlds_dir):
    out = subprocess.run([sys.executable, "-c", _READ_WITHOUT_TF, metaworld_rlds_dir],
                         capture_output=True, text=True, check=True)
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["splits"] == ["heldout", "train"]
    assert info["n"] == 4
    assert info["step"] == ["action", "discount", "is_first", "is_last", "is_terminal",
                            "language_instruction", "language_subtask", "observation", "reward"]
    assert info["obs"] == ["corner2", "state"]
    assert info["meta"] == ["seed", "success", "task"]
    assert info["image"] == [TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3]
    assert info["first"] and info["last"]
    assert not info["tensorflow_imported"]


def test_metadata_has_control_rate_and_true_lengths(metaworld_rlds_dir):
    builder = tfds.builder_from_directory(metaworld_rlds_dir)
    assert builder.info.metadata["control_hz"] == 80.0
    source = builder.as_data_source()
    for split in ("train", "heldout"):
        ds = RobotDataset(metaworld_rlds_dir, "metaworld", split)
        assert ds.control_hz == 80.0
        assert list(ds.episode_lengths) == [len(ep["steps"]) for ep in source[split]]


def test_episode_ends_in_success(metaworld_rlds_dir):
    source = tfds.builder_from_directory(metaworld_rlds_dir).as_data_source()["train"]
    for ep in source:
        steps = ep["steps"]
        last = steps[len(steps) - 1]
        assert ep["episode_metadata"]["success"] and last["is_terminal"] and last["is_last"]
        assert not any(steps[i]["is_last"] for i in range(len(steps) - 1))
        actions = np.stack([steps[i]["action"] for i in range(len(steps))])
        assert actions.shape[1] == 4 and np.abs(actions).max() <= 1.0


def test_reader_returns_the_requested_steps(metaworld_rlds_dir):
    ds = RobotDataset(metaworld_rlds_dir, "metaworld")
    raw = tfds.builder_from_directory(metaworld_rlds_dir).as_data_source()["train"]
    assert len(ds) == 4 and ds.cameras == {"observation/corner2": "corner2"}
    rng = np.random.default_rng(0)
    for e in range(len(ds)):
        ep = ds.episode(e)
        assert ep.length == ds.episode_lengths[e] and ep.dataset == "metaworld_rlds"
        assert ep.instruction == raw[e]["steps"][0]["language_instruction"].decode()
        idx = [int(i) for i in rng.integers(0, ep.length, 5)] + [ep.length - 1, 0]
        got = ep.steps(idx)
        assert got["images"]["corner2"].shape == (len(idx), TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3)
        assert got["images"]["corner2"].dtype == np.uint8
        assert got["state"].shape == (len(idx), 4) and got["state"].dtype == np.float32
        assert got["actions"].shape == (len(idx), 4) and got["actions"].dtype == np.float32
        for k, i in enumerate(idx):
            step = raw[e]["steps"][i]
            np.testing.assert_array_equal(got["images"]["corner2"][k],
                                          step["observation"]["corner2"])
            np.testing.assert_array_equal(got["state"][k], step["observation"]["state"])
            np.testing.assert_array_equal(got["actions"][k], step["action"])
    with pytest.raises(IndexError, match="step"):
        ds.episode(0).steps([ds.episode_lengths[0]])


def test_reader_is_picklable(metaworld_rlds_dir):
    ds = RobotDataset(metaworld_rlds_dir)
    ds.episode(0)
    clone = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(clone.episode(1).steps([3])["state"],
                                  ds.episode(1).steps([3])["state"])


def test_bad_path_and_bad_spec_fail_early(metaworld_rlds_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        RobotDataset(str(tmp_path / "nope"))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="not a TFDS dataset"):
        RobotDataset(str(tmp_path / "junk"))
    wrong_cam = DatasetSpec("oxe", {"observation/image": "base"}, ("observation/state",))
    with pytest.raises(ValueError, match="observation/image"):
        RobotDataset(metaworld_rlds_dir, wrong_cam)
    wrong_state = DatasetSpec("oxe", {"observation/corner2": "base"}, ("observation/joints",),
                              action_keys=("action",))
    with pytest.raises(ValueError, match="observation/joints"):
        RobotDataset(metaworld_rlds_dir, wrong_state)
    wrong_dim = dict(name="oxe", camera_keys={"observation/corner2": "base"},
                     state_keys=["observation/state"], action_dim=7)
    with pytest.raises(ValueError, match="action has 7 dims"):
        RobotDataset(metaworld_rlds_dir, wrong_dim)
    with pytest.raises(KeyError, match="no dataset spec"):
        RobotDataset(metaworld_rlds_dir, "no_such_dataset")
    with pytest.raises(ValueError, match="no split"):
        RobotDataset(metaworld_rlds_dir, split="validation")


def test_user_spec_from_a_config_dict(metaworld_rlds_dir):
    spec = dict(name="mine", camera_keys={"observation/corner2": "base_0_rgb"},
                state_keys=["observation/state"], control_hz=10.0, gripper_dims=[3])
    ep = RobotDataset(metaworld_rlds_dir, spec).episode(0)
    assert ep.control_hz == 10.0 and ep.gripper_dims == (3,)
    assert set(ep.steps([0])["images"]) == {"base_0_rgb"}


def test_corrupt_file_on_disk_raises_corrupt_record_error(metaworld_rlds_dir, tmp_path):
    path = str(tmp_path / "metaworld_rlds")
    shutil.copytree(metaworld_rlds_dir, path)
    shard = next(os.path.join(path, f) for f in os.listdir(path) if "-train.array_record" in f)
    data = bytearray(open(shard, "rb").read())
    start = len(data) // 2
    data[start:start + 64] = bytes(b ^ 0xFF for b in data[start:start + 64])
    open(shard, "wb").write(bytes(data))
    ds = RobotDataset(path)
    errors = []
    for e in range(len(ds)):
        try:
            ep = ds.episode(e)
            ep.steps(range(ep.length))
        except CorruptRecordError as err:
            errors.append(err)
    assert errors, "corrupting the shard went unnoticed"
    assert all(err.dataset == "metaworld_rlds" and "metaworld_rlds" in str(err) for err in errors)
    assert all(f"episode {err.episode}" in str(err) for err in errors)


def test_undecodable_image_names_its_step(tmp_path):
    good = rlds.encode_png(np.zeros((8, 8, 3), np.uint8))
    episode = rlds.rlds_episode({"corner2": [good, b"not a png at all", good]},
                                np.zeros((3, 4)), np.zeros((3, 4)), np.zeros(3), "x", "t", True, 0,
                                subtasks=["a", "b", "c"])
    path = str(tmp_path / "broken")
    rlds.write_tfds(path, rlds.robot_features(["corner2"], 8, 4, 4, subtasks=True),
                    {"train": [episode]}, {"control_hz": 80.0}, "broken")
    ep = RobotDataset(path).episode(0)
    assert ep.steps([0, 2])["images"]["corner2"].shape == (2, 8, 8, 3)
    assert ep.steps([2, 0])["subtask"] == ["c", "a"]
    with pytest.raises(CorruptRecordError, match="step 1") as info:
        ep.steps([0, 1])
    assert (info.value.dataset, info.value.episode, info.value.step) == ("broken", 0, 1)
    clone = pickle.loads(pickle.dumps(info.value))
    assert (clone.dataset, clone.episode, clone.step, str(clone)) == \
        ("broken", 0, 1, str(info.value))


def test_writer_refuses_to_overwrite(metaworld_rlds_dir):
    with pytest.raises(FileExistsError):
        rlds.write_tfds(metaworld_rlds_dir, rlds.robot_features(["corner2"], 8, 4, 4),
                        {"train": []}, {}, "x")


def test_subtasks_are_optional(tmp_path):
    image = rlds.encode_png(np.zeros((8, 8, 3), np.uint8))
    episode = rlds.rlds_episode({"corner2": [image] * 2}, np.zeros((2, 4)), np.zeros((2, 4)),
                                np.zeros(2), "x", "t", True, 0)
    path = str(tmp_path / "plain")
    rlds.write_tfds(path, rlds.robot_features(["corner2"], 8, 4, 4), {"train": [episode]},
                    {"control_hz": 80.0}, "no subtasks")
    with pytest.raises(ValueError, match="language_subtask"):  # the spec names a missing key
        RobotDataset(path, "metaworld")
    spec = dataclasses.replace(robots.SPECS["metaworld"], subtask_key=None)
    assert "subtask" not in RobotDataset(path, spec).episode(0).steps([0, 1])
