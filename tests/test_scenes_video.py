"""Scene labels land on the objects they name; video clips have the promised frames;
the generic image-text source reads real registered TFDS builders."""
import os
import subprocess
import sys

import mujoco
import numpy as np
import pytest
import tensorflow_datasets as tfds

from data import scenes, video
from data.metaworld_env import MetaWorldEnv, run_episode
from data.tfds_image_text import ImageTextSource
from tests.data_fixtures import TINY_CLIP_FRAMES, TINY_IMAGE_SIZE

SIZE = 96


@pytest.fixture(scope="module")
def drawer_env():
    env = MetaWorldEnv("drawer-open-v3", ("corner2",), SIZE)
    yield env
    env.close()


def _segmentation(env: MetaWorldEnv, camera: str) -> np.ndarray:
    """int [H, W]: the geom id seen at each pixel (-1: none), oriented like env.render."""
    model, data = env._mw.model, env._mw.data
    with mujoco.Renderer(model, SIZE, SIZE) as renderer:
        renderer.enable_segmentation_rendering()
        renderer.update_scene(data, camera=camera)
        seg = renderer.render()
    ids = np.where(seg[..., 1] == mujoco.mjtObj.mjOBJ_GEOM, seg[..., 0], -1)
    return ids[::-1, ::-1]


def _gripper_geoms(env: MetaWorldEnv) -> set[int]:
    model = env._mw.model
    hand = model.body("hand").id
    def under_hand(body: int) -> bool:
        while body > 0:
            if body == hand:
                return True
            body = model.body_parentid[body]
        return False
    return {g for g in range(model.ngeom) if under_hand(model.geom_bodyid[g])}


def test_projected_gripper_lands_on_the_gripper():
    # reach-v3: nothing large on the table can hide the gripper from the camera.
    env = MetaWorldEnv("reach-v3", ("corner2",), SIZE)
    checks = 0
    try:
        def check(t, obs):
            nonlocal checks
            if t % 10:
                return
            row, col = env.project(env.gripper_position()[None], "corner2")[0].astype(int)
            seen = _segmentation(env, "corner2")[max(row - 2, 0):row + 3, max(col - 2, 0):col + 3]
            assert set(seen.ravel()) & _gripper_geoms(env), (t, row, col)
            checks += 1
        for seed in (0, 1):
            run_episode(env, seed, max_steps=40, on_step=check)
    finally:
        env.close()
    assert checks >= 6


def test_object_box_covers_the_object_pixels(drawer_env):
    env = drawer_env
    env.reset(3)
    obj = env.main_object()
    assert obj.label == "drawer" and obj.color == "green"
    ymin, xmin, ymax, xmax = env.object_box(obj, "corner2")
    seg = _segmentation(env, "corner2")
    rows, cols = np.nonzero(np.isin(seg, [i for _, i in obj.parts]))
    assert len(rows) > 20
    inside = (rows >= ymin - 1) & (rows <= ymax + 1) & (cols >= xmin - 1) & (cols <= xmax + 1)
    assert inside.mean() > 0.98
    # and the box is tight: the object fills a good part of it
    assert len(rows) > 0.25 * (ymax - ymin) * (xmax - xmin)


def test_scene_examples_tokens_point_at_the_truth(drawer_env):
    env = drawer_env
    obs = env.reset(4)
    examples = scenes.scene_examples(env, "corner2", obs["images"]["corner2"],
                                     np.random.default_rng(0))
    kinds = {e["kind"]: e for e in examples}
    assert set(kinds) >= {"caption", "vqa", "detect"}
    assert "green drawer" in kinds["caption"]["target"]
    box = scenes.parse_loc_tokens(kinds["detect"]["target"])
    assert len(box) == 4 and box[0] < box[2] and box[1] < box[3]
    assert kinds["detect"]["target"].endswith(" drawer")
    truth = env.object_box(env.main_object(), "corner2")
    np.testing.assert_allclose([scenes.loc_center(b, SIZE) for b in box], truth, atol=SIZE / 1024)
    if "point" in kinds:
        assert len(scenes.parse_loc_tokens(kinds["point"]["target"])) == 2
    for e in examples:
        assert e["images"]["corner2"].shape == (1, SIZE, SIZE, 3)


def test_loc_tokens_follow_paligemma():
    assert scenes.point_tokens(0.0, SIZE - 1e-6, SIZE) == "<loc0000><loc1023>"
    assert scenes.box_tokens(np.array([SIZE / 2, 0, SIZE, SIZE / 4]), SIZE) == \
        "<loc0512><loc0000><loc1023><loc0256>"
    assert scenes.parse_loc_tokens("<loc0012><loc1000> cup") == [12, 1000]


def test_drawer_vqa_follows_the_drawer(drawer_env):
    env = drawer_env
    rollout = run_episode(env, 5, max_steps=200, steps_after_success=3)
    assert rollout.success and env.articulation() > 0.3
    assert rollout.subtasks[0] == "reach the drawer" and rollout.subtasks[-1] == "done"
    assert "open the drawer" in rollout.subtasks


def test_generated_scene_dataset(generated_root):
    src = ImageTextSource(os.path.join(generated_root, "scenes_vl"))
    builder = tfds.builder_from_directory(os.path.join(generated_root, "scenes_vl"))
    kinds = builder.info.metadata["kinds"]
    assert {k for k, _ in kinds} == set(scenes.KINDS)
    for i in range(len(src)):
        e = src[i]
        assert e["images"]["corner2"].shape == (1, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3)
        assert e["prompt"] and e["target"] and e["task"]
        if e["prompt"].startswith("detect"):
            assert len(scenes.parse_loc_tokens(e["target"])) == 4


def test_generated_video_clips_have_the_right_frames(generated_root):
    src = ImageTextSource(os.path.join(generated_root, "rollout_video"))
    assert len(src) > 0
    targets = set()
    for i in range(len(src)):
        e = src[i]
        frames = e["images"]["corner2"]
        assert frames.shape == (TINY_CLIP_FRAMES, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3)
        targets.add(e["target"])
    assert targets & {"yes", "no", "moving randomly"} or len(targets) > 1


def test_clip_geometry():
    rng = np.random.default_rng(0)
    ends = video.clip_ends(50, 4, 5, 3, rng)
    assert len(ends) == 3 and all(15 <= e < 50 for e in ends)
    assert video.clip_steps(20, 4, 5) == [5, 10, 15, 20]
    assert video.clip_ends(10, 4, 5, 3, rng) == []


def test_video_rollouts_of_each_behaviour():
    env = MetaWorldEnv("button-press-topdown-v3", ("corner2",), 32)
    try:
        for kind in video.BEHAVIOURS:
            rng = np.random.default_rng(0)
            ends = video.clip_ends(40, 3, 6, 2, rng)
            render = {t for e in ends for t in video.clip_steps(e, 3, 6)}
            rollout = run_episode(env, 1, video.behaviour_policy(kind, env, rng), 40, None, render)
            assert set(rollout.frames) == render
            clips = video.clips(rollout, kind, env, ends, 3, 6, rng)
            assert [c["images"]["corner2"].shape for c in clips] == [(3, 32, 32, 3)] * 2
            if kind == "wrong_target":
                assert not rollout.success
    finally:
        env.close()


_MOCK_COCO = """
import sys
import numpy as np
import pytest
import tensorflow_datasets as tfds
from data.tfds_image_text import COCO_CAPTIONS, FieldMap, ImageTextSource

data_dir = sys.argv[1]
with tfds.testing.mock_data(num_examples=5, policy=tfds.testing.MockPolicy.USE_CODE):
    src = ImageTextSource("coco_captions", split="train", data_dir=data_dir, fields=COCO_CAPTIONS)
    assert len(src) == 5
    e = src[2]
    image = e["images"]["image"]
    assert image.ndim == 4 and image.shape[0] == 1 and image.shape[-1] == 3, image.shape
    assert image.dtype == np.uint8
    assert e["prompt"] == "caption en" and isinstance(e["target"], str) and e["target"]
    assert e["task"] == "coco_captions"
    with pytest.raises(ValueError, match="no feature 'answer'"):
        ImageTextSource("coco_captions", split="train", data_dir=data_dir,
                        fields=FieldMap(target_key="answer"))
    fields = FieldMap(prompt="describe image {image/id}", target_key="captions/text")
    e = ImageTextSource("coco_captions", split="train", data_dir=data_dir, fields=fields)[0]
    assert e["prompt"].startswith("describe image ") and e["prompt"][15:].isdigit(), e["prompt"]
print("ok")
"""


def test_image_text_source_on_mock_coco_captions(tmp_path):
    # A registered builder imports TensorFlow, which must stay out of this (rendering) process.
    run = subprocess.run([sys.executable, "-c", _MOCK_COCO, str(tmp_path)], capture_output=True,
                         text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]
