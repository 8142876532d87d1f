"""One input transform for training and serving (data/transform.py), on a robot whose layout is
not ours: LIBERO as openpi records and serves it.

A LIBERO-layout RLDS dataset (openpi's keys "image", "wrist_image", "state" [8], "actions" [7],
"task"; only a "train" split, evaluated on a hash hold-out) trains a tiny model for two steps; its
bundle then takes the observation openpi's own LIBERO client sends ("observation/image", ...),
builds exactly the training pipeline's example from it, and answers openpi-client (PyPI) with a
chunk in the robot's units.
"""
from __future__ import annotations

import os
import shutil
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import specs
from data import pipeline, rlds, robot_data, sources, transform
from data.normalize import Normalizer
from data.robots import get_spec
from data.tokenizer import Tokenizer
from tests.test_train import small_config
from tools import reference_loaders
from tools.stats import compute_stats
from vla import bundle
from vla import train as train_lib
from vla.policy import Policy
from vla.serve import PolicyServer

OPENPI_CLIENT = "openpi-client==0.1.2"
LENGTHS = (14, 9, 17, 12, 11, 16)
TASKS = ("put the bowl on the plate", "open the top drawer")


def _libero_features() -> tfds.features.FeaturesDict:
    f = tfds.features
    return f.FeaturesDict({"steps": f.Dataset({
        "image": f.Image(shape=(24, 32, 3), encoding_format="png"),  # not square: padded on resize
        "wrist_image": f.Image(shape=(24, 32, 3), encoding_format="png"),
        "state": f.Tensor(shape=(8,), dtype=np.float32),
        "actions": f.Tensor(shape=(7,), dtype=np.float32),
        "task": f.Text(),
    })})


def _episode(e: int) -> dict:
    rng = np.random.default_rng(e)
    n = LENGTHS[e]
    gripper = np.where(np.arange(n) < n // 2, -1.0, 1.0).astype(np.float32)  # LIBERO: -1 open, +1 closed
    actions = np.concatenate([rng.uniform(-1, 1, (n, 6)), gripper[:, None]], 1).astype(np.float32)
    return {"steps": [{"image": rng.integers(0, 256, (24, 32, 3), np.uint8),
                       "wrist_image": rng.integers(0, 256, (24, 32, 3), np.uint8),
                       "state": rng.normal(0, 1, 8).astype(np.float32), "actions": actions[i],
                       "task": TASKS[e % 2]} for i in range(n)]}


def _config(root: str):
    c = small_config(root, total_steps=2, eval_every=2, checkpoint_every=2)
    c.model.cameras = ("base", "left_wrist")
    c.model.state_dim, c.model.action_dim = 8, 7
    c.knobs.control_hz, c.knobs.chunk_s = 10.0, 0.5
    c.data.fast_targets = False
    c.data.sources = {"libero": dict(kind="robot", path="libero_rlds", spec="libero", weight=1.0,
                                     eval_split="34%")}
    return c


@pytest.fixture(scope="module")
def libero(generated_root, tmp_path_factory):
    """(config, policy) of a 2-step run on the LIBERO-layout dataset, exported and loaded."""
    root = str(tmp_path_factory.mktemp("libero"))
    rlds.write_tfds(os.path.join(root, "libero_rlds"), _libero_features(),
                    {"train": [_episode(e) for e in range(len(LENGTHS))]}, {"control_hz": 10.0}, "LIBERO layout")
    shutil.copy(os.path.join(generated_root, "tokenizer.model"), root)
    config = _config(root)
    compute_stats(specs.build(config).data, workers=0, progress=False)
    workdir = os.path.join(root, "run")
    train_lib.train(train_lib.prepare(config, workdir))
    out = os.path.join(root, "bundle")
    bundle.export(workdir, out, dtype="float32", batch_size=1)
    return config, Policy.from_bundle(out)


def _client_observation(raw: dict, prompt: str) -> dict:
    """What openpi's LIBERO example client sends (examples/libero/main.py)."""
    return {"observation/image": raw["image"], "observation/wrist_image": raw["wrist_image"],
            "observation/state": raw["state"], "prompt": prompt}


def test_served_input_is_the_training_example_bit_for_bit(libero):
    config, policy = libero
    data = specs.build(config).data
    src = data.source("libero")
    tokenizer = Tokenizer(data.tokenizer_path())
    source = sources.make_source(src, data, "eval", tokenizer)
    held = robot_data.open_robot(data.dataset_dir(src), "libero", "rlds", "eval", "34%")
    assert 0 < len(held) < len(LENGTHS)  # the hold-out is a strict subset
    for index in (0, len(source) - 1):
        episode, step = source.locate(index)
        ep = held.episode(episode)
        example = source[index]
        batch = policy.batch(_client_observation(ep._step(step), ep.instruction))
        for cam in ("base", "left_wrist"):
            np.testing.assert_array_equal(batch["images"][cam][0], example["images"][cam])
        for key in ("image_mask", "frame_mask", "state", "tokens", "token_mask", "target_mask"):
            np.testing.assert_array_equal(batch[key][0], example[key], err_msg=key)


def test_train_and_eval_episodes_partition_the_train_split(libero):
    config, _ = libero
    path = specs.build(config).data.dataset_dir(specs.build(config).data.source("libero"))
    train = robot_data.open_robot(path, "libero", "rlds", "train", "34%")
    held = robot_data.open_robot(path, "libero", "rlds", "eval", "34%")
    ids = sorted([*train._episodes.tolist(), *held._episodes.tolist()])
    assert ids == list(range(len(LENGTHS)))
    again = robot_data.open_robot(path, "libero", "rlds", "eval", "34%")
    assert held._episodes.tolist() == again._episodes.tolist()  # deterministic


def test_openpi_client_gets_a_chunk_in_the_robots_units(libero):
    config, policy = libero
    try:
        sys.path.insert(0, reference_loaders.wheel(OPENPI_CLIENT))
    except RuntimeError as e:
        pytest.skip(f"cannot fetch the reference package: {e}")
    from openpi_client import websocket_client_policy

    data = specs.build(config).data
    ep = robot_data.open_robot(data.dataset_dir(data.source("libero")), "libero", "rlds", "eval", "34%").episode(0)
    obs = _client_observation(ep._step(3), ep.instruction)
    with PolicyServer(policy, port=0) as server:
        client = websocket_client_policy.WebsocketClientPolicy(host="127.0.0.1", port=server.port)
        assert client.get_server_metadata()["robot_spec"]["name"] == "libero"
        out = client.infer({**obs, "rng_seed": 3})
        bad = client.infer({"observation/image": obs["observation/image"], "prompt": "x"})
    expected = policy.infer(obs, rng_seed=3)["actions"]
    assert out["actions"].shape == (policy.metadata["action_horizon"], 7)
    np.testing.assert_allclose(out["actions"], expected, rtol=1e-6, atol=1e-6)
    assert "observation/wrist_image" in bad["error"] and "observation/state" in bad["error"]


# ------------------------------------------------------------------ the transform itself

@pytest.mark.parametrize("source, target", [("quat_xyzw", "rot6d"), ("euler_xyz", "matrix"),
                                            ("axis_angle", "quat_wxyz"), ("rot6d", "euler_xyz")])
def test_rotation_formats_round_trip(source, target):
    from scipy.spatial.transform import Rotation as R
    rots = R.random(5, random_state=0)
    as_source = transform.Rotation(0, "quat_xyzw", source).forward(rots.as_quat().astype(np.float32))
    x = np.concatenate([np.ones((5, 1), np.float32), as_source, np.zeros((5, 1), np.float32)], 1)
    rotation = transform.Rotation(1, source, target)
    y = rotation.forward(x)
    assert y.shape[1] == 2 + transform.ROTATION_DIMS[target]
    back = R.from_quat(transform.Rotation(1, source, "quat_xyzw").forward(rotation.inverse(y))[:, 1:5])
    assert np.allclose((back.inv() * rots).magnitude(), 0, atol=1e-5)
    assert (y[:, 0] == 1).all() and (y[:, -1] == 0).all()


def test_robot_actions_invert_the_training_transform():
    """gripper, rotation, delta and normalization undone in reverse order give the raw actions."""
    spec = transform.DatasetSpec.from_fields(dict(
        name="arm", camera_keys={"cam": "base"}, state_keys=("joints", "grip"), action_keys=("target", "grip_cmd"),
        action_rotation=dict(start=3, source="euler_xyz", target="rot6d"),
        action_gripper=dict(dim=9, open=1.0, closed=0.0),
        delta_dims=(0, 1, 2)))
    assert transform.DatasetSpec.from_fields(spec.fields()) == spec
    rng = np.random.default_rng(0)
    rows = [{"joints": rng.normal(size=9), "grip": rng.uniform(size=1), "target": rng.uniform(-1, 1, 6),
             "grip_cmd": rng.uniform(size=1)} for _ in range(4)]
    state = transform.canonical_state(spec, rows)
    actions = transform.canonical_actions(spec, rows)
    assert actions.shape == (4, 10) and spec.raw_action_dim(10) == 7
    norms = {"state": Normalizer(np.zeros(10, np.float32), np.ones(10, np.float32)),
             "actions": Normalizer(rng.normal(size=10).astype(np.float32), rng.uniform(1, 2, 10).astype(np.float32))}
    chunk = norms["actions"].normalize(transform.delta(spec, actions, state[0]))
    raw = np.stack([np.concatenate([r["target"], r["grip_cmd"]]) for r in rows])
    np.testing.assert_allclose(transform.robot_actions(spec, chunk, state[0], norms), raw, atol=1e-5)


def test_observation_errors_name_the_key_and_the_keys_present():
    spec = get_spec("libero")
    image = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match=r"no key 'wrist_image'.*keys present: \['image', 'state'\]"):
        transform.observation(spec, {"observation/image": image, "observation/state": np.zeros(8)})
    with pytest.raises(ValueError, match="must be a uint8 array"):
        transform.observation(spec, {"observation/image": image.astype(np.float32), "observation/wrist_image": image,
                                     "observation/state": np.zeros(8)})
    with pytest.raises(ValueError, match="has 5 dims"):
        transform.observation(spec, {"observation/image": image, "observation/wrist_image": image,
                                     "observation/state": np.zeros(5)})
    with pytest.raises(ValueError, match="unknown dataset spec field"):
        transform.DatasetSpec.from_fields({"name": "x", "camera_keys": {}, "state_keys": (), "action_key": "a"})


def test_a_missing_eval_split_names_the_splits_there_and_the_hold_out(libero):
    config, _ = libero
    config = config.copy_and_resolve_references()
    config.data.sources.libero.eval_split = None
    config.data.eval_split = "val"
    with pytest.raises(ValueError, match=r"eval_split 'val'.*\['train'\].*'5%'"):
        pipeline.make_pipeline(specs.build(config).data, "eval", process_index=0, process_count=1)
    with pytest.raises(ValueError, match="percentage in"):
        robot_data.parse_eval_split("150%")
