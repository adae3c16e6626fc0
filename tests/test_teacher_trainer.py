"""Stage 1 trainer: --dry_run plan (DINOv2-L frozen), 2-step run + resume, SVD fit, loading."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from gae_jax import checkpoint as ckpt_lib
from gae_jax import configs_lib
from gae_jax import pretrained
from gae_jax.trainers import teacher

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
  """VGG16 relu5_3 on 32 px embedded photos: a 2x2x512 feature grid, d = 8."""
  c = configs_lib.teacher_config("runlocal", latent_dim=8)
  c.teacher.vfm_image_size = c.data.image_size = 32
  c.teacher.decoder_mlp_hidden = 64
  c.batch_size = 8                # divisible by the 8 fake devices of conftest
  c.total_steps = 2
  c.log_every = c.eval_every = c.ckpt_every = 1
  c.num_eval_images = 8
  for k, v in overrides.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


def _setup(config):
  return teacher.Setup(config)


def test_dry_run_plan_lists_frozen_dinov2_l_and_trainable_parts(tmp_path):
  r = subprocess.run([sys.executable, "-m", "gae_jax.main", "--config=configs/teacher_l32.py",
                      f"--workdir={tmp_path}", "--dry_run"], cwd=REPO, capture_output=True,
                     text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 0, r.stderr[-2000:]
  plan = json.load(open(tmp_path / "plan.json"))
  # DINOv2-L/14: 304.37M, frozen, never in the trainable counts (no weights file needed);
  # torch-hub's 304,368,640 also counts the unused mask token (1024).
  assert plan["frozen"] == {"dinov2_L": 304_368_640 - 1024}
  assert plan["frozen_M"]["dinov2_L"] == 304.37
  assert plan["vfm"]["grid"] == 16 and plan["vfm"]["channels"] == 1024
  # Released sizes (w = 1, L = 1, d = 32): attention 4C^2 + to_latent C*d + pos-embed N*C;
  # decoder: one Llama block (4C^2 + 3*C*2816) + recon_head d*C + pos-embed.
  assert plan["params"]["downsampler"] == 4 * 1024 ** 2 + 1024 * 32 + 256 * 1024
  assert plan["params"]["decoder"] == (4 * 1024 ** 2 + 3 * 1024 * 2816) + 32 * 1024 + 256 * 1024
  assert plan["trainable_total"] == sum(plan["params"].values())
  assert plan["optim"]["warmup_steps"] == round(0.05 * plan["optim"]["total_steps"])
  assert plan["optim"]["end_lr"] == pytest.approx(0.1 * plan["optim"]["lr"])


def test_paper_config_matches_tab13():
  c = configs_lib.teacher_config("paper", latent_dim=32)
  assert (c.total_steps, c.batch_size, c.optim.lr, c.optim.end_lr) == (10_000, 2048, 2e-4, 2e-5)
  assert teacher.optim_config(c).warmup_steps == 500
  assert (c.teacher.window, c.teacher.decoder_depth) == (4, 4)
  c = configs_lib.teacher_config("paper,window=1", latent_dim=64)
  assert (c.teacher.window, c.teacher.latent_dim) == (1, 64)


def test_two_steps_resume_and_load(tmp_path):
  workdir = str(tmp_path / "run")
  config = tiny_config()
  metrics = teacher.train_and_evaluate(config, workdir)
  assert np.isfinite(metrics["loss"]) and -1 <= metrics["cos"] <= 1
  assert "val/cos" in metrics
  fields = json.load(open(os.path.join(workdir, "teacher.json")))["model"]
  assert (fields["grid"], fields["channels"], fields["latent_dim"]) == (2, 512, 8)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1)
  assert ckpt.latest_step() == 2

  # The restored iterator yields exactly the batch the uninterrupted stream would yield next.
  s = _setup(config)
  reference = s.train_iterator()
  for _ in range(2):
    next(reference)
  expected = next(reference)
  resumed = s.train_iterator()
  state = ckpt.restore(s.abstract_state, resumed)
  ckpt.close()
  assert int(state.step) == 2
  np.testing.assert_array_equal(next(resumed)["image"], expected["image"])

  # Running again with more steps resumes at the saved step.
  config.total_steps = 3
  teacher.train_and_evaluate(config, workdir)
  lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [l["step"] for l in lines if "loss" in l] == [1, 2, 3]

  # load_teacher(workdir): the trained downsampler on the VFM features; other sizes resized.
  handle = pretrained.load_teacher(workdir)
  x = next(iter(s.train_iterator()))["image"]
  z = np.asarray(handle.latents(x))
  assert z.shape == (8, 2, 2, 8)
  np.testing.assert_allclose(np.sum(z ** 2, -1), 8, rtol=1e-3)
  state3 = ckpt_lib.restore_params(os.path.join(workdir, "checkpoints"))
  feats = s.backend.features(handle.vfm_variables, x)
  ref = s.model.apply({"params": state3["params"]}, feats, method="latents")
  np.testing.assert_allclose(z, np.asarray(ref), rtol=1e-5, atol=1e-5)
  assert handle.latents(np.zeros((1, 48, 48, 3), np.float32)).shape == (1, 2, 2, 8)


def test_svd_fit_command_matches_numpy(tmp_path):
  workdir = str(tmp_path / "svd")
  config = tiny_config(**{"teacher.downsampler": "svd", "teacher.svd_images": 16})
  out = teacher.train_and_evaluate(config, workdir)
  assert out["num_vectors"] == 16 * 4 and 0 < out["explained_variance"] <= 1
  # Same 16 images' features, fitted with numpy's SVD of the centred token matrix.
  s = _setup(config)
  it = iter(s.train_iterator())
  feats = np.concatenate([np.asarray(s.backend.features(teacher.vfm_lib.load_vgg16_params(),
                                                        next(it)["image"])) for _ in range(2)])
  x = feats.reshape(-1, 512).astype(np.float64)
  _, _, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
  handle = pretrained.load_teacher(workdir)
  comps = np.asarray(handle.variables["svd"]["downsampler"]["components"])
  for j in range(8):
    np.testing.assert_allclose(abs(comps[:, j] @ vt[j]), 1.0, atol=1e-3)
  z = np.asarray(handle.latents(np.zeros((2, 32, 32, 3), np.float32)))
  assert z.shape == (2, 2, 2, 8) and np.all(np.isfinite(z))
