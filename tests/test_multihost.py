"""Evaluation gathers across 2 real processes (jax.distributed on CPU, gloo collectives).

Each process holds an uneven shard of the data; every process must end with the full,
process-ordered results, equal to a single-process computation on all 8 test devices.
"""

import importlib.util
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

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


def _run_workers(tmp_path):
  port = str(_free_port())
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "multihost_worker.py"),
                             str(i), port, str(tmp_path)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = []
  for p in procs:
    try:
      out, _ = p.communicate(timeout=300)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      pytest.fail("multi-process workers timed out")
    logs.append(out)
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
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
