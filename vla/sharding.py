"""Meshes, the logical-axis rules table, sharded initialization and activation constraints.

Every parameter carries logical axis names (embed, mlp, heads, ...). A rules table maps each
logical name to mesh axes (data, fsdp, tensor). The same table places activations at block
boundaries through `constrain`, which does nothing when no mesh is active, and says how a batch
is split (its "batch" entry: `batch_axes`, `batch_sharding`). DEFAULT_RULES is the table every
config starts from (config.sharding_rules).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from flax import nnx
from flax.core import spmd as core_spmd
from jax.experimental import mesh_utils
from jax.sharding import NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
# Multislice: how many slices (TPU slices joined over the data-center network) each axis spans.
DCN_AXES = tuple(f"dcn_{name}" for name in MESH_AXES)
Rules = Sequence[tuple[str, str | Sequence[str] | None]]

# Logical axis -> mesh axes. Activations: batch over (data, fsdp); parameters: FSDP on embed,
# tensor parallelism on heads/mlp/vocab.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("act_seq", None),
    ("act_embed", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", None),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("pos", None),
    ("norm", None),
    ("lora_rank", None),  # LoRA adapters' rank (vla/models/lora.py): a few dims, never split
)


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    """A run's mesh: axis sizes (`mesh_shape`'s axis_sizes) and the logical-axis rules."""

    axes: Mapping[str, int]
    rules: tuple[tuple[str, str | tuple[str, ...] | None], ...]

    @property
    def batch_axes(self) -> tuple[str, ...]:
        return batch_axes(self.rules)


def batch_axes(rules: Rules) -> tuple[str, ...]:
    """The mesh axes a batch's leading dimension is split over: the rules' "batch" entry."""
    axes = logical_to_spec(("batch",), rules)[0]
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def batch_sharding(mesh: jax.sharding.Mesh, rules: Rules) -> NamedSharding:
    """The sharding of a global batch's arrays: leading dimension over `batch_axes`."""
    return NamedSharding(mesh, PartitionSpec(batch_axes(rules)))


def batch_shards(mesh: jax.sharding.Mesh, rules: Rules) -> int:
    """How many ways a batch is split on this mesh."""
    return math.prod(mesh.shape[a] for a in batch_axes(rules))


def mesh_shape(axis_sizes: Mapping[str, int], num_devices: int) -> tuple[list[int], list[int]]:
    """(per-slice sizes, slice counts) of the (data, fsdp, tensor) axes for `num_devices` devices.

    `axis_sizes` names any of MESH_AXES (sizes within a slice; one may be -1 to fill the slice)
    and DCN_AXES (how many slices each axis spans, default 1; their product is the slice count).
    """
    unknown = set(axis_sizes) - set(MESH_AXES) - set(DCN_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; expected a subset of {MESH_AXES + DCN_AXES}")
    sizes = [int(axis_sizes.get(name, 1)) for name in MESH_AXES]
    dcn = [int(axis_sizes.get(name, 1)) for name in DCN_AXES]
    if min(dcn) < 1:
        raise ValueError(f"mesh {DCN_AXES} must be >= 1 (no -1), got {dict(zip(DCN_AXES, dcn))}")
    slices = math.prod(dcn)
    if num_devices % slices:
        raise ValueError(f"{num_devices} devices do not split into {slices} slices ({dict(zip(DCN_AXES, dcn))})")
    per_slice = num_devices // slices
    shown = dict(zip(MESH_AXES, sizes)) | ({} if slices == 1 else {"slices": slices})
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {shown}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if per_slice % known:
            raise ValueError(f"{num_devices} devices do not divide into mesh {shown}")
        sizes[sizes.index(-1)] = per_slice // known
    if math.prod(sizes) != per_slice:
        raise ValueError(f"mesh {shown} needs {math.prod(sizes) * slices} devices, have {num_devices}")
    return sizes, dcn


def make_mesh(axis_sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """Builds a (data, fsdp, tensor) mesh from `mesh_shape`'s sizes.

    Each axis has size (per-slice size x slices). Across slices the devices are grouped by
    their TPU slice, or by process where devices carry no slice index (GPU nodes, CPU
    processes), so that only the dcn_* axes cross the slow network. Axes are Auto so XLA
    propagates shardings from parameters and constraints.
    """
    devices = list(devices if devices is not None else jax.devices())
    sizes, dcn = mesh_shape(axis_sizes, len(devices))
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if math.prod(dcn) == 1:
        return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=axis_types, devices=devices)
    by_slice = len({getattr(d, "slice_index", 0) for d in devices}) > 1
    groups = len({d.slice_index if by_slice else d.process_index for d in devices})
    if groups != math.prod(dcn):
        raise ValueError(f"mesh {dict(zip(DCN_AXES, dcn))} spans {math.prod(dcn)} slices, but the devices "
                         f"form {groups} {'slices' if by_slice else 'processes'}")
    grid = mesh_utils.create_hybrid_device_mesh(sizes, dcn, devices, process_is_granule=not by_slice)
    return jax.sharding.Mesh(grid, MESH_AXES, axis_types=axis_types)


def logical_to_spec(names: Sequence[str | None], rules: Rules | None = None) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec with the given (or active) rules."""
    rules = core_spmd.get_logical_axis_rules() if rules is None else rules
    return PartitionSpec(*core_spmd.from_sharding_rules(tuple(names), rules))


def _fit_spec_to_shape(spec: PartitionSpec, shape: Sequence[int], mesh) -> PartitionSpec:
    """Drops mesh axes that do not divide a dimension (e.g. batch 1 at inference on 8 devices)."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            fitted.append(None)
            continue
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        kept, size = [], 1
        for axis in axes:
            if dim % (size * mesh.shape[axis]) == 0:
                kept.append(axis)
                size *= mesh.shape[axis]
        fitted.append(tuple(kept) if kept else None)
    return PartitionSpec(*fitted)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint from logical names; a no-op without an active mesh or rules."""
    mesh = jax.sharding.get_abstract_mesh()
    rules = core_spmd.get_logical_axis_rules()
    if mesh.empty or not rules:
        return x
    spec = _fit_spec_to_shape(logical_to_spec(names, rules), x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, spec)


def abstract_model(make_model: Callable[[], nnx.Module], mesh, rules: Rules):
    """Shapes and shardings of a model without allocating it: (graphdef, abstract state, shardings)."""
    with nnx.use_eager_sharding(False), nnx.logical_axis_rules(rules), jax.set_mesh(mesh):
        graphdef, abstract_state = nnx.split(nnx.eval_shape(make_model))
        specs = nnx.get_partition_spec(abstract_state)
    shardings = jax.tree.map(lambda spec, leaf: NamedSharding(mesh, _fit_spec_to_shape(spec, leaf.shape, mesh)),
                             specs, abstract_state)
    return graphdef, abstract_state, shardings


def init_sharded(make_model: Callable[[], nnx.Module], mesh, rules: Rules) -> nnx.Module:
    """Initializes parameters directly sharded: jit with output shardings, no full copy anywhere."""
    graphdef, _, shardings = abstract_model(make_model, mesh, rules)

    def init_state():
        with nnx.use_eager_sharding(False):
            return nnx.split(make_model())[1]

    with jax.set_mesh(mesh):
        state = jax.jit(init_state, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def global_batch(local: Mapping[str, Any], sharding: NamedSharding) -> dict[str, Any]:
    """This process's rows of a batch -> global arrays with `batch_sharding`'s layout, in process
    order (build the sharding once; this runs every step)."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local)
