"""tools.benchmark end to end on one task at test size: every stage, the report, the plot, the
failure GIFs, and a rerun that redoes only what is missing."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# configs/metaworld.py for one task, shrunk to seconds: 32² from one camera, the tiny model,
# one episode to train on, 4 steps with an in-training evaluation at the last, 2 episodes a
# seed of at most 40 env steps (so they fail) for the final evaluation.
TEST_SIZE = {
    "model.image_size": 32, "model.cameras": "('corner2',)", "data.render_cameras": "('corner2',)",
    "knobs.vit": "tiny/8", "knobs.vlm": "gemma_tiny", "knobs.action_expert": "gemma_tiny_expert",
    "data.episodes_per_task": 1, "data.heldout_episodes_per_task": 1, "batch_size": 8,
    "total_steps": 4, "log_every": 2, "checkpoint_every": 4, "eval_every": 2, "eval_batches": 1,
    "chip": "h100", "knobs.flow_steps": 2, "optimizer.warmup_steps": 1,
    "sim_eval.every": 4, "sim_eval.episodes": 1, "sim_eval.max_steps": 40,
    "sim_eval.final_episodes": 2, "sim_eval.final_seeds": "(5, 6)", "sim_eval.failure_gifs": 1,
}


def _benchmark(workdir: str) -> str:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    overrides = [f"--config.{k}={v}" for k, v in TEST_SIZE.items()]
    proc = subprocess.run([sys.executable, "-m", "tools.benchmark", "--config",
                           "configs/metaworld.py:drawer-close-v3", "--workdir", workdir, *overrides],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout


@pytest.fixture(scope="module")
def benchmarked(tmp_path_factory) -> tuple[str, str]:
    workdir = str(tmp_path_factory.mktemp("benchmark"))
    return workdir, _benchmark(workdir)


def test_every_stage_runs_and_the_report_has_the_table_times_plot_and_gifs(benchmarked):
    workdir, out = benchmarked
    report = json.load(open(os.path.join(workdir, "benchmark.json")))
    assert report["step"] == 4 and set(report["stages"]) == {"generate", "train", "export", "evaluate"}
    assert all(t["wall_s"] > 0 and t["cpu_s"] > 0 for t in report["stages"].values())
    assert report["overall"]["episodes"] == 4  # 2 episodes x 2 seeds
    assert set(report["per_seed"]) == {"5", "6"}
    assert list(report["tasks"]) == ["drawer-close-v3"]
    assert report["tasks"]["drawer-close-v3"]["group"] == "easy" and "easy" in report["groups"]
    assert report["curve"] and "4" in report["curve"]  # the in-training evaluation at step 4
    table = open(os.path.join(workdir, "benchmark.md")).read()
    assert "| drawer-close-v3 | easy |" in table and "seed 5" in table and "| **total** |" in table
    assert table in out
    with open(os.path.join(workdir, "success.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    for seed in (5, 6):
        results = json.load(open(os.path.join(workdir, "eval", f"seed_{seed}", "results.json")))
        assert results["protocol"]["max_steps"] == 40 and results["policy"]["step"] == 4
        failures = [r for r in results["tasks"]["drawer-close-v3"]["episode_results"] if not r["success"]]
        gifs = os.listdir(os.path.join(workdir, "eval", f"seed_{seed}", "gifs"))
        assert len(gifs) == min(1, len(failures)) and all(g.endswith("_failure.gif") for g in gifs)


def test_a_rerun_redoes_only_what_is_missing(benchmarked):
    workdir, _ = benchmarked
    before = json.load(open(os.path.join(workdir, "benchmark.json")))["stages"]
    os.remove(os.path.join(workdir, "eval", "seed_6", "results.json"))
    out = _benchmark(workdir)
    assert "tools.generate" not in out and "vla.train" not in out and "tools.export" not in out
    assert "--seed 6" in out and "--seed 5" not in out
    after = json.load(open(os.path.join(workdir, "benchmark.json")))["stages"]
    assert all(after[s] == before[s] for s in ("generate", "train", "export"))
    assert after["evaluate"]["wall_s"] > before["evaluate"]["wall_s"]


def test_the_metaworld_config_builds_for_mt10_mt50_and_task_lists():
    from configs import metaworld, specs
    from vla import sim_eval

    mt10, mt50 = specs.build(metaworld.get_config("mt10")), specs.build(metaworld.get_config("mt50"))
    assert mt10.generation.tasks == sim_eval.MT10 and mt50.generation.tasks == sim_eval.MT50
    assert mt10.sim_eval.tasks == mt10.generation.tasks and mt10.data.augment.enabled
    assert mt10.generation.cameras == mt10.model.cameras == ("corner2", "topview")
    two = specs.build(metaworld.get_config("reach-v3, hard"))
    assert two.generation.tasks[0] == "reach-v3" and "pick-place-v3" in two.generation.tasks
    with pytest.raises(ValueError, match="unknown Meta-World task or group 'mt100'"):
        metaworld.get_config("mt100")
