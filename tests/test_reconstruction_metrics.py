"""PSNR / SSIM against numpy and scikit-image on real photos; the accumulator."""

import numpy as np
import pytest
from scipy import ndimage
import skimage.data
from skimage.metrics import structural_similarity

from gae_jax.evaluation import reconstruction as rec


def _photo_pairs():
  """Crops of three skimage photos in [0, 1] with a noisy and a blurred distortion."""
  rng = np.random.default_rng(0)
  refs, dists = [], []
  for name, (r0, c0) in (("astronaut", (40, 150)), ("coffee", (100, 200)),
                         ("chelsea", (60, 120))):
    img = getattr(skimage.data, name)()[r0:r0 + 64, c0:c0 + 80].astype(np.float64) / 255.0
    refs += [img, img]
    dists += [np.clip(img + rng.normal(0.0, 0.08, img.shape), 0.0, 1.0),
              ndimage.gaussian_filter(img, (1.5, 1.5, 0))]
  return np.stack(refs), np.stack(dists)


def test_ssim_matches_skimage_on_photos():
  ref, dist = _photo_pairs()
  expected = np.array([
      structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
                            use_sample_covariance=False, data_range=1.0, channel_axis=-1)
      for a, b in zip(ref, dist)])
  assert expected.min() < 0.6 and expected.max() > 0.85  # both distortions exercised
  # House convention: [-1, 1] images.
  ours = np.asarray(rec.ssim_per_image(ref * 2 - 1, dist * 2 - 1))
  np.testing.assert_allclose(ours, expected, atol=1e-4)
  np.testing.assert_allclose(rec.ssim(ref * 2 - 1, dist * 2 - 1), expected.mean(), atol=1e-4)
  # Same as skimage on uint8 with data_range 255 (the [0, 1] mapping is what matters).
  u8 = lambda x: np.round(x * 255).astype(np.uint8)
  exp_u8 = structural_similarity(u8(ref[0]), u8(dist[0]), gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False, data_range=255,
                                 channel_axis=-1)
  got_u8 = rec.ssim(u8(ref[:1]).astype(np.float32), u8(dist[:1]).astype(np.float32),
                    value_range=(0.0, 255.0))
  np.testing.assert_allclose(got_u8, exp_u8, atol=1e-4)
  assert rec.ssim(ref[:1] * 2 - 1, ref[:1] * 2 - 1) == pytest.approx(1.0, abs=1e-6)


def test_psnr_exact():
  ref, dist = _photo_pairs()
  x, y = ref * 2 - 1, dist * 2 - 1
  mse = np.mean((x - y) ** 2, axis=(1, 2, 3))
  expected = 10 * np.log10(4.0 / mse)
  np.testing.assert_allclose(np.asarray(rec.psnr_per_image(x, y)), expected, rtol=1e-6)
  np.testing.assert_allclose(rec.psnr(x, y), expected.mean(), rtol=1e-6)  # mean of per-image
  assert abs(rec.psnr(x, y) - 10 * np.log10(4.0 / mse.mean())) > 0.1
  # data_range 2 on [-1, 1] == data_range 1 on [0, 1].
  np.testing.assert_allclose(rec.psnr(ref, dist, data_range=1.0), expected.mean(), rtol=1e-6)
  assert np.isinf(rec.psnr(x[:1], x[:1]))
  with pytest.raises(ValueError, match=r"\(6, 64, 80, 3\).*\(6, 64, 79, 3\)"):
    rec.psnr(x, y[:, :, :79])


def test_quantize_uint8():
  x = np.array([-1.0, -0.999, 0.0, 0.5, 1.0, 1.7])
  q = np.asarray(rec.quantize_uint8(x))
  np.testing.assert_allclose((q + 1) * 127.5, [0, 0, 128, 191, 255, 255], atol=1e-4)


def test_reconstruction_accumulator():
  ref, dist = _photo_pairs()
  x, y = ref * 2 - 1, dist * 2 - 1
  lp = np.linspace(0.1, 0.6, 6)
  acc = rec.ReconstructionAccumulator()
  acc.update(x[:4], y[:4], lpips=lp[:4])
  other = rec.ReconstructionAccumulator().update(x[4:], y[4:], lpips=lp[4:])
  res = acc.merge(other).result()
  assert res["num_images"] == 6 and len(acc) == 6
  np.testing.assert_allclose(res["psnr"], rec.psnr(x, y), rtol=1e-6)
  np.testing.assert_allclose(res["ssim"], rec.ssim(x, y), rtol=1e-6)
  np.testing.assert_allclose(res["lpips"], lp.mean(), rtol=1e-12)
  np.testing.assert_allclose(acc.values()["lpips"], lp)
  acc.add(lpips=[0.3])
  with pytest.raises(ValueError, match="different numbers"):
    acc.result()
  with pytest.raises(ValueError, match="lpips has 3 values"):
    rec.ReconstructionAccumulator().update(x[:2], y[:2], lpips=lp[:3])
