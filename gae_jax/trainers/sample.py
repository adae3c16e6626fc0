"""`stage = "sample"`: class-uniform (or random-label) samples of a LightningDiT, decoded
by its tokenizer (`config.tokenizer.path`, any family, else the one the flow run's cache
was encoded with; used only through `pretrained.open_tokenizer(...).decode_fn`).

  python -m gae_jax.main --config=configs/dit_xl_gae32_800ep.py:sample,cfg \
      --config.dit.init_from=/runs/dit_800ep --workdir=/runs/dit_800ep/samples

Labels (`sample.labels`): 'uniform' (default; the paper's main protocol and the released
inference_sample.py) gives exactly `num_samples / num_classes` samples per class (labels
0,0,..,1,1,..); 'random' (the ablation protocol, App. H) draws them uniformly from
`sample.seed`. The last global batch is padded (label 0, discarded). The whole sampler
(SDE without CFG, or an Euler/Heun ODE with CFG inside the guidance interval), the
de-normalisation z * std + mean, the tokenizer decode and the uint8 quantisation run in one jit
sharded over the batch.
Output: `<workdir>/<output>.npz` with `arr_0` (N, H, W, 3) uint8 (the ADM evaluator's
layout, streamed to disk batch by batch) and `<output>.png`, a grid of the first images
of every class (with random labels: the first images). Initial noise of sample i is
N(0, I) from fold_in(seed, i), so a sample does not depend on the batch size or the mesh.

The generator itself (sampler + decode, one jit) is gae_jax/flow/generate.py.
"""

import functools
import os
import shutil
import tempfile
import time
import zipfile

from absl import logging
import jax
import ml_collections
import numpy as np

from gae_jax import flow
from gae_jax import metrics as metrics_lib
from gae_jax import paths
from gae_jax import sharding as sharding_lib
from gae_jax.flow import generate as generate_lib
from gae_jax.trainers import common


class NpzWriter:
  """Streams an (N, H, W, C) uint8 array into `path` as `arr_0` (np.load-compatible .npz)."""

  def __init__(self, path: str, shape: tuple[int, ...]):
    self.path, self.shape, self.written = path, tuple(shape), 0
    # A remote `path` (gs://...) is streamed to a local temporary file, uploaded on close.
    self._tmp = (os.path.join(tempfile.mkdtemp(prefix="gae_jax_npz_"), "samples.npz")
                 if paths.is_remote(path) else path + ".tmp")
    self._zip = zipfile.ZipFile(self._tmp, "w", zipfile.ZIP_STORED, allowZip64=True)
    self._f = self._zip.open("arr_0.npy", "w", force_zip64=True)
    np.lib.format.write_array_header_2_0(
        self._f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                  "fortran_order": False, "shape": self.shape})

  def write(self, images: np.ndarray):
    images = np.ascontiguousarray(images, np.uint8)
    if images.shape[1:] != self.shape[1:] or self.written + len(images) > self.shape[0]:
      raise ValueError(f"NpzWriter: batch {images.shape} does not fit {self.shape} after "
                       f"{self.written} images")
    self._f.write(images.tobytes())
    self.written += len(images)

  def close(self):
    if self.written != self.shape[0]:
      raise ValueError(f"NpzWriter: wrote {self.written} of {self.shape[0]} images")
    self._f.close()
    self._zip.close()
    if paths.is_remote(self.path):
      paths.put_file(self._tmp, self.path)
      shutil.rmtree(os.path.dirname(self._tmp))
    else:
      os.replace(self._tmp, self.path)


LABEL_MODES = ("uniform", "random")


def _label_mode(s) -> str:
  mode = s.get("labels", "uniform")
  if mode not in LABEL_MODES:
    raise ValueError(f"config.sample.labels={mode!r}: use one of {LABEL_MODES}")
  return mode


def _padded_labels(num_samples: int, num_classes: int, batch: int, mode: str = "uniform",
                   seed: int = 0) -> tuple[np.ndarray, int]:
  """(labels padded to a multiple of batch, padded total); mode as `sample.labels`."""
  if mode == "random":
    labels = flow.random_labels(num_samples, num_classes, seed)
  else:
    labels = flow.class_uniform_labels(num_samples, num_classes)
  total = -(-num_samples // batch) * batch
  return np.concatenate([labels, np.zeros(total - num_samples, np.int32)]), total


def _grid_indices(num_samples: int, num_classes: int, n: int, mode: str = "uniform"
                  ) -> np.ndarray:
  """'uniform': the first images of each class block, interleaved class by class;
  'random': the first images. At most n."""
  if mode == "random":
    return np.arange(min(n, num_samples), dtype=np.int64)
  per = num_samples // num_classes
  idx = [c * per + k for k in range(per) for c in range(num_classes)]
  return np.asarray(idx[:n], np.int64)


def plan(config) -> dict:
  s = config.sample
  uniform = _label_mode(s) == "uniform" and s.num_samples % s.num_classes == 0
  per_class = s.num_samples // s.num_classes if uniform else None
  return {"stage": "sample", "dit": config.dit.init_from, "tokenizer": config.tokenizer.path,
          "num_samples": s.num_samples, "num_classes": s.num_classes,
          "per_class": per_class, "global_batch": config.batch_size,
          "calls": -(-s.num_samples // config.batch_size),
          "sampler": dict(s.to_dict())}


def _resolve_tokenizer(config, dit_path: str) -> str:
  """config.tokenizer.path, else the one a flow workdir names (its config, its cache)."""
  if config.tokenizer.path:
    return config.tokenizer.path
  import json  # pylint: disable=g-import-not-at-top
  from gae_jax.data import latents as latents_lib  # pylint: disable=g-import-not-at-top
  cfg_path = os.path.join(dit_path, "config.json")
  if paths.path(dit_path).is_dir() and paths.path(cfg_path).is_file():
    cfg = json.loads(paths.path(cfg_path).read_text())
    # "gae.init_from": flow runs written before the tokenizer field.
    tok = ((cfg.get("tokenizer") or {}).get("path")
           or (cfg.get("gae") or {}).get("init_from"))
    cache = (cfg.get("data") or {}).get("cache_dir")
    if not tok and cache:
      tok = latents_lib.manifest_tokenizer(latents_lib.load_manifest(cache))
    if tok:
      return tok
  raise ValueError("config.tokenizer.path is not set and cannot be found from "
                   f"config.dit.init_from={dit_path} (a flow workdir records its cache's "
                   "tokenizer)")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Samples, decodes and writes `<workdir>/<output>.npz` + `.png`; returns a summary."""
  from gae_jax import pretrained  # pylint: disable=g-import-not-at-top
  s = config.sample
  if not config.dit.init_from:
    raise ValueError("config.dit.init_from must name a flow workdir or the authors' .pt")
  common.write_config(config, workdir)
  mesh = sharding_lib.make_mesh(config.mesh)
  rules = sharding_lib.rules_from_config(config.sharding_rules)
  sharding_lib.global_batch_check(config.batch_size, mesh, rules)
  handle = pretrained.load_dit(config.dit.init_from, config.dit.stats,
                               use_ema=config.dit.use_ema, num_heads=config.dit.num_heads,
                               dtype=common.compute_dtype(config))
  if handle.mean is None:
    raise ValueError(f"no latent statistics for {config.dit.init_from}: set config.dit.stats")
  if s.num_classes != handle.num_classes:
    raise ValueError(f"config.sample.num_classes={s.num_classes} but the DiT has "
                     f"{handle.num_classes} classes")
  tok_path = _resolve_tokenizer(config, config.dit.init_from)
  tok = pretrained.open_tokenizer(tok_path, use_ema=config.tokenizer.use_ema,
                                  vfm_weights=config.tokenizer.get("vfm_weights"))
  if tok.latent_shape != handle.latent_shape:
    raise ValueError(f"tokenizer {tok_path} latents {tok.latent_shape} do not match the "
                     f"DiT's {handle.latent_shape}")
  rep = sharding_lib.replicated(mesh)
  dit_params = jax.device_put(handle.params, rep)
  tok_params = jax.device_put(tok.params, rep)
  mean, std = jax.device_put((handle.mean, handle.std), rep)
  batch = config.batch_size
  mode = _label_mode(s)
  labels, total = _padded_labels(s.num_samples, s.num_classes, batch, mode, s.seed)
  t0 = time.perf_counter()
  compiled = generate_lib.compile_generate(handle.model, tok.decode_fn, s, mesh, rules, batch,
                                           handle.latent_shape, dit_params, tok_params)
  logging.info("sample: compiled in %.1fs; %d samples (%s labels, %d classes) in %d calls "
               "of %d", time.perf_counter() - t0, s.num_samples, mode, s.num_classes,
               total // batch, batch)
  data = sharding_lib.data_sharding(mesh, rules)
  size = tok.image_size
  paths.makedirs(workdir)
  npz_path = os.path.join(workdir, f"{s.output}.npz")
  writer = NpzWriter(npz_path, (s.num_samples, size, size, 3)) if jax.process_index() == 0 \
      else None
  grid_idx = _grid_indices(s.num_samples, s.num_classes, s.grid_images, mode)
  grid = np.zeros((len(grid_idx), size, size, 3), np.uint8)
  base_key = jax.random.key(s.seed)
  make_noise = jax.jit(functools.partial(generate_lib.noise_for, s.seed, shape=handle.latent_shape),
                       out_shardings=data)
  t0 = time.perf_counter()
  for call, start in enumerate(range(0, total, batch)):
    with jax.set_mesh(mesh):
      noise = make_noise(np.arange(start, start + batch, dtype=np.uint32))
    y = sharding_lib.global_array(labels[start:start + batch], data)
    rng = jax.random.fold_in(jax.random.fold_in(base_key, 1), call)
    with jax.set_mesh(mesh):
      images = compiled(dit_params, tok_params, noise, y, rng, mean, std)
    images = common.to_host_images(images)
    keep = min(batch, s.num_samples - start)
    if writer is not None:
      writer.write(images[:keep])
    sel = (grid_idx >= start) & (grid_idx < start + keep)
    grid[sel] = images[grid_idx[sel] - start]
    if call % max(1, config.log_every) == 0:
      done = start + keep
      rate = done / max(time.perf_counter() - t0, 1e-9)
      logging.info("sample: %d/%d images, %.2f img/s", done, s.num_samples, rate)
  seconds = time.perf_counter() - t0
  png_path = os.path.join(workdir, f"{s.output}.png")
  if writer is not None:
    writer.close()
    ncols = min(s.num_classes, 16)
    metrics_lib.save_png(png_path, metrics_lib.image_grid(grid, ncols=ncols))
  logging.info("sample: wrote %s (%d images) and %s in %.1fs", npz_path, s.num_samples,
               png_path, seconds)
  return {"npz": npz_path, "png": png_path, "num_samples": s.num_samples,
          "seconds": seconds}
