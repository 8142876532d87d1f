"""Session-scoped fixtures with small generated data (owned by the data pipeline).

`generated_root` is one real tools.generate run on a tiny config (2 tasks x 2 episodes + 1
heldout each, 32² images, 2 processes) with its tokenizer, stats and FAST fit (horizon 10 at
20 Hz); `metaworld_rlds_dir` is its RLDS dataset.
"""
from __future__ import annotations

import os

import pytest
from ml_collections import ConfigDict

from configs import specs
from configs.demo import get_config

TINY_TASKS = ("reach-v3", "button-press-topdown-v3")
TINY_IMAGE_SIZE = 32
TINY_CLIP_FRAMES = 3
TINY_FAST_VOCAB = 400  # the tiny train split has ~70 distinct coefficients; 257 pieces are fixed


def tiny_config(tasks: tuple[str, ...] = TINY_TASKS, episodes: int = 2,
                heldout: int = 1) -> ConfigDict:
    config = get_config()
    config.data.tasks = tasks
    config.data.episodes_per_task = episodes
    config.data.heldout_episodes_per_task = heldout
    config.model.image_size = TINY_IMAGE_SIZE
    # The fixture's postprocess fits FAST at the demo knobs; only pi05 pipelines read it.
    config.data.fast_targets = True
    config.data.fast_vocab_size = TINY_FAST_VOCAB
    return config


def tiny_settings():
    from data.generation import Settings  # MuJoCo: imported by the tests that generate data
    return Settings(cameras=("corner2",), image_size=TINY_IMAGE_SIZE, clip_frames=TINY_CLIP_FRAMES,
                    clip_stride=4, video_steps=40)


@pytest.fixture(scope="session")
def generated_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    # MuJoCo: imported by the tests that generate data.
    from data.generation import generate
    from tools.generate import postprocess
    spec = specs.build(tiny_config())
    out = str(tmp_path_factory.mktemp("generated"))
    summary = generate(spec.generation, out, processes=2, settings=tiny_settings(),
                       video_rollouts_per_task=3)
    postprocess(out, spec, summary["texts"])
    return out


@pytest.fixture(scope="session")
def metaworld_rlds_dir(generated_root: str) -> str:
    return os.path.join(generated_root, "metaworld_rlds")
