"""LightningDiT (docs/method.md, stage 3): the class-conditional velocity model on GAE latents.

Numerics follow the released LightningDiT / GAE `models/lightningdit_we.py` with
use_rmsnorm, use_swiglu, use_rope, learn_sigma=False, wo_shift=False, use_abs_pos:

  tokens = PatchEmbed(x) + sincos_pos                      (frozen constant, not a param)
  c      = TimestepEmbedder(t) + LabelEmbedder(y)          (t in [0, 1] as given)
  block  : shift/scale/gate (msa), shift/scale/gate (mlp) = Linear(SiLU(c)).chunk(6)
           x += gate_msa * Attn(modulate(RMSNorm(x), shift_msa, scale_msa), rope)
           x += gate_mlp * SwiGLU(modulate(RMSNorm(x), shift_mlp, scale_mlp))
  final  : Linear(modulate(RMSNorm(x), shift, scale)) -> unpatchify (p, q, c order)

modulate(x, shift, scale) = x * (1 + scale) + shift. adaLN-Zero init: every adaLN linear
and the final linear are zero, so the initial output is exactly 0.

Parameter count of XL/1 on 16x16x32: 674,961,824 trainable parameters; the paper's 675.26M
(Tab. 13) also counts the frozen (256, 1152) pos-embed buffer (294,912) that PyTorch
registers as a parameter: 675,256,736. See `param_count`.
"""

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gae_jax.models import layers

Dtype = Any

# name: (width, depth, heads). "mu" is a tiny size for tests.
VARIANTS = {
    "mu": (64, 2, 4),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}


def decode_variant(variant: str) -> dict:
  """'XL/1' or 'XL' -> {'width': 1152, 'depth': 28, 'num_heads': 16[, 'patch_size': 1]}."""
  name, _, patch = variant.partition("/")
  if name not in VARIANTS:
    raise ValueError(f"unknown LightningDiT variant {variant!r}; choose from "
                     f"{sorted(VARIANTS)} (optionally with '/1' or '/2')")
  width, depth, heads = VARIANTS[name]
  out = dict(width=width, depth=depth, num_heads=heads)
  if patch:
    if patch not in ("1", "2"):
      raise ValueError(f"LightningDiT variant {variant!r}: patch size must be 1 or 2")
    out["patch_size"] = int(patch)
  return out


def dit_swiglu_hidden(width: int, mlp_ratio: float = 4.0) -> int:
  """Released LightningDiT SwiGLU hidden width: int(2/3 * int(width * mlp_ratio)).

  1152 -> 3072, 1024 -> 2730, 768 -> 2048. (Not `layers.swiglu_hidden`, which rounds up
  to a multiple of 256 as in the GAE ViTs.)
  """
  return int(2 / 3 * int(width * mlp_ratio))


def timestep_embedding(t: jax.Array, dim: int = 256, max_period: float = 10000.0
                       ) -> jax.Array:
  """DiT sinusoidal features [cos(t*f), sin(t*f)], f = exp(-ln(max_period) * i / half)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
  omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
  omega = 1.0 / 10000 ** omega
  out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_pos_embed(width: int, grid_h: int, grid_w: int) -> np.ndarray:
  """Frozen 2-D sin-cos pos-embed (N, width), tokens row-major (MAE/DiT layout).

  As released (np.meshgrid(grid_w, grid_h)): the first half encodes the column index,
  the second half the row index, each as [sin, cos].
  """
  if width % 4:
    raise ValueError(f"sin-cos pos-embed needs width divisible by 4, got {width}")
  rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
  emb = np.concatenate([_sincos_1d(width // 2, cols), _sincos_1d(width // 2, rows)], axis=1)
  return emb.astype(np.float32)


def rope_2d(head_dim: int, grid_h: int, grid_w: int, theta: float = 10000.0
            ) -> tuple[np.ndarray, np.ndarray]:
  """EVA VisionRotaryEmbeddingFast tables (cos, sin), each (grid_h*grid_w, head_dim).

  dim = head_dim / 2 per axis, frequencies 1/theta^(2i/dim) for i < dim/2, each repeated
  for its interleaved pair; the first half of the head dim rotates with the row index,
  the second half with the column index. Feed to `layers.apply_rope`.
  """
  if head_dim % 4:
    raise ValueError(f"2-D RoPE needs head_dim divisible by 4, got {head_dim}")
  dim = head_dim // 2
  freqs = 1.0 / theta ** (np.arange(0, dim, 2)[: dim // 2].astype(np.float64) / dim)
  fr = np.repeat(np.arange(grid_h)[:, None] * freqs[None], 2, axis=-1)   # (h, dim)
  fc = np.repeat(np.arange(grid_w)[:, None] * freqs[None], 2, axis=-1)   # (w, dim)
  table = np.concatenate([
      np.broadcast_to(fr[:, None, :], (grid_h, grid_w, dim)),
      np.broadcast_to(fc[None, :, :], (grid_h, grid_w, dim))], axis=-1)
  table = table.reshape(grid_h * grid_w, head_dim)
  return np.cos(table).astype(np.float32), np.sin(table).astype(np.float32)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """x * (1 + scale) + shift with (B, D) modulation broadcast over tokens."""
  return x * (1 + scale[:, None]) + shift[:, None]


class TimestepEmbedder(nn.Module):
  """256 sinusoidal features -> Linear -> SiLU -> Linear (weights N(0, 0.02), bias 0)."""
  width: int
  freq_dim: int = 256
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t: jax.Array) -> jax.Array:
    init = nn.initializers.normal(0.02)
    bias = nn.with_logical_partitioning(nn.initializers.zeros, ("embed",))
    h = nn.Dense(self.width, dtype=self.dtype, param_dtype=self.param_dtype, name="mlp_0",
                 kernel_init=layers.dense_init((None, "embed"), init), bias_init=bias)(
                     timestep_embedding(t, self.freq_dim))
    return nn.Dense(self.width, dtype=self.dtype, param_dtype=self.param_dtype, name="mlp_2",
                    kernel_init=layers.dense_init(("mlp", "embed"), init),
                    bias_init=bias)(nn.silu(h))


class LabelEmbedder(nn.Module):
  """Class table with a last null row (when dropout_prob > 0) and CFG label dropout.

  In training each label is replaced by the null id `num_classes` with probability
  `dropout_prob` (rng stream 'dropout'); `force_drop_ids` (B,) replaces where == 1/True,
  in training or not (released `token_drop`).
  """
  num_classes: int
  width: int
  dropout_prob: float = 0.1
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, labels: jax.Array, train: bool = False,
               force_drop_ids: Optional[jax.Array] = None) -> jax.Array:
    rows = self.num_classes + int(self.dropout_prob > 0)
    table = nn.Embed(rows, self.width, param_dtype=self.param_dtype, name="embedding_table",
                     embedding_init=nn.with_logical_partitioning(
                         nn.initializers.normal(0.02), (None, "embed")))
    if force_drop_ids is not None and self.dropout_prob <= 0:
      raise ValueError("force_drop_ids needs a null class: class_dropout_prob must be > 0")
    labels = labels.astype(jnp.int32)
    if force_drop_ids is not None:
      labels = jnp.where(jnp.asarray(force_drop_ids) == 1, self.num_classes, labels)
    elif train and self.dropout_prob > 0:
      drop = jax.random.uniform(self.make_rng("dropout"), labels.shape) < self.dropout_prob
      labels = jnp.where(drop, self.num_classes, labels)
    return table(labels)


class SwiGLUFFN(nn.Module):
  """Released fused SwiGLU: w12 (bias) -> silu(first half) * second half -> w3 (bias)."""
  hidden: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x12 = nn.Dense(2 * self.hidden, dtype=self.dtype, param_dtype=self.param_dtype,
                   name="w12", kernel_init=layers.dense_init(("embed", "mlp")),
                   bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)))(x)
    x1, x2 = jnp.split(x12, 2, axis=-1)
    h = nn.with_logical_constraint(nn.silu(x1) * x2, ("batch", "length", "mlp"))
    return nn.Dense(x.shape[-1], dtype=self.dtype, param_dtype=self.param_dtype, name="w3",
                    kernel_init=layers.dense_init(("mlp", "embed")),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",))
                    )(h)


def _zero_dense(features: int, names, dtype, param_dtype, name: str) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, param_dtype=param_dtype, name=name,
                  kernel_init=layers.dense_init(names, nn.initializers.zeros),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[-1:]))


class DiTBlock(nn.Module):
  """LightningDiT block with adaLN-Zero modulation; `__call__(x, c, cos, sin) -> (x, None)`."""
  num_heads: int
  mlp_hidden: int
  qk_norm: bool = False
  attention_impl: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, c: jax.Array, cos: Optional[jax.Array],
               sin: Optional[jax.Array]):
    width = x.shape[-1]
    x = layers.constrain(x)
    mod = _zero_dense(6 * width, ("embed", "mlp"), self.dtype, self.param_dtype,
                      "adaLN_modulation")(nn.silu(c))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, -1)
    norm = lambda name: layers.RMSNorm(eps=1e-6, use_scale=True, dtype=self.dtype,
                                       param_dtype=self.param_dtype, name=name)
    rope = None if cos is None else (cos, sin)
    h = modulate(norm("norm1")(x), shift_msa, scale_msa)
    h = layers.Attention(self.num_heads, qkv_bias=True, proj_bias=True,
                         qk_norm="rms_affine" if self.qk_norm else None,
                         attention_impl=self.attention_impl, dtype=self.dtype,
                         param_dtype=self.param_dtype, name="attn")(h, rope=rope)
    x = x + gate_msa[:, None] * h
    h = modulate(norm("norm2")(x), shift_mlp, scale_mlp)
    h = SwiGLUFFN(self.mlp_hidden, dtype=self.dtype, param_dtype=self.param_dtype,
                  name="mlp")(h)
    x = x + gate_mlp[:, None] * h
    return layers.constrain(x), None


class FinalLayer(nn.Module):
  """RMSNorm -> modulate(shift, scale) from Linear(SiLU(c)) -> Linear (both zero-init)."""
  out_features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    mod = _zero_dense(2 * x.shape[-1], ("embed", "mlp"), self.dtype, self.param_dtype,
                      "adaLN_modulation")(nn.silu(c))
    shift, scale = jnp.split(mod, 2, axis=-1)
    x = layers.RMSNorm(eps=1e-6, use_scale=True, dtype=self.dtype,
                       param_dtype=self.param_dtype, name="norm_final")(x)
    return _zero_dense(self.out_features, ("embed", "patch"), self.dtype, self.param_dtype,
                       "linear")(modulate(x, shift, scale))


class LightningDiT(nn.Module):
  """Class-conditional velocity model: (x NHWC, t (B,), y (B,) int) -> v NHWC (float32).

  `train=True` enables label dropout (needs rngs={'dropout': key}); `force_drop_ids`
  replaces labels by the null class where == 1. `null_label` == num_classes.
  """
  width: int = 1152
  depth: int = 28
  num_heads: int = 16
  patch_size: int = 1
  in_channels: int = 32
  num_classes: int = 1000
  class_dropout_prob: float = 0.1
  mlp_ratio: float = 4.0
  qk_norm: bool = False
  use_rope: bool = True
  use_abs_pos: bool = True
  attention_impl: Optional[str] = None
  remat: str = "none"
  scan: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def null_label(self) -> int:
    return self.num_classes

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array, *, train: bool = False,
               force_drop_ids: Optional[jax.Array] = None) -> jax.Array:
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(f"LightningDiT expects x of shape (B, H, W, {self.in_channels}), "
                       f"got {x.shape}")
    b, hh, ww, _ = x.shape
    p = self.patch_size
    if hh % p or ww % p:
      raise ValueError(f"latent size {hh}x{ww} is not divisible by patch_size {p}")
    if t.shape != (b,) or y.shape != (b,):
      raise ValueError(f"t and y must have shape ({b},), got t {t.shape} and y {y.shape}")
    if self.remat not in layers.REMAT_POLICIES:
      raise ValueError(f"unknown remat policy {self.remat!r}; choose from "
                       f"{sorted(layers.REMAT_POLICIES)}")
    gh, gw = hh // p, ww // p
    head_dim = self.width // self.num_heads

    # Patch embed, initialised like a Linear on the flattened (p*p*C) patch (released).
    tok = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                  param_dtype=self.param_dtype, name="x_embedder",
                  kernel_init=nn.with_logical_partitioning(
                      _flat_xavier, (None, None, "latent", "embed")),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))(
                      x.astype(self.dtype))
    tok = tok.reshape(b, gh * gw, self.width)
    if self.use_abs_pos:
      tok = tok + jnp.asarray(sincos_pos_embed(self.width, gh, gw), self.dtype)[None]
    tok = layers.constrain(tok)

    c = TimestepEmbedder(self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                         name="t_embedder")(t)
    c = c + LabelEmbedder(self.num_classes, self.width, self.class_dropout_prob,
                          param_dtype=self.param_dtype, name="y_embedder")(
                              y, train=train, force_drop_ids=force_drop_ids).astype(c.dtype)
    c = nn.with_logical_constraint(c, ("batch", "embed"))

    cos = sin = None
    if self.use_rope:
      cos, sin = (jnp.asarray(a) for a in rope_2d(head_dim, gh, gw))

    block_cls = DiTBlock
    if self.remat != "none":
      block_cls = nn.remat(DiTBlock, policy=layers.REMAT_POLICIES[self.remat],
                           prevent_cse=not self.scan)
    kw = dict(num_heads=self.num_heads, mlp_hidden=dit_swiglu_hidden(self.width,
                                                                     self.mlp_ratio),
              qk_norm=self.qk_norm, attention_impl=self.attention_impl, dtype=self.dtype,
              param_dtype=self.param_dtype)
    if self.scan:
      stack = nn.scan(block_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=self.depth,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      tok, _ = stack(**kw, name="blocks")(tok, c, cos, sin)
    else:
      for i in range(self.depth):
        tok, _ = block_cls(**kw, name=f"blocks_{i}")(tok, c, cos, sin)

    tok = FinalLayer(p * p * self.in_channels, dtype=self.dtype,
                     param_dtype=self.param_dtype, name="final_layer")(tok, c)
    out = tok.reshape(b, gh, gw, p, p, self.in_channels).transpose(0, 1, 3, 2, 4, 5)
    return out.reshape(b, hh, ww, self.in_channels).astype(jnp.float32)


def _flat_xavier(key, shape, dtype=jnp.float32):
  """xavier_uniform of the conv kernel viewed as a (p*p*C, width) matrix."""
  return nn.initializers.xavier_uniform()(
      key, (math.prod(shape[:-1]), shape[-1]), dtype).reshape(shape)


def make_dit(variant: str = "XL/1", **kw) -> LightningDiT:
  """Factory: make_dit('XL/1', in_channels=32, qk_norm=True, dtype=jnp.bfloat16)."""
  return LightningDiT(**{**decode_variant(variant), **kw})


def param_count(model: LightningDiT, latent_shape: tuple[int, int, int] = (16, 16, 32),
                include_pos_embed: bool = False) -> int:
  """Parameter count via jax.eval_shape (nothing is allocated).

  include_pos_embed=True adds the frozen pos-embed buffer, which the released PyTorch model
  registers as a (non-trainable) parameter: this is how the paper's 675.26M is counted.
  """
  x = jax.ShapeDtypeStruct((1, *latent_shape), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.float32)
  y = jax.ShapeDtypeStruct((1,), jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x, t, y)
  n = sum(math.prod(v.shape) for v in jax.tree.leaves(nn.meta.unbox(shapes)))
  if include_pos_embed and model.use_abs_pos:
    h, w, _ = latent_shape
    n += (h // model.patch_size) * (w // model.patch_size) * model.width
  return n
