"""Host-side image transforms (numpy + PIL) run inside the grain pipeline.

All functions take/return HWC uint8 RGB arrays (or PIL images where noted) until `to_float`,
which maps to float32 in [-1, 1]. Randomness always comes from an explicit
`np.random.Generator` (grain's `random_map` hands one per example, derived from the
pipeline seed and the example index), so every crop is reproducible.

These run per example on the host, in grain worker processes/threads; dm-pix's flips and
crops are JAX ops and would force a device round trip per image, so numpy/PIL is used here.
"""

import io
import math

import numpy as np
from PIL import Image

CROPS = ("adm_center", "random", "random_scale")


def to_rgb(img: Image.Image) -> Image.Image:
  """Any PIL mode -> 8-bit RGB.

  * 16-/32-bit greyscale ("I;16", "I;16B", "I;16L", "I", "F"): scaled by the true range of
    the type, not clipped (PIL's own convert clips at 255: a 16-bit PNG would turn white):
    I;16* -> v / 257 (65535 -> 255); "I" -> v / 257 when its values fit 16 bits (16-bit
    files often open as "I"), else by its maximum; "F" -> v * 255 when in [0, 1], else
    as "I". Rounded, clipped to [0, 255], replicated to 3 channels.
  * palette ("P", "PA"): through RGBA when it carries transparency (no PIL warning), then
    as RGBA.
  * RGBA / LA / other alpha: the alpha channel is dropped (the colour values are kept), as
    torchvision's ImageFolder and guided-diffusion's `center_crop_arr` (`convert("RGB")`).
  * CMYK, YCbCr, LAB, HSV, L, 1: PIL's convert("RGB").
  """
  mode = img.mode
  if mode.startswith("I;16") or mode in ("I", "F"):
    arr = np.asarray(img, dtype=np.float64)
    if mode == "F" and arr.size and np.nanmin(arr) >= 0 and np.nanmax(arr) <= 1.0:
      arr = arr * 255.0
    elif mode.startswith("I;16") or (arr.size and np.nanmax(arr) <= 65535):
      arr = arr / 257.0
    elif arr.size:
      arr = arr * (255.0 / np.nanmax(arr))
    grey = np.clip(np.round(np.nan_to_num(arr)), 0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(grey[..., None], 3, axis=-1))
  if mode in ("P", "PA"):
    img = img.convert("RGBA" if (mode == "PA" or "transparency" in img.info) else "RGB")
  if img.mode != "RGB":
    img = img.convert("RGB")
  return img


def decode_image(data, name: str = "<bytes>") -> Image.Image:
  """Bytes (any format PIL reads), a uint8 HW/HWC array or a PIL image -> RGB PIL image
  (to_rgb: greyscale, 16-bit, palette, RGBA, CMYK converted; multi-frame files: frame 0).

  Raises ValueError naming `name` when the bytes cannot be decoded (corrupt/truncated file).
  """
  if isinstance(data, Image.Image):
    img = data
  elif isinstance(data, np.ndarray):
    if data.dtype != np.uint8 or data.ndim not in (2, 3):
      raise ValueError(f"image {name}: expected a uint8 HW or HWC array, got "
                       f"{data.dtype} {data.shape}")
    img = Image.fromarray(data)
  else:
    try:
      img = Image.open(io.BytesIO(bytes(data)))
      img.load()  # decode now so a truncated file fails here, not later
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ...
      raise ValueError(f"cannot decode image {name}: {type(e).__name__}: {e}") from e
  return to_rgb(img)  # grayscale, CMYK, RGBA, palette (ImageNet has a few of each), 16-bit


def _as_pil(img) -> Image.Image:
  return img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img))


def _adm_resize_short_side(img: Image.Image, short: int) -> Image.Image:
  """ADM resize: BOX-halve while the short side >= 2*short, then BICUBIC to short side."""
  while min(*img.size) >= 2 * short:
    img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
  scale = short / min(*img.size)
  return img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)


def adm_center_crop(img, image_size: int) -> np.ndarray:
  """guided-diffusion `center_crop_arr`: ADM resize of the short side, then center crop."""
  arr = np.asarray(_adm_resize_short_side(_as_pil(img), image_size))
  y = (arr.shape[0] - image_size) // 2
  x = (arr.shape[1] - image_size) // 2
  return arr[y:y + image_size, x:x + image_size]


def adm_random_crop(img, image_size: int, rng: np.random.Generator, *,
                    min_crop_frac: float = 0.8, max_crop_frac: float = 1.0) -> np.ndarray:
  """guided-diffusion `random_crop_arr`: ADM resize of the short side to a random length in
  [size / max_crop_frac, size / min_crop_frac], then a uniformly placed size x size crop."""
  lo = math.ceil(image_size / max_crop_frac)
  hi = math.ceil(image_size / min_crop_frac)
  short = int(rng.integers(lo, hi + 1))
  arr = np.asarray(_adm_resize_short_side(_as_pil(img), short))
  y = int(rng.integers(0, arr.shape[0] - image_size + 1))
  x = int(rng.integers(0, arr.shape[1] - image_size + 1))
  return arr[y:y + image_size, x:x + image_size]


def random_scale_box(height: int, width: int, image_size: int,
                     rng: np.random.Generator) -> tuple[int, int, int]:
  """(top, left, side) of a random square with side log-uniform in [size, min(H, W)].

  Log-uniform so every zoom octave is equally likely (from full-view to pixel-level).
  """
  max_side = min(height, width)
  if max_side < image_size:
    raise ValueError(f"image of shape {(height, width)} is smaller than image_size={image_size}")
  side = int(round(math.exp(rng.uniform(math.log(image_size), math.log(max_side)))))
  side = min(max(side, image_size), max_side)
  top = int(rng.integers(0, height - side + 1))
  left = int(rng.integers(0, width - side + 1))
  return top, left, side


def crop_resize(arr: np.ndarray, box: tuple[int, int, int], image_size: int) -> np.ndarray:
  """Crops the square `box` = (top, left, side) and resizes it to image_size (PIL BICUBIC,
  which is antialiased when downsampling)."""
  top, left, side = box
  patch = np.ascontiguousarray(arr[top:top + side, left:left + side])
  if side == image_size:
    return patch
  return np.asarray(Image.fromarray(patch).resize((image_size, image_size),
                                                  resample=Image.BICUBIC))


def random_scale_crop(img, image_size: int, rng: np.random.Generator) -> np.ndarray:
  """A random square (side log-uniform in [size, short side]) resized to size x size."""
  arr = np.asarray(img)
  box = random_scale_box(arr.shape[0], arr.shape[1], image_size, rng)
  return crop_resize(arr, box, image_size)


def random_flip(arr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Horizontal flip with probability 1/2."""
  return arr[:, ::-1] if rng.random() < 0.5 else arr


def to_float(arr: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1]."""
  return np.asarray(arr, np.float32) / np.float32(127.5) - np.float32(1.0)


def crop(img, image_size: int, mode: str, rng: np.random.Generator | None = None) -> np.ndarray:
  """Dispatches on the config's `crop` name (see CROPS)."""
  if mode == "adm_center":
    return adm_center_crop(img, image_size)
  if rng is None:
    raise ValueError(f"crop={mode!r} needs an rng")
  if mode == "random":
    return adm_random_crop(img, image_size, rng)
  if mode == "random_scale":
    return random_scale_crop(img, image_size, rng)
  raise ValueError(f"unknown crop {mode!r}; expected one of {CROPS}")
