"""DINOv2 ViT-S/B/L/g (patch 14) as a frozen feature extractor, numerically matching the
PyTorch releases (facebookresearch torch-hub and Hugging Face `Dinov2Model` /
`Dinov2WithRegistersModel`).

Weights come from `gae_jax.convert.dinov2.load_dinov2_params(path)`, which also returns
the keyword arguments of `DinoV2` for that checkpoint:

  params, info = load_dinov2_params("dinov2_vitl14_pretrain.pth")
  model = DinoV2(**info)
  out = model.apply({"params": params}, preprocess(images_m11))
  out["patch_tokens"]  # (B, 256, 1024) = x_norm_patchtokens at 224x224

Position embeddings are learned on a 37x37 grid (518 px) and resized bicubically to the
input's grid exactly as PyTorch does (`F.interpolate(mode="bicubic")`, with or without
antialias, with the torch-hub `interpolate_offset` scale-factor quirk when asked).
"""

import functools
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gae_jax.models import layers

Dtype = Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Released sizes; every variant has head_dim 64 and patch 14; g uses the fused SwiGLU MLP.
VARIANTS = {
    "S": dict(width=384, depth=12, num_heads=6, ffn="mlp"),
    "B": dict(width=768, depth=12, num_heads=12, ffn="mlp"),
    "L": dict(width=1024, depth=24, num_heads=16, ffn="mlp"),
    "g": dict(width=1536, depth=40, num_heads=24, ffn="swiglu"),
}
FFN_TYPES = ("mlp", "swiglu")


def mlp_hidden_size(width: int, ffn: str, mlp_ratio: float = 4.0) -> int:
  """Hidden width of the released MLP: width*ratio, or for SwiGLU 2/3 of it rounded up to 8."""
  hidden = int(width * mlp_ratio)
  if ffn == "swiglu":
    hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
  return hidden


def resolve_config(variant: Optional[str] = None, **overrides) -> dict:
  """Merges `VARIANTS[variant]` with explicit (non-None) overrides; they must agree."""
  if variant is not None and variant not in VARIANTS:
    raise ValueError(f"unknown DINOv2 variant {variant!r}; choose from {sorted(VARIANTS)}")
  cfg = dict(VARIANTS[variant]) if variant is not None else {}
  for k, v in overrides.items():
    if v is None:
      continue
    if k in cfg and cfg[k] != v:
      raise ValueError(f"DINOv2 variant {variant!r} has {k}={cfg[k]}, but {k}={v} was given")
    cfg[k] = v
  for k in ("width", "depth", "num_heads", "ffn"):
    if k not in cfg:
      raise ValueError(f"DINOv2: {k} is not set (give variant= or {k}=)")
  if cfg["ffn"] not in FFN_TYPES:
    raise ValueError(f"DINOv2 ffn={cfg['ffn']!r}; use one of {FFN_TYPES}")
  if cfg["width"] % cfg["num_heads"]:
    raise ValueError(f"DINOv2 width {cfg['width']} not divisible by num_heads {cfg['num_heads']}")
  if cfg.get("mlp_hidden") is None:
    cfg["mlp_hidden"] = mlp_hidden_size(cfg["width"], cfg["ffn"])
  return cfg


# ---------------------------------------------------------------------------------------
# Exact PyTorch resampling as (out, in) matrices. Written here on purpose: torch's plain
# bicubic uses Keys a=-0.75 with clamped edge indices, its antialiased bicubic uses a=-0.5
# with PIL-style support scaling and renormalised edge weights; `jax.image.resize` matches
# neither exactly. Sizes are static, so the matrices are numpy constants.
# ---------------------------------------------------------------------------------------


def _cubic(x, a):
  x = abs(x)
  if x <= 1:
    return ((a + 2) * x - (a + 3)) * x * x + 1
  if x < 2:
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return x * 0


def _triangle(x):
  return max(x * 0, 1 - abs(x))


@functools.lru_cache(maxsize=128)
def torch_resize_matrix(in_size: int, out_size: int, method: str = "bicubic",
                        antialias: bool = False, scale_factor: Optional[float] = None
                        ) -> np.ndarray:
  """(out_size, in_size) matrix W with `W @ x` == torch `F.interpolate` along one axis.

  method: "bicubic" or "bilinear"; align_corners=False. `scale_factor` (output/input), when
  given, is used for the coordinate mapping as torch does when `scale_factor=` is passed.
  Coordinates and weights are computed in float32 like torch's CPU kernels, so the
  matrices agree with torch to float rounding.
  """
  if method not in ("bicubic", "bilinear"):
    raise ValueError(f"resize method {method!r}; use 'bicubic' or 'bilinear'")
  f = np.float32
  # input pixels per output pixel
  scale = f(1.0 / scale_factor) if scale_factor else f(f(in_size) / f(out_size))
  w = np.zeros((out_size, in_size), np.float32)
  if antialias:
    interp = 4 if method == "bicubic" else 2
    support = f(interp * 0.5) * scale if scale >= 1.0 else f(interp * 0.5)
    invscale = f(1.0) / scale if scale >= 1.0 else f(1.0)
    for i in range(out_size):
      center = scale * f(i + 0.5)
      xmin = max(int(center - support + f(0.5)), 0)
      xmax = min(int(center + support + f(0.5)), in_size)
      ks = []
      for j in range(xmin, xmax):
        arg = (f(j) - center + f(0.5)) * invscale
        ks.append(f(_cubic(arg, f(-0.5))) if method == "bicubic" else f(_triangle(arg)))
      ks = np.asarray(ks, np.float32)
      total = f(0)
      for k in ks:
        total = f(total + k)
      w[i, xmin:xmax] = ks / total if total != 0 else ks
    return w
  for i in range(out_size):
    if method == "bicubic":
      real = scale * f(i + 0.5) - f(0.5)
      x0 = min(math.floor(real), in_size - 1)
      t = min(max(real - f(x0), f(0)), f(1))
      a = f(-0.75)
      coeffs = (_cubic(t + f(1), a), _cubic(t, a), _cubic(f(1) - t, a), _cubic(f(2) - t, a))
      for k, c in zip(range(-1, 3), coeffs):
        w[i, min(max(x0 + k, 0), in_size - 1)] += c
    else:
      real = max(scale * f(i + 0.5) - f(0.5), f(0))
      x0 = min(int(real), in_size - 1)
      x1 = min(x0 + 1, in_size - 1)
      t = min(max(real - f(x0), f(0)), f(1))
      w[i, x0] += f(1) - t
      w[i, x1] += t
  return w


def torch_resize(x: jax.Array, size: tuple[int, int], *, axes: tuple[int, int] = (1, 2),
                 method: str = "bicubic", antialias: bool = False,
                 scale_factor: Optional[tuple[float, float]] = None) -> jax.Array:
  """Resizes two axes of x (default NHWC's H, W) like torch `F.interpolate`, in float32."""
  out = x.astype(jnp.float32)
  for axis, n_out, sf in zip(axes, size, scale_factor or (None, None)):
    n_in = x.shape[axis]
    if n_in == n_out and sf is None:
      continue
    m = jnp.asarray(torch_resize_matrix(n_in, n_out, method, antialias, sf), jnp.float32)
    out = jnp.moveaxis(jnp.tensordot(m, jnp.moveaxis(out, axis, 0), axes=1,
                                     precision=jax.lax.Precision.HIGHEST), 0, axis)
  return out


def interpolate_pos_embed(pos_embed: jax.Array, grid: tuple[int, int], *,
                          antialias: bool = False, offset: float = 0.0) -> jax.Array:
  """Resizes the (1, G*G, C) patch position embeddings to (1, gh*gw, C), bicubic, float32.

  offset=0: `size=(gh, gw)` (Hugging Face, torch-hub register models); offset=0.1:
  `scale_factor=((gh+0.1)/G, (gw+0.1)/G)` (torch-hub models without registers).
  """
  n, c = pos_embed.shape[1:]
  g = math.isqrt(n)
  if g * g != n:
    raise ValueError(f"position embedding has {n} patch rows, not a square grid")
  sf = ((grid[0] + offset) / g, (grid[1] + offset) / g) if offset else None
  if sf is not None and tuple(math.floor(g * s) for s in sf) != tuple(grid):
    raise ValueError(f"interpolate_offset={offset} does not give the grid {grid}")
  p = pos_embed.reshape(1, g, g, c)
  p = torch_resize(p, grid, method="bicubic", antialias=antialias, scale_factor=sf)
  return p.reshape(1, grid[0] * grid[1], c)


def preprocess(images_m11: jax.Array, size: int = 224, *, method: str = "bicubic",
               antialias: bool = True, crop: bool = True, clip: bool = False) -> jax.Array:
  """[-1, 1] NHWC -> shorter side resized to `size`, center crop `size`, ImageNet mean/std.

  The resize follows torchvision `Resize(size)` + `CenterCrop(size)` on tensors
  (long side = int(size * long / short); antialiased torch bicubic by default, which is the
  PIL filter). `clip=True` clamps to [0, 1] after resizing like a uint8 PIL pipeline would.
  Returns float32 NHWC.
  """
  if images_m11.ndim != 4 or images_m11.shape[-1] != 3:
    raise ValueError(f"preprocess expects NHWC RGB images, got shape {images_m11.shape}")
  h, w = images_m11.shape[1:3]
  x = (images_m11.astype(jnp.float32) + 1.0) * 0.5
  short, long = (h, w) if h <= w else (w, h)
  new_short, new_long = size, int(size * long / short)
  new_h, new_w = (new_short, new_long) if h <= w else (new_long, new_short)
  if (new_h, new_w) != (h, w):
    x = torch_resize(x, (new_h, new_w), method=method, antialias=antialias)
  if clip:
    x = jnp.clip(x, 0.0, 1.0)
  if crop:
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    x = x[:, top:top + size, left:left + size]
  mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
  std = jnp.asarray(IMAGENET_STD, jnp.float32)
  return (x - mean) / std


# ---------------------------------------------------------------------------------------
# Modules.
# ---------------------------------------------------------------------------------------


def _dense_init(names):
  return layers.dense_init(names, nn.initializers.xavier_uniform())


def _zeros(names):  # no constraint on unbox: see layers.dense_init (DenseGeneral)
  return layers.dense_init(names, nn.initializers.zeros)


class Attention(nn.Module):
  """Softmax attention with fused qkv (bias) and output projection (bias), no QK-norm."""
  num_heads: int
  attention_impl: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    head_dim = width // self.num_heads
    qkv = nn.DenseGeneral(
        (3, self.num_heads, head_dim), dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=_dense_init(("embed", None, "heads", "kv")),
        bias_init=_zeros((None, "heads", "kv")), name="qkv")(x)
    out = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2],
                                       implementation=self.attention_impl)
    return nn.DenseGeneral(
        width, axis=(-2, -1), dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=_dense_init(("heads", "kv", "embed")), bias_init=_zeros(("embed",)),
        name="proj")(out)


class Mlp(nn.Module):
  """fc2(gelu(fc1(x))) (exact erf GELU), or the fused SwiGLU w3(silu(x1) * x2), w12 = [x1|x2]."""
  hidden: int
  ffn: str = "mlp"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
    up = dict(kernel_init=_dense_init(("embed", "mlp")), bias_init=_zeros(("mlp",)))
    down = dict(kernel_init=_dense_init(("mlp", "embed")), bias_init=_zeros(("embed",)))
    if self.ffn == "swiglu":
      x12 = dense(2 * self.hidden, name="w12", **up)(x)
      h = nn.silu(x12[..., :self.hidden]) * x12[..., self.hidden:]
      return dense(x.shape[-1], name="w3", **down)(h)
    h = nn.gelu(dense(self.hidden, name="fc1", **up)(x), approximate=False)
    return dense(x.shape[-1], name="fc2", **down)(h)


class Block(nn.Module):
  """x + ls1 * attn(LN(x)); x + ls2 * mlp(LN(x)) (LayerScale vectors `ls1`, `ls2`)."""
  num_heads: int
  mlp_hidden: int
  ffn: str = "mlp"
  eps: float = 1e-6
  attention_impl: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    norm = functools.partial(nn.LayerNorm, epsilon=self.eps, dtype=self.dtype,
                             param_dtype=self.param_dtype, use_fast_variance=False,
                             scale_init=nn.with_logical_partitioning(
                                 nn.initializers.ones, ("embed",)),
                             bias_init=_zeros(("embed",)))
    ls_init = nn.with_logical_partitioning(nn.initializers.constant(1e-5), ("embed",))
    ls1 = self.param("ls1", ls_init, (width,), self.param_dtype)
    ls2 = self.param("ls2", ls_init, (width,), self.param_dtype)
    h = Attention(self.num_heads, self.attention_impl, self.dtype, self.param_dtype,
                  name="attn")(norm(name="norm1")(x))
    x = x + h * ls1.astype(self.dtype)
    h = Mlp(self.mlp_hidden, self.ffn, self.dtype, self.param_dtype, name="mlp")(
        norm(name="norm2")(x))
    return x + h * ls2.astype(self.dtype)


class DinoV2(nn.Module):
  """DINOv2 ViT on ImageNet-normalised NHWC images (see `preprocess`).

  Give `variant` ("S", "B", "L", "g") or set `variant=None` and width/depth/num_heads/ffn
  explicitly (explicit values must agree with the variant when both are given).
  `interpolate_antialias=None` means "antialias iff num_registers > 0" (both releases);
  `interpolate_offset=0.1` reproduces torch-hub models without registers, 0.0 Hugging Face
  (`Dinov2Model` and `Dinov2WithRegistersModel` of transformers resize to `size=(gh, gw)`;
  with registers they antialias). `final_norm_affine=False` drops the final LayerNorm's
  weight and bias (no `norm` parameters): PAE's frozen VFM sets them to None
  (PAE tokenizer/encoders/dinov2.py, `normalize=True`; shared/PAE_SPEC.md §2.2).

  Returns a dict: `cls` (B, C), `registers` (B, R, C), `patch_tokens` (B, N, C) -- all after
  the final LayerNorm (x_norm_*) -- and, with `return_intermediates=True`, `intermediates`:
  a list of the `depth` raw block outputs (B, 1+R+N, C).
  """
  variant: Optional[str] = "L"
  width: Optional[int] = None
  depth: Optional[int] = None
  num_heads: Optional[int] = None
  ffn: Optional[str] = None
  mlp_hidden: Optional[int] = None
  num_registers: int = 0
  patch_size: int = 14
  pos_grid: int = 37
  layer_norm_eps: float = 1e-6
  interpolate_offset: float = 0.0
  interpolate_antialias: Optional[bool] = None
  final_norm_affine: bool = True
  attention_impl: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def config(self) -> dict:
    return resolve_config(self.variant, width=self.width, depth=self.depth,
                          num_heads=self.num_heads, ffn=self.ffn, mlp_hidden=self.mlp_hidden)

  @nn.compact
  def __call__(self, images: jax.Array, *, return_intermediates: bool = False) -> dict:
    cfg = self.config
    width, p = cfg["width"], self.patch_size
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"DinoV2 expects NHWC RGB images, got shape {images.shape}")
    b, height, wid = images.shape[:3]
    grid = (height // p, wid // p)
    if min(grid) < 1:
      raise ValueError(f"DinoV2: image {height}x{wid} is smaller than one {p}px patch")

    x = nn.Conv(width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=_dense_init((None, None, None, "embed")),
                bias_init=_zeros(("embed",)), name="patch_embed")(images.astype(self.dtype))
    x = x.reshape(b, grid[0] * grid[1], width)

    normal = nn.initializers.truncated_normal(0.02)
    cls_token = self.param("cls_token", nn.with_logical_partitioning(
        normal, (None, None, "embed")), (1, 1, width), self.param_dtype)
    pos_embed = self.param("pos_embed", nn.with_logical_partitioning(
        normal, (None, "pos", "embed")), (1, 1 + self.pos_grid ** 2, width), self.param_dtype)
    if grid == (self.pos_grid, self.pos_grid) and height == wid:
      patch_pos = pos_embed[:, 1:].astype(jnp.float32)
    else:
      antialias = (self.num_registers > 0 if self.interpolate_antialias is None
                   else self.interpolate_antialias)
      patch_pos = interpolate_pos_embed(pos_embed[:, 1:], grid, antialias=antialias,
                                        offset=self.interpolate_offset)
    x = jnp.concatenate([jnp.broadcast_to(cls_token.astype(self.dtype), (b, 1, width)), x], 1)
    pos = jnp.concatenate([pos_embed[:, :1].astype(jnp.float32), patch_pos], 1)
    x = x + pos.astype(self.dtype)
    r = self.num_registers
    if r:
      registers = self.param("register_tokens", nn.with_logical_partitioning(
          normal, (None, None, "embed")), (1, r, width), self.param_dtype)
      x = jnp.concatenate(
          [x[:, :1], jnp.broadcast_to(registers.astype(self.dtype), (b, r, width)), x[:, 1:]], 1)

    intermediates = []
    for i in range(cfg["depth"]):
      x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
      x = Block(cfg["num_heads"], cfg["mlp_hidden"], cfg["ffn"], self.layer_norm_eps,
                self.attention_impl, self.dtype, self.param_dtype, name=f"block_{i}")(x)
      if return_intermediates:
        intermediates.append(x)
    x = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype,
                     param_dtype=self.param_dtype, use_fast_variance=False,
                     use_scale=self.final_norm_affine, use_bias=self.final_norm_affine,
                     scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                     bias_init=_zeros(("embed",)), name="norm")(x)
    out = {"cls": x[:, 0], "registers": x[:, 1:1 + r], "patch_tokens": x[:, 1 + r:]}
    if return_intermediates:
      out["intermediates"] = intermediates
    return out


def dinov2(variant: str = "L", **kw) -> DinoV2:
  """Factory: `dinov2("L", num_registers=4, dtype=jnp.bfloat16)`."""
  return DinoV2(variant=variant, **kw)
