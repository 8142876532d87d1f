"""Peak host memory of importing weights: tensor by tensor (config.init) vs one whole host copy.

    python -m tools.bench_import --workdir /tmp/bench_import \
        [--vit So400m/14 --vlm gemma_2b,depth=2 --action_expert gemma_300m,depth=2 --vocab_size 32768]

Writes a random checkpoint of the model (Orbax, bf16 like openpi's, in our layout: format vla),
then measures in fresh processes the resident set size (VmRSS, sampled every 5 ms) before and
during the import. On CPU the device is host memory too, so the baseline holds the model; what
the init freed is returned to the OS first (compiled programs dropped, malloc_trim, large
blocks from mmap), so the peak's excess over it is what the import itself holds:
    tensorwise  sharded init, then vla.weights.load.init_params (what the trainer does)
    whole       sharded init, then the whole checkpoint restored to host numpy at once (what an
                importer that converts a full tree first would hold)
Prints, per mode, that excess against the model's bytes and its largest parameter's. Defaults:
~0.7 B parameters (2.8 GiB in fp32) whose largest tensor is a fifth of the model.
"""
from __future__ import annotations

import ctypes
import gc
import json
import os
import subprocess
import sys
import threading
import time

from absl import app, flags

FLAGS = flags.FLAGS


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class _PeakRss:
    """Highest VmRSS seen by a sampling thread while in the `with` block."""

    def __enter__(self):
        self.peak, self._stop = _rss(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _model_config():
    from vla.models.vla import VLAConfig
    return VLAConfig(vit=FLAGS.vit, vlm=FLAGS.vlm, action_expert=FLAGS.action_expert, image_size=224,
                     cameras=("base",), vocab_size=FLAGS.vocab_size, remat_policy="none")


def _init(cfg):
    """The sharded random init the trainer starts from: (pure params, mesh, rules)."""
    from flax import nnx

    from vla import sharding
    from vla.models.vla import VLA
    mesh, rules = sharding.make_mesh({"data": -1}), sharding.DEFAULT_RULES
    with nnx.logical_axis_rules(rules):
        model = sharding.init_sharded(lambda: VLA(cfg, rngs=nnx.Rngs(0)), mesh, rules)
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def write(directory: str) -> None:
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _init(_model_config()))
    ocp.PyTreeCheckpointer().save(os.path.join(os.path.abspath(directory), "params"),
                                  args=ocp.args.PyTreeSave({"params": params}), force=True)


def measure(directory: str, mode: str) -> dict:
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    from vla.weights.load import InitSource, init_params
    cfg = _model_config()
    params = _init(cfg)
    leaves = jax.tree.leaves(params)
    jax.block_until_ready(leaves)
    # What the init freed (its compiled program too) goes back to the OS, so the baseline is
    # what the model holds.
    jax.clear_caches()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    after_init = _rss()
    start = time.perf_counter()
    with _PeakRss() as peak:
        if mode == "tensorwise":
            params, _ = init_params([InitSource("vla", directory)], cfg, params)
            jax.block_until_ready(params)
        else:
            path = os.path.join(os.path.abspath(directory), "params")
            checkpointer = ocp.PyTreeCheckpointer()
            saved = checkpointer.metadata(path).item_metadata.tree
            restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
                restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved)))
            del restored  # after the peak: the whole tree was held at once
    return dict(mode=mode, seconds=round(time.perf_counter() - start, 1), rss_after_init=after_init,

                peak=peak.peak, excess=peak.peak - after_init,
                model_bytes=sum(x.nbytes for x in leaves), largest_bytes=max(x.nbytes for x in leaves),
                parameters=sum(x.size for x in leaves))


def main(argv):
    del argv
    directory = FLAGS.workdir
    if FLAGS.mode == "write":
        write(directory)
        return
    if FLAGS.mode:
        print("RESULT " + json.dumps(measure(directory, FLAGS.mode)))
        return
    passed = [f"--{name}={getattr(FLAGS, name)}" for name in ("vit", "vlm", "action_expert", "vocab_size")]
    base = [sys.executable, "-m", "tools.bench_import", f"--workdir={directory}", *passed]
    if not os.path.exists(os.path.join(directory, "params")):
        print(f"writing a random checkpoint to {directory} ...", flush=True)
        subprocess.run([*base, "--mode=write"], check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    # Large blocks from mmap are returned to the OS when freed, so RSS is what is live (glibc's
    # adaptive threshold would otherwise keep the init's freed temporaries resident).
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    gib = 2.0 ** 30
    for mode in ("tensorwise", "whole"):
        out = subprocess.run([*base, f"--mode={mode}"], check=True, capture_output=True, text=True,
                             env=env).stdout
        r = json.loads(out.split("RESULT ", 1)[1])
        print(f"{mode:>10}: {r['parameters'] / 1e9:.2f} B params, model {r['model_bytes'] / gib:.2f} GiB "
              f"(largest tensor {r['largest_bytes'] / gib:.2f} GiB); RSS after init {r['rss_after_init'] / gib:.2f} "
              f"GiB, peak {r['peak'] / gib:.2f} GiB: excess {r['excess'] / gib:.2f} GiB = "
              f"{r['excess'] / r['model_bytes']:.2f}x the model, {r['excess'] / r['largest_bytes']:.2f}x its "
              f"largest tensor; {r['seconds']} s", flush=True)


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "Directory for the random checkpoint (reused when present).")
    flags.DEFINE_string("vit", "So400m/14", "ViT variant.")
    flags.DEFINE_string("vlm", "gemma_2b,depth=2", "VLM variant.")
    flags.DEFINE_string("action_expert", "gemma_300m,depth=2", "Action expert variant.")
    flags.DEFINE_integer("vocab_size", 32768, "Embedding rows.")
    flags.DEFINE_enum("mode", None, ["write", "tensorwise", "whole"], "Internal: one measurement.")
    flags.mark_flag_as_required("workdir")
    app.run(main)
