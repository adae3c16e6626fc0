"""Shared config pieces: `parse_arg`, mesh / sharding defaults, optimizer blocks.

Config files (configs/*.py) call these so every stage reads the same field names.
"""

import ast
from typing import Any

import ml_collections


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """'runlocal,variant=B,latent_dim=64' -> ConfigDict; a bare name means True.

  Only keys given in `defaults` are allowed, and each value is parsed into its default's
  type, so `variant=B` and `latent_dim=64` both work and a typo fails loudly.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"unknown config arg {key!r} in {arg!r}; known: {sorted(defaults)}")
    if not sep:
      out[key] = True
      continue
    default = defaults[key]
    if isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"config arg {key}={value!r} is not a boolean")
      out[key] = value.lower() in ("true", "1")
    elif isinstance(default, (int, float)):
      try:
        out[key] = type(default)(ast.literal_eval(value))
      except (ValueError, SyntaxError) as e:
        raise ValueError(f"config arg {key}={value!r} is not a {type(default).__name__}") from e
    else:
      out[key] = value
  return out


def mesh_config(data: int = -1, fsdp: int = 1, tensor: int = 1):
  """Mesh axes in order; -1 takes all remaining devices. Parallelism is config data."""
  return [("data", data), ("fsdp", fsdp), ("tensor", tensor)]


# Logical axis -> mesh axes (flax logical partitioning). The first rule whose mesh axes are
# still free wins, so activations put "batch" on (data, fsdp) and leave "embed" unsharded,
# while parameters put "embed" on fsdp (ZeRO-3 style) and "mlp"/"heads" on tensor.
DEFAULT_SHARDING_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("length", None),
    ("layers", None),
    ("pos", None),
    ("latent", None),
    ("patch", None),
)


def optimizer_config(lr: float, *, end_lr: float | None = None, warmup_steps: int = 0,
                     schedule: str = "cosine", b1: float = 0.9, b2: float = 0.98,
                     weight_decay: float = 0.0, grad_clip: float | None = None,
                     eps: float = 1e-8) -> ml_collections.ConfigDict:
  """AdamW with warm-up then `schedule` in {'cosine', 'constant'} (see trainers/common.py)."""
  return ml_collections.ConfigDict(dict(
      lr=lr, end_lr=lr if end_lr is None else end_lr, warmup_steps=warmup_steps,
      schedule=schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
      grad_clip=ml_collections.FieldReference(grad_clip, field_type=float)))


def common_config(stage: str) -> ml_collections.ConfigDict:
  """Fields every stage has."""
  c = ml_collections.ConfigDict()
  c.stage = stage
  c.seed = 0
  c.total_steps = 1000
  c.batch_size = 256             # global batch over all hosts and devices
  c.log_every = 50
  c.image_every = 1000           # PNG grids of reconstructions / samples
  c.ckpt_every = 1000
  c.keep_ckpts = 3
  c.compute_dtype = "bfloat16"   # "float32" forced on CPU unless compute_dtype_cpu is set
  c.param_dtype = "float32"
  c.mesh = mesh_config()
  c.sharding_rules = [list(r) for r in DEFAULT_SHARDING_RULES]
  c.param_sharding = "logical"   # "logical" (axis rules) or "fsdp" (largest divisible dim)
  c.init_from = ml_collections.FieldReference(None, field_type=str)
  c.ema_decay = ml_collections.FieldReference(None, field_type=float)
  c.num_eval_images = 16
  return c


def autoencoder_config(arg: str | None, *, latent_dim: int) -> ml_collections.ConfigDict:
  """Stage 2 (GAE autoencoder), SPEC stage 2 + paper Tab. 13 / Sec. G.

  arg: 'runlocal' (tiny CPU smoke run on the embedded photos), 'variant=S|B|L',
  'sigma_std=0.1', 'kl' (KL-VAE of Tab. 7), 'source=embedded|folder|tfds', 'root=...'.
  """
  from gae_jax.data import pipeline  # late import: configs stay light to parse
  a = parse_arg(arg, variant="L", runlocal=False, sigma_std=0.2, kl=False,
                source="tfds", root="", latent_dim=latent_dim)
  c = common_config("autoencoder")
  c.model = ml_collections.ConfigDict(dict(
      variant=a.variant, decoder_variant=a.variant, patch_size=16, latent_dim=a.latent_dim,
      sigma_std=a.sigma_std, kl=a.kl, qk_norm="rms", attention_impl=None,
      remat="none", scan=False))
  c.loss = ml_collections.ConfigDict(dict(
      l1_weight=1.0, lpips_weight=1.0, logvar_init=0.0,
      disc_weight=0.5, disc_start=5001, adaptive_disc_weight=False, disc_loss="hinge",
      disc_layers=3, disc_ndf=64,
      kl_weight=0.1 if a.kl else 0.0,          # paper Tab. 7 KL-VAE weight
      sp_weight=1.0))                          # lambda_sp; active once a teacher is set
  c.teacher = ml_collections.ConfigDict(dict(
      init_from=ml_collections.FieldReference(None, field_type=str)))
  # Paper Tab. 13: AdamW, 2e-4 -> 2e-5 cosine, warm-up 8000, betas (0.9, 0.98),
  # batch 1024, 250k iterations. Weight decay is not given for the AE: 0.05 as the teacher.
  c.optim = optimizer_config(2e-4, end_lr=2e-5, warmup_steps=8000, b1=0.9, b2=0.98,
                             weight_decay=0.05)
  c.disc_optim = optimizer_config(2e-4, end_lr=2e-5, warmup_steps=0, b1=0.9, b2=0.98,
                                  weight_decay=0.0)
  c.total_steps = 250_000
  c.batch_size = 1024
  c.log_every = 100
  c.image_every = 5000
  c.ckpt_every = 5000
  c.data = pipeline.default_data_config()
  c.data.source = a.source
  c.data.root = a.root
  c.data.image_size = 256
  c.data.num_workers = 8          # grain worker processes per host (TPU VM hosts have many cores)
  c.model.remat = "dots_no_batch" if a.variant == "L" else "none"
  if a.runlocal:
    c.model.variant = c.model.decoder_variant = "mu"
    c.model.patch_size = 8
    c.data.source = "embedded"
    c.data.image_size = 64
    c.data.num_workers = 0
    c.batch_size = 8
    c.total_steps = 120
    c.optim.warmup_steps = 10
    c.optim.lr, c.optim.end_lr = 1e-3, 1e-4
    c.disc_optim.lr, c.disc_optim.end_lr = 1e-4, 1e-5
    c.loss.disc_start = 90          # GAN for the last 30 steps, gentler than the paper's 0.5
    c.loss.disc_weight = 0.1
    c.log_every = 10
    c.image_every = 60
    c.ckpt_every = 60
    c.num_eval_images = 8
    c.model.remat = "none"
  return c
