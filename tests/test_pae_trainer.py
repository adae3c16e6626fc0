"""PAE's training stages: stage 0 `pae_refine` then stage 1 `pae` at tiny sizes (32 px)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gae_jax import checkpoint as ckpt_lib
from gae_jax import configs_lib
from gae_jax import sharding as sharding_lib
from gae_jax.models import pae as pae_lib
from gae_jax.trainers import pae
from gae_jax.trainers import pae_common
from gae_jax.trainers import pae_refine


def _tiny_vfm(c):
  c.vfm.image_size = 28          # the mu VFM (width 64, patch 7): a 4 x 4 grid
  c.data.image_size = 32         # = 4 x decoder patch 8
  c.batch_size = 8               # one image per fake device
  c.num_eval_images = 8
  c.optim.warmup_steps = 0
  c.donate = False               # one train-step program for the run and the direct steps


def refine_config():
  c = configs_lib.pae_refine_config("runlocal")
  _tiny_vfm(c)
  c.refine.width, c.refine.depth = 32, 1
  c.total_steps = 3
  c.log_every = c.eval_every = c.ckpt_every = 1
  return c


def pae_config(refine_dir):
  c = configs_lib.pae_config(f"runlocal,refine={refine_dir}")
  _tiny_vfm(c)
  c.loss.disc_start = 1          # step 0 without, steps 1.. with the GAN
  c.loss.disc_layers, c.loss.disc_ndf = 2, 8
  c.loss.mcr.lpips = True        # the paper's MCR terms (runlocal keeps them L1 only)
  c.total_steps = 3
  c.log_every = c.image_every = c.ckpt_every = 1
  return c


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("pae")
  w0, w1 = str(root / "refine"), str(root / "pae")
  m0 = pae_refine.train_and_evaluate(refine_config(), w0)
  m1 = pae.train_and_evaluate(pae_config(w0), w1)
  return dict(w0=w0, w1=w1, m0=m0, m1=m1)


def test_refine_stage_writes_its_targets(runs):
  m = runs["m0"]
  for k in ("loss", "rep", "gram", "val/loss"):
    assert np.isfinite(m[k]), k
  assert abs(m["val/latent_rms"] - 1.0) < 1e-4          # Z_T on the sphere of radius sqrt(d)
  # the fixed validation batch after steps 1, 2, 3: both parts of L_refine go down
  lines = [json.loads(l) for l in open(os.path.join(runs["w0"], "metrics.jsonl"))]
  val = [l for l in lines if "val/loss" in l]
  assert [l["step"] for l in val] == [1, 2, 3]
  for k in ("val/rep", "val/gram"):
    assert val[-1][k] < val[0][k], (k, [l[k] for l in val])
  fields, variables = pae_common.read_refiner(runs["w0"])
  assert fields["latent_dim"] == 32 and fields["grid"] == 4 and fields["vfm_dim"] == 64
  assert fields["vfm"]["weights"] is None and fields["vfm"]["seed"] == 0
  assert set(variables["params"]) == {"projector", "deprojector"}
  # The random VFM stand-in: the tokenizer loader rebuilds the very same weights.
  from gae_jax.tokenizers import pae as tok_pae
  cfg = json.load(open(os.path.join(runs["w1"], "config.json")))
  theirs, _ = tok_pae._workdir_vfm(cfg, None, runs["w1"])
  ours = pae_common.load_vfm_variables(pae_common.resolve_vfm(pae_config(runs["w0"]).vfm))
  jax.tree.map(np.testing.assert_array_equal, ours["params"], theirs)


def test_pae_run_logs_every_term_and_resumes_to_the_same_state(runs):
  w, m = runs["w1"], runs["m1"]
  for k in ("loss", "l1", "lpips", "g_loss", "d_loss", "ssr", "mcr", "mcr_l1", "mcr_lpips",
            "scr", "scr_global", "scr_patch", "val/psnr"):
    assert np.isfinite(m[k]), k
  assert m["mcr"] > 0 and m["mcr_lpips"] > 0 and m["d_loss"] > 0
  assert os.path.exists(os.path.join(w, "images", "recon_0000003.png"))
  cfg = json.load(open(os.path.join(w, "config.json")))
  assert cfg["stage"] == "pae" and cfg["model"]["variant"] == "mu"
  assert cfg["vfm"]["image_size"] == 28
  # Resume: step-2 checkpoint (state + data iterator) + one step == the step-3 checkpoint.
  config = pae_config(runs["w0"])
  s = pae.Setup(config)
  ckpt = ckpt_lib.Checkpointer(os.path.join(w, "checkpoints"), save_every=1)
  assert {2, 3} <= set(ckpt.all_steps())
  it = s.train_iterator()
  state = ckpt.restore(s.abstract_state, it, step=2)
  want = ckpt.restore(s.abstract_state, step=3)
  ckpt.close()
  frozen = s.load_frozen()
  step = s.compile_train_step(frozen, donate=False)
  state, _ = step(state, sharding_lib.to_global(next(it), s.data_sharding), frozen)
  assert int(state.step) == 3
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params),
               jax.device_get(want.params))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.opt_state),
               jax.device_get(want.opt_state))
  # The workdir opens as a tokenizer (config.json + checkpoint + the seeded VFM) and
  # reconstructs exactly as the trainer does.
  from gae_jax import pretrained
  tok = pretrained.open_tokenizer(w)
  assert tok.family == "pae" and tuple(tok.latent_shape) == (4, 4, 32)
  x = jax.device_get(s.eval_batch()["image"])
  rec = jax.jit(lambda p, x, f: pae.reconstruct(p, x, f, model=s.model, vfm=s.vfm))
  ours = rec(jax.device_get(want.params["generator"]), x, jax.device_get(frozen))
  np.testing.assert_allclose(np.asarray(tok.reconstruct(x)), np.asarray(ours), atol=1e-4)


def test_gradients_reach_the_tokenizer_only(runs):
  """At init the compressor is P_t and SFT is the identity, so z = Z_T (SCR, SSR ~ 0); one
  step moves the zero-initialised SFT head, compressor, decompressor and decoder, leaves
  the frozen VFM / LPIPS / refiner and (before disc_start) the discriminator as they were,
  and repeated steps on one batch lower the reconstruction loss."""
  config = pae_config(runs["w0"])
  s = pae.Setup(config)
  frozen = s.load_frozen()
  frozen_before = jax.device_get(frozen)
  state = s.init_state(frozen)
  g0 = jax.device_get(state.params["generator"])
  proj = jax.device_get(frozen["refiner"]["params"]["projector"]["compressor"])
  jax.tree.map(np.testing.assert_array_equal, g0["compressor"], proj)
  sft = g0["dam"]["fusion"]                    # (gamma, beta) head: zero-initialised
  assert not any(np.any(a) for a in jax.tree.leaves(sft))
  batch = sharding_lib.to_global(next(iter(s.train_iterator())), s.data_sharding)
  step = s.compile_train_step(frozen, donate=False)
  st, m = step(state, batch, frozen)
  assert float(m["scr"]) < 1e-3 and float(m["ssr"]) < 1e-3, (m["scr"], m["ssr"])
  g1 = jax.device_get(st.params["generator"])
  for k in ("kernel", "bias"):
    assert np.any(g1["dam"]["fusion"][k] != 0), f"SFT fusion {k} got no gradient"
  for part in ("dam", "compressor", "decompressor", "decoder"):
    moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), g0[part], g1[part])
    assert any(jax.tree.leaves(moved)), part
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(st.params["discriminator"]),
               jax.device_get(state.params["discriminator"]))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(frozen), frozen_before)
  # the reconstruction part (L1 + LPIPS; the GAN term switches on at step 1)
  rec = [float(m["rec"])]
  for _ in range(4):
    st, m = step(st, batch, frozen)
    rec.append(float(m["rec"]))
  assert rec[-1] < rec[0], rec


def test_plan_counts_and_config_errors(runs):
  config = pae_config(runs["w0"])
  plan = pae.plan(config)
  want = pae_lib.param_counts(config)
  for part in ("dam", "compressor", "decompressor", "decoder"):
    assert plan["params"][part] == want[part], part
  assert plan["frozen"]["vfm_dinov2"] == want["vfm"]
  assert plan["frozen"]["refiner_projector"] == want["compressor"]
  p0 = pae_refine.plan(refine_config())
  assert p0["params"]["projector"] == want["compressor"]
  no_refine = configs_lib.pae_config("runlocal")
  no_refine.loss.ssr_weight = 0.2
  with pytest.raises(ValueError, match="refine.init_from"):
    pae.Setup(no_refine)
  other = pae_config(runs["w0"])
  other.vfm.seed = 1
  with pytest.raises(ValueError, match="same"):
    pae.Setup(other)
