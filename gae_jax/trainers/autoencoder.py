"""Stage 2: train the GAE autoencoder (L1 + LPIPS + GAN [+ L_sp] with a learned logvar).

One jitted, sharded step updates the generator (encoder, projector, decoder, logvar) and
the PatchGAN discriminator (switched on at `config.loss.disc_start`). Frozen networks
(LPIPS VGG16; the semantic teacher once stage 1 exists) are passed in as a separate,
non-donated argument and never enter the optimizer or the checkpoint.
"""

import dataclasses
import functools
from typing import Any

from absl import logging
from flax import struct
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gae_jax import losses
from gae_jax import sharding as sharding_lib
from gae_jax.data import pipeline
from gae_jax.models import discriminator as disc_lib
from gae_jax.models import gae as gae_lib
from gae_jax.models import vgg
from gae_jax.trainers import common


def build_models(config):
  dtype = common.compute_dtype(config)
  param_dtype = jnp.dtype(config.param_dtype)
  model = gae_lib.make_gae(config.model, dtype=dtype, param_dtype=param_dtype)
  disc = disc_lib.NLayerDiscriminator(n_layers=config.loss.disc_layers,
                                      ndf=config.loss.disc_ndf, dtype=disc_dtype(config),
                                      param_dtype=param_dtype)
  lpips = vgg.LPIPS(dtype=common.frozen_dtype(config))
  return model, disc, lpips


def disc_dtype(config) -> jnp.dtype:
  """Compute dtype of the PatchGAN: `config.disc_dtype` ("bfloat16" / "float32"), float32
  when it is None or absent. The discriminator is trained, so its parameters and optimizer
  state stay in `config.param_dtype` (float32) whatever this says; BatchNorm statistics are
  reduced in float32 (flax's default)."""
  name = config.get("disc_dtype")
  if not name:
    return jnp.dtype(jnp.float32)
  if name not in ("bfloat16", "float16", "float32"):
    raise ValueError(f"config.disc_dtype={name!r}; choose from bfloat16, float16, float32 "
                     "(or None: float32)")
  return jnp.dtype(name)


def _init_fn(config, model, disc, rng):
  """Boxed initial TrainState (abstractly evaluable: nothing is allocated under eval_shape)."""
  size = config.data.image_size
  x = jnp.zeros((1, size, size, 3), jnp.float32)
  k_g, k_d, k_state = jax.random.split(rng, 3)
  gae_params = model.init({"params": k_g, "noise": k_g}, x, train=True)["params"]
  disc_vars = disc.init(k_d, x, train=False)
  params = {"generator": {"gae": gae_params,
                          "logvar": jnp.full((), config.loss.logvar_init, jnp.float32)},
            "discriminator": disc_vars["params"]}
  tx = make_optimizers(config)
  # Boxed params in, boxed moments out: mu / nu carry their parameter's logical axes and
  # so get exactly its sharding (sharding.tree_shardings).
  opt_state = {k: tx[k].init(params[k]) for k in tx}
  proj = sp_proj_shape(config, model)
  if proj is not None:  # pre / post alignment: the learned map onto the VFM width
    params["generator"]["sp_proj"] = {"kernel": nn.with_logical_partitioning(
        nn.initializers.xavier_uniform(), (None, "embed"))(
            jax.random.fold_in(k_g, 1), proj, jnp.dtype(config.param_dtype))}
  ema = params["generator"] if config.get("ema_decay") else None
  return common.TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
      rng=jax.random.key_data(k_state), ema_params=ema,
      model_state={"discriminator": disc_vars.get("batch_stats", {})})


def make_optimizers(config) -> dict:
  return {"generator": common.make_optimizer(config.optim, config.total_steps),
          "discriminator": common.make_optimizer(config.disc_optim, config.total_steps)}


SP_ALIGNS = ("latent", "pre", "post")


@dataclasses.dataclass(frozen=True, eq=False)
class SemanticSpec:
  """Static side of L_sp: the alignment, the frozen VFM backend and (latent) the teacher.

  fields: the teacher's description (`loading.teacher_fields`), None without a teacher.
  """
  align: str
  backend: Any
  teacher: Any
  fields: Any


@struct.dataclass
class FrozenSemantic:
  """`frozen["teacher"]`: VFM + teacher variables (arrays) and their static spec."""
  vfm: Any
  teacher: Any
  spec: SemanticSpec = struct.field(pytree_node=False)


@functools.lru_cache(maxsize=8)
def _semantic_spec(align, init_from, vfm, vfm_weights, vfm_image_size, dtype_name):
  from gae_jax import loading  # pylint: disable=g-import-not-at-top
  from gae_jax.convert import teacher as convert_teacher  # pylint: disable=g-import-not-at-top
  from gae_jax.models import vfm as vfm_lib  # pylint: disable=g-import-not-at-top
  dtype = jnp.dtype(dtype_name)
  if init_from:
    fields = loading.teacher_fields(init_from)
    if vfm and vfm != fields["vfm"]:
      raise ValueError(f"config.teacher.vfm={vfm!r} but the teacher {init_from} was trained "
                       f"on {fields['vfm']!r}")
    if vfm_image_size and vfm_image_size != fields["vfm_image_size"]:
      raise ValueError(f"config.teacher.vfm_image_size={vfm_image_size} but the teacher "
                       f"{init_from} was trained at {fields['vfm_image_size']}")
    backend = loading.teacher_backend(fields, dtype)
    teacher = convert_teacher.build_teacher(fields, dtype) if align == "latent" else None
    return SemanticSpec(align, backend, teacher, fields)
  if vfm == "vgg16_relu5_3":
    backend = vfm_lib.vgg16_relu5_3(vfm_image_size or 256, dtype=dtype)
  elif vfm == "dinov2":
    if not vfm_weights:
      raise ValueError("config.teacher.vfm='dinov2' needs config.teacher.vfm_weights")
    info = convert_teacher.dinov2_info(vfm_weights)
    backend = vfm_lib.dinov2(info, vfm_image_size or 224, dtype=dtype)
  else:
    raise ValueError(f"config.teacher.vfm={vfm!r}; choose from {vfm_lib.VFM_NAMES}")
  return SemanticSpec(align, backend, None, None)


def semantic_spec(config):
  """The static L_sp spec, or None when no teacher / VFM is configured (L_sp = 0).

  'latent' needs `config.teacher.init_from` (a teacher workdir or the authors' latest.pth);
  'pre' / 'post' need a VFM: `config.teacher.vfm` (+ vfm_weights) or a teacher's own.
  The VFM grid (and for 'latent' the teacher's latent width) must match the GAE latents.
  """
  align = config.loss.get("sp_align", "latent")
  if align not in SP_ALIGNS:
    raise ValueError(f"config.loss.sp_align={align!r}; choose from {SP_ALIGNS}")
  t = config.get("teacher") or ml_collections.ConfigDict()
  init_from, vfm = t.get("init_from"), t.get("vfm")
  if not init_from and not vfm:
    if align != "latent":
      raise ValueError(f"config.loss.sp_align={align!r} needs a VFM: set config.teacher.vfm "
                       "(+ vfm_weights) or config.teacher.init_from")
    return None
  if align == "latent" and not init_from:
    raise ValueError("config.loss.sp_align='latent' needs config.teacher.init_from (a stage-1 "
                     "teacher workdir or the authors' latest.pth)")
  spec = _semantic_spec(align, init_from, vfm, t.get("vfm_weights"),
                        int(t.get("vfm_image_size") or 0), str(common.frozen_dtype(config)))
  grid = config.data.image_size // config.model.patch_size
  if spec.backend.grid != grid:
    raise ValueError(f"L_sp: the VFM {spec.backend.name} gives a {spec.backend.grid}x"
                     f"{spec.backend.grid} grid, the GAE latents are {grid}x{grid} "
                     f"(data.image_size {config.data.image_size} / patch "
                     f"{config.model.patch_size}); the grids must be equal")
  if align == "latent" and spec.fields["latent_dim"] != config.model.latent_dim:
    raise ValueError(f"L_sp: teacher {init_from} has latent_dim {spec.fields['latent_dim']}, "
                     f"config.model.latent_dim is {config.model.latent_dim}")
  return spec


def sp_proj_shape(config, model):
  """(in, out) of the learned linear map for 'pre' (encoder width -> VFM width, identity
  and None when equal, as for ViT-L vs DINOv2-L) and 'post' (d -> VFM width)."""
  spec = semantic_spec(config)
  if spec is None or spec.align == "latent":
    return None
  c = spec.backend.channels
  if spec.align == "pre":
    return None if model.width == c else (model.width, c)
  return (model.latent_dim, c)


def sp_target(sem: FrozenSemantic, images: jax.Array) -> jax.Array:
  """The L_sp target of images (B, S, S, 3) in [-1, 1]: E_sp(f_vfm(x)) (B, h, w, d) for
  'latent', the RMS-normalised VFM grid f_vfm(x) (B, h, w, C) for 'pre' / 'post'."""
  from gae_jax import loading  # pylint: disable=g-import-not-at-top
  spec = sem.spec
  feats = spec.backend.features(sem.vfm, loading.resize_for_vfm(spec.backend, images))
  if spec.align == "latent":
    return spec.teacher.apply(sem.teacher, feats, method="latents")
  return feats


def semantic_loss(aux: dict, images: jax.Array, frozen: dict, config,
                  sp_proj=None, target: jax.Array | None = None) -> jax.Array:
  """L_sp on the same batch; 0 while no teacher / VFM is configured.

  target: the batch's cached `sp_target(x)` (`config.teacher.cache_outputs`,
  data/sp_targets.py); the VFM and teacher then do not run.

  latent (default, GAE): MSE(mu, E_sp(f_vfm(x))) with the frozen stage-1 teacher.
  pre:  MSE(P(h), f_vfm(x)), h = encoder features before the projector A_p.
  post: MSE(P(mu), f_vfm(x)), P a learned expansion d -> C.
  f_vfm is the RMS-normalised VFM grid, each VFM at its own preprocessing / input size.
  Teacher and VFM sit behind stop_gradient: only the pixel branch (and P) get gradients.
  """
  if target is None:
    if "teacher" not in frozen:
      return jnp.zeros((), jnp.float32)
    target = sp_target(frozen["teacher"], images)
  align = config.loss.get("sp_align", "latent")
  if align == "latent":
    pred = aux["mu"]
  else:
    pred = aux["features"] if align == "pre" else aux["mu"]
    if pred.ndim == 3:  # encoder tokens (B, N, W) -> (B, h, w, W)
      pred = pred.reshape(*target.shape[:-1], pred.shape[-1])
    if sp_proj is not None:
      pred = pred.astype(jnp.float32) @ sp_proj["kernel"].astype(jnp.float32)
  target = jax.lax.stop_gradient(target.astype(jnp.float32))
  if pred.shape != target.shape:
    raise ValueError(f"L_sp ({align}): prediction {pred.shape} vs target {target.shape}")
  return jnp.mean(jnp.square(pred.astype(jnp.float32) - target))


def train_step(state: common.TrainState, batch: dict, frozen: dict, *, model, disc, lpips,
               config, disc_active: bool | None = None) -> tuple[common.TrainState, dict]:
  """One generator + discriminator update. Pure; jitted once with shardings and donation.

  disc_active (static): None, the one program for every step: the discriminator runs, and
  `step >= loss.disc_start` selects whether its update is kept and its loss weighted.
  False: the program for steps before disc_start (`Setup.step_for`): the GAN term is 0 and
  the discriminator does not run (no forward, backward or update); its state passes through
  and g_loss, d_loss, logits_real/fake and disc_grad_norm are reported as 0. Before
  disc_start it gives the None program's new state and generator metrics to float32
  round-off (XLA fuses the two programs differently; tests/test_disc_skip.py).
  """
  if disc_active not in (None, False):
    raise ValueError(f"disc_active={disc_active!r}; None (disc_start decides) or False")
  lc = config.loss
  x = batch["image"]
  cached_target = batch.get("sp_target")   # config.teacher.cache_outputs
  rng = common.step_rng(state.rng, state.step)
  k_noise = jax.random.fold_in(rng, 0)
  run_disc = disc_active is None
  disc_on = state.step >= lc.disc_start
  disc_factor = disc_on.astype(jnp.float32)
  d_vars = lambda p, bs: {"params": p, "batch_stats": bs}
  disc_params = state.params["discriminator"]
  disc_stats = state.model_state["discriminator"]
  zero = jnp.zeros((), jnp.float32)

  def forward(gparams):
    if lc.get("sp_align", "latent") == "pre" and ("teacher" in frozen
                                                   or cached_target is not None):
      # Pre alignment reads the encoder features before the projector A_p.
      (x_hat, aux), inter = model.apply(
          {"params": gparams["gae"]}, x, train=True, rngs={"noise": k_noise},
          capture_intermediates=lambda m, name: m.name == "encoder" and name == "__call__",
          mutable=["intermediates"])
      aux = {**aux, "features": inter["intermediates"]["encoder"]["__call__"][0]}
      return x_hat, aux
    x_hat, aux = model.apply({"params": gparams["gae"]}, x, train=True,
                             rngs={"noise": k_noise})
    return x_hat, aux

  def loss_terms(gparams, x_hat, aux):
    l1 = jnp.abs(x - x_hat)
    p = lpips.apply(frozen["lpips"], x, x_hat)
    rec = lc.l1_weight * l1 + lc.lpips_weight * p[:, None, None, None]
    nll = losses.nll_loss(rec, gparams["logvar"])
    if run_disc:
      logits_fake = disc.apply(d_vars(disc_params, disc_stats), x_hat, train=True,
                               mutable=["batch_stats"])[0]
      g = losses.generator_loss(logits_fake)
    else:
      g = zero
    return nll, g, dict(l1=l1.mean(), lpips=p.mean(), rec=rec.mean(), g_loss=g)

  def gan_weight(gparams):
    if not lc.adaptive_disc_weight:
      return jnp.asarray(lc.disc_weight, jnp.float32)
    head = ("gae", "decoder", "head", "kernel")
    def terms(w):
      p = _replace(gparams, head, w)
      x_hat, aux = forward(p)
      nll, g, _ = loss_terms(p, x_hat, aux)
      return nll, g
    (_, _), vjp = jax.vjp(terms, _get(gparams, head))
    g_nll = vjp((jnp.ones(()), jnp.zeros(())))[0]
    g_gan = vjp((jnp.zeros(()), jnp.ones(())))[0]
    return losses.adaptive_weight(g_nll, g_gan) * lc.disc_weight

  def g_loss_fn(gparams):
    x_hat, aux = forward(gparams)
    nll, g, terms = loss_terms(gparams, x_hat, aux)
    # Without the discriminator the adaptive weight's VJPs would only see g = 0.
    w_gan = (gan_weight(gparams) if run_disc or not lc.adaptive_disc_weight else zero)
    w_gan = jax.lax.stop_gradient(w_gan)
    total = nll + w_gan * disc_factor * g
    if model.kl:
      kl = losses.kl_loss(aux["kl_mean"], aux["kl_logvar"],
                          reduction=lc.get("kl_reduction", "mean"))
      total = total + lc.kl_weight * kl
      terms["kl"] = kl
    sp = semantic_loss(aux, x, frozen, config, gparams.get("sp_proj"), cached_target)
    total = total + lc.sp_weight * sp
    terms.update(nll=nll, sp=sp, gan_weight=w_gan, loss=total,
                 latent_rms=jnp.sqrt(jnp.mean(jnp.square(aux["mu"]))),
                 sigma_abs=jnp.mean(jnp.abs(aux.get("sigma", jnp.zeros(())))))
    return total, (x_hat, terms)

  gparams = state.params["generator"]
  (_, (x_hat, terms)), g_grads = jax.value_and_grad(g_loss_fn, has_aux=True)(gparams)
  tx = make_optimizers(config)
  g_updates, g_opt = tx["generator"].update(g_grads, state.opt_state["generator"], gparams)
  new_g = jax.tree.map(lambda p, u: p + u, gparams, g_updates)

  x_fake = jax.lax.stop_gradient(x_hat)

  def d_loss_fn(dparams):
    real, upd = disc.apply(d_vars(dparams, disc_stats), x, train=True, mutable=["batch_stats"])
    fake, upd = disc.apply(d_vars(dparams, upd["batch_stats"]), x_fake, train=True,
                           mutable=["batch_stats"])
    d_fn = losses.hinge_d_loss if lc.disc_loss == "hinge" else losses.vanilla_d_loss
    return d_fn(real, fake), (upd["batch_stats"], real.mean(), fake.mean())

  def d_update():
    (d_loss, (new_stats, real_m, fake_m)), d_grads = jax.value_and_grad(
        d_loss_fn, has_aux=True)(disc_params)
    d_updates, d_opt = tx["discriminator"].update(d_grads, state.opt_state["discriminator"],
                                                  disc_params)
    new_d = jax.tree.map(lambda p, u: p + u, disc_params, d_updates)
    return new_d, d_opt, new_stats, (d_loss, real_m, fake_m, common.global_norm(d_grads))

  if not run_disc:
    new_d, d_opt, new_stats = disc_params, state.opt_state["discriminator"], disc_stats
    d_loss = real_m = fake_m = d_grad_norm = zero
  else:
    new_d, d_opt, new_stats, (d_loss, real_m, fake_m, d_grad_norm) = d_update()
    # Before disc_start the discriminator is frozen (no weight decay creeping in either).
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(disc_on, a, b), new, old)
    new_d = keep(new_d, disc_params)
    d_opt = keep(d_opt, state.opt_state["discriminator"])
    new_stats = keep(new_stats, disc_stats)

  ema = state.ema_params
  if ema is not None:
    ema = common.ema_update(ema, new_g, config.ema_decay)
  new_state = state.replace(
      step=state.step + 1, params={"generator": new_g, "discriminator": new_d},
      opt_state={"generator": g_opt, "discriminator": d_opt}, ema_params=ema,
      model_state={"discriminator": new_stats})
  mse = jnp.mean(jnp.square(jnp.clip(x_hat, -1, 1) - x), axis=(1, 2, 3))
  out = dict(terms)
  out.update(
      d_loss=d_loss, logits_real=real_m, logits_fake=fake_m, disc_active=disc_factor,
      logvar=gparams["logvar"], psnr=jnp.mean(10 * jnp.log10(4.0 / jnp.maximum(mse, 1e-10))),
      grad_norm=common.global_norm(g_grads), disc_grad_norm=d_grad_norm,
      param_norm=common.global_norm(new_g), update_norm=common.global_norm(g_updates),
      lr=common.learning_rate_schedule(config.optim, config.total_steps)(state.step))
  # Generator and discriminator as one update: a non-finite loss, gradient or new
  # parameter in either skips both (common.guard_update), EMA and BatchNorm stats included.
  new_state, guard = common.guard_update(
      state, new_state, terms["loss"], d_loss, out["grad_norm"], out["disc_grad_norm"],
      out["param_norm"], common.global_norm(new_d))
  out.update(guard)
  return new_state, out


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _replace(tree, path, value):
  if not path:
    return value
  return {**tree, path[0]: _replace(tree[path[0]], path[1:], value)}


def eval_step(params, batch, frozen, *, model, lpips):
  """Deterministic reconstruction (z = mu) and its metrics on a batch."""
  x = batch["image"]
  x_hat, aux = model.apply({"params": params["gae"]}, x, train=False)
  x_hat = jnp.clip(x_hat, -1.0, 1.0)
  mse = jnp.mean(jnp.square(x_hat - x), axis=(1, 2, 3))
  return x_hat, dict(l1=jnp.mean(jnp.abs(x - x_hat)),
                     psnr=jnp.mean(10 * jnp.log10(4.0 / jnp.maximum(mse, 1e-10))),
                     lpips=jnp.mean(lpips.apply(frozen["lpips"], x, x_hat)))


def load_frozen(config, mesh) -> dict:
  """Frozen networks, loaded once and replicated (non-donated step argument): LPIPS, and
  with L_sp the VFM (+ the stage-1 teacher's downsampler for 'latent') as `frozen["teacher"]`
  unless `config.teacher.cache_outputs` (the batches then carry the targets).
  """
  frozen = {"lpips": vgg.load_lpips_params()}
  spec = semantic_spec(config)
  if spec is not None and not caches_sp_targets(config):
    frozen["teacher"] = _load_semantic(config, spec)
  return jax.device_put(common.frozen_storage(config, frozen), sharding_lib.replicated(mesh))


def caches_sp_targets(config) -> bool:
  """`config.teacher.cache_outputs` with an L_sp teacher / VFM configured; raises the
  one-line error of `data/sp_targets.check_cacheable` for a crop that changes per step."""
  t = config.get("teacher") or ml_collections.ConfigDict()
  if not t.get("cache_outputs", False) or semantic_spec(config) is None:
    return False
  from gae_jax.data import sp_targets  # pylint: disable=g-import-not-at-top
  sp_targets.check_cacheable(config.data)
  return True


def prepare_sp_targets(config, directory: str, *, batch_size: int = 16) -> dict:
  """Builds (or reuses, when its fingerprint matches) the L_sp target cache of the train
  split in `directory` with the configured VFM + teacher, on the host's default device.
  Returns its manifest (data/sp_targets.py)."""
  from gae_jax.data import sp_targets  # pylint: disable=g-import-not-at-top
  sp_targets.check_cacheable(config.data)
  spec = semantic_spec(config)
  if spec is None:
    raise ValueError("config.teacher.cache_outputs=True but no L_sp teacher / VFM is "
                     "configured (config.teacher.init_from / vfm)")
  source = pipeline.make_source(config.data, "train")
  key = sp_targets.settings(config, source)
  holder = {}

  def target_fn(x):
    if "fn" not in holder:   # load the VFM + teacher only when the cache is (re)written
      sem = common.frozen_storage(config, {"t": _load_semantic(config, spec)})["t"]
      holder["sem"] = jax.device_put(sem)
      holder["fn"] = jax.jit(sp_target)
    return holder["fn"](holder["sem"], jnp.asarray(x))

  return sp_targets.ensure(directory, key, source, config.data.image_size, target_fn,
                           batch_size=batch_size)


def _load_semantic(config, spec: SemanticSpec) -> FrozenSemantic:
  from gae_jax import loading  # pylint: disable=g-import-not-at-top
  from gae_jax.models import vfm as vfm_lib  # pylint: disable=g-import-not-at-top
  t = config.teacher
  f32 = lambda tree: jax.tree.map(lambda a: np.asarray(a, np.float32), tree)
  teacher_vars = None
  if spec.fields is not None:
    teacher_vars, vfm_vars = loading.load_teacher_variables(
        t.init_from, spec.fields, vfm_weights=t.get("vfm_weights"))
    logging.info("L_sp (%s): frozen teacher %s (%s, d=%d) on %s", spec.align, t.init_from,
                 spec.fields["downsampler"], spec.fields["latent_dim"], spec.backend.name)
    if spec.align != "latent":
      teacher_vars = None
  elif spec.backend.name == "vgg16_relu5_3":
    vfm_vars = vfm_lib.load_vgg16_params()
  else:
    from gae_jax.convert import dinov2 as convert_dinov2  # pylint: disable=g-import-not-at-top
    vfm_vars = {"params": convert_dinov2.load_dinov2_params(t.vfm_weights)[0]}
  return FrozenSemantic(vfm=f32(vfm_vars), teacher=f32(teacher_vars), spec=spec)


class Setup:
  """Everything built before the loop; shared by train_and_evaluate and tests."""

  def __init__(self, config, mesh=None):
    self.config = config
    self.mesh = mesh or sharding_lib.make_mesh(config.mesh)
    self.rules = sharding_lib.rules_from_config(config.sharding_rules)
    self.model, self.disc, self.lpips = build_models(config)
    # config.teacher.cache_outputs: (cache dir, target (h, w, c)), set by use_sp_targets
    self.sp_targets: tuple[str, tuple[int, ...]] | None = None
    common.layout_state(self, functools.partial(_init_fn, config, self.model, self.disc,
                                                jax.random.key(config.seed)))

  def use_sp_targets(self, directory: str) -> dict:
    """Builds / reuses the L_sp target cache in `directory`; the train iterator and the
    compiled step then carry `batch["sp_target"]` in place of the VFM forward."""
    manifest = prepare_sp_targets(self.config, directory)
    self.sp_targets = (directory, tuple(manifest["target_shape"]))
    return manifest

  def init_state(self):
    with jax.set_mesh(self.mesh):
      return jax.jit(lambda: nn.meta.unbox(self.init_fn()),
                     out_shardings=self.state_shardings)()

  def compile_train_step(self, frozen, donate: bool | None = None,
                         return_lowered: bool = False, disc_active: bool | None = None):
    """AOT-compiled train_step; donate (the state) defaults to config.donate;
    return_lowered: (compiled, lowered) as common.compile_step; disc_active: train_step's
    (None: the full program; False: the one for steps before loss.disc_start)."""
    step = functools.partial(train_step, model=self.model, disc=self.disc, lpips=self.lpips,
                             config=self.config, disc_active=disc_active)
    batch = common.image_batch_abstract(self)
    if self.sp_targets is not None:
      batch["sp_target"] = jax.ShapeDtypeStruct(
          (self.config.batch_size, *self.sp_targets[1]), jnp.float32,
          sharding=self.data_sharding)
    return common.compile_frozen_step(self, step, batch, frozen, donate, return_lowered)

  def step_fn(self, frozen, start_step: int):
    """(state, batch) -> (state, metrics) for the loop, from host step `start_step` on.

    With loss.skip_disc_before_start, steps before loss.disc_start run the program without
    the discriminator (train_step disc_active=False) and later steps the full one; each is
    compiled when first needed (a run that ends by disc_start, like runlocal, compiles only
    the first). Otherwise every step runs the full program.
    """
    lc = self.config.loss
    skip = bool(lc.get("skip_disc_before_start", False))
    programs, host = {}, {"step": int(start_step)}

    def program():
      active = False if skip and host["step"] < lc.disc_start else None
      if active not in programs:
        programs[active] = self.compile_train_step(frozen, disc_active=active)
      return programs[active]

    program()   # compile the first before the loop starts

    def call(state, batch):
      # the step's inputs only (a joined L_sp target stream also carries "index")
      batch = {k: batch[k] for k in ("image", "label", "sp_target") if k in batch}
      out = program()(state, batch, frozen)
      host["step"] += 1
      return out
    return call

  def eval_fn(self):
    return sharding_lib.with_mesh_rules(
        jax.jit(functools.partial(eval_step, model=self.model, lpips=self.lpips)),
        self.mesh, self.rules)

  def train_iterator(self):
    return pipeline.make_iterator(
        self.config.data, split="train", batch_size=self.per_process_batch,
        seed=self.config.seed, sp_targets=self.sp_targets[0] if self.sp_targets else None)

  def eval_batch(self):
    return common.fixed_eval_batch(self)


def init_from_pretrained(state, setup: "Setup", path: str):
  """Starts the generator from a GAE checkpoint (gae_jax dir or the authors' `.ckpt`).

  Every parameter must be present with the model's shape (a ValueError names the first
  that is not); the discriminator, logvar and optimizer start fresh.
  """
  from gae_jax.tokenizers import gae as gae_tokenizer  # pylint: disable=g-import-not-at-top
  params, _ = gae_tokenizer.load_gae_params(path)
  current = state.params["generator"]["gae"]
  want = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(current)}
  got = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}
  for key, shape in want.items():
    if key not in got:
      raise ValueError(f"config.init_from={path}: parameter {key} is missing")
    if tuple(got[key]) != tuple(shape):
      raise ValueError(f"config.init_from={path}: parameter {key} has shape {got[key]}, "
                       f"the model wants {shape}")
  extra = sorted(set(got) - set(want))
  if extra:
    raise ValueError(f"config.init_from={path}: parameters the model lacks: {extra[:5]}")
  shardings = setup.state_shardings.params["generator"]["gae"]
  loaded = jax.tree.map(lambda a, cur, sh: jax.device_put(np.asarray(a, cur.dtype), sh),
                        params, current, shardings)
  logging.info("Initialised the GAE from %s", path)
  gen = {**state.params["generator"], "gae": loaded}
  ema = state.ema_params
  if ema is not None:
    ema = {**ema, "gae": loaded}
  return state.replace(params={**state.params, "generator": gen}, ema_params=ema)


def plan(config) -> dict:
  """--dry_run: every top-level module's parameter count without allocating anything."""
  s = Setup(config)
  params = s.abstract_boxed.params
  counts = common.param_counts(params["generator"]["gae"])
  counts["logvar"] = 1
  if "sp_proj" in params["generator"]:
    counts["sp_proj"] = sharding_lib.tree_size(nn.meta.unbox(params["generator"]["sp_proj"]))
  counts["discriminator"] = sharding_lib.tree_size(nn.meta.unbox(params["discriminator"]))
  lpips_abs = jax.eval_shape(lambda: s.lpips.init(
      jax.random.key(0), jnp.zeros((1, 64, 64, 3)), jnp.zeros((1, 64, 64, 3))))
  return {"stage": config.stage,
          "params": counts,
          "params_M": {k: round(v / 1e6, 2) for k, v in counts.items()},
          "trainable_total": int(sum(counts.values())),
          "frozen": {"lpips_vgg16": sharding_lib.tree_size(lpips_abs),
                     **_semantic_plan(config)},
          "mesh": common.mesh_plan(s.mesh),
          "batch": {"global": config.batch_size, "per_process": s.per_process_batch,
                    "image_size": config.data.image_size},
          "compute_dtype": str(common.compute_dtype(config))}


def _semantic_plan(config) -> dict:
  """Frozen L_sp networks' parameter counts via eval_shape (no weights loaded)."""
  spec = semantic_spec(config)
  if spec is None:
    return {}
  b = spec.backend
  vfm_abs = jax.eval_shape(lambda: b.module.init(
      jax.random.key(0), jnp.zeros((1, b.image_size, b.image_size, 3), jnp.float32)))
  out = {f"vfm_{b.name}": sharding_lib.tree_size(nn.meta.unbox(vfm_abs)["params"])}
  if spec.teacher is not None:
    g = spec.fields["grid"]
    t_abs = jax.eval_shape(lambda: spec.teacher.init(
        jax.random.key(0), jnp.zeros((1, g, g, spec.fields["channels"]), jnp.float32)))
    t_abs = nn.meta.unbox(t_abs)
    out["teacher_downsampler"] = sharding_lib.tree_size(
        t_abs.get("params", {}).get("downsampler", {})) + sharding_lib.tree_size(
            t_abs.get("svd", {}))
  return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The training loop; returns the last logged metrics."""
  common.write_config(config, workdir)
  if not config.loss.sp_weight:
    logging.info("semantic preservation off: loss.sp_weight=0 (the lambda_sp = 0 run; "
                 "a stage-1 teacher turns it on, e.g. ':runlocal,teacher=W')")
  s = Setup(config)
  if caches_sp_targets(config):
    from gae_jax.data import sp_targets  # pylint: disable=g-import-not-at-top
    s.use_sp_targets(sp_targets.cache_dir(config, workdir))
  frozen = load_frozen(config, s.mesh)
  ckpt = common.checkpointer(config, workdir)
  train_iter = s.train_iterator()

  def init():
    state = s.init_state()
    if config.get("init_from"):
      state = init_from_pretrained(state, s, config.init_from)
    return state

  state = common.restore_or_init(ckpt, s.abstract_state, train_iter, init, config.total_steps)
  if state is None:
    return {}
  step_fn = s.step_fn(frozen, int(state.step))
  eval_fn = s.eval_fn()
  eval_batch = s.eval_batch()

  evaluate = common.reconstruction_evaluator(workdir, eval_fn, eval_batch, frozen)

  return common.run_loop(
      config, workdir, state=state, step_fn=step_fn,
      train_iter=train_iter, data_sharding=s.data_sharding, ckpt=ckpt,
      log_keys=log_keys(config), periodic=((config.image_every, evaluate),))


def log_keys(config) -> tuple[tuple[str, str], ...]:
  """The progress line's (metric, format): every loss term of the step, then train PSNR.

  rec (= l1_weight * l1 + lpips_weight * lpips) is left to metrics.jsonl; g_loss / d_loss
  only when the GAN starts within the run (before loss.disc_start the discriminator is
  frozen and g_loss is not in the loss), sp only with a teacher / VFM, kl only for the
  KL-VAE.
  """
  keys = [("loss", ".4f"), ("nll", ".4f"), ("l1", ".4f"), ("lpips", ".4f")]
  if config.loss.disc_start < config.total_steps:
    keys += [("g_loss", ".3f"), ("d_loss", ".3f")]
  if semantic_spec(config) is not None:
    keys.append(("sp", ".4f"))
  if config.model.kl:
    keys.append(("kl", ".4f"))
  return tuple(keys) + (("psnr", ".2f"),)
