"""Metric writing (TensorBoard without TensorFlow + JSONL), progress/ETA and PNG grids."""

import io
import json
import math
import os
import tempfile
import time
from typing import Any, Mapping, Optional

from absl import logging
import jax
import numpy as np
from PIL import Image

from gae_jax import paths


class MetricWriter:
  """Writes scalars to `<workdir>/metrics.jsonl` and TensorBoard (tensorboardX); process 0 only.

  A remote workdir (gs://...; object stores have no append) is mirrored: metrics.jsonl
  (its earlier lines fetched first, so a resumed run appends) and this run's tensorboardX
  event file are written to a local temporary directory and uploaded whole every
  `sync_every_s` seconds of writing, on flush() and on close().
  """

  def __init__(self, workdir: paths.PathLike, sync_every_s: float = 60.0):
    self.active = jax.process_index() == 0
    self.workdir = paths.path(workdir)
    self.path = self.workdir / "metrics.jsonl"
    self._tb = None
    self._mirror = None
    self._sync_every_s, self._synced_at = sync_every_s, time.monotonic()
    if self.active:
      paths.makedirs(self.workdir)
      local_dir = os.fspath(self.workdir)
      if paths.is_remote(self.workdir):
        self._mirror = tempfile.TemporaryDirectory(prefix="gae_jax_metrics_")
        local_dir = self._mirror.name
        if self.path.exists():
          with open(os.path.join(local_dir, "metrics.jsonl"), "wb") as f:
            f.write(self.path.read_bytes())
      self._local_path = os.path.join(local_dir, "metrics.jsonl")
      self._local_tb = os.path.join(local_dir, "tb")
      try:
        from tensorboardX import SummaryWriter  # no TensorFlow needed
        self._tb = SummaryWriter(self._local_tb)
      except ImportError:  # pragma: no cover - tensorboardX is a core dependency
        logging.warning("tensorboardX missing: writing metrics.jsonl only")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    if not self.active:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    with open(self._local_path, "a") as f:
      f.write(json.dumps({"step": int(step), **scalars}) + "\n")
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, v, step)
    if self._mirror is not None and time.monotonic() - self._synced_at > self._sync_every_s:
      self.flush()

  def _sync(self):
    """Uploads the local mirror of a remote workdir (metrics.jsonl, tb/ event files)."""
    if self._mirror is None:
      return
    if os.path.exists(self._local_path):
      paths.put_file(self._local_path, self.path)
    if os.path.isdir(self._local_tb):
      for name in sorted(os.listdir(self._local_tb)):
        paths.put_file(os.path.join(self._local_tb, name), self.workdir / "tb" / name)
    self._synced_at = time.monotonic()

  def write_images(self, step: int, images: Mapping[str, np.ndarray]):
    if not self.active or self._tb is None:
      return
    for k, v in images.items():
      self._tb.add_image(k, np.asarray(v), step, dataformats="HWC")

  def flush(self):
    if self._tb is not None:
      self._tb.flush()
    self._sync()

  def close(self):
    if self._tb is not None:
      self._tb.close()
    self._sync()
    if self._mirror is not None:
      self._mirror.cleanup()
      self._mirror = None


class Progress:
  """steps/s, images/s and ETA between log steps (like clu's ReportProgress, no TF)."""

  def __init__(self, total_steps: int, global_batch: int, start_step: int = 0):
    self.total_steps, self.global_batch = total_steps, global_batch
    self._t, self._step = time.perf_counter(), start_step

  def __call__(self, step: int) -> dict:
    now = time.perf_counter()
    dt, ds = now - self._t, step - self._step
    self._t, self._step = now, step
    if ds <= 0 or dt <= 0:
      return {}
    sps = ds / dt
    return {"steps_per_sec": sps, "images_per_sec": sps * self.global_batch,
            "eta_min": (self.total_steps - step) / sps / 60.0}


def format_eta(minutes: float) -> str:
  if not math.isfinite(minutes):
    return "?"
  h, m = divmod(int(minutes), 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{int((minutes - int(minutes)) * 60):02d}s"


def check_finite(step: int, metrics: Mapping[str, float]):
  bad = [k for k, v in metrics.items() if not math.isfinite(float(v))]
  if bad:
    raise FloatingPointError(f"non-finite metrics at step {step}: {bad}")


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] float -> uint8 (rounding, clipping)."""
  return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray, ncols: Optional[int] = None, pad: int = 2) -> np.ndarray:
  """(N, H, W, C) uint8 -> one (rows*(H+pad), cols*(W+pad), C) grid."""
  n, h, w, c = images.shape
  ncols = ncols or int(math.ceil(math.sqrt(n)))
  nrows = int(math.ceil(n / ncols))
  grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
  for i in range(n):
    r, col = divmod(i, ncols)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h,
         pad + col * (w + pad):pad + col * (w + pad) + w] = images[i]
  return grid


def save_png(path: paths.PathLike, image: np.ndarray):
  """Writes `image` (H, W[, C]) uint8 as a PNG at `path` (local or gs://...), atomically."""
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  paths.write_bytes(path, buf.getvalue())
