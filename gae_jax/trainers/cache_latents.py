"""`stage = "cache_latents"`: encode a dataset with a frozen tokenizer into the latent cache.

  python -m gae_jax.main --config=configs/cache_latents.py:tokenizer=/runs/gae_l32 \
      --workdir=/data/latents/gae_l32 [--distributed]

The tokenizer (`config.tokenizer.path`, any family: GAE, PAE, KL) is opened with
`pretrained.open_tokenizer` and used only through its `.encode_fn` (for a GAE z = mu, no
sigma-noise). z of every image and of its horizontal flip, with its label, is written
as ArrayRecord shards (layout and record format: `gae_jax.data.latents`). The source is
truncated to a multiple of the process count and sliced [process::count]; every process
encodes its slice with a jitted function sharded over its local devices and writes its own
shards `latents-p<process>-s<shard>`. A shard is written under a temporary name and
renamed when complete, then recorded in `progress-p<process>.json`; a rerun with the same
settings skips recorded shards, so an interrupted extraction resumes without redoing or
duplicating finished shards. When all processes are done, process 0 computes the per-
channel mean/std over a seeded sample of 10k latents (`stats.npz`) and writes
`manifest.json`, which the flow trainer reads.
"""

import functools
import os
import time

from absl import logging
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gae_jax import paths
from gae_jax import sharding as sharding_lib
from gae_jax.data import latents as latents_lib
from gae_jax.data import pipeline
from gae_jax.trainers import common


def encode_pair(params, images, *, encode_fn, dtype) -> tuple[jax.Array, jax.Array]:
  """(z(x), z(flip(x))) for NHWC images in [-1, 1]; one encoder call on [x; flip x].

  encode_fn: a tokenizer's pure (params, images) -> z (B, h, w, d).
  """
  x = jnp.concatenate([images, images[:, :, ::-1]], axis=0)
  z, z_flip = jnp.split(encode_fn(params, x).astype(dtype), 2)
  return z, z_flip


def make_encode_fn(encode_fn, dtype, mesh: jax.sharding.Mesh):
  """`encode_pair` jitted over `mesh`: params replicated, images and both latent outputs
  split over the mesh's 'data' axis (the stage's one-process mesh)."""
  data_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(functools.partial(encode_pair, encode_fn=encode_fn, dtype=dtype),
                 in_shardings=(rep, data_sh), out_shardings=(data_sh, data_sh))


def _data_config(config, tok_image_size: int) -> ml_collections.ConfigDict:
  data = ml_collections.ConfigDict(config.data.to_dict())
  if not data.image_size:
    data.image_size = tok_image_size
  if data.image_size != tok_image_size:
    logging.warning("cache_latents: data.image_size=%d differs from the tokenizer's %d; its "
                    "encoder resizes before encoding", data.image_size, tok_image_size)
  return data


def _settings(config, data, tok_path: str, n_local: int, process_count: int) -> dict:
  """What a resumed extraction must share with the shards already written: besides the
  settings, content keys of the tokenizer (its files: a retrained one at the same path
  differs) and of the data source (sources.*.fingerprint). The keys keep their first names
  ("gae", "gae_fingerprint") so caches begun before the tokenizer field still resume."""
  from gae_jax.data import sources  # pylint: disable=g-import-not-at-top
  shard = int(config.cache.shard_size)
  return {"gae": os.fspath(paths.path(tok_path)),
          "gae_fingerprint": sources.path_fingerprint(tok_path),
          "data_fingerprint": pipeline.make_source(data, config.cache.split).fingerprint(),
          "source": data.source, "root": data.root,
          "tfds_name": data.tfds_name, "split": config.cache.split,
          "image_size": int(data.image_size), "augment": bool(config.cache.augment),
          "embedded_length": int(data.embedded_length), "seed": int(config.seed),
          "dtype": config.cache.dtype, "process_count": process_count,
          "examples_per_process": n_local, "shard_size": shard,
          "num_shards": -(-n_local // shard)}


def _source_dataset(config, data, process_index: int, process_count: int):
  ds = pipeline.make_dataset(data, split=config.cache.split, seed=config.seed, shuffle=False,
                             repeat=False, process_index=0, process_count=1,
                             augment=bool(config.cache.augment))
  n = len(ds)
  if config.cache.max_examples and config.cache.max_examples > 0:
    n = min(n, int(config.cache.max_examples))
  n = n // process_count * process_count
  if n == 0:
    raise ValueError(f"data.source={data.source!r} split {config.cache.split!r} has fewer "
                     f"examples than the {process_count} processes")
  # Example i of this process is source example process_index + i * process_count.
  return ds[:n][process_index::process_count], n


def plan(config) -> dict:
  return {"stage": "cache_latents", "tokenizer": config.tokenizer.path,
          "data": {"source": config.data.source, "split": config.cache.split,
                   "image_size": config.data.image_size or "from the tokenizer"},
          "shard_size": config.cache.shard_size, "global_batch": config.batch_size,
          "processes": jax.process_count(), "local_devices": jax.local_device_count(),
          "stored_dtype": config.cache.dtype, "stats_samples": config.cache.stats_samples}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Writes (or completes) the cache in `workdir`; returns the manifest (or {} if stopped)."""
  from gae_jax import pretrained  # pylint: disable=g-import-not-at-top
  tok_path = config.tokenizer.path
  if not tok_path:
    raise ValueError("config.tokenizer.path must name a tokenizer (GAE / PAE / KL workdir, "
                     "converted dir or released file): config arg 'tokenizer=PATH'")
  if config.cache.dtype not in ("float32", "bfloat16"):
    raise ValueError(f"config.cache.dtype={config.cache.dtype!r}: use float32 or bfloat16")
  common.write_config(config, workdir)
  paths.makedirs(workdir)
  pi, pc = jax.process_index(), jax.process_count()
  tok = pretrained.open_tokenizer(tok_path, use_ema=config.tokenizer.use_ema,
                                  vfm_weights=config.tokenizer.get("vfm_weights"))
  data = _data_config(config, tok.image_size)
  ds, n_total = _source_dataset(config, data, pi, pc)
  n_local = len(ds)
  settings = _settings(config, data, tok_path, n_local, pc)
  done = latents_lib.completed_shards(workdir, pi, settings)

  # One mesh over this process's devices: encoding needs no cross-host communication.
  mesh = sharding_lib.make_mesh([("data", -1)], devices=jax.local_devices())
  data_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  batch = int(config.batch_size) // pc
  if batch <= 0 or batch % mesh.size:
    raise ValueError(f"config.batch_size={config.batch_size} gives {batch} per process, not a "
                     f"multiple of the {mesh.size} local devices")
  params = jax.device_put(tok.params, rep)
  dtype = jnp.dtype(config.cache.dtype)
  encode = make_encode_fn(tok.encode_fn, dtype, mesh)
  size = int(data.image_size)
  shard_size = settings["shard_size"]
  logging.info("cache_latents: process %d/%d, %d of %d examples, %d shards of %d (%d done), "
               "batch %d on %d local devices", pi, pc, n_local, n_total,
               settings["num_shards"], shard_size, len(done), batch, mesh.size)
  read = grain.ReadOptions(num_threads=int(data.read_threads),
                           prefetch_buffer_size=int(data.prefetch))
  new_shards, t0, encoded = 0, time.perf_counter(), 0
  latent_shape = None
  for s in range(settings["num_shards"]):
    if s in done:
      continue
    if config.cache.stop_after_shards and new_shards >= config.cache.stop_after_shards:
      logging.info("cache_latents: stopping after %d new shards (cache.stop_after_shards)",
                   new_shards)
      return {}
    start, end = s * shard_size, min((s + 1) * shard_size, n_local)
    it = iter(ds[start:end].to_iter_dataset(read).batch(batch, drop_remainder=False))
    records = []
    for b in it:
      k = len(b["label"])
      images = np.asarray(b["image"], np.float32)
      if images.shape[1:] != (size, size, 3):
        raise ValueError(f"data pipeline gave images {images.shape[1:]}, expected "
                         f"{(size, size, 3)}")
      if k < batch:  # pad the last batch (repeat the last image) and discard the padding
        images = np.concatenate([images, np.repeat(images[-1:], batch - k, 0)])
      mu, mu_flip = encode(params, jax.device_put(images, data_sh))
      mu, mu_flip = (np.asarray(jax.device_get(a))[:k] for a in (mu, mu_flip))
      latent_shape = mu.shape[1:]
      for j in range(k):
        local = start + len(records)
        records.append(latents_lib.encode_record(
            mu[j], mu_flip[j], int(b["label"][j]), pi + local * pc))
      encoded += k
    count = latents_lib.write_shard(
        os.path.join(workdir, latents_lib.shard_name(pi, s)), records)
    done[s] = count
    latents_lib.mark_completed(workdir, pi, settings, done)
    new_shards += 1
    rate = encoded / max(time.perf_counter() - t0, 1e-9)
    logging.info("cache_latents: shard %d/%d (%d records), %.1f img/s", s + 1,
                 settings["num_shards"], count, rate)

  if pc > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("cache_latents_shards_done")
  manifest = {}
  if pi == 0:
    if latent_shape is None:  # everything was done before: read the shape from a record
      first = latents_lib.shard_paths(workdir)[0]
      rec = latents_lib.decode_record(
          grain.sources.ArrayRecordDataSource([paths.local_copy(first)])[0])
      latent_shape = np.shape(rec["latent"])
    meta = {"tokenizer": os.fspath(paths.path(tok_path)), "tokenizer_family": tok.family,
            "latent_shape": [int(v) for v in latent_shape], "dtype": config.cache.dtype,
            "num_classes": int(pipeline.num_classes(data)), "image_size": size,
            "source": data.source, "split": config.cache.split,
            "num_source_examples": n_total, "process_count": pc,
            "tokenizer_image_size": int(tok.image_size)}
    manifest = latents_lib.finalize(workdir, meta, process_count=pc,
                                    stats_samples=int(config.cache.stats_samples),
                                    stats_seed=int(config.cache.stats_seed))
    logging.info("cache_latents: %d records in %d shards, latents %s; stats over %d "
                 "latents -> %s", manifest["num_records"], len(manifest["shards"]),
                 tuple(latent_shape), manifest["stats_num_samples"], workdir)
  if pc > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("cache_latents_manifest_done")
  return manifest
