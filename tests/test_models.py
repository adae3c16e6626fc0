"""GAE model shapes and invariants: latent sphere, sigma-noise statistics, no biases,
paper parameter counts (abstractly)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gae_jax import configs_lib
from gae_jax.models import gae as gae_lib
from gae_jax.models import layers
from gae_jax.trainers import common


def tiny(**kw):
  args = dict(width=64, depth=2, num_heads=2, patch_size=8, latent_dim=16, sigma_std=0.2)
  args.update(kw)
  return gae_lib.GAE(**args)


@pytest.fixture(scope="module")
def tiny_setup():
  model = tiny()
  x = jax.random.uniform(jax.random.key(0), (4, 32, 32, 3), minval=-1, maxval=1)
  params = model.init({"params": jax.random.key(1), "noise": jax.random.key(2)}, x)["params"]
  return model, params, x


def test_shapes_and_latent_sphere(tiny_setup):
  model, params, x = tiny_setup
  params = common.nn.meta.unbox(params)
  x_hat, aux = model.apply({"params": params}, x)
  assert x_hat.shape == x.shape
  assert aux["mu"].shape == (4, 4, 4, 16)
  rms = jnp.sqrt(jnp.mean(jnp.square(aux["mu"]), axis=-1))
  np.testing.assert_allclose(rms, 1.0, atol=1e-5)          # every token on the sqrt(d) sphere
  np.testing.assert_allclose(jnp.linalg.norm(aux["mu"], axis=-1), 4.0, rtol=1e-5)
  np.testing.assert_array_equal(aux["z"], aux["mu"])       # inference: z = mu
  z, _ = model.apply({"params": params}, x, method=model.encode)
  np.testing.assert_allclose(model.apply({"params": params}, z, method=model.decode), x_hat,
                             atol=1e-5)


def test_sigma_noise_statistics(tiny_setup):
  model, params, x = tiny_setup
  params = common.nn.meta.unbox(params)
  sig = gae_lib.sample_sigma(jax.random.key(3), 200_000, 0.2)
  # sigma ~ N(0, (0.2/0.8)^2): std 0.25 and E|sigma| = 0.25*sqrt(2/pi) ~= 0.1995
  np.testing.assert_allclose(jnp.std(sig), 0.25, rtol=0.01)
  np.testing.assert_allclose(jnp.mean(jnp.abs(sig)), 0.25 * np.sqrt(2 / np.pi), rtol=0.01)
  _, aux = model.apply({"params": params}, x, train=True, rngs={"noise": jax.random.key(4)})
  noise = aux["z"] - aux["mu"]
  # one sigma per image: per-image noise std equals |sigma|
  per_image = jnp.std(noise, axis=(1, 2, 3))
  np.testing.assert_allclose(per_image, jnp.abs(aux["sigma"]), rtol=0.15)
  assert not np.allclose(aux["sigma"], aux["sigma"][0])
  _, aux2 = model.apply({"params": params}, x, train=True, rngs={"noise": jax.random.key(5)})
  assert not np.allclose(aux["z"], aux2["z"])


def test_no_biases_and_param_names(tiny_setup):
  _, params, _ = tiny_setup
  names = ["/".join(str(k.key) for k in path)
           for path, _ in jax.tree_util.tree_leaves_with_path(common.nn.meta.unbox(params))]
  assert not [n for n in names if n.endswith("bias")], "the release has no biases"
  assert not [n for n in names if n.endswith("scale")], "RMSNorms are parameter-free"
  assert "encoder/patch_embed/kernel" in names and "projector/kernel" in names


def test_kl_switch():
  model = tiny(kl=True)
  x = jnp.zeros((2, 32, 32, 3))
  v = model.init({"params": jax.random.key(0), "noise": jax.random.key(1)}, x)
  params = common.nn.meta.unbox(v["params"])
  assert params["projector"]["kernel"].shape == (64, 32)   # mean and logvar
  _, aux = model.apply({"params": params}, x, train=True, rngs={"noise": jax.random.key(2)})
  assert aux["kl_logvar"].shape == (2, 4, 4, 16)
  assert not np.allclose(aux["z"], aux["mu"])


def test_swiglu_hidden_and_rms_norm():
  assert layers.swiglu_hidden(1024) == 2816
  x = jax.random.normal(jax.random.key(0), (3, 5, 32)) * 7.0
  y = layers.RMSNorm().apply({}, x)
  np.testing.assert_allclose(jnp.sqrt(jnp.mean(y ** 2, -1)), 1.0, atol=1e-4)


def test_scan_and_loop_agree():
  """nn.scan over blocks is a layout choice: same function for the same weights."""
  x = jax.random.normal(jax.random.key(0), (2, 8, 32))
  loop = layers.Transformer(depth=2, num_heads=2, mlp_hidden=64)
  scan = layers.Transformer(depth=2, num_heads=2, mlp_hidden=64, scan=True, remat="full")
  p_loop = common.nn.meta.unbox(loop.init(jax.random.key(1), x))
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *[p_loop["params"][f"blocks_{i}"]
                                                    for i in range(2)])
  y1 = loop.apply(p_loop, x)
  y2 = scan.apply({"params": {"blocks": stacked}}, x)
  np.testing.assert_allclose(y1, y2, atol=1e-5)


@pytest.mark.parametrize("latent_dim", [32, 64])
def test_paper_parameter_counts(latent_dim):
  """Paper Tab. 13: E_p 310.38M, A_p 0.03M, D_p 309.36M for ViT-L d=32 — abstractly."""
  c = configs_lib.autoencoder_config(None, latent_dim=latent_dim).model
  model = gae_lib.make_gae(c)
  abstract = jax.eval_shape(lambda: model.init(
      {"params": jax.random.key(0), "noise": jax.random.key(0)}, jnp.zeros((1, 256, 256, 3))))
  counts = common.param_counts(abstract["params"])
  if latent_dim == 32:
    np.testing.assert_allclose(counts["encoder"] / 1e6, 310.38, rtol=5e-3)
    np.testing.assert_allclose(counts["decoder"] / 1e6, 309.36, rtol=5e-3)
    np.testing.assert_allclose(counts["projector"] / 1e6, 0.03, atol=0.005)
  assert counts["projector"] == 1024 * latent_dim
