"""Random-access data sources (grain `RandomAccessDataSource` protocol: __len__, __getitem__).

Every source yields records `{"image": <encoded bytes | uint8 HWC array>, "label": int32,
"name": str}`; `name` identifies the example in error messages (file path, photo name) and
is dropped by the pipeline's decode step.

* `EmbeddedPhotos`: the real colour photos bundled with scikit-image and scikit-learn,
  read from the installed packages' data files (never downloaded), one class per photo.
* `ImageFolder`: PyTorch ImageFolder layout.
* `TfdsSource`: a prepared TFDS dataset (ArrayRecord) read through `tfds.data_source`;
  reading needs no TensorFlow (only preparing does).
"""

from collections.abc import Sequence
import functools
import hashlib
import importlib.util
import json
import math
import os
import threading

from absl import logging
import numpy as np
from PIL import Image
from PIL import ImageFile

from gae_jax import paths
from gae_jax.data import transforms

def _digest(obj) -> str:
  return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def path_fingerprint(path: str) -> str:
  """A cheap content key of a file or directory tree (local or remote): sha1 of every
  file's relative path, size and mtime (16 hex digits). For caches keyed on what they were
  derived from (converted weights, a GAE workdir, ...): a changed, added or removed file
  changes the key. Raises FileNotFoundError when `path` does not exist."""
  p = paths.path(path)
  if not p.exists():
    raise FileNotFoundError(f"cannot fingerprint {path}: it does not exist")
  if not p.is_dir():
    st = p.stat()
    return _digest([os.fspath(p), st.length, st.mtime])
  rows = []
  # A remote walk yields its folders without the scheme ('bucket/run/...' for gs://), so
  # each file is addressed again relative to `p`, never by the walked path itself.
  root = os.fspath(p).split("://", 1)[-1].rstrip("/")
  for d, _, files in p.walk():
    sub = os.fspath(d).split("://", 1)[-1].rstrip("/")
    rel_dir = os.path.relpath(sub, root) if sub != root else ""
    for f in sorted(files):
      rel = os.path.join(rel_dir, f) if rel_dir else f
      st = (p / rel).stat()
      rows.append([rel, st.length, st.mtime])
  return _digest([os.fspath(p), sorted(rows)])


# ------------------------------------------------------------------------------------------
# Embedded photos.

# name -> (package, path inside the package). All RGB photographs (checked: skimage's
# `cat` is the same photo as `chelsea`, `colorwheel`/`logo` are synthetic, the rest grey).
_EMBEDDED_FILES = {
    "astronaut": ("skimage", "data/astronaut.png"),
    "chelsea": ("skimage", "data/chelsea.png"),
    "china": ("sklearn", "datasets/images/china.jpg"),
    "coffee": ("skimage", "data/coffee.png"),
    "flower": ("sklearn", "datasets/images/flower.jpg"),
    "hubble_deep_field": ("skimage", "data/hubble_deep_field.jpg"),
    "ihc": ("skimage", "data/ihc.png"),
    "motorcycle_left": ("skimage", "data/motorcycle_left.png"),
    "motorcycle_right": ("skimage", "data/motorcycle_right.png"),
    "retina": ("skimage", "data/retina.jpg"),
    "rocket": ("skimage", "data/rocket.jpg"),
}
# Label = index in this sorted list.
EMBEDDED_NAMES: tuple[str, ...] = tuple(sorted(_EMBEDDED_FILES))
# Each photo is split along its long side: the first 3/4 feeds train, the last 1/4 val.
EMBEDDED_TRAIN_FRACTION = 0.75
_EMBEDDED_VAL_SEED = 20240917  # fixed: val crops never depend on the run's seed


def embedded_photo_path(name: str) -> str:
  """Path of the bundled photo `name` inside its installed package (no import, no network)."""
  if name not in _EMBEDDED_FILES:
    raise ValueError(f"unknown embedded photo {name!r}; expected one of {EMBEDDED_NAMES}")
  package, rel = _EMBEDDED_FILES[name]
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"embedded photo {name!r} needs the package {package!r}, "
                            "which is not installed")
  path = os.path.join(list(spec.submodule_search_locations)[0], rel)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"embedded photo {name!r}: file not found: {path}")
  return path


def load_embedded_photo(name: str) -> np.ndarray:
  """The full photo as uint8 HWC RGB."""
  path = embedded_photo_path(name)
  with open(path, "rb") as f:
    return np.asarray(transforms.decode_image(f.read(), path))


_EMBEDDED_LOCK = threading.Lock()  # grain's read threads would otherwise all build them


def embedded_regions(image_size: int) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
  """Per photo (in EMBEDDED_NAMES order) the disjoint (train, val) regions.

  The photo is first upscaled (BICUBIC, never downscaled) so its long side is >= 4 *
  image_size; then the long axis is cut at EMBEDDED_TRAIN_FRACTION. The val strip is thus
  >= image_size along the long axis and the short side is >= image_size for every photo
  (aspect ratios <= 1.5), so val crops exist for any image_size. Cached per process.
  """
  with _EMBEDDED_LOCK:
    return _embedded_regions_cached(int(image_size))


def _build_embedded_regions(image_size: int):
  out = []
  for name in EMBEDDED_NAMES:
    photo = load_embedded_photo(name)
    h, w = photo.shape[:2]
    scale = max(1.0, 4 * image_size / max(h, w))
    if scale > 1.0:
      h, w = round(h * scale), round(w * scale)
      photo = np.asarray(Image.fromarray(photo).resize((w, h), resample=Image.BICUBIC))
    if min(h, w) < image_size:
      raise ValueError(f"embedded photo {name!r} of shape {(h, w)} is too narrow for "
                       f"image_size={image_size}")
    axis = 1 if w >= h else 0
    cut = int(round(photo.shape[axis] * EMBEDDED_TRAIN_FRACTION))
    train, val = np.split(photo, [cut], axis=axis)
    train.flags.writeable = False
    val.flags.writeable = False
    out.append((train, val))
  return tuple(out)


@functools.lru_cache(maxsize=8)
def _embedded_regions_cached(image_size: int):
  return _build_embedded_regions(image_size)


class EmbeddedPhotos(Sequence):
  """A virtual dataset over the bundled photos; label = photo index in EMBEDDED_NAMES.

  train: `length` records; record i is the whole train region of photo
    `i * n_photos // length` (contiguous blocks, so any process shard sees every photo);
    the pipeline's per-example random crop (random_scale_crop) makes each sample a pure
    function of (seed, index).
  val: `val_per_photo * n_photos` fixed crops, each already image_size x image_size;
    record j is crop j // n_photos of photo j % n_photos (consecutive records cycle
    photos), drawn from the val region with a fixed seed: identical on every call.
  """

  def __init__(self, split: str, image_size: int, *, length: int = 4096,
               val_per_photo: int = 16):
    if split not in ("train", "val"):
      raise ValueError(f"embedded source: unknown split {split!r}; expected 'train' or 'val'")
    n = len(EMBEDDED_NAMES)
    if split == "train" and length < n:
      raise ValueError(f"embedded_length={length} must be >= the number of photos ({n})")
    if split == "val" and val_per_photo < 1:
      raise ValueError(f"embedded_val_per_photo={val_per_photo} must be >= 1")
    self.split = split
    self.image_size = int(image_size)
    self._length = int(length) if split == "train" else n * int(val_per_photo)
    self.num_classes = n

  @property
  def regions(self) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    return embedded_regions(self.image_size)

  def fingerprint(self) -> str:
    """Content key: the bundled photo files (path, size, mtime) and the split layout."""
    files = []
    for n in EMBEDDED_NAMES:
      st = os.stat(embedded_photo_path(n))
      files.append([n, st.st_size, st.st_mtime_ns])
    return _digest(["embedded", self.split, self.image_size, self._length,
                    EMBEDDED_TRAIN_FRACTION, files])

  def __len__(self) -> int:
    return self._length

  def val_box(self, j: int) -> tuple[int, int, int, int]:
    """(photo, top, left, side) of val crop j, in the photo's val-region coordinates."""
    n = len(EMBEDDED_NAMES)
    p, k = j % n, j // n
    val = self.regions[p][1]
    rng = np.random.default_rng([_EMBEDDED_VAL_SEED, p, k])
    return (p, *transforms.random_scale_box(val.shape[0], val.shape[1], self.image_size, rng))

  def __getitem__(self, i):
    i = int(i)
    if not 0 <= i < self._length:
      raise IndexError(f"index {i} out of range for embedded {self.split} ({self._length})")
    if self.split == "train":
      p = i * len(EMBEDDED_NAMES) // self._length
      image = self.regions[p][0]
    else:
      p, top, left, side = self.val_box(i)
      image = transforms.crop_resize(self.regions[p][1], (top, left, side), self.image_size)
    return {"image": image, "label": np.int32(p), "name": f"embedded:{EMBEDDED_NAMES[p]}"}


# ------------------------------------------------------------------------------------------
# Image folder.

def _readable_extensions() -> tuple[str, ...]:
  """Every file extension PIL can open (Image.registered_extensions(), lower case), less
  the stub formats that need an external handler (BUFR, GRIB, HDF5)."""
  Image.init()
  def real(fmt):
    factory = Image.OPEN.get(fmt, (None,))[0]
    return factory is not None and not (isinstance(factory, type)
                                        and issubclass(factory, ImageFile.StubImageFile))
  return tuple(sorted({e.lower() for e, fmt in Image.registered_extensions().items()
                       if fmt in Image.OPEN and real(fmt)}))


IMAGE_EXTENSIONS = _readable_extensions()   # .jpg .png .tif .tiff .gif .webp .bmp ...
_EXT_SUMMARY = (f"any of the {len(IMAGE_EXTENSIONS)} extensions PIL reads, "
                "e.g. .jpg .png .tif .gif")
_SPLIT_DIRS = {"train": ("train",), "val": ("val", "validation"),
               "validation": ("validation", "val"), "test": ("test",)}


def _isdir(path: str) -> bool:
  return paths.path(path).is_dir()


def _class_dirs(path: str) -> list[str]:
  if paths.is_remote(path):
    return sorted(e.name for e in paths.path(path).iterdir()
                  if not e.name.startswith(".") and e.is_dir())
  return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def _images_under(path: str) -> list[str]:
  out = []
  walk = ((os.fspath(d), ds, fs) for d, ds, fs in paths.path(path).walk()) if paths.is_remote(
      path) else os.walk(path, followlinks=True)
  for dirpath, dirnames, filenames in walk:
    dirnames.sort()
    out.extend(os.path.join(dirpath, f) for f in sorted(filenames)
               if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
  return out


@functools.lru_cache(maxsize=16)
def _scan(root: str, split: str, holdout_fraction: float, holdout_seed: int
          ) -> tuple[tuple[str, ...], tuple[tuple[str, int], ...]]:
  """(classes, ((path, label), ...)) for `split` of the image folder at `root`."""
  if not _isdir(root):
    raise FileNotFoundError(f"image folder root does not exist: {root}")
  names = _SPLIT_DIRS.get(split, (split,))
  split_dir = next((os.path.join(root, s) for s in names
                    if _isdir(os.path.join(root, s))), None)
  known_splits = [s for s in ("train", "val", "validation", "test")
                  if _isdir(os.path.join(root, s))]
  if split_dir is None and known_splits:
    raise FileNotFoundError(
        f"image folder {root} has split folders {known_splits} but none for split "
        f"{split!r} (looked for {[os.path.join(root, s) for s in names]})")

  # Classes always come from the train folder (or the root) so labels agree across splits.
  class_root = os.path.join(root, "train") if split_dir is not None else root
  if not _isdir(class_root):
    class_root = split_dir
  classes = _class_dirs(class_root)
  if not classes:
    raise ValueError(f"image folder {class_root} has no class subfolders "
                     "(expected <root>[/<split>]/<class>/<image files>)")
  label_of = {c: i for i, c in enumerate(classes)}

  if split_dir is not None:  # root/<split>/<class>/*
    files = []
    for c in _class_dirs(split_dir):
      if c not in label_of:
        raise ValueError(f"class folder {os.path.join(split_dir, c)} is not among the "
                         f"{len(classes)} classes of {class_root}")
      imgs = _images_under(os.path.join(split_dir, c))
      if not imgs:
        raise ValueError(f"class folder {os.path.join(split_dir, c)} has no image files "
                         f"({_EXT_SUMMARY})")
      files.extend((f, label_of[c]) for f in imgs)
    where = split_dir
  else:  # root/<class>/*, fixed seeded holdout for val
    if split not in ("train", "val", "validation"):
      raise ValueError(f"image folder {root} has no split folders; only 'train' and 'val' "
                       f"(a seeded holdout) exist, got split {split!r}")
    if not 0.0 <= holdout_fraction < 1.0:
      raise ValueError(f"folder_holdout_fraction={holdout_fraction} must be in [0, 1)")
    files = []
    for label, c in enumerate(classes):
      imgs = _images_under(os.path.join(root, c))
      if not imgs:
        raise ValueError(f"class folder {os.path.join(root, c)} has no image files "
                         f"({_EXT_SUMMARY})")
      n_val = min(len(imgs) - 1, math.ceil(holdout_fraction * len(imgs))) if imgs else 0
      perm = np.random.default_rng([holdout_seed, label]).permutation(len(imgs))
      held = set(perm[:n_val].tolist())
      keep = [k for k in range(len(imgs)) if (k in held) == (split != "train")]
      files.extend((imgs[k], label) for k in keep)
    where = f"{root} ({split} holdout)"
  if not files:
    raise ValueError(f"no images ({_EXT_SUMMARY}) found in {where}")
  return tuple(classes), tuple(files)


class ImageFolder(Sequence):
  """PyTorch ImageFolder layout; classes = sorted subfolder names.

  Layouts, tried in order:
    root/<split>/<class>/**/*.<ext>   ("val" also finds root/validation; <ext>: every
      format PIL reads, IMAGE_EXTENSIONS, case-insensitive)
    root/<class>/**/*  (no split folders): "train" and "val" are a fixed seeded holdout,
      per class ceil(holdout_fraction * n) images (at most n - 1) go to val.
  Classes always come from root/train (or root), so labels agree between splits. A class
  folder without any image file is an error naming it.

  Records carry the decoded uint8 HWC RGB image (transforms.decode_image). An unreadable
  or undecodable (corrupt, truncated) file is skipped: it is logged with its path and
  counted, and record i becomes the next readable file (i+1, i+2, ... cyclically, with
  that file's label), so the stream stays a pure function of the index. Once more than
  `max_bad_fraction` of the files were found bad in this process (0: the first one),
  reading raises ValueError listing them. Raises FileNotFoundError / ValueError on a bad layout.
  """

  def __init__(self, root: str, split: str, *, holdout_fraction: float = 0.1,
               holdout_seed: int = 0, max_bad_fraction: float = 0.001):
    self.root = os.fspath(paths.path(root))   # local (absolute) or gs://...
    self.split = split
    self.classes, self._files = _scan(self.root, split, float(holdout_fraction),
                                      int(holdout_seed))
    self.num_classes = len(self.classes)
    if not 0.0 <= max_bad_fraction < 1.0:
      raise ValueError(f"data.max_bad_fraction={max_bad_fraction} must be in [0, 1)")
    self.max_bad_fraction = float(max_bad_fraction)
    self.bad: dict[str, str] = {}   # path -> reason, found by this process
    self._bad_lock = threading.Lock()

  def __len__(self) -> int:
    return len(self._files)

  def path(self, i: int) -> str:
    return self._files[i][0]

  def fingerprint(self) -> str:
    """Content key: the file list with labels, and (local folders) every folder's mtime,
    which changes when a file is added, removed or renamed in it. Files rewritten in place
    under the same name are not seen (that would need a stat per file)."""
    dirs = sorted({os.path.dirname(f) for f, _ in self._files})
    mtimes = [] if paths.is_remote(self.root) else [os.stat(d).st_mtime_ns for d in dirs]
    return _digest(["folder", self.root, self.split, self.classes, self._files, mtimes])

  def _read(self, path: str) -> np.ndarray:
    try:
      with (paths.path(path).open("rb") if paths.is_remote(path) else open(path, "rb")) as f:
        data = f.read()
    except OSError as e:
      raise FileNotFoundError(f"cannot read image {path}: {e}") from e
    return np.asarray(transforms.decode_image(data, path))

  def _skip(self, path: str, error: Exception) -> None:
    with self._bad_lock:
      if path in self.bad:
        return
      self.bad[path] = f"{type(error).__name__}: {error}"
      n, limit = len(self.bad), self.max_bad_fraction * len(self._files)
      logging.warning("image folder %s: skipping unreadable image %s (%s); %d bad so far",
                      self.root, path, error, n)
      if n > limit:
        shown = sorted(self.bad)
        more = f" (+{len(shown) - 20} more)" if len(shown) > 20 else ""
        raise ValueError(
            f"image folder {self.root} [{self.split}]: {n} unreadable images exceed "
            f"data.max_bad_fraction={self.max_bad_fraction} of {len(self._files)} "
            f"(at most {math.floor(limit)}): {', '.join(shown[:20])}{more}")

  def __getitem__(self, i):
    n = len(self._files)
    for k in range(n):
      path, label = self._files[(int(i) + k) % n]
      try:
        image = self._read(path)
      except (OSError, ValueError) as e:
        self._skip(path, e)
        continue
      return {"image": image, "label": np.int32(label), "name": path}
    raise ValueError(f"image folder {self.root} [{self.split}]: no readable image")


# ------------------------------------------------------------------------------------------
# TFDS (ArrayRecord via tfds.data_source).


def tfds_split(split: str) -> str:
  """Our split names -> TFDS ones ('val' -> 'validation'); others pass through."""
  return "validation" if split == "val" else split


def tfds_builder(name: str, data_dir: str | None):
  """The TFDS builder (reads metadata only; imports no TensorFlow)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds.builder(name, data_dir=data_dir or None)


def tfds_prepared_builder(name: str, data_dir: str | None):
  """The builder, after checking the dataset is prepared in a random-access format."""
  builder = tfds_builder(name, data_dir)
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"TFDS dataset {name!r} is not prepared under data_dir={data_dir or '<tfds default>'} "
        f"(looked for {builder.data_dir}/dataset_info.json). Prepare it once, with "
        f"TensorFlow installed: `tfds build {name} --file_format=array_record "
        f"--data_dir={data_dir or '<dir>'}` (imagenet2012 needs the ILSVRC2012 tars in "
        f"<data_dir>/downloads/manual), then set data.tfds_data_dir.")
  fmt = str(builder.info.file_format).lower()
  if "array_record" not in fmt and "parquet" not in fmt:
    raise ValueError(
        f"TFDS dataset {name!r} in {builder.data_dir} is stored as {builder.info.file_format},"
        " which has no random access; re-prepare it with --file_format=array_record")
  return builder


def open_tfds_source(name: str, split: str, data_dir: str | None):
  """`tfds.data_source` with images left as encoded bytes (decoded with PIL by us)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds_prepared_builder(name, data_dir)
  return tfds.data_source(name, split=split, data_dir=data_dir or None, download=False,
                          decoders={"image": tfds.decode.SkipDecoding()})


class TfdsSource(Sequence):
  """A prepared TFDS image-classification dataset (features 'image', 'label')."""

  def __init__(self, name: str, split: str, data_dir: str | None = None):
    self.name = name
    self.split = tfds_split(split)
    self._source = open_tfds_source(name, self.split, data_dir)
    logging.info("tfds %s[%s]: %d examples", name, self.split, len(self._source))

  def __len__(self) -> int:
    return len(self._source)

  def fingerprint(self) -> str:
    """Content key: dataset name, split, prepared version and example count."""
    version = str(getattr(getattr(self._source, "dataset_info", None), "version", ""))
    return _digest(["tfds", self.name, self.split, version, len(self._source)])

  def __getitem__(self, i):
    rec = self._source[int(i)]
    fname = rec.get("file_name", b"")
    if isinstance(fname, (bytes, np.bytes_)):
      fname = fname.decode("utf-8", "replace")
    name = f"{self.name}[{self.split}][{int(i)}]" + (f" ({fname})" if fname else "")
    return {"image": rec["image"], "label": np.int32(rec["label"]), "name": name}
