"""The authors' LightningDiT checkpoints (`.pt` with model/ema/opt/config) <-> gae_jax.

Their state dict (github.com/sii-research/GAE, models/lightningdit_we.py; torch Linear
weights are (out, in), our Dense kernels their transpose):
  x_embedder.proj.{weight (W, C, p, p), bias}      patch conv
  pos_embed (1, N, W)                              frozen sin-cos (recomputed here)
  feat_rope.freqs_{cos,sin} (N, W/heads)           RoPE buffers (recomputed here)
  t_embedder.mlp.{0,2}.{weight, bias}
  y_embedder.embedding_table.weight (classes + 1, W)   last row = null class
  blocks.{i}.norm{1,2}.weight                      RMSNorm
  blocks.{i}.attn.qkv.{weight (3W, W), bias}       rows [q | k | v], each (heads, head_dim)
  blocks.{i}.attn.{q,k}_norm.weight (head_dim,)    QK-norm (800-epoch models)
  blocks.{i}.attn.proj.{weight, bias}
  blocks.{i}.mlp.w12.{weight (2H, W), bias}, mlp.w3.{weight, bias}
  blocks.{i}.adaLN_modulation.1.{weight (6W, W), bias}
  final_layer.norm_final.weight, final_layer.linear.*, final_layer.adaLN_modulation.1.*
Sizes come from the shapes; heads from the checkpoint's `config.model.model_type` or the
released size table (width 768 -> 12, 1024 -> 16, 1152 -> 16, 1536 -> 24, 1792 -> 28).
The latent statistics are `latents_stats.pt` ({'mean', 'std'} (1, d, 1, 1)).

`load_release_dit_params(path)` reads such a `.pt`; the user-facing
`gae_jax.pretrained.load_dit(path, stats=None)` takes it or a gae_jax flow workdir and
returns a `DiTHandle` with `.velocity(x, t, y)` and `.sample(...)`.
"""

import os
import re
from typing import Any, Mapping, Optional

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gae_jax.convert import torch_io
from gae_jax.models import dit as dit_lib

# Released LightningDiT sizes: width -> heads; model_type names -> (width, depth, heads).
HEADS_BY_WIDTH = {768: 12, 1024: 16, 1152: 16, 1536: 24, 1792: 28}
MODEL_TYPES = {"B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16),
               "1p0B": (1536, 24, 24), "1p6B": (1792, 28, 28)}
_BLOCK_RE = re.compile(r"blocks\.(\d+)\.")
_IGNORED = ("pos_embed", "feat_rope.freqs_cos", "feat_rope.freqs_sin")
_PREFIXES = ("module.", "_orig_mod.", "model.")


def _strip_prefix(sd: Mapping[str, Any]) -> dict:
  """Drops DDP / torch.compile wrapper prefixes carried by every key."""
  sd = dict(sd)
  changed = True
  while changed and sd:
    changed = False
    for p in _PREFIXES:
      if all(k.startswith(p) for k in sd):
        sd = {k[len(p):]: v for k, v in sd.items()}
        changed = True
  return sd


def _shape(sd, key) -> tuple:
  if key not in sd:
    raise ValueError(f"DiT checkpoint is missing key {key!r}")
  return tuple(np.shape(sd[key]))


def _heads(width: int, num_heads: Optional[int], model_type: Optional[str]) -> int:
  if num_heads is None and model_type:
    name = model_type.split("-")[-1].split("/")[0]
    if name in MODEL_TYPES:
      num_heads = MODEL_TYPES[name][2]
  if num_heads is None:
    if width not in HEADS_BY_WIDTH:
      raise ValueError(f"cannot infer the number of heads for DiT width {width} (known: "
                       f"{sorted(HEADS_BY_WIDTH)}); pass num_heads=")
    num_heads = HEADS_BY_WIDTH[width]
  if width % num_heads:
    raise ValueError(f"DiT width {width} is not divisible by num_heads {num_heads}")
  return int(num_heads)


def infer_model_kwargs(state_dict: Mapping[str, Any], *, num_heads: Optional[int] = None,
                       config: Optional[Mapping[str, Any]] = None) -> dict:
  """LightningDiT constructor kwargs (+ latent_size) from shapes and the optional config."""
  sd = state_dict
  model_cfg = dict((config or {}).get("model") or {})
  for flag, want in (("use_swiglu", True), ("use_rmsnorm", True), ("wo_shift", False)):
    if flag in model_cfg and bool(model_cfg[flag]) != want:
      raise ValueError(f"DiT checkpoint config has model.{flag}={model_cfg[flag]}; only "
                       f"{flag}={want} (the released GAE DiTs) is supported")
  width, in_ch, p, p2 = _shape(sd, "x_embedder.proj.weight")
  if p != p2:
    raise ValueError(f"x_embedder.proj.weight has non-square patch {(p, p2)}")
  # max index + 1: keys of a missing middle block are then reported as missing.
  depth = max((int(m.group(1)) + 1 for k in sd for m in [_BLOCK_RE.match(k)] if m), default=0)
  if depth == 0:
    raise ValueError("DiT checkpoint has no blocks.{i}.* keys")
  rows = _shape(sd, "y_embedder.embedding_table.weight")[0]
  if "blocks.0.norm1.weight" not in sd or "blocks.0.mlp.w12.weight" not in sd:
    raise ValueError("DiT checkpoint lacks blocks.0.norm1.weight / blocks.0.mlp.w12.weight: "
                     "only RMSNorm + SwiGLU LightningDiTs (the released GAE DiTs) load")
  hidden = _shape(sd, "blocks.0.mlp.w12.weight")[0] // 2
  if hidden != dit_lib.dit_swiglu_hidden(width):
    raise ValueError(f"blocks.0.mlp.w12.weight {_shape(sd, 'blocks.0.mlp.w12.weight')} gives "
                     f"SwiGLU hidden {hidden}, expected {dit_lib.dit_swiglu_hidden(width)} "
                     f"for width {width} (mlp_ratio 4)")
  n_tok = _shape(sd, "pos_embed")[1] if "pos_embed" in sd else None
  grid = int(round(np.sqrt(n_tok))) if n_tok else None
  if "use_abs_pos" in model_cfg:
    use_abs_pos = bool(model_cfg["use_abs_pos"])
  else:
    use_abs_pos = "pos_embed" in sd and bool(np.any(np.asarray(sd["pos_embed"]) != 0))
  # The released model registers the RoPE tables as (persistent) buffers iff use_rope, so a
  # bare state dict without them is a model without RoPE; a config without the key too
  # (their train.py default).
  use_rope = bool(model_cfg.get("use_rope", False) or "feat_rope.freqs_cos" in sd)
  kw = dict(width=int(width), depth=depth,
            num_heads=_heads(int(width), num_heads, model_cfg.get("model_type")),
            patch_size=int(p), in_channels=int(in_ch), num_classes=int(rows) - 1,
            class_dropout_prob=float(model_cfg.get("class_dropout_prob", 0.1)),
            qk_norm="blocks.0.attn.q_norm.weight" in sd, use_rope=use_rope,
            use_abs_pos=use_abs_pos)
  if grid:
    kw["latent_size"] = grid * int(p)
  elif (config or {}).get("data", {}).get("image_size"):
    kw["latent_size"] = int(config["data"]["image_size"]) // int(
        (config.get("vae") or {}).get("downsample_ratio", 16))
  return kw


def _model(kw: Mapping[str, Any], dtype=jnp.float32) -> dit_lib.LightningDiT:
  return dit_lib.LightningDiT(**{k: v for k, v in kw.items() if k != "latent_size"},
                              dtype=dtype)


def reference_params(kw: Mapping[str, Any]) -> dict:
  """The model's parameter shapes (eval_shape, nothing allocated)."""
  s = kw.get("latent_size", 16)
  model = _model(kw)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, s, s, kw["in_channels"]), jnp.float32),
                          jax.ShapeDtypeStruct((1,), jnp.float32),
                          jax.ShapeDtypeStruct((1,), jnp.int32))
  return nn.meta.unbox(shapes)["params"]


def _rules(kw: Mapping[str, Any]) -> list[torch_io.Rule]:
  R, lin = torch_io.Rule, torch_io.linear
  w, h = kw["width"], kw["num_heads"]
  hd = w // h
  rules = [
      R("x_embedder/kernel", ("x_embedder.proj.weight",), torch_io.conv),
      R("x_embedder/bias", ("x_embedder.proj.bias",)),
      R("y_embedder/embedding_table/embedding", ("y_embedder.embedding_table.weight",)),
      R("final_layer/norm_final/scale", ("final_layer.norm_final.weight",)),
      R("final_layer/linear/kernel", ("final_layer.linear.weight",), lin),
      R("final_layer/linear/bias", ("final_layer.linear.bias",)),
      R("final_layer/adaLN_modulation/kernel", ("final_layer.adaLN_modulation.1.weight",), lin),
      R("final_layer/adaLN_modulation/bias", ("final_layer.adaLN_modulation.1.bias",)),
  ]
  for i in ("0", "2"):
    rules += [R(f"t_embedder/mlp_{i}/kernel", (f"t_embedder.mlp.{i}.weight",), lin),
              R(f"t_embedder/mlp_{i}/bias", (f"t_embedder.mlp.{i}.bias",))]
  for i in range(kw["depth"]):
    b, f = f"blocks.{i}.", f"blocks_{i}/"
    rules += [
        R(f + "norm1/scale", (b + "norm1.weight",)),
        R(f + "norm2/scale", (b + "norm2.weight",)),
        R(f + "attn/qkv/kernel", (b + "attn.qkv.weight",),
          lambda x: x.T.reshape(w, 3, h, hd)),
        R(f + "attn/qkv/bias", (b + "attn.qkv.bias",), lambda x: x.reshape(3, h, hd)),
        R(f + "attn/proj/kernel", (b + "attn.proj.weight",), lambda x: x.T.reshape(h, hd, w)),
        R(f + "attn/proj/bias", (b + "attn.proj.bias",)),
        R(f + "mlp/w12/kernel", (b + "mlp.w12.weight",), lin),
        R(f + "mlp/w12/bias", (b + "mlp.w12.bias",)),
        R(f + "mlp/w3/kernel", (b + "mlp.w3.weight",), lin),
        R(f + "mlp/w3/bias", (b + "mlp.w3.bias",)),
        R(f + "adaLN_modulation/kernel", (b + "adaLN_modulation.1.weight",), lin),
        R(f + "adaLN_modulation/bias", (b + "adaLN_modulation.1.bias",)),
    ]
    if kw["qk_norm"]:
      rules += [R(f + "attn/q_norm/scale", (b + "attn.q_norm.weight",)),
                R(f + "attn/k_norm/scale", (b + "attn.k_norm.weight",))]
  return rules


def convert_dit(state_dict: Mapping[str, Any], *, num_heads: Optional[int] = None,
                config: Optional[Mapping[str, Any]] = None,
                source: str = "DiT checkpoint") -> tuple[dict, dict]:
  """torch-layout state dict -> (Flax params as float32 numpy, model kwargs + latent_size).

  Every key is checked: a missing key, an unused key or a wrong shape raises a ValueError
  naming it (and both shapes).
  """
  sd = {k: np.asarray(v) for k, v in _strip_prefix(state_dict).items()}
  kw = infer_model_kwargs(sd, num_heads=num_heads, config=config)
  params = torch_io.apply_rules(sd, _rules(kw), reference_params(kw), ignore=_IGNORED,
                                source=source)
  if kw["use_abs_pos"] and "pos_embed" in sd and "latent_size" in kw:
    g = kw["latent_size"] // kw["patch_size"]
    ours = dit_lib.sincos_pos_embed(kw["width"], g, g)
    theirs = np.asarray(sd["pos_embed"], np.float32).reshape(ours.shape)
    if not np.allclose(ours, theirs, atol=1e-4):
      raise ValueError(f"{source}: pos_embed differs from the sin-cos table the model "
                       f"recomputes (max |diff| {np.abs(ours - theirs).max():.3g})")
  return params, kw


def export_dit(params: Mapping[str, Any], kw: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """gae_jax params -> the authors' state-dict layout (numpy; wrap in torch to save).

  kw: model kwargs incl. latent_size (e.g. `DiTHandle.config`); includes pos_embed and the
  RoPE buffers as the released model registers them.
  """
  flat = torch_io.flatten_tree(nn.meta.unbox(dict(params)))
  out = {}
  for rule in _rules(kw):
    (key,) = rule.sources
    v = np.asarray(flat[rule.target], np.float32)
    if rule.fn is torch_io.linear:
      v = v.T
    elif rule.fn is torch_io.conv:
      v = v.transpose(3, 2, 0, 1)
    elif rule.target.endswith("qkv/kernel"):
      v = v.reshape(v.shape[0], -1).T
    elif rule.target.endswith("qkv/bias"):
      v = v.reshape(-1)
    elif rule.target.endswith("proj/kernel"):
      v = v.reshape(-1, v.shape[-1]).T
    out[key] = np.ascontiguousarray(v)
  g = kw.get("latent_size", 16) // kw["patch_size"]
  pos = dit_lib.sincos_pos_embed(kw["width"], g, g) if kw["use_abs_pos"] else np.zeros(
      (g * g, kw["width"]), np.float32)
  out["pos_embed"] = pos[None]
  if kw["use_rope"]:
    cos, sin = dit_lib.rope_2d(kw["width"] // kw["num_heads"], g, g)
    out["feat_rope.freqs_cos"], out["feat_rope.freqs_sin"] = cos, sin
  return out


# ------------------------------------------------------------------------------------------
# Loading and the handle.


def _torch_load(path: str, weights_only: bool) -> Any:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"reading {path} needs PyTorch (CPU build)") from e
  try:
    return torch.load(path, map_location="cpu", weights_only=weights_only)
  except Exception as e:  # pickle errors come in many types
    raise ValueError(f"cannot read torch checkpoint {path}: {type(e).__name__}: "
                     f"{str(e).splitlines()[0] if str(e) else ''}") from e


def _numpy_sd(obj: Mapping[str, Any], path: str) -> dict[str, np.ndarray]:
  out = {}
  for k, v in obj.items():
    if hasattr(v, "detach"):
      v = v.detach().cpu().float().numpy()
    if not isinstance(v, np.ndarray):
      raise ValueError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
    out[str(k)] = v
  return out


def load_release_dit_params(path: str, *, use_ema: bool = True,
                            num_heads: Optional[int] = None, weights_only: bool = True
                            ) -> tuple[dict, dict, Optional[str]]:
  """(params, model kwargs incl. latent_size, default stats path or None) of the authors'
  `.pt` (`ema` by default, else `model`; a bare state dict also works).

  The default stats path is the `latents_stats.pt` beside the file (or in its config's
  data.data_path) when it exists. `gae_jax.pretrained.load_dit` is the user-facing loader.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"DiT checkpoint {path} does not exist")
  if not path.endswith(torch_io.TORCH_SUFFIXES):
    raise ValueError(f"{path} is a file but not a PyTorch checkpoint "
                     f"({', '.join(torch_io.TORCH_SUFFIXES)}); pass a flow workdir or .pt")
  obj = _torch_load(path, weights_only)
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
  config = obj.get("config") if isinstance(obj.get("config"), Mapping) else None
  key = None
  if "ema" in obj or "model" in obj:
    key = "ema" if use_ema and "ema" in obj else "model"
    if key not in obj:
      raise ValueError(f"{path} has no 'model' entry (keys {sorted(obj)})")
    if use_ema and key != "ema":
      logging.warning("load_dit: %s has no EMA weights; using 'model'", path)
    sd = obj[key]
  else:
    sd = obj
  params, kw = convert_dit(_numpy_sd(sd, path), num_heads=num_heads, config=config,
                           source=f"{path}[{key}]" if key else path)
  stats = os.path.join(os.path.dirname(os.path.abspath(path)), "latents_stats.pt")
  if config and (config.get("data") or {}).get("data_path"):
    cand = os.path.join(config["data"]["data_path"], "latents_stats.pt")
    stats = cand if os.path.isfile(cand) else stats
  return params, kw, stats if os.path.isfile(stats) else None
