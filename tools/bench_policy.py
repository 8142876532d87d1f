"""Deployment latency of a bundle at batch 1: Policy.infer, guided (real-time chunking) inference,
and the policy server's round trip over loopback websockets.

    python -m tools.bench_policy --bundle BUNDLE [--n 200] [--image_size 224]

Prints one line per measurement (median, p99, max in milliseconds) and, with --json, the same as
JSON. Observations are camera frames of --image_size² (0 = the model's own size, no resize) with a
zero state, so the figures include the resize the policy does for real cameras. Record results in
BENCHMARKS.md with the machine and date; CPU timings swing by up to 2x with load (see there).
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np
from absl import app, flags, logging

from vla.client import PolicyClient
from vla.policy import Policy
from vla.serve import PolicyServer


def timed(call: Callable[[], object], n: int) -> dict[str, float]:
    """n timed calls after one untimed: median, p99, max milliseconds."""
    call()
    ms = np.empty(n)
    for i in range(n):
        start = time.perf_counter()
        call()
        ms[i] = (time.perf_counter() - start) * 1e3
    p50, p99 = np.percentile(ms, [50, 99])
    return {"median_ms": float(p50), "p99_ms": float(p99), "max_ms": float(ms.max()), "n": n}


def observation(metadata: dict, image_size: int) -> dict:
    """A valid observation: random frames of image_size² (the model's size when 0), zero state."""
    size = image_size or metadata["image_size"]
    rng = np.random.default_rng(0)
    return {"images": {c: rng.integers(0, 256, (size, size, 3), np.uint8) for c in metadata["cameras"]},
            "state": np.zeros(metadata["state_dim"], np.float32), "prompt": "press the button from the top"}


def bench(bundle: str, n: int, image_size: int) -> dict[str, dict[str, float]]:
    start = time.perf_counter()
    policy = Policy.from_bundle(bundle, warmup=True)
    m = policy.metadata
    results = {"load_and_compile": {"seconds": time.perf_counter() - start}}
    obs = observation(m, image_size)
    results["policy_infer"] = timed(lambda: policy.infer(obs, rng_seed=0), n)
    if m["actions_from"] == "flow":
        overlap = m["action_horizon"] - m["steps_executed"]
        prefix = np.zeros((overlap, m["action_dim"]), np.float32)
        delay = min(2, overlap)
        results["policy_infer_rtc"] = timed(
            lambda: policy.infer(obs, rng_seed=0, prefix_actions=prefix, inference_delay=delay), n)
    with PolicyServer(policy, port=0) as server, PolicyClient(port=server.port) as client:
        results["server_round_trip"] = timed(lambda: client.infer(obs, rng_seed=0), n)
    return results


def main(argv: Sequence[str]) -> None:
    """Runs the benchmark and prints one line per measurement (and, with --json, the JSON)."""
    del argv
    logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS
    results = bench(f.bundle, f.n, f.image_size)
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), batch 1, "
          f"{f.image_size or 'model-size'} frames, {f.n} timed calls")
    print(f"load + compile: {results['load_and_compile']['seconds']:.1f} s")
    for name, r in results.items():
        if "median_ms" in r:
            print(f"{name:>20}: median {r['median_ms']:8.2f} ms   p99 {r['p99_ms']:8.2f} ms   "
                  f"max {r['max_ms']:8.2f} ms")
    if f.json:
        print(json.dumps(results, indent=2))


def define_flags() -> None:
    """The command line: python -m tools.bench_policy --help."""
    flags.DEFINE_string("bundle", None, "Bundle directory written by python -m tools.export (required).",
                        required=True)
    flags.DEFINE_integer("n", 200, "Timed calls per measurement (after one untimed warm-up call).")
    flags.DEFINE_integer("image_size", 224, "Side in pixels of the square camera frames sent (0 = the model's "
                         "input size, so no resize).")
    flags.DEFINE_bool("json", False, "Also print the results as JSON.")


if __name__ == "__main__":
    define_flags()
    app.run(main)
