"""The authors' PAE checkpoint -> `gae_jax.models.pae.PAE` params + its frozen DINOv2.

Released layout (github ZhengrongYue/PAE, commit 51f8fa6, `tokenizer/pae.py`; shared/
PAE_SPEC.md §2.7): `torch.load(p)["model"]`, a state dict, keys optionally prefixed by
`module.` (DDP) and/or `_orig_mod.` (torch.compile):
  encoder.encoder.*        Hugging Face Dinov2WithRegistersModel (the frozen VFM), final
                           `layernorm` without weight/bias (absent from the file)
  delta_encoder.*          the DAM: patch_embed.proj, pos_embed (fixed), layers.N.{norm1,
                           self_attn.{qkv,proj}, norm2_q, norm2_kv, cross_attn.{q,k,v}_proj,
                           cross_attn.proj, norm3, mlp.fc1, mlp.fc2}, fusion_proj, final_ln
  latent_compressor.0.*    timm Attention: qkv (no bias), proj
  latent_compressor.1.*    Conv2d 3x3 D -> d              (.2 is the parameter-free RMSNorm)
  latent_decompressor.0.*  Conv2d 3x3 d -> D
  latent_decompressor.1.*  timm Attention
  decoder.*                RAE GeneralDecoder: decoder_embed, decoder_pos_embed (fixed),
                           trainable_cls_token, decoder_layers.N.{layernorm_before,
                           attention.attention.{query,key,value}, attention.output.dense,
                           layernorm_after, intermediate.dense, output.dense}, decoder_norm,
                           decoder_pred
Every size is read from tensor shapes: VFM (via `convert.dinov2`), width D, DAM depth, MLP
width, cross-attention and fusion mode, latent d, decoder width/depth/MLP/patch, token grid.
Heads are width / 64 (the released DINOv2s and decoders B/L) except a 1152-wide decoder
(RAE's ViT-XL: 16 heads); pass num_heads= / decoder_num_heads= otherwise. The two fixed
sin-cos tables are checked against `models.pae.sincos_2d`. A file without the VFM takes it
from `vfm_weights` (a Hugging Face DINOv2-with-registers file or directory; its final
LayerNorm affine is dropped as the release does). Missing, unexpected or mis-shaped keys
raise one ValueError naming the key and the file.
"""

from collections.abc import Mapping
import functools
import math
import os
import re
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from gae_jax.convert import dinov2 as dinov2_convert
from gae_jax.convert import torch_io
from gae_jax.convert.torch_io import Rule, conv, linear
from gae_jax.models import pae as pae_lib

VFM_PREFIX = "encoder.encoder."
PARTS = ("delta_encoder.", "latent_compressor.", "latent_decompressor.", "decoder.")
WRAPPERS = ("module.", "_orig_mod.")
FIXED_TABLES = ("delta_encoder.pos_embed", "decoder.decoder_pos_embed")
# Decoder widths whose released config does not have 64-wide heads (RAE configs/decoder).
DECODER_HEADS = {1152: 16}
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def strip_wrappers(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Removes leading `module.` / `_orig_mod.` (in any order, repeated) from every key."""
  out = {}
  for k, v in state_dict.items():
    while k.startswith(WRAPPERS):
      k = k.split(".", 1)[1]
    out[k] = v
  return out


def _shape(sd: Mapping[str, Any], key: str, source: str) -> tuple[int, ...]:
  if key not in sd:
    raise ValueError(f"{source}: missing key {key!r}")
  return tuple(np.shape(sd[key]))


def _count(sd: Mapping[str, Any], prefix: str) -> int:
  pat = re.compile(rf"^{re.escape(prefix)}(\d+)\.")
  idx = {int(m.group(1)) for k in sd if (m := pat.match(k))}
  return max(idx) + 1 if idx else 0


def infer_fields(sd: Mapping[str, Any], *, num_heads: Optional[int] = None,
                 decoder_num_heads: Optional[int] = None, source: str = "checkpoint"
                 ) -> dict:
  """PAE keyword arguments (models.pae.PAE) read from the shapes of a stripped state dict."""
  emb = _shape(sd, "decoder.decoder_embed.weight", source)          # (W, D)
  width, decoder_width = emb[1], emb[0]
  n = _shape(sd, "decoder.decoder_pos_embed", source)[1] - 1
  if math.isqrt(n) ** 2 != n:
    raise ValueError(f"{source}: decoder.decoder_pos_embed has {n} patch rows, not a square")
  pred = _shape(sd, "decoder.decoder_pred.weight", source)[0]
  patch = math.isqrt(pred // 3)
  if 3 * patch * patch != pred:
    raise ValueError(f"{source}: decoder.decoder_pred.weight has {pred} outputs, not p*p*3")
  depth = _count(sd, "decoder.decoder_layers.")
  if depth == 0:
    raise ValueError(f"{source}: no decoder layers (keys 'decoder.decoder_layers.N.*')")
  conv_shape = _shape(sd, "latent_compressor.1.weight", source)     # (d, D, 3, 3)
  if num_heads is None:
    if width % 64:
      raise ValueError(f"{source}: width {width} is not a multiple of 64; pass num_heads=")
    num_heads = width // 64
  if decoder_num_heads is None:
    decoder_num_heads = DECODER_HEADS.get(decoder_width, decoder_width // 64)
  if not decoder_num_heads or decoder_width % decoder_num_heads:
    raise ValueError(f"{source}: decoder width {decoder_width}: pass decoder_num_heads=")
  f = dict(width=width, num_heads=num_heads, latent_dim=conv_shape[0],
           decoder_width=decoder_width, decoder_depth=depth,
           decoder_num_heads=decoder_num_heads,
           decoder_mlp_hidden=_shape(
               sd, "decoder.decoder_layers.0.intermediate.dense.weight", source)[0],
           decoder_patch_size=patch)
  dam_depth = _count(sd, "delta_encoder.layers.")
  f["use_dam"] = any(k.startswith("delta_encoder.") for k in sd)
  if f["use_dam"]:
    if dam_depth == 0:
      raise ValueError(f"{source}: delta_encoder.* without layers ('delta_encoder.layers.N.*')")
    f["dam_depth"] = dam_depth
    f["dam_mlp_hidden"] = _shape(sd, "delta_encoder.layers.0.mlp.fc1.weight", source)[0]
    f["dam_cross"] = "delta_encoder.layers.0.cross_attn.q_proj.weight" in sd
    if "delta_encoder.fusion_proj.weight" not in sd:
      f["fusion"] = "none"
    else:
      out_f, in_f = _shape(sd, "delta_encoder.fusion_proj.weight", source)
      modes = {(2 * width, width): "sft", (width, width): "add", (width, 2 * width): "concat"}
      if (out_f, in_f) not in modes:
        raise ValueError(f"{source}: delta_encoder.fusion_proj.weight has shape "
                         f"{(out_f, in_f)}; expected one of {sorted(modes)} for width {width}")
      f["fusion"] = modes[(out_f, in_f)]
  f["_grid"] = math.isqrt(n)
  return f


def _rules(f: dict, sd: Mapping[str, Any]) -> list[Rule]:
  width, h = f["width"], f["num_heads"]
  rules: list[Rule] = []
  add = lambda target, *sources, fn=lambda x: x: rules.append(Rule(target, sources, fn))

  def heads(n, hd):
    return (lambda w: linear(w).reshape(-1, n, hd)), (lambda b: b.reshape(n, hd))

  def fused(n, hd, dim):
    return (lambda w: linear(w).reshape(dim, 3, n, hd)), (lambda b: b.reshape(3, n, hd))

  def proj(n, hd, dim):
    return lambda w: linear(w).reshape(n, hd, dim)

  def norm(t, s):
    add(f"{t}/scale", f"{s}.weight")
    add(f"{t}/bias", f"{s}.bias")

  def dense(t, s, fn=linear):
    add(f"{t}/kernel", f"{s}.weight", fn=fn)
    add(f"{t}/bias", f"{s}.bias")

  def timm_attention(t, s):
    qkv_w, _ = fused(h, width // h, width)
    add(f"{t}/qkv/kernel", f"{s}.qkv.weight", fn=qkv_w)
    add(f"{t}/proj/kernel", f"{s}.proj.weight", fn=proj(h, width // h, width))
    add(f"{t}/proj/bias", f"{s}.proj.bias")

  if f["use_dam"]:
    dense("dam/patch_embed", "delta_encoder.patch_embed.proj", fn=conv)
    hd = width // h
    for i in range(f["dam_depth"]):
      t, s = f"dam/layer_{i}", f"delta_encoder.layers.{i}"
      norm(f"{t}/norm1", f"{s}.norm1")
      qkv_w, qkv_b = fused(h, hd, width)
      add(f"{t}/self_attn/qkv/kernel", f"{s}.self_attn.qkv.weight", fn=qkv_w)
      add(f"{t}/self_attn/qkv/bias", f"{s}.self_attn.qkv.bias", fn=qkv_b)
      dense(f"{t}/self_attn/proj", f"{s}.self_attn.proj", fn=proj(h, hd, width))
      if f["dam_cross"]:
        norm(f"{t}/norm2_q", f"{s}.norm2_q")
        norm(f"{t}/norm2_kv", f"{s}.norm2_kv")
        w_fn, b_fn = heads(h, hd)
        for n in ("q", "k", "v"):
          add(f"{t}/cross_attn/{n}/kernel", f"{s}.cross_attn.{n}_proj.weight", fn=w_fn)
          add(f"{t}/cross_attn/{n}/bias", f"{s}.cross_attn.{n}_proj.bias", fn=b_fn)
        dense(f"{t}/cross_attn/proj", f"{s}.cross_attn.proj", fn=proj(h, hd, width))
      norm(f"{t}/norm3", f"{s}.norm3")
      dense(f"{t}/mlp/fc1", f"{s}.mlp.fc1")
      dense(f"{t}/mlp/fc2", f"{s}.mlp.fc2")
    if f["fusion"] != "none":
      dense("dam/fusion", "delta_encoder.fusion_proj")
      norm("dam/final_ln", "delta_encoder.final_ln")
  timm_attention("compressor/attn", "latent_compressor.0")
  dense("compressor/conv", "latent_compressor.1", fn=conv)
  dense("decompressor/conv", "latent_decompressor.0", fn=conv)
  timm_attention("decompressor/attn", "latent_decompressor.1")

  w, dh = f["decoder_width"], f["decoder_num_heads"]
  dhd = w // dh
  dense("decoder/decoder_embed", "decoder.decoder_embed")
  add("decoder/cls_token", "decoder.trainable_cls_token")
  cat_w = lambda q, k, v: linear(np.concatenate([q, k, v], 0)).reshape(w, 3, dh, dhd)
  cat_b = lambda q, k, v: np.concatenate([q, k, v], 0).reshape(3, dh, dhd)
  for i in range(f["decoder_depth"]):
    t, s = f"decoder/layer_{i}", f"decoder.decoder_layers.{i}"
    a = f"{s}.attention.attention"
    norm(f"{t}/norm1", f"{s}.layernorm_before")
    add(f"{t}/attn/qkv/kernel", f"{a}.query.weight", f"{a}.key.weight", f"{a}.value.weight",
        fn=cat_w)
    add(f"{t}/attn/qkv/bias", f"{a}.query.bias", f"{a}.key.bias", f"{a}.value.bias",
        fn=cat_b)
    dense(f"{t}/attn/proj", f"{s}.attention.output.dense", fn=proj(dh, dhd, w))
    norm(f"{t}/norm2", f"{s}.layernorm_after")
    dense(f"{t}/mlp/fc1", f"{s}.intermediate.dense")
    dense(f"{t}/mlp/fc2", f"{s}.output.dense")
  norm("decoder/norm", "decoder.decoder_norm")
  dense("decoder/pred", "decoder.decoder_pred")
  return rules


@functools.lru_cache(maxsize=8)
def _param_shapes(items: tuple, size: int, grid: int) -> dict:
  model = pae_lib.PAE(**dict(items))
  shapes = jax.eval_shape(
      functools.partial(model.init, train=False), jax.random.key(0),
      jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32),
      jax.ShapeDtypeStruct((1, grid * grid, model.width), jnp.float32))
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  return nn.unbox(shapes)["params"]


def _check_fixed_tables(sd: Mapping[str, Any], f: dict, source: str) -> None:
  """The release stores its fixed sin-cos tables; they must be the ones we compute."""
  g = f["_grid"]
  want = {"delta_encoder.pos_embed": pae_lib.sincos_2d(f["width"], g),
          "decoder.decoder_pos_embed": pae_lib.sincos_2d(f["decoder_width"], g,
                                                         cls_token=True)}
  for key, table in want.items():
    if key not in sd:
      if key.startswith("delta_encoder.") and not f["use_dam"]:
        continue
      raise ValueError(f"{source}: missing key {key!r}")
    got = np.asarray(sd[key], np.float32).reshape(-1, table.shape[-1])
    if got.shape != table.shape or not np.allclose(got, table, atol=1e-4, rtol=0):
      raise ValueError(f"{source}: {key} {tuple(np.shape(sd[key]))} is not the fixed 2-D "
                       f"sin-cos table for a {g}x{g} grid of width {table.shape[-1]}")


def _vfm_from(sd: Mapping[str, Any], source: str, vfm_weights) -> tuple[dict, dict]:
  """(DinoV2 params, info) with final_norm_affine=False, from the file or vfm_weights."""
  if sd:
    try:
      params, info = dinov2_convert.convert_dinov2(sd, prefix="")
    except ValueError as e:
      raise ValueError(f"{source}: frozen VFM (keys {VFM_PREFIX}*): {e}") from e
  else:
    if vfm_weights is None:
      raise ValueError(f"{source} holds no frozen VFM (no '{VFM_PREFIX}*' keys): pass "
                       "vfm_weights= (the Hugging Face dinov2-with-registers weights)")
    path = os.fspath(vfm_weights)
    if os.path.isdir(path):
      found = [os.path.join(path, n) for n in HF_WEIGHT_FILES
               if os.path.isfile(os.path.join(path, n))]
      if not found:
        raise FileNotFoundError(f"vfm_weights={path} is a directory without any of "
                                f"{HF_WEIGHT_FILES}")
      path = found[0]
    params, info = dinov2_convert.load_dinov2_params(path, subkey="auto")
  if info.get("num_registers", 0) == 0:
    raise ValueError(f"{source}: the PAE VFM must be DINOv2 with registers; the given VFM "
                     "has none")
  params = {k: v for k, v in params.items() if k != "norm"}
  return params, {**info, "final_norm_affine": False}


def convert_pae(state_dict: Mapping[str, Any], *, vfm_weights=None,
                num_heads: Optional[int] = None, decoder_num_heads: Optional[int] = None,
                source: str = "checkpoint") -> tuple[dict, dict, dict, dict]:
  """(pae_params, pae_fields, vfm_params, vfm_info) from a released PAE state dict.

  pae_fields are `models.pae.PAE` keyword arguments plus `image_size` (decoded side),
  `vfm_image_size` (the VFM/DAM input side = grid * VFM patch); vfm_info the DinoV2
  keyword arguments (final_norm_affine=False).
  """
  sd = strip_wrappers(state_dict)
  vfm_sd = {k[len(VFM_PREFIX):]: v for k, v in sd.items() if k.startswith(VFM_PREFIX)}
  rest = {k: v for k, v in sd.items() if not k.startswith(VFM_PREFIX)}
  unknown = [k for k in rest if not k.startswith(PARTS)]
  if unknown:
    raise ValueError(f"{source}: unexpected key {unknown[0]!r} (a PAE checkpoint holds only "
                     f"{VFM_PREFIX}*, {', '.join(p + '*' for p in PARTS)})")
  f = infer_fields(rest, num_heads=num_heads, decoder_num_heads=decoder_num_heads,
                   source=source)
  _check_fixed_tables(rest, f, source)
  vfm_params, vfm_info = _vfm_from(vfm_sd, source, vfm_weights)
  vfm_width = np.shape(vfm_params["cls_token"])[-1]
  if vfm_width != f["width"]:
    raise ValueError(f"{source}: the VFM is {vfm_width} wide, the PAE modules {f['width']}")
  grid = f.pop("_grid")
  size = grid * int(vfm_info.get("patch_size", 14))
  shapes = _param_shapes(tuple(sorted(f.items())), size, grid)
  params = torch_io.apply_rules(rest, _rules(f, rest), shapes, ignore=FIXED_TABLES,
                                source=source)
  fields = {**f, "image_size": grid * f["decoder_patch_size"], "vfm_image_size": size}
  return params, fields, vfm_params, vfm_info


def load_pae_params(path, *, vfm_weights=None, num_heads: Optional[int] = None,
                    decoder_num_heads: Optional[int] = None, weights_only: bool = True
                    ) -> tuple[dict, dict, dict, dict]:
  """Reads a released PAE `.pt` (`torch.load(p)["model"]`) -> see `convert_pae`."""
  sd = torch_io.load_torch_state_dict(path, subkey="model", weights_only=weights_only)
  return convert_pae(sd, vfm_weights=vfm_weights, num_heads=num_heads,
                     decoder_num_heads=decoder_num_heads, source=os.fspath(path))
