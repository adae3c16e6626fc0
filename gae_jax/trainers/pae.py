"""PAE stage 1: train the prior-aligned tokenizer (L1 + LPIPS + GAN + SSR + MCR + SCR).

  python -m gae_jax.main --config=configs/pae_d32.py:runlocal --workdir=/tmp/pae
  python -m gae_jax.main --config=configs/pae_d32.py:runlocal,refine=/tmp/pae_refine \
      --workdir=/tmp/pae

One jitted, sharded step (PAE paper Eqs. 2-6; shared/PAE_SPEC.md §3):
  x ([-1, 1], data.image_size) -> x_vfm = ImageNet-normalised torch-bicubic resize to the
  VFM size -> H_vfm = frozen DINOv2(x_vfm) patch tokens -> z, aux = PAE.encode(x_vfm, H_vfm)
  -> x_r = denorm(PAE.decode(z)); with MCR also z_k = perturb(z, u, theta_k) for the
  angles (42.5, 85) deg along one random direction u, decoded in the same decoder call.
  L = |x - x_r|_1 + lambda_lpips LPIPS(x, x_r) + lambda_gan disc_on G(D(x_r))
      + lambda_ssr ||Gram(z) - Gram(T)||^2 + lambda_mcr MCR + lambda_scr SCR(z, Z_T)
with the paper's weights lambda_lpips 1, lambda_gan 0.5, lambda_ssr 0.2, lambda_mcr 0.5,
lambda_scr 1 (config.loss). The targets come from stage 0 (`config.refine.init_from`, a
pae_refine workdir): Z_T = P_t(H_vfm), H_ref = low_pass(H_vfm), computed on the fly from
the same frozen tokens. Every choice the paper leaves open is a switch (configs_lib.
pae_config; the spec's [I] defaults): SSR's Gram normalisation / reduction / target, MCR's
perturbation mode / re-normalisation / chain / encoder gradient, SCR's pooling, the image
space of the pixel losses ([-1, 1], as the GAE trainer), the GAN on x_r only, no sigma
noise (config.loss.sigma_std = 0).

Frozen networks (DINOv2, LPIPS VGG16, the stage-0 refiner) are one separate, non-donated,
replicated argument; they never enter the optimizer or the checkpoint. The generator
(DAM, compressor, decompressor, decoder) and the PatchGAN discriminator are updated in the
same step; a non-finite update of either is skipped for both (common.guard_update). The
workdir's config.json states `stage: "pae"` and the model fields, so a loader rebuilds it.
"""

import dataclasses
import functools
import os
from typing import Optional

from absl import logging
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
from gae_jax.models import pae as pae_lib
from gae_jax.models import pae_refine as refine_lib
from gae_jax.models import vgg
from gae_jax.trainers import common
from gae_jax.trainers import pae_common


# ------------------------------------------------------------------------------- building


def build_model(config, vfm: pae_common.VFMSpec) -> pae_lib.PAE:
  """The PAE of config.model; its width / heads must be the VFM's (ValueError otherwise)."""
  model = pae_lib.make_pae(config.model, dtype=common.compute_dtype(config),
                           param_dtype=jnp.dtype(config.param_dtype))
  heads = vfm.module.config["num_heads"]
  if (model.width, model.num_heads) != (vfm.width, heads):
    raise ValueError(f"config.model (variant {config.model.get('variant')!r}) has width "
                     f"{model.width} / {model.num_heads} heads, the VFM has {vfm.width} / "
                     f"{heads}: set config.model.width and config.model.num_heads")
  return model


def build_models(config, vfm: pae_common.VFMSpec):
  model = build_model(config, vfm)
  disc = disc_lib.NLayerDiscriminator(n_layers=config.loss.disc_layers,
                                      ndf=config.loss.disc_ndf)
  lpips = vgg.LPIPS(dtype=common.frozen_dtype(config))
  return model, disc, lpips


def make_optimizers(config) -> dict:
  return {"generator": common.make_optimizer(config.optim, config.total_steps),
          "discriminator": common.make_optimizer(config.disc_optim, config.total_steps)}


@dataclasses.dataclass(frozen=True, eq=False)
class Refined:
  """Static side of the stage-0 targets: the refiner module and its refine.json fields."""
  module: refine_lib.Refiner
  fields: dict
  path: str


def refined_spec(config, vfm: pae_common.VFMSpec) -> Optional[Refined]:
  """The stage-0 refiner named by config.refine.init_from, or None (then SSR and SCR must
  be off). Checks that it ran on this VFM and matches the latent width."""
  path = config.refine.get("init_from")
  if not path:
    return None
  fields = pae_common.refine_fields(path)
  if fields["vfm"] != vfm.fields:
    raise ValueError(f"config.refine.init_from={path} was refined on the VFM {fields['vfm']}, "
                     f"config.vfm resolves to {vfm.fields}; they must be the same")
  if fields["latent_dim"] != config.model.latent_dim:
    raise ValueError(f"config.refine.init_from={path} has latent_dim {fields['latent_dim']}, "
                     f"config.model.latent_dim is {config.model.latent_dim}")
  module = refine_lib.make_refiner(fields, dtype=common.frozen_dtype(config))
  return Refined(module=module, fields=fields, path=os.fspath(path))


def check_loss_config(config, refined: Optional[Refined]) -> None:
  """SSR / SCR need the stage-0 targets; the switches must name known choices."""
  lc = config.loss
  if refined is None and (lc.ssr_weight or lc.scr_weight):
    raise ValueError(f"config.loss.ssr_weight={lc.ssr_weight} / scr_weight={lc.scr_weight} "
                     "need the stage-0 targets: set config.refine.init_from (a pae_refine "
                     "workdir, e.g. ':runlocal,refine=W'), or set both weights to 0")
  if lc.ssr.target not in ("z_t", "h_ref"):
    raise ValueError(f"config.loss.ssr.target={lc.ssr.target!r}; choose 'z_t' (the semantic "
                     "target Z_T) or 'h_ref' (the structural target)")
  if lc.mcr_weight and not lc.mcr.angles:
    raise ValueError("config.loss.mcr_weight > 0 needs config.loss.mcr.angles (e.g. "
                     "(42.5, 85.0))")


def _init_fn(config, model, disc, vfm, rng):
  """Boxed initial TrainState (abstractly evaluable: nothing is allocated under eval_shape)."""
  s, n = vfm.image_size, vfm.grid * vfm.grid
  x_vfm = jnp.zeros((1, s, s, 3), jnp.float32)
  h = jnp.zeros((1, n, vfm.width), jnp.float32)
  size = config.data.image_size
  k_g, k_d, k_state = jax.random.split(rng, 3)
  pae_params = model.init({"params": k_g}, x_vfm, h, train=False)["params"]
  disc_vars = disc.init(k_d, jnp.zeros((1, size, size, 3), jnp.float32), train=False)
  params = {"generator": pae_params, "discriminator": disc_vars["params"]}
  tx = make_optimizers(config)
  opt_state = {k: tx[k].init(params[k]) for k in tx}
  ema = params["generator"] if config.get("ema_decay") else None
  return common.TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
      rng=jax.random.key_data(k_state), ema_params=ema,
      model_state={"discriminator": disc_vars.get("batch_stats", {})})


# ------------------------------------------------------------------------------- steps


def targets(frozen: dict, h_vfm: jax.Array, refined: Optional[Refined]) -> dict:
  """{'z_t': (B, g, g, d), 'h_ref': (B, g, g, D)} from the frozen refiner ({} without)."""
  if refined is None:
    return {}
  f = refined.fields
  z_t = refined.module.apply(frozen["refiner"], h_vfm, method="project")
  return {"z_t": jax.lax.stop_gradient(z_t.astype(jnp.float32)),
          "h_ref": pae_common.structural_target(h_vfm, f["lowpass_sigma"],
                                                f["lowpass_strength"])}


def _psnr(x, x_hat):
  mse = jnp.mean(jnp.square(jnp.clip(x_hat, -1, 1) - x), axis=(1, 2, 3))
  return jnp.mean(10 * jnp.log10(4.0 / jnp.maximum(mse, 1e-10)))


def gan_in_run(config) -> bool:
  """Static: whether the GAN term can be on within this run (else D never runs)."""
  return bool(config.loss.disc_weight) and config.loss.disc_start < config.total_steps


def train_step(state: common.TrainState, batch: dict, frozen: dict, *, model, disc, lpips,
               vfm, refined, config) -> tuple[common.TrainState, dict]:
  """One generator + discriminator update. Pure; jitted once with shardings and donation."""
  lc = config.loss
  x = batch["image"].astype(jnp.float32)
  b = x.shape[0]
  rng = common.step_rng(state.rng, state.step)
  disc_on = state.step >= lc.disc_start
  disc_factor = disc_on.astype(jnp.float32)
  run_gan = gan_in_run(config)
  d_vars = {"params": state.params["discriminator"],
            "batch_stats": state.model_state["discriminator"]}
  x_vfm, h = pae_common.vfm_tokens(vfm, frozen["vfm"], x)
  tg = targets(frozen, h, refined)
  angles = tuple(float(a) for a in lc.mcr.angles) if lc.mcr_weight else ()
  lpips_fn = lambda a, c: lpips.apply(frozen["lpips"], a, c)

  def g_loss_fn(gp):
    z, aux = model.apply({"params": gp}, x_vfm, h, train=True, method="encode")
    z32 = z.astype(jnp.float32)
    z_dec = z32
    if lc.sigma_std:  # off by default (spec §3.5): GAE-style per-image sigma noise
      sigma = gae_lib.sample_sigma(jax.random.fold_in(rng, 2), b, lc.sigma_std)
      z_dec = z32 + sigma[:, None, None, None] * jax.random.normal(
          jax.random.fold_in(rng, 3), z32.shape)
    zs = [z_dec]
    if angles:
      noise = jax.random.normal(jax.random.fold_in(rng, 1), z32.shape)
      base = z32 if lc.mcr.encoder_grad else jax.lax.stop_gradient(z32)
      zs += [losses.perturb_latent(base, noise, a, mode=lc.mcr.mode,
                                   renormalize=lc.mcr.renormalize) for a in angles]
    out = model.apply({"params": gp}, jnp.concatenate(zs, 0), method="decode")
    xs = jnp.split(pae_common.to_m11(out), len(zs), axis=0)
    x_r = xs[0]
    if x_r.shape != x.shape:
      raise ValueError(f"PAE decodes {x_r.shape[1:3]} images, the data are {x.shape[1:3]}: "
                       "config.data.image_size must equal the decoder's output size")
    l1 = jnp.mean(jnp.abs(x - x_r))
    p = jnp.mean(lpips_fn(x, x_r))
    rec = lc.l1_weight * l1 + lc.lpips_weight * p
    terms = dict(l1=l1, lpips=p, rec=rec)
    total = rec
    if run_gan:
      logits_fake = disc.apply(d_vars, x_r, train=True, mutable=["batch_stats"])[0]
      g = losses.generator_loss(logits_fake)
      total = total + lc.disc_weight * disc_factor * g
      terms["g_loss"] = g
    if lc.ssr_weight:
      ssr = losses.ssr_loss(z32, tg[lc.ssr.target], normalize=lc.ssr.normalize,
                            reduction=lc.ssr.reduction)
      total = total + lc.ssr_weight * ssr
      terms["ssr"] = ssr
    if angles:
      mcr, mterms = losses.mcr_loss(x_r, xs[1:], lpips_fn if lc.mcr.get("lpips", True)
                                    else None, lpips_weight=lc.lpips_weight,
                                    chain=lc.mcr.chain)
      total = total + lc.mcr_weight * mcr
      terms.update(mcr=mcr, **mterms)
    if lc.scr_weight:
      scr, sterms = losses.scr_loss(z32, tg["z_t"], pooling=lc.scr.pooling,
                                    global_weight=lc.scr.global_weight,
                                    patch_weight=lc.scr.patch_weight)
      total = total + lc.scr_weight * scr
      terms.update(scr=scr, **sterms)
    terms.update(loss=total, latent_rms=jnp.sqrt(jnp.mean(jnp.square(z32))))
    return total, (x_r, terms)

  gparams = state.params["generator"]
  (_, (x_r, terms)), g_grads = jax.value_and_grad(g_loss_fn, has_aux=True)(gparams)
  tx = make_optimizers(config)
  g_updates, g_opt = tx["generator"].update(g_grads, state.opt_state["generator"], gparams)
  new_g = jax.tree.map(lambda p, u: p + u, gparams, g_updates)

  out = dict(terms)
  new_d, d_opt = state.params["discriminator"], state.opt_state["discriminator"]
  new_stats = state.model_state["discriminator"]
  checks = []
  if run_gan:
    new_d, d_opt, new_stats, dm = common.discriminator_update(
        disc, new_d, new_stats, d_opt, tx["discriminator"], x, x_r, disc_on, lc.disc_loss)
    out.update(dm, disc_active=disc_factor)
    checks = [dm["d_loss"], dm["disc_grad_norm"], common.global_norm(new_d)]

  ema = state.ema_params
  if ema is not None:
    ema = common.ema_update(ema, new_g, config.ema_decay)
  new_state = state.replace(
      step=state.step + 1, params={"generator": new_g, "discriminator": new_d},
      opt_state={"generator": g_opt, "discriminator": d_opt}, ema_params=ema,
      model_state={"discriminator": new_stats})
  out.update(
      psnr=_psnr(x, x_r), grad_norm=common.global_norm(g_grads),
      param_norm=common.global_norm(new_g), update_norm=common.global_norm(g_updates),
      lr=common.learning_rate_schedule(config.optim, config.total_steps)(state.step))
  new_state, guard = common.guard_update(state, new_state, terms["loss"], out["grad_norm"],
                                         out["param_norm"], *checks)
  out.update(guard)
  return new_state, out


def reconstruct(params, images, frozen, *, model, vfm) -> jax.Array:
  """[-1, 1] images -> [-1, 1] reconstructions (unclipped), deterministic (train=False)."""
  x_vfm, h = pae_common.vfm_tokens(vfm, frozen["vfm"], images)
  z, _ = model.apply({"params": params}, x_vfm, h, train=False, method="encode")
  return pae_common.to_m11(model.apply({"params": params}, z, method="decode"))


def eval_step(params, batch, frozen, *, model, lpips, vfm):
  """Reconstruction and its metrics on a batch."""
  x = batch["image"]
  x_hat = jnp.clip(reconstruct(params, x, frozen, model=model, vfm=vfm), -1.0, 1.0)
  return x_hat, dict(l1=jnp.mean(jnp.abs(x - x_hat)), psnr=_psnr(x, x_hat),
                     lpips=jnp.mean(lpips.apply(frozen["lpips"], x, x_hat)))


# ------------------------------------------------------------------------------- setup


class Setup:
  """Everything built before the loop; shared by train_and_evaluate, plan and tests."""

  def __init__(self, config, mesh=None, *, abstract_vfm: bool = False):
    """abstract_vfm (the --dry_run plan): size the VFM from config.vfm when its weights file
    is absent, and do not require the stage-0 targets."""
    self.config = config
    self.mesh = mesh or sharding_lib.make_mesh(config.mesh)
    self.rules = sharding_lib.rules_from_config(config.sharding_rules)
    self.vfm = pae_common.resolve_vfm(config.vfm, common.frozen_dtype(config),
                                      abstract=abstract_vfm)
    self.refined = refined_spec(config, self.vfm)
    if not abstract_vfm:
      check_loss_config(config, self.refined)
    self.model, self.disc, self.lpips = build_models(config, self.vfm)
    common.layout_state(self, functools.partial(_init_fn, config, self.model, self.disc,
                                                self.vfm, jax.random.key(config.seed)))

  def load_frozen(self) -> dict:
    """LPIPS, the VFM and (with stage 0) the refiner, replicated, non-donated."""
    frozen = {"lpips": vgg.load_lpips_params(),
              "vfm": pae_common.load_vfm_variables(self.vfm)}
    if self.refined is not None:
      frozen["refiner"] = pae_common.read_refiner(self.refined.path)[1]
    return jax.device_put(common.frozen_storage(self.config, frozen),
                          sharding_lib.replicated(self.mesh))

  def init_state(self, frozen: Optional[dict] = None):
    with jax.set_mesh(self.mesh):
      state = jax.jit(lambda: nn.meta.unbox(self.init_fn()),
                      out_shardings=self.state_shardings)()
    if (frozen is not None and self.refined is not None
        and self.config.refine.get("init_compressor", True)):
      state = init_compressor_from_projector(state, self, frozen["refiner"])
    return state

  def compile_train_step(self, frozen, donate: Optional[bool] = None):
    """AOT-compiled train_step; donate (the state) defaults to config.donate."""
    step = functools.partial(train_step, model=self.model, disc=self.disc, lpips=self.lpips,
                             vfm=self.vfm, refined=self.refined, config=self.config)
    return common.compile_frozen_step(self, step, common.image_batch_abstract(self), frozen, donate)

  def eval_fn(self):
    return sharding_lib.with_mesh_rules(
        jax.jit(functools.partial(eval_step, model=self.model, lpips=self.lpips,
                                  vfm=self.vfm)), self.mesh, self.rules)

  def train_iterator(self):
    return pipeline.make_iterator(self.config.data, split="train",
                                  batch_size=self.per_process_batch, seed=self.config.seed)

  def eval_batch(self):
    return common.fixed_eval_batch(self)


COMPRESSOR_PATH = ("compressor",)


def init_compressor_from_projector(state, setup: Setup, refiner_vars: dict):
  """Starts the PAE compressor from stage 0's P_t (spec §8 [I]: P_t has the compressor's
  form; config.refine.init_compressor). Every P_t leaf must exist in the compressor with
  the same shape (ValueError naming the first that does not)."""
  proj = refiner_vars["params"]["projector"]["compressor"]
  gen = state.params["generator"]
  comp = gen
  for k in COMPRESSOR_PATH:
    if k not in comp:
      raise ValueError(f"config.refine.init_compressor: the PAE has no {'/'.join(COMPRESSOR_PATH)}"
                       " module to start from P_t")
    comp = comp[k]
  want = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(comp)}
  got = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(proj)}
  if set(want) != set(got) or any(tuple(want[k]) != tuple(got[k]) for k in want):
    raise ValueError(f"config.refine.init_compressor: P_t {got} does not match the PAE "
                     f"compressor {want}; set config.refine.init_compressor=False")
  sh = setup.state_shardings.params["generator"]
  for k in COMPRESSOR_PATH:
    sh = sh[k]
  loaded = jax.tree.map(lambda a, cur, s: jax.device_put(np.asarray(a, cur.dtype), s),
                        proj, comp, sh)
  new_gen = _replace(gen, COMPRESSOR_PATH, loaded)
  ema = state.ema_params
  if ema is not None:
    ema = _replace(ema, COMPRESSOR_PATH, loaded)
  logging.info("PAE compressor initialised from the stage-0 projector P_t (%s)",
               setup.refined.path)
  return state.replace(params={**state.params, "generator": new_gen}, ema_params=ema)


def _replace(tree, path, value):
  if not path:
    return value
  return {**tree, path[0]: _replace(tree[path[0]], path[1:], value)}


# ------------------------------------------------------------------------------- plan


def plan(config) -> dict:
  """--dry_run: per-part parameter counts without allocating anything."""
  s = Setup(config, abstract_vfm=True)
  counts = pae_common.param_counts(s.abstract_boxed.params["generator"])
  counts["discriminator"] = sharding_lib.tree_size(
      nn.meta.unbox(s.abstract_boxed.params["discriminator"]))
  lpips_abs = jax.eval_shape(lambda: s.lpips.init(
      jax.random.key(0), jnp.zeros((1, 64, 64, 3)), jnp.zeros((1, 64, 64, 3))))
  frozen = {"vfm_dinov2": pae_common.vfm_param_count(s.vfm),
            "lpips_vgg16": sharding_lib.tree_size(lpips_abs)}
  if s.refined is not None:
    n = s.vfm.grid ** 2
    r_abs = jax.eval_shape(lambda: s.refined.module.init(
        jax.random.key(0), jnp.zeros((1, n, s.vfm.width))))
    frozen["refiner_projector"] = sharding_lib.tree_size(
        nn.meta.unbox(r_abs)["params"]["projector"])
  lc = config.loss
  return {"stage": config.stage,
          "params": counts,
          "params_M": {k: round(v / 1e6, 2) for k, v in counts.items()},
          "trainable_total": int(sum(counts.values())),
          "frozen": frozen,
          "frozen_M": {k: round(v / 1e6, 2) for k, v in frozen.items()},
          "vfm": s.vfm.fields,
          "refine": s.refined.path if s.refined else None,
          "loss": {"lpips": lc.lpips_weight, "gan": lc.disc_weight, "ssr": lc.ssr_weight,
                   "mcr": lc.mcr_weight, "scr": lc.scr_weight,
                   "disc_start": lc.disc_start},
          "mesh": common.mesh_plan(s.mesh),
          "batch": {"global": config.batch_size, "per_process": s.per_process_batch,
                    "image_size": config.data.image_size},
          "compute_dtype": str(common.compute_dtype(config))}


# ------------------------------------------------------------------------------- loop


def log_keys(config, refined) -> tuple[tuple[str, str], ...]:
  """The progress line: every active loss term, then train PSNR."""
  lc = config.loss
  keys = [("loss", ".4f"), ("l1", ".4f"), ("lpips", ".4f")]
  if gan_in_run(config):
    keys += [("g_loss", ".3f"), ("d_loss", ".3f")]
  if lc.ssr_weight and refined is not None:
    keys.append(("ssr", ".4f"))
  if lc.mcr_weight:
    keys.append(("mcr", ".4f"))
  if lc.scr_weight and refined is not None:
    keys.append(("scr", ".4f"))
  return tuple(keys) + (("psnr", ".2f"),)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The training loop; returns the last logged metrics."""
  common.write_config(config, workdir)
  s = Setup(config)
  if not s.vfm.weights:
    logging.warning("PAE: no config.vfm.weights -- the VFM is a seeded random-weight DINOv2 "
                    "stand-in (%s): the machinery runs, not PAE's semantics", s.vfm.info)
  if s.refined is None:
    logging.info("PAE: no stage-0 targets (config.refine.init_from): SSR and SCR are off "
                 "(':runlocal,refine=W' turns them on)")
  frozen = s.load_frozen()
  ckpt = common.checkpointer(config, workdir)
  train_iter = s.train_iterator()
  state = common.restore_or_init(ckpt, s.abstract_state, train_iter,
                                 lambda: s.init_state(frozen), config.total_steps)
  if state is None:
    return {}
  compiled = s.compile_train_step(frozen)
  eval_fn = s.eval_fn()
  eval_batch = s.eval_batch()

  evaluate = common.reconstruction_evaluator(workdir, eval_fn, eval_batch, frozen)

  return common.run_loop(
      config, workdir, state=state, step_fn=lambda st, b: compiled(st, b, frozen),
      train_iter=train_iter, data_sharding=s.data_sharding, ckpt=ckpt,
      log_keys=log_keys(config, s.refined), periodic=((config.image_every, evaluate),),
      banner=f"PAE tokenizer (d={config.model.latent_dim}) on DINOv2 tokens "
             f"({s.vfm.grid}x{s.vfm.grid}x{s.vfm.width})")
