"""Weight sources applied to an already sharded model: config.init, tools.import_weights.

A run starts from its sharded random init; each entry of config.init then overwrites the
parameters its checkpoint has, in order (a later entry wins):

    config.init = (dict(format="openpi", path="gs://bucket/pi05_base/params"),)
    config.init = (dict(format="big_vision", path="pt_224.npz", vocab="pad"),
                   dict(format="vla", path="runs/stage1", step=20000, exclude=("action_out_proj/.*",)))

    format   big_vision (PaliGemma .npz) | hf (transformers safetensors, a file or directory) |
             openpi (an openpi checkpoint's params/ directory) | vla (a run's workdir, its newest
             checkpoint or `step`; or a tools.import_weights output directory)
    vocab    exact (default): the embedding must have the model's rows; truncate: keep the first
             vocab_size rows of a larger one; pad: a smaller one fills the first rows, the rest
             keep their initialization
    exclude  regexes (re.search) over our parameter paths that keep their initialization

Every entry is planned before any is applied: its file's tensor list is matched against the
model's parameters (names, shapes, dtypes) and all problems are raised as one WeightImportError
naming each parameter with both shapes. The plan's report says what is imported, kept as
initialized and ignored. Then tensors are applied one at a time: read to the host, converted,
placed with the target parameter's sharding (each device takes its slice), dropped, so peak host
memory is about the largest tensor (twice it while a cast copies it), not the model.
"""
from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from data import storage
from vla.checkpoint import Checkpointer
from vla.models import lora
from vla.models.vla import VLAConfig
from vla.weights import files
from vla.weights import rules as rules_lib
from vla.weights.files import TensorFile
from vla.weights.rules import EMBEDDING, FORMATS, HF_TIED_HEAD, Rule

VOCAB_MODES = ("exact", "truncate", "pad")
SOURCE_KEYS = ("format", "path", "step", "vocab", "exclude")
IMPORT_REPORT = "import.json"  # what tools.import_weights writes beside params/


class WeightImportError(ValueError):
    """A checkpoint does not fit the model: wrong shapes or dtypes, missing tensors."""


@dataclasses.dataclass(frozen=True)
class InitSource:
    """One entry of config.init (see the module docstring)."""

    format: str
    path: str
    step: int | None = None
    vocab: str = "exact"
    exclude: tuple[str, ...] = ()

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"weight source {self.path!r}: format {self.format!r} is not one of {FORMATS}")
        if self.vocab not in VOCAB_MODES:
            raise ValueError(f"weight source {self.path!r}: vocab {self.vocab!r} is not one of {VOCAB_MODES}")
        if self.step is not None and self.format != "vla":
            raise ValueError(f"weight source {self.path!r}: step is for format 'vla' (a run's checkpoint)")

    @classmethod
    def from_config(cls, entry: Mapping[str, Any], where: str) -> InitSource:
        """An entry of config.init; `where` names it in errors ("config.init[0]")."""
        entry = dict(entry)
        unknown = sorted(set(entry) - set(SOURCE_KEYS))
        missing = [k for k in ("format", "path") if not entry.get(k)]
        if unknown or missing:
            raise ValueError(f"{where} = {entry}: " + "; ".join(
                [f"unknown keys {unknown}"] * bool(unknown) + [f"missing {missing}"] * bool(missing))
                + f"; an entry has {list(SOURCE_KEYS)}")
        try:
            return cls(format=str(entry["format"]), path=str(entry["path"]),
                       step=None if entry.get("step") is None else int(entry["step"]),
                       vocab=str(entry.get("vocab") or "exact"), exclude=tuple(entry.get("exclude") or ()))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e


@dataclasses.dataclass
class Plan:
    """What one source will do to the model, checked: `apply` it, or read `report()`."""

    source: InitSource
    file: TensorFile
    imports: list[Rule]  # the parameters it overwrites
    kept: list[str]  # our parameters it leaves as they are
    ignored: list[str]  # file tensors (or rows "key[n:]") it does not use
    embedding_rows: int | None  # the file's vocabulary rows, when they differ from the model's
    names: dict[str, str]  # the names rules use -> the file's keys
    step: int | None = None  # format vla: the checkpoint step read

    def report(self) -> dict:
        specs = self.file.specs()
        return dict(
            format=self.source.format, path=self.source.path, file=self.file.path, step=self.step,
            vocab=self.source.vocab, embedding_rows=self.embedding_rows,
            imported={r.target: dict(sources=[self.names[k] for k in r.sources],
                                     dtype=str(specs[self.names[r.sources[0]]][1])) for r in self.imports},
            kept=self.kept, ignored=self.ignored)

    def summary(self) -> str:
        return (f"{self.source.format} {self.source.path}: {len(self.imports)} parameters imported, "
                f"{len(self.kept)} kept as initialized, {len(self.ignored)} file entries ignored")


def plan(source: InitSource, cfg: VLAConfig, params: Any) -> Plan:
    """Checks `source` against the model's parameters (a pure dict of arrays or
    ShapeDtypeStructs) without assigning anything; raises WeightImportError with every problem."""
    file, step = open_source(source)
    targets = _flat(params)
    shapes = {path: tuple(leaf.shape) for path, leaf in targets.items()}
    specs = file.specs()
    names = rules_lib.canonical_names(source.format, list(specs))
    by_name = {short: specs[key] for short, key in names.items()}
    excluded = [p for p in targets if any(re.search(x, p) for x in source.exclude)]
    for pattern in source.exclude:
        if not any(re.search(pattern, p) for p in targets):
            raise ValueError(f"weight source {source.path!r}: exclude pattern {pattern!r} matches no "
                             f"parameter; paths look like {sorted(targets)[:3]}")
    wanted = [r for r in rules_lib.rules(source.format, cfg, shapes) if r.target not in excluded]
    # Our layout names every parameter, also adapters a source (a run without LoRA) lacks.
    if source.format == "vla":
        wanted = [r for r in wanted if r.sources[0] in names or not lora.is_adapter(r.target)]
    ignored = []
    if source.format == "hf" and HF_TIED_HEAD in names:
        ignored.append(names[HF_TIED_HEAD])  # checked to equal the embedding when applied

    problems, embedding_rows = [], None
    if source.format == "vla":
        orphans = sorted(k for k in names if lora.is_adapter(k) and k not in shapes)
        if orphans:  # silently ignored, they would drop what the source run learned
            problems.append(f"{len(orphans)} LoRA adapters (e.g. {orphans[0]}) have no place in this model: "
                            "give this run the source run's model.lora_* settings to keep training them "
                            "(a run's checkpoints keep adapters apart; only tools.export merges them)")
    for rule in wanted:
        if rule.target not in shapes:
            problems.append(f"{rule.target}: the rules name a parameter the model lacks")
            continue
        for key in rule.sources:
            if key not in by_name:
                problems.append(f"{rule.target}: {key} is not in the file")
                continue
            shape, dtype = by_name[key]
            expected = rule.shape
            if rule.target == EMBEDDING and shape[1:] == expected[1:] and shape[0] != expected[0]:
                problem = _vocab_problem(source.vocab, shape[0], expected[0])
                if problem:
                    problems.append(f"{rule.target}: {names[key]} has {shape[0]} rows, the model "
                                    f"vocab_size={expected[0]} ({problem})")
                    continue
                embedding_rows = shape[0]
                if shape[0] > expected[0]:
                    ignored.append(f"{names[key]}[{expected[0]}:]")
            elif shape != expected:
                problems.append(f"{rule.target}: {names[key]} has shape {shape}, the model needs {expected}")
            if not jnp.issubdtype(dtype, jnp.floating):
                problems.append(f"{rule.target}: {names[key]} has dtype {dtype}, the model's is "
                                f"{targets[rule.target].dtype} (floating point weights only)")
    if problems:
        shown = "\n  ".join(problems[:40]) + (f"\n  ... and {len(problems) - 40} more" if len(problems) > 40 else "")
        raise WeightImportError(f"{source.format} checkpoint {file.path} does not fit the model "
                                f"(vit={cfg.vit!r}, vlm={cfg.vlm!r}, action_expert={cfg.action_expert!r}, "
                                f"vocab_size={cfg.vocab_size}); nothing was assigned:\n  {shown}")
    used = {key for rule in wanted for key in rule.sources}
    ignored += sorted(names[k] for k in names.keys() - used if names[k] not in ignored)
    imported = {r.target for r in wanted}
    return Plan(source, file, wanted, sorted(p for p in targets if p not in imported), ignored,
                embedding_rows, names, step)


def apply(p: Plan, params: Any) -> Any:
    """The parameters with the plan's tensors written in, one at a time, each onto its
    target's sharding and dtype. `params` is consumed like a donated argument: each array it
    replaces is deleted once its successor exists, so the model is never held twice."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    index = {_name(path): i for i, (path, _) in enumerate(leaves)}
    arrays = [leaf for _, leaf in leaves]
    names = p.names
    for rule in p.imports:
        i = index[rule.target]
        value = rule.convert([p.file.read(names[k]) for k in rule.sources])
        if rule.target == EMBEDDING:
            if p.source.format == "hf" and HF_TIED_HEAD in names:
                _check_tied_head(p.file.read(names[HF_TIED_HEAD]), value, names[HF_TIED_HEAD])
            value = value[:arrays[i].shape[0]]
        arrays[i] = _place(value, arrays[i])
        del value
    return jax.tree_util.tree_unflatten(treedef, arrays)


def init_params(sources: Sequence[InitSource], cfg: VLAConfig, params: Any) -> tuple[Any, list[dict]]:
    """Every source planned (all problems raised before anything is assigned), then applied in
    order. `params` is consumed (see `apply`). Returns the new parameters and each plan's report."""
    plans = [plan(s, cfg, params) for s in sources]
    for p in plans:
        logging.info("init: %s", p.summary())
        params = apply(p, params)
    return params, [p.report() for p in plans]


def check_prompt_format(sources: Sequence[InitSource], prompt_format: str) -> None:
    """An openpi checkpoint was trained on openpi's prompts and token ids: it (or a
    tools.import_weights output of one) needs config.data.prompt_format="openpi"."""
    for source in sources:
        origin = source.format
        if source.format == "vla" and (storage.path(source.path) / IMPORT_REPORT).exists():
            origin = json.loads((storage.path(source.path) / IMPORT_REPORT).read_text()).get("format", origin)
        if origin == "openpi" and prompt_format != "openpi":
            raise ValueError(f"weight source {source.path!r} is an openpi checkpoint, trained on openpi's "
                             f"prompts: set config.data.prompt_format='openpi' (it is {prompt_format!r})")


def open_source(source: InitSource) -> tuple[TensorFile, int | None]:
    """The tensor file a source names (and, for a run, the checkpoint step read)."""
    if source.format == "big_vision":
        return files.Npz(source.path), None
    if source.format == "hf":
        return files.Safetensors(source.path), None
    if source.format == "openpi":
        return files.OrbaxTree(source.path, "params"), None
    root = storage.path(source.path)
    if (root / "checkpoints").is_dir():
        ckpt = Checkpointer(storage.join(source.path, "checkpoints"), keep=1)
        steps = ckpt.all_steps()
        ckpt.close()
        step = source.step if source.step is not None else (max(steps) if steps else None)
        if step is None or step not in steps:
            found = f"no checkpoint of step {step}; it has {steps}" if steps else "has no checkpoint"
            raise FileNotFoundError(f"weight source {source.path!r}: {found}")
        return files.OrbaxTree(storage.join(source.path, "checkpoints", str(step), "state"), "params"), step
    if (root / "params").is_dir():
        if source.step is not None:
            raise ValueError(f"weight source {source.path!r} is a tools.import_weights output; it has no steps")
        return files.OrbaxTree(storage.join(source.path, "params"), "params"), None
    raise FileNotFoundError(f"weight source {source.path!r} (format vla) is neither a run's workdir "
                            "(no checkpoints/) nor a tools.import_weights output (no params/)")


def _vocab_problem(mode: str, rows: int, vocab: int) -> str:
    """Why a file's embedding rows cannot serve the model's vocab_size under `mode` ("" if they can)."""
    if mode == "truncate" and rows > vocab or mode == "pad" and rows < vocab:
        return ""
    if mode == "exact":
        return (f"set vocab='truncate' in this config.init entry to keep the first {vocab} rows" if rows > vocab
                else f"set vocab='pad' to keep rows {rows}..{vocab - 1} as initialized")
    return f"vocab={mode!r} needs {'more' if mode == 'truncate' else 'fewer'} rows than the model has"


def _check_tied_head(head: np.ndarray, embedding: np.ndarray, key: str) -> None:
    if head.shape != embedding.shape or not np.array_equal(head, embedding):
        raise WeightImportError(f"{key} differs from the input embedding; the VLA ties its output head "
                                "to the embedder and cannot hold a separate one")


def _place(value: np.ndarray, current: jax.Array) -> jax.Array:
    """`value` (its first rows, when shorter: the rest stay as in `current`) as an array with
    current's shape, dtype and sharding; `current` is deleted. Every process passes the whole
    value; each device takes its slice, cast to the parameter's dtype slice by slice, so no
    full-size cast copy exists beside the file's tensor."""
    shape, sharding, dtype = current.shape, current.sharding, current.dtype
    rows = value.shape[0]
    if value.shape == shape:
        current.delete()  # before its successor exists: the parameter is never held twice
        return jax.make_array_from_callback(shape, sharding, lambda index: value[index].astype(dtype))
    shards = {_index_key(s.index, shape): s.data for s in current.addressable_shards}

    def shard(index):
        out = np.array(shards[_index_key(index, shape)])
        start, stop, _ = index[0].indices(shape[0])
        if start < rows:
            out[:min(stop, rows) - start] = value[(slice(start, min(stop, rows)), *index[1:])]
        return out

    placed = jax.make_array_from_callback(shape, sharding, shard)
    current.delete()
    return placed


def _index_key(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple:
    return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


def _name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _flat(tree: Any) -> dict[str, Any]:
    return {_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
