"""One process of tests/test_multihost.py: 2 processes x 2 CPU devices, gloo collectives.

`python multihost_worker.py <process_id> <port> <out_dir>` runs the evaluation's multi-host
paths (per-process shards -> global batches -> jitted fn -> this process's rows ->
gathers) and saves what it got; the test imports the same toy data and functions to
compute the single-process answer.
"""

import os
import sys

import numpy as np

N, SPLIT, DIM = 23, 12, 6          # process 0 holds rows [0, 12), process 1 rows [12, 23)
SCALES = (0.0, 0.3)


def data():
  rng = np.random.default_rng(0)
  x = np.tanh(rng.normal(size=(N, 16, 16, 3))).astype(np.float32)
  return x, rng.integers(0, 5, size=N).astype(np.int32)


def toy_params():
  rng = np.random.default_rng(1)
  return {"enc": rng.normal(size=(48, DIM)).astype(np.float32) / 7.0,
          "dec": rng.normal(size=(DIM, 48)).astype(np.float32) / 3.0}


def encode(params, x):
  """(B, 16, 16, 3) -> (B, 4, 4, DIM): 4x4 patches through a tanh linear map."""
  b = x.shape[0]
  p = x.reshape(b, 4, 4, 4, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, 4, 4, 48)
  return np.tanh(p @ params["enc"]) if isinstance(x, np.ndarray) else _jnp().tanh(
      p @ params["enc"])


def decode(params, z):
  b = z.shape[0]
  p = (z @ params["dec"]).reshape(b, 4, 4, 4, 4, 3).transpose(0, 1, 3, 2, 4, 5)
  return p.reshape(b, 16, 16, 3)


def _jnp():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return jnp


def gae_fns():
  from gae_jax.evaluation import reconstruction_eval as rec_eval  # pylint: disable=g-import-not-at-top
  return rec_eval.GAEFns(encode, decode, toy_params(), 16, (4, 4, DIM))


def shard_batches(lo: int, hi: int, size: int = 4):
  x, y = data()
  return [(x[s:min(s + size, hi)], y[s:min(s + size, hi)]) for s in range(lo, hi, size)]


def main(pid: int, port: str, out: str):
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid,
                             initialization_timeout=120)
  from gae_jax.evaluation import features as features_lib  # pylint: disable=g-import-not-at-top
  from gae_jax.evaluation import fid as fid_lib  # pylint: disable=g-import-not-at-top
  from gae_jax.evaluation import linear_probe as probe_lib  # pylint: disable=g-import-not-at-top
  from gae_jax.evaluation import reconstruction_eval as rec_eval  # pylint: disable=g-import-not-at-top

  assert jax.process_count() == 2 and jax.device_count() == 4
  lo, hi = (0, SPLIT) if pid == 0 else (SPLIT, N)
  mesh = features_lib.eval_mesh()
  fns = gae_fns()
  # Both processes yield 3 batches of 4; the last is short on process 1.
  lat = probe_lib.encode_split(fns.encode, fns.params, shard_batches(lo, hi), mesh=mesh,
                               batch_size=8)
  stats = fid_lib.ActivationStats(DIM)          # streaming FID stats, merged over processes
  stats.update(np.asarray(lat.latents[lo:hi], np.float64).mean(axis=(1, 2)))
  mu, sigma = features_lib.allgather_stats(stats, DIM).finalize()
  rows = features_lib.allgather_rows(np.arange(lo, hi, dtype=np.int64))
  rep = features_lib.replicated_apply(fns.encode, fns.params, data()[0], mesh=mesh,
                                      batch_size=6)
  # Reconstruction metrics with index-keyed latent noise (image j's eps from its index).
  rec = rec_eval.evaluate_reconstruction(
      fns, ((x, np.arange(s, s + len(x))) for s, (x, _) in zip(range(lo, hi, 4),
                                                               shard_batches(lo, hi))),
      mesh=mesh, batch_size=8, scales=SCALES)
  curve = np.asarray([[r["psnr"], r["ssim"], r["num_images"]] for r in rec["per_scale"]])
  np.savez(os.path.join(out, f"p{pid}.npz"), z=lat.latents, y=lat.labels, mu=mu, sigma=sigma,
           rows=rows, rep=rep, curve=curve)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
