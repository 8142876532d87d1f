"""Model sizes: the model-size knob, as named variants or any custom shape.

ViT names follow big_vision ("So400m/14": width/depth/MLP/heads of SigLIP So400m, patch 14).
Gemma names follow openpi (gemma_2b = the PaliGemma LLM, gemma_300m = π0's action expert).

A variant string may change fields of a named one, or give every field itself, so a checkpoint of
any shape has a config (knobs.vit, knobs.vlm, knobs.action_expert stay plain strings: they
sweep, override on the command line and round-trip through config.json):

    "So400m/14"                                            a named ViT
    "mu/14,depth=2,mlp_dim=128"                            a named ViT with two fields changed
    "width=32,depth=2,mlp_dim=128,num_heads=2,patch=14"    a ViT of its own
    "gemma_2b,depth=6"                                     a shallower PaliGemma LLM
    "width=64,depth=4,mlp_dim=128,num_heads=8,num_kv_heads=1,head_dim=16"
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ViTVariant:
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    patch: int


@dataclasses.dataclass(frozen=True)
class GemmaVariant:
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


_VIT_SHAPES = {  # name -> (width, depth, mlp_dim, heads)
    "So400m": (1152, 27, 4304, 16),
    "B": (768, 12, 3072, 12),
    "S": (384, 12, 1536, 6),
    "mu": (128, 2, 256, 2),  # a small but real ViT for CPU demos
    "tiny": (32, 2, 64, 2),  # tests
}

GEMMA_VARIANTS = {
    "gemma_2b": GemmaVariant(2048, 18, 16_384, 8, 1, 256),
    "gemma_300m": GemmaVariant(1024, 18, 4096, 8, 1, 256),
    # openpi's "dummy" shapes (64-wide Gemmas), used by the CPU benchmark at debug shapes.
    "gemma_debug": GemmaVariant(64, 4, 128, 8, 1, 16),
    "gemma_debug_expert": GemmaVariant(64, 4, 128, 8, 1, 16),
    # Demo / tests: the action expert is narrower but shares depth, heads and head_dim.
    "gemma_small": GemmaVariant(128, 4, 512, 4, 1, 32),
    "gemma_small_expert": GemmaVariant(64, 4, 256, 4, 1, 32),
    "gemma_tiny": GemmaVariant(64, 2, 128, 4, 1, 16),
    "gemma_tiny_expert": GemmaVariant(32, 2, 64, 4, 1, 16),
    "gemma_tiny_gqa": GemmaVariant(64, 2, 128, 4, 2, 16),
    "gemma_tiny_gqa_expert": GemmaVariant(32, 2, 64, 4, 2, 16),
}


def vit_variant(spec: str) -> ViTVariant:
    """"So400m/14", "B/16", "S/16", "mu/8", "tiny/8" (any known shape with any patch size), with
    optional ",field=value" changes, or every field given as "field=value,..."."""
    def named(name: str) -> ViTVariant:
        shape, _, patch = name.partition("/")
        if shape not in _VIT_SHAPES or not patch.isdigit():
            raise ValueError(f"unknown ViT variant {spec!r}; expected '<{'|'.join(_VIT_SHAPES)}>/<patch>' "
                             f"or {_all_fields(ViTVariant)}")
        return ViTVariant(*_VIT_SHAPES[shape], patch=int(patch))

    return _parse(spec, ViTVariant, named)


def gemma_variant(spec: str) -> GemmaVariant:
    """A GEMMA_VARIANTS name with optional ",field=value" changes, or every field given."""
    def named(name: str) -> GemmaVariant:
        if name not in GEMMA_VARIANTS:
            raise ValueError(f"unknown Gemma variant {spec!r}; choose from {sorted(GEMMA_VARIANTS)} "
                             f"or give {_all_fields(GemmaVariant)}")
        return GEMMA_VARIANTS[name]

    return _parse(spec, GemmaVariant, named)


def describe(variant: ViTVariant | GemmaVariant) -> str:
    """The variant string that gives every field: vit_variant / gemma_variant read it back."""
    return ",".join(f"{f.name}={getattr(variant, f.name)}" for f in dataclasses.fields(variant))


def _all_fields(cls: type) -> str:
    return "'" + ",".join(f"{f.name}=N" for f in dataclasses.fields(cls)) + "'"


def _parse(spec: str, cls: type, named):
    head, *changes = [part.strip() for part in str(spec).split(",")]
    if "=" in head:  # no name: every field given
        changes, base = [head, *changes], None
    else:
        base = named(head)
    values, fields = {}, [f.name for f in dataclasses.fields(cls)]
    for change in changes:
        key, eq, value = change.partition("=")
        if not eq or key not in fields or not value.isdigit() or int(value) < 1:
            raise ValueError(f"{cls.__name__} {spec!r}: {change!r} is not field=positive integer "
                             f"with a field of {fields}")
        if key in values:
            raise ValueError(f"{cls.__name__} {spec!r}: {key} is given twice")
        values[key] = int(value)
    if base is not None:
        return dataclasses.replace(base, **values)
    missing = [f for f in fields if f not in values]
    if missing:
        raise ValueError(f"{cls.__name__} {spec!r} names no variant, so it must give every field; "
                         f"missing {missing}")
    return cls(**values)
