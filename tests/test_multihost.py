"""2 real processes (jax.distributed on CPU, gloo collectives) against 1 process.

Evaluation gathers: each process holds an uneven shard of the data; every process must end
with the full, process-ordered results, equal to a single-process computation on all 8
test devices. Training: 2 processes x 4 devices train the tiny DiT (the AE too with -m slow)
on disjoint shards of the same global batches as 1 process x 8 devices; checkpoints restore across
process counts (the data position re-derived from the step).
"""

import importlib.util
import logging
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from gae_jax import checkpoint as ckpt_lib

from gae_jax.evaluation import features as features_lib
from gae_jax.evaluation import reconstruction_eval as rec_eval

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("multihost_worker",
                                               os.path.join(HERE, "multihost_worker.py"))
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(tmp_path, *mode):
  port = str(_free_port())
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  return [subprocess.Popen([sys.executable, os.path.join(HERE, "multihost_worker.py"),
                            str(i), port, str(tmp_path), *mode], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
          for i in range(2)]


def _wait(procs, timeout: float) -> list[str]:
  logs = []
  for p in procs:
    try:
      out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      pytest.fail("multi-process workers timed out")
    logs.append(out)
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  return logs


def _run_workers(tmp_path):
  _wait(_launch(tmp_path), 300)
  return [np.load(tmp_path / f"p{i}.npz") for i in range(2)]


def test_two_process_gathers_match_single_process(tmp_path, devices8):
  r0, r1 = _run_workers(tmp_path)
  x, y = worker.data()
  params = worker.toy_params()
  want_z = worker.encode(params, x)
  mesh = features_lib.eval_mesh(devices8)
  single = rec_eval.evaluate_reconstruction(
      worker.gae_fns(), ((x[s:s + 8], np.arange(s, min(s + 8, len(x))))
                         for s in range(0, len(x), 8)),
      mesh=mesh, batch_size=8, scales=worker.SCALES)
  want_curve = np.asarray([[r["psnr"], r["ssim"], r["num_images"]]
                           for r in single["per_scale"]])
  assert want_curve[1, 0] < want_curve[0, 0]          # the noise scale does matter
  for r in (r0, r1):
    np.testing.assert_allclose(r["z"], want_z, rtol=1e-5, atol=1e-6)   # all rows, in order
    np.testing.assert_array_equal(r["y"], y)
    np.testing.assert_array_equal(r["rows"], np.arange(len(x)))
    np.testing.assert_allclose(r["rep"], want_z, rtol=1e-5, atol=1e-6)
    z = r["z"].astype(np.float64).mean(axis=(1, 2))
    np.testing.assert_allclose(r["mu"], z.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(r["sigma"], np.cov(z, rowvar=False), rtol=1e-10, atol=1e-12)
    # 2 hosts x 2 devices, batch 4 per host == 1 host x 8 devices, batch 8.
    np.testing.assert_allclose(r["curve"], want_curve, rtol=1e-5)
  for k in ("z", "mu", "sigma", "curve"):
    np.testing.assert_array_equal(r0[k], r1[k])     # every process holds the same result


NOTICE = "data iterator state was saved by {} process(es), this run has {}"


class _Messages(logging.Handler):
  """Collects the log messages emitted while attached to the root logger."""

  def __init__(self):
    super().__init__(logging.WARNING)
    self.lines = []

  def emit(self, record):
    self.lines.append(record.getMessage())

  def __enter__(self):
    logging.getLogger().addHandler(self)
    return self

  def __exit__(self, *exc):
    logging.getLogger().removeHandler(self)


# The DiT runs by default; the AE (its compile: LPIPS VGG16 + PatchGAN, x3 processes) only
# with -m slow. What the AE adds over the DiT here is covered in the default suite: its two
# optimizers / batch stats under a sharded mesh (test_autoencoder_trainer.py
# test_sharded_step_equals_single_device), the image pipeline's process split
# (test_data.py test_global_batches_independent_of_process_count); the real 2-process
# run_loop, checkpoints and cross-restore are the DiT's.
@pytest.mark.parametrize("names", [
    "dit",
    pytest.param("ae", marks=pytest.mark.slow(
        reason="the DiT case + test_sharded_step_equals_single_device + "
               "test_global_batches_independent_of_process_count cover it by default")),
])
def test_two_process_training_matches_one_process_and_checkpoints_cross_restore(
    tmp_path, devices8, names):
  """AE or DiT, TRAIN_STEPS steps each on a (data=2, fsdp=2, tensor=2) mesh.

  2 processes x 4 devices (each reading its own rows of every global batch) == 1 process x
  8 devices: parameters and EMA to 1e-6 absolute, Adam moments to 1e-3 relative + 1e-6
  absolute (the collectives' reduction order differs; measured: parameters <= 3e-8, moments
  <= 5e-5 relative; one wrong row would move parameters by ~lr = 1e-3). A 2-process
  checkpoint restores in 1 process and a 1-process checkpoint in 2 processes: parameters
  and optimizer exactly, the data position re-derived from the step with a logged notice,
  and the next global batch is the one an uninterrupted 1-process run would read.
  """
  assert len(jax.devices()) == 8
  worker.write_latent_cache(str(tmp_path / "cache"))
  procs = _launch(tmp_path, "train", names)
  try:
    built = worker.setups(str(tmp_path), tuple(names.split(",")))
    for name, (trainer, s) in built.items():   # the 1-process, 8-device reference runs
      trainer.train_and_evaluate(s.config, str(tmp_path / f"{name}1"))
  except BaseException:
    for p in procs:
      p.kill()
    raise
  (tmp_path / "ref_done").write_text("")
  check_training(tmp_path, built, _wait(procs, 600))


def check_training(out, built, logs):
  """The assertions of the test above on <out> (also runnable on a finished directory)."""
  restored_by_2 = [np.load(out / f"restore_p{i}.npz") for i in range(2)]
  steps = worker.TRAIN_STEPS
  for name, (_, s) in built.items():
    one = ckpt_lib.Checkpointer(str(out / f"{name}1" / "checkpoints"), save_every=1)
    ref = jax.device_get(one.restore(s.abstract_state))
    one.close()
    # The 2-process checkpoint, restored in this 1-process run.
    it = s.train_iterator()
    two = ckpt_lib.Checkpointer(str(out / f"{name}2" / "checkpoints"), save_every=1)
    with _Messages() as messages:
      state = jax.device_get(two.restore(s.abstract_state, it))
    two.close()
    assert sum(NOTICE.format(2, 1) in m for m in messages.lines) == 1, messages.lines
    assert int(state.step) == int(ref.step) == steps
    raw = worker.flat(ckpt_lib.restore_params(str(out / f"{name}2" / "checkpoints")))
    got = worker.flat(state)
    assert got.keys() == raw.keys(), sorted(set(got) ^ set(raw))
    for k in got:                                    # restore is exact
      np.testing.assert_array_equal(got[k], raw[k], err_msg=k)
    # 2 processes trained like 1 process.
    close = lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6)
    jax.tree.map(close, state.params, ref.params)
    if ref.ema_params is not None:
      jax.tree.map(close, state.ema_params, ref.ema_params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6),
                 state.opt_state, ref.opt_state)
    # The data position: global batch `steps` of an uninterrupted 1-process stream.
    fresh = s.train_iterator()
    for _ in range(steps):
      next(fresh)
    want = worker.flat(next(fresh))
    for k, v in worker.flat(next(it)).items():
      np.testing.assert_array_equal(v, want[k], err_msg=k)
    # The 1-process checkpoint, restored in 2 processes: exact, and their next rows.
    ref_flat = worker.flat({"params": ref.params, "opt_state": ref.opt_state})
    for r in restored_by_2:
      for k, v in ref_flat.items():
        np.testing.assert_array_equal(r[f"{name}/state/{k}"], v, err_msg=k)
    for k, v in want.items():
      np.testing.assert_array_equal(
          np.concatenate([r[f"{name}/batch/{k}"] for r in restored_by_2]), v, err_msg=k)
  for log in logs:
    assert log.count(NOTICE.format(1, 2)) == len(built), log[-3000:]
