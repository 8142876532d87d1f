"""tools.bench_gpu end to end on the 8 forced CPU devices at tiny shapes: both benchmarks run, and
the results table in a copy of a markdown file is written once, then replaced by a second run."""
import json
import os
import re
import subprocess
import sys

import jax

from tools import bench_gpu

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.knobs.vit=tiny/8", "--config.knobs.vlm=gemma_tiny", "--config.knobs.action_expert=gemma_tiny_expert",
        "--config.model.image_size=32", "--config.model.vocab_size=512", "--config.knobs.max_text_tokens=16",
        "--config.knobs.chunk_s=0.2", "--config.knobs.steps_executed=5",  # horizon 10 at 50 Hz
        "--steps", "2", "--warmup", "1", "--train_batch", "8"]
MARKDOWN = "# Benchmarks\n\nMeasured elsewhere.\n\n## Another section\n\nIts text.\n"


def _run(env: dict[str, str], *argv: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "tools.bench_gpu", *TINY, *argv, "--json"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "train step (batch 8): compiled in" in proc.stdout  # the progress lines
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _rows(text: str) -> dict[str, str]:
    """The bench_gpu table of a markdown text: {figure: value}."""
    inside = text.split(bench_gpu.BEGIN)[1].split(bench_gpu.END)[0]
    return dict(re.findall(r"^\| (.+?) \| (.+?) \|$", inside, re.M))


def _numbers(value: str) -> list[float]:
    return [float(x) for x in re.findall(r"\d+(?:\.\d+)?", value)]


def test_bench_gpu_writes_and_replaces_its_table(tmp_path):
    # XLA's CPU backend at optimization level 0 (half the compile time) and a compilation cache
    # shared by the two runs, so that only the first compiles.
    env = dict(os.environ, XLA_FLAGS=f"{os.environ['XLA_FLAGS']} --xla_backend_optimization_level=0 "
               "--xla_llvm_disable_expensive_passes=true", JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    path = tmp_path / "BENCHMARKS.md"
    path.write_text(MARKDOWN)

    result = _run(env, "--n", "3", "--benchmarks", str(path))
    assert result["sampler"]["median_ms"] > 0 and result["train"]["mfu"] > 0
    assert result["train"]["mesh"]["fsdp"] == 8 and result["sampler"]["param_dtype"] == "bfloat16"
    text = path.read_text()
    assert text.startswith(MARKDOWN) and text.index("## GPU: `python -m tools.bench_gpu`") > len(MARKDOWN)
    rows = _rows(text)
    assert rows["machine"].startswith(jax.devices()[0].device_kind)
    latency = _numbers(rows["sampler latency median / p99 / max (3 calls)"])
    assert len(latency) == 3 and min(latency) > 0
    mfu = next(v for k, v in rows.items() if k.startswith("MFU"))
    assert _numbers(mfu)[0] > 0 and "peak device memory" not in text  # CPU devices report none

    _run(env, "--n", "4", "--benchmarks", str(path))
    again = path.read_text()
    assert again.count(bench_gpu.BEGIN) == again.count(bench_gpu.END) == again.count("## GPU:") == 1
    assert again.startswith(MARKDOWN) and again.split(bench_gpu.END)[1] == text.split(bench_gpu.END)[1]
    assert "sampler latency median / p99 / max (4 calls)" in _rows(again)
    assert "(3 calls)" not in again
