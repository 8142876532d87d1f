"""tools.aot: the trainer's step and the policy's sampler compiled by libtpu's TPU compiler on this
CPU for a v5p-8 (v5p:2x2x1), its figures held against the cost model; launch.tpu --aot-check."""
import dataclasses
import json
import subprocess
import sys

import pytest

from configs import demo
from launch import tpu
from tools import aot
from vla import cost

REPO = aot.common.REPO
TIMEOUT = 900
# At the demo's widths (64-256) TPU tiling pads a dimension to 128 lanes: arguments exceed the
# logical state bytes by up to 2x. XLA's FLOPs add elementwise work the cost model leaves out
# (tests/test_cost.py holds it to 15% unscanned); here the loop bodies are counted once on both sides.
FLOP_TOLERANCE = 0.15


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=TIMEOUT)


def test_topology_names_of_accelerator_types():
    names = {n: tpu.topology_name(tpu.accelerator(n)) for n in
             ("v5p-8", "v5p-16", "v5p-128", "v5litepod-256", "v6e-64", "v5litepod-4", "v4-8")}
    assert names == {"v5p-8": "v5p:2x2x1", "v5p-16": "v5p:2x2x2", "v5p-128": "v5p:4x4x4",
                     "v5litepod-256": "v5e:16x16", "v6e-64": "v6e:8x8", "v5litepod-4": "v5e:2x2",
                     "v4-8": "v4:2x2x1"}
    assert len(aot.topology("v5p:2x2x1").devices) == 4
    with pytest.raises(ValueError, match="GENERATION:SHAPE"):
        aot.topology("v5p-8")


def test_sweep_compiles_the_train_step_for_v5p8_and_agrees_with_the_cost_model(tmp_path):
    out = tmp_path / "sweep.json"
    proc = _run("tools.aot", "--config=configs/demo.py", "--topology=v5p:2x2x1", "--batch=32", "--sweep",
                "--sweep_tensor=1", "--sweep_remat=nothing_saveable,dots_saveable", f"--out={out}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sweep = json.loads(out.read_text())
    by_remat = {r["model"]["remat_policy"]: r for r in sweep["candidates"]}
    assert set(by_remat) == {"nothing_saveable", "dots_saveable"}
    spec = aot.run_spec(demo.get_config())
    params = cost.param_counts(spec.model)["total"]
    for remat, report in by_remat.items():
        train = report["train"]
        assert train["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1} and train["params"] == params
        cfg = dataclasses.replace(spec.model, remat_policy=remat)
        counted = cost.train_flops_as_counted(cfg) * 32 / 4
        assert train["flops"]["xla_per_chip"] == pytest.approx(counted, rel=FLOP_TOLERANCE)
        assert train["flops"]["model_per_step"] == pytest.approx(cost.train_flops_per_example(cfg) * 32)
        # fp32 parameters, two AdamW moments and the EMA, split four ways (FSDP) or padded.
        state = 4 * 4 * params / 4
        assert state <= train["memory"]["argument"] <= 2 * 4 * 4 * params
        assert train["memory"]["alias"] > 0.9 * state  # the donated state is reused for the output
        activations = cost.train_activation_bytes(cfg) * 32 / 4
        assert 0.3 * activations <= train["memory"]["temp"] <= 3 * activations
        assert train["memory"]["fits"] and train["time"]["step_s"] > 0 and 0 < train["time"]["mfu"] < 1
    # Keeping every matmul output costs memory that recomputing them does not.
    temp = {remat: r["train"]["memory"]["temp"] for remat, r in by_remat.items()}
    assert temp["dots_saveable"] > temp["nothing_saveable"]
    best = min(sweep["candidates"], key=lambda r: r["train"]["time"]["step_s"])
    assert sweep["best"]["model"]["remat_policy"] == best["model"]["remat_policy"]
    assert f"--config.model.remat_policy={best['model']['remat_policy']}" in proc.stdout.splitlines()[-1]


def test_sampler_compiles_for_one_chip_and_agrees_with_the_cost_model():
    spec = aot.run_spec(demo.get_config())
    report = aot.compile_sampler(spec, aot.topology("v5p:2x2x1"))
    counted = cost.prefix_flops(spec.model) + cost.flow_step_flops(spec.model)
    assert report["flops"]["xla_counted"] == pytest.approx(counted, rel=FLOP_TOLERANCE)
    weights = 4 * cost.param_counts(spec.model)["total"]
    assert weights <= report["memory"]["argument"] <= 2 * weights
    assert report["memory"]["fits"] and report["time"]["chunk_s"] > 0


def test_launch_aot_check_refuses_a_config_that_does_not_fit_before_creating_anything():
    # 2^17 examples of the demo on a v5litepod-4 (16 GiB chips): gigabytes of activations a chip.
    proc = _run("launch.tpu", "--tpu=t", "--zone=z", "--accelerator=v5litepod-4", "--config=configs/demo.py",
                "--workdir=gs://bucket/run", "--config.data.root=/data", "--config.batch_size=131072",
                "--aot-check", "--dry_run")
    assert proc.returncode != 0
    assert "AOT check: refusing to launch" in proc.stderr and "GiB on v5litepod-4" in proc.stderr
    assert "HLO temporaries need" in proc.stderr  # the compiler's own verdict, with its numbers
    assert "gcloud" not in proc.stdout  # nothing was planned, let alone created
