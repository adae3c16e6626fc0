"""Stage 2: train the GAE autoencoder (L1 + LPIPS + GAN [+ L_sp] with a learned logvar).

One jitted, sharded step updates the generator (encoder, projector, decoder, logvar) and
the PatchGAN discriminator (switched on at `config.loss.disc_start`). Frozen networks
(LPIPS VGG16; the semantic teacher once stage 1 exists) are passed in as a separate,
non-donated argument and never enter the optimizer or the checkpoint.
"""

import functools
import os
import time
from typing import Any

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gae_jax import checkpoint as ckpt_lib
from gae_jax import losses
from gae_jax import metrics as metrics_lib
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
                                      ndf=config.loss.disc_ndf)
  lpips = vgg.LPIPS(dtype=dtype)
  return model, disc, lpips


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
  opt_state = {k: tx[k].init(nn.meta.unbox(params[k])) for k in tx}
  ema = params["generator"] if config.get("ema_decay") else None
  return common.TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
      rng=jax.random.key_data(k_state), ema_params=ema,
      model_state={"discriminator": disc_vars.get("batch_stats", {})})


def make_optimizers(config) -> dict:
  return {"generator": common.make_optimizer(config.optim, config.total_steps),
          "discriminator": common.make_optimizer(config.disc_optim, config.total_steps)}


def semantic_loss(aux: dict, images: jax.Array, frozen: dict, config) -> jax.Array:
  """L_sp = MSE(mu, E_sp(f_vfm(x))): the seam for the stage-1 teacher.

  Returns 0 while no teacher is configured (`config.teacher.init_from` unset); the teacher
  issue plugs the frozen teacher in here through `frozen["teacher"]`.
  """
  if "teacher" not in frozen:
    return jnp.zeros((), jnp.float32)
  raise NotImplementedError("semantic teacher (stage 1) is not wired in yet")


def train_step(state: common.TrainState, batch: dict, frozen: dict, *, model, disc, lpips,
               config) -> tuple[common.TrainState, dict]:
  """One generator + discriminator update. Pure; jitted once with shardings and donation."""
  lc = config.loss
  x = batch["image"]
  rng = common.step_rng(state.rng, state.step)
  k_noise = jax.random.fold_in(rng, 0)
  disc_on = state.step >= lc.disc_start
  disc_factor = disc_on.astype(jnp.float32)
  d_vars = lambda p, bs: {"params": p, "batch_stats": bs}
  disc_params = state.params["discriminator"]
  disc_stats = state.model_state["discriminator"]

  def forward(gparams):
    x_hat, aux = model.apply({"params": gparams["gae"]}, x, train=True,
                             rngs={"noise": k_noise})
    return x_hat, aux

  def loss_terms(gparams, x_hat, aux):
    l1 = jnp.abs(x - x_hat)
    p = lpips.apply(frozen["lpips"], x, x_hat)
    rec = lc.l1_weight * l1 + lc.lpips_weight * p[:, None, None, None]
    nll = losses.nll_loss(rec, gparams["logvar"])
    logits_fake = disc.apply(d_vars(disc_params, disc_stats), x_hat, train=True,
                             mutable=["batch_stats"])[0]
    g = losses.generator_loss(logits_fake)
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
    w_gan = jax.lax.stop_gradient(gan_weight(gparams))
    total = nll + w_gan * disc_factor * g
    if model.kl:
      kl = losses.kl_loss(aux["kl_mean"], aux["kl_logvar"])
      total = total + lc.kl_weight * kl
      terms["kl"] = kl
    sp = semantic_loss(aux, x, frozen, config)
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

  (d_loss, (new_stats, real_m, fake_m)), d_grads = jax.value_and_grad(
      d_loss_fn, has_aux=True)(disc_params)
  d_updates, d_opt = tx["discriminator"].update(d_grads, state.opt_state["discriminator"],
                                                disc_params)
  new_d = jax.tree.map(lambda p, u: p + u, disc_params, d_updates)
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
      grad_norm=common.global_norm(g_grads), disc_grad_norm=common.global_norm(d_grads),
      param_norm=common.global_norm(new_g), update_norm=common.global_norm(g_updates),
      lr=common.learning_rate_schedule(config.optim, config.total_steps)(state.step))
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
  """Frozen networks, loaded once and replicated (non-donated step argument)."""
  frozen = {"lpips": vgg.load_lpips_params()}
  return jax.device_put(frozen, sharding_lib.replicated(mesh))


class Setup:
  """Everything built before the loop; shared by train_and_evaluate and tests."""

  def __init__(self, config, mesh=None):
    self.config = config
    self.mesh = mesh or sharding_lib.make_mesh(config.mesh)
    self.rules = sharding_lib.rules_from_config(config.sharding_rules)
    self.model, self.disc, self.lpips = build_models(config)
    rng = jax.random.key(config.seed)
    self.init_fn = functools.partial(_init_fn, config, self.model, self.disc, rng)
    self.abstract_boxed = jax.eval_shape(self.init_fn)
    self.state_shardings = sharding_lib.tree_shardings(
        self.abstract_boxed, self.mesh, self.rules, config.param_sharding)
    self.abstract_state = common.abstract_with_shardings(self.abstract_boxed,
                                                         self.state_shardings)
    self.data_sharding = sharding_lib.data_sharding(self.mesh, self.rules)
    self.per_process_batch = sharding_lib.global_batch_check(
        config.batch_size, self.mesh, self.rules)

  def init_state(self):
    with jax.set_mesh(self.mesh):
      return jax.jit(lambda: nn.meta.unbox(self.init_fn()),
                     out_shardings=self.state_shardings)()

  def compile_train_step(self, frozen):
    step = functools.partial(train_step, model=self.model, disc=self.disc, lpips=self.lpips,
                             config=self.config)
    size = self.config.data.image_size
    batch = {"image": jax.ShapeDtypeStruct((self.config.batch_size, size, size, 3),
                                           jnp.float32, sharding=self.data_sharding),
             "label": jax.ShapeDtypeStruct((self.config.batch_size,), jnp.int32,
                                           sharding=self.data_sharding)}
    frozen_sh = jax.tree.map(lambda a: a.sharding, frozen)
    frozen_abs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                              frozen)
    return common.compile_step(
        step, self.state_shardings, (self.data_sharding, frozen_sh),
        sharding_lib.replicated(self.mesh), (self.abstract_state, batch, frozen_abs),
        self.mesh)

  def eval_fn(self):
    return jax.jit(functools.partial(eval_step, model=self.model, lpips=self.lpips))

  def train_iterator(self):
    return pipeline.make_iterator(self.config.data, split="train",
                                  batch_size=self.per_process_batch, seed=self.config.seed)

  def eval_batch(self):
    """A fixed validation batch (same images every time) as global arrays."""
    n_dev = self.data_sharding.mesh.size  # a multiple of every batch-shard count
    n = max(n_dev, (self.config.num_eval_images // n_dev) * n_dev)
    it = pipeline.make_iterator(self.config.data, split="val",
                                batch_size=n // jax.process_count(), seed=0, shuffle=False,
                                repeat=True, drop_remainder=True)
    return sharding_lib.to_global(next(iter(it)), self.data_sharding)


def init_from_pretrained(state, setup: "Setup", path: str):
  """Starts the generator from a GAE checkpoint (gae_jax dir or the authors' `.ckpt`).

  Every parameter must be present with the model's shape (a ValueError names the first
  that is not); the discriminator, logvar and optimizer start fresh.
  """
  from gae_jax import pretrained
  params, _ = pretrained.load_gae_params(path)
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
  counts["discriminator"] = sharding_lib.tree_size(nn.meta.unbox(params["discriminator"]))
  lpips_abs = jax.eval_shape(lambda: s.lpips.init(
      jax.random.key(0), jnp.zeros((1, 64, 64, 3)), jnp.zeros((1, 64, 64, 3))))
  return {"stage": config.stage,
          "params": counts,
          "params_M": {k: round(v / 1e6, 2) for k, v in counts.items()},
          "trainable_total": int(sum(counts.values())),
          "frozen": {"lpips_vgg16": sharding_lib.tree_size(lpips_abs)},
          "mesh": common.mesh_plan(s.mesh),
          "batch": {"global": config.batch_size, "per_process": s.per_process_batch,
                    "image_size": config.data.image_size},
          "compute_dtype": str(common.compute_dtype(config))}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The training loop; returns the last logged metrics."""
  common.write_config(config, workdir)
  s = Setup(config)
  frozen = load_frozen(config, s.mesh)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                               save_every=config.ckpt_every, keep=config.keep_ckpts)
  train_iter = s.train_iterator()
  if ckpt.latest_step() is not None:
    state = ckpt.restore(s.abstract_state, train_iter)
    logging.info("Resuming at step %d", int(state.step))
  else:
    state = s.init_state()
    if config.get("init_from"):
      state = init_from_pretrained(state, s, config.init_from)
  if int(state.step) >= config.total_steps:
    logging.info("Checkpoint step %d already reaches total_steps=%d: nothing to do",
                 int(state.step), config.total_steps)
    ckpt.close()
    return {}
  compiled = s.compile_train_step(frozen)
  eval_fn = s.eval_fn()
  eval_batch = s.eval_batch()
  writer = metrics_lib.MetricWriter(workdir)
  start = int(state.step)
  progress = metrics_lib.Progress(config.total_steps, config.batch_size, start)
  last = {}
  logging.info("Training from step %d to %d (global batch %d, mesh %s)", start,
               config.total_steps, config.batch_size, dict(s.mesh.shape))
  for step in range(start + 1, config.total_steps + 1):
    batch = sharding_lib.to_global(next(train_iter), s.data_sharding)
    state, m = compiled(state, batch, frozen)
    if step % config.log_every == 0 or step == config.total_steps or step == start + 1:
      last = common.host_metrics(m)
      metrics_lib.check_finite(step, last)
      last.update(progress(step))
      writer.write_scalars(step, last)
      logging.info("step %d/%d  loss %.4f  l1 %.4f  lpips %.4f  psnr %.2f  d_loss %.3f  "
                   "%.2f steps/s  %.1f img/s  ETA %s", step, config.total_steps,
                   last["loss"], last["l1"], last["lpips"], last["psnr"], last["d_loss"],
                   last.get("steps_per_sec", 0), last.get("images_per_sec", 0),
                   metrics_lib.format_eta(last.get("eta_min", float("nan"))))
    if step % config.image_every == 0 or step == config.total_steps:
      params = state.ema_params if state.ema_params is not None else state.params["generator"]
      with jax.set_mesh(s.mesh):
        x_hat, em = eval_fn(params, eval_batch, frozen)
      em = {f"val/{k}": v for k, v in common.host_metrics(em).items()}
      writer.write_scalars(step, em)
      originals = metrics_lib.to_uint8(common.to_host_images(eval_batch["image"]))
      recons = metrics_lib.to_uint8(common.to_host_images(x_hat))
      pairs = np.stack([originals, recons], 1).reshape(-1, *originals.shape[1:])
      if jax.process_index() == 0:
        grid = metrics_lib.image_grid(pairs, ncols=8)
        metrics_lib.save_png(os.path.join(workdir, "images", f"recon_{step:07d}.png"), grid)
        writer.write_images(step, {"reconstructions": grid})
      logging.info("step %d  val psnr %.2f  val lpips %.4f", step, em["val/psnr"],
                   em["val/lpips"])
      last.update(em)
    ckpt.save(step, state, train_iter, force=step == config.total_steps)
  ckpt.close()
  writer.close()
  return last
