"""PAE, the Prior-Aligned Autoencoder tokenizer (arXiv 2605.07915; shared/PAE_SPEC.md §2).

The released inference model (authors' `tokenizer/pae.py`, commit 51f8fa6) without its frozen
VFM, which is `gae_jax.models.dinov2.DinoV2(num_registers=4, final_norm_affine=False)`
applied separately with its own variables (house rule: frozen networks are separate,
non-donated step arguments and never enter the optimizer):

  encode(x, h_vfm):
    x      (B, S, S, 3)  the VFM input: [0, 1] image, torch bicubic to S (224), ImageNet
                         mean/std (`vfm_inputs`)
    h_vfm  (B, N, D)     the VFM's patch tokens, CLS and registers dropped (`vfm_tokens`);
                         N = g*g with g = S / patch (16 = 224 / 14)
    DAM    (§2.3) delta = pixel tokens (conv patch-embed, kernel = stride = S / g, + FIXED
           2-D sin-cos MAE table, w coordinate first) through `dam_depth` pre-LN layers of
           [self-attention, cross-attention to LN_kv(h_vfm), GELU MLP], LN eps 1e-5;
           fusion "sft": (gamma, beta) = Linear(delta) (zero-initialised),
           h_z = LN(h_vfm * (1 + gamma) + beta) -- the paper's Eq. (1); "add":
           LN(Linear(delta) + h_vfm) (zero-initialised); "concat": LN(Linear([h_vfm, delta]));
           "none": h_z = delta.  Without the DAM (`use_dam=False`) h_z = h_vfm.
    compressor (§2.4) attention WITHOUT residual or pre-norm (qkv no bias, proj bias) ->
           conv 3x3 D -> d (pad 1) -> parameter-free RMSNorm in float32, eps 1e-6: per token
           over the d channels (radius sqrt(d)), or "per-sample" over all g*g*d values.
    -> z (B, g, g, d), aux {"h_z" (B, N, D), "delta" (B, N, D) or None, "z_pre" (B, g, g, d)}
  decode(z) (§2.5):
    decompressor conv 3x3 d -> D, attention without residual; RAE's ViT-MAE decoder:
    decoder_embed Linear(D, W), a trainable zero-initialised CLS token, fixed sin-cos over
    1 + N positions (zeros at CLS), pre-LN layers (LN eps 1e-12, GELU MLP, biases), final LN,
    Linear(W, p*p*3), CLS dropped, unpatchify with token features ordered (row, col, channel)
    -> out (B, g*p, g*p, 3) in the VFM-normalised space (de-normalise with
    `denormalize` outside the module: x = out * std + mean, unclipped).

Attention scale is head_dim^-0.5 everywhere (timm / SDPA). Sizes come from `PAE_VARIANTS`
(the DAM follows the VFM's width and heads; `variant` names the decoder: RAE's ViT-B/L/XL
configs); `mu` is a tiny size for tests and `:runlocal`. Initialisation follows the
release where it matters for behaviour (zero fusion head, zero CLS, fixed tables); other
kernels use torch's default Linear/Conv scheme, biases zero.
"""

import functools
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gae_jax.models import dinov2 as dinov2_lib
from gae_jax.models import layers

Dtype = Any

FUSIONS = ("sft", "add", "concat", "none")
NORM_TYPES = ("per-token", "per-sample")
VFM_LN_EPS = 1e-6       # DINOv2 (HF layer_norm_eps)
DAM_LN_EPS = 1e-5       # torch nn.LayerNorm default in the authors' DeltaEncoder
DECODER_LN_EPS = 1e-12  # the decoder configs' layer_norm_eps
RMS_EPS = 1e-6

# width / num_heads: the VFM's (the DAM and the compressor run at the VFM width, heads
# width / 64); dam_depth: `delta_depth`; decoder_*: RAE's configs/decoder/ViT{B,L,XL}
# (decoder_hidden_size / num_hidden_layers / num_attention_heads / intermediate_size);
# decoder_patch_size: 16 (256 px from the 16 x 16 grid). "mu": tests and :runlocal (64 px
# from an 8 x 8 grid of a width-64, 2-head VFM).
PAE_VARIANTS = {
    "B": dict(width=1024, num_heads=16, dam_depth=6, decoder_width=768, decoder_depth=12,
              decoder_num_heads=12, decoder_mlp_hidden=3072, decoder_patch_size=16),
    "L": dict(width=1024, num_heads=16, dam_depth=6, decoder_width=1024, decoder_depth=24,
              decoder_num_heads=16, decoder_mlp_hidden=4096, decoder_patch_size=16),
    "XL": dict(width=1024, num_heads=16, dam_depth=6, decoder_width=1152, decoder_depth=28,
               decoder_num_heads=16, decoder_mlp_hidden=4096, decoder_patch_size=16),
    "mu": dict(width=64, num_heads=2, dam_depth=1, decoder_width=64, decoder_depth=1,
               decoder_num_heads=2, decoder_mlp_hidden=128, decoder_patch_size=8),
}


def decode_variant(variant: str) -> dict:
  """'L' -> the PAE_VARIANTS row (a copy); ValueError naming the choices otherwise."""
  if variant not in PAE_VARIANTS:
    raise ValueError(f"unknown PAE variant {variant!r}; choose from {sorted(PAE_VARIANTS)}")
  return dict(PAE_VARIANTS[variant])


# ------------------------------------------------------------------------- fixed tables


def sincos_2d(dim: int, grid: int, *, cls_token: bool = False) -> np.ndarray:
  """MAE's fixed 2-D sin-cos table (grid*grid [+1], dim) float32, rows in (h, w) order.

  The first dim/2 channels encode the w (column) coordinate, the last dim/2 the h (row)
  coordinate (MAE `get_2d_sincos_pos_embed`, meshgrid w first); each half is
  [sin(pos * omega), cos(pos * omega)] with omega_k = 10000^(-k / (dim/4)). cls_token=True
  prepends a zero row (the decoder's CLS slot). Computed in float64, cast to float32.
  """
  if dim % 4:
    raise ValueError(f"sin-cos position table needs a width divisible by 4, got {dim}")
  omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
  hh, ww = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64),
                       indexing="ij")

  def one(pos):
    out = np.outer(pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  table = np.concatenate([one(ww), one(hh)], axis=1)
  if cls_token:
    table = np.concatenate([np.zeros((1, dim)), table], axis=0)
  return table.astype(np.float32)


# ------------------------------------------------------------------------------ modules


def _kernel(names):
  return layers.dense_init(names, layers.torch_linear_init())


def _zeros(names):
  return layers.dense_init(names, nn.initializers.zeros)


def _layer_norm(eps: float, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype,
                      use_fast_variance=False, name=name,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                      bias_init=_zeros(("embed",)))


class Attention(nn.Module):
  """Multi-head softmax attention, scale head_dim^-0.5, output projection with bias.

  Self-attention (`context=None`): fused `qkv` (bias per `qkv_bias`). Cross-attention:
  separate `q` (on x) and `k`, `v` (on context), each with bias per `qkv_bias`. x (B, L, C),
  context (B, M, C) -> (B, L, C).
  """
  num_heads: int
  qkv_bias: bool = True
  cross: bool = False
  attention_impl: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: Optional[jax.Array] = None) -> jax.Array:
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"PAE attention: width {width} not divisible by {self.num_heads} heads")
    hd = width // self.num_heads
    dense = functools.partial(nn.DenseGeneral, dtype=self.dtype, param_dtype=self.param_dtype,
                              use_bias=self.qkv_bias)
    if self.cross:
      if context is None:
        raise ValueError("PAE cross-attention needs a context")
      init = dict(kernel_init=_kernel(("embed", "heads", "kv")),
                  bias_init=_zeros(("heads", "kv")))
      q = dense((self.num_heads, hd), name="q", **init)(x)
      k = dense((self.num_heads, hd), name="k", **init)(context)
      v = dense((self.num_heads, hd), name="v", **init)(context)
    else:
      qkv = dense((3, self.num_heads, hd), name="qkv",
                  kernel_init=_kernel(("embed", None, "heads", "kv")),
                  bias_init=_zeros((None, "heads", "kv")))(x)
      q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    out = jax.nn.dot_product_attention(q, k, v, implementation=self.attention_impl)
    return nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype, param_dtype=self.param_dtype,
                           kernel_init=_kernel(("heads", "kv", "embed")),
                           bias_init=_zeros(("embed",)), name="proj")(out)


class Mlp(nn.Module):
  """fc2(GELU(fc1(x))), exact (erf) GELU, biases (timm Mlp / ViT-MAE intermediate+output)."""
  hidden: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
    h = dense(self.hidden, kernel_init=_kernel(("embed", "mlp")), bias_init=_zeros(("mlp",)),
              name="fc1")(x)
    h = nn.gelu(h, approximate=False)
    return dense(x.shape[-1], kernel_init=_kernel(("mlp", "embed")),
                 bias_init=_zeros(("embed",)), name="fc2")(h)


class DAMLayer(nn.Module):
  """x += SelfAttn(LN1 x); x += CrossAttn(LN2q x, LN2kv h_vfm); x += MLP(LN3 x) (eps 1e-5)."""
  num_heads: int
  mlp_hidden: int
  cross: bool = True
  attention_impl: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, h_vfm: jax.Array) -> jax.Array:
    ln = lambda name: _layer_norm(DAM_LN_EPS, self.dtype, self.param_dtype, name)
    attn = functools.partial(Attention, self.num_heads, qkv_bias=True,
                             attention_impl=self.attention_impl, dtype=self.dtype,
                             param_dtype=self.param_dtype)
    x = x + attn(name="self_attn")(ln("norm1")(x))
    if self.cross:
      x = x + attn(cross=True, name="cross_attn")(ln("norm2_q")(x), ln("norm2_kv")(h_vfm))
    x = x + Mlp(self.mlp_hidden, self.dtype, self.param_dtype, name="mlp")(ln("norm3")(x))
    return layers.constrain(x)


class DetailAwareModulator(nn.Module):
  """The DAM (authors' `DeltaEncoder`): (x (B, S, S, 3), h_vfm (B, N, D)) -> (h_z, delta).

  The patch size is S / sqrt(N) (the VFM's, 14 at 224 -> 16 x 16); width = D.
  """
  num_heads: int
  depth: int
  mlp_hidden: int
  cross: bool = True
  fusion: str = "sft"
  attention_impl: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, h_vfm: jax.Array) -> tuple[jax.Array, jax.Array]:
    if self.fusion not in FUSIONS:
      raise ValueError(f"PAE fusion {self.fusion!r}; choose from {FUSIONS}")
    b, n, width = h_vfm.shape
    g = _grid(n)
    size = x.shape[1]
    if x.shape[1] != x.shape[2] or size % g:
      raise ValueError(f"PAE: VFM input {x.shape[1]}x{x.shape[2]} is not a square multiple "
                       f"of the {g}x{g} VFM token grid")
    p = size // g
    t = nn.Conv(width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=_kernel((None, None, None, "embed")),
                bias_init=_zeros(("embed",)), name="patch_embed")(x.astype(self.dtype))
    t = t.reshape(b, n, width) + jnp.asarray(sincos_2d(width, g), self.dtype)
    h_vfm = h_vfm.astype(self.dtype)
    for i in range(self.depth):
      t = DAMLayer(self.num_heads, self.mlp_hidden, self.cross, self.attention_impl,
                   self.dtype, self.param_dtype, name=f"layer_{i}")(t, h_vfm)
    if self.fusion == "none":
      return t, t
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype,
                              name="fusion")
    zero = dict(kernel_init=_zeros(("embed", "mlp")), bias_init=_zeros(("mlp",)))
    if self.fusion == "sft":
      gamma, beta = jnp.split(dense(2 * width, **zero)(t), 2, axis=-1)
      pre = h_vfm * (1 + gamma) + beta
    elif self.fusion == "add":
      pre = dense(width, **zero)(t) + h_vfm
    else:
      pre = dense(width, kernel_init=_kernel(("mlp", "embed")), bias_init=_zeros(("embed",)))(
          jnp.concatenate([h_vfm, t], axis=-1))
    return _layer_norm(DAM_LN_EPS, self.dtype, self.param_dtype, "final_ln")(pre), t


def _conv3(features: int, dtype, param_dtype, name: str, axes) -> nn.Conv:
  return nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), dtype=dtype,
                 param_dtype=param_dtype, kernel_init=_kernel((None, None) + axes),
                 bias_init=_zeros(axes[-1:]), name=name)


def sphere_normalize(z: jax.Array, norm_type: str = "per-token", eps: float = RMS_EPS
                     ) -> jax.Array:
  """Parameter-free RMSNorm in float32 (authors' latents/distributions.py RMSNorm).

  per-token: each (..., d) vector -> radius sqrt(d); per-sample: all of (g, g, d) of each
  sample as one vector -> radius sqrt(g*g*d). z (B, g, g, d) -> same shape and dtype.
  """
  if norm_type == "per-token":
    return layers.rms_normalize(z, eps)
  if norm_type == "per-sample":
    z32 = z.astype(jnp.float32)
    m = jnp.mean(jnp.square(z32), axis=tuple(range(1, z.ndim)), keepdims=True)
    return (z32 * jax.lax.rsqrt(m + eps)).astype(z.dtype)
  raise ValueError(f"PAE latent norm {norm_type!r}; choose from {NORM_TYPES}")


class Compressor(nn.Module):
  """h_z (B, N, D) -> (z (B, g, g, d), z_pre): Attention (no residual, qkv without bias) ->
  conv 3x3 to d -> parameter-free RMSNorm (authors' `latent_compressor`)."""
  num_heads: int
  latent_dim: int
  norm_type: str = "per-token"
  attention_impl: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array) -> tuple[jax.Array, jax.Array]:
    b, n, _ = h.shape
    g = _grid(n)
    h = Attention(self.num_heads, qkv_bias=False, attention_impl=self.attention_impl,
                  dtype=self.dtype, param_dtype=self.param_dtype, name="attn")(h)
    z_pre = _conv3(self.latent_dim, self.dtype, self.param_dtype, "conv",
                   ("embed", "latent"))(h.reshape(b, g, g, -1))
    return sphere_normalize(z_pre, self.norm_type), z_pre


class Decompressor(nn.Module):
  """z (B, g, g, d) -> (B, N, D): conv 3x3 d -> D, Attention without residual (qkv no bias)."""
  width: int
  num_heads: int
  attention_impl: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    b, gh, gw, _ = z.shape
    h = _conv3(self.width, self.dtype, self.param_dtype, "conv", ("latent", "embed"))(
        z.astype(self.dtype))
    h = h.reshape(b, gh * gw, self.width)
    return Attention(self.num_heads, qkv_bias=False, attention_impl=self.attention_impl,
                     dtype=self.dtype, param_dtype=self.param_dtype, name="attn")(h)


class DecoderLayer(nn.Module):
  """ViT-MAE layer: h += Attn(LN h); h += FC2(GELU(FC1(LN h))); LN eps 1e-12, biases."""
  num_heads: int
  mlp_hidden: int
  attention_impl: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    ln = lambda name: _layer_norm(DECODER_LN_EPS, self.dtype, self.param_dtype, name)
    x = x + Attention(self.num_heads, qkv_bias=True, attention_impl=self.attention_impl,
                      dtype=self.dtype, param_dtype=self.param_dtype, name="attn")(
                          ln("norm1")(x))
    x = x + Mlp(self.mlp_hidden, self.dtype, self.param_dtype, name="mlp")(ln("norm2")(x))
    return layers.constrain(x)


class PixelDecoder(nn.Module):
  """RAE's GeneralDecoder (ViT-MAE style): tokens (B, N, D) -> image (B, g*p, g*p, 3)."""
  width: int
  depth: int
  num_heads: int
  mlp_hidden: int
  patch_size: int
  attention_impl: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    b, n, _ = h.shape
    g, p = _grid(n), self.patch_size
    x = nn.Dense(self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                 kernel_init=_kernel(("embed", "mlp")), bias_init=_zeros(("mlp",)),
                 name="decoder_embed")(h)
    cls = self.param("cls_token", nn.with_logical_partitioning(
        nn.initializers.zeros, (None, None, "embed")), (1, 1, self.width), self.param_dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, self.width)), x], 1)
    x = x + jnp.asarray(sincos_2d(self.width, g, cls_token=True), self.dtype)
    for i in range(self.depth):
      x = DecoderLayer(self.num_heads, self.mlp_hidden, self.attention_impl, self.dtype,
                       self.param_dtype, name=f"layer_{i}")(x)
    x = _layer_norm(DECODER_LN_EPS, self.dtype, self.param_dtype, "norm")(x)
    x = nn.Dense(p * p * 3, dtype=self.dtype, param_dtype=self.param_dtype,
                 kernel_init=_kernel(("embed", "patch")), bias_init=_zeros(("patch",)),
                 name="pred")(x)[:, 1:]
    # token features ordered (row-in-patch, col-in-patch, channel): torch nhwpqc -> nchpwq
    x = x.reshape(b, g, g, p, p, 3).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, g * p, g * p, 3)


def _grid(n: int) -> int:
  g = math.isqrt(n)
  if g * g != n:
    raise ValueError(f"PAE: {n} tokens are not a square grid")
  return g


class PAE(nn.Module):
  """The PAE tokenizer without its frozen VFM (see the module docstring for shapes).

  width / num_heads: the VFM's token width D and heads (DAM and compressor/decompressor);
  dam_*: the DAM (`use_dam=False` feeds h_vfm to the compressor directly); latent_dim d;
  norm_type "per-token" (released) | "per-sample"; decoder_*: the pixel decoder.
  """
  width: int = 1024
  num_heads: int = 16
  latent_dim: int = 32
  use_dam: bool = True
  dam_depth: int = 6
  dam_mlp_hidden: Optional[int] = None      # 4 * width
  dam_cross: bool = True
  fusion: str = "sft"
  norm_type: str = "per-token"
  decoder_width: int = 1024
  decoder_depth: int = 24
  decoder_num_heads: int = 16
  decoder_mlp_hidden: int = 4096
  decoder_patch_size: int = 16
  attention_impl: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    if self.fusion not in FUSIONS:
      raise ValueError(f"PAE fusion {self.fusion!r}; choose from {FUSIONS}")
    if self.norm_type not in NORM_TYPES:
      raise ValueError(f"PAE norm_type {self.norm_type!r}; choose from {NORM_TYPES}")
    kw = dict(attention_impl=self.attention_impl, dtype=self.dtype,
              param_dtype=self.param_dtype)
    if self.use_dam:
      self.dam = DetailAwareModulator(self.num_heads, self.dam_depth,
                                      self.dam_mlp_hidden or 4 * self.width, self.dam_cross,
                                      self.fusion, **kw)
    self.compressor = Compressor(self.num_heads, self.latent_dim, self.norm_type, **kw)
    self.decompressor = Decompressor(self.width, self.num_heads, **kw)
    self.decoder = PixelDecoder(self.decoder_width, self.decoder_depth, self.decoder_num_heads,
                                self.decoder_mlp_hidden, self.decoder_patch_size, **kw)

  def encode(self, x: jax.Array, h_vfm: jax.Array, *, train: bool = False
             ) -> tuple[jax.Array, dict]:
    """(x (B, S, S, 3) VFM-normalised, h_vfm (B, N, D)) -> (z (B, g, g, d), aux).

    aux: h_z (B, N, D) the fused tokens, delta (B, N, D) the DAM stream (None without the
    DAM), z_pre (B, g, g, d) the latent before the RMSNorm. `train` is accepted for the
    trainer's signature (no dropout or noise in the released model).
    """
    del train
    if h_vfm.ndim != 3 or h_vfm.shape[-1] != self.width:
      raise ValueError(f"PAE.encode: h_vfm must be (B, N, {self.width}) VFM tokens, got "
                       f"{h_vfm.shape}")
    if x.ndim != 4 or x.shape[-1] != 3 or x.shape[0] != h_vfm.shape[0]:
      raise ValueError(f"PAE.encode: x must be NHWC RGB with the tokens' batch, got {x.shape}")
    h_vfm = h_vfm.astype(self.dtype)
    if self.use_dam:
      h_z, delta = self.dam(x, h_vfm)
    else:
      h_z, delta = h_vfm, None
    z, z_pre = self.compressor(h_z)
    return z, {"h_z": h_z, "delta": delta, "z_pre": z_pre}

  def decode(self, z: jax.Array) -> jax.Array:
    """z (B, g, g, d) -> out (B, g*p, g*p, 3), VFM-normalised (see `denormalize`)."""
    if z.ndim != 4 or z.shape[-1] != self.latent_dim or z.shape[1] != z.shape[2]:
      raise ValueError(f"PAE.decode: z must be (B, g, g, {self.latent_dim}), got {z.shape}")
    return self.decoder(self.decompressor(z))

  def __call__(self, x: jax.Array, h_vfm: jax.Array, *, train: bool = False) -> jax.Array:
    z, _ = self.encode(x, h_vfm, train=train)
    return self.decode(z)


PAE_FIELDS = tuple(f for f in PAE.__dataclass_fields__
                   if f not in ("parent", "name", "dtype", "param_dtype"))


def model_fields(model_config: Any = None, **overrides) -> dict:
  """PAE keyword arguments from `variant` plus explicit (non-None) fields.

  model_config: a mapping / ConfigDict with `variant` and any PAE field (latent_dim, fusion,
  width, ...); overrides win. Unknown keys raise a ValueError naming them.
  """
  cfg = dict(model_config.to_dict() if hasattr(model_config, "to_dict")
             else (model_config or {}))
  cfg.update({k: v for k, v in overrides.items() if v is not None})
  variant = cfg.pop("variant", None)
  fields = decode_variant(variant) if variant else {}
  unknown = sorted(k for k in cfg if k not in PAE_FIELDS)
  if unknown:
    raise ValueError(f"PAE model config: unknown field(s) {unknown}; known: {list(PAE_FIELDS)}")
  fields.update({k: v for k, v in cfg.items() if v is not None})
  return fields


def make_pae(model_config: Any = None, *, dtype: Dtype = jnp.float32,
             param_dtype: Dtype = jnp.float32, **overrides) -> PAE:
  """PAE(**model_fields(model_config, **overrides), dtype=..., param_dtype=...).

  E.g. `make_pae({"variant": "L", "latent_dim": 32})` is the released PAE_DINOv2L_d32
  without its VFM; pass `width=` / `num_heads=` when the VFM is not DINOv2-L.
  """
  return PAE(**model_fields(model_config, **overrides), dtype=dtype, param_dtype=param_dtype)


# ------------------------------------------------------------------------------ the VFM


def vfm_inputs(images_01: jax.Array, size: int) -> jax.Array:
  """[0, 1] NHWC images -> the VFM/DAM input: torch bicubic (a = -0.75, no antialias,
  float32 source coordinates, align_corners=False) to size x size when the side differs,
  then ImageNet mean/std (authors' `PAE.encode`). float32 (B, size, size, 3)."""
  if images_01.ndim != 4 or images_01.shape[-1] != 3:
    raise ValueError(f"PAE vfm_inputs expects NHWC RGB images, got shape {images_01.shape}")
  x = images_01.astype(jnp.float32)
  if x.shape[1:3] != (size, size):
    x = dinov2_lib.torch_resize(x, (size, size), method="bicubic", antialias=False)
  mean = jnp.asarray(dinov2_lib.IMAGENET_MEAN, jnp.float32)
  std = jnp.asarray(dinov2_lib.IMAGENET_STD, jnp.float32)
  return (x - mean) / std


def denormalize(out: jax.Array) -> jax.Array:
  """Decoder output (VFM-normalised) -> [0, 1]-nominal image out * std + mean (unclipped)."""
  mean = jnp.asarray(dinov2_lib.IMAGENET_MEAN, jnp.float32)
  std = jnp.asarray(dinov2_lib.IMAGENET_STD, jnp.float32)
  return out.astype(jnp.float32) * std + mean


def vfm_tokens(dinov2_module: dinov2_lib.DinoV2, vfm_params: dict, x: jax.Array) -> jax.Array:
  """H_vfm (B, N, D): the frozen DINOv2's last hidden state after its (affine-free) final
  LayerNorm with CLS and registers dropped, float32 behind stop_gradient. x from
  `vfm_inputs`; vfm_params the DinoV2 params (not a {"params": ...} dict)."""
  out = dinov2_module.apply({"params": vfm_params}, x)
  return jax.lax.stop_gradient(out["patch_tokens"].astype(jnp.float32))


# -------------------------------------------------------------------------- param counts


def part_counts(params: Any) -> dict:
  """{"dam", "compressor", "decompressor", "decoder", "trainable"} parameter counts of a PAE
  params tree (arrays or ShapeDtypeStructs, boxed or not)."""
  params = nn.meta.unbox(params)
  count = lambda t: int(sum(int(np.prod(np.shape(a))) for a in jax.tree.leaves(t)))
  out = {k: count(params.get(k, {})) for k in ("dam", "compressor", "decompressor", "decoder")}
  out["trainable"] = count(params)
  return out


def param_counts(config: Any) -> dict:
  """Parameter counts of each part of a PAE config, via `jax.eval_shape` (no memory).

  config: a full PAE config (`config.model` the PAE fields, `config.vfm` the DINOv2: variant
  or width/depth/num_heads, num_registers, patch_size, pos_grid, image_size,
  final_norm_affine). Returns {"vfm", "dam", "compressor", "decompressor", "decoder",
  "trainable"}; the VFM is frozen and not part of "trainable". The PAE's width and heads
  follow the VFM's.
  """
  v = config.vfm
  info = dict(variant=v.get("variant") or None, num_registers=int(v.num_registers),
              patch_size=int(v.patch_size), pos_grid=int(v.get("pos_grid") or 37),
              final_norm_affine=bool(v.get("final_norm_affine", False)))
  if info["variant"] is None:
    info.update(width=int(v.width), depth=int(v.depth), num_heads=int(v.num_heads), ffn="mlp")
  dcfg = dinov2_lib.resolve_config(info["variant"], width=info.get("width"),
                                   depth=info.get("depth"), num_heads=info.get("num_heads"),
                                   ffn=info.get("ffn"))
  size = int(v.image_size)
  grid = size // info["patch_size"]
  vfm = dinov2_lib.DinoV2(**info)
  vfm_shapes = jax.eval_shape(vfm.init, jax.random.key(0),
                              jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
  model = make_pae(config.model, width=dcfg["width"], num_heads=dcfg["num_heads"])
  shapes = jax.eval_shape(
      functools.partial(model.init, train=False), jax.random.key(0),
      jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32),
      jax.ShapeDtypeStruct((1, grid * grid, dcfg["width"]), jnp.float32))
  counts = part_counts(shapes["params"])
  vfm_count = part_counts({"vfm": vfm_shapes["params"]})["trainable"]
  return {"vfm": vfm_count, **counts}
