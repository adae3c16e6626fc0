"""grain input pipelines: source -> per-process numpy batches (flax gemma input_pipeline_grain).

  training (repeat=True): source -> shuffle(seed) -> repeat (reshuffled every epoch)
  -> (random_)map(decode + crop + flip + to [-1, 1]) -> this process's rows of every
  global batch -> to_iter_dataset(threads) -> batch(per-process batch) -> mp_prefetch
  finite passes (repeat=False): source -> this process's strided shard -> (shuffle) -> map

Training streams are global: global batch j holds global samples [j B, (j + 1) B) of one
seeded order (B = per-process batch x process_count), and process p reads rows
[p b, (p + 1) b) of it, the rows its devices hold in the global jax.Array. The per-example
rng of the random map is grain's, derived from (seed, global index), so the global batches
are a pure function of the seed, whatever the number of processes. The returned iterator's
`get_state()`/`set_state()` (or orbax `grain.checkpoint.CheckpointSave/Restore`) resume on
the identical next batch; `seek(iterator, j)` puts it at global batch j (a resume on another
process count). `gae_jax.sharding` turns the batches into global jax.Arrays.

Augmentation (splits starting with "train"): `crop` (+ `random_flip`); the embedded source
always uses the random-scale crop of its train regions. Other splits: ADM center crop,
no flip.
"""

import dataclasses

from absl import flags
from absl import logging
import grain
import ml_collections
import numpy as np

from gae_jax.data import sources
from gae_jax.data import transforms

SOURCES = ("embedded", "folder", "tfds")


def default_data_config() -> ml_collections.ConfigDict:
  """Defaults embedded by the configs as `config.data`."""
  return ml_collections.ConfigDict(dict(
      source="embedded",          # "embedded" | "folder" | "tfds"
      image_size=256,
      # folder: root/<split>/<class>/*.jpg|png|... or root/<class>/* (seeded val holdout).
      root="",
      folder_holdout_fraction=0.1,  # root/<class>/* layout only: per-class share held out
      folder_holdout_seed=0,
      # folder: unreadable / corrupt images are skipped and logged; more than this share of
      # the split's files -> the run stops listing them (sources.ImageFolder).
      max_bad_fraction=0.001,
      tfds_name="imagenet2012",
      tfds_data_dir="",           # "" (or None) = TFDS default (~/tensorflow_datasets)
      # Train-split augmentation (folder/tfds): "adm_center" (guided-diffusion
      # center_crop_arr), "random" (guided-diffusion random_crop_arr: ADM resize of the
      # short side to U[size, size/0.8], random crop) or "random_scale" (random square with
      # side log-uniform in [size, short side], bicubic resize).
      crop="adm_center",
      random_flip=True,
      embedded_length=4096,       # virtual epoch length of the embedded train split
      embedded_val_per_photo=16,  # embedded val = 11 photos x this many fixed crops
      num_workers=0,              # 0: in-process; > 0: grain mp_prefetch worker processes
      worker_buffer_size=2,       # batches buffered per worker (num_workers > 0)
      read_threads=8,             # threads decoding examples (per worker process)
      prefetch=64,                # examples buffered by those threads
  ))


def _get(c, key, default):
  return c.get(key, default) if hasattr(c, "get") else getattr(c, key, default)


def _source_name(data_config) -> str:
  src = data_config.source
  if src not in SOURCES:
    raise ValueError(f"unknown data.source {src!r}; expected one of {SOURCES}")
  return src


def _norm_split(split: str) -> str:
  return "val" if split == "validation" else split


def make_source(data_config, split: str):
  """The random-access source for `split` (records {"image", "label", "name"})."""
  src = _source_name(data_config)
  split = _norm_split(split)
  if src == "embedded":
    return sources.EmbeddedPhotos(
        split, data_config.image_size, length=_get(data_config, "embedded_length", 4096),
        val_per_photo=_get(data_config, "embedded_val_per_photo", 16))
  if src == "folder":
    if not data_config.root:
      raise ValueError("data.source='folder' needs data.root (got an empty path)")
    return sources.ImageFolder(
        data_config.root, split,
        holdout_fraction=_get(data_config, "folder_holdout_fraction", 0.1),
        holdout_seed=_get(data_config, "folder_holdout_seed", 0),
        max_bad_fraction=_get(data_config, "max_bad_fraction", 0.001))
  return sources.TfdsSource(data_config.tfds_name, split, data_config.tfds_data_dir or None)


def num_classes(data_config) -> int:
  src = _source_name(data_config)
  if src == "embedded":
    return len(sources.EMBEDDED_NAMES)
  if src == "folder":
    return make_source(data_config, "train").num_classes
  builder = sources.tfds_builder(data_config.tfds_name, data_config.tfds_data_dir or None)
  return int(builder.info.features["label"].num_classes)


def num_examples(data_config, split: str) -> int:
  """Examples in `split` over all processes (embedded train: the virtual epoch length)."""
  src = _source_name(data_config)
  if src == "tfds":  # metadata only, no need to open the records
    builder = sources.tfds_prepared_builder(data_config.tfds_name,
                                            data_config.tfds_data_dir or None)
    return int(builder.info.splits[sources.tfds_split(_norm_split(split))].num_examples)
  return len(make_source(data_config, split))


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """record -> {"image": float32 (S, S, 3) in [-1, 1], "label": int32}, plus "index"
  (int64) and "sp_target" (float32 (h, w, c), t(x) or t(flip x) by the image's flip draw)
  when the record carries them (`data/sp_targets.JoinedSource`).

  Called as (record) for deterministic preprocessing or (record, rng) under random_map.
  """
  image_size: int
  crop: str = "adm_center"
  flip: bool = False

  def __call__(self, record, rng: np.random.Generator | None = None):
    name = record.get("name", "<unnamed>")
    img = record["image"]
    if self.crop == "random_scale" and isinstance(img, np.ndarray):
      arr = transforms.random_scale_crop(img, self.image_size, rng)  # embedded train region
    else:
      arr = transforms.crop(transforms.decode_image(img, name), self.image_size, self.crop, rng)
    if arr.shape != (self.image_size, self.image_size, 3):
      raise ValueError(f"image {name}: crop gave shape {arr.shape}, expected "
                       f"{(self.image_size, self.image_size, 3)}")
    flipped = self.flip and rng.random() < 0.5   # transforms.random_flip's one draw
    if flipped:
      arr = arr[:, ::-1]
    out = {"image": transforms.to_float(arr), "label": np.int32(record["label"])}
    if "index" in record:
      out["index"] = np.int64(record["index"])
    if "sp_target" in record:   # data/sp_targets.JoinedSource: the image's own flip's target
      out["sp_target"] = record["sp_target_flip" if flipped else "sp_target"]
    return out


def derive_seed(*ints: int) -> int:
  return int(np.random.SeedSequence([int(i) % 2**32 for i in ints]).generate_state(1)[0])


def process_shard(ds: grain.MapDataset, what: str, *, seed: int, shuffle: bool, repeat: bool,
                  process_index: int, process_count: int) -> grain.MapDataset:
  """This process's equal share of `ds` (tail dropped), then shuffled / repeated.

  Every process gets len(ds) // process_count records (a strided slice), so all hosts run
  the same number of steps. `what` names the data in the error for too few records.
  For finite passes (evaluation, latent caching); training streams use `global_stream`.
  """
  n = len(ds) // process_count * process_count
  if n == 0:
    raise ValueError(f"{what} has {len(ds)} examples, fewer than "
                     f"process_count={process_count}")
  ds = ds[:n][process_index::process_count]
  if shuffle:
    ds = ds.shuffle(seed=derive_seed(seed, 1))
  if repeat:
    ds = ds.repeat()
  return ds


def global_stream(ds: grain.MapDataset, what: str, *, seed: int,
                  shuffle: bool) -> grain.MapDataset:
  """The infinite global training order of `ds`: a seeded permutation, a new one every
  epoch (grain reseeds the shuffle per repeated epoch), identical on every process."""
  if len(ds) == 0:  # pylint: disable=g-explicit-length-test
    raise ValueError(f"{what} has no examples")
  if shuffle:
    ds = ds.shuffle(seed=derive_seed(seed, 1))
  return ds.repeat()


class ProcessRows(grain.MapDataset):
  """Process p's rows of every global batch of `parent`, in order.

  Element k is parent[(k // b) * b * P + p * b + k % b] with b = per-process batch and
  P = process_count: batching this by b gives rows [p b, (p + 1) b) of global batch k // b,
  which is what `jax.make_array_from_process_local_data` expects process p to hold when the
  batch axis is laid out over the devices in process order.
  """

  def __init__(self, parent: grain.MapDataset, *, per_process_batch: int,
               process_index: int, process_count: int):
    super().__init__(parent)
    if per_process_batch < 1:
      raise ValueError(f"per-process batch {per_process_batch} must be positive")
    self._rows = parent
    self._b, self._p, self._n = int(per_process_batch), int(process_index), int(process_count)
    # whole global batches of a finite parent only; an infinite one stays infinite
    self._len = len(parent) // (self._b * self._n) * self._b

  def __len__(self) -> int:
    return self._len

  def __str__(self) -> str:
    return f"ProcessRows(b={self._b}, process={self._p}/{self._n})"

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    batch, row = divmod(int(index), self._b)
    return self._rows[(batch * self._n + self._p) * self._b + row]


def seek(iterator, batch_index: int) -> None:
  """Puts a `make_iterator` / `make_latent_iterator` training iterator at its batch
  `batch_index` (= global batch `batch_index`): a resume whose saved iterator state belongs
  to another process count. Raises ValueError when the iterator cannot seek."""
  try:
    grain.experimental.set_next_index(iterator, int(batch_index))
  except (NotImplementedError, AttributeError, TypeError) as e:
    raise ValueError(f"data iterator {iterator} cannot seek to batch {batch_index} "
                     f"({e}); resume on the process count that saved the checkpoint") from e


def make_dataset(data_config, *, split: str, seed: int, shuffle: bool = True,
                 repeat: bool = True, process_index: int = 0, process_count: int = 1,
                 augment: bool | None = None, per_process_batch: int = 1,
                 sp_targets: str | None = None) -> grain.MapDataset:
  """This process's per-example MapDataset (before batching); see the module docstring.

  repeat=True: this process's rows of the global stream (`ProcessRows`; per_process_batch
  is the row block it holds of every global batch), the same global order for any
  process_count. repeat=False: every process gets the same number of examples: the source
  is truncated to a multiple of process_count (at most process_count - 1 examples
  dropped), then sliced [process_index::process_count].
  augment: train-style crop/flip; default: split starts with "train".
  sp_targets: a cached L_sp target directory (`data/sp_targets.py`) joined by source index;
  each example then carries "index" and "sp_target" (needs a fixed crop).
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, process_count={process_count})")
  src = _source_name(data_config)
  size = int(data_config.image_size)
  if size < 1:
    raise ValueError(f"data.image_size={size} must be positive")
  if augment is None:
    augment = _norm_split(split).startswith("train")
  crop = data_config.crop
  if crop not in transforms.CROPS:
    raise ValueError(f"unknown data.crop {crop!r}; expected one of {transforms.CROPS}")

  source = make_source(data_config, split)
  if sp_targets:
    from gae_jax.data import sp_targets as sp_targets_lib  # pylint: disable=g-import-not-at-top
    sp_targets_lib.check_cacheable(data_config)
    source = sp_targets_lib.JoinedSource(source, sp_targets)
  what = f"split {split!r} of data.source={src!r}"
  ds = grain.MapDataset.source(source)
  if repeat:
    ds = global_stream(ds, what, seed=seed, shuffle=shuffle)
  else:
    ds = process_shard(ds, what, seed=seed, shuffle=shuffle, repeat=False,
                       process_index=process_index, process_count=process_count)
  if augment:
    if src == "embedded" and _norm_split(split) == "train":
      crop = "random_scale"
    fn = Preprocess(size, crop, bool(data_config.random_flip))
    if fn.crop == "adm_center" and not fn.flip:
      ds = ds.map(fn)
    else:  # global streams: the rng of global sample i, whichever process reads it
      ds = ds.random_map(fn, seed=derive_seed(seed, 2) if repeat
                         else derive_seed(seed, 2, process_index))
  else:
    ds = ds.map(Preprocess(size, "adm_center", False))
  if repeat:
    ds = ProcessRows(ds, per_process_batch=per_process_batch, process_index=process_index,
                     process_count=process_count)
  return ds


def make_iterator(data_config, *, split: str, batch_size: int, seed: int,
                  shuffle: bool = True, repeat: bool = True, drop_remainder: bool = True,
                  process_index: int | None = None, process_count: int | None = None,
                  augment: bool | None = None, sp_targets: str | None = None):
  """A checkpointable grain iterator (get_state()/set_state()) of this process's batches.

  Yields {"image": float32 (batch_size, S, S, 3) in [-1, 1], "label": int32 (batch_size,)};
  batch_size is the per-process batch. process_index/count default to jax's.
  """
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be positive")
  ds = make_dataset(data_config, split=split, seed=seed, shuffle=shuffle, repeat=repeat,
                    process_index=process_index, process_count=process_count,
                    augment=augment, per_process_batch=batch_size, sp_targets=sp_targets)
  if not repeat and drop_remainder and len(ds) < batch_size:
    raise ValueError(f"split {split!r} has {len(ds)} examples on this process, fewer than "
                     f"batch_size={batch_size} with drop_remainder=True (no batch at all)")
  threads = int(_get(data_config, "read_threads", 8))
  read = grain.ReadOptions(num_threads=threads,
                           prefetch_buffer_size=int(_get(data_config, "prefetch", 64)))
  it_ds = ds.to_iter_dataset(read).batch(batch_size, drop_remainder=drop_remainder)
  workers = int(_get(data_config, "num_workers", 0))
  if workers > 0:
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (e.g. in notebooks)
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=workers,
        per_worker_buffer_size=int(_get(data_config, "worker_buffer_size", 2))))
  logging.info("data %s[%s]: %d examples on process %d/%d, batch %d, workers %d",
               data_config.source, split, len(ds) if not repeat else -1, process_index,
               process_count, batch_size, workers)
  return iter(it_ds)
