"""The typed specs of a run, built once from its config: what every layer below reads instead.

    spec = specs.build(config)   # a configs/*.py ConfigDict, or a run's config.json read back
    spec.model       vla.models.vla.VLAConfig   the model, with the knobs it depends on
    spec.data        data.spec.DataSpec          sources, window, example layout, batch, readers
    spec.optimizer   vla.optimizer.OptimizerSpec
    spec.mesh        vla.sharding.MeshSpec       axis sizes and the logical-axis rules
    spec.train       TrainSpec                   steps, intervals, checkpoints, evaluation
    spec.control     ControlSpec                 inference: rate, chunk, steps executed, flow steps
    spec.sim_eval    SimEvalSpec                 closed-loop Meta-World evaluation in training
    spec.generation  data.spec.GenerationSpec    what tools.generate plays and renders
    spec.metrics     vla.metrics.MetricsSpec     where metrics go besides the workdir (W&B)

The config contract (the keys) is configs/base.py; this is its one reader, so a key is read in
one place and a derived value (the action horizon) has one definition. `validate_training`
refuses knob combinations a run cannot train with, before any data is opened or code compiled.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import ml_collections

from data.layout import Layout
from data.spec import AugmentSpec, DataSpec, FastSpec, GenerationSpec, SourceSpec
from data.windows import WindowSpec
from vla.metrics import MetricsSpec
from vla.models.vla import VLAConfig
from vla.optimizer import OptimizerSpec
from vla.sharding import MeshSpec
from vla.weights.load import InitSource

SOURCE_KEYS = ("kind", "format", "path", "weight", "spec", "data_dir", "fields", "stats", "eval_split")


def action_horizon(chunk_s: float, control_hz: float) -> int:
    """Action chunk length in steps at the control rate (at least one)."""
    return max(1, round(chunk_s * control_hz))


@dataclasses.dataclass(frozen=True)
class _ControlKnobs:
    control_hz: float  # the robot's control rate
    chunk_s: float  # seconds of actions per chunk
    steps_executed: int  # actions executed per inference
    flow_steps: int  # Euler steps of the flow sampler


@dataclasses.dataclass(frozen=True)
class ControlSpec(_ControlKnobs):
    """The control-frequency knob as inference uses it."""

    horizon: int  # action_horizon(chunk_s, control_hz)


@dataclasses.dataclass(frozen=True)
class _ModelKnobs:
    """The knobs the model is built from (VLAConfig's fields of the same names)."""

    vit: str
    vlm: str
    action_expert: str
    context_frames: int
    past_frame_tokens: int
    max_text_tokens: int


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    """The trainer's own settings (configs/base.py documents each)."""

    seed: int
    batch_size: int  # global
    total_steps: int
    log_every: int
    checkpoint_every: int
    eval_every: int
    keep_checkpoints: int
    eval_batches: int
    chip: str
    init: tuple[InitSource, ...]  # weight sources of a new run, applied in order


@dataclasses.dataclass(frozen=True)
class SimEvalSpec:
    """Closed-loop Meta-World evaluation during training (vla/sim_eval.py); off without tasks."""

    tasks: tuple[str, ...]
    episodes: int
    seed: int
    every: int
    max_steps: int
    gif_episodes: int
    mode: str
    inference_delay: int
    # tools.benchmark's final evaluation of the exported bundle (episodes per task and seed).
    final_episodes: int = 30
    final_seeds: tuple[int, ...] = (1, 2)
    failure_gifs: int = 2


@dataclasses.dataclass(frozen=True)
class RunSpec:
    model: VLAConfig
    data: DataSpec
    optimizer: OptimizerSpec
    mesh: MeshSpec
    train: TrainSpec
    control: ControlSpec
    sim_eval: SimEvalSpec
    generation: GenerationSpec
    metrics: MetricsSpec


def _typed(cls: type, section: ml_collections.ConfigDict, where: str, **derived: Any) -> Any:
    """cls built from the keys of a config section (`where`: its dotted name, "" for the top
    level) named like its fields, plus the derived fields. Lists (a config.json read back gives
    them for tuples) become tuples. A key left at its placeholder (None) is an error unless the
    field itself defaults to None."""
    values = dict(derived)
    for field in dataclasses.fields(cls):
        if field.name in derived or field.name not in section:
            continue
        value = section[field.name]
        if value is None and field.default is not None:
            key = f"{where}.{field.name}" if where else field.name
            raise ValueError(f"config key {key} is not set (a placeholder in configs/base.py): set "
                             f"it in the config file or with --config.{key}=...")
        values[field.name] = tuple(value) if isinstance(value, list) else value
    return cls(**values)


def _source(name: str, entry: Mapping[str, Any]) -> SourceSpec:
    entry = dict(entry)
    unknown = sorted(set(entry) - set(SOURCE_KEYS))
    if unknown:
        raise ValueError(f"config.data.sources.{name}: unknown keys {unknown}; a source has "
                         f"{list(SOURCE_KEYS)}")
    missing = [k for k in ("kind", "path", "weight") if k not in entry]
    if missing:
        raise ValueError(f"config.data.sources.{name} = {entry}: missing {missing}")
    spec, fields = entry.get("spec"), entry.get("fields")
    return SourceSpec(name=name, kind=str(entry["kind"]), path=str(entry["path"]),
                      weight=float(entry["weight"]),
                      spec=spec if spec is None or isinstance(spec, str) else dict(spec),
                      data_dir=entry.get("data_dir") or None,
                      fields=None if fields is None else dict(fields),
                      stats=entry.get("stats") or None, format=entry.get("format") or None,
                      eval_split=entry.get("eval_split") or None)


def validate_training(spec: RunSpec) -> None:
    """Knob combinations a run cannot train with (the trainer checks before opening any data;
    the cost model still reports on them, e.g. a chunk shorter than the steps executed)."""
    train, control, optimizer = spec.train, spec.control, spec.optimizer
    if control.horizon < control.steps_executed:
        raise ValueError(f"knobs: a chunk of {control.chunk_s} s at {control.control_hz} Hz is "
                         f"{control.horizon} steps, fewer than steps_executed="
                         f"{control.steps_executed}")
    accum = optimizer.grad_accum_steps
    if accum < 1 or train.batch_size % accum:
        raise ValueError(f"batch_size {train.batch_size} does not split into "
                         f"optimizer.grad_accum_steps={accum} microbatches")
    if train.total_steps < 1:
        raise ValueError(f"total_steps must be positive, got {train.total_steps}")
    for key in ("log_every", "checkpoint_every", "eval_every"):
        if getattr(train, key) < 1:
            raise ValueError(f"{key} must be >= 1, got {getattr(train, key)}")


def build(config: ml_collections.ConfigDict) -> RunSpec:
    """Every spec of a run config; raises ValueError naming the key for an unset placeholder, a
    malformed source or a model that cannot be built (VLAConfig's checks). The model, optimizer,
    trainer, control and sim_eval specs take the keys named like their fields."""
    k, d = config.knobs, config.data
    control_knobs = _typed(_ControlKnobs, k, "knobs")
    horizon = action_horizon(control_knobs.chunk_s, control_knobs.control_hz)
    control = ControlSpec(**dataclasses.asdict(control_knobs), horizon=horizon)
    # The model reads its section and the knobs it depends on (sizes, context).
    model = _typed(VLAConfig, config.model, "model",
                   **dataclasses.asdict(_typed(_ModelKnobs, k, "knobs")), action_horizon=horizon)
    train = _typed(TrainSpec, config, "", init=tuple(
        InitSource.from_config(entry, f"config.init[{i}]") for i, entry in enumerate(config.get("init", ()))))
    optimizer = _typed(OptimizerSpec, config.optimizer, "optimizer", total_steps=train.total_steps)
    window = WindowSpec(frames=model.context_frames, stride_s=k.context_stride_s,
                        control_hz=control.control_hz, horizon=horizon, cameras=model.cameras)
    layout = Layout(cameras=model.cameras, frames=model.context_frames, image_size=model.image_size,
                    max_len=model.max_text_tokens, state_dim=model.state_dim,
                    action_dim=model.action_dim, horizon=horizon, pi05=model.mode == "pi05")
    data = DataSpec(
        root=d.root, sources=tuple(_source(name, d.sources[name]) for name in sorted(d.sources)),
        window=window, layout=layout, tokenizer=d.tokenizer, normalization=d.normalization,
        fast=FastSpec(enabled=d.fast_targets, vocab_size=d.fast_vocab_size, scale=d.fast_scale,
                      fit_chunks=d.fast_fit_chunks),
        seed=train.seed, batch_size=train.batch_size, workers=d.workers, prefetch=d.prefetch,
        strict=d.strict,
        # A run configured before this key existed used our own prompts.
        prompt_format=d.get("prompt_format", "vla"), eval_split=d.get("eval_split", "heldout"),
        # A run configured before this section existed trained without augmentation.
        augment=_typed(AugmentSpec, d.get("augment", {}), "data.augment"))
    generation = GenerationSpec(
        tasks=tuple(d.tasks), episodes_per_task=d.episodes_per_task,
        heldout_episodes_per_task=d.heldout_episodes_per_task, cameras=tuple(d.render_cameras),
        image_size=model.image_size, tokenizer_vocab_size=d.tokenizer_vocab_size, seed=train.seed)
    mesh = MeshSpec(axes=dict(config.mesh),
                    rules=tuple((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes)
                                for name, axes in config.sharding_rules))
    return RunSpec(model=model, data=data, optimizer=optimizer, mesh=mesh, train=train,
                   control=control, sim_eval=_typed(SimEvalSpec, config.sim_eval, "sim_eval"),
                   generation=generation,
                   # A run configured before this section existed has none: its defaults (no W&B).
                   metrics=_typed(MetricsSpec, config.get("metrics", {}), "metrics"))
