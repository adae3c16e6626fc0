"""Reference statistics for FID: ADM's reference batches and our own stats files.

ADM's `VIRTUAL_imagenet256_labeled.npz` (guided-diffusion evaluations) holds
  mu, sigma      pool_3 (2048-d) mean and covariance (float64)
  mu_s, sigma_s  spatial (mixed_6/conv[..., :7]) statistics, for sFID
  arr_0          the 10k reference *images*, uint8 [N, 256, 256, 3] - ADM runs Inception on
                 them for precision / recall; they are not features.
Our files (`save_stats`) use the same `mu` / `sigma` (/ `mu_s` / `sigma_s`) keys, so ADM's
`read_statistics` reads them, and keep the [N, D] pool features under `feats`. A 2-D float
`arr_0` is also read as features. `arr_0` images are not loaded with the statistics (about
2 GB); stream them with `iter_reference_images`.
"""

from collections.abc import Iterator
import contextlib
import dataclasses
import os
import tempfile
import zipfile

import numpy as np


@dataclasses.dataclass(frozen=True)
class ReferenceStats:
  """FID statistics of a reference set (float64) and what else its file holds."""
  mu: np.ndarray
  sigma: np.ndarray
  feats: np.ndarray | None = None  # [N, D] pool features (for precision / recall)
  mu_s: np.ndarray | None = None  # spatial stats (sFID), ADM files only
  sigma_s: np.ndarray | None = None
  images_shape: tuple[int, ...] | None = None  # ADM `arr_0` images, not loaded
  path: str | None = None


@contextlib.contextmanager
def _open_member(path: str, key: str):
  """The raw .npy stream of `key` inside the npz at `path` (no full read)."""
  with zipfile.ZipFile(path) as zf:
    name = f"{key}.npy"
    if name not in zf.namelist():
      raise KeyError(f"{path}: no key {key!r} (keys: {sorted(n[:-4] for n in zf.namelist())})")
    with zf.open(name) as f:
      yield f


def _npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
  """(shape, fortran_order, dtype) of the .npy stream `f`, leaving it at the data."""
  version = np.lib.format.read_magic(f)
  if version == (1, 0):
    return np.lib.format.read_array_header_1_0(f)
  if version == (2, 0):
    return np.lib.format.read_array_header_2_0(f)
  raise ValueError(f"unsupported .npy format version {version}")


def load_reference_stats(path: str | os.PathLike, *, load_feats: bool = True) -> ReferenceStats:
  """Loads `mu`, `sigma` (required) and the optional extras from ADM's npz or ours."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"reference statistics file not found: {path}")
  try:
    obj = np.load(path, allow_pickle=False)
  except Exception as e:  # zip / format errors
    raise ValueError(f"{path}: not a readable .npz file ({e})") from e
  with obj:
    keys = set(obj.files)
    for key in ("mu", "sigma"):
      if key not in keys:
        raise ValueError(f"{path}: missing key {key!r} (keys: {sorted(keys)})")
    mu = np.asarray(obj["mu"], np.float64)
    sigma = np.asarray(obj["sigma"], np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0],) * 2:
      raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not match "
                       "([D] and [D, D])")
    extras = {}
    if "mu_s" in keys and "sigma_s" in keys:
      extras["mu_s"] = np.asarray(obj["mu_s"], np.float64)
      extras["sigma_s"] = np.asarray(obj["sigma_s"], np.float64)
    feats_key = "feats" if "feats" in keys else None
    if "arr_0" in keys:
      with _open_member(path, "arr_0") as f:
        shape, _, dtype = _npy_header(f)
      if len(shape) == 4:
        extras["images_shape"] = tuple(int(s) for s in shape)
      elif len(shape) == 2 and np.issubdtype(dtype, np.floating) and feats_key is None:
        feats_key = "arr_0"
      elif feats_key is None:
        raise ValueError(f"{path}: arr_0 has shape {shape} ({dtype}); expected uint8 images "
                         "[N, H, W, 3] or float features [N, D]")
    if feats_key is not None and load_feats:
      feats = np.asarray(obj[feats_key], np.float32)
      if feats.ndim != 2 or feats.shape[1] != mu.shape[0]:
        raise ValueError(f"{path}: {feats_key} has shape {feats.shape}, expected [N, "
                         f"{mu.shape[0]}] to match mu {mu.shape}")
      extras["feats"] = feats
  return ReferenceStats(mu=mu, sigma=sigma, path=path, **extras)


def iter_reference_images(path: str | os.PathLike, batch_size: int = 500) -> Iterator[np.ndarray]:
  """Streams `arr_0` uint8 images [B, H, W, 3] of an ADM reference batch (bounded memory)."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"reference batch not found: {path}")
  try:
    with _open_member(path, "arr_0") as f:
      shape, fortran, dtype = _npy_header(f)
      if len(shape) != 4 or fortran:
        raise ValueError(f"{path}: arr_0 has shape {shape}, expected images [N, H, W, C]")
      per_item = int(np.prod(shape[1:])) * dtype.itemsize
      for start in range(0, shape[0], batch_size):
        n = min(batch_size, shape[0] - start)
        buf = f.read(n * per_item)
        if len(buf) != n * per_item:
          raise ValueError(f"{path}: arr_0 truncated at image {start}")
        yield np.frombuffer(buf, dtype).reshape((n, *shape[1:]))
  except KeyError as e:
    raise ValueError(str(e.args[0])) from None


def save_stats(path: str | os.PathLike, mu, sigma, feats=None, *, mu_s=None,
               sigma_s=None) -> str:
  """Writes `mu`, `sigma` (float64) [, `feats` float32, `mu_s`, `sigma_s`] atomically."""
  path = os.fspath(path)
  mu = np.asarray(mu, np.float64)
  sigma = np.asarray(sigma, np.float64)
  if mu.ndim != 1 or sigma.shape != (mu.shape[0],) * 2:
    raise ValueError(f"mu {mu.shape} and sigma {sigma.shape} do not match ([D] and [D, D])")
  arrays = {"mu": mu, "sigma": sigma}
  if feats is not None:
    feats = np.asarray(feats, np.float32)
    if feats.ndim != 2 or feats.shape[1] != mu.shape[0]:
      raise ValueError(f"feats has shape {feats.shape}, expected [N, {mu.shape[0]}]")
    arrays["feats"] = feats
  if (mu_s is None) != (sigma_s is None):
    raise ValueError("pass both mu_s and sigma_s (or neither)")
  if mu_s is not None:
    arrays["mu_s"] = np.asarray(mu_s, np.float64)
    arrays["sigma_s"] = np.asarray(sigma_s, np.float64)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **arrays)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise
  return path
