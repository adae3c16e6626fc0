"""Flow trainer: loss, exact resume (optimizer + EMA + data), sample grids, sample stage."""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from gae_jax import checkpoint as ckpt_lib
from gae_jax import configs_lib
from gae_jax import pretrained
from gae_jax import sharding as sharding_lib
from gae_jax.models import gae as gae_lib
from gae_jax.trainers import cache_latents
from gae_jax.trainers import flow as flow_trainer
from gae_jax.trainers import sample as sample_lib

# One xdist worker runs this whole file: its module fixtures (compiles) are built once.
pytestmark = pytest.mark.xdist_group("flow_trainer")

SIZE, D = 32, 4


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  """A tiny random GAE and the latent cache of 32 embedded-photo crops it encodes."""
  fields = dict(variant="mu", decoder_variant="mu", patch_size=8, latent_dim=D,
                image_size=SIZE, sigma_std=0.2, kl=False, qk_norm="rms")
  model = gae_lib.make_gae(ml_collections.ConfigDict(fields))
  params = model.init({"params": jax.random.key(0), "noise": jax.random.key(1)},
                      np.zeros((1, SIZE, SIZE, 3), np.float32))["params"]
  gae = pretrained.save_converted(str(tmp_path_factory.mktemp("gae")), params, fields,
                                  kind="gae")
  c = configs_lib.cache_latents_config(f"runlocal,tokenizer={gae}")
  c.data.embedded_length, c.data.read_threads = 32, 2
  c.cache.shard_size, c.batch_size = 16, 8
  out = str(tmp_path_factory.mktemp("latents"))
  cache_latents.train_and_evaluate(c, out)
  return out


def flow_config(cache: str, total_steps: int) -> ml_collections.ConfigDict:
  c = configs_lib.dit_config(f"runlocal,cache={cache}", latent_dim=D, epochs=80)
  c.model.latent_size = SIZE // 8
  c.batch_size = 8
  c.total_steps = total_steps
  c.ckpt_every = 2
  c.image_every = 3
  c.log_every = 1
  c.num_eval_images = 8
  c.sample_grid.num_steps = 3
  c.data.read_threads = 1
  return c


def test_dry_run_counts_paper_params():
  c = configs_lib.dit_config(None, latent_dim=32, epochs=80)
  assert not c.model.qk_norm and c.total_steps == 100_000 and c.batch_size == 1024
  assert c.optim.b2 == 0.95 and c.optim.schedule == "constant" and c.ema_decay == 0.9999
  p = flow_trainer.plan(c)
  assert abs(p["paper_count"] - 675.26e6) / 675.26e6 < 0.005
  assert p["paper_count"] - p["trainable_total"] == 256 * 1152   # the frozen pos-embed
  assert configs_lib.dit_config(None, latent_dim=32, epochs=800).model.qk_norm


def test_sharded_step_equals_single_device(devices8):
  """One DiT step on a (data=2, fsdp=2, tensor=2) mesh of 8 fake devices, default 'logical'
  parameter sharding, equals the 1-device step; Adam moments and the EMA are laid out
  exactly like their parameters and the lowered step holds the activation constraints.

  Tolerance: 2e-5 absolute on parameters and EMA, 1e-4 relative on the loss and grad norm
  (reduction order only; eps = 1e-3 keeps Adam's first update Lipschitz in the gradient).
  """
  import test_autoencoder_trainer as ae_test  # pylint: disable=g-import-not-at-top
  c = configs_lib.dit_config("runlocal", latent_dim=D, epochs=80)
  c.model.latent_size, c.batch_size = SIZE // 8, 8
  c.optim.eps, c.optim.warmup_steps = 1e-3, 0
  c.mesh = configs_lib.mesh_config(data=2, fsdp=2, tensor=2)
  assert c.param_sharding == "logical"
  rng = np.random.default_rng(0)
  batch = {"latent": rng.normal(size=(8, SIZE // 8, SIZE // 8, D)).astype(np.float32),
           "label": rng.integers(0, 10, size=8).astype(np.int32)}
  stats = {"mean": np.full((D,), 0.1, np.float32), "std": np.full((D,), 0.9, np.float32)}
  results = []
  for devs, sizes in ((devices8[:1], (1, 1, 1)), (devices8, (2, 2, 2))):
    mesh = sharding_lib.make_mesh(list(zip(("data", "fsdp", "tensor"), sizes)), devices=devs)
    s = flow_trainer.Setup(c, mesh=mesh, need_data=False)
    state = s.init_state()
    step, lowered = s.compile_train_step(return_lowered=True)
    if len(devs) == 8:
      ae_test.assert_moments_sharded_like_params(s.state_shardings)
      specs = {a for sh in jax.tree.leaves(s.state_shardings.opt_state) for a in sh.spec}
      assert {"fsdp", "tensor"} <= specs, specs
      assert ae_test.sharding_constraints(lowered.as_text()) >= 5, "no activation constraints"
    state, m = step(state, sharding_lib.to_global(batch, s.data_sharding),
                    jax.device_put(stats, s.replicated))
    results.append(jax.device_get((state.params, state.ema_params, m)))
  (p1, e1, m1), (p8, e8, m8) = results
  for k in ("loss", "grad_norm"):
    np.testing.assert_allclose(m8[k], m1[k], rtol=1e-4, err_msg=k)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), (p1, e1), (p8, e8))


def _state(workdir: str, step: int):
  return ckpt_lib.restore_params(os.path.join(workdir, "checkpoints"), step=step)


@pytest.fixture(scope="module")
def straight_run(cache_dir, tmp_path_factory):
  """Three uninterrupted steps (checkpoints at 2 and 3, a sample grid at 3)."""
  out = str(tmp_path_factory.mktemp("straight"))
  flow_trainer.train_and_evaluate(flow_config(cache_dir, 3), out)
  return out


def test_resume_restores_optimizer_ema_and_data(cache_dir, straight_run, tmp_path):
  straight, resumed = straight_run, str(tmp_path / "b")
  for steps in (2, 3):
    c = flow_config(cache_dir, steps)
    c.image_every = 0                   # no sample grids: they do not touch the state
    flow_trainer.train_and_evaluate(c, resumed)
  a, b = _state(straight, 3), _state(resumed, 3)
  assert int(b["step"]) == 3
  for part in ("params", "opt_state", "ema_params", "rng"):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7),
                 a[part], b[part])
  # The EMA is tracked (not the params themselves) and the optimizer moments are not fresh.
  diff = jax.tree.leaves(jax.tree.map(lambda e, p: np.abs(e - p).max(), a["ema_params"],
                                      a["params"]))
  assert max(diff) > 0
  mu = [np.abs(x).max() for x in jax.tree.leaves(a["opt_state"]) if np.ndim(x) > 1]
  assert max(mu) > 0
  assert os.path.isfile(os.path.join(straight, "images", "samples_0000003.png"))
  lines = open(os.path.join(straight, "metrics.jsonl")).read().splitlines()
  assert all(np.isfinite(json.loads(l)["loss"]) for l in lines)


def test_sample_stage_class_uniform_npz(straight_run, tmp_path):
  run = straight_run
  c = configs_lib.dit_config(f"sample,runlocal,cfg,ckpt={run}", latent_dim=D, epochs=800)
  assert c.stage == "sample" and c.sample.mode == "euler"
  assert (c.sample.cfg_scale, c.sample.cfg_interval, c.sample.shift) == (3.3, 0.3, 0.4)
  c.sample.num_samples, c.sample.num_steps, c.batch_size = 22, 3, 8   # 2 per class, padded
  c.sample.grid_images = 11
  out = sample_lib.train_and_evaluate(c, str(tmp_path / "samples"))
  with np.load(out["npz"]) as f:
    arr = f["arr_0"]
  assert arr.shape == (22, SIZE, SIZE, 3) and arr.dtype == np.uint8
  assert os.path.isfile(out["png"])
  labels, total = sample_lib._padded_labels(22, 11, 8)
  assert total == 24 and np.array_equal(np.bincount(labels[:22]), [2] * 11)
  # Padding was discarded and class blocks differ: the first images of two classes differ.
  assert not np.array_equal(arr[0], arr[2])
