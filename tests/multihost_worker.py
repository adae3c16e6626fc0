"""One process of tests/test_multihost.py: 2 processes, gloo collectives.

`python multihost_worker.py <process_id> <port> <out_dir>` (2 CPU devices each) runs the
evaluation's multi-host paths (per-process shards -> global batches -> jitted fn -> this
process's rows -> gathers) and saves what it got; the test imports the same toy data and
functions to compute the single-process answer.

`python multihost_worker.py <process_id> <port> <out_dir> train <names>` (4 CPU devices
each; names: comma-separated of 'ae', 'dit') trains the tiny AE and / or DiT of `ae_config`
/ `dit_config` for TRAIN_STEPS steps into <out_dir>/{ae,dit}2 (checkpoints every step), then waits for <out_dir>/ref_done (the
test's 1-process runs in <out_dir>/{ae,dit}1) and restores those 1-process checkpoints
here, saving the gathered state and this process's next batch to <out_dir>/restore_p<i>.npz.
"""

import os
import sys

import numpy as np

N, SPLIT, DIM = 23, 12, 6          # process 0 holds rows [0, 12), process 1 rows [12, 23)
SCALES = (0.0, 0.3)
# The suite's XLA flags (tests/conftest.py, inherited) other than its fake device count.
SUITE_FLAGS = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                       if "device_count" not in f)


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
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2 " + SUITE_FLAGS
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


# ------------------------------------------------------------------------------ training

TRAIN_STEPS = 2
LATENT_D, LATENT_HW, CACHE_RECORDS = 4, 4, 48


def _equal_update_configs(c):
  """Adam eps 1e-3, no warm-up: the first updates are Lipschitz in the gradient, so layouts
  that differ only in reduction order give parameters equal to round-off."""
  for opt in [c.optim] + ([c.disc_optim] if "disc_optim" in c else []):
    opt.eps, opt.warmup_steps = 1e-3, 0
  return c


def ae_config():
  """The tiny AE of tests/test_autoencoder_trainer.py on a (data=2, fsdp=2, tensor=2) mesh."""
  from gae_jax import configs_lib  # pylint: disable=g-import-not-at-top
  c = configs_lib.autoencoder_config("runlocal", latent_dim=8)
  c.data.image_size, c.batch_size, c.num_eval_images = 32, 8, 8
  c.loss.disc_start = 0
  c.total_steps = TRAIN_STEPS
  c.log_every = c.ckpt_every = 1
  c.image_every = 0
  c.mesh = configs_lib.mesh_config(data=2, fsdp=2, tensor=2)
  return _equal_update_configs(c)


def dit_config(cache_dir: str):
  from gae_jax import configs_lib  # pylint: disable=g-import-not-at-top
  c = configs_lib.dit_config(f"runlocal,cache={cache_dir}", latent_dim=LATENT_D, epochs=80)
  c.model.latent_size, c.batch_size = LATENT_HW, 8
  c.total_steps = TRAIN_STEPS
  c.log_every = c.ckpt_every = 1
  c.image_every = 0
  c.data.read_threads = 1
  c.mesh = configs_lib.mesh_config(data=2, fsdp=2, tensor=2)
  return _equal_update_configs(c)


def write_latent_cache(cache_dir: str) -> str:
  """A 1-shard latent cache of random latents (no GAE needed)."""
  from gae_jax.data import latents as latents_lib  # pylint: disable=g-import-not-at-top
  os.makedirs(cache_dir, exist_ok=True)
  rng = np.random.default_rng(7)
  z = rng.normal(size=(CACHE_RECORDS, LATENT_HW, LATENT_HW, LATENT_D)).astype(np.float32)
  latents_lib.write_shard(
      os.path.join(cache_dir, latents_lib.shard_name(0, 0)),
      (latents_lib.encode_record(z[i], z[i, :, ::-1], i % 10, i) for i in range(len(z))))
  latents_lib.mark_completed(cache_dir, 0, {"num_shards": 1}, {0: CACHE_RECORDS})
  latents_lib.finalize(cache_dir, {"gae": "", "latent_shape": [LATENT_HW, LATENT_HW, LATENT_D],
                                   "num_classes": 10}, process_count=1)
  return cache_dir


def flat(tree) -> dict:
  """{'a/b/0/mu/...': numpy leaf}: the checkpoint's own path names (also for raw restores)."""
  import jax  # pylint: disable=g-import-not-at-top
  from gae_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  return {ckpt_lib._path_str(k): np.asarray(v)  # pylint: disable=protected-access
          for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def setups(out: str, names=("ae", "dit")):
  """{name: (trainer module, Setup)} of the AE ('ae') and / or the DiT ('dit')."""
  from gae_jax.trainers import autoencoder  # pylint: disable=g-import-not-at-top
  from gae_jax.trainers import flow  # pylint: disable=g-import-not-at-top
  unknown = set(names) - {"ae", "dit"}
  if unknown:
    raise ValueError(f"multihost_worker: unknown trainer name(s) {sorted(unknown)}; "
                     "expected 'ae' and / or 'dit'")
  built = {}
  if "ae" in names:
    built["ae"] = (autoencoder, autoencoder.Setup(ae_config()))
  if "dit" in names:
    built["dit"] = (flow, flow.Setup(dit_config(os.path.join(out, "cache"))))
  return built


def train_main(pid: int, port: str, out: str, names=("ae", "dit")):
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4 " + SUITE_FLAGS
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
  import time  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid,
                             initialization_timeout=120)
  from absl import logging  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from gae_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  assert jax.process_count() == 2 and jax.device_count() == 8
  built = setups(out, names)
  for name, (trainer, s) in built.items():        # 2-process training, disjoint shards
    trainer.train_and_evaluate(s.config, os.path.join(out, f"{name}2"))
  deadline = time.time() + 600
  while not os.path.exists(os.path.join(out, "ref_done")):
    if time.time() > deadline:
      raise TimeoutError("the test's 1-process runs never finished")
    time.sleep(0.5)
  saved = {}
  for name, (_, s) in built.items():              # 1-process checkpoints, restored here
    it = s.train_iterator()
    ckpt = ckpt_lib.Checkpointer(os.path.join(out, f"{name}1", "checkpoints"), save_every=1)
    state = ckpt.restore(s.abstract_state, it)
    ckpt.close()
    full = multihost_utils.process_allgather(
        {"params": state.params, "opt_state": state.opt_state}, tiled=True)
    saved.update({f"{name}/state/{k}": v for k, v in flat(full).items()})
    saved.update({f"{name}/batch/{k}": v for k, v in flat(next(it)).items()})
  np.savez(os.path.join(out, f"restore_p{pid}.npz"), **saved)
  jax.distributed.shutdown()


if __name__ == "__main__":
  if len(sys.argv) > 4 and sys.argv[4] == "train":
    train_main(int(sys.argv[1]), sys.argv[2], sys.argv[3],
               tuple(sys.argv[5].split(",")) if len(sys.argv) > 5 else ("ae", "dit"))
  else:
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
