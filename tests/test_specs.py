"""configs/specs.py: one reader of the config contract, one definition of the action horizon."""
import json

import ml_collections
import pytest

from configs import base, demo, pi0, pi05, specs
from data import pipeline


def test_the_horizon_has_one_definition_every_spec_shares():
    config = demo.get_config()
    for chunk_s, control_hz in ((0.5, 20.0), (0.5, 40.0), (0.33, 10.0), (0.01, 20.0)):
        config.knobs.chunk_s, config.knobs.control_hz = chunk_s, control_hz
        config.knobs.steps_executed = 1
        s = specs.build(config)
        horizon = specs.action_horizon(chunk_s, control_hz)
        assert horizon == max(1, round(chunk_s * control_hz))
        assert (s.model.action_horizon, s.data.window.horizon, s.data.layout.horizon,
                s.control.horizon) == (horizon,) * 4
    assert specs.action_horizon(0.01, 20.0) == 1  # a chunk is never empty


def test_specs_carry_the_config_values():
    config = demo.get_config()
    s = specs.build(config)
    assert (s.model.vit, s.model.image_size, s.model.cameras) == ("tiny/8", 64, ("corner2",))
    assert s.data.layout.cameras == s.data.window.cameras == s.model.cameras
    assert s.data.names == sorted(config.data.sources)
    assert s.data.source("metaworld").spec == "metaworld" and s.data.source("metaworld").weight == 0.8
    assert (s.optimizer.lr, s.optimizer.total_steps) == (config.optimizer.lr, config.total_steps)
    assert (s.train.batch_size, s.data.batch_size, s.data.seed) == (32, 32, 0)
    assert s.mesh.batch_axes == ("data", "fsdp")
    assert s.generation.tasks == config.data.tasks and s.generation.image_size == 64
    assert not s.data.fast_targets  # π0: FAST targets only in π0.5 mode
    assert specs.build(pi05.get_config("pretrain")).data.fast_targets


def test_a_runs_config_json_builds_the_same_specs():
    """Bundles and checkpoints keep the config as JSON (tuples come back as lists)."""
    for config in (demo.get_config(), pi0.get_config(), pi05.get_config("posttrain")):
        again = ml_collections.ConfigDict(json.loads(config.to_json_best_effort()))
        assert specs.build(again) == specs.build(config)


def test_the_base_is_the_contract_not_a_run():
    with pytest.raises(ValueError, match=r"config key knobs\.control_hz is not set .*"
                                         r"--config\.knobs\.control_hz="):
        specs.build(base.base_config())
    config = demo.get_config()
    config.batch_size = None
    with pytest.raises(ValueError, match="config key batch_size is not set"):
        specs.build(config)
    config = pi0.get_config()
    config.knobs.vit = None
    with pytest.raises(ValueError, match=r"knobs\.vit is not set"):
        specs.build(config)
    # π0's data section is its own (three cameras, one robot dataset), not Meta-World's.
    data = specs.build(pi0.get_config()).data
    assert data.names == ["robot"] and data.layout.cameras == ("base", "left_wrist", "right_wrist")
    with pytest.raises(ValueError, match="data root is not set.*--config.data.root"):
        pipeline.make_pipeline(data, process_index=0, process_count=1)


def test_malformed_sources_are_named():
    config = demo.get_config()
    config.data.sources.metaworld = dict(kind="robot", path="metaworld_rlds", weight=1.0, spc="x")
    with pytest.raises(ValueError, match=r"config\.data\.sources\.metaworld: unknown keys \['spc'\]"):
        specs.build(config)
    config.data.sources.metaworld = dict(kind="robot", path="metaworld_rlds")
    with pytest.raises(ValueError, match=r"missing \['weight'\]"):
        specs.build(config)


def test_training_refuses_what_only_the_cost_model_may_look_at():
    config = demo.get_config()
    config.knobs.steps_executed = 11  # more than the 10-step chunk
    spec = specs.build(config)  # the cost model reports on it ...
    with pytest.raises(ValueError, match="fewer than steps_executed=11"):
        specs.validate_training(spec)  # ... a run refuses it
