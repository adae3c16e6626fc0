"""The autoencoder step's discriminator switches (issue 11): the program without the
PatchGAN that runs before loss.disc_start gives the full program's new state to float32
round-off, and from disc_start on the loop runs the full program; the PatchGAN's compute
dtype (config.disc_dtype)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gae_jax import configs_lib
from gae_jax import sharding as sharding_lib
from gae_jax.models import discriminator as disc_lib
from gae_jax.trainers import autoencoder


def _config():
  c = configs_lib.autoencoder_config("runlocal", latent_dim=8)
  c.data.image_size = 32
  c.batch_size = 4
  c.loss.disc_start = 1            # step 0: before; step 1: after
  c.loss.skip_disc_before_start = True
  # Adam's first update is lr * g / (|g| + eps): eps 1e-3 keeps it Lipschitz in g, so
  # round-off in g stays round-off in the parameters (as test_autoencoder_trainer).
  for opt in (c.optim, c.disc_optim):
    opt.eps, opt.warmup_steps = 1e-3, 0
  return c


def _leaves(tree):
  return [np.asarray(a) for a in jax.tree.leaves(jax.device_get(tree))]


def test_skip_disc_before_start_matches_full_program():
  """Before disc_start the loop's step_fn runs the program without the discriminator: its
  new state and generator metrics equal the full program's to float32 round-off (the two
  programs are fused differently by XLA, so not bit for bit: measured 4.8e-8 at most); from
  disc_start on it runs the full program itself (bit-identical) and the discriminator trains.
  """
  config = _config()
  mesh = sharding_lib.make_mesh(config.mesh, jax.devices()[:1])
  s = autoencoder.Setup(config, mesh=mesh)
  frozen = autoencoder.load_frozen(config, s.mesh)
  x = np.random.default_rng(0).uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32)
  batch = sharding_lib.to_global({"image": x, "label": np.zeros((4,), np.int32)},
                                 s.data_sharding)
  copy = lambda t: jax.tree.map(jnp.copy, t)   # the steps donate their state
  full = s.compile_train_step(frozen)
  state0 = s.init_state()
  ref1, ref_m0 = full(copy(state0), batch, frozen)
  ref1_leaves = _leaves(ref1)
  ref2, ref_m1 = full(copy(ref1), batch, frozen)

  got1, got_m0 = s.step_fn(frozen, start_step=0)(copy(state0), batch)       # before
  got2, got_m1 = s.step_fn(frozen, start_step=1)(ref1, batch)              # from disc_start
  diff = 0.0
  for a, b in zip(ref1_leaves, _leaves(got1)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    if a.size and np.issubdtype(a.dtype, np.floating):
      diff = max(diff, float(np.max(np.abs(a.astype(np.float64) - b))))
  print(f"before disc_start: max |state difference| {diff:.3g}")
  ref_m0, got_m0 = jax.device_get(ref_m0), jax.device_get(got_m0)
  for k in ("loss", "nll", "l1", "lpips", "grad_norm", "param_norm", "update_norm", "psnr"):
    np.testing.assert_allclose(ref_m0[k], got_m0[k], rtol=1e-5, err_msg=k)
  # The skipped discriminator reports zeros; the full program computed its loss anyway.
  for k in ("g_loss", "d_loss", "disc_grad_norm"):
    assert float(got_m0[k]) == 0.0 and float(ref_m0[k]) != 0.0, k
  # From disc_start: the full program, bit for bit, and the discriminator moved.
  for a, b in zip(_leaves(ref2), _leaves(got2)):
    np.testing.assert_array_equal(a, b)
  for k in ("g_loss", "d_loss", "disc_grad_norm", "logits_real", "logits_fake"):
    np.testing.assert_array_equal(jax.device_get(ref_m1[k]), jax.device_get(got_m1[k]))
  assert float(got_m1["disc_grad_norm"]) > 0
  d0 = jax.tree.leaves(jax.device_get(state0.params["discriminator"]))
  d2 = jax.tree.leaves(jax.device_get(got2.params["discriminator"]))
  assert any(np.any(a != b) for a, b in zip(d0, d2))


def test_disc_dtype_float32_default_and_bf16_close():
  """config.disc_dtype None builds the float32 PatchGAN exactly as before (same params, same
  logits bit for bit); 'bfloat16' computes in bf16 with float32 params, logits and input
  gradients close to float32's; a bad name is a one-line error."""
  config = _config()
  _, disc, _ = autoencoder.build_models(config)
  before = disc_lib.NLayerDiscriminator(n_layers=config.loss.disc_layers,
                                        ndf=config.loss.disc_ndf)
  x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), jnp.float32, -1, 1)
  # Everything jitted: one program per call instead of op-by-op compiles (suite time).
  init = lambda m: jax.jit(lambda k: m.init(k, x, train=False))(jax.random.key(1))
  v = init(before)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.all(a == b)), jax.device_get(v),
                                   jax.device_get(init(disc))))
  f32 = lambda m: jax.jit(lambda: m.apply(v, x, train=True, mutable=["batch_stats"])[0])()
  np.testing.assert_array_equal(f32(before), f32(disc))

  config.disc_dtype = "bfloat16"
  _, disc16, _ = autoencoder.build_models(config)
  assert disc16.dtype == jnp.bfloat16 and disc16.param_dtype == jnp.float32
  v16 = init(disc16)
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(v16))
  out = lambda m, inp: m.apply(v, inp, train=True, mutable=["batch_stats"])[0]
  ref, got = jax.jit(lambda i: out(before, i))(x), jax.jit(lambda i: out(disc16, i))(x)
  assert got.dtype == jnp.float32
  scale = float(jnp.max(jnp.abs(ref)))
  err = float(jnp.max(jnp.abs(got - ref)))
  assert 0 < err < 3e-2 * scale            # it did compute in bf16, and stayed close
  # A random readout of the logits (their plain mean has ~no gradient through BatchNorm).
  w = jax.random.normal(jax.random.key(2), ref.shape)
  g_ref = jax.jit(jax.grad(lambda i: jnp.mean(w * out(before, i))))(x)
  g_got = jax.jit(jax.grad(lambda i: jnp.mean(w * out(disc16, i))))(x)
  assert g_got.dtype == jnp.float32
  rel = float(jnp.linalg.norm(g_got - g_ref) / jnp.linalg.norm(g_ref))
  cos = float(jnp.vdot(g_got, g_ref) / (jnp.linalg.norm(g_got) * jnp.linalg.norm(g_ref)))
  print(f"bf16 PatchGAN: logits max |diff| / max |logit| {err / scale:.3g}, input "
        f"gradient relative error {rel:.3g}, cosine {cos:.5f}")
  # Measured (jitted): logits 1.2e-2, gradient 6.9e-2 relative (cosine 0.998): five bf16 convs and
  # BatchNorm backward at random init.
  assert cos > 0.99 and rel < 0.2, (cos, rel)

  config.disc_dtype = "bf16"
  with pytest.raises(ValueError, match=r"config.disc_dtype='bf16'"):
    autoencoder.build_models(config)
