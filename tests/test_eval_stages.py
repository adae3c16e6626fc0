"""Linear probe, latent diagnostics with known answers, the robustness curve and the eval
stage end to end on a tiny in-test GAE."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gae_jax.evaluation import diagnostics as diag
from gae_jax.evaluation import linear_probe as lp
from gae_jax.evaluation import reconstruction_eval as rec


# ------------------------------------------------------------------------- linear probe


CENTERS = np.random.default_rng(42).normal(0, 1, (3, 2, 2, 3)) * 3.0


def _toy(n, rng):
  y = np.arange(n) % len(CENTERS)
  z = CENTERS[y] + rng.normal(0, 0.3, (n, 2, 2, 3))
  return lp.ArrayLatents(z, y)


def test_linear_probe_learns_separable_toy_and_head_shapes():
  rng = np.random.default_rng(0)
  train, val = _toy(60, rng), _toy(30, rng)
  res = lp.run_probes(train, val, num_classes=3, epochs=15, batch_size=16, lr=0.05)
  assert res["flatten"].num_params == 2 * 2 * 3 * 3 + 3
  assert res["GAP"].num_params == 3 * 3 + 3
  assert res["flatten"].top1 == 1.0
  assert res["flatten"].loss_curve[-1] < 0.5 * res["flatten"].loss_curve[0]
  # Zero init: the first step starts from the uniform prediction, loss log(3).
  assert res["GAP"].loss_curve[0] < np.log(3) + 1e-6
  head = lp.LinearHead(num_classes=5, head="GAP")
  p = head.init(jax.random.key(0), jnp.zeros((2, 4, 4, 7)))
  assert p["params"]["fc"]["kernel"].shape == (7, 5)
  assert head.apply(p, jnp.ones((2, 4, 4, 7))).shape == (2, 5)
  with pytest.raises(ValueError, match="head"):
    lp.train_linear_probe(train, val, num_classes=3, head="mean", epochs=1)


# -------------------------------------------------------------------------- diagnostics


def test_spatial_similarity_smooth_vs_random():
  rng = np.random.default_rng(0)
  const = np.broadcast_to(rng.normal(size=(24, 1, 1, 8)), (24, 8, 8, 8))
  r, s = diag.spatial_similarity(const)
  np.testing.assert_array_equal(r, [1, 2, 3, 4])
  np.testing.assert_allclose(s, 1.0, atol=1e-9)
  _, s_rand = diag.spatial_similarity(rng.normal(size=(24, 8, 8, 8)))
  assert np.all(np.abs(s_rand) < 0.05)
  # A smooth field (sum of low-frequency waves) decays with distance.
  yy, xx = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
  ph = rng.uniform(0, 2 * np.pi, (24, 1, 1, 8))
  smooth = np.sin(0.4 * yy[None, :, :, None] + ph) + np.cos(0.3 * xx[None, :, :, None] + 2 * ph)
  _, s_smooth = diag.spatial_similarity(smooth)
  assert s_smooth[0] > 0.7 and np.all(np.diff(s_smooth) < 0)


def test_pca_edge_agreement_known_answers():
  rng = np.random.default_rng(0)
  img = rng.uniform(-1, 1, (10, 8, 8, 3))
  images = np.repeat(np.repeat(img, 4, axis=1), 4, axis=2)     # (10, 32, 32, 3)
  q, _ = np.linalg.qr(rng.normal(size=(16, 3)))                 # orthonormal 3 -> 16
  latents = img @ q.T                                           # linear in the pooled image
  assert diag.pca_edge_agreement(latents, images) == pytest.approx(1.0, abs=1e-6)
  rand = diag.pca_edge_agreement(rng.normal(size=(10, 8, 8, 16)), images)
  assert rand < 0.3
  g = diag.gradient_magnitude(np.arange(16.0).reshape(1, 4, 4, 1))
  np.testing.assert_allclose(g, np.sqrt(1 + 16))                # dx = 1, dy = 4


def test_continuity_gain_and_interpolation():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(6, 4, 4, 8)).astype(np.float32)
  gains = diag.decoder_gain(lambda x: 2.0 * x, z, scales=(0.01, 0.1))
  assert gains[0.01] == pytest.approx(2.0, rel=1e-5) and gains[0.1] == pytest.approx(2.0, rel=1e-5)
  lin = diag.interpolation_smoothness(lambda x: 3.0 * x, z, [(0, 1), (2, 3)], steps=8,
                                      mode="lerp")
  assert lin["roughness"] < 1e-10 and lin["path_ratio"] == pytest.approx(1.0, abs=1e-6)
  wiggly = diag.interpolation_smoothness(lambda x: np.sin(6.0 * x), z, [(0, 1), (2, 3)],
                                         steps=8, mode="lerp")
  assert wiggly["roughness"] > 0.05 and wiggly["path_ratio"] > 1.05
  # slerp keeps each token's norm when the endpoints share it.
  a = z[0] / np.linalg.norm(z[0], axis=-1, keepdims=True)
  b = z[1] / np.linalg.norm(z[1], axis=-1, keepdims=True)
  np.testing.assert_allclose(np.linalg.norm(diag.slerp(a, b, 0.3), axis=-1), 1.0, atol=1e-6)


def test_knn_accuracy():
  rng = np.random.default_rng(0)
  tr, va = _toy(60, rng), _toy(30, rng)
  assert diag.knn_accuracy(tr.latents, tr.labels, va.latents, va.labels, k=5) == 1.0
  shuffled = rng.permutation(tr.labels)
  assert diag.knn_accuracy(tr.latents, shuffled, va.latents, va.labels, k=5) < 0.8


# ---------------------------------------------------------------------------- robustness


def _toy_fns():
  """Encoder = 4x4 average pool, decoder = nearest upsampling (a lossy toy GAE)."""
  def encode(params, x):
    b, h, w, c = x.shape
    return x.reshape(b, h // 4, 4, w // 4, 4, c).mean(axis=(2, 4)) * params["s"]

  def decode(params, z):
    return jnp.repeat(jnp.repeat(z / params["s"], 4, axis=1), 4, axis=2)

  return rec.GAEFns(encode, decode, {"s": jnp.float32(1.0)}, 32, (8, 8, 3))


def test_robustness_curve_monotone_and_batch_independent():
  rng = np.random.default_rng(0)
  base = rng.uniform(-0.8, 0.8, (12, 8, 8, 3))
  imgs = np.repeat(np.repeat(base, 4, axis=1), 4, axis=2) + rng.normal(0, 0.05, (12, 32, 32, 3))
  imgs = (np.round((np.clip(imgs, -1, 1) + 1) * 127.5) / 127.5 - 1).astype(np.float32)
  scales = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)

  def run(bs):
    batches = [(imgs[s:s + bs], np.arange(s, min(s + bs, 12))) for s in range(0, 12, bs)]
    return rec.evaluate_reconstruction(_toy_fns(), batches, batch_size=bs, scales=scales)

  a, b = run(8), run(4)
  psnr = [r["psnr"] for r in a["per_scale"]]
  ssim = [r["ssim"] for r in a["per_scale"]]
  assert all(r["num_images"] == 12 for r in a["per_scale"])
  assert np.all(np.diff(psnr) < 0) and np.all(np.diff(ssim) < 0)
  assert psnr[0] > 25.0
  for ra, rb in zip(a["per_scale"], b["per_scale"]):
    assert ra["psnr"] == pytest.approx(rb["psnr"], rel=1e-6)
    assert ra["ssim"] == pytest.approx(rb["ssim"], rel=1e-6)


# ----------------------------------------------------------------------------- stage


def test_eval_stage_end_to_end(tmp_path):
  import importlib.util
  from gae_jax import main as main_lib
  from gae_jax.trainers import evaluate
  spec = importlib.util.spec_from_file_location(
      "eval_latents", os.path.join(os.path.dirname(__file__), "..", "configs",
                                   "eval_latents.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config("runlocal,tokenizer=random")
  assert main_lib.trainer_for(c.stage) is evaluate
  c.eval.kind = "reconstruction,robustness,linear_probe,diagnostics"
  c.eval.num_images = 8
  c.eval.rfid = False            # Inception is covered by test_eval_features (slow on CPU)
  c.eval.robustness.scales = [0.0, 0.5]
  c.eval.probe.epochs = 2
  c.eval.probe.num_train = 24
  c.eval.probe.num_val = 16
  c.eval.diagnostics.num_images = 16
  c.eval.diagnostics.gain_images = 4
  c.eval.diagnostics.interp_pairs = 2
  c.eval.diagnostics.interp_steps = 4
  c.eval.diagnostics.knn_train_images = 24
  plan = evaluate.plan(c)
  assert plan["kinds"] == ["reconstruction", "robustness", "linear_probe", "diagnostics"]
  gae = evaluate.random_gae(64, latent_dim=4, patch_size=16)  # the tiny in-test GAE
  res = evaluate.train_and_evaluate(c, str(tmp_path), tokenizer=gae)
  m = json.loads((tmp_path / "metrics.json").read_text())
  assert [r["scale"] for r in m["robustness"]["per_scale"]] == [0.0, 0.5]
  assert m["reconstruction"]["per_scale"][0]["num_images"] == 8
  assert 0.0 < m["reconstruction"]["per_scale"][0]["lpips"] < 2.0
  assert set(m["linear_probe"]) == {"flatten", "GAP"}
  assert m["linear_probe"]["flatten"]["num_params"] == 4 * 4 * 4 * 11 + 11
  d = m["diagnostics"]
  assert d["num_images"] == 16 and len(d["spatial_similarity"]["distance"]) == 2
  assert 0.0 <= d["knn_top1"] <= 1.0 and d["interp_path_ratio"] >= 1.0
  for name in ("report.md", "robustness.png", "probe_loss.png", "spatial_similarity.png",
               "pca_maps.png", "interpolation.png", "reconstructions.png", "config.json"):
    assert (tmp_path / name).is_file(), name
  report = (tmp_path / "report.md").read_text()
  assert "Decoder robustness" in report and "Linear probe" in report
  assert res["timings_s"].keys() == {"reconstruction", "robustness", "linear_probe",
                                     "diagnostics"}
  c.eval.kind = "reconstruction,bogus"
  with pytest.raises(ValueError, match="bogus"):
    evaluate.kinds(c)
