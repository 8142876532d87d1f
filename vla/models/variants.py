"""Named model sizes: the model-size knob.

ViT names follow big_vision ("So400m/14": width/depth/MLP/heads of SigLIP So400m, patch 14).
Gemma names follow openpi (gemma_2b = the PaliGemma LLM, gemma_300m = π0's action expert).
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


def vit_variant(name: str) -> ViTVariant:
    """"So400m/14", "B/16", "S/16", "mu/8", "tiny/8": any known shape with any patch size."""
    shape, _, patch = name.partition("/")
    if shape not in _VIT_SHAPES or not patch.isdigit():
        raise ValueError(f"unknown ViT variant {name!r}; expected '<{'|'.join(_VIT_SHAPES)}>/<patch>'")
    return ViTVariant(*_VIT_SHAPES[shape], patch=int(patch))


def gemma_variant(name: str) -> GemmaVariant:
    if name not in GEMMA_VARIANTS:
        raise ValueError(f"unknown Gemma variant {name!r}; choose from {sorted(GEMMA_VARIANTS)}")
    return GEMMA_VARIANTS[name]
