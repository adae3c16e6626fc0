"""PAE's latent-manifold metrics (SSC, LPC, GSQ, eRank) on cases with known answers or an
independent NumPy computation, and the eval stage's `manifold` kind end to end on a tiny
random-init GAE."""

import importlib.util
import json
import os

import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from gae_jax.evaluation import manifold as mf


# ---------------------------------------------------------------------------------- eRank


def test_erank_known_singular_values():
  rng = np.random.default_rng(0)
  u, _ = np.linalg.qr(rng.normal(size=(40, 6)))
  v, _ = np.linalg.qr(rng.normal(size=(6, 6)))

  def with_sv(s):
    return u @ np.diag(s) @ v.T

  assert mf.erank(with_sv([2.0, 2, 2, 2, 0, 0])) == pytest.approx(4.0, rel=1e-9)
  assert mf.erank(with_sv([5.0, 0, 0, 0, 0, 0])) == pytest.approx(1.0, rel=1e-9)
  p = np.array([3.0, 1.0]) / 4.0                       # s = (3, 1): p = (3/4, 1/4)
  expected = np.exp(-(p[0] * np.log(p[0]) + p[1] * np.log(p[1])))
  assert mf.erank(with_sv([3.0, 1, 0, 0, 0, 0])) == pytest.approx(expected, rel=1e-9)
  # (B, h, w, d) latents are GAP-pooled first.
  lat = rng.normal(size=(30, 2, 2, 5))
  assert mf.erank(lat) == pytest.approx(mf.erank(lat.mean(axis=(1, 2))), rel=1e-12)
  # Centring removes a shared offset: a rank-1 cloud plus a big mean row has eRank > 1
  # uncentred and exactly 1 centred.
  f = np.outer(rng.normal(size=40), rng.normal(size=6)) + 10.0 * rng.normal(size=6)
  assert mf.erank(f, center=True) == pytest.approx(1.0, abs=1e-6)
  assert mf.erank(f) > 1.2
  with pytest.raises(ValueError, match="zero"):
    mf.erank(np.zeros((4, 3)))


# ------------------------------------------------------------------------------------ GSQ


def _clusters(n_per, n_classes, d, rng, spread=0.05):
  centers = rng.normal(size=(n_classes, d))
  y = np.repeat(np.arange(n_classes), n_per)
  return centers[y] + spread * rng.normal(size=(len(y), d)), y


def test_gsq_clustered_shuffled_and_bruteforce():
  rng = np.random.default_rng(0)
  f, y = _clusters(10, 8, 16, rng)
  lat = np.broadcast_to(f[:, None, None, :], (80, 2, 3, 16))
  assert mf.gsq(lat, y) == 1.0
  assert mf.gsq(f, rng.permutation(y)) < 0.35               # chance is 9/79 ~ 0.11
  # Independent loop: centre, normalise, nearest other point by cosine, label match.
  g = rng.normal(size=(50, 6)) + 0.5
  yy = rng.integers(0, 4, 50)
  c = g - g.mean(axis=0)
  hits = []
  for i in range(50):
    best, best_j = -np.inf, -1
    for j in range(50):
      if j != i:
        cos = c[i] @ c[j] / (np.linalg.norm(c[i]) * np.linalg.norm(c[j]))
        if cos > best:
          best, best_j = cos, j
    hits.append(yy[best_j] == yy[i])
  assert mf.gsq(g, yy) == pytest.approx(np.mean(hits))
  d = mf.gsq_draws(f, y, num_classes=3, draws=4, seed=1)
  assert d["classes_per_draw"] == 3 and len(d["draws"]) == 4 and d["gsq"] == 1.0
  assert mf.gsq_draws(f, y, num_classes=100)["draws"] == [1.0]   # fewer classes: one draw
  with pytest.raises(ValueError, match="GSQ"):
    mf.gsq(f[:1], y[:1])


# ------------------------------------------------------------------------------------ SSC


def _voronoi_segs(b, size, k, rng):
  yy, xx = np.mgrid[:size, :size]
  segs = []
  for _ in range(b):
    c = rng.uniform(0, size, (k, 2))
    segs.append(((yy[..., None] - c[:, 0]) ** 2 + (xx[..., None] - c[:, 1]) ** 2).argmin(-1))
  return np.stack(segs)


def test_project_labels_majority_and_nmi_formula():
  seg = np.zeros((4, 4), np.int64)
  seg[0, :3] = 7
  seg[1, 1:3] = 7                    # cell (0, 0): three 7s, one 0 -> 7; cell (0, 1): 2 vs 2
  np.testing.assert_array_equal(mf.project_labels(seg, (2, 2)), [[7, 0], [0, 0]])
  with pytest.raises(ValueError, match="segmentation"):
    mf.project_labels(seg, (8, 8))
  a = np.array([0, 0, 0, 1, 1, 2, 2, 2])
  b = np.array([1, 1, 0, 0, 0, 2, 2, 1])
  pab = np.zeros((3, 3))
  np.add.at(pab, (a, b), 1.0 / len(a))
  pa, pb = pab.sum(1), pab.sum(0)
  nz = pab > 0
  mi = np.sum(pab[nz] * np.log(pab[nz] / np.outer(pa, pb)[nz]))
  ent = lambda p: -np.sum(p[p > 0] * np.log(p[p > 0]))
  assert mf.nmi(a, b) == pytest.approx(mi / np.sqrt(ent(pa) * ent(pb)), rel=1e-9)


def test_spectral_clustering_recovers_blocks():
  rng = np.random.default_rng(0)
  y = rng.permutation(np.repeat(np.arange(3), 7))
  a = np.where(y[:, None] == y[None, :], 1.0, 0.01) + 0.001 * rng.uniform(size=(21, 21))
  a = (a + a.T) / 2
  np.fill_diagonal(a, 0.0)
  assert mf.nmi(y, mf.spectral_clustering(a, 3)) == pytest.approx(1.0)
  aff = mf.token_affinity(rng.normal(size=(5, 4)), sigma=0.5)
  assert np.all(np.diag(aff) == 0) and np.allclose(aff, aff.T)
  assert np.all(aff[~np.eye(5, dtype=bool)] > 0)
  with pytest.raises(ValueError, match="num_clusters"):
    mf.spectral_clustering(a, 0)


def test_ssc_copied_segmentation_is_one_noise_is_near_zero():
  rng = np.random.default_rng(0)
  segs = _voronoi_segs(4, 32, 5, rng)                       # (4, 32, 32), 5 regions
  vec = rng.normal(size=(4, 5, 8))
  copy = np.stack([vec[i][mf.project_labels(segs[i], (8, 8))] for i in range(4)])
  r = mf.ssc(copy, segs)
  assert r["ssc"] == pytest.approx(1.0) and r["num_images"] == 4
  noise = mf.ssc(rng.normal(size=(4, 8, 8, 8)), segs)
  assert noise["ssc"] < 0.2
  # A one-segment image is skipped (H(y) = 0).
  segs[0] = 3
  assert mf.ssc(copy, segs)["num_skipped"] == 1


def test_superpixels_and_label_folder(tmp_path):
  img = -np.ones((1, 32, 32, 3))
  img[0, :, 16:, 0] = 1.0                                   # left black, right red
  for method in ("slic", "felzenszwalb"):
    s = mf.superpixels(img, method=method, num_segments=4, min_size=10)[0]
    assert s.shape == (32, 32)
    assert not set(np.unique(s[:, :16])) & set(np.unique(s[:, 16:])), method
  with pytest.raises(ValueError, match="method"):
    mf.superpixels(img, method="watershed")
  (tmp_path / "im").mkdir()
  (tmp_path / "lab").mkdir()
  for name in ("a", "b", "c"):
    Image.fromarray(np.full((40, 60, 3), 100, np.uint8)).save(tmp_path / "im" / f"{name}.jpg")
  lab = np.zeros((40, 60, 3), np.uint8)
  lab[:, 30:] = (1, 2, 0)                                   # COCO panoptic id 1 + 256 * 2
  for name in ("a", "c"):
    Image.fromarray(lab).save(tmp_path / "lab" / f"{name}.png")
  x, y, names = mf.load_labelled_images(str(tmp_path / "im"), str(tmp_path / "lab"), 32)
  assert names == ["a", "c"] and x.shape == (2, 32, 32, 3) and y.shape == (2, 32, 32)
  assert set(np.unique(y)) == {0, 513} and y[0, 0, 0] == 0 and y[0, 0, -1] == 513
  assert np.all(np.abs(x - (100 / 127.5 - 1)) < 0.02)
  with pytest.raises(ValueError, match="label map"):
    mf.load_labelled_images(str(tmp_path / "lab"), str(tmp_path / "im"), 32)


# ------------------------------------------------------------------------------------ LPC


def _up(z):
  return jnp.repeat(jnp.repeat(z[..., :3], 2, axis=1), 2, axis=2)


def _l1(a, b):
  return jnp.mean(jnp.abs(a - b), axis=(1, 2, 3))


def test_lpc_weights_constant_decoder_and_numpy_reference():
  np.testing.assert_allclose(mf.lpc_weights(), [0.741, 0.148, 0.074, 0.037], atol=1e-3)
  assert mf.lpc_weights().sum() == pytest.approx(1.0)
  rng = np.random.default_rng(0)
  z = (0.05 * rng.normal(size=(5, 4, 4, 3))).astype(np.float32)
  const = mf.lpc(lambda v: jnp.zeros((v.shape[0], 8, 8, 3)), _l1, z, batch_size=2)
  assert const["lpc"] == 0.0
  # Linear decoder 2 * upsample, no clipping: every term is 2 * eps_s * mean|u| exactly.
  got = mf.lpc(lambda v: 2.0 * _up(v), _l1, z, batch_size=2, clip=False)
  u = mf.sphere_directions(0, np.arange(5), (4, 4, 3)).astype(np.float64)
  np.testing.assert_allclose(np.linalg.norm(u.reshape(5, -1), axis=1), 1.0, rtol=1e-6)
  norms = np.linalg.norm(z.reshape(5, -1).astype(np.float64), axis=1)
  ref = [np.mean(2.0 * r * norms * np.abs(u).mean(axis=(1, 2, 3))) for r in mf.LPC_RHOS]
  np.testing.assert_allclose(list(got["per_scale"].values()), ref, rtol=1e-5)
  assert got["lpc"] == pytest.approx(np.dot(mf.lpc_weights(), ref), rel=1e-5)
  # Batch independence: the direction of image j depends on j only.
  assert mf.lpc(lambda v: 2.0 * _up(v), _l1, z, batch_size=5, clip=False)["lpc"] == \
      pytest.approx(got["lpc"], rel=1e-6)
  # Monotone in a controlled perturbation: a decoder that amplifies more is less continuous.
  vals = [mf.lpc(lambda v, g=g: jnp.tanh(g * _up(v)), _l1, z, batch_size=5)["lpc"]
          for g in (1.0, 3.0, 9.0)]
  assert vals[0] < vals[1] < vals[2]
  with pytest.raises(ValueError, match="rhos"):
    mf.lpc_weights([0.1, 0.0])


# ---------------------------------------------------------------------------------- stage


def test_evaluate_manifold_through_the_tokenizer_interface():
  """A toy tokenizer handle (the agreed .encode_fn / .decode_fn interface): a 4x4 average-pool
  encoder keeps the image's regions, so SSC against the true regions is high; a tokenizer
  whose tokens ignore the image scores low."""
  import types
  import ml_collections
  from gae_jax import configs_lib
  rng = np.random.default_rng(0)
  segs = _voronoi_segs(6, 32, 3, rng)
  colours = np.array([[1.0, -1, -1], [-1, 1, -1], [-1, -1, 1]])
  images = colours[segs].astype(np.float32)                      # (6, 32, 32, 3)

  def pool(params, x):
    b = x.shape[0]
    return x.reshape(b, 8, 4, 8, 4, 3).mean(axis=(2, 4)) * params["s"]

  field = jnp.asarray(rng.normal(size=(16, 8, 8, 3)), jnp.float32)

  def noise(params, x):
    return field[:x.shape[0]] * params["s"]

  def up(params, z):
    return jnp.repeat(jnp.repeat(z / params["s"], 4, axis=1), 4, axis=2)

  cfg = ml_collections.ConfigDict(configs_lib.eval_config(None, kind="manifold").eval.manifold
                                  .to_dict())
  cfg.segmentation = "labels"
  cfg.label_maps = "<in-test regions>"
  out = {}
  for name, enc in (("pool", pool), ("noise", noise)):
    handle = types.SimpleNamespace(family="toy", params={"s": jnp.float32(1.0)},
                                   image_size=32, latent_shape=(8, 8, 3), encode_fn=enc,
                                   decode_fn=up)
    fns = mf.tokenizer_fns(handle)
    z = np.asarray(enc(handle.params, jnp.asarray(images)))
    out[name] = mf.evaluate_manifold(fns, z, np.arange(6) % 3, cfg, ssc_images=images,
                                     ssc_segmentations=segs, batch_size=6)
  assert out["pool"]["ssc"] > 0.8 > 0.3 > out["noise"]["ssc"]
  assert out["pool"]["ssc_segmentation"] == "label maps: <in-test regions>"
  assert "lpc" not in out["pool"]                                 # no LPIPS params: skipped
  assert out["pool"]["num_images"] == 6 and 1.0 <= out["pool"]["erank"] <= 3.0



def test_eval_stage_manifold_kind(tmp_path):
  from gae_jax.trainers import evaluate
  spec = importlib.util.spec_from_file_location(
      "eval_manifold", os.path.join(os.path.dirname(__file__), "..", "configs",
                                    "eval_manifold.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config("runlocal,tokenizer=random")
  assert evaluate.kinds(c) == ["manifold"]
  c.eval.manifold.num_images = 24
  c.eval.manifold.ssc_images = 4
  c.eval.manifold.lpc_images = 4
  c.eval.manifold.lpc_rhos = [0.1, 1.0]
  assert evaluate.plan(c)["manifold"]["segmentation"] == "slic"
  gae = evaluate.random_gae(64, latent_dim=4, patch_size=8)    # 8 x 8 x 4 latents
  evaluate.train_and_evaluate(c, str(tmp_path), tokenizer=gae)
  m = json.loads((tmp_path / "metrics.json").read_text())["manifold"]
  assert m["num_images"] == 24 and m["ssc_num_images"] + m["ssc_skipped"] == 4
  assert 0.0 <= m["ssc"] <= 1.0
  assert m["ssc_segmentation"].startswith("superpixels: scikit-image slic")
  assert m["lpc_num_images"] == 4 and m["lpc"] > 0.0 and list(m["lpc_per_scale"]) == ["0.1", "1.0"]
  assert m["lpc_per_scale"]["0.1"] < m["lpc_per_scale"]["1.0"]
  assert 0.0 <= m["gsq"] <= 1.0 and 1.0 <= m["erank"] <= 4.0
  assert m["erank_ratio"] == pytest.approx(m["erank"] / 4)
  report = (tmp_path / "report.md").read_text()
  assert "Latent manifold" in report and "superpixels" in report
  c.eval.manifold.segmentation = "watershed"
  with pytest.raises(ValueError, match="segmentation"):
    evaluate.run_manifold(c, gae, None, None, {})


@pytest.mark.slow
@pytest.mark.torch
def test_eval_stage_manifold_kind_on_a_pae(tmp_path):
  """The same stage on the other family: a random tiny PAE in the released layout, opened by
  `pretrained.load_pae` (its handle's encode_fn / decode_fn), ~1 min on CPU."""
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  import sys
  sys.path.insert(0, os.path.dirname(__file__))
  import test_pae as tp  # the PAE tests' released-layout writer
  from gae_jax import configs_lib
  from gae_jax import pretrained
  from gae_jax.trainers import evaluate
  handle = pretrained.load_pae(tp._save(tmp_path / "pae.pt", tp._with_vfm(tp._pae_sd("sft"))))
  assert handle.family == "pae"
  c = configs_lib.eval_config("runlocal", kind="manifold")
  c.eval.manifold.num_images = 24
  c.eval.manifold.ssc_images = 4
  c.eval.manifold.lpc_images = 4
  c.eval.manifold.lpc_rhos = [0.1, 1.0]
  m = evaluate.train_and_evaluate(c, str(tmp_path / "eval"), tokenizer=handle)["manifold"]
  h, w, d = handle.latent_shape
  assert m["num_images"] == 24 and 0.0 <= m["ssc"] <= 1.0 and 0.0 <= m["gsq"] <= 1.0
  assert 0.0 < m["lpc_per_scale"]["0.1"] < m["lpc_per_scale"]["1.0"]
  assert m["erank_ratio"] == pytest.approx(m["erank"] / d) and 1.0 <= m["erank"] <= d
