"""Metric writing (TensorBoard without TensorFlow + JSONL), progress/ETA and PNG grids."""

import json
import math
import os
import time
from typing import Any, Mapping, Optional

from absl import logging
import jax
import numpy as np
from PIL import Image


class MetricWriter:
  """Writes scalars to `<workdir>/metrics.jsonl` and TensorBoard (tensorboardX); process 0 only."""

  def __init__(self, workdir: str):
    self.active = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self.active:
      os.makedirs(workdir, exist_ok=True)
      try:
        from tensorboardX import SummaryWriter  # no TensorFlow needed
        self._tb = SummaryWriter(os.path.join(workdir, "tb"))
      except ImportError:  # pragma: no cover - tensorboardX is a core dependency
        logging.warning("tensorboardX missing: writing metrics.jsonl only")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    if not self.active:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": int(step), **scalars}) + "\n")
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, v, step)

  def write_images(self, step: int, images: Mapping[str, np.ndarray]):
    if not self.active or self._tb is None:
      return
    for k, v in images.items():
      self._tb.add_image(k, np.asarray(v), step, dataformats="HWC")

  def flush(self):
    if self._tb is not None:
      self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()


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


def save_png(path: str, image: np.ndarray):
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  Image.fromarray(image).save(tmp, format="PNG")
  os.replace(tmp, path)
