"""Evaluation during training: held-out loss per source, action error in the dataset's units,
and the hooks (closed-loop success rates, vla/sim_eval.py) that run at the same steps.

The action error is the mean |sampled chunk - true chunk| over action_mask after undoing each
source's normalization; the baseline predicts the dataset's mean action everywhere. The
held-out iterator restarts every time, so every evaluation sees the same batches.

An evaluation never stops training: the held-out pass and each hook run on their own, and one
that raises is logged (with its traceback) and counted in eval/failures (this process's total
so far), while the others still report.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from data import pipeline as pipeline_lib
from vla import sharding
from vla.models.vla import LOSSES, per_source_key

# An evaluation hook gets (step, model with the evaluated weights) and returns named scalars,
# reported as eval/<name>; closed-loop success rates plug in here (vla/sim_eval.make_hook).
EvalHook = Callable[[int, nnx.Module], Mapping[str, float]]


class Evaluator:
    """Called with (step, params): held-out metrics {"eval/...": value} and the hooks' results."""

    def __init__(self, graphdef: nnx.GraphDef, mesh: jax.sharding.Mesh, rules: sharding.Rules,
                 heldout: pipeline_lib.Pipeline, *, batches: int, seed: int, flow_steps: int,
                 action_dim: int, hooks: Sequence[EvalHook] = ()):
        """batches: held-out batches per evaluation; seed: the run's (noise is drawn from
        seed + 1 and the batch index); flow_steps: Euler steps of the sampled chunks."""
        self._graphdef, self._hooks = graphdef, hooks
        self._batches, self._seed, self._flow_steps = batches, seed, flow_steps
        self._data, self._start = heldout, heldout.get_state()
        self._names = heldout.names
        # Inputs that are not batches are replicated explicitly: in a multi-process run a jitted
        # function accepts only arrays placed on the global mesh.
        self._replicated = NamedSharding(mesh, PartitionSpec())
        self._batch_sharding = sharding.batch_sharding(mesh, rules)
        self._tables = jax.device_put(_native_tables(action_dim, heldout), self._replicated)
        self._step = jax.jit(self._eval_step, out_shardings=self._replicated)
        self.failures = 0

    def _eval_step(self, params, batch, tables, index):
        model = nnx.merge(self._graphdef, params)
        rng = jax.random.fold_in(jax.random.key(self._seed + 1), index)
        loss_rng, noise_rng = jax.random.split(rng)
        _, m = model.loss(batch, loss_rng, len(self._names))
        pred = model.sample_actions(batch, rng=noise_rng, num_steps=self._flow_steps)
        src = batch["source"]
        scale, shift = tables["scale"][src][:, None], tables["shift"][src][:, None]
        true = batch["actions"] * scale + shift
        mask = batch["action_mask"].astype(jnp.float32)
        per_source = lambda v: jax.ops.segment_sum(v, src, num_segments=len(self._names))
        err = per_source(jnp.sum(jnp.abs(pred * scale + shift - true) * mask, axis=(1, 2)))
        base = per_source(jnp.sum(jnp.abs(tables["mean"][src][:, None] - true) * mask, axis=(1, 2)))
        out = dict(action_err=err, mean_action_err=base, action_count=per_source(jnp.sum(mask, axis=(1, 2))))
        for name in LOSSES:
            count = m[per_source_key(name, "count")]
            out[f"{name}_sum"], out[f"{name}_count"] = m[per_source_key(name, "loss")] * count, count
        return out

    def __call__(self, step: int, params: Any) -> dict[str, float]:
        metrics = self._guarded(step, "held-out evaluation", lambda: self._heldout(params))
        model = nnx.merge(self._graphdef, params)
        for hook in self._hooks:
            name = getattr(hook, "__name__", type(hook).__name__)
            out = self._guarded(step, f"evaluation hook {name}", lambda h=hook: h(step, model))
            metrics.update({f"eval/{k}": v for k, v in out.items()})
        metrics["eval/failures"] = float(self.failures)
        return metrics

    def _guarded(self, step: int, what: str, run: Callable[[], Mapping[str, float]]) -> dict[str, float]:
        """run()'s metrics, or none (logged and counted) if it raises."""
        try:
            return dict(run())
        except Exception as e:  # noqa: BLE001 - whatever breaks an evaluation, training goes on
            self.failures += 1
            logging.warning("step %d: %s failed (%s: %s); training continues", step, what,
                            type(e).__name__, e, exc_info=True)
            return {}

    def _heldout(self, params: Any) -> dict[str, float]:
        self._data.set_state(self._start)
        totals = None
        for i in range(self._batches):
            batch = sharding.global_batch(next(self._data), self._batch_sharding)
            out = self._step(params, batch, self._tables, jax.device_put(np.int32(i), self._replicated))
            totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
        t = jax.tree.map(np.asarray, jax.device_get(totals))
        metrics = {}
        for i, name in enumerate(self._names):
            for loss in LOSSES:
                if t[f"{loss}_count"][i]:
                    metrics[f"eval/{loss}_loss/{name}"] = t[f"{loss}_sum"][i] / t[f"{loss}_count"][i]
            if t["action_count"][i]:
                metrics[f"eval/action_mae/{name}"] = t["action_err"][i] / t["action_count"][i]
                metrics[f"eval/mean_action_mae/{name}"] = t["mean_action_err"][i] / t["action_count"][i]
        # Unreadable held-out data skipped in this pass (the counts restart with the iterator).
        metrics.update({f"eval/{k}": float(v) for k, v in self._data.metrics().items()})
        return metrics


def _native_tables(action_dim: int, heldout: pipeline_lib.Pipeline) -> dict[str, np.ndarray]:
    """Per source: actions = normalized * scale + shift, and the mean action ([S, A] each);
    sources without statistics (no actions) keep the identity."""
    a, n = action_dim, len(heldout.names)
    scale, shift, mean = np.ones((n, a), np.float32), np.zeros((n, a), np.float32), np.zeros((n, a), np.float32)
    for i, name in enumerate(heldout.names):
        if name in heldout.normalizers:
            norm = heldout.normalizers[name]["actions"]
            scale[i, :norm.dim], shift[i, :norm.dim] = norm.scale, norm.shift
            stat = np.asarray(heldout.stats[name]["actions"]["mean"], np.float32)
            mean[i, :len(stat)] = stat
    return dict(scale=scale, shift=shift, mean=mean)
