"""The GAE pixel encoder E_p and decoder D_p (docs/method.md, stage 2; released layout).

Encoder: patch conv (no bias) -> learned pos-embed -> blocks -> RMSNorm -> Linear(width, width).
Decoder: Linear(d, width) -> pos-embed -> blocks -> RMSNorm -> Linear(width, p*p*3) ->
unpatchify with token features ordered (p1, p2, c). No tanh; images in [-1, 1].
Initialisation `init_scheme` (config.model.init; "torch": the released modules', the
default; "flax": the earlier xavier scheme): see `layers.INITS`.
"""

from typing import Any, Optional

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from gae_jax.models import layers

Dtype = Any

# name: (width, depth, heads). "mu" is a tiny size for tests.
VARIANTS = {
    "mu": (64, 2, 2),
    "Ti": (192, 12, 3),
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
}


def decode_variant(variant: str) -> dict:
  """'L' -> {'width': 1024, 'depth': 24, 'num_heads': 16}."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown ViT variant {variant!r}; choose from {sorted(VARIANTS)}")
  width, depth, heads = VARIANTS[variant]
  return dict(width=width, depth=depth, num_heads=heads)


def _patch_init(init: str) -> layers.Initializer:
  """Patch conv kernel (p, p, 3, width): the release's kaiming_normal(fan_out, relu), i.e.
  N(0, 2 / (width p p)) untruncated; "flax": lecun_normal."""
  if layers.check_init(init) == "torch":
    return nn.initializers.variance_scaling(2.0, "fan_out", "normal")
  return nn.initializers.lecun_normal()


class _Trunk(nn.Module):
  """pos-embed + transformer + final parameter-free RMSNorm, shared by encoder and decoder."""
  width: int
  depth: int
  num_heads: int
  mlp_hidden: Optional[int] = None
  qk_norm: Optional[str] = "rms"
  attention_impl: Optional[str] = None
  remat: str = "none"
  scan: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  init_scheme: str = "torch"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    pos = self.param("pos_embed", nn.with_logical_partitioning(
        layers.pos_embed_init(self.init_scheme), (None, "pos", "embed")),
        (1, x.shape[1], self.width), self.param_dtype)
    x = layers.constrain(x + pos.astype(self.dtype))
    x = layers.Transformer(
        depth=self.depth, num_heads=self.num_heads,
        mlp_hidden=self.mlp_hidden or layers.swiglu_hidden(self.width),
        qk_norm=self.qk_norm, attention_impl=self.attention_impl, remat=self.remat,
        scan=self.scan, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=layers.linear_init(self.init_scheme), name="transformer")(x)
    return layers.RMSNorm(dtype=self.dtype, name="norm")(x)


class ViTEncoder(_Trunk):
  """Images (B, H, W, 3) in [-1, 1] -> tokens (B, H/p, W/p, width)."""
  patch_size: int = 16

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    p = self.patch_size
    b, h, w, _ = images.shape
    if h % p or w % p:
      raise ValueError(f"image size {h}x{w} is not divisible by patch_size {p}")
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                dtype=self.dtype, param_dtype=self.param_dtype, name="patch_embed",
                kernel_init=nn.with_logical_partitioning(
                    _patch_init(self.init_scheme), (None, None, None, "embed")))(
                        images.astype(self.dtype))
    x = x.reshape(b, -1, self.width)
    x = super().__call__(x)
    x = nn.Dense(self.width, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                 name="head", kernel_init=layers.dense_init(
                     ("embed", "mlp"), layers.linear_init(self.init_scheme)))(x)
    return x.reshape(b, h // p, w // p, self.width)


class ViTDecoder(_Trunk):
  """Latents (B, h, w, d) -> images (B, h*p, w*p, 3)."""
  patch_size: int = 16
  out_channels: int = 3

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    p = self.patch_size
    b, h, w, _ = z.shape
    x = nn.Dense(self.width, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                 name="embed", kernel_init=layers.dense_init(
                     ("latent", "embed"), layers.linear_init(self.init_scheme)))(
                     z.reshape(b, h * w, -1).astype(self.dtype))
    x = super().__call__(x)
    x = nn.Dense(p * p * self.out_channels, use_bias=False, dtype=self.dtype,
                 param_dtype=self.param_dtype, name="head",
                 kernel_init=layers.dense_init(
                     ("embed", "patch"), layers.linear_init(self.init_scheme)))(x)
    return einops.rearrange(x, "b (h w) (p1 p2 c) -> b (h p1) (w p2) c", h=h, w=w, p1=p,
                            p2=p, c=self.out_channels)
