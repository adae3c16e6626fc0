"""The GAE tokenizer handle (and the KL-VAE ablation, a GAE with `kl=True`).

Reads a gae_jax autoencoder workdir (its checkpoints/ or a converted directory) or the
authors' Lightning `.ckpt` (github.com/sii-research/GAE; sizes inferred from tensor
shapes by `convert/gae.py`) and wraps `models/gae.py` in the one tokenizer interface
(`tokenizers/base.py`): encode gives mu (no sigma-noise), decode gives unclipped images.
Family "kl" when the bottleneck is the diagonal-Gaussian KL one (paper Tab. 7), "gae"
otherwise; both share this code.
"""

import os
from typing import Any, Optional

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gae_jax import loading
from gae_jax import paths
from gae_jax.models import dinov2 as dinov2_lib
from gae_jax.models import gae as gae_lib
from gae_jax.models import vit
from gae_jax.tokenizers import base

_MODEL_DEFAULTS = dict(sigma_std=0.2, kl=False, qk_norm="rms", attention_impl=None,
                       remat="none", scan=False)


def resize_bicubic_torch(images: jax.Array, size: int) -> jax.Array:
  """NHWC resize equal to torch F.interpolate(mode='bicubic', align_corners=False).

  The authors' `FoundationEncoderModel.encode` resizes inputs of another size this way
  (Keys a = -0.75, no antialias); jax.image.resize differs (a = -0.5, antialiasing).
  """
  return dinov2_lib.torch_resize(images, (size, size), method="bicubic", antialias=False)


def model_config(fields: dict) -> ml_collections.ConfigDict:
  """Completes model fields: explicit width/depth/heads (from `variant` when absent)."""
  f = {**_MODEL_DEFAULTS, **{k: v for k, v in fields.items() if v is not None}}
  if "width" not in f:
    if "variant" not in f:
      raise ValueError(f"model config has neither width/depth/num_heads nor variant: {fields}")
    enc = vit.decode_variant(f["variant"])
    dec = vit.decode_variant(f.get("decoder_variant") or f["variant"])
    f.update(enc)
    f.update(decoder_width=dec["width"], decoder_depth=dec["depth"],
             decoder_num_heads=dec["num_heads"])
  for k in ("width", "depth", "num_heads"):
    f.setdefault("decoder_" + k, f[k])
  if "variant" not in f:
    f["variant"] = _variant_name(f["width"], f["depth"], f["num_heads"])
    f["decoder_variant"] = _variant_name(f["decoder_width"], f["decoder_depth"],
                                         f["decoder_num_heads"])
  for k in ("width", "depth", "num_heads", "decoder_width", "decoder_depth",
            "decoder_num_heads", "patch_size", "latent_dim", "image_size"):
    if k not in f:
      raise ValueError(f"model config lacks {k!r}: {fields}")
  return ml_collections.ConfigDict(f)


def _variant_name(width: int, depth: int, heads: int) -> Optional[str]:
  for name, sizes in vit.VARIANTS.items():
    if sizes == (width, depth, heads):
      return name
  return None


def build_gae(config: ml_collections.ConfigDict, dtype=jnp.float32) -> gae_lib.GAE:
  """The GAE module from explicit sizes (any width/depth, not only the variant table)."""
  c = config
  attention_impl = c.get("attention_impl")
  if attention_impl == "cudnn" and jax.default_backend() != "gpu":
    logging.info("build_gae: attention_impl 'cudnn' needs a GPU; using the XLA attention")
    attention_impl = None
  return gae_lib.GAE(width=c.width, depth=c.depth, num_heads=c.num_heads,
                     decoder_width=c.decoder_width, decoder_depth=c.decoder_depth,
                     decoder_num_heads=c.decoder_num_heads, patch_size=c.patch_size,
                     latent_dim=c.latent_dim, sigma_std=c.sigma_std, kl=c.kl,
                     qk_norm=c.qk_norm, attention_impl=attention_impl, remat="none",
                     scan=c.scan, dtype=dtype)


def _check_params(model: gae_lib.GAE, params: Any, image_size: int, source: str) -> None:
  """Raises ValueError naming the first missing / extra / mis-shaped parameter."""
  from gae_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  want = nn.meta.unbox(jax.eval_shape(
      lambda x: model.init({"params": jax.random.key(0)}, x), x)["params"])
  diff = ckpt_lib.tree_mismatch(params, want)
  if diff:
    raise ValueError(f"GAE params from {source} do not fit the model: {diff}")


def gae_functions(model: gae_lib.GAE, image_size: int):
  """Pure (encode_fn, decode_fn) of a GAE module: images [-1, 1] -> mu, z -> images.

  encode_fn resizes inputs whose size differs from `image_size` with torch-style bicubic
  interpolation first, as the authors' `FoundationEncoderModel.encode` does.
  """
  size = int(image_size)

  def encode_fn(params, images):
    if images.shape[1:3] != (size, size):
      images = resize_bicubic_torch(images, size)
    _, aux = model.apply({"params": params}, images.astype(jnp.float32), train=False,
                         method=gae_lib.GAE.encode)
    return aux["mu"]

  def decode_fn(params, z):
    return model.apply({"params": params}, z, method=gae_lib.GAE.decode)

  return encode_fn, decode_fn


class GAEHandle(base.Tokenizer):
  """A frozen GAE (or KL-VAE ablation): `.encode` -> mu, `.decode`, `.reconstruct`.

  `.model` is the `models.gae.GAE` module; `.config` the completed model fields (width,
  depth, num_heads, decoder_*, patch_size, latent_dim, image_size, kl, ...).
  Inputs of another size than `config.image_size` are resized with torch-style bicubic.
  """

  def __init__(self, params: Any, config: ml_collections.ConfigDict, *,
               dtype=jnp.float32, source: str = "<params>"):
    model = build_gae(config, dtype)
    params = nn.meta.unbox(params)
    _check_params(model, params, config.image_size, source)
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    encode_fn, decode_fn = gae_functions(model, config.image_size)
    g = config.image_size // config.patch_size
    super().__init__(family="kl" if config.get("kl") else "gae", params=params,
                     config=config, encode_fn=encode_fn, decode_fn=decode_fn,
                     image_size=config.image_size, latent_shape=(g, g, config.latent_dim),
                     source=source)
    self.model = model


def _gae_fields(cfg: dict, config_path: str) -> dict:
  if "model" not in cfg:
    raise ValueError(f"{config_path} has no 'model' section")
  fields = dict(cfg["model"])
  if "image_size" not in fields:
    size = (cfg.get("data") or {}).get("image_size")
    if size is None:
      raise ValueError(f"{config_path} gives no image size (model.image_size or "
                       f"data.image_size)")
    fields["image_size"] = size
  return fields


def _gae_params_from_state(state: Any, use_ema: bool, source: str) -> Any:
  """The GAE params inside a restored train state (EMA copy preferred when present)."""
  if not isinstance(state, dict) or "params" not in state:
    raise ValueError(f"checkpoint {source} holds no 'params'")
  ema = state.get("ema_params")
  if use_ema and isinstance(ema, dict) and "gae" in ema:
    logging.info("load_gae: using the EMA params of %s", source)
    return ema["gae"]
  params = state["params"]
  if isinstance(params, dict) and "generator" in params:
    params = params["generator"]
  if isinstance(params, dict) and "gae" in params:
    params = params["gae"]
  if not (isinstance(params, dict) and "encoder" in params and "decoder" in params):
    raise ValueError(f"checkpoint {source} holds no GAE params "
                     f"(expected params/generator/gae/{{encoder,projector,decoder}})")
  return params


def load_gae_params(path: str, *, step: Optional[int] = None, use_ema: bool = True,
                    num_heads: Optional[int] = None, decoder_num_heads: Optional[int] = None,
                    weights_only: bool = True) -> tuple[dict, ml_collections.ConfigDict]:
  """(GAE params as numpy, model ConfigDict) from a workdir, its checkpoints/ or a `.ckpt`.

  For `config.init_from` and `load_gae`. The ConfigDict always has explicit sizes (width,
  depth, num_heads, decoder_*, patch_size, latent_dim, image_size, ...). `num_heads`
  overrides the heads inferred for the authors' checkpoints (width / 64); ignored for
  gae_jax directories. `weights_only=False` lets torch unpickle a full Lightning
  checkpoint (only for a file you trust).
  """
  paths.configure_cloud_storage()
  path = os.fspath(path)
  if not paths.path(path).exists():
    raise FileNotFoundError(f"GAE checkpoint {path} does not exist")
  if loading.is_torch_file(path):
    from gae_jax.convert import gae as convert_gae_lib  # pylint: disable=g-import-not-at-top
    from gae_jax.convert import torch_io  # pylint: disable=g-import-not-at-top
    sd = torch_io.load_torch_state_dict(paths.local_copy(path), subkey="state_dict",
                                        weights_only=weights_only)
    try:
      params, kw = convert_gae_lib.convert_gae(sd, num_heads=num_heads,
                                               decoder_num_heads=decoder_num_heads)
    except ValueError as e:
      raise ValueError(f"{path}: {e}") from e
    return params, model_config(kw)
  if paths.path(path).is_file():
    raise ValueError(f"{path} is a file but not a PyTorch checkpoint "
                     f"({', '.join(loading.TORCH_SUFFIXES)}); pass a gae_jax workdir or a "
                     f".ckpt")
  cfg, state = loading.read_dir(path, "gae", step)
  params = _gae_params_from_state(state, use_ema, path)
  return jax.tree.map(np.asarray, params), model_config(_gae_fields(cfg, path))


def load(path: str, *, step: Optional[int] = None, use_ema: bool = True,
         dtype=jnp.float32, num_heads: Optional[int] = None,
         decoder_num_heads: Optional[int] = None, weights_only: bool = True) -> GAEHandle:
  """A frozen GAE from a gae_jax workdir / checkpoint dir / converted dir or the authors' .ckpt.

  dtype: compute dtype (params stay float32). See `load_gae_params` for the arguments.
  """
  params, config = load_gae_params(path, step=step, use_ema=use_ema, num_heads=num_heads,
                                   decoder_num_heads=decoder_num_heads,
                                   weights_only=weights_only)
  config.source = os.fspath(paths.path(path))
  return GAEHandle(params, config, dtype=dtype, source=os.fspath(path))
