"""Deployment bundles: one trained checkpoint as a self-describing directory.

    python -m tools.export --workdir DIR [--step N] --out BUNDLE   (tools/export.py)

Layout of BUNDLE/:

    params/                  Orbax PyTree checkpoint of the parameters (the EMA when the run kept
                             one), cast to metadata["dtype"]: a nested dict with string keys
                             ({"decoder": {"experts": {"0": {...}}}, "vit": {...}, ...}); a LoRA
                             run's adapters are merged into their weights (vla/models/lora.py)
    config.json              the run's resolved config (model.param_dtype = the bundle's dtype,
                             model.lora_rank = 0: the bundle's model has no adapters)
    metadata.json            `describe` (what a client needs: cameras, image size, native state
                             and action dims, horizon, control rate, normalization statistics,
                             ...) plus step, data mixture, code version, dtypes and `signature`
    tokenizer.model          the SentencePiece model the prompts were tokenized with
    datasets/<source>/fast/h{H}_{hz}hz/
                             the FAST tokenizer of every robot source (π0.5 runs trained on FAST
                             action targets only; data/fast_targets.load reads it from here)
    inference.jax_export     jax.export of sample(params, batch, noise) -> actions: fixed batch
                             size (metadata["batch_size"]) and shapes, lowered for
                             metadata["platforms"], callable without the model code

The exported function, as metadata["signature"] states it:

    params   the params/ tree, restored as is (`read_params`)
    batch    {"images": {cam: uint8 [B, T, S, S, 3]}, "image_mask": bool [B, C],
              "frame_mask": bool [B, C, T], "tokens": int32 [B, L], "token_mask": bool [B, L],
              "target_mask": bool [B, L], "state": f32 [B, S_model]}   (the batch contract:
              state normalized and padded, tokens as data/prompt.build_tokens lays them out;
              vla.policy.Policy.batch builds it from an observation, a π0.5 subtask included)
    noise    f32 [B, H, A_model]     the flow sampler's starting point (standard normal)
    returns  f32 [B, H, A_model]     normalized actions; the first action_dim dims are the
                                     robot's, unnormalize them with stats[source]["actions"]

A runtime with only jax and orbax:

    exported = jax.export.deserialize(bytearray(open(f"{BUNDLE}/inference.jax_export", "rb").read()))
    actions = exported.call(read_params(BUNDLE), batch, noise)

vla.policy.Policy does all of the above from raw observations (and more: subtasks, FAST actions,
real-time chunking), with the model code.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from configs import specs as specs_lib
from data import fast_targets, storage
from data.layout import Layout
from data.robots import get_spec
from data.spec import DataSpec
from vla import optimizer as optimizer_lib
from vla.checkpoint import restore_state_entry
from vla.models import lora
from vla.models.vla import VLA, VLAConfig

PARAMS_DIR = "params"
CONFIG_FILE = "config.json"
METADATA_FILE = "metadata.json"
TOKENIZER_FILE = "tokenizer.model"
DATASETS_DIR = "datasets"
EXPORT_FILE = "inference.jax_export"
DTYPES = ("float32", "bfloat16")
# A loose bound for servers to refuse huge prompts early; the policy checks the exact token count.
MAX_PROMPT_CHARS_PER_TOKEN = 16
# The batch keys the action sampler reads (the training-only ones are left out of the signature).
SAMPLE_KEYS = ("images", "image_mask", "frame_mask", "tokens", "token_mask", "target_mask", "state")

Params = Any
Sampler = Callable[[Params, dict, jax.Array], jax.Array]


# ------------------------------------------------------------------------------- the model

def model_spec(spec: specs_lib.RunSpec, ckpt_metadata: dict) -> VLAConfig:
    """The model a run trained: its config's, with the FAST id range its data decided (the
    checkpoint metadata's fast_token_start; vla/train.py). Runs written before the metadata
    carried it kept it in their config (model.fast_token_start), which specs.build reads."""
    start = ckpt_metadata.get("fast_token_start", spec.model.fast_token_start)
    return dataclasses.replace(spec.model, fast_token_start=start)


def abstract_model(model: VLAConfig) -> tuple[nnx.GraphDef, dict]:
    """(graphdef, pure parameter dict of ShapeDtypeStructs) of a model; nothing allocated."""
    with nnx.use_eager_sharding(False):
        graphdef, state = nnx.split(nnx.eval_shape(lambda: VLA(model, rngs=nnx.Rngs(0))))
    return graphdef, nnx.to_pure_dict(state)


def action_sampler(graphdef: nnx.GraphDef, flow_steps: int) -> Sampler:
    """sample(params, batch, noise[, guide, weights]) -> normalized actions f32 [B, H, A]: the
    function the bundle exports (without guidance) and the Policy runs. params: the model's pure
    dict (string or integer list keys); guide f32 [B, H, A] and weights f32 [B, H, A]: real-time
    chunking's guided sampling (VLA.sample_actions)."""

    def sample(params: Params, batch: dict, noise: jax.Array, guide: jax.Array | None = None,
               weights: jax.Array | None = None) -> jax.Array:
        model = nnx.merge(graphdef, nnx.restore_int_paths(params))
        return model.sample_actions(batch, noise=noise, num_steps=flow_steps, guide_actions=guide,
                                    guide_weights=weights)

    return sample


def string_keys(tree: Any) -> Any:
    """A nested dict with every key a string (as Orbax stores it, so the exported function's
    params tree is exactly what `read_params` restores)."""
    if isinstance(tree, dict):
        return {str(k): string_keys(v) for k, v in tree.items()}
    return tree


# ------------------------------------------------------------------------------- description

def robot_sources(spec: specs_lib.RunSpec, stats: dict) -> list[str]:
    """Sources with normalization statistics (the robot datasets), heaviest weight first."""
    weights = {s.name: s.weight for s in spec.data.sources}
    return sorted(stats, key=lambda name: (-weights.get(name, 0.0), name))


def describe(spec: specs_lib.RunSpec, ckpt_metadata: dict, source: str | None = None) -> dict[str, Any]:
    """What a policy of this run needs and a client may ask (JSON-able).

    ckpt_metadata: the checkpoint metadata {sources, stats, tokenizer_vocab_size,
    fast_token_start, ...}; source: the robot dataset whose normalization maps observations and
    actions (default: the robot source of largest weight).
    """
    stats = ckpt_metadata["stats"]
    robots = robot_sources(spec, stats)
    if not robots:
        raise ValueError("the run has no robot source with normalization statistics: nothing to "
                         "map states and actions with")
    source = robots[0] if source is None else source
    if source not in stats:
        raise ValueError(f"unknown source {source!r}; robot sources of this run: {robots}")
    m, c, data = spec.model, spec.control, spec.data
    pi05 = m.mode == "pi05"
    if pi05 and not m.flow_loss_weight and not data.fast_targets:
        raise ValueError("the model has no trained action head: flow_loss_weight is 0 and the run "
                         "had no FAST action targets")
    source_spec = data.source(source)
    dataset_spec = get_spec(source_spec.spec)
    return {
        "mode": m.mode, "cameras": list(m.cameras), "image_size": m.image_size,
        "context_frames": m.context_frames, "context_stride_s": data.window.stride_s,
        "state_dim": len(stats[source]["state"]["mean"]), "action_dim": len(stats[source]["actions"]["mean"]),
        "model_state_dim": m.state_dim, "model_action_dim": m.action_dim,
        "robot_action_dim": dataset_spec.raw_action_dim(len(stats[source]["actions"]["mean"])),
        "action_horizon": c.horizon, "control_hz": c.control_hz,
        "chunk_s": c.chunk_s, "steps_executed": c.steps_executed, "flow_steps": c.flow_steps,
        "max_text_tokens": m.max_text_tokens,
        "max_prompt_chars": MAX_PROMPT_CHARS_PER_TOKEN * m.max_text_tokens,
        "source": source, "robot_sources": robots,
        "normalization": data.normalization, "stats": stats,
        "tokenizer_vocab_size": int(ckpt_metadata["tokenizer_vocab_size"]),
        "fast_token_start": model_spec(spec, ckpt_metadata).fast_token_start,
        # π0.5 decodes a subtask first when its robot data taught one; stage 1 (no flow head)
        # reads its actions from generated FAST tokens.
        "subtask": bool(pi05 and m.text_loss_weight and dataset_spec.subtask_key),
        # How the robot's raw observations become model inputs and the chunk its actions
        # (data/transform.py): a served policy reads the robot's own layout through it.
        "robot_spec": dataset_spec.fields(),
        "fast_targets": data.fast_targets,
        "actions_from": "fast" if pi05 and not m.flow_loss_weight else "flow",
    }


def signature(layout: Layout, batch_size: int) -> dict[str, Any]:
    """The exported function's arguments and result: {"shape": [...], "dtype": str} leaves."""
    leaf = lambda shape, dtype: {"shape": [batch_size, *shape], "dtype": str(np.dtype(dtype))}
    spec = {k: leaf(*v) for k, v in layout.spec().items()}
    batch = {"images": {c: spec.pop(f"images/{c}") for c in layout.cameras}}
    batch.update({k: spec[k] for k in SAMPLE_KEYS if k != "images"})
    actions = leaf((layout.horizon, layout.action_dim), np.float32)
    return {"params": f"the {PARAMS_DIR}/ tree (Orbax), as restored", "batch": batch, "noise": actions,
                "returns": actions}


def abstract_args(sig: Any) -> Any:
    """A signature's leaves -> jax.ShapeDtypeStruct."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(tuple(x["shape"]), np.dtype(x["dtype"])), sig,
                        is_leaf=lambda x: isinstance(x, dict) and set(x) == {"shape", "dtype"})


# ------------------------------------------------------------------------------- reading a run

class _RunCheckpoints:
    """Read-only view of a training run's checkpoints: steps, metadata, one device's parameters."""

    def __init__(self, workdir: str):
        if not storage.path(workdir).is_dir():
            raise FileNotFoundError(f"workdir {workdir} does not exist")
        directory = storage.path(workdir) / "checkpoints"
        if not directory.is_dir():
            raise FileNotFoundError(f"{workdir} has no checkpoints/ directory: not a training run, "
                                    f"or it never saved")
        self._mngr = ocp.CheckpointManager(
            directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False),
            # The data-iterator item is never read; naming its handler keeps Orbax from warning.
            item_handlers={"state": ocp.PyTreeCheckpointHandler(), "metadata": ocp.JsonCheckpointHandler(),
                           "data": grain.checkpoint.CheckpointHandler()})
        self.steps = sorted(self._mngr.all_steps())
        if not self.steps:
            raise FileNotFoundError(f"{directory} holds no complete checkpoint")

    def check_step(self, step: int | None) -> int:
        if step is None:
            return self.steps[-1]
        if step not in self.steps:
            raise ValueError(f"no checkpoint at step {step}; available steps: {self.steps}")
        return step

    def metadata(self, step: int) -> dict:
        return self._mngr.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))["metadata"]

    def weights_key(self, step: int) -> str:
        """"ema" when the state holds an EMA of the parameters, else "params"."""
        tree = self._mngr.item_metadata(step)["state"]
        return "ema" if "ema" in tree.tree else "params"

    def restore(self, step: int, key: str, target: Any) -> Any:
        return restore_state_entry(self._mngr, step, key, target)

    def weights(self, step: int, target: dict) -> tuple[dict, str]:
        """(the weights to deploy onto target's structure, shapes and dtypes, weights_key).

        The EMA holds only what trained (vla/train.py; all of it in runs without frozen
        parameters): its parameters replace those of "params", which supplies the rest."""
        key = self.weights_key(step)
        if key == "params":
            return self.restore(step, "params", target), key
        saved = set(jax.tree.leaves(optimizer_lib.param_paths(self._mngr.item_metadata(step)["state"].tree["ema"])))
        averaged = jax.tree.map(lambda path: path in saved, optimizer_lib.param_paths(target))
        rest = optimizer_lib.select(target, jax.tree.map(lambda a: not a, averaged))
        weights = optimizer_lib.overlay(target, self.restore(step, "params", rest)) if rest else target
        return optimizer_lib.overlay(weights, self.restore(step, key, optimizer_lib.select(target, averaged))), key

    def close(self) -> None:
        self._mngr.close()


def data_as_run_saw_it(data: DataSpec, ckpt_metadata: dict) -> DataSpec:
    """The run's data with its root as the run saw it: the tokenizer path was stored absolute,
    so the root is found even when data.root was relative to another working directory."""
    tokenizer = ckpt_metadata["tokenizer"]
    if tokenizer.endswith(data.tokenizer):
        return dataclasses.replace(data, root=tokenizer[:-len(data.tokenizer)])
    return data


def code_version() -> str | None:
    """The git revision of this code, when it runs from a checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                             check=False, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


# ------------------------------------------------------------------------------- export

def export(workdir: str, out: str, step: int | None = None, dtype: str = "float32", batch_size: int = 1,
           overwrite: bool = False, platforms: tuple[str, ...] | None = None,
           progress: Callable[[str], None] = print) -> str:
    """Writes the bundle of `workdir`'s checkpoint at `step` (default: the newest) to `out`.

    The parameters are restored onto one device whatever mesh saved them. platforms: what the
    exported function is lowered for (default: this machine's backend), e.g. ("cpu", "cuda").
    The bundle is written next to `out` and moved into place when complete. Returns `out`.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    destination = storage.path(out)
    out = os.fspath(destination)
    if destination.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    remote = storage.is_remote(out)
    storage.check_writable(destination.parent)

    run = _RunCheckpoints(workdir)
    try:
        step = run.check_step(step)
        ckpt_metadata = run.metadata(step)
        config = ml_collections.ConfigDict(ckpt_metadata["config"])
        config.model.param_dtype = dtype
        spec = specs_lib.build(config)
        description = describe(spec, ckpt_metadata)
        model = model_spec(spec, ckpt_metadata)
        progress(f"restoring {run.weights_key(step)} of step {step} from {workdir} onto {jax.devices()[0]} "
                 f"as {dtype}")
        _, abstract = abstract_model(model)
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        params, key = run.weights(step, _restore_target(abstract, dtype, device))
    finally:
        run.close()
    if model.lora_rank:
        progress(f"merging the LoRA adapters (rank {model.lora_rank}) into their weights")
    params, model = lora.merge_lora(params, model)
    params = string_keys(params)
    graphdef, _ = abstract_model(model)
    config.model.lora_rank, config.model.lora_targets = model.lora_rank, model.lora_targets

    # Written complete beside `out`, then renamed into place; a gs:// bundle is written locally
    # and uploaded, its metadata last: a bundle without metadata.json is refused as incomplete.
    staging = tempfile.mkdtemp(prefix="bundle-") if remote else f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        progress(f"writing parameters ({sum(x.size for x in jax.tree.leaves(params)):,} in {dtype})")
        ocp.PyTreeCheckpointer().save(os.path.join(staging, PARAMS_DIR), params)
        _copy_data_files(spec.data, ckpt_metadata, description, staging)
        platforms = tuple(platforms or (jax.default_backend(),))
        progress(f"exporting the action sampler for {', '.join(platforms)} at batch size {batch_size}")
        sig = signature(spec.data.layout, batch_size)
        sampler = jax.jit(action_sampler(graphdef, spec.control.flow_steps))
        exported = jax.export.export(sampler, platforms=platforms)(
            jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params),
            abstract_args(sig["batch"]), abstract_args(sig["noise"]))
        with open(os.path.join(staging, EXPORT_FILE), "wb") as f:
            f.write(exported.serialize())
        with open(os.path.join(staging, CONFIG_FILE), "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))
        metadata = dict(
            description, step=step, workdir=os.fspath(storage.path(workdir)), weights=key, dtype=dtype,
            compute_dtype=spec.model.compute_dtype, code_version=code_version(),
            sources=list(ckpt_metadata["sources"]),
            mixture={s.name: s.weight for s in spec.data.sources},
            batch_size=batch_size, platforms=list(platforms), signature=sig)
        with open(os.path.join(staging, METADATA_FILE), "w") as f:
            json.dump(metadata, f, indent=1)
        if destination.exists():
            destination.rmtree()
        if remote:
            for name in sorted(os.listdir(staging), key=lambda n: n == METADATA_FILE):
                storage.copy_tree(os.path.join(staging, name), destination / name)
            shutil.rmtree(staging)
        else:
            os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    progress(f"bundle written to {out}")
    return out


def _restore_target(abstract: dict, dtype: str, device: jax.sharding.Sharding) -> dict:
    """What the bundle's weights are read as: `dtype` on one device, LoRA adapters in fp32 (the
    merge computes W + s A B in fp32 and casts it to W's dtype)."""
    return {key: _restore_target(value, dtype, device) if isinstance(value, dict) else
            jax.ShapeDtypeStruct(value.shape, jnp.float32 if lora.is_adapter(str(key)) else jnp.dtype(dtype),
                                 sharding=device)
            for key, value in abstract.items()}


def _copy_data_files(data: DataSpec, ckpt_metadata: dict, description: dict, out: str) -> None:
    """The tokenizer model and, for FAST-trained runs, every robot source's FAST tokenizer."""
    shutil.copyfile(ckpt_metadata["tokenizer"], os.path.join(out, TOKENIZER_FILE))
    if not description["fast_targets"]:
        return
    data = data_as_run_saw_it(data, ckpt_metadata)
    h, hz = description["action_horizon"], description["control_hz"]
    for name in description["robot_sources"]:
        fit = fast_targets.fit_dir(data.dataset_dir(data.source(name)), h, hz)
        if not os.path.isfile(os.path.join(fit, fast_targets.META_FILE)):
            raise FileNotFoundError(f"source {name!r}: the run trained on FAST targets but {fit} "
                                    f"holds no FAST tokenizer")
        shutil.copytree(fit, fast_targets.fit_dir(os.path.join(out, DATASETS_DIR, name), h, hz))


# ------------------------------------------------------------------------------- reading a bundle

def read_json(bundle: str, name: str) -> dict:
    path = storage.path(bundle) / name
    if not path.is_file():
        raise FileNotFoundError(f"{bundle} is not a bundle: it has no {name}")
    return json.loads(path.read_text())


def read_config(bundle: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(read_json(bundle, CONFIG_FILE))


def read_params(bundle: str, device: jax.Device | None = None) -> Params:
    """The bundle's parameters on one device (default: the first), as the exported function takes them."""
    path = storage.path(bundle) / PARAMS_DIR
    if not path.is_dir():
        raise FileNotFoundError(f"{bundle} is not a bundle: it has no {PARAMS_DIR}/")
    checkpointer = ocp.PyTreeCheckpointer()
    sharding = jax.sharding.SingleDeviceSharding(device or jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                          checkpointer.metadata(path).item_metadata.tree)
    return checkpointer.restore(path, args=ocp.args.PyTreeRestore(
        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)))


def read_exported(bundle: str) -> jax.export.Exported:
    path = storage.path(bundle) / EXPORT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{bundle} is not a bundle: it has no {EXPORT_FILE}")
    return jax.export.deserialize(bytearray(path.read_bytes()))
