"""Closed-loop Meta-World evaluation (vla/sim_eval.py, tools/eval.py): task groups, the control
schedule, success counting checked against the scripted expert, and a real bundle played through
the library, the CLI and the trainer hook."""
import itertools
import json
import os
import subprocess
import sys

import imageio.v3 as iio
import jax
import numpy as np
import pytest
from flax import nnx

from configs import specs
from data import metaworld_env
from tests.test_train import small_config
from tools import eval as eval_tool
from vla import bundle as bundle_lib
from vla import sharding, sim_eval
from vla.models.vla import VLA
from vla.policy import Policy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK = "reach-v3"
SIZE = 32


# ------------------------------------------------------------------------------- tasks, seeds, schedule

def test_groups_partition_mt50_and_resolve():
    parts = [t for g in ("easy", "medium", "hard", "very_hard") for t in sim_eval.GROUPS[g]]
    assert sorted(parts) == sorted(sim_eval.MT50) == sorted(metaworld_env.TASKS)
    assert set(sim_eval.MT10) < set(sim_eval.MT50) and len(sim_eval.MT10) == 10
    assert sim_eval.resolve_tasks("mt10") == sim_eval.MT10
    assert sim_eval.resolve_tasks(" Reach-v3, drawer-open-v3,reach-v3") == ("reach-v3", "drawer-open-v3")
    assert sim_eval.resolve_tasks(["very_hard", "stick-push-v3"]) == sim_eval.GROUPS["very_hard"]
    assert len(sim_eval.resolve_tasks("easy,medium,hard,very_hard")) == 50
    with pytest.raises(ValueError, match=r"unknown Meta-World task or group 'reach-v2'.*mt10.*window-open-v3"):
        sim_eval.resolve_tasks("reach-v3,reach-v2")
    with pytest.raises(ValueError, match="no tasks"):
        sim_eval.resolve_tasks("")


def test_episode_seeds_depend_on_task_name_and_index_only():
    seeds = {sim_eval.episode_seed(0, t, i) for t in sim_eval.MT50 for i in range(10)}
    assert len(seeds) == 500
    assert sim_eval.episode_seed(0, TASK, 3) == sim_eval.episode_seed(0, TASK, 3)
    assert sim_eval.episode_seed(1, TASK, 3) != sim_eval.episode_seed(0, TASK, 3)


def test_schedule_holds_actions_at_the_control_rate():
    spec = sim_eval.PolicySpec(("corner2",), SIZE, control_hz=20.0)
    s = sim_eval.Schedule.build(spec, 80.0, max_steps=10)
    assert sorted(s.ticks) == [0, 4, 8] and sorted(s.render) == [0, 4, 8]
    s = sim_eval.Schedule.build(sim_eval.PolicySpec(("corner2",), SIZE, 30.0), 80.0, 9)
    assert sorted(s.ticks) == [0, 3, 6, 8]  # first env step at or after k / 30 s
    # Two context frames 0.25 s apart (20 env steps), as data/resample.context_indices picks them;
    # before the episode start only the current frame exists.
    spec = sim_eval.PolicySpec(("corner2",), SIZE, 20.0, context_frames=2, context_stride_s=0.25)
    s = sim_eval.Schedule.build(spec, 80.0, max_steps=30)
    assert s.context[0] == (0,) and s.context[16] == (16,) and s.context[24] == (4, 24)
    assert s.lookback() == 20
    with pytest.raises(ValueError, match="control_hz=100"):
        sim_eval.Schedule.build(sim_eval.PolicySpec(("corner2",), SIZE, 100.0), 80.0, 10)
    with pytest.raises(ValueError, match="max_steps=501"):
        sim_eval.Schedule.build(spec, 80.0, 501)


# ------------------------------------------------------------------------------- success counting

class _Recorder:
    """Plays the env's scripted expert, or without an env never moves (reach-v3's goal is never
    where the hand starts); records the images it was shown."""

    def __init__(self, env=None):
        self.env, self.seen = env, []

    def reset(self):
        self.seen.clear()

    def act(self, observation):
        assert observation["prompt"] == metaworld_env.instruction(TASK)
        assert observation["state"].shape == (4,)
        self.seen.append(observation["images"]["corner2"])
        return self.env.expert_action() if self.env else np.zeros(4, np.float32)


@pytest.fixture(scope="module")
def envs():
    with sim_eval.EnvCache(("corner2",), SIZE) as cache:
        yield cache


def test_success_is_counted_at_the_experts_first_success(envs):
    """The scripted expert played by the runner at the native rate succeeds exactly where
    data/metaworld_env.run_episode (the data generator's loop) first sees success, also when
    played on past it; a policy that never moves fails after max_steps."""
    spec = sim_eval.PolicySpec(("corner2",), SIZE, metaworld_env.CONTROL_HZ)
    expert = lambda env, seed: sim_eval.ExpertSource(env)
    played = sim_eval.evaluate(expert, [TASK], spec, episodes=2, max_steps=150, envs=envs,
                               progress=False)
    for ep in played["tasks"][TASK]["episode_results"]:
        rollout = metaworld_env.run_episode(envs.get(TASK), ep["seed"], max_steps=150,
                                            steps_after_success=0, render_steps=())
        assert rollout.success and ep["success"]
        assert ep["steps"] == len(rollout.state) < 150
    assert played["groups"]["easy"] == {"tasks": 1, "of": 28, "successes": 2, "episodes": 2, "rate": 1.0}
    on = sim_eval.evaluate(expert, [TASK], spec, episodes=1, max_steps=100, envs=envs,
                           stop_at_success=False, progress=False)["tasks"][TASK]["episode_results"][0]
    assert (on["success"], on["steps"], on["ticks"]) == \
        (True, played["tasks"][TASK]["episode_results"][0]["steps"], 100)

    still = sim_eval.evaluate(lambda env, seed: _Recorder(), [TASK], spec, episodes=1, max_steps=60,
                              envs=envs, progress=False)
    ep = still["tasks"][TASK]["episode_results"][0]
    assert (ep["seed"], ep["success"], ep["steps"], ep["ticks"]) == \
        (sim_eval.episode_seed(0, TASK, 0), False, 60, 60)
    assert still["overall"] == {"successes": 0, "episodes": 1, "rate": 0.0}


def test_context_frames_are_the_frames_of_earlier_ticks(envs):
    """Two frames 0.25 s apart at 20 Hz: the current frame alone until 0.25 s have passed, then
    [the frame seen 5 ticks earlier, the current one]."""
    spec = sim_eval.PolicySpec(("corner2",), SIZE, 20.0, context_frames=2, context_stride_s=0.25)
    source = _Recorder(envs.get(TASK))
    sim_eval.run_episode(envs.get(TASK), source, 0, sim_eval.Schedule.build(spec, 80.0, 32))
    seen = source.seen
    assert [f.shape for f in seen] == [(SIZE, SIZE, 3)] * 5 + [(2, SIZE, SIZE, 3)] * 3
    current = seen[:5] + [f[1] for f in seen[5:]]
    assert all(not np.array_equal(a, b) for a, b in itertools.pairwise(current))  # the arm moves
    for tick in (5, 6, 7):
        np.testing.assert_array_equal(seen[tick][0], current[tick - 5])


# ------------------------------------------------------------------------------- a real policy

@pytest.fixture(scope="module")
def policy(bundle_dir):
    return Policy.from_bundle(bundle_dir)


@pytest.fixture(scope="module")
def evaluated(policy, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sim_eval"))
    results = sim_eval.evaluate_policy(policy, TASK, episodes=2, max_steps=24, gif_episodes=1,
                                       out_dir=out, progress=False)
    return out, results


def test_outputs_have_the_promised_structure(evaluated, policy):
    out, _results = evaluated
    assert sorted(os.listdir(out)) == ["gifs", "results.json", "results.md"]
    with open(os.path.join(out, "results.json")) as f:
        saved = json.load(f)
    assert set(saved) == {"protocol", "tasks", "groups", "overall", "timing", "executor", "policy"}
    task = saved["tasks"][TASK]
    assert (task["group"], task["episodes"]) == ("easy", 2)
    assert task["rate"] == task["successes"] / 2 == saved["overall"]["rate"]
    episodes = task["episode_results"]
    assert [e["seed"] for e in episodes] == [sim_eval.episode_seed(0, TASK, i) for i in range(2)]
    for e in episodes:
        assert e["steps"] <= 24 and (e["success"] or e["steps"] == 24)
        # 20 Hz policy, 80 Hz env: an action every 4 env steps; a chunk of 5 per inference.
        assert e["ticks"] == -(-e["steps"] // 4)
        assert e["source_stats"]["inferences"] == -(-e["ticks"] // 5)
    assert saved["executor"] == {"mode": "sync", "steps_executed": 5, "inference_delay": 0}
    assert saved["policy"]["step"] == policy.metadata["step"]
    assert (saved["protocol"]["control_hz"], saved["protocol"]["native_hz"]) == (20.0, 80.0)
    assert set(saved["groups"]) == {"mt10", "mt50", "easy"}
    assert saved["timing"]["ms_per_env_step"] > 0
    with open(os.path.join(out, "results.md")) as f:
        table = f.read()
    assert f"| {TASK} | easy | {100 * task['rate']:.1f}% | {task['successes']}/2 |" in table
    gifs = os.listdir(os.path.join(out, "gifs"))
    outcome = "success" if episodes[0]["success"] else "failure"
    assert gifs == [f"{TASK}_ep0_{outcome}.gif"]
    frames = iio.imread(os.path.join(out, "gifs", gifs[0]), index=None)
    # One frame per tick; the GIF writer merges repeated frames into one longer one.
    assert frames.shape[1:] == (SIZE, SIZE, 3) and 1 < len(frames) <= episodes[0]["ticks"]


def test_same_seed_same_episodes(evaluated, policy):
    _, first = evaluated
    again = sim_eval.evaluate_policy(policy, [TASK], episodes=2, max_steps=24, progress=False)
    keys = ("seed", "success", "steps", "ticks")
    assert [{k: e[k] for k in keys} for e in again["tasks"][TASK]["episode_results"]] == \
        [{k: e[k] for k in keys} for e in first["tasks"][TASK]["episode_results"]]


def test_cli(bundle_dir, tmp_path):
    out = str(tmp_path / "eval")
    cmd = [sys.executable, "-m", "tools.eval", "--bundle", bundle_dir, "--tasks", TASK, "--episodes", "1",
           "--max_steps", "8", "--gifs", "0", "--out", out]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"| {TASK} | easy |" in run.stdout and "| **overall** |" in run.stdout
    with open(os.path.join(out, "results.json")) as f:
        assert json.load(f)["tasks"][TASK]["episodes"] == 1
    with pytest.raises(ValueError, match="unknown Meta-World task or group 'mt11'"):
        eval_tool.run(bundle_dir, "reach-v3,mt11", out)  # before the policy loads


def test_trainer_hook(generated_root, bundle_dir, tmp_path):
    """make_hook on the trained model sharded as the trainer holds it (FSDP over the 8 devices,
    inside the mesh): skips off-schedule steps, evaluates on schedule and writes step_<N>/ there; bad
    schedules are refused."""
    config = small_config(generated_root, eval_every=2, total_steps=8)
    config.sim_eval.update(tasks=(TASK,), episodes=1, every=4, max_steps=8, gif_episodes=0)
    meta = bundle_lib.read_json(bundle_dir, bundle_lib.METADATA_FILE)
    ckpt_metadata = {"config": config.to_dict(), "sources": meta["sources"], "stats": meta["stats"],
                     "tokenizer": os.path.join(bundle_dir, bundle_lib.TOKENIZER_FILE),
                     "tokenizer_vocab_size": meta["tokenizer_vocab_size"],
                     "fast_token_start": meta["fast_token_start"]}
    mesh = sharding.make_mesh({"data": 4, "fsdp": 2, "tensor": 1})
    rules = specs.build(config).mesh.rules
    hook = sim_eval.make_hook(specs.build(config), ckpt_metadata, str(tmp_path / "sim"))
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        # The trained weights placed by their logical axes (sharding.init_sharded would compile).
        graphdef, state, shardings = sharding.abstract_model(
            lambda: VLA(specs.build(config).model, rngs=nnx.Rngs(0)), mesh, rules)
        nnx.replace_by_pure_dict(state, nnx.restore_int_paths(bundle_lib.read_params(bundle_dir)))
        model = nnx.merge(graphdef, jax.device_put(state, shardings))
        assert hook(2, model) == {}
        metrics = hook(4, model)
    assert set(metrics) == {"sim/success", f"sim/success/{TASK}"}
    assert metrics["sim/success"] == metrics[f"sim/success/{TASK}"] in (0.0, 1.0)
    with open(tmp_path / "sim" / "step_4" / "results.json") as f:
        assert json.load(f)["policy"]["step"] == 4
    config.sim_eval.every = 3
    with pytest.raises(ValueError, match="multiple of eval_every=2"):
        sim_eval.make_hook(specs.build(config), ckpt_metadata)
    config.sim_eval.every, config.sim_eval.max_steps = 4, 600
    with pytest.raises(ValueError, match=r"max_steps in \[1, 500\] \(got 600\)"):
        sim_eval.make_hook(specs.build(config), ckpt_metadata)
    config.sim_eval.max_steps, config.eval_batches = 8, 0
    with pytest.raises(ValueError, match="eval_batches"):
        sim_eval.make_hook(specs.build(config), ckpt_metadata)
