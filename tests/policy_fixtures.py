"""Session fixtures for the deployment tests (owned by the export/policy work).

`trained_workdir` is one real vla.train run on the tiny generated dataset (π0 demo config shrunk
as tests/test_train.py's small_config: tiny model, 32² images, batch 8, 4 steps, checkpoints at
steps 2 and 4, no evaluation) sharded over the 8 forced host devices; `bundle_dir` is that run
exported with vla.bundle.export (float32, batch size 1). Load it with
`vla.policy.Policy.from_bundle(bundle_dir)`.
"""
from __future__ import annotations

import os

import pytest

from tests.test_train import small_config
from vla import bundle
from vla import train as train_lib

TRAINED_STEPS = 4


def trained_config(root: str, **overrides):
    """The config of `trained_workdir` (tests/test_train.py's small_config, no evaluation)."""
    return small_config(root, total_steps=TRAINED_STEPS, eval_batches=0, **overrides)


@pytest.fixture(scope="session")
def trained_workdir(generated_root: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    workdir = str(tmp_path_factory.mktemp("policy_train"))
    train_lib.train(train_lib.prepare(trained_config(generated_root), workdir))
    return workdir


@pytest.fixture(scope="session")
def bundle_dir(trained_workdir: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    out = os.path.join(str(tmp_path_factory.mktemp("policy_bundle")), "bundle")
    bundle.export(trained_workdir, out, dtype="float32", batch_size=1)
    return out
