"""The autoencoder trainer: sharded step == 1-device step, end-to-end run, resume, plan."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from gae_jax import checkpoint as ckpt_lib
from gae_jax import configs_lib
from gae_jax import sharding as sharding_lib
from gae_jax.trainers import autoencoder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
  c = configs_lib.autoencoder_config("runlocal", latent_dim=8)
  c.data.image_size = 32
  c.batch_size = 8
  c.loss.disc_start = 0          # exercise the discriminator update too
  c.total_steps = 2
  c.log_every = c.image_every = c.ckpt_every = 1
  c.num_eval_images = 8
  for k, v in overrides.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


def test_sharded_step_equals_single_device(devices8):
  """One step on a (data=4, fsdp=2) mesh of 8 fake devices equals the 1-device step.

  Tolerance: 2e-5 absolute on parameters and 1e-4 relative on the losses; only the order
  of floating-point reductions differs between the two layouts.
  """
  config = tiny_config()
  # Adam's first update is lr * g / (|g| + eps): with eps = 1e-8 a near-zero gradient entry
  # maps to anywhere in [-lr, lr], so reduction-order round-off (~1e-9) could move it by
  # ~lr. eps = 1e-3 keeps the update Lipschitz in g, so params compare at round-off level;
  # no warm-up, so the generator moves on this step too.
  for opt in (config.optim, config.disc_optim):
    opt.eps, opt.warmup_steps = 1e-3, 0
  config.mesh = configs_lib.mesh_config(data=4, fsdp=2)
  config.param_sharding = "fsdp"
  results = []
  batch_np = None
  for devs, mesh_axes in ((devices8[:1], [("data", 1), ("fsdp", 1)]),
                          (devices8, [("data", 4), ("fsdp", 2)])):
    s = autoencoder.Setup(config, mesh=sharding_lib.make_mesh(mesh_axes, devices=devs))
    frozen = autoencoder.load_frozen(config, s.mesh)
    if batch_np is None:
      batch_np = next(iter(s.train_iterator()))
    state = s.init_state()
    step = s.compile_train_step(frozen)
    state, m = step(state, sharding_lib.to_global(batch_np, s.data_sharding), frozen)
    results.append((jax.device_get(state.params), jax.device_get(m)))
  (p1, m1), (p8, m8) = results
  for k in ("loss", "l1", "lpips", "d_loss", "grad_norm"):
    np.testing.assert_allclose(m8[k], m1[k], rtol=1e-4, err_msg=k)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), p1, p8)


def test_train_resume_and_identical_next_batch(tmp_path):
  workdir = str(tmp_path / "run")
  config = tiny_config()
  metrics = autoencoder.train_and_evaluate(config, workdir)
  assert np.isfinite(metrics["loss"])
  assert os.path.exists(os.path.join(workdir, "images", "recon_0000002.png"))
  assert os.path.exists(os.path.join(workdir, "config.json"))
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1)
  assert ckpt.latest_step() == 2

  # The restored iterator yields exactly the batch the uninterrupted stream would yield next.
  s = autoencoder.Setup(config)
  reference = s.train_iterator()
  for _ in range(2):
    next(reference)
  expected = next(reference)
  resumed = s.train_iterator()
  state = ckpt.restore(s.abstract_state, resumed)
  assert int(state.step) == 2
  got = next(resumed)
  np.testing.assert_array_equal(got["image"], expected["image"])
  np.testing.assert_array_equal(got["label"], expected["label"])
  ckpt.close()

  # config.init_from: a fresh run starts its generator from that workdir's weights.
  fresh = s.init_state()
  warm = autoencoder.init_from_pretrained(fresh, s, workdir)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(warm.params["generator"]["gae"]),
               jax.device_get(state.params["generator"]["gae"]))
  with pytest.raises(ValueError, match="shape"):
    other = tiny_config()
    other.model.latent_dim = 4
    s_other = autoencoder.Setup(other)
    autoencoder.init_from_pretrained(s_other.init_state(), s_other, workdir)

  # Running again with more steps resumes at the saved step rather than restarting.
  config.total_steps = 3
  autoencoder.train_and_evaluate(config, workdir)
  lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  train_steps = [l["step"] for l in lines if "loss" in l]
  assert train_steps == [1, 2, 3]


def _main(args, tmp_path):
  return subprocess.run([sys.executable, "-m", "gae_jax.main", *args],
                        cwd=REPO, capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_dry_run_plan_has_paper_counts(tmp_path):
  r = _main(["--config=configs/gae_l32.py", f"--workdir={tmp_path}", "--dry_run"], tmp_path)
  assert r.returncode == 0, r.stderr[-2000:]
  plan = json.load(open(tmp_path / "plan.json"))
  np.testing.assert_allclose(plan["params"]["encoder"] / 1e6, 310.38, rtol=5e-3)
  np.testing.assert_allclose(plan["params"]["decoder"] / 1e6, 309.36, rtol=5e-3)
  assert round(plan["params"]["projector"] / 1e6, 2) == 0.03
  assert plan["params"]["discriminator"] > 2e6
  assert plan["batch"]["global"] == 1024


def test_unknown_config_key_fails_with_suggestion(tmp_path):
  r = _main(["--config=configs/gae_l32.py:runlocal", "--config.optim.lrr=1",
             f"--workdir={tmp_path}", "--dry_run"], tmp_path)
  assert r.returncode != 0
  assert "lrr" in r.stderr and "Did you mean" in r.stderr


def test_bad_config_arg_is_named():
  with pytest.raises(ValueError, match="varaint"):
    configs_lib.autoencoder_config("varaint=B", latent_dim=32)
