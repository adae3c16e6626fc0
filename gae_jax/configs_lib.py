"""Shared config pieces: `parse_arg`, mesh / sharding defaults, optimizer blocks.

Config files (configs/*.py) call these so every stage reads the same field names.
"""

import ast
import difflib
from typing import Any, Sequence

from absl import logging
import ml_collections


def did_you_mean(word: str, choices) -> str:
  """' Did you mean 'x'?' for the closest of `choices` (difflib), else ''."""
  choices = [str(c) for c in choices]
  match = [c for c in choices if c.lower() == word.lower()]
  match = match or difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
  return f" Did you mean {match[0]!r}?" if match else ""


def parse_arg(arg: str | None, *, exclusive: Sequence[tuple[str, str]] = (),
              **defaults: Any) -> ml_collections.ConfigDict:
  """'runlocal,variant=B,latent_dim=64' -> ConfigDict; a bare name means True.

  Only keys given in `defaults` are allowed, and each value is parsed into its default's
  type, so `variant=B` and `latent_dim=64` both work. `exclusive`: pairs (a, b) of keys
  that cannot both be given because `a` overrides what `b` sets (e.g. ('runlocal',
  'variant'): runlocal trains the tiny "mu" model). Raises ValueError (one line naming the
  key, with a "Did you mean" suggestion) for an unknown key, a key given twice, a bare name
  that is not a boolean, a value not of the default's type, or an exclusive pair.
  """
  out = ml_collections.ConfigDict(defaults)
  given = []
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"unknown config arg {key!r} in {arg!r}.{did_you_mean(key, defaults)}"
                       f" Known: {', '.join(sorted(defaults))}")
    if key in given:
      raise ValueError(f"config arg {key!r} is given twice in {arg!r}")
    given.append(key)
    default = defaults[key]
    if not sep:
      if not isinstance(default, bool):
        raise ValueError(f"config arg {key!r} needs a value ({key}=...) in {arg!r}")
      out[key] = True
      continue
    if isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"config arg {key}={value!r} is not a boolean in {arg!r}")
      out[key] = value.lower() in ("true", "1")
    elif isinstance(default, (int, float)):
      try:
        parsed = ast.literal_eval(value)
      except (ValueError, SyntaxError):
        parsed = None
      ok = (int,) if isinstance(default, int) else (int, float)
      if isinstance(parsed, bool) or not isinstance(parsed, ok):
        kind = "an integer" if isinstance(default, int) else "a number"
        raise ValueError(f"config arg {key}={value!r} is not {kind} in {arg!r}")
      out[key] = type(default)(parsed)
    else:
      out[key] = value
  for a, b in exclusive:
    if a in given and b in given:
      raise ValueError(f"config args {a!r} and {b!r} cannot be combined in {arg!r}: "
                       f"{a!r} sets {b} itself, so the given {b} would be ignored")
  return out


def _check(ok: bool, field: str, value: Any, requirement: str) -> None:
  if not ok:
    raise ValueError(f"{field}={value!r} {requirement}")


def validate(config: ml_collections.ConfigDict, prefix: str = "config") -> None:
  """Checks the values a run would silently misuse; raises ValueError (one line naming the
  field, e.g. "config.optim.lr=-1.0 must be > 0") on the first bad one.

  Checked where present: batch_size > 0, total_steps >= 0, every optimizer block (a
  sub-config with `lr` and `schedule`): lr > 0, end_lr >= 0, warmup_steps >= 0,
  weight_decay >= 0, b1, b2 in [0, 1), schedule in {cosine, constant}, grad_clip None or
  > 0; ema_decay None or in [0, 1); model.variant / model.decoder_variant in the model's
  size table (ViT for the autoencoder, LightningDiT for the flow stage); model.sigma_std
  >= 0; model.latent_dim > 0; the autoencoder's data.image_size a multiple of
  model.patch_size; max_nonfinite_steps >= 0. Sub-configs that have a `stage` (the demo's
  per-stage configs) are validated the same way under their own prefix. What only a
  training run needs (not --dry_run) is checked by validate_training.
  """
  c = config
  _check(c.get("max_nonfinite_steps", 0) >= 0, f"{prefix}.max_nonfinite_steps",
         c.get("max_nonfinite_steps"), "must be >= 0 (0: never stop)")
  _check(c.get("batch_size", 1) > 0, f"{prefix}.batch_size", c.get("batch_size"), "must be > 0")
  _check(c.get("total_steps", 0) >= 0, f"{prefix}.total_steps", c.get("total_steps"),
         "must be >= 0")
  for name in sorted(c.keys()):
    o, at = c[name], f"{prefix}.{name}"
    if not isinstance(o, ml_collections.ConfigDict):
      continue
    if "stage" in o:
      validate(o, at)
    if not ("lr" in o and "schedule" in o):
      continue
    _check(o.lr > 0, f"{at}.lr", o.lr, "must be > 0")
    _check(o.get("end_lr", 0) >= 0, f"{at}.end_lr", o.get("end_lr"), "must be >= 0")
    _check(o.get("warmup_steps", 0) >= 0, f"{at}.warmup_steps", o.get("warmup_steps"),
           "must be >= 0")
    _check(o.get("weight_decay", 0) >= 0, f"{at}.weight_decay", o.get("weight_decay"),
           "must be >= 0")
    for b in ("b1", "b2"):
      _check(0 <= o.get(b, 0) < 1, f"{at}.{b}", o.get(b), "must be in [0, 1)")
    _check(o.schedule in ("cosine", "constant"), f"{at}.schedule", o.schedule,
           "must be 'cosine' or 'constant'")
    clip = o.get("grad_clip")
    _check(clip is None or clip > 0, f"{at}.grad_clip", clip, "must be None or > 0")
  ema = c.get("ema_decay")
  _check(ema is None or 0 <= ema < 1, f"{prefix}.ema_decay", ema, "must be None or in [0, 1)")
  model = c.get("model")
  if not isinstance(model, ml_collections.ConfigDict):
    return
  table, fields = None, ()
  if c.get("stage") == "autoencoder":
    from gae_jax.models import vit  # pylint: disable=g-import-not-at-top
    table, fields = vit.VARIANTS, ("variant", "decoder_variant")
  elif c.get("stage") == "flow":
    from gae_jax.models import dit  # pylint: disable=g-import-not-at-top
    table, fields = dit.VARIANTS, ("variant",)
  for f in fields:
    v = model.get(f)
    if v is not None and v not in table:
      raise ValueError(f"{prefix}.model.{f}={v!r} is not a model size."
                       f"{did_you_mean(v, table)} Known: {', '.join(table)}")
  if model.get("sigma_std") is not None:
    _check(model.sigma_std >= 0, f"{prefix}.model.sigma_std", model.sigma_std, "must be >= 0")
  if model.get("latent_dim") is not None:
    _check(model.latent_dim > 0, f"{prefix}.model.latent_dim", model.latent_dim, "must be > 0")
  data = c.get("data")
  size = data.get("image_size", 0) if isinstance(data, ml_collections.ConfigDict) else 0
  patch = model.get("patch_size")
  if c.get("stage") == "autoencoder" and size and patch:
    _check(size % patch == 0, f"{prefix}.data.image_size", size,
           f"must be a multiple of model.patch_size={patch}")


def validate_training(config: ml_collections.ConfigDict, prefix: str = "config") -> None:
  """Checks for a run that trains (main.py, not --dry_run); raises ValueError (one line).

  The autoencoder's loss.sp_weight > 0 needs a teacher (teacher.init_from or teacher.vfm):
  without one L_sp is silently 0 and the run is the lambda_sp = 0 ablation. Conversely a
  teacher.init_from with sp_weight = 0 would be loaded for nothing. (The demo's
  gae sub-config gets its teacher from the demo's stage 1, so it is not checked here.)
  """
  loss, teacher = config.get("loss"), config.get("teacher")
  if (config.get("stage") == "autoencoder" and isinstance(loss, ml_collections.ConfigDict)
      and loss.get("sp_weight", 0) > 0 and isinstance(teacher, ml_collections.ConfigDict)
      and not (teacher.get("init_from") or teacher.get("vfm"))):
    raise ValueError(f"{prefix}.loss.sp_weight={loss.sp_weight!r} needs a teacher: set "
                     f"{prefix}.teacher.init_from (a stage-1 teacher workdir or the authors' "
                     f"latest.pth), or {prefix}.loss.sp_weight=0 for the lambda_sp = 0 "
                     "ablation")
  refine = config.get("refine")
  if (config.get("stage") == "pae" and isinstance(loss, ml_collections.ConfigDict)
      and (loss.get("ssr_weight", 0) or loss.get("scr_weight", 0))
      and isinstance(refine, ml_collections.ConfigDict) and not refine.get("init_from")):
    raise ValueError(f"{prefix}.loss.ssr_weight={loss.ssr_weight!r} / scr_weight="
                     f"{loss.scr_weight!r} need PAE's stage-0 targets: set "
                     f"{prefix}.refine.init_from (a pae_refine workdir, e.g. ':refine=W'), "
                     "or set both weights to 0")
  if (config.get("stage") == "autoencoder" and isinstance(loss, ml_collections.ConfigDict)
      and loss.get("sp_weight", 0) == 0 and isinstance(teacher, ml_collections.ConfigDict)
      and teacher.get("init_from")):
    raise ValueError(f"{prefix}.teacher.init_from={teacher.init_from!r} would be unused: "
                     f"{prefix}.loss.sp_weight=0 (set it > 0 for L_sp, e.g. 1.0, or "
                     "':runlocal,teacher=PATH'; drop the teacher for the lambda_sp = 0 run)")


def mesh_config(data: int = -1, fsdp: int = 1, tensor: int = 1):
  """Mesh axes in order; -1 takes all remaining devices. Parallelism is config data.

  A tuple, so the command line can override it:
  `--config.mesh='(("data",1),("fsdp",-1),("tensor",1))'` (pure FSDP).
  """
  return (("data", data), ("fsdp", fsdp), ("tensor", tensor))


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
  # Consecutive non-finite updates (skipped on device, trainers/common.guard_update) after
  # which the run stops naming the last good checkpoint; 0: never stop.
  c.max_nonfinite_steps = 20
  c.compute_dtype = "bfloat16"   # "float32" forced on CPU unless compute_dtype_cpu is set
  c.param_dtype = "float32"
  # Frozen networks (LPIPS VGG, the VFM, the stage-1 teacher): None computes them in the
  # compute dtype with float32 weights; "bfloat16" / "float32" sets their compute dtype and
  # stores their weights in it (trainers/common.py frozen_dtype).
  c.frozen_dtype = ml_collections.FieldReference(None, field_type=str)
  c.donate = True                # donate the train state to the jitted step (in-place update)
  c.mesh = mesh_config()
  c.sharding_rules = [list(r) for r in DEFAULT_SHARDING_RULES]
  c.param_sharding = "logical"   # "logical" (axis rules) or "fsdp" (largest divisible dim)
  c.init_from = ml_collections.FieldReference(None, field_type=str)
  c.ema_decay = ml_collections.FieldReference(None, field_type=float)
  c.num_eval_images = 16
  return c


def autoencoder_config(arg: str | None, *, latent_dim: int) -> ml_collections.ConfigDict:
  """Stage 2 (GAE autoencoder), docs/method.md stage 2 + paper Tab. 13 / Sec. G.

  arg: 'runlocal' (tiny CPU smoke run on the embedded photos), 'variant=S|B|L',
  'sigma_std=0.1', 'kl' (KL-VAE of Tab. 7), 'source=embedded|folder|tfds', 'root=...',
  'teacher=PATH' (stage-1 teacher for L_sp: sets teacher.init_from). `runlocal` has no
  teacher, so it is the lambda_sp = 0 run unless 'teacher=PATH' is given (then lambda_sp = 1).
  """
  from gae_jax.data import pipeline  # late import: configs stay light to parse
  a = parse_arg(arg, variant="L", runlocal=False, sigma_std=0.2, kl=False,
                source="tfds", root="", latent_dim=latent_dim, teacher="",
                exclusive=[("runlocal", "variant"), ("runlocal", "source"),
                           ("runlocal", "root")])
  c = common_config("autoencoder")
  c.model = ml_collections.ConfigDict(dict(
      variant=a.variant, decoder_variant=a.variant, patch_size=16, latent_dim=a.latent_dim,
      sigma_std=a.sigma_std, kl=a.kl, qk_norm="rms", attention_impl=None,
      remat="none", scan=False,
      init="torch"))     # the released modules' init; "flax": earlier (layers.INITS)
  c.loss = ml_collections.ConfigDict(dict(
      l1_weight=1.0, lpips_weight=1.0, logvar_init=0.0,
      disc_weight=0.5, disc_start=5001, adaptive_disc_weight=False, disc_loss="hinge",
      disc_layers=3, disc_ndf=64,
      kl_weight=0.1 if a.kl else 0.0,          # paper Tab. 7 KL-VAE weight
      kl_reduction="mean",                     # released per-element mean (losses.kl_loss)
      sp_weight=1.0,                           # lambda_sp; active once a teacher is set
      sp_align="latent",                       # Tab. 1: latent (GAE) | pre | post
      # Before disc_start the GAN weight is 0 and the discriminator frozen: steps there
      # run a program without it (trainers/autoencoder.py Setup.step_fn).
      skip_disc_before_start=True))
  # PatchGAN compute dtype (None: float32); its params and AdamW state stay float32.
  c.disc_dtype = ml_collections.FieldReference(None, field_type=str)
  # L_sp's frozen side. init_from: a stage-1 teacher workdir / converted dir or the
  # authors' latest.pth (needed for 'latent'); vfm/vfm_weights/vfm_image_size: the VFM for
  # 'pre'/'post' (default: the teacher's own). Each VFM gets the images at its own size.
  c.teacher = ml_collections.ConfigDict(dict(
      init_from=ml_collections.FieldReference(None, field_type=str),
      vfm=ml_collections.FieldReference(None, field_type=str),
      vfm_weights=ml_collections.FieldReference(None, field_type=str),
      vfm_image_size=0,
      # True: the VFM (+ teacher) targets t(x), t(flip x) of the train split are written
      # once to cache_dir (None: <workdir>/sp_targets; data/sp_targets.py) and the step
      # reads them instead of running the VFM. Needs a fixed crop (data.crop='adm_center',
      # not the embedded source).
      cache_outputs=False,
      cache_dir=ml_collections.FieldReference(None, field_type=str)))
  if a.teacher:
    c.teacher.init_from = a.teacher
  # Paper Tab. 13: AdamW, 2e-4 -> 2e-5 cosine, warm-up 8000, betas (0.9, 0.98),
  # batch 1024, 250k iterations. Weight decay is not given for the AE: 0.05 as the teacher.
  c.optim = optimizer_config(2e-4, end_lr=2e-5, warmup_steps=8000, b1=0.9, b2=0.98,
                             weight_decay=0.05)
  # Discriminator lr (released): configs/ae/gae_d32.yaml has `learning_rate: 1e-5,
  # lr_g_factor: 20`. In the code the release builds on (CompVis latent-diffusion VQModel,
  # VA-VAE's vavae/ldm/models/autoencoder.py `configure_optimizers`: lr_d = learning_rate,
  # lr_g = lr_g_factor * learning_rate) that is generator 2e-4 (= Tab. 13) and
  # discriminator 1e-5; the GAE training code itself is not released. The decay keeps the
  # generator's 10x ratio (1e-5 -> 1e-6; VA-VAE puts one LambdaLR schedule on both
  # optimizers). Paper reading (Tab. 13 lists one lr): --config.disc_optim.lr=2e-4
  # --config.disc_optim.end_lr=2e-5. See docs/fidelity.md.
  c.disc_optim = optimizer_config(1e-5, end_lr=1e-6, warmup_steps=0, b1=0.9, b2=0.98,
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
    if not a.teacher:
      c.loss.sp_weight = 0.0        # no stage-1 teacher in the smoke run: lambda_sp = 0, said
    c.model.variant = c.model.decoder_variant = "mu"
    c.model.patch_size = 8
    c.data.source = "embedded"
    c.data.image_size = 64
    c.data.num_workers = 0
    c.batch_size = 8
    # Tuned for val PSNR within ~4 min on 2 CPU cores (64 px: ~23 dB at step 160; the
    # compute is LPIPS VGG16 + discriminator, the tiny ViT is nearly free). A high lr with a
    # short warm-up; LPIPS at 0.25 (at 1.0 it costs ~0.5 dB here); no GAN within the run
    # (from step 130 at weight 0.1 it cost ~0.6 dB): it starts at step 160 if trained longer.
    c.total_steps = 160
    c.optim.warmup_steps = 10
    c.optim.lr, c.optim.end_lr = 6e-3, 6e-4
    c.disc_optim.lr, c.disc_optim.end_lr = 1e-4, 1e-5
    c.loss.lpips_weight = 0.25
    c.loss.disc_start = 160
    c.loss.disc_weight = 0.1
    c.log_every = 20
    c.image_every = 80
    c.ckpt_every = 80
    c.num_eval_images = 32          # 32 fixed val crops (about 3 per photo) for val PSNR
    c.model.remat = "none"
  return c


# ------------------------------------------------------------------------------------------
# The tokenizer the later stages take (latent cache, DiT, sampling, evaluation).


def tokenizer_config(a: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config.tokenizer`: the one field naming a tokenizer of any family (GAE, PAE, KL).

  path: read by `gae_jax.pretrained.open_tokenizer` — a GAE / KL / PAE workdir, a
  converted directory, the authors' GAE `.ckpt` or PAE `.pt`. use_ema: a workdir's EMA
  params when it kept them. vfm_weights: a DINOv2 file for a PAE file without its frozen
  VFM (unused otherwise). `a`: parsed args with 'tokenizer' and/or 'gae', the old
  spelling of the same thing (accepted with a one-line deprecation notice).
  """
  path = a.get("tokenizer") or ""
  if a.get("gae"):
    if path:
      raise ValueError(f"config args 'tokenizer={path}' and 'gae={a.gae}' name the same "
                       "field: give only 'tokenizer='")
    logging.warning("config arg 'gae=%s' is deprecated: use 'tokenizer=%s'", a.gae, a.gae)
    path = a.gae
  return ml_collections.ConfigDict(dict(
      path=ml_collections.FieldReference(path or None, field_type=str), use_ema=True,
      vfm_weights=ml_collections.FieldReference(None, field_type=str)))


# ------------------------------------------------------------------------------------------
# Stage 3: latent cache, LightningDiT flow matching, sampling.


def cache_latents_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`stage = "cache_latents"`: encode a dataset with a tokenizer into a latent cache.

  arg: 'runlocal' (embedded photos, random crops, tiny shards), 'tokenizer=<path>' (any
  family, see `tokenizer_config`; 'gae=<path>' is its old spelling),
  'source=embedded|folder|tfds', 'root=...', 'split=train', 'shard_size=10000'.
  The cache is written to --workdir (point `config.data.cache_dir` of a flow run there).
  """
  from gae_jax.data import pipeline  # late import: configs stay light to parse
  a = parse_arg(arg, runlocal=False, tokenizer="", gae="", source="tfds", root="",
                split="train", shard_size=10_000,
                exclusive=[("runlocal", "source"), ("runlocal", "root"),
                           ("runlocal", "shard_size")])
  c = common_config("cache_latents")
  c.tokenizer = tokenizer_config(a)
  c.data = pipeline.default_data_config()
  c.data.source = a.source
  c.data.root = a.root
  c.data.image_size = 0          # 0: the tokenizer's image size
  c.data.random_flip = False     # flips are stored explicitly (latent_flip)
  c.data.num_workers = 0
  c.cache = ml_collections.ConfigDict(dict(
      split=a.split,
      shard_size=a.shard_size,     # examples per shard (per process)
      augment=False,               # False: ADM center crop (docs/method.md); True: the train crops
      dtype="float32",             # stored latent dtype: float32 | bfloat16
      stats_samples=10_000,        # latents for the per-channel mean / std
      stats_seed=0,
      max_examples=-1,             # > 0: only the first N source examples
      stop_after_shards=0,         # > 0: stop this run after N new shards (tests, time slicing)
  ))
  c.batch_size = 256             # global encode batch
  c.log_every = 10
  if a.runlocal:
    c.data.source = "embedded"
    c.data.embedded_length = 1024
    c.cache.augment = True         # distinct random-scale crops of the 11 photos
    c.cache.shard_size = 256
    c.batch_size = 16
  return c


# Sampling settings per (latent_dim, DiT epochs): shift, CFG scale, CFG interval start.
# d=32: paper App. G (800 ep: shift 0.4, w 3.3, interval 0.3; 80 ep: 0.4, 2.5, 0.25).
# d=64: the shift 0.5 is the paper's (App. G); its CFG scale / interval are OURS (the d=32
# values): the paper reports no guided d=64 result and gives no d=64 CFG settings.
SAMPLING_PRESETS = {
    (32, 80): dict(shift=0.4, cfg_scale=2.5, cfg_interval=0.25),
    (32, 800): dict(shift=0.4, cfg_scale=3.3, cfg_interval=0.3),
    (64, 80): dict(shift=0.5, cfg_scale=2.5, cfg_interval=0.25),     # CFG: ours
    (64, 800): dict(shift=0.5, cfg_scale=3.3, cfg_interval=0.3),     # CFG: ours
}
# The ablation protocol of paper App. H (VA-VAE's): Euler ODE, 250 steps, no CFG, shift 0.7,
# random labels; for the ablation tables (100-epoch AE, 80-epoch DiT without QK-norm).
ABLATION_SAMPLING = dict(mode="euler", shift=0.7, cfg_scale=1.0, cfg_interval=0.0,
                         labels="random")


def sampling_config(latent_dim: int, epochs: int, cfg: bool = False,
                    num_steps: int = 250, ablation: bool = False
                    ) -> ml_collections.ConfigDict:
  """Sampler settings (gae_jax/flow/generate.py reads mode, num_steps, shift, cfg_scale,
  cfg_interval, last_step).

  Default: the paper's main-result protocol (App. G): SDE without CFG; `cfg`: Euler ODE with
  CFG on the interval, both with the (latent_dim, epochs) shift of SAMPLING_PRESETS.
  last_step 'release': the released SDE last step (gae_jax/flow/samplers.py; 'grid' is
  ours). `ablation`: App. H's protocol (ABLATION_SAMPLING without the label mode, which the
  `sample` stage reads from sample.labels). Raises ValueError for ablation with cfg.
  """
  if ablation and cfg:
    raise ValueError("config args 'ablation' and 'cfg' exclude each other: the ablation "
                     "protocol (paper App. H) samples without CFG")
  p = SAMPLING_PRESETS.get((latent_dim, epochs), SAMPLING_PRESETS[(32, 800)])
  if ablation:
    a = ABLATION_SAMPLING
    return ml_collections.ConfigDict(dict(
        mode=a["mode"], num_steps=num_steps, shift=a["shift"], cfg_scale=a["cfg_scale"],
        cfg_interval=a["cfg_interval"], last_step="release"))
  return ml_collections.ConfigDict(dict(
      mode="euler" if cfg else "sde", num_steps=num_steps, shift=p["shift"],
      cfg_scale=p["cfg_scale"] if cfg else 1.0, cfg_interval=p["cfg_interval"] if cfg else 0.0,
      last_step="release"))


def dit_config(arg: str | None, *, latent_dim: int, epochs: int) -> ml_collections.ConfigDict:
  """Stage 3 (LightningDiT-XL/1 flow matching on cached GAE latents), docs/method.md stage 3.

  arg: 'runlocal' (tiny "mu" DiT on the embedded-photo cache), 'variant=XL/1',
  'cache=<dir>', 'tokenizer=<path>' (decoder for sample grids; default: the cache's
  tokenizer; 'gae=<path>' is the old spelling),
  'sample' (the `sample` stage for this run: see `sample_config`), 'cfg' (with sample:
  ODE + CFG with the paper's scale / interval), 'ablation' (with sample: the paper's
  App. H ablation protocol: Euler ODE, no CFG, shift 0.7, random labels),
  'ckpt=<flow workdir or .pt>' (with sample).
  """
  a = parse_arg(arg, runlocal=False, variant="XL/1", cache="", tokenizer="", gae="",
                sample=False,
                cfg=False, ablation=False, ckpt="", num_samples=50_000,
                latent_dim=latent_dim, exclusive=[("runlocal", "variant")])
  if a.ablation and not a.sample:
    raise ValueError(f"config arg 'ablation' selects a sampling protocol: use it with "
                     f"'sample' ({arg!r})")
  if a.sample:
    return sample_config(a, latent_dim=a.latent_dim, epochs=epochs)
  c = common_config("flow")
  variant, _, patch = a.variant.partition("/")
  c.model = ml_collections.ConfigDict(dict(
      variant=variant, patch_size=int(patch or 1), latent_size=16, latent_dim=a.latent_dim,
      num_classes=1000, class_dropout_prob=0.1, qk_norm=epochs >= 800, use_rope=True,
      use_abs_pos=True, attention_impl=None, remat="none", scan=False))
  c.data = ml_collections.ConfigDict(dict(cache_dir=a.cache, flip=True, read_threads=8))
  c.tokenizer = tokenizer_config(a)
  c.flow = ml_collections.ConfigDict(dict(train_shift=0.7, t_mu=0.0, t_sigma=1.0))
  # AdamW, constant 2e-4, betas (0.9, 0.95), no weight decay, no clipping (released).
  c.optim = optimizer_config(2e-4, schedule="constant", b1=0.9, b2=0.95, weight_decay=0.0)
  c.ema_decay = 0.9999
  c.total_steps = 100_000 if epochs < 800 else 1_000_000
  c.batch_size = 1024
  c.log_every = 100
  c.ckpt_every = 20_000 if epochs < 800 else 50_000
  c.image_every = 20_000
  c.num_eval_images = 32
  # Sample grids during training: short, cheap, from the EMA params with fixed noise.
  c.sample_grid = sampling_config(a.latent_dim, epochs)
  c.sample_grid.num_steps = 50
  if a.variant.startswith("XL"):
    c.model.remat = "none"
  if a.runlocal:
    c.model.variant = "mu"
    c.model.latent_size = 8          # 64px runlocal GAE, patch 8
    c.model.num_classes = 11         # the embedded photos
    c.data.read_threads = 2
    c.total_steps = 400
    c.batch_size = 16
    c.optim.lr = 1e-3
    c.ema_decay = 0.99               # the 0.9999 EMA would stay near the zero-output init
    c.log_every = 50
    c.ckpt_every = 200
    c.image_every = 200
    c.num_eval_images = 16
    c.sample_grid.num_steps = 50
  return c


def sample_config(a: ml_collections.ConfigDict, *, latent_dim: int, epochs: int
                  ) -> ml_collections.ConfigDict:
  """`stage = "sample"`: N samples -> .npz (uint8 NHWC, `arr_0`) + PNG grid.

  a: parsed args with ckpt, tokenizer (and/or its old spelling gae), cfg, num_samples,
  runlocal and optionally ablation.
  Fields: dit.init_from (flow workdir or the authors' .pt), dit.stats (default: beside the
  checkpoint / the run's cache), tokenizer.path (the decoder, any family; default: the
  flow run's cache's tokenizer),
  sample.* (`sampling_config`: SDE without CFG, with 'cfg' Euler ODE + CFG on the paper's
  interval, with 'ablation' App. H's protocol), sample.labels ('uniform': exactly
  num_samples / num_classes per class, the paper's main protocol and the released
  inference_sample.py; 'random': uniform random labels, the ablation protocol).
  """
  c = common_config("sample")
  c.dit = ml_collections.ConfigDict(dict(
      init_from=ml_collections.FieldReference(a.ckpt or None, field_type=str),
      stats=ml_collections.FieldReference(None, field_type=str),
      use_ema=True, num_heads=ml_collections.FieldReference(None, field_type=int)))
  c.tokenizer = tokenizer_config(a)
  ablation = bool(a.get("ablation", False))
  c.sample = sampling_config(latent_dim, epochs, cfg=a.cfg, ablation=ablation)
  c.sample.labels = ABLATION_SAMPLING["labels"] if ablation else "uniform"
  c.sample.num_samples = a.num_samples
  c.sample.num_classes = 1000
  c.sample.seed = 0
  c.sample.grid_images = 64        # first images of each class block in the PNG grid
  c.sample.output = "samples"      # <workdir>/<output>.npz and <output>.png
  c.batch_size = 256               # global batch per jitted call
  if a.runlocal:
    c.sample.num_samples = 44
    c.sample.num_classes = 11
    c.sample.num_steps = 50
    c.batch_size = 16
    c.sample.grid_images = 44
  return c


# ------------------------------------------------------------------------------------------
# Evaluation (`stage = "eval"`, gae_jax/trainers/evaluate.py).


def eval_config(arg: str | None, *, kind: str) -> ml_collections.ConfigDict:
  """`stage = "eval"`: metrics.json + PNGs + report.md for `kind` (comma-separated).

  arg: 'runlocal' (embedded photos, small counts, CPU minutes), 'tokenizer=<path>|random'
  (any family, see `tokenizer_config`; 'gae=' is its old spelling),
  'source=embedded|folder|tfds', 'root=...', 'kind=a,b' is not parsed (commas split args):
  override with --config.eval.kind=... instead. 'samples=<npz|sample dir|data:val>',
  'reference=<VIRTUAL_imagenet256_labeled.npz or stats npz>' (generation),
  'inception=<pytorch-fid .pth>' (enables IS), 'num_images=N', 'dit=<flow run or .pt>',
  'ablation' (with dit: sample with the paper's App. H ablation protocol, see
  `sampling_config`; default: the main protocol, SDE without CFG, class-uniform labels).
  """
  from gae_jax.data import pipeline  # late import: configs stay light to parse
  a = parse_arg(arg, runlocal=False, tokenizer="", gae="", source="tfds", root="",
                samples="", reference="", inception="", num_images=-1, dit="",
                ablation=False, exclusive=[("runlocal", "source"), ("runlocal", "root")])
  c = common_config("eval")
  c.tokenizer = tokenizer_config(a)
  c.data = pipeline.default_data_config()
  c.data.source = a.source
  c.data.root = a.root
  c.data.image_size = 0          # 0: the tokenizer's image size (256 for generation without one)
  c.data.random_flip = False
  c.data.num_workers = 0
  c.batch_size = 256             # global evaluation batch
  c.eval = ml_collections.ConfigDict(dict(
      kind=kind,
      split="val",
      num_images=a.num_images,   # -1: the whole split
      seed=0,
      inception_path=ml_collections.FieldReference(a.inception or None, field_type=str),
      resize_mode="tf1",         # ADM evaluator's TF1 bilinear resize ("torch": pytorch-fid)
      lpips=True,
      rfid=True,
      robustness=dict(scales=[0.0, 0.1, 0.2, 0.3, 0.4, 0.5]),
      generation=dict(
          samples=a.samples, reference=a.reference, reference_split="train",
          reference_num_images=-1, num_samples=-1, precision_recall=True, k=3,
          is_splits=10, dit=a.dit, dit_stats="", cfg=False, ablation=a.ablation,
          latent_dim=32, epochs=800, num_classes=0),
      probe=dict(
          heads=["flatten", "GAP"], epochs=100, batch_size=2048, lr=0.008,
          train_split="train", val_split="val", num_train=-1, num_val=-1,
          train_cache="", val_cache="", num_classes=0),
      diagnostics=dict(
          num_images=1000, max_distance=0, gain_scales=[0.01, 0.05, 0.1], gain_images=64,
          interp_steps=8, interp_pairs=8, interp_mode="slerp", knn_k=20,
          knn_temperature=0.07, knn_train_images=10_000),
      # PAE's SSC / LPC / GSQ / eRank (evaluation/manifold.py; [I] = our choice, the paper
      # gives none). num_images: val latents for GSQ and eRank (-1: the split; [I] GSQ on all
      # of ImageNet val, 100 classes x 5 draws). SSC on the first ssc_images, segmented by
      # "slic" / "felzenszwalb" superpixels, or "labels": PNG maps in label_maps matched by
      # file name to label_images (COCO panoptic in the paper). ssc_clusters 0: k = the
      # number of segments. LPC on the first lpc_images (0: off).
      manifold=dict(
          num_images=-1, ssc_images=500, segmentation="slic", label_images="", label_maps="",
          ssc_sigma=0.1, ssc_clusters=0, slic_segments=16, slic_compactness=10.0,
          fz_scale=100.0, fz_sigma=0.8, fz_min_size=50, lpc_images=1000,
          lpc_rhos=[0.1, 0.5, 1.0, 2.0], gsq_classes=100, gsq_draws=5, erank_center=False),
  ))
  if a.runlocal:
    c.data.source = "embedded"
    c.data.embedded_length = 352         # train: seeded random-scale crops of the 11 photos
    c.batch_size = 16
    c.eval.num_images = a.num_images if a.num_images > 0 else 64
    c.eval.robustness.scales = [0.0, 0.1, 0.3, 0.5]
    c.eval.generation.samples = a.samples or "data:val"
    c.eval.generation.reference_num_images = 176
    c.eval.generation.num_samples = 176
    c.eval.probe.epochs = 30
    c.eval.probe.batch_size = 32
    c.eval.probe.num_train = 352
    c.eval.diagnostics.num_images = 176
    c.eval.diagnostics.gain_images = 16
    c.eval.diagnostics.interp_pairs = 4
    c.eval.diagnostics.knn_train_images = 352
    c.eval.manifold.num_images = 176
    c.eval.manifold.ssc_images = 32
    c.eval.manifold.slic_segments = 8
    c.eval.manifold.lpc_images = 16
  return c


# ------------------------------------------------------------------------------------------
# Stage 1: the semantic teacher (gae_jax/trainers/teacher.py).

IMAGENET_TRAIN_IMAGES = 1_281_167


def teacher_config(arg: str | None, *, latent_dim: int) -> ml_collections.ConfigDict:
  """Stage 1 (semantic teacher E_sp + decoder D_sp on frozen DINOv2-L), docs/method.md stage 1.

  Released optimisation (default): AdamW 1e-4, betas (0.9, 0.98), wd 0.05 (none on
  vectors), cosine to 0.1 x lr after a 5% linear warm-up, 100 epochs at global batch 1024.
  arg: 'runlocal' (VGG16 relu5_3 features of the embedded photos at 128 px = 8x8 grid, the
  grid of the runlocal GAE; CPU minutes), 'paper' (Tab. 13: 10k iterations, batch 2048,
  2e-4 -> 2e-5, warm-up 500, decoder L=4, window 4), 'window=4' (Alg. 1 patch conv; 1 as
  released, 4 reproduces Tab. 13's parameter counts), 'decoder_depth=4', 'downsampler=svd|
  attn|attn_linear|attn_patchconv', 'vfm=dinov2|vgg16_relu5_3', 'weights=<DINOv2 file>',
  'svd_images=64000', 'source=embedded|folder|tfds', 'root=...'.
  """
  from gae_jax.data import pipeline  # late import: configs stay light to parse
  a = parse_arg(arg, runlocal=False, paper=False, window=0, decoder_depth=0,
                downsampler="attn_patchconv", vfm="dinov2", weights="", svd_images=64_000,
                source="tfds", root="", latent_dim=latent_dim,
                exclusive=[("runlocal", "vfm"), ("runlocal", "svd_images"),
                           ("runlocal", "source"), ("runlocal", "root")])
  c = common_config("teacher")
  vfm = "vgg16_relu5_3" if a.runlocal else a.vfm
  c.teacher = ml_collections.ConfigDict(dict(
      vfm=vfm,
      vfm_weights=ml_collections.FieldReference(a.weights or None, field_type=str),
      vfm_variant="L",             # checked against the weights; sizes the --dry_run plan
      vfm_image_size=224 if vfm == "dinov2" else 256,
      latent_dim=a.latent_dim,
      downsampler=a.downsampler,
      window=a.window or (4 if a.paper else 1),
      num_heads=ml_collections.FieldReference(None, field_type=int),      # C // 64
      decoder_depth=a.decoder_depth or (4 if a.paper else 1),
      decoder_num_heads=ml_collections.FieldReference(None, field_type=int),
      decoder_mlp_hidden=ml_collections.FieldReference(None, field_type=int),
      qk_norm="rms",
      attention_impl=ml_collections.FieldReference(None, field_type=str),
      remat="none",
      loss="mse",                  # released MSE of RMS-normalised vectors; 'cos' = paper
      svd_images=a.svd_images,     # downsampler='svd': images the projection is fitted on
      svd_center=True,
  ))
  c.optim = optimizer_config(1e-4, end_lr=1e-5, b1=0.9, b2=0.98, weight_decay=0.05)
  c.optim.warmup_fraction = 0.05  # released: 5% of the steps (overrides warmup_steps)
  c.batch_size = 1024             # released: 128 per GPU (8 GPUs assumed)
  c.total_steps = 100 * IMAGENET_TRAIN_IMAGES // c.batch_size
  if a.paper:                     # Tab. 13
    c.batch_size = 2048
    c.total_steps = 10_000
    c.optim.lr, c.optim.end_lr = 2e-4, 2e-5
    c.optim.warmup_fraction = 0.0
    c.optim.warmup_steps = 500
  c.log_every = 100
  c.eval_every = 2000
  c.ckpt_every = 5000
  c.image_every = 0                # unused: no image grids in stage 1
  c.num_eval_images = 64
  c.data = pipeline.default_data_config()
  c.data.source = a.source
  c.data.root = a.root
  c.data.image_size = c.teacher.vfm_image_size
  c.data.random_flip = False       # docs/method.md: resize + center crop, no flip
  c.data.num_workers = 8
  if a.runlocal:
    c.teacher.vfm_image_size = c.data.image_size = 128
    c.data.source = "embedded"
    c.data.num_workers = 0
    c.batch_size = 8
    c.total_steps = 150
    c.optim.lr, c.optim.end_lr = 1e-3, 1e-4
    c.teacher.svd_images = 256
    c.log_every = 10
    c.eval_every = 50
    c.ckpt_every = 50
    c.num_eval_images = 8
  return c


# ------------------------------------------------------------------------------------------
# PAE (arXiv 2605.07915; shared/PAE_SPEC.md): stage 0 `pae_refine` (trainers/pae_refine.py)
# and stage 1 `pae` (trainers/pae.py). Both share the frozen VFM block.


def pae_vfm_config(runlocal: bool = False, weights: str = "") -> ml_collections.ConfigDict:
  """The frozen VFM of PAE: DINOv2-with-registers ViT-L/14 at 224, final LN without affine.

  weights: a user's DINOv2 file (torch hub / Hugging Face layouts, `convert.dinov2`); its
  sizes come from the file. Without weights the VFM is a seeded *random-weight* DINOv2 of
  the sizes below -- a stand-in that exercises the machinery (no DINOv2 weights exist
  offline and nothing is downloaded), not PAE's semantics. `:runlocal` uses a tiny one:
  width 64, depth 2, patch 7 at 56 px (an 8 x 8 grid, the 64 px runlocal latent grid).
  """
  v = ml_collections.ConfigDict(dict(
      name="dinov2",
      weights=ml_collections.FieldReference(weights or None, field_type=str),
      variant=ml_collections.FieldReference("L", field_type=str),
      width=ml_collections.FieldReference(None, field_type=int),
      depth=ml_collections.FieldReference(None, field_type=int),
      num_heads=ml_collections.FieldReference(None, field_type=int),
      num_registers=4,            # released: dinov2-with-registers (CLS + 4 dropped)
      patch_size=14,
      pos_grid=37,
      image_size=224,             # encoder_input_size; the 256 image is resized to it
      final_norm_affine=False,    # released: the final LayerNorm's weight / bias removed
      seed=0,                     # the random stand-in's init seed (no weights)
      attention_impl=ml_collections.FieldReference(None, field_type=str)))
  if runlocal:
    v.variant = None
    v.width, v.depth, v.num_heads = 64, 2, 2
    v.patch_size, v.pos_grid, v.image_size = 7, 8, 56
  return v


def pae_refine_config(arg: str | None, *, latent_dim: int = 32) -> ml_collections.ConfigDict:
  """Stage 0 of PAE: VFM prior refinement (P_t, Q_t; PAE_SPEC §3.4), `stage = "pae_refine"`.

  arg: 'runlocal' (random tiny VFM on the embedded photos, CPU minutes), 'weights=<DINOv2
  file>', 'source=embedded|folder|tfds', 'root=...', 'latent_dim=32'. Everything but the
  objective's form and Q_t's depth/width is [I] (spec §8): P_t has the compressor's form,
  lambda_rep = lambda_gram = 1, cosine Grams, and H_ref is a Gaussian low-pass of the VFM
  grid (sigma 1 token, blended at strength 0.4) in place of AnyUp (not available).
  """
  from gae_jax.data import pipeline  # late import: configs stay light to parse
  a = parse_arg(arg, runlocal=False, weights="", source="tfds", root="",
                latent_dim=latent_dim, exclusive=[("runlocal", "source"), ("runlocal", "root")])
  c = common_config("pae_refine")
  c.vfm = pae_vfm_config(a.runlocal, a.weights)
  c.refine = ml_collections.ConfigDict(dict(
      latent_dim=a.latent_dim,
      proj_num_heads=ml_collections.FieldReference(None, field_type=int),  # the VFM's
      width=1024, depth=4,        # Q_t: "a 4-layer ViT, hidden 1024" (paper)
      num_heads=ml_collections.FieldReference(None, field_type=int),       # width // 64
      mlp_hidden=ml_collections.FieldReference(None, field_type=int),      # SwiGLU default
      rep_weight=1.0,             # lambda_rep  [I]: not given
      gram_weight=1.0,            # lambda_gram [I]: not given
      gram_normalize="cosine",    # [I] as SSR: cosine Grams, mean over entries
      gram_reduction="mean",
      lowpass_sigma=1.0,          # [I] AnyUp fallback: Gaussian std in tokens
      lowpass_strength=0.4))      # the paper's "strength 0.4", read as a blend weight [I]
  # [I] not given: the teacher recipe of GAE's stage 1 (AdamW 1e-4 -> 1e-5 cosine, 5%
  # warm-up, wd 0.05, betas (0.9, 0.98)), 20 epochs of ImageNet at batch 1024.
  c.optim = optimizer_config(1e-4, end_lr=1e-5, b1=0.9, b2=0.98, weight_decay=0.05)
  c.batch_size = 1024
  c.total_steps = 20 * IMAGENET_TRAIN_IMAGES // c.batch_size
  c.optim.warmup_steps = c.total_steps // 20
  c.log_every = 100
  c.eval_every = 2000
  c.ckpt_every = 5000
  c.image_every = 0
  c.num_eval_images = 64
  c.data = pipeline.default_data_config()
  c.data.source = a.source
  c.data.root = a.root
  c.data.image_size = 256
  c.data.random_flip = False
  c.data.num_workers = 8
  if a.runlocal:
    c.data.source = "embedded"
    c.data.image_size = 64
    c.data.num_workers = 0
    c.refine.width, c.refine.depth = 64, 2
    c.batch_size = 8
    c.total_steps = 200
    c.optim.lr, c.optim.end_lr, c.optim.warmup_steps = 2e-3, 2e-4, 10
    c.log_every = 20
    c.eval_every = 100
    c.ckpt_every = 100
    c.num_eval_images = 8
  return c


def pae_config(arg: str | None, *, latent_dim: int = 32) -> ml_collections.ConfigDict:
  """Stage 1 of PAE: the tokenizer (PAE_SPEC §3), `stage = "pae"`.

  arg: 'runlocal' (tiny 'mu' PAE on the embedded photos with a random tiny VFM; CPU
  minutes), 'refine=<pae_refine workdir>' (the stage-0 targets: turns SSR and SCR on;
  without it `runlocal` runs with SSR = SCR = 0 and says so), 'weights=<DINOv2 file>',
  'variant=L|B|XL' (decoder size), 'source=embedded|folder|tfds', 'root=...'.
  Loss weights are the paper's (lambda_lpips 1, lambda_gan 0.5, lambda_ssr 0.2,
  lambda_mcr 0.5, lambda_scr 1). Each [I] default of the spec is a switch under loss.ssr /
  loss.mcr / loss.scr; optimiser, schedule, GAN start, EMA are not in any source (spec §3.5):
  GAE stage 2's AdamW recipe for 25 epochs (the paper's ablation budget), no EMA.
  """
  from gae_jax.data import pipeline  # late import: configs stay light to parse
  a = parse_arg(arg, runlocal=False, refine="", weights="", variant="L", source="tfds",
                root="", latent_dim=latent_dim,
                exclusive=[("runlocal", "variant"), ("runlocal", "source"),
                           ("runlocal", "root")])
  c = common_config("pae")
  c.vfm = pae_vfm_config(a.runlocal, a.weights)
  c.model = ml_collections.ConfigDict(dict(variant=a.variant, latent_dim=a.latent_dim))
  c.refine = ml_collections.ConfigDict(dict(
      init_from=ml_collections.FieldReference(a.refine or None, field_type=str),
      init_compressor=True))     # [I] start the compressor from P_t (spec §3.4 hook names)
  c.loss = ml_collections.ConfigDict(dict(
      l1_weight=1.0, lpips_weight=1.0,
      disc_weight=0.5,           # lambda_gan, fixed (no adaptive weight)
      disc_start=5001,           # [I] not given: GAE's delayed start
      disc_loss="hinge", disc_layers=3, disc_ndf=64,
      sigma_std=0.0,             # [I] sigma-noise on z before decoding: off (spec §3.5)
      ssr_weight=0.2, mcr_weight=0.5, scr_weight=1.0,
      ssr=dict(target="z_t",     # [I] 'z_t' (Z_T) | 'h_ref' (structural target)
               normalize="cosine",   # [I] cosine Grams | 'none'
               reduction="mean"),    # [I] mean over N^2 entries | 'sum' (Frobenius^2)
      mcr=dict(angles=(42.5, 85.0),  # medium, large (paper Tab. 7); () or one angle: ablations
               mode="rotate",        # [I] geodesic per token | 'additive' (z + tan(t)|z|u)
               renormalize=False,    # [I] additive only: back onto the sphere
               chain="cascade",      # paper: large -> medium -> recon | 'anchor' (ours)
               encoder_grad=True,    # [I] gradients reach the encoder through z_m, z_l
               lpips=True),          # paper: L1 + LPIPS per term; False: L1 only (runlocal)
      scr=dict(pooling="mean",       # [I] 'mean' (GAP) | 'max'
               global_weight=1.0, patch_weight=1.0)))  # Tab. 3(c) ablations
  # [I] GAE stage 2's recipe (Tab. 13): AdamW 2e-4 -> 2e-5 cosine, betas (0.9, 0.98),
  # wd 0.05; discriminator 1e-5 -> 1e-6 (GAE release). 25 epochs at batch 1024.
  c.optim = optimizer_config(2e-4, end_lr=2e-5, warmup_steps=1000, b1=0.9, b2=0.98,
                             weight_decay=0.05)
  c.disc_optim = optimizer_config(1e-5, end_lr=1e-6, b1=0.9, b2=0.98, weight_decay=0.0)
  c.batch_size = 1024
  c.total_steps = 25 * IMAGENET_TRAIN_IMAGES // c.batch_size
  c.log_every = 100
  c.image_every = 5000
  c.ckpt_every = 5000
  c.data = pipeline.default_data_config()
  c.data.source = a.source
  c.data.root = a.root
  c.data.image_size = 256
  c.data.num_workers = 8
  if a.runlocal:
    if not a.refine:
      c.loss.ssr_weight = c.loss.scr_weight = 0.0   # no stage-0 targets: said at start
    c.model.variant = "mu"
    c.data.source = "embedded"
    c.data.image_size = 64
    c.data.num_workers = 0
    c.batch_size = 8
    c.total_steps = 160
    # Tuned (P9) like the GAE runlocal: at the paper's weights this tiny run stalls at
    # ~13 dB. MCR at 0.5 (even L1 only) is what stops it learning (60 steps: 10.5 dB with
    # vs 17.6 dB without); at 0.05 it costs nothing (18.0 dB). Its two extra decodes keep
    # L1 only: their LPIPS passes tripled the step's FLOPs (2.2e11 vs 7.3e10). GAE's lr
    # 6e-3 and LPIPS 0.25. Every term stays on; the full config keeps the paper's weights.
    c.optim.warmup_steps = 10
    c.optim.lr, c.optim.end_lr = 6e-3, 6e-4
    c.disc_optim.lr, c.disc_optim.end_lr = 1e-4, 1e-5
    c.loss.lpips_weight = 0.25
    c.loss.mcr_weight = 0.05
    c.loss.mcr.lpips = False
    c.loss.disc_start = 160        # no GAN within the run (as the GAE runlocal)
    c.log_every = 20
    c.image_every = 80
    c.ckpt_every = 80
    c.num_eval_images = 32
  return c
