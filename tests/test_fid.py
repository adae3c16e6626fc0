"""FID / IS / precision-recall maths and reference-stats files against independent references."""

import os
import warnings

import numpy as np
import pytest
from scipy import linalg

from gae_jax.evaluation import fid
from gae_jax.evaluation import reference


def _pytorch_fid_reference(mu1, sigma1, mu2, sigma2, eps=1e-6):
  """pytorch-fid's `calculate_frechet_distance` (scipy sqrtm with the eps-offset fallback)."""
  diff = mu1 - mu2
  covmean = linalg.sqrtm(sigma1.dot(sigma2))
  if isinstance(covmean, tuple):  # older scipy with disp=False semantics
    covmean = covmean[0]
  if not np.isfinite(covmean).all():
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
  if np.iscomplexobj(covmean):
    assert np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3)
    covmean = covmean.real
  return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def _features(rng, n, d, shift=0.0):
  """Correlated, non-negative-ish features like Inception pool outputs."""
  mix = rng.normal(size=(d, d)) / np.sqrt(d)
  return np.abs(rng.normal(size=(n, d)) @ mix + shift) + 0.1 * rng.normal(size=(n, d))


def test_frechet_distance_matches_sqrtm_reference():
  rng = np.random.default_rng(0)
  a = _features(rng, 800, 48)
  b = _features(rng, 700, 48, shift=0.3)
  mu1, s1 = a.mean(0), np.cov(a, rowvar=False)
  mu2, s2 = b.mean(0), np.cov(b, rowvar=False)
  ref = _pytorch_fid_reference(mu1, s1, mu2, s2)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # well-conditioned: no warning
    ours = fid.frechet_distance(mu1, s1, mu2, s2)
  assert ref > 0.1
  np.testing.assert_allclose(ours, ref, rtol=1e-6)
  # Symmetric, and the mean term alone when the covariances agree.
  np.testing.assert_allclose(fid.frechet_distance(mu2, s2, mu1, s1), ours, rtol=1e-9)
  np.testing.assert_allclose(fid.frechet_distance(mu1, s1, mu2, s1),
                             np.sum((mu1 - mu2) ** 2), rtol=1e-6)


def test_frechet_distance_self_is_zero():
  rng = np.random.default_rng(1)
  mu, s = fid.stats_from_features(_features(rng, 1000, 32))
  assert abs(fid.frechet_distance(mu, s, mu, s)) < 1e-6


def test_frechet_distance_rank_deficient_is_finite_and_warns():
  rng = np.random.default_rng(2)
  a, b = rng.normal(size=(10, 64)), rng.normal(size=(10, 64)) + 0.5
  with pytest.warns(UserWarning, match="samples for 64 dims"):
    mu1, s1 = fid.stats_from_features(a)
  with pytest.warns(UserWarning):
    mu2, s2 = fid.stats_from_features(b)
  with pytest.warns(UserWarning, match="near-singular"):
    val = fid.frechet_distance(mu1, s1, mu2, s2)
  assert np.isfinite(val) and val >= 0.0 and isinstance(val, float)
  # Close to the offset-regularised sqrtm answer (eigenvalues ~1e-16 vs 1e-6 offsets).
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    ref = _pytorch_fid_reference(mu1, s1 + 1e-6 * np.eye(64), mu2, s2 + 1e-6 * np.eye(64))
  np.testing.assert_allclose(val, ref, rtol=1e-3)
  with pytest.warns(UserWarning):
    assert fid.frechet_distance(mu1, s1, mu1, s1) < 1e-6


def test_frechet_distance_bad_shapes():
  with pytest.raises(ValueError, match=r"\(4, 4\)"):
    fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))
  with pytest.raises(ValueError, match="mu2"):
    fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_streaming_stats_independent_of_chunking():
  rng = np.random.default_rng(3)
  # float32 features (as Inception gives); |mean| >> std stresses cancellation.
  x = _features(rng, 517, 24, shift=50.0).astype(np.float32)
  mu_ref, s_ref = x.astype(np.float64).mean(0), np.cov(x.astype(np.float64), rowvar=False)
  mu0, s0 = fid.stats_from_features(x)
  np.testing.assert_allclose(mu0, mu_ref, rtol=1e-12)
  np.testing.assert_allclose(s0, s_ref, rtol=1e-10, atol=1e-12)
  for sizes in ([517], [1] * 5 + [512], [100, 17, 400], [64] * 8 + [5]):
    acc = fid.ActivationStats()
    start = 0
    for size in sizes:
      acc.update(x[start:start + size])
      start += size
    assert acc.count == 517
    mu, s = acc.finalize()
    np.testing.assert_allclose(mu, mu_ref, rtol=1e-12)
    np.testing.assert_allclose(s, s_ref, rtol=1e-9, atol=1e-11)
  # Sharded: per-shard accumulators merged (any order) == one pass.
  shards = [fid.ActivationStats().update(p) for p in np.array_split(x[::-1], 8)]
  merged = fid.ActivationStats.combine(shards[::-1])
  np.testing.assert_allclose(merged.cov, s_ref, rtol=1e-9, atol=1e-11)
  restored = fid.ActivationStats.from_state_dict(merged.state_dict())
  np.testing.assert_array_equal(restored.cov, merged.cov)
  with pytest.raises(ValueError, match="dim"):
    fid.ActivationStats().update(x[:4]).update(x[:4, :3])


def _is_reference(probs, splits):
  """improved-gan / ADM formula (float64, clipped to avoid log 0)."""
  scores = []
  n = len(probs)
  for i in range(splits):
    part = probs[i * n // splits:(i + 1) * n // splits]
    py = part.mean(0, keepdims=True)
    kl = (part * (np.log(np.clip(part, 1e-300, None)) - np.log(py))).sum(1).mean()
    scores.append(np.exp(kl))
  return np.mean(scores), np.std(scores)


def test_inception_score_matches_reference():
  rng = np.random.default_rng(4)
  logits = rng.normal(size=(1000, 50)) * 3.0
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  ref_mean, ref_std = _is_reference(probs, 10)
  m1, s1 = fid.inception_score(logits, splits=10)
  m2, s2 = fid.inception_score(probs, splits=10)
  np.testing.assert_allclose([m1, s1], [ref_mean, ref_std], rtol=1e-9)
  np.testing.assert_allclose([m2, s2], [ref_mean, ref_std], rtol=1e-9)
  # ADM cuts by split_size: 1000 / 100 == 10 equal splits.
  np.testing.assert_allclose(fid.inception_score(probs, split_size=100), (m2, s2), rtol=1e-12)
  # Perfectly confident, uniformly spread classes: IS == number of classes; 0 log 0 = 0.
  onehot = np.eye(50)[np.arange(1000) % 50]
  m, s = fid.inception_score(onehot, splits=4)
  np.testing.assert_allclose(m, 50.0, rtol=1e-12)
  assert s < 1e-9


def _pr_reference(real, fake, k):
  """Brute force ADM precision / recall in float64 with full distance matrices."""
  def sq(a, b):
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
  r_radii = np.sort(sq(real, real), axis=1)[:, k]
  f_radii = np.sort(sq(fake, fake), axis=1)[:, k]
  d = sq(real, fake)
  precision = np.mean(np.any(d <= r_radii[:, None], axis=0))
  recall = np.mean(np.any(d <= f_radii[None, :], axis=1))
  return precision, recall


def test_precision_recall_exact_on_integer_features():
  # Small integers: float32 distances are exact, and ties / duplicates are frequent, so
  # the <= comparisons and the "k+1-th including self" radius are tested exactly.
  rng = np.random.default_rng(5)
  real = rng.integers(-3, 4, size=(130, 6)).astype(np.float32)
  fake = (rng.integers(-3, 4, size=(101, 6)) + (rng.random((101, 6)) < 0.3)).astype(np.float32)
  ref = _pr_reference(real.astype(np.float64), fake.astype(np.float64), 3)
  assert 0.0 < ref[0] < 1.0 and 0.0 < ref[1] < 1.0
  for batch in (10000, 37):  # one block / padded multi-block
    assert fid.precision_recall(real, fake, k=3, batch=batch) == pytest.approx(ref, abs=0)
  radii = fid.manifold_radii(real, k=3, batch=50)
  d = ((real[:, None].astype(np.float64) - real[None]) ** 2).sum(-1)
  np.testing.assert_array_equal(radii, np.sort(d, axis=1)[:, 3])


def test_precision_recall_gaussian_features():
  rng = np.random.default_rng(6)
  real = rng.normal(size=(300, 32))
  fake = rng.normal(size=(250, 32)) + 0.5
  p_ref, r_ref = _pr_reference(real, fake, 3)
  p, r = fid.precision_recall(real, fake, k=3, batch=128)
  # float32 vs float64 distances may flip a borderline point or two.
  assert abs(p - p_ref) <= 2 / 250 and abs(r - r_ref) <= 2 / 300
  assert 0.05 < p < 0.95 and 0.05 < r < 0.95
  assert fid.precision_recall(real, real, batch=128) == (1.0, 1.0)
  with pytest.raises(ValueError, match=r"\(300, 32\).*\(250, 16\)"):
    fid.precision_recall(real, fake[:, :16])


def test_reference_stats_roundtrip_and_adm_layout(tmp_path):
  rng = np.random.default_rng(7)
  feats = rng.normal(size=(40, 8)).astype(np.float32)
  mu, sigma = fid.stats_from_features(feats)
  ours = tmp_path / "sub" / "stats.npz"
  reference.save_stats(ours, mu, sigma, feats)
  assert sorted(os.listdir(ours.parent)) == ["stats.npz"]  # no temp file left
  st = reference.load_reference_stats(ours)
  np.testing.assert_array_equal(st.mu, mu)
  np.testing.assert_array_equal(st.sigma, sigma)
  np.testing.assert_array_equal(st.feats, feats)
  assert np.load(ours)["mu"].dtype == np.float64  # ADM's read_statistics keys

  # ADM reference batch: mu/sigma/mu_s/sigma_s + uint8 images in arr_0 (streamed).
  images = rng.integers(0, 256, size=(5, 4, 4, 3), dtype=np.uint8)
  adm = tmp_path / "VIRTUAL_tiny.npz"
  np.savez(adm, arr_0=images, mu=mu, sigma=sigma, mu_s=mu[:3], sigma_s=np.eye(3))
  st = reference.load_reference_stats(adm)
  assert st.feats is None and st.images_shape == (5, 4, 4, 3)
  np.testing.assert_array_equal(st.sigma_s, np.eye(3))
  batches = list(reference.iter_reference_images(adm, batch_size=2))
  assert [b.shape[0] for b in batches] == [2, 2, 1]
  np.testing.assert_array_equal(np.concatenate(batches), images)

  # 2-D float arr_0 is read as features.
  alt = tmp_path / "alt.npz"
  np.savez(alt, mu=mu, sigma=sigma, arr_0=feats)
  np.testing.assert_array_equal(reference.load_reference_stats(alt).feats, feats)

  bad = tmp_path / "bad.npz"
  np.savez(bad, mu=mu)
  with pytest.raises(ValueError, match=r"bad\.npz.*'sigma'"):
    reference.load_reference_stats(bad)
  with pytest.raises(FileNotFoundError, match="missing.npz"):
    reference.load_reference_stats(tmp_path / "missing.npz")
  with pytest.raises(ValueError, match=r"\(7,\).*\(8, 8\)"):
    reference.save_stats(tmp_path / "x.npz", mu[:7], sigma)


def test_frechet_memo_is_keyed_on_content():
  """The eigh memo reuses a reference's decomposition but never a stale one."""
  rng = np.random.default_rng(3)
  x, y = rng.normal(size=(200, 16)), rng.normal(size=(200, 16)) * 1.3
  (m1, s1), (m2, s2) = fid.stats_from_features(x), fid.stats_from_features(y)
  fid._EIGH_CACHE.clear()
  first = fid.frechet_distance(m1, s1, m2, s2)
  assert len(fid._EIGH_CACHE) == 2
  assert fid.frechet_distance(m1, s1, m2, s2) == first        # served from the memo
  s2[0, 0] += 1.0                                                 # same object, new content
  changed = fid.frechet_distance(m1, s1, m2, s2)
  fid._EIGH_CACHE.clear()
  assert changed == fid.frechet_distance(m1, s1, m2, s2) != first
  for i in range(6):                                              # bounded size
    fid.frechet_distance(m1, s1 * (i + 2), m2, s2)
  assert len(fid._EIGH_CACHE) <= fid._EIGH_CACHE_SIZE
