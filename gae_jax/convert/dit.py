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

`load_dit(path, stats=None)` reads such a `.pt` or a gae_jax flow workdir (EMA params by
default) and returns a `DiTHandle` with `.velocity(x, t, y)` and `.sample(...)`.
"""

import functools
import json
import os
import re
from typing import Any, Mapping, Optional

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gae_jax import flow
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


def load_dit_params(path: str, *, use_ema: bool = True, num_heads: Optional[int] = None,
                    step: Optional[int] = None, weights_only: bool = True
                    ) -> tuple[dict, dict, Optional[str]]:
  """(params, model kwargs incl. latent_size, default stats path or None).

  path: the authors' `.pt` (`ema` by default, else `model`; a bare state dict also works)
  or a gae_jax flow workdir / its checkpoints/ dir (EMA params by default).
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"DiT checkpoint {path} does not exist")
  if os.path.isfile(path):
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
  return _load_flow_workdir(path, use_ema=use_ema, step=step)


def _load_flow_workdir(path: str, *, use_ema: bool, step: Optional[int]
                       ) -> tuple[dict, dict, Optional[str]]:
  from gae_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  path = os.path.abspath(path)
  if os.path.isfile(os.path.join(path, "config.json")):
    workdir, ckpt_dir = path, os.path.join(path, "checkpoints")
  elif os.path.isfile(os.path.join(os.path.dirname(path), "config.json")):
    workdir, ckpt_dir = os.path.dirname(path), path
  else:
    raise FileNotFoundError(f"{path} is neither a gae_jax flow workdir (config.json + "
                            "checkpoints/) nor a PyTorch .pt checkpoint")
  with open(os.path.join(workdir, "config.json")) as f:
    cfg = json.load(f)
  if cfg.get("stage") != "flow":
    raise ValueError(f"{workdir}/config.json is a {cfg.get('stage')!r} run, not a 'flow' run")
  state = ckpt_lib.restore_params(ckpt_dir, step=step, keys=("params", "ema_params"))
  params = state.get("ema_params") if use_ema else None
  if params is None:
    params = state["params"]
  m = cfg["model"]
  kw = dict(**dit_lib.decode_variant(m["variant"].split("/")[0]),
            patch_size=int(m["patch_size"]), in_channels=int(m["latent_dim"]),
            num_classes=int(m["num_classes"]),
            class_dropout_prob=float(m["class_dropout_prob"]), qk_norm=bool(m["qk_norm"]),
            use_rope=bool(m["use_rope"]), use_abs_pos=bool(m["use_abs_pos"]),
            latent_size=int(m["latent_size"]))
  torch_io.check_tree_matches(params, reference_params(kw), f"{ckpt_dir}")
  cache = (cfg.get("data") or {}).get("cache_dir")
  stats = os.path.join(cache, "stats.npz") if cache else None
  return jax.tree.map(np.asarray, params), kw, stats if stats and os.path.isfile(stats) else None


class DiTHandle:
  """A frozen LightningDiT with its latent statistics.

  velocity(x, t, y): x (B, h, w, d) latents in the DiT's normalised space, t (B,) or scalar
  in [0, 1] (0 = noise, 1 = data), y (B,) int labels (`null_label` = num_classes is the
  unconditional class) -> v (B, h, w, d) float32.
  sample(...): the whole sampler in one jit (see `sample`).
  """

  def __init__(self, params: Any, config: Mapping[str, Any],
               stats: Optional[tuple[np.ndarray, np.ndarray]] = None, *,
               dtype=jnp.float32, source: str = "<params>"):
    self.config = dict(config)
    self.source = source
    self.model = _model(self.config, dtype)
    torch_io.check_tree_matches(nn.meta.unbox(params), reference_params(self.config), source)
    self.params = jax.device_put(jax.tree.map(lambda a: jnp.asarray(a, jnp.float32),
                                              nn.meta.unbox(params)))
    self.mean = self.std = None
    if stats is not None:
      mean, std = (np.asarray(a, np.float32).reshape(-1) for a in stats)
      if mean.shape != (self.config["in_channels"],) or std.shape != mean.shape:
        raise ValueError(f"latent stats of shapes {mean.shape}/{std.shape} do not match the "
                         f"DiT's {self.config['in_channels']} channels")
      self.mean, self.std = jnp.asarray(mean), jnp.asarray(std)
    model = self.model
    self._velocity = jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y))

  @property
  def num_classes(self) -> int:
    return self.model.num_classes

  @property
  def null_label(self) -> int:
    return self.model.null_label

  @property
  def latent_shape(self) -> tuple[int, int, int]:
    s = self.config.get("latent_size", 16)
    return (s, s, self.config["in_channels"])

  def velocity(self, x, t, y) -> jax.Array:
    x = jnp.asarray(x, jnp.float32)
    if x.ndim != 4 or x.shape[-1] != self.config["in_channels"]:
      raise ValueError(f"velocity expects x of shape (B, h, w, {self.config['in_channels']}), "
                       f"got {x.shape}")
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
    y = jnp.broadcast_to(jnp.asarray(y, jnp.int32), (x.shape[0],))
    return self._velocity(self.params, x, t, y)

  def denormalize(self, x) -> jax.Array:
    """DiT space -> GAE latent space: x * std + mean."""
    if self.mean is None:
      raise ValueError(f"DiT from {self.source} has no latent statistics: pass stats=")
    return jnp.asarray(x) * self.std + self.mean

  def sample(self, labels, *, rng=0, noise=None, mode: str = "sde", num_steps: int = 250,
             shift: float = 1.0, cfg_scale: float = 1.0, cfg_interval: float = 0.0,
             last_step: str = "release", denormalize: bool = True) -> jax.Array:
    """Latents for `labels` (B,) ints: SDE/Euler/Heun over the shifted grid, optional CFG
    (scale w on all channels for t >= cfg_interval); noise defaults to N(0, I) from rng.
    Returns GAE-space latents (x * std + mean) when `denormalize` and stats are known."""
    labels = jnp.asarray(labels, jnp.int32)
    key = jax.random.key(rng) if isinstance(rng, int) else rng
    k_noise, k_sde = jax.random.split(key)
    if noise is None:
      noise = jax.random.normal(k_noise, (labels.shape[0], *self.latent_shape), jnp.float32)
    out = _sample_jit(self.model, self.params, jnp.asarray(noise, jnp.float32), labels, k_sde,
                      mode=mode, num_steps=num_steps, shift=shift, cfg_scale=cfg_scale,
                      cfg_interval=cfg_interval, last_step=last_step)
    return self.denormalize(out) if denormalize and self.mean is not None else out


@functools.partial(jax.jit, static_argnames=("model", "mode", "num_steps", "shift",
                                             "cfg_scale", "cfg_interval", "last_step"))
def _sample_jit(model, params, noise, labels, rng, *, mode, num_steps, shift, cfg_scale,
                cfg_interval, last_step):
  v_fn = lambda x, t, y: model.apply({"params": params}, x, t, y)
  if cfg_scale != 1.0:
    v_fn = flow.cfg_velocity(v_fn, cfg_scale, null_label=model.null_label,
                             interval_start=cfg_interval)
  return flow.sample(v_fn, noise, labels, rng, mode=mode, num_steps=num_steps, shift=shift,
                     last_step=last_step)


def load_dit(path: str, stats: Optional[str] = None, *, use_ema: bool = True,
             num_heads: Optional[int] = None, step: Optional[int] = None,
             dtype=jnp.float32, weights_only: bool = True) -> DiTHandle:
  """A frozen DiT from the authors' `.pt` or a gae_jax flow workdir.

  stats: `latents_stats.pt`, a `stats.npz` or a latent cache dir; default: the
  `latents_stats.pt` beside the `.pt` (or in its config's data_path), or the flow run's
  cache. Without any, `.sample(..., denormalize=True)` returns normalised latents.
  """
  from gae_jax.data import latents as latents_lib  # pylint: disable=g-import-not-at-top
  params, kw, default_stats = load_dit_params(path, use_ema=use_ema, num_heads=num_heads,
                                              step=step, weights_only=weights_only)
  stats_path = stats or default_stats
  loaded = latents_lib.load_stats(stats_path) if stats_path else None
  if loaded is None:
    logging.warning("load_dit: no latent statistics for %s", path)
  return DiTHandle(params, kw, loaded, dtype=dtype, source=os.fspath(path))
