"""The latent cache: ArrayRecord shards of GAE latents, their statistics, a grain reader.

Layout of a cache directory (written by `gae_jax.trainers.cache_latents`):

  latents-p00000-s00000.array_record   process 0, shard 0 (one msgpack record per image)
  progress-p00000.json                 shards process 0 has completed (atomic rewrite)
  manifest.json                        written last, by process 0: every shard, counts,
                                       latent shape, the GAE it came from, stats file
  stats.npz                            per-channel `mean`, `std` (d,) float32

Each record is `flax.serialization.msgpack` of
  {"latent": (h, w, d), "latent_flip": (h, w, d), "label": int32, "index": int64}
with z = mu of the image and of its horizontal flip (float32 or bfloat16) and `index` the
example's position in the source (for de-duplication checks). As the authors' loader,
the reader picks the flipped latent with probability 1/2 per access; statistics use the
unflipped latents of a seeded sample of (at most) 10k records, std with Bessel's correction
(torch `.std`). Training normalises with (z - mean) / std, sampling inverts it.
"""

import io
import json
import os
import re
from typing import Any, Iterable, Optional

import flax.serialization
import grain
import numpy as np

from gae_jax import paths as paths_lib

FORMAT = "gae_jax.latents/1"
MANIFEST = "manifest.json"
STATS = "stats.npz"
_SHARD_RE = re.compile(r"latents-p(\d{5})-s(\d{5})\.array_record$")


def shard_name(process_index: int, shard_index: int) -> str:
  return f"latents-p{process_index:05d}-s{shard_index:05d}.array_record"


def progress_name(process_index: int) -> str:
  return f"progress-p{process_index:05d}.json"


# ------------------------------------------------------------------------------------------
# Records.


def encode_record(latent: np.ndarray, latent_flip: np.ndarray, label: int, index: int
                  ) -> bytes:
  if latent.shape != latent_flip.shape:
    raise ValueError(f"latent {latent.shape} and flipped latent {latent_flip.shape} differ")
  return flax.serialization.msgpack_serialize({
      "latent": np.ascontiguousarray(latent), "latent_flip": np.ascontiguousarray(latent_flip),
      "label": np.int32(label), "index": np.int64(index)})


def decode_record(data: bytes) -> dict:
  rec = flax.serialization.msgpack_restore(data)
  if not isinstance(rec, dict) or "latent" not in rec or "label" not in rec:
    raise ValueError("latent cache record lacks 'latent'/'label' (not a gae_jax latent cache?)")
  return rec


# ------------------------------------------------------------------------------------------
# Writing.


def _atomic_write_bytes(path: str, write_fn) -> None:
  """write_fn(local filename), then the file goes to `path` all-or-nothing: os.replace
  locally; for a remote `path`, written in its local mirror (paths.local_mirror, so this
  host reads it back without a download) and uploaded as one object."""
  if paths_lib.is_remote(path):
    local = paths_lib.local_mirror(path)
    tmp = f"{local}.tmp-{os.getpid()}"
    try:
      write_fn(tmp)
      paths_lib.put_file(tmp, path)
      os.replace(tmp, local)
      paths_lib.stamp_mirror(path, local)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)
    return
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    write_fn(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_json(path: str, obj: Any) -> None:
  def write(tmp):
    with open(tmp, "w") as f:
      json.dump(obj, f, indent=2)
  _atomic_write_bytes(path, write)


def write_shard(path: str, records: Iterable[bytes]) -> int:
  """Writes records to `path` atomically (temporary name, then os.replace); returns count."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  count = 0

  def write(tmp):
    nonlocal count
    writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
    try:
      for r in records:
        writer.write(r)
        count += 1
    finally:
      writer.close()
  _atomic_write_bytes(path, write)
  return count


def read_progress(cache_dir: str, process_index: int) -> Optional[dict]:
  path = paths_lib.path(cache_dir) / progress_name(process_index)
  if not path.is_file():
    return None
  return json.loads(path.read_text())


def completed_shards(cache_dir: str, process_index: int, settings: dict) -> dict[int, int]:
  """{shard index: record count} this process finished earlier with the same settings.

  A shard counts only if it is in the progress file *and* its file exists. Different
  settings (shard size, process count, source, GAE) raise ValueError: mixing them would
  duplicate or skip examples.
  """
  prog = read_progress(cache_dir, process_index)
  if prog is None:
    return {}
  if prog.get("settings") != settings:
    raise ValueError(
        f"{os.path.join(cache_dir, progress_name(process_index))} was written with other "
        f"settings {prog.get('settings')} than this run's {settings}; use a new cache dir")
  return {int(k): int(v) for k, v in prog.get("done", {}).items()
          if (paths_lib.path(cache_dir) / shard_name(process_index, int(k))).is_file()}


def mark_completed(cache_dir: str, process_index: int, settings: dict,
                   done: dict[int, int]) -> None:
  write_json(os.path.join(cache_dir, progress_name(process_index)),
             {"settings": settings, "done": {str(k): v for k, v in sorted(done.items())}})


# ------------------------------------------------------------------------------------------
# Statistics and manifest.


def shard_paths(cache_dir: str) -> list[str]:
  """Every finished shard file in the directory (sorted by process, then shard)."""
  found = paths_lib.path(cache_dir).glob("latents-p*-s*.array_record")
  return sorted(os.fspath(p) for p in found if _SHARD_RE.search(p.name))


def compute_stats(paths: list[str], num_samples: int = 10_000, seed: int = 0
                  ) -> tuple[np.ndarray, np.ndarray, int]:
  """Per-channel (mean, std, n) over the unflipped latents of a seeded record sample."""
  source = grain.sources.ArrayRecordDataSource([paths_lib.local_copy(p) for p in paths])
  n = len(source)
  if n == 0:
    raise ValueError(f"no latent records in {paths}")
  k = min(int(num_samples), n)
  idx = np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))
  total = total_sq = None
  count = 0
  for i in idx:
    z = np.asarray(decode_record(source[int(i)])["latent"], np.float64)
    z = z.reshape(-1, z.shape[-1])
    total = z.sum(0) if total is None else total + z.sum(0)
    total_sq = (z * z).sum(0) if total_sq is None else total_sq + (z * z).sum(0)
    count += z.shape[0]
  mean = total / count
  var = (total_sq - count * mean * mean) / max(count - 1, 1)
  return mean.astype(np.float32), np.sqrt(np.maximum(var, 0)).astype(np.float32), k


def finalize(cache_dir: str, meta: dict, *, process_count: int, stats_samples: int = 10_000,
             stats_seed: int = 0) -> dict:
  """After every process is done: stats.npz + manifest.json (process 0 only)."""
  shards, total = [], 0
  for p in range(process_count):
    prog = read_progress(cache_dir, p)
    if prog is None:
      raise ValueError(f"process {p} left no {progress_name(p)} in {cache_dir}")
    if len(prog["done"]) != prog["settings"]["num_shards"]:
      raise ValueError(f"process {p} finished {len(prog['done'])} of "
                       f"{prog['settings']['num_shards']} shards in {cache_dir}")
    for s, count in sorted((int(k), v) for k, v in prog["done"].items()):
      shards.append({"file": shard_name(p, s), "num_records": int(count)})
      total += int(count)
  paths = [os.path.join(cache_dir, s["file"]) for s in shards]
  mean, std, n = compute_stats(paths, stats_samples, stats_seed)
  def write(tmp):
    with open(tmp, "wb") as f:
      np.savez(f, mean=mean, std=std, num_samples=np.int64(n))
  _atomic_write_bytes(os.path.join(cache_dir, STATS), write)
  manifest = {"format": FORMAT, **meta, "shards": shards, "num_records": total,
              "stats": STATS, "stats_num_samples": n, "stats_seed": stats_seed}
  write_json(os.path.join(cache_dir, MANIFEST), manifest)
  return manifest


def load_manifest(cache_dir: str) -> dict:
  paths_lib.configure_cloud_storage()
  path = paths_lib.path(cache_dir) / MANIFEST
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: {cache_dir} is not a finished latent cache "
                            "(run the cache_latents stage first)")
  manifest = json.loads(path.read_text())
  if manifest.get("format") != FORMAT:
    raise ValueError(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}")
  return manifest


def manifest_tokenizer(manifest: Optional[dict]) -> Optional[str]:
  """The tokenizer path a cache was encoded with ("tokenizer"; "gae" in caches written
  before the tokenizer field), or None."""
  manifest = manifest or {}
  return manifest.get("tokenizer") or manifest.get("gae") or None


def load_stats(path: str) -> tuple[np.ndarray, np.ndarray]:
  """(mean, std) as (d,) float32 from a cache dir, its stats.npz, or the authors'
  `latents_stats.pt` ({'mean', 'std'} of shape (1, d, 1, 1))."""
  paths_lib.configure_cloud_storage()
  if paths_lib.path(path).is_dir():
    path = paths_lib.join(path, STATS)
  path = os.fspath(path)
  if not paths_lib.path(path).is_file():
    raise FileNotFoundError(f"latent statistics file {path} not found")
  if path.endswith(".npz"):
    with np.load(io.BytesIO(paths_lib.path(path).read_bytes())) as f:
      if "mean" not in f or "std" not in f:
        raise ValueError(f"{path} lacks 'mean'/'std' (has {sorted(f.files)})")
      mean, std = f["mean"], f["std"]
  else:
    import torch  # pylint: disable=g-import-not-at-top
    obj = torch.load(paths_lib.local_copy(path), map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or "mean" not in obj or "std" not in obj:
      raise ValueError(f"{path} is not a latents_stats file with 'mean' and 'std'")
    mean, std = (obj[k].detach().float().numpy() for k in ("mean", "std"))
  mean = np.asarray(mean, np.float32).reshape(-1)
  std = np.asarray(std, np.float32).reshape(-1)
  if mean.shape != std.shape:
    raise ValueError(f"{path}: mean {mean.shape} and std {std.shape} differ")
  if not np.all(std > 0):
    raise ValueError(f"{path}: std has non-positive entries")
  return mean, std


# ------------------------------------------------------------------------------------------
# Reading.


class _Decode(grain.transforms.RandomMap):
  """bytes -> {"latent": float32 (h, w, d), "label": int32}; flipped latent w.p. 1/2."""

  def __init__(self, flip: bool):
    self.flip = flip

  def random_map(self, data, rng: np.random.Generator):
    rec = decode_record(data)
    key = "latent_flip" if self.flip and rng.random() < 0.5 else "latent"
    return {"latent": np.asarray(rec[key], np.float32), "label": np.int32(rec["label"])}


def make_latent_dataset(cache_dir: str, *, seed: int, shuffle: bool = True,
                        repeat: bool = True, flip: bool = True, process_index: int = 0,
                        process_count: int = 1, per_process_batch: int = 1) -> grain.MapDataset:
  """This process's slice of the cache as a MapDataset of decoded (unnormalised) latents.

  repeat=True: this process's rows of the global training stream (`pipeline.ProcessRows`,
  the same global batches for any process count); repeat=False: a strided 1/process_count
  share of the records.
  """
  manifest = load_manifest(cache_dir)
  paths = [os.path.join(cache_dir, s["file"]) for s in manifest["shards"]]
  missing = [p for p in paths if not paths_lib.path(p).is_file()]
  if missing:
    raise FileNotFoundError(f"latent cache {cache_dir}: shard {missing[0]} is missing")
  # ArrayRecord reads local files only: a remote cache is read from a local copy
  # (paths.local_mirror; fetched once per host).
  paths = [paths_lib.local_copy(p, what="latent shard") for p in paths]
  from gae_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  ds = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(paths))
  what = f"latent cache {cache_dir}"
  if not repeat:
    ds = pipeline.process_shard(ds, what, seed=seed, shuffle=shuffle, repeat=False,
                                process_index=process_index, process_count=process_count)
    return ds.random_map(_Decode(flip), seed=pipeline.derive_seed(seed, 2, process_index))
  ds = pipeline.global_stream(ds, what, seed=seed, shuffle=shuffle)
  ds = ds.random_map(_Decode(flip), seed=pipeline.derive_seed(seed, 2))
  return pipeline.ProcessRows(ds, per_process_batch=per_process_batch,
                              process_index=process_index, process_count=process_count)


def make_latent_iterator(cache_dir: str, *, batch_size: int, seed: int, shuffle: bool = True,
                         repeat: bool = True, flip: bool = True, drop_remainder: bool = True,
                         process_index: Optional[int] = None,
                         process_count: Optional[int] = None, read_threads: int = 4):
  """Checkpointable grain iterator of {"latent": (B, h, w, d) float32, "label": (B,) int32}.

  batch_size is the per-process batch; latents are raw (normalise with `load_stats`).
  """
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  ds = make_latent_dataset(cache_dir, seed=seed, shuffle=shuffle, repeat=repeat, flip=flip,
                           process_index=process_index, process_count=process_count,
                           per_process_batch=batch_size)
  read = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=4 * batch_size)
  return iter(ds.to_iter_dataset(read).batch(batch_size, drop_remainder=drop_remainder))
