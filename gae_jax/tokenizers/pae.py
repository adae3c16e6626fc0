"""The PAE tokenizer handle (PAE_SPEC.md §2; issue 12 deliverable 2).

Reads the authors' released `.pt` (`torch.load(p)["model"]`, sizes inferred from shapes by
`convert/pae.py`; the frozen DINOv2-with-registers inside it or from `vfm_weights`), a
directory written by `python -m gae_jax.convert pae`, or a gae_jax PAE training workdir
(stage "pae"; its VFM from the run's `vfm` section), and wraps `models/pae.py` plus the
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


def _workdir_vfm(cfg: dict, vfm_weights: Optional[str], source: str) -> tuple[dict, dict]:
  """(DinoV2 params without the final-norm affine, DinoV2 kwargs) of a PAE training run.

  The run's `vfm.weights` file (or `vfm_weights`), else its seeded random-weight stand-in
  (`:runlocal`, tests): DinoV2 initialised with `jax.random.key(vfm.seed)` on a
  (1, S, S, 3) input, as the trainer builds it (trainers/pae_common.load_vfm_variables).
  The final LayerNorm is affine-free either way (the trainer's is scale 1, bias 0).
  """
  from gae_jax.models import pae_refine as refine_lib  # pylint: disable=g-import-not-at-top
  v = ml_collections.ConfigDict(cfg.get("vfm") or {})
  if not v:
    raise ValueError(f"{source}/config.json has no 'vfm' section")
  weights = vfm_weights or v.get("weights")
  if weights:
    from gae_jax.convert import dinov2 as convert_dinov2  # pylint: disable=g-import-not-at-top
    params, info = convert_dinov2.load_dinov2_params(paths.local_copy(weights), subkey="auto")
  else:
    info = refine_lib.vfm_info(v)
    size = int(v.image_size)
    module = dinov2_lib.DinoV2(**info)
    x = jnp.zeros((1, size, size, 3), jnp.float32)
    params = nn.meta.unbox(jax.jit(module.init)(jax.random.key(int(v.get("seed", 0))), x))
    params = params["params"]
  params = jax.tree.map(lambda a: np.asarray(a, np.float32),
                        {k: a for k, a in params.items() if k != "norm"})
  return params, {**info, "final_norm_affine": False}


def load_pae_params(path: str, *, vfm_weights: Optional[str] = None,
                    step: Optional[int] = None, use_ema: bool = True,
                    num_heads: Optional[int] = None, decoder_num_heads: Optional[int] = None,
                    weights_only: bool = True) -> tuple[dict, ml_collections.ConfigDict]:
  """({"pae", "vfm"} numpy params, config) from the released `.pt`/`.pth`, a converted
  directory (`python -m gae_jax.convert pae`) or a gae_jax PAE training workdir.

  vfm_weights: the Hugging Face DINOv2-with-registers weights (file or directory) when
  the released file holds no `encoder.encoder.*` keys; for a workdir it replaces the run's
  `vfm.weights`. step / use_ema: the checkpoint step (latest when None) and EMA choice of
  a workdir. num_heads / decoder_num_heads override the heads inferred from widths for a
  released file (see convert/pae.py). weights_only=False lets torch unpickle a file
  holding more than tensors (only a file you trust).
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
                     f"({', '.join(loading.TORCH_SUFFIXES)}); pass the released .pt, a "
                     "`python -m gae_jax.convert pae` directory or a PAE workdir")
  cfg, state = loading.read_dir(path, "pae", step)
  if not isinstance(state, dict) or "params" not in state:
    raise ValueError(f"checkpoint {path} holds no 'params'")
  if cfg.get("kind") == "pae":   # a converted directory
    tree = state["params"]
    if isinstance(tree, dict) and "generator" in tree:   # the autoencoder-run nesting
      tree = tree["generator"].get("pae")
    if not (isinstance(tree, dict) and "model" in tree and "vfm" in tree):
      raise ValueError(f"{path}: no converted PAE params (expected params/{{model, vfm}}, "
                       "as `python -m gae_jax.convert pae` writes)")
    fields = dict(cfg.get("model") or {})
    vfm_info = fields.pop("vfm", None)
    if vfm_info is None:
      raise ValueError(f"{path}/config.json: model.vfm (the DINOv2 fields) is missing")
    params = {"pae": tree["model"], "vfm": tree["vfm"]}
    return jax.tree.map(np.asarray, params), _config(fields, vfm_info, path)
  # A training run (stage "pae"): generator params (EMA when kept), the run's VFM.
  ema = state.get("ema_params")
  gen = ema if (use_ema and isinstance(ema, dict) and ema) else state["params"].get(
      "generator")
  if not (isinstance(gen, dict) and "compressor" in gen and "decoder" in gen):
    raise ValueError(f"checkpoint {path} holds no PAE params (expected params/generator/"
                     "{compressor, decompressor, decoder, ...})")
  vfm_params, vfm_info = _workdir_vfm(cfg, vfm_weights, path)
  fields = pae_lib.model_fields(cfg.get("model") or {})
  patch = int(vfm_info.get("patch_size", 14))
  size = int((cfg.get("vfm") or {}).get("image_size", 224))
  fields.update(image_size=(size // patch) * fields["decoder_patch_size"],
                vfm_image_size=size)
  params = {"pae": jax.tree.map(np.asarray, nn.meta.unbox(gen)), "vfm": vfm_params}
  return params, _config(fields, vfm_info, path)


def load(path: str, *, vfm_weights: Optional[str] = None, step: Optional[int] = None,
         use_ema: bool = True, dtype=jnp.float32, num_heads: Optional[int] = None,
         decoder_num_heads: Optional[int] = None, weights_only: bool = True) -> PAEHandle:
  """A frozen PAE handle from the released `.pt`, a converted directory or a PAE workdir.

  dtype: compute dtype (params stay float32). See `load_pae_params` for the arguments.
  """
  params, config = load_pae_params(path, vfm_weights=vfm_weights, step=step,
                                   use_ema=use_ema, num_heads=num_heads,
                                   decoder_num_heads=decoder_num_heads,
                                   weights_only=weights_only)
  return PAEHandle(params, config, dtype=dtype, source=os.fspath(path))


def save(dst: str, params: dict, config: ml_collections.ConfigDict, *, source: str = ""
         ) -> str:
  """Writes a converted PAE (`loading.save_converted`, kind "pae"): config.json model =
  the PAE fields + `vfm`; checkpoint params = {"model": PAE params, "vfm": DinoV2 params}."""
  fields = {k: v for k, v in config.to_dict().items() if k != "source"}
  return loading.save_converted(dst, {"model": params["pae"], "vfm": params["vfm"]},
                                fields, kind="pae", source=source)
