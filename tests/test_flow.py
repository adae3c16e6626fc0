"""Flow matching: path, loss, time shift, samplers against exact fields, guidance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from gae_jax import flow

# Gaussian target N(M, diag(S^2)) under x_t = t x1 + (1 - t) x0, x0 ~ N(0, I):
# x_t ~ N(t M, t^2 S^2 + (1 - t)^2) and E[x1 - x0 | x_t] is affine in x_t.
M = jnp.array([1.5, -0.5])
S = jnp.array([0.5, 2.0])


def v_gauss(x, t, y):
  del y
  t = t[:, None]
  var = t ** 2 * S ** 2 + (1 - t) ** 2
  return M + (t * S ** 2 - (1 - t)) / var * (x - t * M)


# Two-component 1-D mixture: v = sum_k P(k | x_t) v_k(x_t).
PI = jnp.array([0.3, 0.7])
MM = jnp.array([-2.0, 2.0])
SM = jnp.array([0.5, 0.5])


def v_mixture(x, t, y):
  del y
  t = t[:, None]                                  # (B, 1); x: (B, 1)
  var = t ** 2 * SM ** 2 + (1 - t) ** 2           # (B, K)
  logp = jnp.log(PI) - 0.5 * jnp.log(var) - 0.5 * (x - t * MM) ** 2 / var
  w = jax.nn.softmax(logp, axis=-1)
  vk = MM + (t * SM ** 2 - (1 - t)) / var * (x - t * MM)
  return jnp.sum(w * vk, axis=-1, keepdims=True)


def _run(v_fn, noise, mode, steps, shift, seed=2, **kw):
  y = jnp.zeros((noise.shape[0],), jnp.int32)
  f = jax.jit(lambda n, r: flow.sample(v_fn, n, y, r, mode=mode, num_steps=steps,
                                       shift=shift, **kw))
  return np.asarray(f(noise, jax.random.key(seed)))


# ---------------------------------------------------------------- path / loss / time


def test_time_shift_and_grid_closed_form():
  s = 0.4
  grid = np.asarray(flow.time_grid(7, 1e-5, 0.996, s))
  u = np.linspace(1e-5, 0.996, 7)
  np.testing.assert_allclose(grid, s * u / (1 + (s - 1) * u), rtol=1e-6)
  full = np.asarray(flow.time_grid(5, 0.0, 1.0, 0.5))
  assert full[0] == 0.0 and full[-1] == 1.0
  assert np.all(np.diff(full) > 0)
  assert full[2] < 0.5          # s < 1 spends more of the grid near t=0 (noise)
  np.testing.assert_allclose(float(flow.time_shift(0.5, 0.7)), 0.35 / 0.85, rtol=1e-6)
  with pytest.raises(ValueError):
    flow.time_grid(1, 0.0, 1.0)


def test_sample_t_logit_normal_statistics():
  n = 200_000
  for s in (1.0, 0.7):
    t = np.asarray(flow.sample_t(jax.random.key(0), n, shift=s))
    assert t.min() > 0 and t.max() < 1
    assert abs(np.median(t) - float(flow.time_shift(0.5, s))) < 0.005
  # Unshifted: logit(t) ~ N(0, 1).
  t = np.asarray(flow.sample_t(jax.random.key(1), n, shift=1.0))
  z = np.log(t / (1 - t))
  assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
  # Shift 0.7 inverts exactly: logit of the un-shifted value is N(0, 1) again.
  ts = np.asarray(flow.sample_t(jax.random.key(1), n, shift=0.7), np.float64)
  back = ts / (0.7 + 0.3 * ts)                   # inverse of time_shift(., 0.7)
  np.testing.assert_allclose(back, t, rtol=1e-4, atol=1e-6)


def test_interpolate_and_sample_path():
  k0, k1 = jax.random.split(jax.random.key(0))
  x0 = jax.random.normal(k0, (3, 4, 4, 2))
  x1 = jax.random.normal(k1, (3, 4, 4, 2))
  np.testing.assert_allclose(flow.interpolate(x0, x1, jnp.zeros(3)), x0)
  np.testing.assert_allclose(flow.interpolate(x0, x1, jnp.ones(3)), x1)
  t = jnp.array([0.2, 0.5, 0.9])
  h = 1e-2
  fd = (flow.interpolate(x0, x1, t + h) - flow.interpolate(x0, x1, t - h)) / (2 * h)
  np.testing.assert_allclose(fd, flow.target_velocity(x0, x1), atol=1e-4)
  xt, tt, u = flow.sample_path(jax.random.key(3), x1, shift=0.7)
  assert xt.shape == x1.shape and tt.shape == (3,) and u.shape == x1.shape
  np.testing.assert_allclose(xt, x1 - (1 - tt)[:, None, None, None] * u, atol=1e-5)


def test_flow_loss_terms():
  u = jax.random.normal(jax.random.key(0), (2, 3, 3, 4))
  loss, aux = flow.flow_loss(u, u)
  assert float(loss) == pytest.approx(0.0, abs=1e-6)
  # Per-token positive rescaling keeps the cosine term at 0: cos is over channels only.
  scale = jax.random.uniform(jax.random.key(1), (2, 3, 3, 1), minval=0.5, maxval=3.0)
  _, aux = flow.flow_loss(u * scale, u)
  assert float(aux["cos"]) == pytest.approx(0.0, abs=1e-6)
  assert float(aux["mse"]) == pytest.approx(float(jnp.mean((u * scale - u) ** 2)), rel=1e-5)
  loss, aux = flow.flow_loss(-u, u)
  assert float(aux["cos"]) == pytest.approx(2.0, abs=1e-5)
  assert float(loss) == pytest.approx(float(aux["mse"]) + 2.0, rel=1e-6)
  with pytest.raises(ValueError, match="shape"):
    flow.flow_loss(u, u[..., :2])


# ---------------------------------------------------------------- samplers


def test_ode_matches_exact_transport_map():
  # For a Gaussian target the ODE flow map is x1 = M + S * x0 per sample.
  noise = jax.random.normal(jax.random.key(1), (4000, 2))
  exact = np.asarray(M + S * noise)
  heun = _run(v_gauss, noise, "heun", 100, 0.4)
  np.testing.assert_allclose(heun, exact, atol=3e-3)
  euler = _run(v_gauss, noise, "euler", 250, 0.4)
  np.testing.assert_allclose(euler, exact, atol=6e-2)
  assert np.abs(euler - exact).max() > np.abs(heun - exact).max()   # 1st vs 2nd order


def test_sde_recovers_gaussian_mean_and_covariance():
  noise = jax.random.normal(jax.random.key(1), (8000, 2))
  x = _run(v_gauss, noise, "sde", 250, 0.4)
  assert np.all(np.isfinite(x))
  np.testing.assert_allclose(x.mean(0), M, atol=0.08)
  cov = np.cov(x.T)
  np.testing.assert_allclose(np.sqrt(np.diag(cov)), S, rtol=0.04)
  assert abs(cov[0, 1]) / np.sqrt(cov[0, 0] * cov[1, 1]) < 0.05
  # The SDE is stochastic: the result is not the deterministic ODE map.
  assert np.abs(x - np.asarray(M + S * noise)).mean() > 0.1


@pytest.mark.parametrize("mode", ["sde", "heun"])
def test_samplers_recover_gaussian_mixture(mode):
  noise = jax.random.normal(jax.random.key(4), (6000, 1))
  x = _run(v_mixture, noise, mode, 200, 0.5)[:, 0]
  frac = (x > 0).mean()
  assert abs(frac - 0.7) < 0.03
  for sign, mean in ((-1, -2.0), (1, 2.0)):
    part = x[np.sign(x) == sign]
    assert abs(part.mean() - mean) < 0.06
    assert abs(part.std() - 0.5) < 0.05


def test_sde_last_step_options():
  noise = jax.random.normal(jax.random.key(1), (16, 2))
  y = jnp.zeros((16,), jnp.int32)
  grid = flow.time_grid(10, flow.SDE_T0, flow.SDE_T1, 0.4)
  run = lambda **kw: flow.sample_sde(v_gauss, noise, y, jax.random.key(0), num_steps=10,
                                     shift=0.4, **kw)
  none, default = run(last_step="none"), run()
  ours = run(last_step="grid")
  rel = run(last_step="release")
  t_n = grid[-1]
  drift, _ = flow.sde_drift(v_gauss(none, jnp.full((16,), t_n), y), none, t_n)
  np.testing.assert_allclose(ours, none + drift * (1 - t_n), rtol=1e-5, atol=1e-5)
  t1 = jnp.float32(flow.SDE_T1)
  drift, _ = flow.sde_drift(v_gauss(none, jnp.full((16,), t1), y), none, t1)
  np.testing.assert_allclose(rel, none + drift * (1 - t1), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(default, rel)           # the released form is the default
  assert np.abs(np.asarray(ours - rel)).max() > 1e-3    # and it is not the 'grid' one
  # With shift 1 the two last steps coincide (t_N = t1).
  a = flow.sample_sde(v_gauss, noise, y, jax.random.key(0), num_steps=10, last_step="grid")
  b = flow.sample_sde(v_gauss, noise, y, jax.random.key(0), num_steps=10)
  np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="last_step"):
    flow.sample_sde(v_gauss, noise, y, jax.random.key(0), last_step="tweedie")
  with pytest.raises(ValueError, match="rng"):
    flow.sample(v_gauss, noise, y, None, mode="sde")


def test_sde_default_is_the_released_sampler():
  """The default SDE path equals a float64 NumPy transcription of the released sampler
  (sii-research/GAE transport: grid = shift(linspace(1e-5, 0.996, N)), Euler-Maruyama with
  drift v + D score, then x + drift(x, t=0.996) * 0.004), for the same Gaussian draws.

  The constants 0.996 / 0.004 / 0.99006 are literal here on purpose. Tolerance 1e-4
  (float32 sampler vs float64 reference over 12 steps, |x| ~ 1).
  """
  n, s, b = 12, 0.4, 64
  noise = jax.random.normal(jax.random.key(1), (b, 2))
  y = jnp.zeros((b,), jnp.int32)
  rng = jax.random.key(7)
  out = np.asarray(jax.jit(lambda z: flow.sample(v_gauss, z, y, rng, mode="sde",
                                                 num_steps=n, shift=s))(noise))
  u = np.linspace(1e-5, 0.996, n)
  ts = s * u / (1 + (s - 1) * u)
  assert ts[-1] == pytest.approx(0.990060, abs=1e-6)    # where Euler-Maruyama ends

  def drift(x, t):                                       # SBDM drift, velocity model
    v = np.asarray(v_gauss(jnp.asarray(x, jnp.float32), jnp.full((b,), t, jnp.float32), y),
                   np.float64)
    return v + (1 - t) / t * (t * v - x) / (1 - t), (1 - t) / t

  x = np.asarray(noise, np.float64)
  for i in range(n - 1):
    dt = ts[i + 1] - ts[i]
    d, diff = drift(x, ts[i])
    eps = np.asarray(jax.random.normal(jax.random.fold_in(rng, i), (b, 2)), np.float64)
    x = x + d * dt + np.sqrt(2 * diff * dt) * eps
  d, _ = drift(x, 0.996)
  ref = x + d * 0.004
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
  # The other reading (drift at t_N = 0.99006, step 1 - t_N = 0.0099) is measurably different.
  d, _ = drift(x, ts[-1])
  assert np.abs(out - (x + d * (1 - ts[-1]))).max() > 1e-3


def test_sampler_keeps_batch_sharding():
  if jax.device_count() < 2:
    pytest.skip("needs >= 2 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  n = jax.device_count()
  mesh = jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sh = NamedSharding(mesh, P("data"))
  noise = jax.device_put(jax.random.normal(jax.random.key(0), (4 * n, 2)), sh)
  y = jax.device_put(jnp.zeros((4 * n,), jnp.int32), sh)
  f = jax.jit(lambda nz, yy, r: flow.sample_sde(v_gauss, nz, yy, r, num_steps=20))
  out = f(noise, y, jax.random.key(1))
  assert out.sharding.is_equivalent_to(sh, 2)
  ref = flow.sample_sde(v_gauss, np.asarray(noise), np.asarray(y), jax.random.key(1),
                        num_steps=20)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-4)


def test_class_uniform_labels():
  labels = flow.class_uniform_labels(50, 10)
  assert labels.shape == (50,) and labels.dtype == np.int32
  np.testing.assert_array_equal(np.bincount(labels), np.full(10, 5))
  with pytest.raises(ValueError, match="multiple"):
    flow.class_uniform_labels(51, 10)


def test_random_labels():
  a = flow.random_labels(5000, 10, seed=3)
  assert a.shape == (5000,) and a.dtype == np.int32 and a.min() >= 0 and a.max() <= 9
  np.testing.assert_array_equal(a, flow.random_labels(5000, 10, seed=3))
  assert not np.array_equal(a, flow.random_labels(5000, 10, seed=4))
  counts = np.bincount(a, minlength=10)
  assert counts.min() < counts.max()                 # not class-balanced ...
  assert np.abs(counts - 500).max() < 100            # ... but uniform (sd ~ 21)
  np.testing.assert_array_equal(flow.random_labels(51, 10, seed=0)[:7],
                                flow.random_labels(7, 10, seed=0))
  with pytest.raises(ValueError, match="num_classes"):
    flow.random_labels(10, 0, seed=0)


# ---------------------------------------------------------------- guidance

NULL = 10


def v_label(x, t, y):
  """A label-dependent analytic field; the null class gives a distinct velocity."""
  yy = jnp.where(y == NULL, -3.0, y.astype(jnp.float32))
  return x * (1 + t[:, None]) + yy[:, None]


def test_cfg_weight_one_and_formula():
  x = jax.random.normal(jax.random.key(0), (4, 3))
  t = jnp.full((4,), 0.6)
  y = jnp.array([0, 1, 2, 3])
  cond = v_label(x, t, y)
  uncond = v_label(x, t, jnp.full((4,), NULL))
  g1 = flow.cfg_velocity(v_label, 1.0, null_label=NULL)(x, t, y)
  np.testing.assert_allclose(g1, cond, rtol=1e-6, atol=1e-6)
  g = jax.jit(flow.cfg_velocity(v_label, 2.5, null_label=NULL))(x, t, y)
  np.testing.assert_allclose(g, uncond + 2.5 * (cond - uncond), rtol=1e-6, atol=1e-6)
  assert np.abs(np.asarray(g - cond)).min() > 1.0


def test_cfg_is_one_batched_call():
  sizes = []

  def v_rec(x, t, y):
    sizes.append(x.shape[0])
    return v_label(x, t, y)

  x = jnp.ones((4, 3))
  flow.cfg_velocity(v_rec, 3.0, null_label=NULL)(x, jnp.full((4,), 0.5), jnp.arange(4))
  assert sizes == [8]


def test_cfg_interval_and_boundary():
  x = jax.random.normal(jax.random.key(0), (4, 3))
  y = jnp.array([0, 1, 2, 3])
  w, start = 3.0, 0.3
  v = jax.jit(flow.cfg_velocity(v_label, w, null_label=NULL, interval_start=start))

  def expect(t):
    cond, uncond = v_label(x, t, y), v_label(x, t, jnp.full((4,), NULL))
    return cond, uncond + w * (cond - uncond)

  for tv, guided in ((0.1, False), (0.2999, False), (0.3, True), (0.9, True)):
    t = jnp.full((4,), tv, jnp.float32)
    cond, g = expect(t)
    np.testing.assert_allclose(v(x, t, y), g if guided else cond, rtol=1e-6, atol=1e-6)
  # Mixed t in one batch: the rule is per sample.
  t = jnp.array([0.1, 0.3, 0.5, 0.29], jnp.float32)
  cond, g = expect(t)
  sel = np.array([False, True, True, False])[:, None]
  np.testing.assert_allclose(v(x, t, y), np.where(sel, g, cond), rtol=1e-6, atol=1e-6)


def test_cfg_inside_sampler_loop():
  # Guidance as a v_fn inside one jitted fori_loop; w=1 reproduces the conditional sample.
  x0 = jax.random.normal(jax.random.key(0), (8, 2))
  y = jnp.arange(8) % 3
  ref = flow.sample_ode(v_label, x0, y, num_steps=20, shift=0.4)
  g = flow.cfg_velocity(v_label, 1.0, null_label=NULL, interval_start=0.3)
  out = jax.jit(lambda a: flow.sample_ode(g, a, y, num_steps=20, shift=0.4))(x0)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  g = flow.cfg_velocity(v_label, 4.0, null_label=NULL, interval_start=0.3)
  out = jax.jit(lambda a: flow.sample_ode(g, a, y, num_steps=20, shift=0.4))(x0)
  assert np.abs(np.asarray(out - ref)).max() > 0.1


def test_autoguidance():
  x = jax.random.normal(jax.random.key(0), (4, 3))
  y = jnp.arange(4)
  main = lambda x, t, y: 2.0 * x + y[:, None]
  guide = lambda x, t, y: x - 1.0
  t = jnp.full((4,), 0.7)
  ag = flow.autoguidance_velocity(main, guide, 1.0)
  np.testing.assert_allclose(ag(x, t, y), main(x, t, y), rtol=1e-6, atol=1e-6)
  ag = jax.jit(flow.autoguidance_velocity(main, guide, 2.0, interval_start=0.5))
  np.testing.assert_allclose(ag(x, t, y), 2 * main(x, t, y) - guide(x, t, y), rtol=1e-6,
                             atol=1e-6)
  t = jnp.full((4,), 0.2)
  np.testing.assert_allclose(ag(x, t, y), main(x, t, y), rtol=1e-6, atol=1e-6)


def test_flow_loss_gradient_finite_at_zero_prediction():
  """adaLN-Zero makes the DiT output exactly 0 at init: the loss gradient must stay finite."""
  import jax
  import jax.numpy as jnp
  from gae_jax import flow
  u = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
  g = jax.grad(lambda v: flow.flow_loss(v, u)[0])(jnp.zeros_like(u))
  assert bool(jnp.all(jnp.isfinite(g)))
  assert float(jnp.abs(g).max()) > 0
