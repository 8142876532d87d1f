"""SigLIP-style vision encoder: conv patch embedding, learned position embedding, pre-LN
transformer blocks (scanned), final LayerNorm, no pooling, linear projection to the LLM width.

Parameter layout follows big_vision's ViT (so PaliGemma weights import 1:1), with the blocks
stacked along a leading "layers" axis.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vla.models import layers as L
from vla.models.variants import ViTVariant


class SigLIP(nnx.Module):
    """images uint8/float [B, H, W, 3] -> tokens [B, (H/p)*(W/p), out_dim]."""

    def __init__(self, variant: ViTVariant, image_size: int, out_dim: int, *, rngs: nnx.Rngs,
                 param_dtype=jnp.float32, compute_dtype=jnp.float32, scan: bool = True,
                 remat_policy: str = "nothing_saveable"):
        if image_size % variant.patch:
            raise ValueError(f"image size {image_size} is not divisible by the patch size {variant.patch}")
        self.variant, self.image_size = variant, image_size
        self.compute_dtype, self.scan, self.remat_policy = compute_dtype, scan, remat_policy
        w, m, n, p = variant.width, variant.mlp_dim, variant.num_heads, variant.patch
        d, depth = w // n, variant.depth
        self.grid = image_size // p
        pd = param_dtype
        self.patch_kernel = L.param(rngs, L.fan_in_init([0, 1, 2]), (p, p, 3, w), (None, None, None, "embed"), pd)
        self.patch_bias = L.param(rngs, L.zeros, (w,), ("embed",), pd)
        self.pos_embedding = L.param(rngs, nnx.initializers.normal(1 / w**0.5), (self.grid**2, w), ("pos", "embed"), pd)
        stack = lambda init, shape, names: L.param(rngs, init, (depth, *shape), ("layers", *names), pd)
        self.ln1_scale = stack(L.ones, (w,), ("norm",))
        self.ln1_bias = stack(L.zeros, (w,), ("norm",))
        self.q_kernel = stack(L.fan_in_init([1]), (w, n, d), ("embed", "heads", "head_dim"))
        self.k_kernel = stack(L.fan_in_init([1]), (w, n, d), ("embed", "heads", "head_dim"))
        self.v_kernel = stack(L.fan_in_init([1]), (w, n, d), ("embed", "heads", "head_dim"))
        self.q_bias = stack(L.zeros, (n, d), ("heads", "head_dim"))
        self.k_bias = stack(L.zeros, (n, d), ("heads", "head_dim"))
        self.v_bias = stack(L.zeros, (n, d), ("heads", "head_dim"))
        self.o_kernel = stack(L.fan_in_init([1, 2]), (n, d, w), ("heads", "head_dim", "embed"))
        self.o_bias = stack(L.zeros, (w,), ("embed",))
        self.ln2_scale = stack(L.ones, (w,), ("norm",))
        self.ln2_bias = stack(L.zeros, (w,), ("norm",))
        self.mlp1_kernel = stack(L.fan_in_init([1]), (w, m), ("embed", "mlp"))
        self.mlp1_bias = stack(L.zeros, (m,), ("mlp",))
        self.mlp2_kernel = stack(L.fan_in_init([1]), (m, w), ("mlp", "embed"))
        self.mlp2_bias = stack(L.zeros, (w,), ("embed",))
        self.final_ln_scale = L.param(rngs, L.ones, (w,), ("norm",), pd)
        self.final_ln_bias = L.param(rngs, L.zeros, (w,), ("norm",), pd)
        self.head = L.Dense(w, out_dim, (None, "embed"), rngs=rngs, dtype=pd)

    def _block(self, x: jax.Array, p: dict) -> tuple[jax.Array, None]:
        dt = self.compute_dtype
        c = lambda name: p[name].astype(dt)
        h = L.layer_norm(x, p["ln1_scale"], p["ln1_bias"])
        q = jnp.einsum("bsw,wnd->bsnd", h, c("q_kernel")) + c("q_bias")
        k = jnp.einsum("bsw,wnd->bsnd", h, c("k_kernel")) + c("k_bias")
        v = jnp.einsum("bsw,wnd->bsnd", h, c("v_kernel")) + c("v_bias")
        q = q * (q.shape[-1] ** -0.5)
        mask = jnp.ones((x.shape[0], x.shape[1], x.shape[1]), bool)
        attn = L.attention(q, k, v, mask)
        x = x + jnp.einsum("bsnd,ndw->bsw", attn, c("o_kernel")) + c("o_bias")
        h = L.layer_norm(x, p["ln2_scale"], p["ln2_bias"])
        h = jax.nn.gelu(h @ c("mlp1_kernel") + c("mlp1_bias"), approximate=True)
        x = x + h @ c("mlp2_kernel") + c("mlp2_bias")
        return L.constrain_tokens(x), None

    def __call__(self, images: jax.Array) -> jax.Array:
        if images.shape[-3:] != (self.image_size, self.image_size, 3):
            raise ValueError(f"images of shape {images.shape[-3:]} given to a {self.image_size}² ViT")
        dt = self.compute_dtype
        x = images.astype(jnp.float32) / 127.5 - 1.0 if images.dtype == jnp.uint8 else images
        x = jax.lax.conv_general_dilated(
            x.astype(dt), self.patch_kernel[...].astype(dt), window_strides=(self.variant.patch,) * 2,
            padding="VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        x = x.reshape(x.shape[0], -1, x.shape[-1]) + self.patch_bias[...].astype(dt)
        x = L.constrain_tokens(x + self.pos_embedding[...].astype(dt)[None])
        names = ["ln1_scale", "ln1_bias", "q_kernel", "k_kernel", "v_kernel", "q_bias", "k_bias", "v_bias",
                 "o_kernel", "o_bias", "ln2_scale", "ln2_bias", "mlp1_kernel", "mlp1_bias", "mlp2_kernel", "mlp2_bias"]
        stacked = {name: getattr(self, name)[...] for name in names}
        x, _ = L.run_layers(self._block, x, stacked, scan=self.scan, remat_policy=self.remat_policy)
        x = L.layer_norm(x, self.final_ln_scale[...], self.final_ln_bias[...])
        return self.head(x)
