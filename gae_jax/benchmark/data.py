"""`--data_only`: the grain input pipeline alone, in images per second per host.

Sources, both built offline from the 11 photos bundled with scikit-image / scikit-learn
(`gae_jax.data.sources.EMBEDDED_NAMES`), each photo written `copies` times as a JPEG
(quality 90, its native size, like an ImageNet file):

  folder  a temporary ImageFolder, root/train/<class>/<i>.jpg
  tfds    a temporary TFDS dataset in ArrayRecord format (features image / label /
          file_name), prepared WITHOUT TensorFlow: a tfds GeneratorBasedBuilder whose
          examples are the JPEG files, serialised by tfds's own proto module. Read back
          through `tfds.data_source` exactly as `data.source='tfds'` reads ImageNet.
  latents a flow config's latent cache (data.cache_dir), when it names one.

The pipeline is the trainers' (`gae_jax.data.pipeline.make_iterator` with the config's
data block: crop, flip, read threads, grain worker processes); the record gives img/s per
host with the configured workers and, for comparison, twice the rate one host's chips
would consume at the issue's AE target (290 img/s per H100).
"""

import os
import shutil
import statistics
import tempfile
import time

import jax
import ml_collections
import numpy as np

AE_TARGET_IMG_S_PER_CHIP = 290.0
TFDS_NAME = "gae_jax_bench_photos"


def _photos():
  from gae_jax.data import sources  # pylint: disable=g-import-not-at-top
  return [(n, sources.load_embedded_photo(n)) for n in sources.EMBEDDED_NAMES]


def _write_jpegs(out_dir: str, copies: int) -> list[tuple[str, int]]:
  """(path, label) of every JPEG written under out_dir/<class>/."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  files = []
  for label, (name, arr) in enumerate(_photos()):
    cdir = os.path.join(out_dir, name)
    os.makedirs(cdir, exist_ok=True)
    for i in range(copies):
      path = os.path.join(cdir, f"{i:04d}.jpg")
      Image.fromarray(np.asarray(arr, np.uint8)).save(path, quality=90)
      files.append((path, label))
  return files


def folder_fixture(root: str, copies: int = 8) -> str:
  """An ImageFolder under `root` (root/train/<class>/*.jpg); returns root."""
  _write_jpegs(os.path.join(root, "train"), copies)
  return root


def tfds_fixture(data_dir: str, copies: int = 8) -> str:
  """Prepares the TFDS dataset TFDS_NAME (ArrayRecord) under data_dir; returns data_dir.

  Needs no TensorFlow: tfds serialises tf.train.Example with its bundled protos and
  keeps the JPEG bytes as they are.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  files = _write_jpegs(os.path.join(data_dir, "_jpeg"), copies)
  num_classes = len(_photos())

  class _Photos(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    name = TFDS_NAME
    VERSION = tfds.core.Version("1.0.0")
    # No source directory: tfds would look for checksums / metadata beside the class's
    # module (and needs the importlib_resources backport to do so inside a package).
    code_path = None

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(encoding_format="jpeg"),
          "label": tfds.features.ClassLabel(num_classes=num_classes),
          "file_name": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples(files),
              "validation": self._generate_examples(files[::copies])}

    def _generate_examples(self, items):
      for path, label in items:
        yield path, {"image": path, "label": label, "file_name": os.path.basename(path)}

  builder = _Photos(data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare()
  shutil.rmtree(os.path.join(data_dir, "_jpeg"), ignore_errors=True)
  return data_dir


def time_iterator(it, batches: int, warmup: int) -> dict:
  """Median / mean seconds per batch over `batches` after `warmup` batches."""
  for _ in range(warmup):
    next(it)
  times, n = [], 0
  t_all = time.perf_counter()
  for _ in range(batches):
    t0 = time.perf_counter()
    b = next(it)
    times.append(time.perf_counter() - t0)
    n += len(b["label"])
  total = time.perf_counter() - t_all
  return {"batches": batches, "images": n, "seconds": total,
          "img_per_s_per_host": n / total,
          "batch_time_s_median": statistics.median(times)}


def _image_record(config, source: str, data: ml_collections.ConfigDict, batch: int,
                  batches: int, warmup: int) -> dict:
  from gae_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  it = pipeline.make_iterator(data, split="train", batch_size=batch, seed=int(config.seed))
  rec = {"stage": "input_pipeline", "source": source, "image_size": int(data.image_size),
         "crop": data.crop, "random_flip": bool(data.random_flip),
         "num_workers": int(data.num_workers), "read_threads": int(data.read_threads),
         "per_host_batch": batch, **time_iterator(it, batches, warmup)}
  return rec


def run(config, *, batches: int = 20, warmup: int = 3, copies: int = 8,
        sources: tuple = ("folder", "tfds"), workdir: str | None = None) -> list[dict]:
  """One record per source (see the module docstring); temp data under `workdir`."""
  chips = jax.local_device_count()
  need = {"target_img_per_s_per_host": 2 * AE_TARGET_IMG_S_PER_CHIP * chips,
          "target_basis": f"2 x {AE_TARGET_IMG_S_PER_CHIP:g} img/s (GAE-L AE target per "
                          f"H100/H200) x {chips} local devices"}
  batch = int(config.batch_size) // jax.process_count()
  records = []
  if config.stage == "flow":
    if not config.data.get("cache_dir"):
      raise ValueError("--data_only with a DiT config needs config.data.cache_dir (a latent "
                       "cache); image pipelines: pass an autoencoder / teacher config")
    from gae_jax.data import latents as latents_lib  # pylint: disable=g-import-not-at-top
    it = latents_lib.make_latent_iterator(
        config.data.cache_dir, batch_size=batch, seed=int(config.seed),
        flip=bool(config.data.flip), read_threads=int(config.data.read_threads))
    rec = {"stage": "input_pipeline", "source": "latents", "per_host_batch": batch,
           **time_iterator(iter(it), batches, warmup)}
    return [rec]
  if "data" not in config or "image_size" not in config.data:
    raise ValueError(f"--data_only: config (stage {config.stage!r}) has no image data block")
  own_tmp = workdir is None
  root = workdir or tempfile.mkdtemp(prefix="gae_jax_bench_data_")
  try:
    for source in sources:
      data = ml_collections.ConfigDict(config.data.to_dict())
      if not data.image_size:
        data.image_size = 256
      if source == "folder":
        data.source, data.root = "folder", folder_fixture(os.path.join(root, "folder"), copies)
      elif source == "tfds":
        data.source, data.tfds_name = "tfds", TFDS_NAME
        data.tfds_data_dir = tfds_fixture(os.path.join(root, "tfds"), copies)
      elif source == "configured":
        pass
      else:
        raise ValueError(f"unknown --data_only source {source!r}: folder, tfds, configured")
      rec = _image_record(config, source, data, batch, batches, warmup)
      rec["files"] = 11 * copies if source != "configured" else None
      rec.update(need)
      records.append(rec)
  finally:
    if own_tmp:
      shutil.rmtree(root, ignore_errors=True)
  return records
