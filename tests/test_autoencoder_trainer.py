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

# One xdist worker for this file and tests/test_gcs.py: they compile the same tiny_config
# programs, so the later tests (resume, CLI, gs://) load them from the test compile cache
# instead of compiling them concurrently on the other worker.
pytestmark = pytest.mark.xdist_group("tiny_ae")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
  c = configs_lib.autoencoder_config("runlocal", latent_dim=8)
  c.data.image_size = 32
  c.batch_size = 8
  c.loss.disc_start = 0          # exercise the discriminator update too
  c.loss.disc_ndf = 8            # a thin PatchGAN (8-16-32 channels): same code, ~1/50 the state
  c.total_steps = 2
  c.log_every = c.image_every = c.ckpt_every = 1
  c.num_eval_images = 8
  # A constant lr: total_steps is then not baked into the step, so a rerun with more steps
  # (test_train_resume_...) loads the first run's programs from the test compile cache.
  for opt in (c.optim, c.disc_optim):
    opt.schedule, opt.warmup_steps = "constant", 0
  for k, v in overrides.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


def sharding_constraints(hlo_text: str) -> int:
  """Sharding constraints in a lowered program (Shardy or GSPMD custom-call form)."""
  return hlo_text.count("sdy.sharding_constraint") + hlo_text.count("@Sharding")


def assert_moments_sharded_like_params(shardings, groups=(None,)):
  """Every optimizer leaf shaped like a parameter (Adam mu / nu) has exactly that
  parameter's sharding; so does every EMA leaf. `groups`: the params / opt_state keys of
  separately optimised parts (None: one optimizer over all params)."""
  checked = 0
  for g in groups:
    params = shardings.params if g is None else shardings.params[g]
    opt = shardings.opt_state if g is None else shardings.opt_state[g]
    by_path = {jax.tree_util.keystr(k): v for k, v in
               jax.tree_util.tree_leaves_with_path(params)}
    for k, v in jax.tree_util.tree_leaves_with_path(opt):
      key = jax.tree_util.keystr(k)
      match = [p for p in by_path if key.endswith(p)]
      if match:
        assert v == by_path[max(match, key=len)], (key, v.spec, by_path[max(match, key=len)].spec)
        checked += 1
  assert checked >= 2 * len(jax.tree.leaves(shardings.params)), checked   # mu and nu
  if shardings.ema_params is not None:
    ema_of = shardings.params if groups == (None,) else shardings.params["generator"]
    assert jax.tree.leaves(shardings.ema_params) == jax.tree.leaves(ema_of)


def test_sharded_step_equals_single_device(devices8):
  """One step on a (data=2, fsdp=2, tensor=2) mesh of 8 fake devices, default 'logical'
  parameter sharding, equals the 1-device step.

  Also: Adam moments are laid out exactly like their parameters (some of them split over
  fsdp and tensor), and the lowered step holds the models' activation sharding constraints.
  Tolerance: 1e-5 relative on the losses, 5e-5 absolute on parameters and 1e-3 relative
  on the generator's gradient norm; only the order of floating-point reductions differs
  between the two layouts (measured: losses <= 3e-7, parameters <= 2.3e-5, mostly in the
  encoder, whose gradient crosses the whole decoder; gradient norm 1.8e-4).
  """
  config = tiny_config()
  # Adam's first update is lr * g / (|g| + eps): with eps = 1e-8 a near-zero gradient entry
  # maps to anywhere in [-lr, lr], so reduction-order round-off (~1e-9) could move it by
  # ~lr. eps = 1e-3 keeps the update Lipschitz in g, so params compare at round-off level;
  # no warm-up, so the generator moves on this step too.
  for opt in (config.optim, config.disc_optim):
    opt.eps, opt.warmup_steps = 1e-3, 0
  config.mesh = configs_lib.mesh_config(data=2, fsdp=2, tensor=2)
  assert config.param_sharding == "logical"
  results = []
  batch_np = None
  for devs, sizes in ((devices8[:1], (1, 1, 1)), (devices8, (2, 2, 2))):
    mesh = sharding_lib.make_mesh(list(zip(("data", "fsdp", "tensor"), sizes)), devices=devs)
    s = autoencoder.Setup(config, mesh=mesh)
    frozen = autoencoder.load_frozen(config, s.mesh)
    if batch_np is None:
      batch_np = next(iter(s.train_iterator()))
    state = s.init_state()
    step, lowered = s.compile_train_step(frozen, return_lowered=True)
    if len(devs) == 8:
      assert_moments_sharded_like_params(s.state_shardings, ("generator", "discriminator"))
      specs = {a for sh in jax.tree.leaves(s.state_shardings.opt_state) for a in sh.spec}
      assert {"fsdp", "tensor"} <= specs, specs
      jax.tree.map(lambda a, sh: a.sharding == sh or pytest.fail(f"{a.sharding} != {sh}"),
                   state, s.state_shardings)
      assert sharding_constraints(lowered.as_text()) >= 10, "no activation constraints"
    state, m = step(state, sharding_lib.to_global(batch_np, s.data_sharding), frozen)
    results.append((jax.device_get(state.params), jax.device_get(m)))
  (p1, m1), (p8, m8) = results
  for k in ("loss", "l1", "lpips", "d_loss", "disc_grad_norm"):
    np.testing.assert_allclose(m8[k], m1[k], rtol=1e-5, err_msg=k)
  np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-3)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=5e-5), p1, p8)


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


# The tiny_config() run through the real entry point (same programs: the compiles are shared
# with test_train_resume_and_identical_next_batch through the test compilation cache); one
# eval and one checkpoint, at the end, to keep it short.
TINY_CLI = ["--config=configs/gae_l32.py:runlocal,latent_dim=8", "--config.data.image_size=32",
            "--config.loss.disc_start=0", "--config.loss.disc_ndf=8",
            "--config.total_steps=2", "--config.log_every=1",
            "--config.image_every=2", "--config.ckpt_every=2", "--config.num_eval_images=8",
            "--config.loss.sp_weight=0",   # no teacher: the lambda_sp = 0 run, explicitly
            "--config.optim.schedule=constant", "--config.optim.warmup_steps=0",
            "--config.disc_optim.schedule=constant", "--config.disc_optim.warmup_steps=0"]
LIBRARY_CHATTER = ("orbax", "Closing", "could not be restored", "Unable to initialize backend",
                   "examples on process", "CheckpointManager")


def test_cli_console_shows_plan_progress_summary_only(tmp_path):
  """What `python -m gae_jax.main` prints: plan, compiling, one progress line per log step
  with every loss term (values as in metrics.jsonl, 4 decimals), eval lines and a summary
  with the output paths; no library INFO. A rerun resumes (data iterator included) without
  orbax's contradicting "could not be restored" warning; --verbosity shows library logs."""
  workdir = tmp_path / "run"
  r = _main([*TINY_CLI, f"--workdir={workdir}"], tmp_path)
  out = r.stdout + r.stderr
  assert r.returncode == 0, out[-3000:]
  lines = out.splitlines()
  for bad in LIBRARY_CHATTER:
    assert not [l for l in lines if bad in l], (bad, out)
  assert any(l.endswith("plan: mesh data=8 fsdp=1 tensor=1 on 8 cpu devices, global batch 8 "
                        "of 32x32 images (embedded); steps 0 -> 2") for l in lines), out
  assert any("compiling train_step ..." in l for l in lines), out
  assert any(" train_step ready in " in l for l in lines), out
  rows = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  train_rows = [row for row in rows if "loss" in row]
  assert [row["step"] for row in train_rows] == [1, 2]
  for row in train_rows:
    progress = [l for l in lines if f" step {row['step']}/2 " in l]
    assert len(progress) == 1, out
    terms = [k for k in row if k.endswith("loss") or k in ("nll", "l1", "lpips")]
    assert {"loss", "nll", "l1", "lpips", "g_loss", "d_loss"} <= set(terms)
    for k in terms:
      assert f" {k} {row[k]:.4f}" in progress[0] or f" {k} {row[k]:.3f}" in progress[0], (
          k, progress[0])
    assert "img/s" in progress[0] and "ETA" in progress[0]
  assert sum("eval step 2: val psnr" in l for l in lines) == 1, out
  assert any("done: steps 0 -> 2" in l for l in lines), out
  summary = out[out.index("done: steps"):]
  assert f"checkpoints: {workdir}/checkpoints (steps 2)" in summary
  assert f"{workdir}/images/recon_0000002.png" in summary
  assert f"{workdir}/metrics.jsonl" in summary
  assert f"tensorboard --logdir {workdir}/tb" in summary
  assert len(lines) < 25, out          # one screen

  # Rerun, verbose: orbax's own lines appear, the restore is ours and nothing contradicts it.
  r = _main([*TINY_CLI, f"--workdir={workdir}", "--verbosity=0"], tmp_path)
  out = r.stdout + r.stderr
  assert r.returncode == 0, out[-3000:]
  assert "CheckpointManager" in out                  # library INFO shown on request
  assert "could not be restored" not in out, out
  assert "restored step 2 from" in out and "and data iterator position" in out, out
  assert "nothing to do" in out, out
