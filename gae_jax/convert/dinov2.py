"""DINOv2 PyTorch checkpoints -> `gae_jax.models.dinov2.DinoV2` params, and back.

Reads the three key layouts in circulation:
  hub      facebookresearch/dinov2 (`cls_token`, `pos_embed`, `blocks.N.attn.qkv.weight`,
           `blocks.N.ls1.gamma`, `blocks.N.mlp.fc1` / `mlp.w12`+`mlp.w3` for g, `norm`);
           chunked training checkpoints (`blocks.C.N.`) are accepted too.
  hf       Hugging Face files (`embeddings.cls_token`, `encoder.layer.N.attention.attention.
           query.weight`, `attention.output.dense`, `layer_scale1.lambda1`,
           `mlp.weights_in`/`weights_out` for g, `layernorm`), optional `dinov2.` prefix.
  hf_v5    the same models' in-memory state dict in transformers >= 5 (`attention.q_proj`,
           `attention.o_proj`, `mlp.gate_proj`/`up_proj`/`down_proj`).
Width, depth, heads (width / 64), registers, patch size, position grid and MLP type are
read from the shapes. Any missing, unexpected or mis-shaped key raises a ValueError naming it.
"""

from collections.abc import Mapping
import functools
import math
import re
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gae_jax.convert import torch_io
from gae_jax.convert.torch_io import Rule, conv, linear
from gae_jax.models import dinov2 as dinov2_lib

LAYOUTS = ("hub", "hf", "hf_v5")


def _find_prefix(sd: Mapping[str, Any], prefix: Optional[str]) -> tuple[str, str]:
  """Returns (layout_family, base prefix) from where `cls_token` lives."""
  if prefix is not None:
    if f"{prefix}embeddings.cls_token" in sd:
      return "hf", prefix
    if f"{prefix}cls_token" in sd:
      return "hub", prefix
    raise ValueError(f"no DINOv2 cls_token under prefix {prefix!r} "
                     f"(neither {prefix}cls_token nor {prefix}embeddings.cls_token)")
  hits = [k for k in sd if k == "cls_token" or k.endswith(".cls_token")]
  if not hits:
    raise ValueError("not a DINOv2 checkpoint: no 'cls_token' / 'embeddings.cls_token' key "
                     f"among {torch_io._short(list(sd))}")  # pylint: disable=protected-access
  if len(hits) > 1:
    raise ValueError(f"several DINOv2 models in one checkpoint ({hits}); pass prefix=")
  base = hits[0][:-len("cls_token")]
  if base.endswith("embeddings."):
    return "hf", base[:-len("embeddings.")]
  return "hub", base


def _unchunk(sd: Mapping[str, Any], p: str) -> dict[str, Any]:
  """Renames chunked hub keys `blocks.C.N.x` -> `blocks.N.x` (N is the global index)."""
  pat = re.compile(rf"^{re.escape(p)}blocks\.(\d+)\.(\d+)\.")
  if not any(pat.match(k) for k in sd):
    return dict(sd)
  return {pat.sub(lambda m: f"{p}blocks.{m.group(2)}.", k): v for k, v in sd.items()}


def _depth(sd: Mapping[str, Any], block_prefix: str) -> int:
  pat = re.compile(rf"^{re.escape(block_prefix)}(\d+)\.")
  idx = {int(m.group(1)) for k in sd if (m := pat.match(k))}
  if not idx:
    raise ValueError(f"no transformer blocks found (no keys '{block_prefix}N.*')")
  return max(idx) + 1


def _variant_name(width: int, depth: int, num_heads: int, ffn: str) -> Optional[str]:
  for name, v in dinov2_lib.VARIANTS.items():
    if v == dict(width=width, depth=depth, num_heads=num_heads, ffn=ffn):
      return name
  return None


def detect_layout(state_dict: Mapping[str, Any], prefix: Optional[str] = None
                  ) -> tuple[str, str]:
  """(layout, prefix): layout in LAYOUTS, prefix e.g. "" or "dinov2."."""
  family, p = _find_prefix(state_dict, prefix)
  if family == "hub":
    return "hub", p
  v5 = any(k.startswith(f"{p}encoder.layer.") and ".attention.q_proj." in k for k in state_dict)
  return ("hf_v5" if v5 else "hf"), p


def _rules(layout: str, p: str, depth: int, ffn: str, num_registers: int, width: int,
           num_heads: int, final_norm_affine: bool = True) -> tuple[list[Rule], list[str]]:
  """Conversion rules and the known-unused keys (mask token) for one layout."""
  hd = width // num_heads
  qkv_kernel = lambda w: linear(w).reshape(width, 3, num_heads, hd)
  qkv_bias = lambda b: b.reshape(3, num_heads, hd)
  cat_qkv_kernel = lambda q, k, v: qkv_kernel(np.concatenate([q, k, v], 0))
  cat_qkv_bias = lambda q, k, v: qkv_bias(np.concatenate([q, k, v], 0))
  proj_kernel = lambda w: linear(w).reshape(num_heads, hd, width)
  cat_linear = lambda a, b: linear(np.concatenate([a, b], 0))
  cat_bias = lambda a, b: np.concatenate([a, b], 0)

  rules: list[Rule] = []
  add = lambda target, *sources, fn=lambda x: x: rules.append(Rule(target, sources, fn))
  if layout == "hub":
    add("cls_token", f"{p}cls_token")
    add("pos_embed", f"{p}pos_embed")
    if num_registers:
      add("register_tokens", f"{p}register_tokens")
    add("patch_embed/kernel", f"{p}patch_embed.proj.weight", fn=conv)
    add("patch_embed/bias", f"{p}patch_embed.proj.bias")
    for i in range(depth):
      s, t = f"{p}blocks.{i}.", f"block_{i}/"
      for n in ("norm1", "norm2"):
        add(f"{t}{n}/scale", f"{s}{n}.weight")
        add(f"{t}{n}/bias", f"{s}{n}.bias")
      add(f"{t}attn/qkv/kernel", f"{s}attn.qkv.weight", fn=qkv_kernel)
      add(f"{t}attn/qkv/bias", f"{s}attn.qkv.bias", fn=qkv_bias)
      add(f"{t}attn/proj/kernel", f"{s}attn.proj.weight", fn=proj_kernel)
      add(f"{t}attn/proj/bias", f"{s}attn.proj.bias")
      add(f"{t}ls1", f"{s}ls1.gamma")
      add(f"{t}ls2", f"{s}ls2.gamma")
      names = ("fc1", "fc2") if ffn == "mlp" else ("w12", "w3")
      for n in names:
        add(f"{t}mlp/{n}/kernel", f"{s}mlp.{n}.weight", fn=linear)
        add(f"{t}mlp/{n}/bias", f"{s}mlp.{n}.bias")
    if final_norm_affine:
      add("norm/scale", f"{p}norm.weight")
      add("norm/bias", f"{p}norm.bias")
    return rules, [f"{p}mask_token"]

  e = f"{p}embeddings."
  add("cls_token", f"{e}cls_token")
  add("pos_embed", f"{e}position_embeddings")
  if num_registers:
    add("register_tokens", f"{e}register_tokens")
  add("patch_embed/kernel", f"{e}patch_embeddings.projection.weight", fn=conv)
  add("patch_embed/bias", f"{e}patch_embeddings.projection.bias")
  for i in range(depth):
    s, t = f"{p}encoder.layer.{i}.", f"block_{i}/"
    for n in ("norm1", "norm2"):
      add(f"{t}{n}/scale", f"{s}{n}.weight")
      add(f"{t}{n}/bias", f"{s}{n}.bias")
    if layout == "hf":
      q, k, v, o = (f"{s}attention.attention.query", f"{s}attention.attention.key",
                    f"{s}attention.attention.value", f"{s}attention.output.dense")
    else:
      q, k, v, o = (f"{s}attention.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    add(f"{t}attn/qkv/kernel", f"{q}.weight", f"{k}.weight", f"{v}.weight", fn=cat_qkv_kernel)
    add(f"{t}attn/qkv/bias", f"{q}.bias", f"{k}.bias", f"{v}.bias", fn=cat_qkv_bias)
    add(f"{t}attn/proj/kernel", f"{o}.weight", fn=proj_kernel)
    add(f"{t}attn/proj/bias", f"{o}.bias")
    add(f"{t}ls1", f"{s}layer_scale1.lambda1")
    add(f"{t}ls2", f"{s}layer_scale2.lambda1")
    if ffn == "mlp":
      for n in ("fc1", "fc2"):
        add(f"{t}mlp/{n}/kernel", f"{s}mlp.{n}.weight", fn=linear)
        add(f"{t}mlp/{n}/bias", f"{s}mlp.{n}.bias")
    elif layout == "hf":
      add(f"{t}mlp/w12/kernel", f"{s}mlp.weights_in.weight", fn=linear)
      add(f"{t}mlp/w12/bias", f"{s}mlp.weights_in.bias")
      add(f"{t}mlp/w3/kernel", f"{s}mlp.weights_out.weight", fn=linear)
      add(f"{t}mlp/w3/bias", f"{s}mlp.weights_out.bias")
    else:  # gate = first half of the fused w12, up = second half
      add(f"{t}mlp/w12/kernel", f"{s}mlp.gate_proj.weight", f"{s}mlp.up_proj.weight",
          fn=cat_linear)
      add(f"{t}mlp/w12/bias", f"{s}mlp.gate_proj.bias", f"{s}mlp.up_proj.bias", fn=cat_bias)
      add(f"{t}mlp/w3/kernel", f"{s}mlp.down_proj.weight", fn=linear)
      add(f"{t}mlp/w3/bias", f"{s}mlp.down_proj.bias")
  if final_norm_affine:
    add("norm/scale", f"{p}layernorm.weight")
    add("norm/bias", f"{p}layernorm.bias")
  return rules, [f"{e}mask_token"]


def _shape(sd: Mapping[str, Any], key: str) -> tuple[int, ...]:
  if key not in sd:
    raise ValueError(f"checkpoint: missing key {key!r}")
  return tuple(getattr(sd[key], "shape", None) or np.shape(sd[key]))


def infer_config(state_dict: Mapping[str, Any], prefix: Optional[str] = None,
                 num_heads: Optional[int] = None) -> tuple[dict, str, str]:
  """(DinoV2 kwargs, layout, prefix) read from the checkpoint's shapes."""
  layout, p = detect_layout(state_dict, prefix)
  sd = state_dict
  if layout == "hub":
    cls_key, pos_key, reg_key = f"{p}cls_token", f"{p}pos_embed", f"{p}register_tokens"
    patch_key, blocks = f"{p}patch_embed.proj.weight", f"{p}blocks."
  else:
    e = f"{p}embeddings."
    cls_key, pos_key, reg_key = f"{e}cls_token", f"{e}position_embeddings", f"{e}register_tokens"
    patch_key, blocks = f"{e}patch_embeddings.projection.weight", f"{p}encoder.layer."
  width = _shape(sd, cls_key)[-1]
  depth = _depth(sd, blocks)
  num_registers = _shape(sd, reg_key)[1] if reg_key in sd else 0
  n_pos = _shape(sd, pos_key)[1] - 1
  pos_grid = math.isqrt(n_pos)
  if pos_grid * pos_grid != n_pos:
    raise ValueError(f"{pos_key}: {n_pos} patch positions do not form a square grid")
  patch_shape = _shape(sd, patch_key)
  if len(patch_shape) != 4 or patch_shape[2] != patch_shape[3]:
    raise ValueError(f"{patch_key}: expected a square (C, 3, p, p) conv, got {patch_shape}")
  b0 = f"{blocks}0.mlp."
  if layout == "hub":
    swiglu_key, mlp_key = f"{b0}w12.weight", f"{b0}fc1.weight"
  elif layout == "hf":
    swiglu_key, mlp_key = f"{b0}weights_in.weight", f"{b0}fc1.weight"
  else:
    swiglu_key, mlp_key = f"{b0}gate_proj.weight", f"{b0}fc1.weight"
  if swiglu_key in sd:
    ffn = "swiglu"
    hidden = _shape(sd, swiglu_key)[0] // (1 if layout == "hf_v5" else 2)
  else:
    ffn, hidden = "mlp", _shape(sd, mlp_key)[0]
  if num_heads is None:
    if width % 64:
      raise ValueError(f"width {width} is not a multiple of 64; pass num_heads=")
    num_heads = width // 64
  variant = _variant_name(width, depth, num_heads, ffn)
  cfg = dict(width=width, depth=depth, num_heads=num_heads, ffn=ffn)
  info = dict(
      variant=variant, **({} if variant else cfg), mlp_hidden=hidden,
      num_registers=num_registers, patch_size=patch_shape[-1], pos_grid=pos_grid,
      # The torch-hub models without registers resize positions with the 0.1 offset;
      # Hugging Face never does; both antialias iff the model has registers.
      interpolate_offset=0.1 if (layout == "hub" and not num_registers) else 0.0,
      interpolate_antialias=bool(num_registers))
  norm_keys = (f"{p}norm.weight", f"{p}norm.bias") if layout == "hub" else (
      f"{p}layernorm.weight", f"{p}layernorm.bias")
  if not any(k in sd for k in norm_keys):
    # PAE's frozen VFM: the final LayerNorm's weight and bias were set to None (so they are
    # absent from its state dict); a file with one of the two fails as a missing key.
    info["final_norm_affine"] = False
  return info, layout, p


def param_shapes(info: Mapping[str, Any]) -> dict:
  """The DinoV2(**info) parameter tree as ShapeDtypeStructs (no compute, no memory)."""
  return _param_shapes(tuple(sorted(info.items())))


@functools.lru_cache(maxsize=16)
def _param_shapes(items: tuple) -> dict:
  info = dict(items)
  model = dinov2_lib.DinoV2(**info)
  side = info.get("patch_size", 14)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32))
  return nn.unbox(shapes)["params"]


def convert_dinov2(state_dict: Mapping[str, Any], *, prefix: Optional[str] = None,
                   num_heads: Optional[int] = None, strict: bool = True
                   ) -> tuple[dict, dict]:
  """(params, info): Flax params for `DinoV2(**info)`, from any supported key layout.

  info holds the DinoV2 keyword arguments read from the shapes (variant or explicit sizes,
  mlp_hidden, num_registers, patch_size, pos_grid, interpolate_offset/antialias matching
  the checkpoint's own framework). strict=False ignores extra keys (e.g. a classifier head).
  """
  family, p = _find_prefix(state_dict, prefix)
  sd = _unchunk(state_dict, p) if family == "hub" else dict(state_dict)
  info, layout, p = infer_config(sd, p, num_heads)
  cfg = dinov2_lib.resolve_config(info["variant"], width=info.get("width"),
                                  depth=info.get("depth"), num_heads=info.get("num_heads"),
                                  ffn=info.get("ffn"))
  rules, ignore = _rules(layout, p, cfg["depth"], cfg["ffn"], info["num_registers"],
                         cfg["width"], cfg["num_heads"], info.get("final_norm_affine", True))
  params = torch_io.apply_rules(sd, rules, param_shapes(info), ignore=ignore, strict=strict,
                                source=f"DINOv2 checkpoint ({layout} layout)")
  return params, info


def load_dinov2_params(path, *, subkey=None, prefix: Optional[str] = None,
                       num_heads: Optional[int] = None, strict: bool = True
                       ) -> tuple[dict, dict]:
  """Reads a .pth/.pt/.bin/.safetensors DINOv2 file -> (params, DinoV2 kwargs).

  Usage: `params, info = load_dinov2_params(path); DinoV2(**info).apply({"params": params},
  x)`. `subkey` unwraps nested checkpoints (see `torch_io.load_torch_state_dict`).
  """
  sd = torch_io.load_torch_state_dict(path, subkey=subkey)
  try:
    return convert_dinov2(sd, prefix=prefix, num_heads=num_heads, strict=strict)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from e


def to_torch_hub(params: Mapping[str, Any], info: Mapping[str, Any], *,
                 contiguous: bool = True) -> dict[str, np.ndarray]:
  """Exports DinoV2 params to the torch-hub key layout (inverse of `convert_dinov2`).

  Arrays are float32 numpy; contiguous=False returns transposed views (no copies).
  """
  cfg = dinov2_lib.resolve_config(info.get("variant"), width=info.get("width"),
                                  depth=info.get("depth"), num_heads=info.get("num_heads"),
                                  ffn=info.get("ffn"))
  width = cfg["width"]
  np_ = lambda a: np.asarray(a, np.float32)
  c = np.ascontiguousarray if contiguous else (lambda a: a)
  lin = lambda k: c(np_(k).reshape(-1, np_(k).shape[-1]).T)
  sd = {"cls_token": np_(params["cls_token"]), "pos_embed": np_(params["pos_embed"]),
        "mask_token": np.zeros((1, width), np.float32)}
  if "register_tokens" in params:
    sd["register_tokens"] = np_(params["register_tokens"])
  sd["patch_embed.proj.weight"] = c(
      np_(params["patch_embed"]["kernel"]).transpose(3, 2, 0, 1))
  sd["patch_embed.proj.bias"] = np_(params["patch_embed"]["bias"])
  for i in range(cfg["depth"]):
    b, s = params[f"block_{i}"], f"blocks.{i}."
    for n in ("norm1", "norm2"):
      sd[f"{s}{n}.weight"] = np_(b[n]["scale"])
      sd[f"{s}{n}.bias"] = np_(b[n]["bias"])
    sd[f"{s}attn.qkv.weight"] = c(
        np_(b["attn"]["qkv"]["kernel"]).reshape(width, -1).T)
    sd[f"{s}attn.qkv.bias"] = np_(b["attn"]["qkv"]["bias"]).reshape(-1)
    sd[f"{s}attn.proj.weight"] = lin(b["attn"]["proj"]["kernel"])
    sd[f"{s}attn.proj.bias"] = np_(b["attn"]["proj"]["bias"])
    sd[f"{s}ls1.gamma"] = np_(b["ls1"])
    sd[f"{s}ls2.gamma"] = np_(b["ls2"])
    for n, layer in b["mlp"].items():
      sd[f"{s}mlp.{n}.weight"] = lin(layer["kernel"])
      sd[f"{s}mlp.{n}.bias"] = np_(layer["bias"])
  if "norm" in params:  # absent for final_norm_affine=False
    sd["norm.weight"] = np_(params["norm"]["scale"])
    sd["norm.bias"] = np_(params["norm"]["bias"])
  return sd
