"""Released-vs-paper choices in the configs (docs/fidelity.md): the discriminator lr and the
sampling protocols (main: SDE, class-uniform; `ablation`: paper App. H). Configs only and
tiny analytic samplers: cheap."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gae_jax import configs_lib
from gae_jax import flow
from gae_jax.trainers import common
from gae_jax.trainers import sample as sample_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(name: str, arg=None):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", name))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


# ---------------------------------------------------------------- discriminator lr


@pytest.mark.parametrize("name", ["gae_l32.py", "gae_l64.py"])
def test_paper_config_discriminator_lr_is_the_released_one(name):
  """Released `learning_rate 1e-5, lr_g_factor 20` (lr_d = lr, lr_g = 20 lr): G 2e-4, D 1e-5."""
  c = _config(name)
  assert (c.optim.lr, c.optim.end_lr) == (2e-4, 2e-5)
  assert (c.disc_optim.lr, c.disc_optim.end_lr) == (1e-5, 1e-6)
  assert c.optim.lr / c.disc_optim.lr == pytest.approx(20.0)
  # The optimizer built from the config: Adam's first step moves a parameter by lr * g /
  # (|g| + eps) = lr (no weight decay, no warm-up for D). rtol 1e-6 (eps = 1e-8).
  steps = c.total_steps
  tx = common.make_optimizer(c.disc_optim, steps)
  params = {"kernel": jnp.ones((3, 3))}
  grads = {"kernel": jnp.full((3, 3), 0.5)}
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["kernel"], -1e-5, rtol=1e-6)
  sched = common.learning_rate_schedule(c.disc_optim, steps)
  assert float(sched(steps)) == pytest.approx(1e-6, rel=1e-4)
  gen = common.learning_rate_schedule(c.optim, steps)
  assert float(gen(c.optim.warmup_steps)) == pytest.approx(2e-4, rel=1e-4)


def test_runlocal_discriminator_lr_unchanged():
  c = _config("gae_l32.py", "runlocal")
  assert (c.disc_optim.lr, c.disc_optim.end_lr) == (1e-4, 1e-5)
  assert (c.optim.lr, c.optim.end_lr) == (6e-3, 6e-4)        # runlocal's tuned generator lr


# ---------------------------------------------------------------- sampling protocols


@pytest.mark.parametrize("d,ep,shift", [(32, 80, 0.4), (32, 800, 0.4), (64, 80, 0.5),
                                        (64, 800, 0.5)])
def test_main_protocol_defaults(d, ep, shift):
  c = configs_lib.dit_config("sample", latent_dim=d, epochs=ep)
  s = c.sample
  assert (s.mode, s.num_steps, s.shift, s.cfg_scale) == ("sde", 250, shift, 1.0)
  assert s.last_step == "release" and s.labels == "uniform"
  g = configs_lib.dit_config("sample,cfg", latent_dim=d, epochs=ep).sample
  w, start = (3.3, 0.3) if ep == 800 else (2.5, 0.25)
  assert (g.mode, g.shift, g.cfg_scale, g.cfg_interval, g.labels) == (
      "euler", shift, w, start, "uniform")
  # The training-time sample grid uses the same (released) SDE last step.
  assert configs_lib.dit_config(None, latent_dim=d, epochs=ep).sample_grid.last_step == \
      "release"


@pytest.mark.parametrize("d,ep", [(32, 80), (64, 800)])
def test_ablation_preset_sets_app_h_protocol(d, ep):
  """Paper App. H: ODE sampler, 250 steps, no CFG, random labels, timeshift 0.7."""
  for c in (configs_lib.dit_config("sample,ablation", latent_dim=d, epochs=ep),
            _config("sample.py", f"ablation,latent_dim={d},epochs={ep}")):
    s = c.sample
    assert c.stage == "sample"
    assert (s.mode, s.num_steps, s.shift) == ("euler", 250, 0.7)
    assert (s.cfg_scale, s.cfg_interval) == (1.0, 0.0)
    assert s.labels == "random" and s.num_samples == 50_000
  local = configs_lib.dit_config("sample,ablation,runlocal", latent_dim=d, epochs=ep)
  assert (local.sample.mode, local.sample.shift, local.sample.labels) == (
      "euler", 0.7, "random")
  with pytest.raises(ValueError, match="ablation"):
    configs_lib.dit_config("sample,ablation,cfg", latent_dim=d, epochs=ep)
  with pytest.raises(ValueError, match="ablation"):
    configs_lib.dit_config("ablation", latent_dim=d, epochs=ep)


def test_ablation_sampler_is_the_deterministic_euler_ode():
  """The preset's fields drive `flow.sample` as a shift-0.7 Euler ODE (rng-independent)."""
  s = configs_lib.dit_config("sample,ablation", latent_dim=32, epochs=80).sample
  m, sd = jnp.array([1.0, -1.0]), jnp.array([0.5, 2.0])

  def v(x, t, y):       # exact velocity of N(m, diag(sd^2)) on the linear path
    del y
    t = t[:, None]
    return m + (t * sd ** 2 - (1 - t)) / (t ** 2 * sd ** 2 + (1 - t) ** 2) * (x - t * m)

  noise = jax.random.normal(jax.random.key(0), (8, 2))
  y = jnp.zeros((8,), jnp.int32)
  kw = dict(mode=s.mode, num_steps=20, shift=s.shift, last_step=s.last_step)
  a = flow.sample(v, noise, y, jax.random.key(1), **kw)
  b = flow.sample(v, noise, y, jax.random.key(2), **kw)
  np.testing.assert_array_equal(a, b)
  ref = flow.sample_ode(v, noise, y, num_steps=20, shift=0.7, method="euler")
  np.testing.assert_allclose(a, ref, rtol=1e-6, atol=1e-6)


def test_eval_generation_ablation_reaches_the_sample_stage(monkeypatch, tmp_path):
  from gae_jax.trainers import evaluate  # pylint: disable=g-import-not-at-top
  seen = {}
  monkeypatch.setattr(sample_lib, "train_and_evaluate",
                      lambda sc, out: seen.setdefault("sc", sc))
  for arg, labels, mode in (("runlocal,dit=/x", "uniform", "sde"),
                            ("runlocal,dit=/x,ablation", "random", "euler")):
    seen.clear()
    c = _config("eval_generation.py", arg)
    evaluate._sample_from_dit(c, str(tmp_path))  # pylint: disable=protected-access
    s = seen["sc"].sample
    assert (s.labels, s.mode) == (labels, mode), arg
    assert s.shift == (0.7 if mode == "euler" else 0.4)


def test_sample_stage_label_modes():
  # pylint: disable=protected-access
  labels, total = sample_lib._padded_labels(22, 11, 8, "random", seed=5)
  assert total == 24 and labels.dtype == np.int32
  np.testing.assert_array_equal(labels[:22], flow.random_labels(22, 11, 5))
  np.testing.assert_array_equal(labels[22:], 0)
  uniform, _ = sample_lib._padded_labels(22, 11, 8)
  np.testing.assert_array_equal(np.bincount(uniform[:22]), np.full(11, 2))
  np.testing.assert_array_equal(sample_lib._grid_indices(22, 11, 5, "random"), np.arange(5))
  c = configs_lib.dit_config("sample,ablation,runlocal", latent_dim=32, epochs=80)
  assert sample_lib.plan(c)["per_class"] is None
  c.sample.labels = "uniform"
  assert sample_lib.plan(c)["per_class"] == 4
  c.sample.labels = "balanced"
  with pytest.raises(ValueError, match="sample.labels"):
    sample_lib.plan(c)
  # Random labels need no num_samples % num_classes == 0; class-uniform ones do.
  labels, total = sample_lib._padded_labels(23, 11, 8, "random")
  assert total == 24 and labels[:23].max() < 11
  with pytest.raises(ValueError, match="multiple"):
    sample_lib._padded_labels(23, 11, 8, "uniform")
