"""Generation metrics of a sample set: gFID (+ sFID), Inception Score, precision / recall.

Samples: an `.npz` whose `arr_0` is uint8 [N, H, W, 3] (ADM's layout, what the `sample`
stage writes), a `sample` workdir holding one, or an in-memory array. Reference: ADM's
`VIRTUAL_imagenet256_labeled.npz` (its `mu`/`sigma`/`mu_s`/`sigma_s`; its `arr_0` images are
run through our Inception once for precision / recall and the features cached), one of our
stats files (`reference.save_stats`), or statistics computed here from any dataset source
(`reference_from_data`: center-cropped, uint8-quantised images, like the samples).

All features come from the sharded `features.InceptionFeatures`, so the numbers do not
depend on the batch size, the number of devices or hosts.
"""

import hashlib
import json
import os
from typing import Any

from absl import logging
import jax
import numpy as np

from gae_jax import paths
from gae_jax.evaluation import features as features_lib
from gae_jax.evaluation import fid as fid_lib
from gae_jax.evaluation import reference as reference_lib


# ------------------------------------------------------------------------------------------
# Samples.


def resolve_samples_path(path: str) -> str:
  """An `.npz` file, or a `sample` workdir (its config's `sample.output`.npz)."""
  path = os.fspath(path)
  if os.path.isdir(path):
    name = "samples"
    cfg = os.path.join(path, "config.json")
    if os.path.isfile(cfg):
      with open(cfg) as f:
        name = (json.load(f).get("sample") or {}).get("output", name)
    path = os.path.join(path, f"{name}.npz")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"samples file not found: {path}")
  return path


def npz_images_shape(path: str) -> tuple[int, ...]:
  """Shape of the uint8 `arr_0` images in an npz (header only)."""
  with reference_lib._open_member(path, "arr_0") as f:  # pylint: disable=protected-access
    shape, _, dtype = reference_lib._npy_header(f)  # pylint: disable=protected-access
  if len(shape) != 4 or shape[-1] != 3 or dtype != np.uint8:
    raise ValueError(f"{path}: arr_0 is {dtype} {shape}; expected uint8 images [N, H, W, 3]")
  return tuple(int(s) for s in shape)


def iter_npz_range(path: str, start: int, stop: int, batch_size: int):
  """uint8 images [start, stop) of an npz's `arr_0`, streamed in batches."""
  pos = 0
  for b in reference_lib.iter_reference_images(path, batch_size):
    lo, hi = max(start - pos, 0), min(stop - pos, b.shape[0])
    if hi > lo:
      yield b[lo:hi]
    pos += b.shape[0]
    if pos >= stop:
      return


def sample_features(extractor: features_lib.InceptionFeatures, samples: Any,
                    num_samples: int = -1) -> features_lib.FeatureResult:
  """Features of the first `num_samples` (-1: all) images of an npz path / array."""
  if isinstance(samples, (str, os.PathLike)):
    path = resolve_samples_path(samples)
    n = npz_images_shape(path)[0]
    n = n if num_samples < 0 else min(n, num_samples)
    start, stop = features_lib.process_slice(n)
    return extractor.extract(iter_npz_range(path, start, stop, extractor.rows),
                             num_batches=features_lib.num_chunks(n, extractor.rows))
  images = np.asarray(samples)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"samples must be images [N, H, W, 3], got shape {images.shape}")
  if num_samples >= 0:
    images = images[:num_samples]
  return features_lib.features_of_array(extractor, features_lib.to_uint8_images(images))


# ------------------------------------------------------------------------------------------
# References.


def data_images(data_config, split: str, batch_size: int, num_images: int = -1, *,
                labels: bool = False):
  """This process's center-cropped images of a data source as uint8 batches.

  Every process gets the same count (`pipeline.make_dataset` slices evenly); num_images
  limits the global count. With labels=True yields (uint8 images, int labels).
  """
  from gae_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  total = pipeline.num_examples(data_config, split)
  if data_config.source == "embedded" and split.startswith("train"):
    total = int(data_config.get("embedded_length", total))
  limit = total if num_images < 0 else min(num_images, total)
  per_proc = limit // jax.process_count()
  if per_proc < 1:
    raise ValueError(f"{split!r} of data.source={data_config.source!r}: {limit} images for "
                     f"{jax.process_count()} processes")
  # The embedded train split is 11 whole photos: use its seeded random-scale crops (a pure
  # function of the index) so the images are distinct; every other split is center-cropped.
  augment = data_config.source == "embedded" and split.startswith("train")
  it = pipeline.make_iterator(data_config, split=split, batch_size=batch_size, seed=0,
                              shuffle=False, repeat=False, drop_remainder=False,
                              augment=augment)
  seen = 0
  for batch in it:
    take = min(batch["image"].shape[0], per_proc - seen)
    if take <= 0:
      break
    img = features_lib.to_uint8_images(batch["image"][:take])
    yield (img, np.asarray(batch["label"][:take])) if labels else img
    seen += take


def _data_key(data_config, split: str, num_images: int, resize_mode: str) -> str:
  keys = ("source", "image_size", "root", "tfds_name", "tfds_data_dir", "embedded_length",
          "embedded_val_per_photo", "folder_holdout_fraction", "folder_holdout_seed")
  desc = {k: data_config.get(k) for k in keys}
  desc.update(split=split, num_images=num_images, resize=resize_mode, v=1)
  # What the images are, not only where: a changed folder / TFDS version / photo set gives
  # another key (sources.*.fingerprint), so a stale statistics file is never returned.
  from gae_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  desc["content"] = pipeline.make_source(data_config, split).fingerprint()
  return hashlib.sha1(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def reference_from_data(extractor: features_lib.InceptionFeatures, data_config, split: str,
                        *, num_images: int = -1, cache: bool = True
                        ) -> reference_lib.ReferenceStats:
  """FID reference statistics (+ features) of a data source's center-cropped split.

  Cached in `cache_dir("fid_refs")` under a hash of the source settings.
  """
  name = f"{data_config.source}-{split}-{_data_key(data_config, split, num_images, extractor.resize_mode)}.npz"
  path = os.path.join(paths.cache_dir("fid_refs"), name)
  if cache and os.path.isfile(path):
    logging.info("reference stats: %s (cached)", path)
    return reference_lib.load_reference_stats(path)
  rows = extractor.rows
  res = extractor.extract(data_images(data_config, split, rows, num_images))
  if res.feats is None:
    raise ValueError("reference_from_data needs an extractor with keep_feats=True")
  mu, sigma = res.stats.finalize()
  if cache and jax.process_index() == 0:
    reference_lib.save_stats(path, mu, sigma, res.feats)
  return reference_lib.ReferenceStats(mu=mu, sigma=sigma, feats=res.feats, path=path)


def _file_key(path: str) -> str:
  st = os.stat(path)
  return hashlib.sha1(f"{os.path.abspath(path)}:{st.st_size}:{int(st.st_mtime)}".encode()
                      ).hexdigest()[:16]


def reference_feats(extractor: features_lib.InceptionFeatures,
                    ref: reference_lib.ReferenceStats, *, max_images: int = -1,
                    cache: bool = True) -> np.ndarray:
  """[N, 2048] reference features for precision / recall.

  Taken from the file when it holds them; otherwise (ADM's batches) its `arr_0` images are
  run through the Inception and the features cached in `cache_dir("fid_refs")`.
  """
  if ref.feats is not None:
    return ref.feats if max_images < 0 else ref.feats[:max_images]
  if ref.images_shape is None or ref.path is None:
    raise ValueError(f"reference {ref.path} holds neither features nor images for "
                     "precision / recall")
  n = ref.images_shape[0] if max_images < 0 else min(max_images, ref.images_shape[0])
  name = f"feats-{os.path.basename(ref.path)}-{_file_key(ref.path)}-{n}-{extractor.resize_mode}.npy"
  path = os.path.join(paths.cache_dir("fid_refs"), name)
  if cache and os.path.isfile(path):
    return np.load(path)
  start, stop = features_lib.process_slice(n)
  res = extractor.extract(iter_npz_range(ref.path, start, stop, extractor.rows),
                          num_batches=features_lib.num_chunks(n, extractor.rows))
  feats = res.feats
  if cache and jax.process_index() == 0:
    tmp = f"{path}.{os.getpid()}.tmp.npy"
    np.save(tmp, feats)
    os.replace(tmp, path)
  return feats


# ------------------------------------------------------------------------------------------
# Metrics.


def generation_metrics(res: features_lib.FeatureResult, ref: reference_lib.ReferenceStats,
                       *, ref_feats: np.ndarray | None = None, k: int = 3,
                       is_splits: int = 10) -> dict[str, Any]:
  """{fid, [sfid], inception_score(+_std) or is_note, [precision, recall], counts}."""
  mu, sigma = res.stats.finalize()
  out: dict[str, Any] = {"num_samples": res.count,
                         "fid": fid_lib.frechet_distance(mu, sigma, ref.mu, ref.sigma)}
  if res.spatial_stats is not None and ref.mu_s is not None:
    mu_s, sigma_s = res.spatial_stats.finalize()
    out["sfid"] = fid_lib.frechet_distance(mu_s, sigma_s, ref.mu_s, ref.sigma_s)
  if res.logits is not None:
    splits = min(is_splits, res.logits.shape[0])
    out["inception_score"], out["inception_score_std"] = fid_lib.inception_score(
        res.logits, splits=splits, from_logits=True)
  else:
    out["inception_score_note"] = features_lib.IS_UNAVAILABLE
  if ref_feats is not None and res.feats is not None:
    if min(ref_feats.shape[0], res.feats.shape[0]) > k:
      out["precision"], out["recall"] = fid_lib.precision_recall(ref_feats, res.feats, k=k)
      out["num_reference_feats"] = int(ref_feats.shape[0])
    else:
      out["precision_recall_note"] = f"precision / recall need more than k={k} images"
  return out


def evaluate_samples(extractor: features_lib.InceptionFeatures, samples: Any,
                     ref: reference_lib.ReferenceStats, *, num_samples: int = -1,
                     precision_recall: bool = True, k: int = 3, is_splits: int = 10,
                     ref_feats: np.ndarray | None = None) -> dict[str, Any]:
  """gFID / sFID / IS / precision / recall of `samples` (npz path, sample dir or array)."""
  if precision_recall and ref_feats is None:
    ref_feats = reference_feats(extractor, ref)
  res = sample_features(extractor, samples, num_samples)
  out = generation_metrics(res, ref, ref_feats=ref_feats if precision_recall else None,
                           k=k, is_splits=is_splits)
  out["reference"] = ref.path
  if isinstance(samples, (str, os.PathLike)):
    out["samples"] = resolve_samples_path(samples)
  return out
