"""PAE stage 0, VFM prior refinement: projector P_t and de-projector Q_t, plus the frozen VFM.

PAE (arXiv 2605.07915, Sec. 3.3; shared/PAE_SPEC.md §3.4) refines the frozen VFM's patch
tokens H_vfm (B, N, D) into two targets for the tokenizer's regularisers:
  Z_T   = P_t(H_vfm)               (B, g, g, d) semantic target on the sphere of radius sqrt(d)
  H_ref = low_pass(H_vfm)           (B, g, g, D) structural target (losses.low_pass)
trained with  L_refine = lambda_rep * MSE(Q_t(Z_T), H_vfm) + lambda_gram * ||Gram(Z_T) -
Gram(H_ref)||^2.  The paper gives Q_t as "a 4-layer ViT, hidden 1024" and nothing else:
  P_t (spec [I]) has the PAE compressor's form -- attention without residual or pre-norm
      (qkv without bias, output projection with bias), conv 3x3 D -> d (bias), parameter-free
      RMSNorm per token (eps 1e-6) -- so stage 1 can start its compressor from it.
  Q_t (spec [I]) Linear d -> width, a learned position table, `depth` pre-norm blocks of the
      house transformer (layers.Transformer: RMSNorm, QK-norm, SwiGLU), RMSNorm, Linear
      width -> D.

The frozen VFM is DINOv2 (models/dinov2.py; PAE releases the with-registers ViT-L/14) with
its final LayerNorm's affine removed (`strip_final_norm_affine`); it is applied separately,
never inside these modules (house rule: frozen networks are separate step arguments).
`vfm_inputs` prepares its input as the authors' code does: [0, 1] image, torch bicubic
resize without antialias to the VFM size, ImageNet mean/std.
"""

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gae_jax.models import dinov2 as dinov2_lib
from gae_jax.models import layers

Dtype = Any


# ---------------------------------------------------------------------------- the VFM


def vfm_info(vfm_config) -> dict:
  """DinoV2 keyword arguments of a random-weight VFM from `config.vfm` (variant or sizes).

  Used when no weights file is given (tests, `:runlocal`): `variant` 'S'|'B'|'L'|'g', or
  variant None with width / depth / num_heads; num_registers, patch_size, pos_grid.
  """
  v = vfm_config
  info = dict(variant=v.get("variant") or None, num_registers=int(v.num_registers),
              patch_size=int(v.patch_size), pos_grid=int(v.get("pos_grid") or 37))
  if info["variant"] is None:
    info.update(width=int(v.width), depth=int(v.depth), num_heads=int(v.num_heads), ffn="mlp")
  return info


def vfm_module(info: dict, dtype: Dtype = jnp.float32,
               attention_impl: Optional[str] = None) -> dinov2_lib.DinoV2:
  return dinov2_lib.DinoV2(**{**info, "dtype": dtype, "attention_impl": attention_impl})


def strip_final_norm_affine(params: dict) -> dict:
  """DINOv2 params whose final LayerNorm is affine-free (scale 1, bias 0), as PAE's code
  sets that LayerNorm's weight and bias to None (spec §2.2)."""
  norm = params["norm"]
  return {**params, "norm": {"scale": np.ones_like(np.asarray(norm["scale"])),
                             "bias": np.zeros_like(np.asarray(norm["bias"]))}}


def vfm_inputs(images_m11: jax.Array, size: int) -> jax.Array:
  """[-1, 1] NHWC -> the VFM input: [0, 1], torch bicubic resize (a = -0.75, no antialias)
  to size x size when the side differs, ImageNet mean/std (spec §2.1). float32."""
  if images_m11.ndim != 4 or images_m11.shape[-1] != 3:
    raise ValueError(f"vfm_inputs expects NHWC RGB images, got shape {images_m11.shape}")
  x = (images_m11.astype(jnp.float32) + 1.0) * 0.5
  if x.shape[1:3] != (size, size):
    x = dinov2_lib.torch_resize(x, (size, size), method="bicubic", antialias=False)
  mean = jnp.asarray(dinov2_lib.IMAGENET_MEAN, jnp.float32)
  std = jnp.asarray(dinov2_lib.IMAGENET_STD, jnp.float32)
  return (x - mean) / std


def denormalize(out: jax.Array) -> jax.Array:
  """VFM-normalised image -> [-1, 1] (unclipped): (out * std + mean) * 2 - 1."""
  mean = jnp.asarray(dinov2_lib.IMAGENET_MEAN, jnp.float32)
  std = jnp.asarray(dinov2_lib.IMAGENET_STD, jnp.float32)
  return (out.astype(jnp.float32) * std + mean) * 2.0 - 1.0


def vfm_patch_tokens(module: dinov2_lib.DinoV2, variables: dict, x_vfm: jax.Array
                     ) -> jax.Array:
  """H_vfm: the frozen VFM's patch tokens (B, N, D), CLS and registers dropped, float32,
  behind stop_gradient. x_vfm from `vfm_inputs`."""
  out = module.apply(variables, x_vfm)
  return jax.lax.stop_gradient(out["patch_tokens"].astype(jnp.float32))


def token_grid(h: jax.Array) -> jax.Array:
  """(B, N, C) -> (B, g, g, C) for a square N; ValueError otherwise."""
  b, n, c = h.shape
  g = int(round(np.sqrt(n)))
  if g * g != n:
    raise ValueError(f"{n} VFM tokens are not a square grid")
  return h.reshape(b, g, g, c)


# ---------------------------------------------------------------------------- modules


class Projector(nn.Module):
  """P_t: tokens (B, N, D) -> Z_T (B, g, g, d) on the sphere of radius sqrt(d).

  attention without residual / pre-norm (qkv no bias, proj with bias) -> conv 3x3 (pad 1,
  bias) -> parameter-free RMSNorm (eps 1e-6, float32): the PAE compressor's form (spec
  §2.4). num_heads None: D // 64 (16 for D = 1024).
  """
  latent_dim: int
  num_heads: Optional[int] = None
  attention_impl: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    b, n, width = h.shape
    heads = self.num_heads or max(1, width // 64)
    x = layers.Attention(heads, qkv_bias=False, proj_bias=True, qk_norm=None,
                         attention_impl=self.attention_impl, dtype=self.dtype,
                         param_dtype=self.param_dtype, name="attn")(h.astype(self.dtype))
    x = token_grid(x)
    x = nn.Conv(self.latent_dim, (3, 3), padding=1, dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=layers.dense_init((None, None, "embed", "latent")),
                bias_init=layers.dense_init(("latent",), nn.initializers.zeros),
                name="conv")(x)
    return layers.rms_normalize(x.astype(jnp.float32), 1e-6)


class DeProjector(nn.Module):
  """Q_t: Z_T (B, g, g, d) -> H_hat (B, N, out_dim), a small ViT (`depth` blocks, `width`)."""
  out_dim: int
  width: int = 1024
  depth: int = 4
  num_heads: Optional[int] = None
  mlp_hidden: Optional[int] = None
  attention_impl: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    b, gh, gw, _ = z.shape
    n = gh * gw
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
    x = dense(self.width, kernel_init=layers.dense_init(("latent", "embed")),
              bias_init=layers.dense_init(("embed",), nn.initializers.zeros),
              name="embed")(z.reshape(b, n, -1).astype(self.dtype))
    pos = self.param("pos_embed", nn.with_logical_partitioning(
        nn.initializers.truncated_normal(0.02), (None, "pos", "embed")),
                     (1, n, self.width), self.param_dtype)
    x = x + pos.astype(self.dtype)
    heads = self.num_heads or max(1, self.width // 64)
    x = layers.Transformer(self.depth, heads, self.mlp_hidden or layers.swiglu_hidden(self.width),
                           qk_norm="rms", attention_impl=self.attention_impl,
                           dtype=self.dtype, param_dtype=self.param_dtype, name="blocks")(x)
    x = layers.RMSNorm(dtype=self.dtype, name="norm")(x)
    return dense(self.out_dim, kernel_init=layers.dense_init(("embed", None)),
                 bias_init=layers.dense_init((None,), nn.initializers.zeros),
                 name="head")(x).astype(jnp.float32)


class Refiner(nn.Module):
  """P_t and Q_t together: H_vfm (B, N, D) -> (Z_T (B, g, g, d), H_hat (B, N, D))."""
  latent_dim: int
  vfm_dim: int
  proj_num_heads: Optional[int] = None
  width: int = 1024
  depth: int = 4
  num_heads: Optional[int] = None
  mlp_hidden: Optional[int] = None
  attention_impl: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    kw = dict(attention_impl=self.attention_impl, dtype=self.dtype,
              param_dtype=self.param_dtype)
    self.projector = Projector(self.latent_dim, self.proj_num_heads, **kw)
    self.deprojector = DeProjector(self.vfm_dim, self.width, self.depth, self.num_heads,
                                   self.mlp_hidden, **kw)

  def __call__(self, h: jax.Array) -> tuple[jax.Array, jax.Array]:
    if h.ndim != 3 or h.shape[-1] != self.vfm_dim:
      raise ValueError(f"Refiner expects VFM tokens (B, N, {self.vfm_dim}), got {h.shape}")
    z_t = self.projector(h)
    return z_t, self.deprojector(z_t)

  def project(self, h: jax.Array) -> jax.Array:
    """Z_T only (what stage 1 needs)."""
    return self.projector(h)


def make_refiner(fields: dict, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32) -> Refiner:
  """Refiner from the `model` fields of a stage-0 workdir's refine.json."""
  return Refiner(latent_dim=fields["latent_dim"], vfm_dim=fields["vfm_dim"],
                 proj_num_heads=fields.get("proj_num_heads"), width=fields["width"],
                 depth=fields["depth"], num_heads=fields.get("num_heads"),
                 mlp_hidden=fields.get("mlp_hidden"), dtype=dtype, param_dtype=param_dtype)
