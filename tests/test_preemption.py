"""Preemption: SIGTERM -> checkpoint at the step the run was at, exit 0; SIGKILL between
checkpoints, then the same command again -> bit-identical to the uninterrupted run (params,
Adam moments, EMA, rng, skip counters and the data iterator position).

The runs are `python -m gae_jax.main` subprocesses of the DiT flow trainer (tiny "mu" model,
4x4x4 latents, batch 8) on a synthetic latent cache; the DiT's constant learning rate makes
the interrupted runs' larger total_steps irrelevant to the update (asserted).
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from gae_jax import checkpoint as ckpt_lib
from gae_jax import configs_lib
from gae_jax.data import latents as latents_lib

pytestmark = pytest.mark.xdist_group("preemption")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LATENT, D, N = 4, 4, 64


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  """64 random latents (4x4x4, 10 classes) in one shard, with stats and a manifest."""
  out = str(tmp_path_factory.mktemp("latents"))
  rng = np.random.default_rng(0)
  recs = [latents_lib.encode_record(rng.normal(size=(LATENT, LATENT, D)).astype(np.float32),
                                    rng.normal(size=(LATENT, LATENT, D)).astype(np.float32),
                                    int(i % 10), i) for i in range(N)]
  name = latents_lib.shard_name(0, 0)
  latents_lib.write_shard(os.path.join(out, name), recs)
  np.savez(os.path.join(out, latents_lib.STATS), mean=np.zeros(D, np.float32),
           std=np.ones(D, np.float32), num_samples=np.int64(N))
  latents_lib.write_json(os.path.join(out, latents_lib.MANIFEST), {
      "format": latents_lib.FORMAT, "latent_shape": [LATENT, LATENT, D], "num_classes": 10,
      "shards": [{"file": name, "num_records": N}], "num_records": N,
      "stats": latents_lib.STATS, "stats_num_samples": N, "stats_seed": 0})
  return out


def _cmd(cache: str, workdir: str, total: int) -> list[str]:
  return [sys.executable, "-m", "gae_jax.main",
          f"--config=configs/dit_xl_gae32_80ep.py:runlocal,cache={cache}",
          f"--workdir={workdir}", f"--config.model.latent_dim={D}",
          f"--config.model.latent_size={LATENT}", "--config.batch_size=8",
          f"--config.total_steps={total}", "--config.ckpt_every=4", "--config.keep_ckpts=10",
          "--config.log_every=1", "--config.image_every=0", "--config.data.read_threads=1"]


def _env() -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if "device_count" not in f)   # one device: a fast step
  return env


def _run(cache, workdir, total):
  r = subprocess.run(_cmd(cache, workdir, total), cwd=ROOT, env=_env(), capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
  return r


def _start(cache, workdir, total):
  return subprocess.Popen(_cmd(cache, workdir, total), cwd=ROOT, env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_step(workdir: str, step: int, proc, timeout: float = 240.0):
  """Polls until checkpoint `step` is complete (orbax renames its tmp dir when done)."""
  path = os.path.join(workdir, "checkpoints", str(step))
  end = time.time() + timeout
  while not os.path.isdir(path):
    if proc.poll() is not None:
      raise AssertionError(f"run ended early ({proc.returncode}): {proc.stdout.read()[-3000:]}")
    if time.time() > end:
      proc.kill()
      raise AssertionError(f"no checkpoint {step} after {timeout} s")
    time.sleep(0.01)


def _state(workdir: str, step: int) -> dict:
  return ckpt_lib.restore_params(os.path.join(workdir, "checkpoints"), step=step)


def _iter_state(workdir: str, step: int) -> list:
  """The grain iterator state of each process in checkpoint `step` (process_*.json)."""
  d = os.path.join(workdir, "checkpoints", str(step), "data_iter")
  out = []
  for f in sorted(os.listdir(d)):
    if f.startswith("process_") and f.endswith(".json"):
      out.append(json.load(open(os.path.join(d, f))))
  return out


def _assert_same(a: str, b: str, step: int):
  x, y = _state(a, step), _state(b, step)
  assert int(x["step"]) == int(y["step"]) == step
  for part in ("params", "opt_state", "ema_params", "rng", "skipped_run", "skipped_total"):
    jax.tree.map(np.testing.assert_array_equal, x[part], y[part])   # bit-exact
  ia, ib = _iter_state(a, step), _iter_state(b, step)
  assert ia and ia == ib                                            # the next batch


def test_sigterm_saves_and_exits_0_then_sigkill_resume_is_bit_exact(cache_dir, tmp_path):
  assert configs_lib.dit_config("runlocal", latent_dim=D, epochs=80).optim.schedule == \
      "constant"                 # the lr does not depend on total_steps
  straight = str(tmp_path / "straight")
  _run(cache_dir, straight, 10)

  # SIGTERM once checkpoint 4 exists: a forced save at the step it was at, exit code 0.
  term = str(tmp_path / "term")
  proc = _start(cache_dir, term, 100_000)
  _wait_for_step(term, 4, proc)
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=120)[0]
  assert proc.returncode == 0, out[-3000:]
  steps = ckpt_lib.Checkpointer(os.path.join(term, "checkpoints"), save_every=4).all_steps()
  logged = [json.loads(l)["step"] for l in open(os.path.join(term, "metrics.jsonl"))]
  assert steps[-1] == logged[-1] and steps[-1] >= 4, (steps, logged)
  assert steps[-1] < 100_000

  # SIGKILL between checkpoints (after 4 is complete, before 8), then the same command
  # with total_steps=10: resumes from 4 and ends equal to the uninterrupted run.
  killed = str(tmp_path / "killed")
  proc = _start(cache_dir, killed, 100_000)
  _wait_for_step(killed, 4, proc)
  proc.kill()
  proc.communicate(timeout=60)
  done = ckpt_lib.Checkpointer(os.path.join(killed, "checkpoints"), save_every=4).all_steps()
  assert done and done[-1] < 10, done
  _run(cache_dir, killed, 10)
  _assert_same(straight, killed, 10)
