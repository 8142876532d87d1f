"""tools.generate: output layout, seeds, determinism across process counts, the command line."""
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import specs
from data.generation import generate, plan
from data.rlds import RobotDataset
from data.tfds_image_text import ImageTextSource
from tests.data_fixtures import TINY_TASKS, tiny_config, tiny_settings


def test_output_layout(generated_root):
    for sub in ("metaworld_rlds", "scenes_vl", "rollout_video"):
        assert os.path.exists(os.path.join(generated_root, sub, "dataset_info.json")), sub
    robot = tfds.builder_from_directory(os.path.join(generated_root, "metaworld_rlds"))
    assert robot.info.splits["train"].num_examples == 2 * len(TINY_TASKS)
    assert robot.info.splits["heldout"].num_examples == len(TINY_TASKS)
    tasks = [ep["episode_metadata"]["task"].decode() for ep in robot.as_data_source()["train"]]
    assert tasks == [t for t in TINY_TASKS for _ in range(2)]
    for sub in ("scenes_vl", "rollout_video"):
        assert len(ImageTextSource(os.path.join(generated_root, sub))) > 0


def test_plan_gives_distinct_reproducible_seeds():
    config = tiny_config(episodes=3, heldout=2)
    jobs = plan(specs.build(config).generation, video_rollouts_per_task=4)
    assert jobs == plan(specs.build(config).generation, video_rollouts_per_task=4)
    assert len({j.seed for j in jobs}) == len(jobs)
    assert [j.split for j in jobs] == ["train"] * 6 + ["heldout"] * 4 + ["video"] * 8
    assert {j.behaviour for j in jobs if j.split == "video"} == {"noisy", "wrong_target", "random"}
    config.seed = 1
    assert not {j.seed for j in plan(specs.build(config).generation, 4)} & {j.seed for j in jobs}


def test_same_seed_same_episodes_with_one_or_two_processes(generated_root, tmp_path):
    # The fixture ran 2 processes over 2 tasks; rerun the first task alone in 1 process.
    out = str(tmp_path / "one")
    generate(specs.build(tiny_config(tasks=TINY_TASKS[:1], heldout=0)).generation, out, processes=1,
             settings=tiny_settings(), video_rollouts_per_task=1)
    one = RobotDataset(os.path.join(out, "metaworld_rlds"))
    two = RobotDataset(os.path.join(generated_root, "metaworld_rlds"))
    assert len(one) == 2
    with pytest.raises(ValueError, match="no split 'heldout'"):
        RobotDataset(os.path.join(out, "metaworld_rlds"), split="heldout")
    for e in range(2):
        a, b = one.episode(e), two.episode(e)
        assert a.length == b.length
        steps = list(range(a.length))
        sa, sb = a.steps(steps), b.steps(steps)
        np.testing.assert_array_equal(sa["images"]["corner2"], sb["images"]["corner2"])
        np.testing.assert_array_equal(sa["state"], sb["state"])
        np.testing.assert_array_equal(sa["actions"], sb["actions"])
    assert not np.array_equal(one.episode(0).steps([0])["images"]["corner2"],
                              one.episode(1).steps([0])["images"]["corner2"])


def test_command_line(tmp_path):
    out = str(tmp_path / "cli")
    env = {**os.environ, "MUJOCO_GL": "egl"}
    run = subprocess.run(
        [sys.executable, "-m", "tools.generate", "--config", "configs/demo.py", "--out", out,
         "--config.data.episodes_per_task=1", "--config.data.heldout_episodes_per_task=0",
         "--config.model.image_size=32", "--processes=1", "--skip_tokenizer", "--skip_stats"],
        capture_output=True, text=True, env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "kept" in run.stdout and "dropped" in run.stdout
    assert len(RobotDataset(os.path.join(out, "metaworld_rlds"))) >= 2


def test_every_step_records_its_subtask(metaworld_rlds_dir):
    ds = RobotDataset(metaworld_rlds_dir)
    for e, task in enumerate(t for t in TINY_TASKS for _ in range(2)):
        ep = ds.episode(e)
        subtasks = ep.steps(range(ep.length))["subtask"]
        phases = list(dict.fromkeys(subtasks))  # in order of first appearance
        if task == "reach-v3":
            assert phases == ["move the gripper to the goal", "done"]
        else:  # the gripper starts away from the button: reach it, press it, done
            assert phases == ["reach the button", "press the button from the top", "done"]
        # Phases never come back, and the episode records steps after its success.
        assert sum(a != b for a, b in zip(subtasks, subtasks[1:])) == len(phases) - 1
        assert subtasks[0] == phases[0] and subtasks[-1] == "done"


def test_two_cameras_give_scene_examples_of_each_view_that_the_pipeline_places(tmp_path):
    """A scene example is one camera's view: the other camera has no frames on disk, and the
    text source leaves it masked (two-camera datasets failed to write before)."""
    import dataclasses

    from data import sources
    from data.tokenizer import Tokenizer, train_sentencepiece

    cameras = ("corner2", "topview")
    config = tiny_config(tasks=TINY_TASKS[:1], episodes=1, heldout=0)
    config.model.cameras = config.data.render_cameras = cameras
    spec = specs.build(config)
    out = str(tmp_path / "two")
    summary = generate(spec.generation, out, processes=1,
                       settings=dataclasses.replace(tiny_settings(), cameras=cameras), video_rollouts_per_task=1)
    scenes = ImageTextSource(os.path.join(out, "scenes_vl"))
    views = [tuple(scenes[i]["images"]) for i in range(len(scenes))]
    assert set(views) == {("corner2",), ("topview",)}
    train_sentencepiece(summary["texts"], str(tmp_path / "tok.model"), spec.generation.tokenizer_vocab_size)
    source = sources.TextSource("vl", lambda: scenes, spec.data.layout, Tokenizer(str(tmp_path / "tok.model")))
    for i, view in enumerate(views[:8]):
        assert source[i]["image_mask"].tolist() == [c in view for c in cameras]
