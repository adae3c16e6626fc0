"""Cached L_sp targets: the frozen VFM (+ stage-1 teacher E_sp) over the train split, once.

The autoencoder's semantic-preservation target t(x) = E_sp(f_vfm(resize(x))) (paper Sec. 3.2,
Eq. 4; `trainers/autoencoder.py` `sp_target`) depends only on the pixels the step sees. When
every train example's crop is the same each epoch (`data.crop="adm_center"`), the image the
step sees is one of two: x or flip(x). This module stores both targets per example, t(x) and
t(flip x), and joins them to the image stream by source index; the step then skips the VFM.
A cached t(x) is never flipped in its place: DINOv2 (so E_sp) is not flip-equivariant,
t(flip x) != flip(t(x)).

Switch: `config.teacher.cache_outputs=True` (`config.teacher.cache_dir`: where; default
`<workdir>/sp_targets`). Layout (records and shards as `data/latents.py`, whose writer and
record codec are reused):

  latents-p00000-s00000.array_record   msgpack {"latent": t(x), "latent_flip": t(flip x),
                                       "label", "index"}, float32 (h, w, c), index order
  manifest.json                        format, settings (the fingerprint below), shards,
                                       num_records, target_shape; written last

The settings key the cache: the teacher checkpoint (`teacher.init_from` and its file
fingerprint), the VFM (name, weights file fingerprint, input size), `loss.sp_align`,
`frozen_dtype`, and the data source (its content fingerprint, image size, crop). A cache
whose manifest holds other settings is rebuilt; a matching one is reused (a resumed run
reads it again). Built by process 0; the other processes wait at a barrier.

Invalid (a one-line ValueError at start): `data.crop="random"` / `"random_scale"`, and
`data.source="embedded"` (its train split always takes random-scale crops): the target
would change every step.
"""

import json
import os
from typing import Callable, Optional

from absl import logging
import grain
import numpy as np

from gae_jax import paths as paths_lib
from gae_jax.data import latents as latents_lib

FORMAT = "gae_jax.sp_targets/1"
SHARD_RECORDS = 4096


def check_cacheable(data_config) -> None:
  """Raises a one-line ValueError when the train crop is not fixed per example."""
  if data_config.source == "embedded":
    raise ValueError("config.teacher.cache_outputs=True needs a fixed train crop, but "
                     "data.source='embedded' always takes random-scale train crops; use a "
                     "folder or tfds source with data.crop='adm_center'")
  if data_config.crop != "adm_center":
    raise ValueError(f"config.teacher.cache_outputs=True needs a fixed train crop, but "
                     f"data.crop={data_config.crop!r} draws a new crop every step; use "
                     f"data.crop='adm_center'")


def cache_dir(config, workdir: str) -> str:
  """`config.teacher.cache_dir`, or `<workdir>/sp_targets`."""
  return config.teacher.get("cache_dir") or os.path.join(workdir, "sp_targets")


def _file_key(path: Optional[str]) -> Optional[str]:
  if not path:
    return None
  from gae_jax.data import sources  # pylint: disable=g-import-not-at-top
  return sources.path_fingerprint(path)


def settings(config, source) -> dict:
  """The fingerprint a cache is keyed by (JSON-able; compared for equality)."""
  t, d = config.teacher, config.data
  return {
      "teacher": t.get("init_from"), "teacher_fingerprint": _file_key(t.get("init_from")),
      "vfm": t.get("vfm"), "vfm_weights": t.get("vfm_weights"),
      "vfm_weights_fingerprint": _file_key(t.get("vfm_weights")),
      "vfm_image_size": int(t.get("vfm_image_size") or 0),
      "sp_align": config.loss.get("sp_align", "latent"),
      "frozen_dtype": config.get("frozen_dtype"),
      "data_source": d.source, "data_fingerprint": source.fingerprint(),
      "num_examples": len(source), "image_size": int(d.image_size), "crop": d.crop,
  }


def _read_manifest(directory: str) -> Optional[dict]:
  path = paths_lib.path(directory) / latents_lib.MANIFEST
  if not path.is_file():
    return None
  manifest = json.loads(path.read_text())
  return manifest if manifest.get("format") == FORMAT else None


def ensure(directory: str, key: dict, source, image_size: int,
           target_fn: Callable[[np.ndarray], np.ndarray], *, batch_size: int = 16) -> dict:
  """Reuses the cache in `directory` when its manifest's settings equal `key`; otherwise
  (re)writes it: every source example, centre-cropped as the train stream crops it, through
  `target_fn` ((B, S, S, 3) float32 in [-1, 1] -> (B, h, w, c)) unflipped and flipped.
  Returns the manifest. Runs on process 0; other processes wait for it."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from gae_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  manifest = _read_manifest(directory)
  if manifest is not None and manifest.get("settings") == key:
    logging.info("sp targets: reusing %s (%d records)", directory, manifest["num_records"])
    return manifest
  if jax.process_index() == 0:
    logging.info("sp targets: %s %s; writing %d examples x 2 flips", directory,
                 "has other settings" if manifest else "is empty", len(source))
    paths_lib.path(directory).mkdir(parents=True, exist_ok=True)
    old = paths_lib.path(directory) / latents_lib.MANIFEST
    if old.is_file():
      old.unlink()        # a half-rewritten cache must not read as the old one
    prep = pipeline.Preprocess(int(image_size), "adm_center", False)
    n, shards, shape = len(source), [], None
    for s, start in enumerate(range(0, n, SHARD_RECORDS)):
      def records(start=start):
        nonlocal shape
        stop = min(start + SHARD_RECORDS, n)
        for b in range(start, stop, batch_size):
          idx = range(b, min(b + batch_size, stop))
          ex = [prep(source[i]) for i in idx]
          x = np.stack([e["image"] for e in ex])
          t = np.asarray(target_fn(x), np.float32)
          t_flip = np.asarray(target_fn(np.ascontiguousarray(x[:, :, ::-1])), np.float32)
          shape = list(t.shape[1:])
          for k, i in enumerate(idx):
            yield latents_lib.encode_record(t[k], t_flip[k], int(ex[k]["label"]), i)
      name = latents_lib.shard_name(0, s)
      count = latents_lib.write_shard(os.path.join(directory, name), records())
      shards.append({"file": name, "num_records": count})
    manifest = {"format": FORMAT, "settings": key, "shards": shards, "num_records": n,
                "target_shape": shape}
    latents_lib.write_json(os.path.join(directory, latents_lib.MANIFEST), manifest)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("sp_targets.ensure")
    manifest = _read_manifest(directory)
  return manifest


class JoinedSource:
  """A train source with each record's cached targets: record i of `source` plus
  "index": i, "sp_target": t(x_i), "sp_target_flip": t(flip x_i) (float32 (h, w, c)).

  Raises ValueError when the cache's record count or a record's index does not match."""

  def __init__(self, source, directory: str):
    manifest = _read_manifest(directory)
    if manifest is None:
      raise FileNotFoundError(f"{directory} holds no finished L_sp target cache "
                              f"({latents_lib.MANIFEST} of format {FORMAT!r})")
    if manifest["num_records"] != len(source):
      raise ValueError(f"L_sp target cache {directory} has {manifest['num_records']} records, "
                       f"the train source {len(source)}")
    paths = [paths_lib.local_copy(os.path.join(directory, s["file"]), what="sp target shard")
             for s in manifest["shards"]]
    self._source = source
    self._targets = grain.sources.ArrayRecordDataSource(paths)
    self._dir = directory

  def __len__(self) -> int:
    return len(self._source)

  def fingerprint(self) -> str:
    return self._source.fingerprint()

  def __getitem__(self, i) -> dict:
    i = int(i)
    rec = latents_lib.decode_record(self._targets[i])
    if int(rec["index"]) != i:
      raise ValueError(f"L_sp target cache {self._dir}: record {i} holds index "
                       f"{int(rec['index'])}")
    return {**self._source[i], "index": np.int64(i),
            "sp_target": np.asarray(rec["latent"], np.float32),
            "sp_target_flip": np.asarray(rec["latent_flip"], np.float32)}

