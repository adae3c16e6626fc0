"""PAE's SSR / MCR / SCR losses and stage 0's low-pass target against NumPy (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gae_jax import losses


def _rng(seed=0):
  return np.random.default_rng(seed)


def _sphere(x):
  return x / np.sqrt(np.mean(x ** 2, -1, keepdims=True))


def _np_gram(t, cosine=True):
  t = t.reshape(t.shape[0], -1, t.shape[-1]).astype(np.float64)
  if cosine:
    t = t / np.linalg.norm(t, axis=-1, keepdims=True)
  return np.einsum("bnc,bmc->bnm", t, t)


@pytest.mark.parametrize("normalize,reduction", [("cosine", "mean"), ("none", "sum")])
def test_ssr_matches_numpy(normalize, reduction):
  r = _rng(1)
  z = _sphere(r.normal(size=(2, 4, 4, 8)))
  t = r.normal(size=(2, 4, 4, 24))          # different channel count: Grams still compare
  d = (_np_gram(z, normalize == "cosine") - _np_gram(t, normalize == "cosine")) ** 2
  want = d.mean() if reduction == "mean" else d.sum(axis=(1, 2)).mean()
  got = losses.ssr_loss(jnp.asarray(z, jnp.float32), jnp.asarray(t, jnp.float32),
                        normalize=normalize, reduction=reduction)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_ssr_zero_on_target_and_invariant_to_channel_rotation():
  r = _rng(2)
  z = jnp.asarray(_sphere(r.normal(size=(2, 4, 4, 8))), jnp.float32)
  q, _ = np.linalg.qr(r.normal(size=(8, 8)))
  zq = z @ jnp.asarray(q, jnp.float32)      # rotate the channel basis
  t = jnp.asarray(r.normal(size=(2, 4, 4, 16)), jnp.float32)
  assert float(losses.ssr_loss(z, zq)) < 1e-10
  np.testing.assert_allclose(float(losses.ssr_loss(zq, t)), float(losses.ssr_loss(z, t)),
                             rtol=1e-5)
  assert float(losses.ssr_loss(z, t)) > 1e-3
  # the target side gets no gradient, the latent does
  gz, gt = jax.grad(lambda a, b: losses.ssr_loss(a, b), argnums=(0, 1))(z, t)
  assert float(jnp.abs(gt).max()) == 0.0 and float(jnp.abs(gz).max()) > 0.0


def test_ssr_errors():
  z = jnp.zeros((1, 4, 4, 8))
  with pytest.raises(ValueError, match="normalize"):
    losses.ssr_loss(z, z, normalize="l1")
  with pytest.raises(ValueError, match="reduction"):
    losses.ssr_loss(z, z, reduction="max")
  with pytest.raises(ValueError, match="tokens"):
    losses.ssr_loss(z, jnp.zeros((1, 2, 2, 8)))


@pytest.mark.parametrize("angle", [0.0, 42.5, 85.0, 120.0])
def test_rotate_perturbation_has_the_angle_and_stays_on_the_sphere(angle):
  r = _rng(3)
  d = 32
  z = _sphere(r.normal(size=(2, 4, 4, d)))
  noise = r.normal(size=z.shape)
  out = np.asarray(losses.perturb_latent(jnp.asarray(z, jnp.float32),
                                         jnp.asarray(noise, jnp.float32), angle), np.float64)
  cos = np.sum(out * z, -1) / (np.linalg.norm(out, axis=-1) * np.linalg.norm(z, axis=-1))
  np.testing.assert_allclose(np.degrees(np.arccos(np.clip(cos, -1, 1))), angle, atol=0.05)
  np.testing.assert_allclose(np.sqrt(np.mean(out ** 2, -1)), 1.0, rtol=1e-5)  # radius sqrt(d)
  # direction: the part of the noise orthogonal to z (NumPy reference)
  zh = z / np.linalg.norm(z, axis=-1, keepdims=True)
  perp = noise - np.sum(noise * zh, -1, keepdims=True) * zh
  u = perp / np.linalg.norm(perp, axis=-1, keepdims=True)
  th = np.radians(angle)
  want = np.cos(th) * z + np.sin(th) * np.sqrt(d) * u
  np.testing.assert_allclose(out, want, atol=2e-5)


def test_cascade_shares_one_direction_and_additive_mode():
  r = _rng(4)
  z = jnp.asarray(_sphere(r.normal(size=(1, 2, 2, 16))), jnp.float32)
  noise = jnp.asarray(r.normal(size=z.shape), jnp.float32)
  zm = losses.perturb_latent(z, noise, 42.5)
  zl = losses.perturb_latent(z, noise, 85.0)
  # one great circle: z_m - cos(a) z and z_l - cos(b) z are parallel
  dm = np.asarray(zm - np.cos(np.radians(42.5)) * z)
  dl = np.asarray(zl - np.cos(np.radians(85.0)) * z)
  cos = np.sum(dm * dl, -1) / (np.linalg.norm(dm, axis=-1) * np.linalg.norm(dl, axis=-1))
  np.testing.assert_allclose(cos, 1.0, atol=1e-5)
  add = np.asarray(losses.perturb_latent(z, noise, 42.5, mode="additive"))
  zz = np.asarray(z)
  c = np.sum(add * zz, -1) / (np.linalg.norm(add, axis=-1) * np.linalg.norm(zz, axis=-1))
  np.testing.assert_allclose(np.degrees(np.arccos(c)), 42.5, atol=0.05)
  np.testing.assert_allclose(np.linalg.norm(add, axis=-1),
                             np.linalg.norm(zz, axis=-1) / np.cos(np.radians(42.5)), rtol=1e-5)
  ren = np.asarray(losses.perturb_latent(z, noise, 42.5, mode="additive", renormalize=True))
  np.testing.assert_allclose(np.sqrt(np.mean(ren ** 2, -1)), 1.0, rtol=1e-5)
  with pytest.raises(ValueError, match="mode"):
    losses.perturb_latent(z, noise, 10.0, mode="slerp")
  with pytest.raises(ValueError, match="angle"):
    losses.perturb_latent(z, noise, 95.0, mode="additive")


def test_mcr_matches_numpy_and_stops_gradients():
  r = _rng(5)
  xr, xm, xl = (jnp.asarray(r.uniform(-1, 1, size=(2, 8, 8, 3)), jnp.float32)
                for _ in range(3))
  fake_lpips = lambda a, b: jnp.mean(jnp.square(a - b), axis=(1, 2, 3))  # per image
  loss, terms = losses.mcr_loss(xr, [xm, xl], fake_lpips, lpips_weight=0.5)
  n = lambda a: np.asarray(a, np.float64)
  want_l1 = np.abs(n(xm) - n(xr)).mean() + np.abs(n(xl) - n(xm)).mean()
  want_lp = 0.5 * (((n(xm) - n(xr)) ** 2).mean() + ((n(xl) - n(xm)) ** 2).mean())
  np.testing.assert_allclose(float(terms["mcr_l1"]), want_l1, rtol=1e-5)
  np.testing.assert_allclose(float(terms["mcr_lpips"]), want_lp, rtol=1e-5)
  np.testing.assert_allclose(float(loss), want_l1 + want_lp, rtol=1e-5)
  # cascade: no direct large -> recon term, so x_r gets no gradient at all; x_m only its
  # own term (x_l's target is detached)
  g = jax.grad(lambda a, b, c: losses.mcr_loss(a, [b, c])[0], argnums=(0, 1, 2))(xr, xm, xl)
  assert float(jnp.abs(g[0]).max()) == 0.0
  np.testing.assert_allclose(np.asarray(g[1]), np.sign(n(xm) - n(xr)) / xm.size, atol=1e-9)
  # equal decodes: zero
  assert float(losses.mcr_loss(xr, [xr, xr], fake_lpips)[0]) == 0.0
  anchor, _ = losses.mcr_loss(xr, [xm, xl], chain="anchor")
  np.testing.assert_allclose(float(anchor), np.abs(n(xm) - n(xr)).mean()
                             + np.abs(n(xl) - n(xr)).mean(), rtol=1e-5)


def test_scr_matches_numpy_and_known_cases():
  r = _rng(6)
  z = r.normal(size=(2, 4, 4, 8))
  t = r.normal(size=(2, 4, 4, 8))
  cos = lambda a, b: np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
  zf, tf = z.reshape(2, 16, 8), t.reshape(2, 16, 8)
  want_g = np.mean(1 - cos(zf.mean(1), tf.mean(1)))
  want_p = np.mean(1 - cos(zf, tf))
  loss, terms = losses.scr_loss(jnp.asarray(z, jnp.float32), jnp.asarray(t, jnp.float32))
  np.testing.assert_allclose(float(terms["scr_global"]), want_g, rtol=1e-5)
  np.testing.assert_allclose(float(terms["scr_patch"]), want_p, rtol=1e-5)
  np.testing.assert_allclose(float(loss), want_g + want_p, rtol=1e-5)
  zj = jnp.asarray(z, jnp.float32)
  assert abs(float(losses.scr_loss(zj, 3.0 * zj)[0])) < 1e-6      # scale-invariant, zero
  np.testing.assert_allclose(float(losses.scr_loss(zj, -zj)[0]), 4.0, rtol=1e-5)
  # patch term = 1/2 GAE L_sp (MSE of RMS-normalised tokens) for targets on the sphere
  zs, ts = _sphere(z), _sphere(t)
  lsp = np.mean((zs - ts) ** 2)
  _, tr = losses.scr_loss(jnp.asarray(zs, jnp.float32), jnp.asarray(ts, jnp.float32))
  np.testing.assert_allclose(float(tr["scr_patch"]), 0.5 * lsp, rtol=1e-5)
  only_patch, _ = losses.scr_loss(zj, jnp.asarray(t, jnp.float32), global_weight=0.0)
  np.testing.assert_allclose(float(only_patch), want_p, rtol=1e-5)
  with pytest.raises(ValueError, match="pooling"):
    losses.scr_loss(zj, zj, pooling="median")
  with pytest.raises(ValueError, match="must match"):
    losses.scr_loss(zj, zj[..., :4])


def test_low_pass_matches_numpy():
  r = _rng(7)
  h = r.normal(size=(1, 6, 6, 3))
  sigma, s = 1.0, 0.4
  w = losses.gaussian_kernel1d(sigma).astype(np.float64)
  rad = (len(w) - 1) // 2
  p = np.pad(h, ((0, 0), (rad, rad), (rad, rad), (0, 0)), mode="edge")
  blur = np.zeros_like(h)
  for i in range(6):
    for j in range(6):
      patch = p[:, i:i + 2 * rad + 1, j:j + 2 * rad + 1]
      blur[:, i, j] = np.einsum("bijc,i,j->bc", patch, w, w)
  want = (1 - s) * h + s * blur
  got = losses.low_pass(jnp.asarray(h, jnp.float32), sigma, s)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
  const = jnp.ones((1, 5, 5, 2)) * 3.0   # a constant map is unchanged
  np.testing.assert_allclose(np.asarray(losses.low_pass(const, 2.0, 1.0)), 3.0, rtol=1e-6)
  with pytest.raises(ValueError, match="strength"):
    losses.low_pass(const, 1.0, 1.5)
