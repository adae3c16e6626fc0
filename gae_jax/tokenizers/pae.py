"""The PAE tokenizer handle (PAE_SPEC.md §2; issue 12 deliverable 2).

Reads the authors' released `.pt` (`torch.load(p)["model"]`, sizes inferred from shapes by
`convert/pae.py`; the frozen DINOv2-with-registers inside it or from `vfm_weights`) or a
directory written by `python -m gae_jax.convert pae`, and wraps `models/pae.py` plus the
frozen `models/dinov2.py` VFM in the one tokenizer interface (`tokenizers/base.py`):

  encode_fn(params, images)   images (B, H, W, 3) in [-1, 1] -> [0, 1] -> torch bicubic
                              (a = -0.75, no antialias, float32 source coordinates) to the
                              VFM size (224) -> ImageNet mean/std -> VFM tokens (CLS and 4
                              registers dropped) -> PAE.encode -> z (B, g, g, d)
  decode_fn(params, z)        PAE.decode -> x = out * std + mean (the release's [0, 1]
                              image, unclipped) -> 2x - 1, images in [-1, 1] (unclipped)

params = {"pae": PAE params, "vfm": DinoV2 params}; the VFM stays frozen.
"""

import os
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gae_jax import loading
from gae_jax import paths
from gae_jax.models import dinov2 as dinov2_lib
from gae_jax.models import pae as pae_lib
from gae_jax.tokenizers import base


def pae_functions(model: pae_lib.PAE, vfm: dinov2_lib.DinoV2, vfm_image_size: int):
  """Pure (encode_fn, decode_fn) on params {"pae", "vfm"}; images in [-1, 1] (see module)."""
  size = int(vfm_image_size)

  def encode_fn(params, images):
    x = pae_lib.vfm_inputs((images.astype(jnp.float32) + 1.0) * 0.5, size)
    h = pae_lib.vfm_tokens(vfm, params["vfm"], x)
    z, _ = model.apply({"params": params["pae"]}, x, h, train=False, method="encode")
    return z

  def decode_fn(params, z):
    out = model.apply({"params": params["pae"]}, z, method="decode")
    return pae_lib.denormalize(out) * 2.0 - 1.0

  return encode_fn, decode_fn


def _check_params(model, vfm, params, fields, source):
  from gae_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  s, g = fields["vfm_image_size"], fields["image_size"] // fields["decoder_patch_size"]
  x = jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32)
  h = jax.ShapeDtypeStruct((1, g * g, model.width), jnp.float32)
  want = nn.meta.unbox(jax.eval_shape(
      lambda x, h: model.init({"params": jax.random.key(0)}, x, h, train=False), x, h))
  diff = ckpt_lib.tree_mismatch(params["pae"], want["params"])
  if diff:
    raise ValueError(f"PAE params from {source} do not fit the model: {diff}")
  want_vfm = nn.meta.unbox(jax.eval_shape(lambda x: vfm.init(jax.random.key(0), x), x))
  diff = ckpt_lib.tree_mismatch(params["vfm"], want_vfm["params"])
  if diff:
    raise ValueError(f"PAE's VFM params from {source} do not fit DINOv2: {diff}")


class PAEHandle(base.Tokenizer):
  """A frozen PAE: `.encode` -> z on the sphere, `.decode`, `.reconstruct` ([-1, 1] images).

  `.model` is the `models.pae.PAE` module, `.vfm` the frozen DinoV2; `.config` holds the
  PAE fields, `image_size` (decoded side, 256 released), `vfm_image_size` (224), `vfm`
  (the DinoV2 keyword arguments) and `source`.
  """

  def __init__(self, params: dict, config: ml_collections.ConfigDict, *,
               dtype=jnp.float32, source: str = "<params>"):
    fields = config.to_dict()
    pae_fields = {k: fields[k] for k in pae_lib.PAE_FIELDS if k in fields}
    model = pae_lib.PAE(**pae_fields, dtype=dtype)
    vfm = dinov2_lib.DinoV2(**fields["vfm"], dtype=dtype)
    params = {"pae": nn.meta.unbox(params["pae"]), "vfm": nn.meta.unbox(params["vfm"])}
    _check_params(model, vfm, params, fields, source)
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    encode_fn, decode_fn = pae_functions(model, vfm, fields["vfm_image_size"])
    g = fields["image_size"] // fields["decoder_patch_size"]
    super().__init__(family="pae", params=params, config=config, encode_fn=encode_fn,
                     decode_fn=decode_fn, image_size=fields["image_size"],
                     latent_shape=(g, g, fields["latent_dim"]), source=source)
    self.model = model
    self.vfm = vfm


def _config(fields: dict, vfm_info: dict, source: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({**fields, "vfm": dict(vfm_info), "source": source})


def load_pae_params(path: str, *, vfm_weights: Optional[str] = None,
                    num_heads: Optional[int] = None, decoder_num_heads: Optional[int] = None,
                    weights_only: bool = True) -> tuple[dict, ml_collections.ConfigDict]:
  """({"pae", "vfm"} numpy params, config) from a released `.pt`/`.pth` or a converted dir.

  vfm_weights: the Hugging Face DINOv2-with-registers weights (file or directory) when
  the released file holds no `encoder.encoder.*` keys. num_heads / decoder_num_heads
  override the heads inferred from widths (see convert/pae.py).
  """
  paths.configure_cloud_storage()
  path = os.fspath(path)
  if not paths.path(path).exists():
    raise FileNotFoundError(f"PAE checkpoint {path} does not exist")
  if loading.is_torch_file(path):
    from gae_jax.convert import pae as convert_pae  # pylint: disable=g-import-not-at-top
    params, fields, vfm_params, vfm_info = convert_pae.load_pae_params(
        paths.local_copy(path), vfm_weights=vfm_weights, num_heads=num_heads,
        decoder_num_heads=decoder_num_heads, weights_only=weights_only)
    return {"pae": params, "vfm": vfm_params}, _config(fields, vfm_info, path)
  if paths.path(path).is_file():
    raise ValueError(f"{path} is a file but not a PyTorch checkpoint "
                     f"({', '.join(loading.TORCH_SUFFIXES)}); pass the released .pt or a "
                     "directory from `python -m gae_jax.convert pae`")
  cfg, state = loading.read_dir(path, "pae")
  tree = state.get("params", {}) if isinstance(state, dict) else {}
  tree = tree.get("generator", {}).get("pae") if isinstance(tree, dict) else None
  if not (isinstance(tree, dict) and "model" in tree and "vfm" in tree):
    raise ValueError(f"{path}: no converted PAE params (expected params/generator/pae/"
                     "{model, vfm}, as `python -m gae_jax.convert pae` writes)")
  fields = dict(cfg.get("model") or {})
  vfm_info = fields.pop("vfm", None)
  if vfm_info is None:
    raise ValueError(f"{path}/config.json: model.vfm (the DINOv2 fields) is missing")
  params = {"pae": tree["model"], "vfm": tree["vfm"]}
  return jax.tree.map(np.asarray, params), _config(fields, vfm_info, path)


def load(path: str, *, vfm_weights: Optional[str] = None, dtype=jnp.float32,
         num_heads: Optional[int] = None, decoder_num_heads: Optional[int] = None,
         weights_only: bool = True) -> PAEHandle:
  """A frozen PAE handle from the released `.pt` or a converted directory.

  dtype: compute dtype (params stay float32). See `load_pae_params` for the arguments.
  """
  params, config = load_pae_params(path, vfm_weights=vfm_weights, num_heads=num_heads,
                                   decoder_num_heads=decoder_num_heads,
                                   weights_only=weights_only)
  return PAEHandle(params, config, dtype=dtype, source=os.fspath(path))


def save(dst: str, params: dict, config: ml_collections.ConfigDict, *, source: str = ""
         ) -> str:
  """Writes a converted PAE (`loading.save_converted`, kind "pae"): config.json model =
  the PAE fields + `vfm`; checkpoint params/generator/pae = {"model", "vfm"}."""
  fields = {k: v for k, v in config.to_dict().items() if k != "source"}
  return loading.save_converted(dst, {"model": params["pae"], "vfm": params["vfm"]},
                                fields, kind="pae", source=source)
