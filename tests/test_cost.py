"""Cost model: exact parameter counts, analytic FLOPs against XLA's cost analysis, the real-time
verdict, and the trade-offs CLI."""
import dataclasses
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from configs import demo, pi0, pi05, specs
from vla import cost
from vla.models.vla import VLA, VLAConfig, random_batch

TOLERANCE = 0.15


def test_param_counts_match_published_models():
    # Independent counts of openpi's π0 and π0.5 parameter trees.
    assert cost.param_counts(specs.build(pi0.get_config()).model)["total"] == 3_238_048_528
    counts = cost.param_counts(specs.build(pi05.get_config()).model)
    assert counts["total"] == 3_353_433_872
    assert counts["total"] == counts["vit"] + counts["vlm"] + counts["action_expert"] + counts["projections"]


def _xla_flops(fn, *args) -> float:
    # Nothing is executed, so skip LLVM's optimizations: half the compile time, the same HLO counts.
    analysis = jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0}).cost_analysis()
    return (analysis[0] if isinstance(analysis, list) else analysis)["flops"]


@pytest.mark.parametrize("overrides", [dict(), dict(context_frames=2), dict(mode="pi05")])
def test_flops_agree_with_xla(overrides):
    # Unscanned layers: XLA counts a scan body once, an unrolled loop in full.
    cfg = VLAConfig(vit="tiny/8", vlm="gemma_tiny", action_expert="gemma_tiny_expert", scan_layers=False,
                    **overrides)
    graphdef, params = nnx.split(VLA(cfg, rngs=nnx.Rngs(0)))
    batch = jax.tree.map(jnp.asarray, random_batch(cfg, 1))
    noise = jnp.zeros((1, cfg.action_horizon, cfg.action_dim))

    def loss(p, b):
        return nnx.merge(graphdef, p).loss(b, jax.random.key(0))[0]

    def sample(p, b):  # one flow step: the fori_loop body is counted once whatever the trip count
        return nnx.merge(graphdef, p).sample_actions(b, noise=noise, num_steps=1)

    def prefix(p, b):
        model = nnx.merge(graphdef, p)
        return model.encode_prefix(model.embed_prefix(b))[1]

    forward = _xla_flops(loss, params, batch)
    sampled, prefix_only = _xla_flops(sample, params, batch), _xla_flops(prefix, params, batch)
    assert cost.forward_flops(cfg)["total"] == pytest.approx(forward, rel=TOLERANCE)
    assert cost.inference_flops(cfg, flow_steps=1) == pytest.approx(sampled, rel=TOLERANCE)
    assert cost.prefix_flops(cfg) == pytest.approx(prefix_only, rel=TOLERANCE)
    assert cost.flow_step_flops(cfg) == pytest.approx(sampled - prefix_only, rel=TOLERANCE)


def test_train_flops_convention():
    config = demo.get_config()
    cfg = specs.build(config).model
    forward = cost.forward_flops(cfg)
    assert cost.train_flops_per_example(cfg) == 3 * forward["total"]
    # nothing_saveable recomputes every scanned layer in the backward pass; "none" recomputes nothing.
    assert cost.train_flops_per_example(cfg, include_remat=True) == 3 * forward["total"] + forward["layers"]
    no_remat = dataclasses.replace(cfg, remat_policy="none")
    assert cost.train_flops_per_example(no_remat, include_remat=True) == 3 * forward["total"]
    assert cost.chip_peak_flops("h100") == 989e12


def test_realtime_verdict_flips_with_control_rate_and_steps_executed():
    config = demo.get_config()
    horizon = 20

    def fits(control_hz: float, steps_executed: int) -> bool:
        config.knobs.control_hz, config.knobs.steps_executed = control_hz, steps_executed
        config.knobs.chunk_s = horizon / control_hz  # same chunk shape, so the same latency
        return cost.report(specs.build(config), chip, "slow")["realtime"]["fits"]

    # A chip slow enough that one chunk takes 0.1 s, so the budget decides.
    config.knobs.control_hz, config.knobs.chunk_s = 10.0, horizon / 10.0
    flops = cost.inference_flops(specs.build(config).model, config.knobs.flow_steps)
    chip = cost.Chip(peak_flops=flops / 0.1, hbm_bytes_per_s=1e15)
    assert fits(control_hz=10, steps_executed=5)  # 0.5 s between inferences
    assert not fits(control_hz=100, steps_executed=5)  # 0.05 s
    assert fits(control_hz=100, steps_executed=20)  # 0.2 s
    assert not fits(control_hz=10, steps_executed=horizon + 1)  # more actions than a chunk holds


def _tradeoffs(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", "tools.tradeoffs", *args], check=True, capture_output=True,
                          text=True, timeout=600).stdout


def test_tradeoffs_json_on_pi0():
    report = json.loads(_tradeoffs("--config", "configs/pi0.py", "--json"))
    assert report["params"]["total"] == 3_238_048_528
    assert report["realtime"]["fits"]  # π0 on an H100 at 50 Hz, 25 steps per inference


def test_tradeoffs_sweep_writes_png(tmp_path):
    out = tmp_path / "sweep.png"
    table = _tradeoffs("--config", "configs/demo.py", "--sweep", "knobs.flow_steps=1,5,10", "--out", str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(table.strip().splitlines()) == 1 + 3 + 1  # header, one row per value, the plot path
