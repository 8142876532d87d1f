"""Checkpoints of a run (Orbax): train state, data-iterator state and metadata, saved together.

    WORKDIR/checkpoints/<step>/state      params, optimizer state, EMA, step (sharded arrays)
                              /data       every process's Grain iterator state (JSON)
                              /metadata   resolved config, source names, tokenizer, norm stats

Saves are asynchronous (the arrays are copied to host before `save` returns, then written in the
background) and atomic: a step counts only once complete (locally a temporary directory renamed;
on gs://, where a rename is no atomic operation, Orbax's commit marker), so a run killed mid-save
resumes from the previous one. The directory may be a gs:// URL (data/storage.py). Restoring
takes an abstract target whose leaves carry the shardings wanted now, so a checkpoint written
on one mesh restores exactly onto another.
"""
from __future__ import annotations

from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from data import storage


class Checkpointer:
    """One run's checkpoint directory: save every so often, keep the newest `keep`, restore."""

    def __init__(self, directory: str, keep: int):
        # Replica-parallel writing splits every replicated array into one slice per device, each
        # a dispatched op: seconds per save on one host, where it buys nothing. Across hosts it
        # spreads the writing of replicated (data-parallel) parameters.
        arrays = ocp.type_handlers.ArrayHandler(use_replica_parallel=jax.process_count() > 1)
        registry = ocp.type_handlers.create_type_handler_registry((jax.Array, arrays))
        self._mngr = ocp.CheckpointManager(
            storage.path(directory),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True,
                                                 create=True),
            item_handlers={"state": ocp.PyTreeCheckpointHandler(type_handler_registry=registry),
                           "data": grain.checkpoint.CheckpointHandler(),
                           "metadata": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        """Every complete checkpoint's step, oldest first."""
        return sorted(self._mngr.all_steps())

    def save(self, step: int, state: Any, data_iterator: grain.DatasetIterator,
             metadata: dict[str, Any]) -> None:
        """Starts an asynchronous save; the previous one, if still running, finishes first."""
        self._mngr.save(step, force=True, args=ocp.args.Composite(
            state=ocp.args.PyTreeSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            metadata=ocp.args.JsonSave(metadata)))

    def restore(self, step: int, target: Any, data_iterator: grain.DatasetIterator | None = None
                ) -> tuple[Any, dict[str, Any]]:
        """(state, metadata) of `step`; state takes target's structure, shapes and shardings.
        The data iterator, if given, is moved to where it was at that step."""
        items = dict(state=ocp.args.PyTreeRestore(
                         target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)),
                     metadata=ocp.args.JsonRestore())
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._mngr.restore(step, args=ocp.args.Composite(**items))
        return restored["state"], restored["metadata"]

    def saved_config(self, step: int) -> dict[str, Any]:
        """The resolved config `step` was trained with (from its metadata; nothing else is read)."""
        restored = self._mngr.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
        return restored["metadata"].get("config", {})

    def shape_mismatches(self, step: int, key: str, target: Any) -> list[str]:
        """How state[key] of `step` (e.g. "params") differs from target in structure or shape,
        one line per parameter, read from the checkpoint's metadata only; [] when it restores.
        Dtypes may differ: restoring casts."""
        saved = _shapes(self._mngr.item_metadata(step)["state"][key])
        wanted = _shapes(target)
        lines = [f"{name}: {list(saved[name])} in the checkpoint, {list(shape)} in this config"
                 for name, shape in wanted.items() if name in saved and saved[name] != shape]
        lines += [f"{name}: not in the checkpoint" for name in wanted if name not in saved]
        lines += [f"{name}: in the checkpoint only" for name in saved if name not in wanted]
        return lines

    def restore_params(self, step: int, target: Any) -> Any:
        """Only the parameters of `step` (to start another run from them), onto target's shardings."""
        return restore_state_entry(self._mngr, step, "params", target)

    def reached_preemption(self, step: int) -> bool:
        """True at the same step on every process once any was told to stop (multi-process runs;
        JAX's preemption service watches for SIGTERM)."""
        return self._mngr.reached_preemption(step)

    def wait(self) -> None:
        """Blocks until the last asynchronous save is on disk."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.close()


def restore_state_entry(mngr: ocp.CheckpointManager, step: int, key: str, target: Any) -> Any:
    """Only state[key] of `step` (e.g. "params" or "ema"), onto target's shapes, dtypes (cast while
    reading) and shardings; the rest of the state is never read."""
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        {key: target}, restore_args={key: ocp.checkpoint_utils.construct_restore_args(target)},
        partial_restore=True)))
    return restored["state"][key]


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """'a/b/c' path -> shape of every array (or array metadata) leaf."""
    def name(path) -> str:
        return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {name(path): tuple(leaf.shape) for path, leaf in leaves}


def abstract_like(tree: Any) -> Any:
    """Shapes, dtypes and shardings of a tree of arrays (a restore target), nothing allocated."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
