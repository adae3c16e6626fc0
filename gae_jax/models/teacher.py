"""Stage 1 semantic teacher: downsampler E_sp + throw-away feature decoder D_sp.

Input is a frozen VFM feature grid f (B, h, w, C) (DINOv2-L: 16x16x1024 x_norm_patchtokens);
the target is RMSNorm(no affine)(f). E_sp maps it to latents (B, h, w, d) on the sphere of
radius sqrt(d); D_sp reconstructs the target from them (docs/method.md, stage 1; paper Sec. 4,
Tab. 2, Alg. 1).

Downsampler variants (`make_downsampler(kind, ...)`, paper Tab. 2 / Tab. 1):
  attn_patchconv  (default, Alg. 1) x + pos -> attn(RMSNorm(x)) [no residual, no MLP] ->
                  RMSNorm -> windowed linear (w x w windows, w^2*C -> w^2*d, no bias) ->
                  RMSNorm(d). w = 1 in the released code.
  attn_linear     the same with one per-token linear C -> d shared by all tokens (= w = 1).
                  With w = 1 the two coincide, so the Tab. 2 gap (63.4 vs 75.6 LP) implies
                  the paper's patch conv used w > 1; Tab. 13's count points to w = 4 (below).
  attn            "Single Attn" (FAE): x + pos -> attention whose output projection maps
                  straight to d -> RMSNorm(d).
  svd             fixed projection (x - mean) @ V_d -> RMSNorm(d); mean and V_d live in the
                  non-trainable "svd" collection, fitted with `fit_svd` / `SVDAccumulator`.

Released (PyTorch, tokenizer/utils/sp_teacher/sp_teacher.py `DinoReconstructor4D`) names ->
ours, for a converter:
  pos_embed_pro (1, N, C)                -> downsampler/pos_embed
  projector_block.attn.qkv.weight        -> downsampler/projector_block/attn/qkv/kernel
                                            (out = [q; k; v], each heads x head_dim)
  projector_block.attn.proj.weight       -> downsampler/projector_block/attn/proj/kernel
  to_latent.weight (w^2 d, w^2 C)        -> downsampler/to_latent/kernel (transposed); the
                                            flattened window is ordered (wy, wx, c)
  recon_head.weight (C, d)               -> decoder/recon_head/kernel (transposed)
  pos_embed_dec (1, N, C)                -> decoder/pos_embed
  decoder_layers.{i}.attn.{qkv,proj}     -> decoder/decoder_layers_{i}/attn/{qkv,proj}
  decoder_layers.{i}.mlp.{fc1,gate,fc2}  -> decoder/decoder_layers_{i}/mlp/{fc1,gate,fc2}
  norm_target, norm_neck1/2, norm_recon, block norms, q/k norms: all parameter-free.
Attention heads default to C // 64 as released (16 for DINOv2-L). The released Linear
layers use PyTorch's default init; ours use xavier-uniform (layers.py), pos-embeds
trunc-normal(0.02) as released.

Parameter counts (C=1024, d=32, L=4; see tests): the paper's Tab. 13 numbers are reproduced
exactly when the two 256x1024 pos-embeds are left out and the patch conv has w = 4:
E*_sp 316.95M = DINOv2-L 304,368,640 + attention 4*C^2 + to_latent (16C x 16d) 8*C^2;
D_sp 51.41M = 4 blocks x 12,845,056 + recon_head 32,768. With w = 1 (released default)
the downsampler has 4,489,216 parameters including its pos-embed.
"""

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gae_jax.models import layers

Dtype = Any

DOWNSAMPLERS = ("attn_patchconv", "attn_linear", "attn", "svd")
SVD_COLLECTION = "svd"


# ----------------------------------------------------------------------------- windows


def window_partition(x: jax.Array, w: int) -> jax.Array:
  """(B, H, W, C) -> (B * H/w * W/w, w*w, C); windows row-major, tokens (wy, wx) inside."""
  b, h, wd, c = x.shape
  if h % w or wd % w:
    raise ValueError(f"grid {h}x{wd} is not divisible by window {w}")
  x = x.reshape(b, h // w, w, wd // w, w, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b * (h // w) * (wd // w), w * w, c)


def window_reverse(windows: jax.Array, w: int, height: int, width: int) -> jax.Array:
  """Inverse of `window_partition`: (B * H/w * W/w, w*w, C) -> (B, H, W, C)."""
  n, ww, c = windows.shape
  if ww != w * w or height % w or width % w:
    raise ValueError(f"window_reverse: windows {windows.shape} do not fit window {w} on a "
                     f"{height}x{width} grid")
  per_image = (height // w) * (width // w)
  if n % per_image:
    raise ValueError(f"window_reverse: {n} windows is not a multiple of {per_image} "
                     f"(grid {height}x{width}, window {w})")
  x = windows.reshape(n // per_image, height // w, width // w, w, w, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n // per_image, height, width, c)


# ----------------------------------------------------------------------------- blocks


def _heads(width: int, num_heads: Optional[int]) -> int:
  """Released rule: head_dim 64 (C // 64 heads) unless given."""
  heads = num_heads or max(1, width // 64)
  if width % heads:
    raise ValueError(f"feature width {width} is not divisible by num_heads {heads}")
  return heads


def _pos_embed(module: nn.Module, n: int, width: int, dtype: Dtype) -> jax.Array:
  return module.param("pos_embed", nn.with_logical_partitioning(
      nn.initializers.truncated_normal(0.02), (None, "pos", "embed")), (1, n, width), dtype)


class _AttentionTo(nn.Module):
  """layers.Attention whose output projection maps to `out_features` (FAE single attention).

  Written here because layers.Attention always projects back to the input width.
  """
  num_heads: int
  out_features: int
  qk_norm: Optional[str] = "rms"
  attention_impl: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    hd = width // self.num_heads
    qkv = nn.DenseGeneral(
        (3, self.num_heads, hd), use_bias=False, dtype=self.dtype,
        param_dtype=self.param_dtype, name="qkv",
        kernel_init=layers.dense_init(("embed", None, "heads", "kv"),
                                      nn.initializers.xavier_uniform()))(x)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if self.qk_norm:
      if self.qk_norm not in ("rms", "rms_affine"):
        raise ValueError(f"unknown qk_norm {self.qk_norm!r}: use None, 'rms' or 'rms_affine'")
      norm = functools.partial(layers.RMSNorm, use_scale=self.qk_norm == "rms_affine",
                               dtype=self.dtype, param_dtype=self.param_dtype,
                               scale_axis="kv")
      q, k = norm(name="q_norm")(q), norm(name="k_norm")(k)
    out = jax.nn.dot_product_attention(q, k, v, implementation=self.attention_impl)
    return nn.DenseGeneral(
        self.out_features, axis=(-2, -1), use_bias=False, dtype=self.dtype,
        param_dtype=self.param_dtype, name="proj",
        kernel_init=layers.dense_init(("heads", "kv", "latent"),
                                      nn.initializers.xavier_uniform()))(out)


class AttentionOnlyBlock(nn.Module):
  """attn(RMSNorm(x)): one attention, NO residual and NO MLP (released
  `BasicTransformerBlock_Simple`). `out_features` (FAE variant) projects to that width."""
  num_heads: int
  out_features: Optional[int] = None
  qk_norm: Optional[str] = "rms"
  attention_impl: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = layers.RMSNorm(dtype=self.dtype, name="norm1")(x)
    kw = dict(qk_norm=self.qk_norm, attention_impl=self.attention_impl, dtype=self.dtype,
              param_dtype=self.param_dtype, name="attn")
    if self.out_features is None:
      return layers.Attention(self.num_heads, **kw)(h)
    return _AttentionTo(self.num_heads, self.out_features, **kw)(h)


# ----------------------------------------------------------------------------- downsamplers


class WindowedLinear(nn.Module):
  """Alg. 1 patch conv: w x w windows, flatten (wy, wx, c) -> Linear(w^2 C -> w^2 d, no
  bias) -> reverse windows. (B, H, W, C) -> (B, H, W, d); w = 1 is a per-token linear."""
  features: int
  window: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    win = self.window
    if win < 1 or h % win or w % win:
      raise ValueError(f"feature grid {h}x{w} is not divisible by window {win}")
    kernel = self.param("kernel", layers.dense_init(("embed", "latent")),
                        (win * win * c, win * win * self.features), self.param_dtype)
    x = window_partition(x.astype(self.dtype), win)             # (B*nW, w^2, C)
    y = x.reshape(x.shape[0], win * win * c) @ kernel.astype(self.dtype)
    return window_reverse(y.reshape(x.shape[0], win * win, self.features), win, h, w)


class AttnPatchConvDownsampler(nn.Module):
  """Alg. 1: pos-embed -> attention-only block -> RMSNorm -> windowed linear -> RMSNorm(d).

  (B, h, w, C) -> (B, h, w, d) float32 with every token on the sqrt(d) sphere.
  `window=1` is a per-token linear (the released setting and the `attn_linear` variant).
  """
  latent_dim: int
  window: int = 1
  num_heads: Optional[int] = None
  channels: Optional[int] = None
  qk_norm: Optional[str] = "rms"
  attention_impl: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, feats: jax.Array) -> jax.Array:
    b, h, w, c = _check_feats(feats, self.channels)
    win = self.window
    if win < 1 or h % win or w % win:
      raise ValueError(f"feature grid {h}x{w} is not divisible by window {win}")
    x = feats.reshape(b, h * w, c).astype(self.dtype)
    x = x + _pos_embed(self, h * w, c, self.param_dtype).astype(self.dtype)
    x = layers.constrain(x)
    x = AttentionOnlyBlock(_heads(c, self.num_heads), qk_norm=self.qk_norm,
                           attention_impl=self.attention_impl, dtype=self.dtype,
                           param_dtype=self.param_dtype, name="projector_block")(x)
    x = layers.RMSNorm(dtype=self.dtype, name="norm_neck1")(x)
    x = WindowedLinear(self.latent_dim, win, dtype=self.dtype, param_dtype=self.param_dtype,
                       name="to_latent")(x.reshape(b, h, w, c))
    return layers.RMSNorm(dtype=jnp.float32, name="norm_neck2")(x)


class SingleAttnDownsampler(nn.Module):
  """FAE "Single Attn": pos-embed -> attn(RMSNorm(x)) projecting to d -> RMSNorm(d)."""
  latent_dim: int
  num_heads: Optional[int] = None
  channels: Optional[int] = None
  qk_norm: Optional[str] = "rms"
  attention_impl: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, feats: jax.Array) -> jax.Array:
    b, h, w, c = _check_feats(feats, self.channels)
    x = feats.reshape(b, h * w, c).astype(self.dtype)
    x = x + _pos_embed(self, h * w, c, self.param_dtype).astype(self.dtype)
    x = AttentionOnlyBlock(_heads(c, self.num_heads), out_features=self.latent_dim,
                           qk_norm=self.qk_norm, attention_impl=self.attention_impl,
                           dtype=self.dtype, param_dtype=self.param_dtype,
                           name="projector_block")(layers.constrain(x))
    return layers.RMSNorm(dtype=jnp.float32, name="norm_neck2")(x.reshape(b, h, w, -1))


class SVDDownsampler(nn.Module):
  """Fixed projection: RMSNorm_d((f - mean) @ components), no trainable parameters.

  `mean` (C,) and `components` (C, d) live in the "svd" collection (not "params") and are
  initialised to NaN, so a model whose projection was never set (see `set_svd`) yields NaN
  rather than silently running on a random or zero matrix.
  """
  latent_dim: int
  channels: Optional[int] = None

  @nn.compact
  def __call__(self, feats: jax.Array) -> jax.Array:
    b, h, w, c = _check_feats(feats, self.channels)
    nan = lambda shape: jnp.full(shape, jnp.nan, jnp.float32)
    mean = self.variable(SVD_COLLECTION, "mean", nan, (c,))
    comps = self.variable(SVD_COLLECTION, "components", nan, (c, self.latent_dim))
    x = feats.astype(jnp.float32) - mean.value
    x = jnp.einsum("bhwc,cd->bhwd", x, comps.value, precision=jax.lax.Precision.HIGHEST)
    return layers.rms_normalize(x)


def _check_feats(feats: jax.Array, channels: Optional[int]) -> tuple[int, int, int, int]:
  if feats.ndim != 4:
    raise ValueError(f"teacher expects a feature grid (B, h, w, C), got shape {feats.shape}")
  if channels is not None and feats.shape[-1] != channels:
    raise ValueError(f"teacher built for C={channels} features, got shape {feats.shape}")
  return feats.shape


def make_downsampler(kind: str, latent_dim: int, width: Optional[int] = None,
                     window: int = 1, num_heads: Optional[int] = None, *,
                     qk_norm: Optional[str] = "rms", attention_impl: Optional[str] = None,
                     dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                     name: Optional[str] = None) -> nn.Module:
  """Downsampler E_sp by name (see module docstring). `width` = VFM channels C (optional,
  checked against the input); `num_heads` None = C // 64 (released, 16 for DINOv2-L)."""
  if kind not in DOWNSAMPLERS:
    raise ValueError(f"unknown downsampler {kind!r}; choose from {DOWNSAMPLERS}")
  if window != 1 and kind != "attn_patchconv":
    raise ValueError(f"downsampler {kind!r} has no window (got window={window}); only "
                     "'attn_patchconv' does")
  if kind == "svd":
    return SVDDownsampler(latent_dim, channels=width, name=name)
  kw = dict(num_heads=num_heads, channels=width, qk_norm=qk_norm,
            attention_impl=attention_impl, dtype=dtype, param_dtype=param_dtype, name=name)
  if kind == "attn":
    return SingleAttnDownsampler(latent_dim, **kw)
  return AttnPatchConvDownsampler(latent_dim, window=window, **kw)


# ----------------------------------------------------------------------------- SVD fit


class SVDAccumulator:
  """Streams token features (any (..., C) batches) into float64 sums for `fit_svd`.

  Lets the projection be fitted on 64k images x 256 tokens without holding them all.
  """

  def __init__(self, channels: int):
    self.n = 0
    self.sum = np.zeros((channels,), np.float64)
    self.gram = np.zeros((channels, channels), np.float64)

  def update(self, feats) -> None:
    x = np.asarray(feats, np.float64)
    if x.shape[-1] != self.sum.shape[0]:
      raise ValueError(f"SVDAccumulator: expected {self.sum.shape[0]} channels, got shape "
                       f"{x.shape}")
    x = x.reshape(-1, x.shape[-1])
    self.n += x.shape[0]
    self.sum += x.sum(0)
    self.gram += x.T @ x

  def finalize(self, latent_dim: int, center: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(mean (C,), components (C, d)) float32: the top-d right singular vectors of the
    (centred if `center`) token matrix, by descending singular value; each column's sign is
    fixed so its largest-magnitude entry is positive. mean is zeros when not centred."""
    c = self.sum.shape[0]
    if not 0 < latent_dim <= c:
      raise ValueError(f"fit_svd: latent_dim {latent_dim} must be in [1, {c}]")
    if self.n < 2:
      raise ValueError(f"fit_svd: need at least 2 feature vectors, got {self.n}")
    mean = self.sum / self.n if center else np.zeros((c,))
    # Right singular vectors of X - 1 mean^T = eigenvectors of its Gram matrix.
    gram = self.gram - self.n * np.outer(mean, mean)
    evals, evecs = np.linalg.eigh((gram + gram.T) / 2)
    comps = evecs[:, ::-1][:, :latent_dim]
    idx = np.argmax(np.abs(comps), axis=0)
    comps = comps * np.sign(comps[idx, np.arange(latent_dim)])
    return mean.astype(np.float32), comps.astype(np.float32)


def fit_svd(features, latent_dim: int, center: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Fits the `svd` downsampler on token features (N, C) (or (..., C)) with numpy.

  Returns (mean (C,), components (C, d)). centred by default (PCA); the paper only says
  "SVD projection matrix from 64,000 ImageNet samples", `center=False` gives the plain
  truncated SVD of the (RMS-normalised) tokens, with mean = 0. Equivalent to
  `np.linalg.svd(X - mean)`'s first d rows of Vt, up to sign.
  """
  acc = SVDAccumulator(np.shape(features)[-1])
  acc.update(features)
  return acc.finalize(latent_dim, center=center)


def set_svd(variables: dict, mean, components, *, path: tuple[str, ...] = ("downsampler",)
            ) -> dict:
  """Returns `variables` with the "svd" collection at `path` set to (mean, components).

  `path` is the downsampler's module path: ("downsampler",) inside `SemanticTeacher`,
  () for a bare `SVDDownsampler`. Shapes are checked against the initialised ones.
  """
  new = {"mean": jnp.asarray(mean, jnp.float32),
         "components": jnp.asarray(components, jnp.float32)}
  old = variables.get(SVD_COLLECTION)
  for p in path:
    old = None if old is None else old.get(p)
  if old is None:
    raise ValueError(f"set_svd: variables have no '{SVD_COLLECTION}' collection at "
                     f"{'/'.join(path) or '<root>'} (was the model built with 'svd'?)")
  for k, v in new.items():
    if tuple(old[k].shape) != tuple(v.shape):
      raise ValueError(f"set_svd: {k} has shape {tuple(v.shape)}, the model expects "
                       f"{tuple(old[k].shape)}")
  tree = new
  for p in reversed(path):
    tree = {p: tree}
  out = dict(variables)
  out[SVD_COLLECTION] = _merge(dict(variables[SVD_COLLECTION]), tree)
  return out


def _merge(a: dict, b: dict) -> dict:
  out = dict(a)
  for k, v in b.items():
    out[k] = _merge(dict(a[k]), v) if isinstance(v, dict) and k in a else v
  return out


# ----------------------------------------------------------------------------- decoder


class FeatureDecoder(nn.Module):
  """D_sp: Linear(d -> C, no bias) + pos-embed -> L Llama-style blocks -> RMSNorm.

  Blocks: pre-norm, parameter-free RMSNorm, QK-RMSNorm attention, SwiGLU hidden
  256*ceil(C*4*2/3/256), no biases (layers.Block). No output linear, no learned norm
  weights: the output is directly the RMS-normalised reconstruction, as released.
  Paper L = 4, released L = 1. (B, h, w, d) -> (B, h, w, C) float32.
  """
  width: int
  depth: int = 1
  num_heads: Optional[int] = None
  mlp_hidden: Optional[int] = None
  qk_norm: Optional[str] = "rms"
  attention_impl: Optional[str] = None
  remat: str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    if z.ndim != 4:
      raise ValueError(f"FeatureDecoder expects latents (B, h, w, d), got shape {z.shape}")
    b, h, w, _ = z.shape
    x = nn.Dense(self.width, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                 name="recon_head", kernel_init=layers.dense_init(("latent", "embed")))(
                     z.reshape(b, h * w, -1).astype(self.dtype))
    x = x + _pos_embed(self, h * w, self.width, self.param_dtype).astype(self.dtype)
    block = layers.Block
    if self.remat != "none":
      if self.remat not in layers.REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {self.remat!r}; choose from "
                         f"{sorted(layers.REMAT_POLICIES)}")
      block = nn.remat(layers.Block, policy=layers.REMAT_POLICIES[self.remat])
    for i in range(self.depth):
      x, _ = block(num_heads=_heads(self.width, self.num_heads),
                   mlp_hidden=self.mlp_hidden or layers.swiglu_hidden(self.width),
                   qk_norm=self.qk_norm, attention_impl=self.attention_impl,
                   dtype=self.dtype, param_dtype=self.param_dtype,
                   name=f"decoder_layers_{i}")(x, None)
    x = layers.RMSNorm(dtype=jnp.float32, name="norm_recon")(x)
    return x.reshape(b, h, w, self.width)


# ----------------------------------------------------------------------------- teacher


class SemanticTeacher(nn.Module):
  """E_sp + D_sp. `__call__(feats) -> (recon, aux)`, aux = {'latent', 'target'}.

  feats: VFM grid (B, h, w, C); target = RMSNorm(no affine)(feats) (a no-op to ~1e-6 on
  features already normalised by `gae_jax.models.vfm`). recon and target are float32
  (B, h, w, C); latent is float32 (B, h, w, d) on the sqrt(d) sphere. Stage 2 calls
  `model.apply({'params': {'downsampler': ...}[, 'svd': ...]}, feats, method='latents')`;
  the decoder's parameters are not needed there.
  """
  channels: int
  latent_dim: int = 32
  downsampler: str = "attn_patchconv"
  window: int = 1
  num_heads: Optional[int] = None
  decoder_depth: int = 1
  decoder_num_heads: Optional[int] = None
  decoder_mlp_hidden: Optional[int] = None
  qk_norm: Optional[str] = "rms"
  attention_impl: Optional[str] = None
  remat: str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    self.down = make_downsampler(
        self.downsampler, self.latent_dim, self.channels, self.window, self.num_heads,
        qk_norm=self.qk_norm, attention_impl=self.attention_impl, dtype=self.dtype,
        param_dtype=self.param_dtype, name="downsampler")
    self.decoder = FeatureDecoder(
        self.channels, self.decoder_depth, num_heads=self.decoder_num_heads,
        mlp_hidden=self.decoder_mlp_hidden, qk_norm=self.qk_norm,
        attention_impl=self.attention_impl, remat=self.remat, dtype=self.dtype,
        param_dtype=self.param_dtype)

  def target(self, feats: jax.Array) -> jax.Array:
    return layers.rms_normalize(jax.lax.stop_gradient(feats).astype(jnp.float32))

  def latents(self, feats: jax.Array) -> jax.Array:
    """Teacher latents E_sp(RMSNorm(f)): (B, h, w, d) float32 on the sqrt(d) sphere."""
    return self.down(self.target(feats))

  def __call__(self, feats: jax.Array):
    target = self.target(feats)
    latent = self.down(target)
    return self.decoder(latent), dict(latent=latent, target=target)


# ----------------------------------------------------------------------------- losses


def cosine_loss(pred: jax.Array, target: jax.Array, eps: float = 1e-8) -> jax.Array:
  """Paper eq. 4 as a distance: mean over tokens of 1 - cos(pred, target) (last axis)."""
  p = pred.astype(jnp.float32)
  t = target.astype(jnp.float32)
  dot = jnp.sum(p * t, axis=-1)
  norms = jnp.sqrt(jnp.sum(p * p, axis=-1) * jnp.sum(t * t, axis=-1))
  return jnp.mean(1.0 - dot / jnp.maximum(norms, eps))


def normalized_mse_loss(pred: jax.Array, target: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Released loss: MSE (mean over all elements) between RMS-normalised pred and target.

  For RMS-normalised a, b in R^C (|a|^2 = |b|^2 = C): mean_c (a - b)^2 = 2 (1 - cos(a, b)),
  so this equals 2 * cosine_loss up to the eps of the normalisation.
  """
  p = layers.rms_normalize(pred.astype(jnp.float32), eps)
  t = layers.rms_normalize(target.astype(jnp.float32), eps)
  return jnp.mean(jnp.square(p - t))


def teacher_loss(pred: jax.Array, target: jax.Array, kind: str = "mse") -> jax.Array:
  """kind 'mse' (released, = 2(1 - cos)) or 'cos' (paper, mean 1 - cos)."""
  if kind == "mse":
    return normalized_mse_loss(pred, target)
  if kind == "cos":
    return cosine_loss(pred, target)
  raise ValueError(f"unknown teacher loss {kind!r}; use 'mse' or 'cos'")


def param_count(tree) -> int:
  """Number of scalars in a (possibly boxed / ShapeDtypeStruct) parameter tree."""
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nn.unbox(tree))))
