"""Sharded Inception features: FID independent of batch size and device count; the
generation metrics of an ADM-layout .npz against a stats file."""

import warnings

import jax
import numpy as np
import pytest

from gae_jax.evaluation import features as features_lib
from gae_jax.evaluation import fid as fid_lib
from gae_jax.evaluation import generation as gen_lib
from gae_jax.evaluation import reference as reference_lib

# One xdist worker runs this whole file: its module fixtures (compiles) are built once.
pytestmark = pytest.mark.xdist_group("eval_features")

N = 12  # images; with batch 8 the last batch is padded (12 = 8 + 4)


@pytest.fixture(scope="module")
def inception_vars():
  from gae_jax.convert import inception as inc_convert
  try:
    return inc_convert.load_inception_params()
  except (ImportError, FileNotFoundError) as e:  # no torch / fid-helper and no cache
    pytest.skip(f"FID Inception weights unavailable: {e}")


@pytest.fixture(scope="module")
def images():
  rng = np.random.default_rng(0)
  # Smooth-ish random images (a few blobs) so features are not degenerate.
  base = rng.integers(0, 256, (N, 8, 8, 3)).astype(np.float32)
  up = np.repeat(np.repeat(base, 8, axis=1), 8, axis=2)
  noise = rng.normal(0, 12, up.shape)
  return np.clip(up + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def one_device(inception_vars, images):
  ext = features_lib.InceptionFeatures(
      inception_vars, mesh=features_lib.eval_mesh(jax.devices()[:1]), batch_size=N,
      keep_feats=True)
  return features_lib.features_of_array(ext, images)


@pytest.fixture(scope="module")
def eight_devices(inception_vars, devices8):
  return features_lib.InceptionFeatures(
      inception_vars, mesh=features_lib.eval_mesh(devices8), batch_size=8, keep_feats=True)


def _other_stats(dim=2048, n=64):
  x = np.random.default_rng(1).normal(0.3, 0.5, (n, dim))
  return x.mean(0), np.cov(x, rowvar=False)


def test_fid_independent_of_devices_and_batch(one_device, eight_devices, images):
  res8 = features_lib.features_of_array(eight_devices, images)
  assert eight_devices.rows == 8 and res8.count == one_device.count == N
  np.testing.assert_allclose(res8.feats, one_device.feats, rtol=1e-5, atol=1e-5)
  mu1, s1 = one_device.stats.mean, one_device.stats.cov
  mu8, s8 = res8.stats.mean, res8.stats.cov
  np.testing.assert_allclose(mu8, mu1, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(s8, s1, rtol=1e-4, atol=1e-7)
  mo, so = _other_stats()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # 20 samples: rank-deficient on purpose
    fid1 = fid_lib.frechet_distance(mu1, s1, mo, so)
    fid8 = fid_lib.frechet_distance(mu8, s8, mo, so)
    self_fid = fid_lib.frechet_distance(mu8, s8, mu1, s1)
  assert fid1 > 1.0
  assert abs(fid8 - fid1) <= 1e-5 * fid1
  assert self_fid < 1e-3
  # The streamed stats equal the stats of the gathered features (padding rows dropped).
  f64 = res8.feats.astype(np.float64)
  ref_mu, ref_sigma = f64.mean(0), np.cov(f64, rowvar=False)
  np.testing.assert_allclose(mu8, ref_mu, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(s8, ref_sigma, rtol=1e-5, atol=1e-8)


def test_generation_metrics_of_npz(tmp_path, one_device, eight_devices, images):
  samples = tmp_path / "samples.npz"
  np.savez(samples, arr_0=images)
  mu, sigma = one_device.stats.mean, one_device.stats.cov
  ref_path = reference_lib.save_stats(tmp_path / "ref.npz", mu, sigma, one_device.feats)
  ref = reference_lib.load_reference_stats(ref_path)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    out = gen_lib.evaluate_samples(eight_devices, str(samples), ref, num_samples=-1)
  assert out["num_samples"] == N
  assert out["fid"] < 1e-3                         # the set against itself
  assert out["precision"] == 1.0 and out["recall"] == 1.0
  assert "pt_inception" in out["inception_score_note"]   # no fc in fid-helper's weights
  # A shifted set is far away and its precision drops.
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    out2 = gen_lib.evaluate_samples(eight_devices, 255 - images, ref)
  assert out2["fid"] > 10.0
  with pytest.raises(ValueError, match="pt_inception"):
    features_lib.InceptionFeatures({"params": {}}, keep_logits=True)


def test_helpers_pad_and_slice():
  x = np.arange(6).reshape(3, 2)
  np.testing.assert_array_equal(features_lib.pad_rows(x, 5)[3:], 0)
  with pytest.raises(ValueError, match="exceeds"):
    features_lib.pad_rows(x, 2)
  assert features_lib.process_slice(7) == (0, 7)
  assert features_lib.to_uint8_images(np.array([[-1.0, 0.0, 1.0]])).tolist() == [[0, 128, 255]]
  st = fid_lib.ActivationStats().update(np.ones((3, 4)))
  assert features_lib.allgather_stats(st, 4) is st  # single process: no transport
