"""Reconstruction metrics: PSNR, SSIM (per image, in JAX) and a host-side accumulator.

Images are NHWC float in [-1, 1] (a single HWC image is also accepted).

- PSNR = 10 log10(data_range^2 / MSE) per image (MSE over H, W, C), then the mean over
  images (not the PSNR of the pooled MSE). data_range=2 on [-1, 1] equals PSNR on [0, 1]
  images with range 1 or uint8 with 255. Identical images give +inf.
- SSIM as scikit-image's `structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=1, channel_axis=-1)` on the images mapped to
  [0, 1]: 11x11 Gaussian window (sigma 1.5), K1 0.01, K2 0.03, the SSIM map averaged over
  the interior where the window fits (skimage filters with reflect padding and then crops
  (11-1)//2 = 5 pixels from every border, which is exactly the 'valid' region) and over
  channels. SSIM is not shift-invariant, so the [0, 1] mapping matters: it gives the usual
  numbers (as on uint8 with data_range 255). The computation is dm-pix's `pix.ssim`
  (separable 'valid' Gaussian filter, float32), which matches skimage to ~1e-6; see
  tests/test_reconstruction_metrics.py.
- Whether to quantise reconstructions to uint8 first is the caller's choice
  (`quantize_uint8` gives the [-1, 1] values of the nearest uint8 levels).
"""

import functools

import dm_pix as pix
import jax
import jax.numpy as jnp
import numpy as np

SSIM_FILTER_SIZE = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _check_pair(x, y) -> tuple[jax.Array, jax.Array]:
  x, y = jnp.asarray(x), jnp.asarray(y)
  if x.shape != y.shape:
    raise ValueError(f"image shapes differ: x {x.shape} vs y {y.shape}")
  if x.ndim == 3:
    x, y = x[None], y[None]
  if x.ndim != 4:
    raise ValueError(f"expected NHWC (or HWC) images, got shape {x.shape}")
  dt = jnp.promote_types(jnp.promote_types(x.dtype, y.dtype), jnp.float32)
  return x.astype(dt), y.astype(dt)


def quantize_uint8(x: jax.Array) -> jax.Array:
  """[-1, 1] images -> the [-1, 1] values of their nearest uint8 levels (clipped)."""
  q = jnp.round(jnp.clip((jnp.asarray(x) + 1.0) * 127.5, 0.0, 255.0))
  return q / 127.5 - 1.0


@functools.partial(jax.jit, static_argnames=("data_range",))
def _psnr(x, y, data_range: float):
  mse = jnp.mean(jnp.square(x - y), axis=(1, 2, 3))
  return 10.0 * jnp.log10(data_range**2 / mse)


def psnr_per_image(x, y, data_range: float = 2.0) -> jax.Array:
  """PSNR of each image pair [N] in dB (data_range 2 for [-1, 1] images)."""
  if data_range <= 0:
    raise ValueError(f"data_range must be > 0, got {data_range}")
  x, y = _check_pair(x, y)
  return _psnr(x, y, float(data_range))


def psnr(x, y, data_range: float = 2.0) -> float:
  """Mean over images of the per-image PSNR (dB)."""
  return float(jnp.mean(psnr_per_image(x, y, data_range)))


@functools.partial(jax.jit, static_argnames=("lo", "hi"))
def _ssim(x, y, lo: float, hi: float):
  scale = 1.0 / (hi - lo)
  return pix.ssim((x - lo) * scale, (y - lo) * scale, max_val=1.0,
                  filter_size=SSIM_FILTER_SIZE, filter_sigma=SSIM_SIGMA,
                  k1=SSIM_K1, k2=SSIM_K2)


def ssim_per_image(x, y, value_range: tuple[float, float] = (-1.0, 1.0)) -> jax.Array:
  """SSIM of each image pair [N]; images in `value_range` are mapped to [0, 1] first."""
  lo, hi = (float(v) for v in value_range)
  if not hi > lo:
    raise ValueError(f"value_range must be (lo, hi) with hi > lo, got {value_range}")
  x, y = _check_pair(x, y)
  if min(x.shape[1:3]) < SSIM_FILTER_SIZE:
    raise ValueError(f"SSIM needs images of at least {SSIM_FILTER_SIZE}x{SSIM_FILTER_SIZE}, "
                     f"got shape {x.shape}")
  return _ssim(x, y, lo, hi)


def ssim(x, y, value_range: tuple[float, float] = (-1.0, 1.0)) -> float:
  """Mean over images of the per-image SSIM."""
  return float(jnp.mean(ssim_per_image(x, y, value_range)))


class ReconstructionAccumulator:
  """Gathers per-image PSNR / SSIM / LPIPS values over an evaluation and reports means.

  `update(x, y)` computes PSNR and SSIM of a batch; LPIPS (or any other per-image metric)
  is computed by the caller and passed as `lpips=` / `**values`. Only per-image scalars
  reach the host. Every metric must end with the same number of values.
  """

  def __init__(self, data_range: float = 2.0, value_range: tuple[float, float] = (-1.0, 1.0)):
    self.data_range = data_range
    self.value_range = value_range
    self._values: dict[str, list[np.ndarray]] = {}

  def add(self, **values) -> "ReconstructionAccumulator":
    """Appends per-image values, e.g. add(lpips=[N] array)."""
    for name, v in values.items():
      if v is None:
        continue
      arr = np.asarray(v, np.float64).reshape(-1)
      self._values.setdefault(name, []).append(arr)
    return self

  def update(self, x=None, y=None, *, lpips=None, **values) -> "ReconstructionAccumulator":
    """Adds PSNR and SSIM of the batch (x, y) (if given) and any per-image values passed."""
    if (x is None) != (y is None):
      raise ValueError("pass both x and y (or neither)")
    if x is not None:
      n = jnp.shape(x)[0] if jnp.ndim(x) == 4 else 1
      if lpips is not None and np.size(lpips) != n:
        raise ValueError(f"lpips has {np.size(lpips)} values for a batch of {n} images")
      self.add(psnr=psnr_per_image(x, y, self.data_range),
               ssim=ssim_per_image(x, y, self.value_range))
    return self.add(lpips=lpips, **values)

  def merge(self, other: "ReconstructionAccumulator") -> "ReconstructionAccumulator":
    """Adds the values of another accumulator (e.g. another host's) into this one."""
    for name, vals in other._values.items():
      self._values.setdefault(name, []).extend(vals)
    return self

  def values(self) -> dict[str, np.ndarray]:
    """All per-image values, concatenated in order of arrival."""
    return {k: np.concatenate(v) for k, v in self._values.items()}

  def result(self) -> dict[str, float]:
    """{metric: mean over images, ..., 'num_images': N}."""
    vals = self.values()
    if not vals:
      raise ValueError("ReconstructionAccumulator is empty")
    counts = {k: v.size for k, v in vals.items()}
    if len(set(counts.values())) != 1:
      raise ValueError(f"metrics have different numbers of values: {counts}")
    out: dict[str, float] = {k: float(np.mean(v)) for k, v in vals.items()}
    out["num_images"] = next(iter(counts.values()))
    return out

  def __len__(self) -> int:
    return max((sum(a.size for a in v) for v in self._values.values()), default=0)

