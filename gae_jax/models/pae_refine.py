"""PAE stage 0, VFM prior refinement: projector P_t and de-projector Q_t, plus the frozen VFM.

PAE (arXiv 2605.07915, Sec. 3.3; shared/PAE_SPEC.md §3.4) refines the frozen VFM's patch
tokens H_vfm (B, N, D) into two targets for the tokenizer's regularisers:
  Z_T   = P_t(H_vfm)               (B, g, g, d) semantic target on the sphere of radius sqrt(d)
  H_ref = low_pass(H_vfm)           (B, g, g, D) structural target (losses.low_pass)
trained with  L_refine = lambda_rep * MSE(Q_t(Z_T), H_vfm) + lambda_gram * ||Gram(Z_T) -
Gram(H_ref)||^2.  The paper gives Q_t as "a 4-layer ViT, hidden 1024" and nothing else:
  P_t (spec [I]) is the PAE compressor (models/pae.py `Compressor`): attention without
      residual or pre-norm, conv 3x3 D -> d, parameter-free RMSNorm per token -- so stage 1
      can start its compressor from it.
  Q_t (spec [I]) Linear d -> width, a learned position table, `depth` pre-norm blocks of the
      house transformer (layers.Transformer: RMSNorm, QK-norm, SwiGLU), RMSNorm, Linear
      width -> D.

The frozen VFM is DINOv2 (models/dinov2.py; PAE releases the with-registers ViT-L/14) with
its final LayerNorm's affine removed (`final_norm_affine=False`); it is applied separately,
never inside these modules (house rule: frozen networks are separate step arguments), its
input prepared by models/pae.py `vfm_inputs`.
"""

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gae_jax.models import dinov2 as dinov2_lib
from gae_jax.models import layers
from gae_jax.models import pae as pae_lib

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


def vfm_module(info: dict, dtype: Dtype = jnp.float32, attention_impl: Optional[str] = None,
               final_norm_affine: bool = False) -> dinov2_lib.DinoV2:
  """The frozen DinoV2; final_norm_affine=False (released PAE) has no final-LN weight/bias."""
  return dinov2_lib.DinoV2(**{**info, "dtype": dtype, "attention_impl": attention_impl,
                              "final_norm_affine": final_norm_affine})


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

  Exactly the PAE compressor (models/pae.py `Compressor`: attention without residual /
  pre-norm, conv 3x3, parameter-free RMSNorm) -- spec §8 [I] -- so its parameters can
  start stage 1's compressor. num_heads None: D // 64 (16 for D = 1024).
  """
  latent_dim: int
  num_heads: Optional[int] = None
  attention_impl: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    heads = self.num_heads or max(1, h.shape[-1] // 64)
    z, _ = pae_lib.Compressor(heads, self.latent_dim, attention_impl=self.attention_impl,
                              dtype=self.dtype, param_dtype=self.param_dtype,
                              name="compressor")(h.astype(self.dtype))
    return z.astype(jnp.float32)


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
