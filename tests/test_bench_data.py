"""tools/bench_data.py and tools/make_bench_data.py end to end at tiny sizes: a dozen generated
episodes (RLDS and their LeRobot export), one or two batches per row, a two-episode bridge-shaped
TFRecord dataset. The numbers are not checked, only that every benchmark runs and reports."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from absl import app

from configs import specs
from configs.demo import get_config
from tools import bench_data, make_bench_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEROBOT = {"kind": "robot", "format": "lerobot", "path": "lerobot", "spec": "metaworld_lerobot",
           "stats": "rlds/stats.json", "weight": 0}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    """A data root: rlds/ (12 episodes of 3-6 steps, 8² frames), lerobot/, tokenizer.model."""
    root = str(tmp_path_factory.mktemp("bench"))
    report = make_bench_data.write_episodes(root, episodes=12, min_steps=3, max_steps=6, image_size=8,
                                            lerobot=True, progress=False)
    assert report["episodes"] == 12 and 36 <= report["steps"] <= 72 and report["lerobot"]
    return root


def _data(root: str, **sources) -> specs.DataSpec:
    config = get_config()
    config.batch_size = 4
    bench_data.apply_sources(config, ["scenes_vl=none", "rollout_video=none",
                                      'metaworld={"kind": "robot", "path": "rlds", "spec": "metaworld", "weight": 1}']
                             + [f"{k}={json.dumps(v)}" for k, v in sources.items()])
    config.data.root = root
    return specs.build(config).data


def test_source_flags_add_replace_and_remove():
    config = get_config()
    bench_data.apply_sources(config, ["scenes_vl=none", "lerobot=" + json.dumps(LEROBOT),
                                      "metaworld=dict(kind='robot', path='x', spec='metaworld', weight=0.5)"])
    assert sorted(config.data.sources) == ["lerobot", "metaworld", "rollout_video"]
    assert config.data.sources.metaworld.to_dict() == {"kind": "robot", "path": "x", "spec": "metaworld",
                                                       "weight": 0.5}
    assert isinstance(config.data.sources.lerobot, ml_collections.ConfigDict)
    with pytest.raises(app.UsageError, match="no source 'nope' to remove"):
        bench_data.apply_sources(config, ["nope=none"])
    with pytest.raises(app.UsageError, match="neither JSON nor a Python dict"):
        bench_data.apply_sources(config, ["x={kind: robot"])


def test_rows_are_each_source_alone_and_the_positive_weight_mixture(tiny):
    data = _data(tiny, lerobot=LEROBOT)
    rows = dict(bench_data.rows(data))
    assert list(rows) == ["lerobot", "metaworld", "mixture"]
    assert [s.weight for s in rows["lerobot"].sources] == [1.0]
    assert [s.name for s in rows["mixture"].sources] == ["metaworld"]  # lerobot has weight 0
    with pytest.raises(app.UsageError, match="--rows"):
        bench_data.rows(data, ["scenes_vl"])


def test_throughput_prints_a_row_per_source_and_worker_count(tiny, capsys):
    bench_data.throughput(_data(tiny, lerobot=LEROBOT), [], [0], batches=2, warmup=1)
    lines = capsys.readouterr().out.splitlines()
    table = {line.split()[0]: line.split() for line in lines[3:]}
    assert sorted(table) == ["lerobot", "metaworld", "mixture"]
    assert table["lerobot"][1] == "lerobot" and table["metaworld"][1] == "rlds"
    for row in table.values():
        assert float(row[3]) > 0 and float(row[4]) > 0  # examples/s, CPU ms per example


def test_startup_times_metadata_cold_and_warm(tiny, capsys, tmp_path):
    data = _data(tiny)
    cases = list(bench_data.startup_cases(data, data.source("metaworld"), str(tmp_path)))
    assert [c for c, _ in cases] == ["lengths in metadata.json", "index cold (built)", "index warm (cached)"]
    copy = cases[1][1].path
    with open(os.path.join(copy, "metadata.json")) as f:
        assert "episode_lengths" not in json.load(f)
    with open(os.path.join(tiny, "rlds", "metadata.json")) as f:
        assert "episode_lengths" in json.load(f)  # the original is untouched (the copy's file was replaced)
    run = bench_data.startup_run(dataclasses.replace(data, sources=(cases[1][1],)), str(tmp_path))
    assert run["total"] >= run["make_pipeline"] + run["first_batch"] > 0
    assert os.path.isfile(os.path.join(copy, ".vla_index", "episode_lengths.train.json"))  # built, cached


def test_lerobot_decode_against_the_reference_loader(tiny, capsys):
    bench_data.lerobot_decode(os.path.join(tiny, "lerobot"), "metaworld_lerobot", items=5)
    out = capsys.readouterr().out
    assert "LeRobot 0.4.4 (ledataset)   random items" in out and "ours (data/lerobot.py)      in order items" in out


def test_bridge_tfrecord_converts(tmp_path, capsys):
    run = subprocess.run([sys.executable, "-m", "tools.make_bench_data", "bridge-tfrecord", "--out", str(tmp_path),
                          "--episodes", "2", "--steps", "2", "--shards", "1"], cwd=ROOT, capture_output=True,
                         text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert run.returncode == 0, run.stderr[-3000:]
    src = os.path.join(tmp_path, "bridge", "0.1.0")
    bench_data.convert(src, [1])
    row = capsys.readouterr().out.splitlines()[-1].split()
    assert row[0] == "1" and float(row[1]) > 0.3 and np.isfinite(float(row[3]))
