"""The authors' semantic teacher (`latest.pth`, `model_state_dict`) -> gae_jax params.

Their `DinoReconstructor4D` (tokenizer/utils/sp_teacher/sp_teacher.py) state dict:
  base_model.model.*                         the frozen DINOv2 in torch-hub layout
                                             (`convert.dinov2`), so the file loads alone
  pos_embed_pro (1, N, C)                    -> downsampler/pos_embed
  projector_block.attn.qkv.weight (3C, C)    -> downsampler/projector_block/attn/qkv/kernel
  projector_block.attn.proj.weight (C, C)    -> downsampler/projector_block/attn/proj/kernel
  to_latent.weight (w^2 d, w^2 C)            -> downsampler/to_latent/kernel (transposed)
  recon_head.weight (C, d)                   -> decoder/recon_head/kernel (transposed)
  pos_embed_dec (1, N, C)                    -> decoder/pos_embed
  decoder_layers.{i}.attn.{qkv,proj}.weight  -> decoder/decoder_layers_{i}/attn/...
  decoder_layers.{i}.mlp.{fc1,gate,fc2}.weight -> decoder/decoder_layers_{i}/mlp/...
Width C, grid sqrt(N), latent d, window w, decoder depth and MLP width come from the
shapes; heads = C // 64 as released unless given. Every RMSNorm is parameter-free.
"""

from collections.abc import Mapping
import math
import re
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gae_jax.convert import dinov2 as convert_dinov2
from gae_jax.convert import torch_io
from gae_jax.convert.torch_io import Rule, linear
from gae_jax.models import teacher as teacher_lib

ANCHOR = "pos_embed_pro"
VFM_PREFIX = "base_model.model."
_DEC_RE = re.compile(r"decoder_layers\.(\d+)\.")


def _shape(sd: Mapping[str, Any], key: str) -> tuple[int, ...]:
  if key not in sd:
    raise ValueError(f"teacher checkpoint: missing key {key!r}")
  return tuple(getattr(sd[key], "shape", None) or np.shape(sd[key]))


def _find_prefix(sd: Mapping[str, Any]) -> str:
  """'' normally; 'module.' etc. when the whole state dict is wrapped."""
  if ANCHOR in sd:
    return ""
  hits = [k for k in sd if k.endswith("." + ANCHOR)]
  if len(hits) != 1:
    raise ValueError(f"not a semantic-teacher checkpoint: no {ANCHOR!r} key among "
                     f"{torch_io._short(list(sd))}")  # pylint: disable=protected-access
  return hits[0][:-len(ANCHOR)]


def infer_teacher_config(sd: Mapping[str, Any], num_heads: Optional[int] = None,
                         decoder_num_heads: Optional[int] = None) -> tuple[dict, str]:
  """(SemanticTeacher kwargs + 'grid', prefix) from the shapes of a released state dict."""
  p = _find_prefix(sd)
  _, n, c = _shape(sd, f"{p}pos_embed_pro")
  grid = math.isqrt(n)
  if grid * grid != n:
    raise ValueError(f"{p}pos_embed_pro: {n} positions do not form a square grid")
  c_out, d = _shape(sd, f"{p}recon_head.weight")
  if c_out != c:
    raise ValueError(f"{p}recon_head.weight {(c_out, d)} does not map to width {c}")
  out_f, in_f = _shape(sd, f"{p}to_latent.weight")
  ww = in_f // c
  win = math.isqrt(ww)
  if in_f % c or win * win != ww or out_f != ww * d:
    raise ValueError(f"{p}to_latent.weight {(out_f, in_f)} is not (w^2*{d}, w^2*{c}) for a "
                     f"square window")
  depth = len({int(m.group(1)) for k in sd if k.startswith(p)
               for m in [_DEC_RE.match(k[len(p):])] if m})
  if depth == 0:
    raise ValueError(f"teacher checkpoint: no '{p}decoder_layers.N.*' keys")
  hidden = _shape(sd, f"{p}decoder_layers.0.mlp.fc1.weight")[0]
  if c % 64 and (num_heads is None or decoder_num_heads is None):
    raise ValueError(f"teacher width {c} is not a multiple of 64; pass num_heads=")
  cfg = dict(channels=c, latent_dim=d, downsampler="attn_patchconv", window=win,
             num_heads=num_heads or c // 64, decoder_depth=depth,
             decoder_num_heads=decoder_num_heads or c // 64, decoder_mlp_hidden=hidden,
             grid=grid)
  return cfg, p


def build_teacher(cfg: Mapping[str, Any], dtype=jnp.float32) -> teacher_lib.SemanticTeacher:
  """SemanticTeacher from inferred / stored fields (extra keys such as 'grid' ignored)."""
  fields = ("channels", "latent_dim", "downsampler", "window", "num_heads", "decoder_depth",
            "decoder_num_heads", "decoder_mlp_hidden", "qk_norm")
  kw = {k: cfg[k] for k in fields if cfg.get(k) is not None}
  return teacher_lib.SemanticTeacher(**kw, dtype=dtype)


def teacher_shapes(cfg: Mapping[str, Any]) -> dict:
  """The teacher's "params" tree as ShapeDtypeStructs (nothing allocated)."""
  model = build_teacher(cfg)
  g = cfg["grid"]
  x = jax.ShapeDtypeStruct((1, g, g, cfg["channels"]), jnp.float32)
  return nn.unbox(jax.eval_shape(model.init, jax.random.key(0), x)).get("params", {})


def _rules(p: str, cfg: Mapping[str, Any]) -> list[Rule]:
  c = cfg["channels"]
  rules: list[Rule] = []
  add = lambda target, src, fn=lambda x: x: rules.append(Rule(target, (src,), fn))

  def attn(src: str, dst: str, heads: int):
    hd = c // heads
    add(f"{dst}/qkv/kernel", f"{src}.qkv.weight",
        lambda w: linear(w).reshape(c, 3, heads, hd))
    add(f"{dst}/proj/kernel", f"{src}.proj.weight",
        lambda w: linear(w).reshape(heads, hd, c))

  add("downsampler/pos_embed", f"{p}pos_embed_pro")
  attn(f"{p}projector_block.attn", "downsampler/projector_block/attn", cfg["num_heads"])
  add("downsampler/to_latent/kernel", f"{p}to_latent.weight", linear)
  add("decoder/recon_head/kernel", f"{p}recon_head.weight", linear)
  add("decoder/pos_embed", f"{p}pos_embed_dec")
  for i in range(cfg["decoder_depth"]):
    s, t = f"{p}decoder_layers.{i}.", f"decoder/decoder_layers_{i}/"
    attn(f"{s}attn", f"{t}attn", cfg["decoder_num_heads"])
    for n in ("fc1", "gate", "fc2"):
      add(f"{t}mlp/{n}/kernel", f"{s}mlp.{n}.weight", linear)
  return rules


def convert_teacher(state_dict: Mapping[str, Any], *, num_heads: Optional[int] = None,
                    decoder_num_heads: Optional[int] = None, with_vfm: bool = True
                    ) -> tuple[dict, dict, Optional[dict], Optional[dict]]:
  """(teacher params, teacher cfg, DINOv2 params, DINOv2 info) from a released state dict.

  teacher params = {"downsampler", "decoder"} for `build_teacher(cfg)`; the DINOv2 pair is
  read from `base_model.model.*` (None, None when with_vfm=False). Any missing, unused or
  mis-shaped key raises a ValueError naming it.
  """
  cfg, p = infer_teacher_config(state_dict, num_heads, decoder_num_heads)
  vfm_prefix = p + VFM_PREFIX
  vfm_keys = {k for k in state_dict if k.startswith(vfm_prefix)}
  own = {k: v for k, v in state_dict.items() if k not in vfm_keys}
  params = torch_io.apply_rules(own, _rules(p, cfg), teacher_shapes(cfg),
                                source="teacher checkpoint")
  dino_params = dino_info = None
  if with_vfm:
    if not vfm_keys:
      raise ValueError(f"teacher checkpoint holds no frozen DINOv2 (no '{vfm_prefix}*' keys)")
    sub = {k[len(vfm_prefix):]: state_dict[k] for k in vfm_keys}
    dino_params, dino_info = convert_dinov2.convert_dinov2(sub, prefix="")
    dino_grid = 224 // dino_info.get("patch_size", 14)
    if dino_grid != cfg["grid"]:
      raise ValueError(f"teacher grid {cfg['grid']}x{cfg['grid']} does not match DINOv2's "
                       f"{dino_grid}x{dino_grid} tokens at 224 px")
    if (dino_params["cls_token"].shape[-1]) != cfg["channels"]:
      raise ValueError(f"teacher width {cfg['channels']} != DINOv2 width "
                       f"{dino_params['cls_token'].shape[-1]}")
  return params, cfg, dino_params, dino_info


class _Shape:
  """A leaf with only `.shape` (reading a checkpoint's layout without its data)."""

  def __init__(self, shape):
    self.shape = tuple(shape)


def dinov2_info(path: str) -> dict:
  """DinoV2 kwargs from a DINOv2 weights file's shapes (memory-mapped / header only)."""
  import os  # pylint: disable=g-import-not-at-top
  path = os.path.expanduser(os.fspath(path))
  if not os.path.isfile(path):
    raise FileNotFoundError(f"DINOv2 weights {path} do not exist")
  if path.endswith(".safetensors"):
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    with safe_open(path, "np") as f:
      sd = {k: _Shape(f.get_slice(k).get_shape()) for k in f.keys()}
  else:
    import torch  # pylint: disable=g-import-not-at-top
    try:
      obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # pickle errors come in many types
      raise ValueError(f"cannot read torch checkpoint {path}: {type(e).__name__}: {e}") from e
    sd = torch_io._unwrap(obj, "auto", path)  # pylint: disable=protected-access
  try:
    return convert_dinov2.infer_config(sd)[0]
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from e


def _torch_tensors(path: str, weights_only: bool = True) -> Mapping[str, Any]:
  """The `model_state_dict` of a released teacher file (torch tensors, memory-mapped)."""
  import torch  # pylint: disable=g-import-not-at-top
  try:
    obj = torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
  except Exception as e:  # pickle errors come in many types
    raise ValueError(f"cannot read torch checkpoint {path}: {type(e).__name__}: "
                     f"{str(e).splitlines()[0] if str(e) else ''}") from e
  if isinstance(obj, Mapping) and "model_state_dict" in obj:
    obj = obj["model_state_dict"]
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path}: expected a dict with 'model_state_dict', got {type(obj).__name__}")
  return obj


def read_teacher_config(path: str, weights_only: bool = True) -> dict:
  """Teacher cfg (+ 'vfm_info') from shapes only (memory-mapped read, no conversion)."""
  sd = _torch_tensors(path, weights_only)
  try:
    cfg, p = infer_teacher_config(sd)
    cfg["vfm_info"] = convert_dinov2.infer_config(
        {k[len(p + VFM_PREFIX):]: v for k, v in sd.items() if k.startswith(p + VFM_PREFIX)},
        prefix="")[0]
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from e
  return cfg


def load_teacher_params(path: str, *, num_heads: Optional[int] = None,
                        decoder_num_heads: Optional[int] = None, weights_only: bool = True,
                        with_vfm: bool = True):
  """Reads the authors' `latest.pth` -> `convert_teacher`'s four results (numpy)."""
  sd = _torch_tensors(path, weights_only)
  flat = {k: torch_io._to_numpy(v, k, path)  # pylint: disable=protected-access
          for k, v in sd.items() if with_vfm or VFM_PREFIX not in k}
  try:
    return convert_teacher(flat, num_heads=num_heads, decoder_num_heads=decoder_num_heads,
                           with_vfm=with_vfm)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from e


def to_torch_state_dict(params: Mapping[str, Any], cfg: Mapping[str, Any],
                        dino_params: Optional[Mapping[str, Any]] = None,
                        dino_info: Optional[Mapping[str, Any]] = None) -> dict[str, np.ndarray]:
  """Inverse of `convert_teacher` (numpy, the released key names): for tests and export."""
  f = lambda a: np.ascontiguousarray(np.asarray(a, np.float32))
  c = cfg["channels"]
  t = lambda k: f(np.asarray(k).reshape(-1, np.asarray(k).shape[-1]).T)
  d, dec = params["downsampler"], params["decoder"]
  sd = {"pos_embed_pro": f(d["pos_embed"]),
        "projector_block.attn.qkv.weight":
            f(np.asarray(d["projector_block"]["attn"]["qkv"]["kernel"]).reshape(c, -1).T),
        "projector_block.attn.proj.weight": t(d["projector_block"]["attn"]["proj"]["kernel"]),
        "to_latent.weight": t(d["to_latent"]["kernel"]),
        "recon_head.weight": t(dec["recon_head"]["kernel"]),
        "pos_embed_dec": f(dec["pos_embed"])}
  for i in range(cfg["decoder_depth"]):
    b, s = dec[f"decoder_layers_{i}"], f"decoder_layers.{i}."
    sd[f"{s}attn.qkv.weight"] = f(np.asarray(b["attn"]["qkv"]["kernel"]).reshape(c, -1).T)
    sd[f"{s}attn.proj.weight"] = t(b["attn"]["proj"]["kernel"])
    for n in ("fc1", "gate", "fc2"):
      sd[f"{s}mlp.{n}.weight"] = t(b["mlp"][n]["kernel"])
  if dino_params is not None:
    for k, v in convert_dinov2.to_torch_hub(dino_params, dino_info).items():
      sd[VFM_PREFIX + k] = v
  return sd
