"""PAE stage 0: VFM prior refinement -- projector P_t and de-projector Q_t on frozen VFM tokens.

  python -m gae_jax.main --config=configs/pae_refine.py:runlocal --workdir=/tmp/pae_refine
  python -m gae_jax.main --config=configs/pae_refine.py:weights=dinov2_reg.pth --workdir=W

One jitted, sharded step (PAE_SPEC §3.4; paper Sec. 3.3):
  x -> frozen DINOv2 (VFM input: [0, 1], torch bicubic to config.vfm.image_size, ImageNet
  mean/std) -> H_vfm (B, N, D) -> Z_T = P_t(H_vfm) (B, g, g, d), H_hat = Q_t(Z_T)
  H_ref = (1 - s) H_vfm + s * GaussianBlur_sigma(H_vfm) on the g x g grid
  L_refine = lambda_rep * mean (H_hat - H_vfm)^2 + lambda_gram * ||Gram(Z_T) - Gram(H_ref)||^2
The paper's H_ref upsamples the VFM map to 256 x 256 with AnyUp (a pretrained upsampler),
applies a "low-pass spatial normalization" of strength 0.4 and downsamples back. AnyUp is
not available in JAX (and nothing is downloaded), so H_ref is the spec's documented
fallback above (config.refine.lowpass_sigma / lowpass_strength; a deviation). lambda_rep,
lambda_gram, the Gram normalisation and P_t's form are [I] (config.refine.*).

The VFM is a separate, non-donated, replicated argument; it never enters the optimizer or
the checkpoint. The workdir gets refine.json (kind 'pae_refine': refiner sizes, the VFM
it ran on -- weights path, or the seed of the random stand-in -- and the low-pass
settings) beside config.json; stage 1 (`trainers/pae.py`, `config.refine.init_from=W`)
reads it and the checkpoint's params to compute Z_T and H_ref on the fly and to start its
compressor from P_t.
"""

import functools
from typing import Optional

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from gae_jax import losses
from gae_jax import sharding as sharding_lib
from gae_jax.data import pipeline
from gae_jax.models import pae_refine as refine_lib
from gae_jax.trainers import common
from gae_jax.trainers import pae_common


def model_fields(config, vfm: pae_common.VFMSpec) -> dict:
  """What stage 1 needs to rebuild the refiner and its targets (refine.json `model`)."""
  r = config.refine
  return dict(latent_dim=r.latent_dim, vfm_dim=vfm.width, grid=vfm.grid,
              proj_num_heads=proj_heads(config, vfm), width=r.width, depth=r.depth,
              num_heads=r.num_heads, mlp_hidden=r.mlp_hidden,
              lowpass_sigma=r.lowpass_sigma, lowpass_strength=r.lowpass_strength,
              gram_normalize=r.gram_normalize, vfm=vfm.fields)


def proj_heads(config, vfm: pae_common.VFMSpec) -> int:
  """P_t's heads: config.refine.proj_num_heads, by default the VFM's (= the PAE
  compressor's, so stage 1 can start from P_t)."""
  return int(config.refine.proj_num_heads or vfm.module.config["num_heads"])


def build_model(config, vfm: pae_common.VFMSpec) -> refine_lib.Refiner:
  r = config.refine
  return refine_lib.Refiner(
      latent_dim=r.latent_dim, vfm_dim=vfm.width, proj_num_heads=proj_heads(config, vfm),
      width=r.width, depth=r.depth, num_heads=r.num_heads, mlp_hidden=r.mlp_hidden,
      attention_impl=config.vfm.get("attention_impl"), dtype=common.compute_dtype(config),
      param_dtype=jnp.dtype(config.param_dtype))


def make_optimizer(config):
  return common.make_optimizer(config.optim, config.total_steps)


def _init_fn(config, model, vfm, rng):
  """Boxed initial TrainState (abstractly evaluable)."""
  n = vfm.grid * vfm.grid
  k_init, k_state = jax.random.split(rng)
  params = model.init(k_init, jnp.zeros((1, n, vfm.width), jnp.float32))["params"]
  return common.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=make_optimizer(config).init(params),
                           rng=jax.random.key_data(k_state))


def refine_terms(params, images, frozen, *, model, vfm, config) -> tuple[jax.Array, dict]:
  """L_refine and its parts on a batch of [-1, 1] images (float32 scalars)."""
  r = config.refine
  _, h = pae_common.vfm_tokens(vfm, frozen["vfm"], images)
  h_ref = pae_common.structural_target(h, r.lowpass_sigma, r.lowpass_strength)
  z_t, h_hat = model.apply({"params": params}, h)
  rep = jnp.mean(jnp.square(h_hat - h))
  gram = losses.gram_loss(z_t, h_ref, normalize=r.gram_normalize, reduction=r.gram_reduction)
  loss = r.rep_weight * rep + r.gram_weight * gram
  cos = jnp.mean(jnp.sum(h_hat * h, -1) / jnp.sqrt(
      jnp.sum(h_hat ** 2, -1) * jnp.sum(h ** 2, -1) + 1e-8))
  return loss, dict(loss=loss, rep=rep, gram=gram, rep_cos=cos,
                    latent_rms=jnp.sqrt(jnp.mean(jnp.square(z_t))))


def train_step(state: common.TrainState, batch: dict, frozen: dict, *, model, vfm,
               config) -> tuple[common.TrainState, dict]:
  """One P_t + Q_t update. Pure; jitted once with shardings and donation."""
  (loss, terms), grads = jax.value_and_grad(
      lambda p: refine_terms(p, batch["image"], frozen, model=model, vfm=vfm, config=config),
      has_aux=True)(state.params)
  updates, opt_state = make_optimizer(config).update(grads, state.opt_state, state.params)
  params = jax.tree.map(lambda p, u: p + u, state.params, updates)
  metrics = dict(terms, grad_norm=common.global_norm(grads),
                 param_norm=common.global_norm(params), update_norm=common.global_norm(updates),
                 lr=common.learning_rate_schedule(config.optim, config.total_steps)(state.step))
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  new_state, guard = common.guard_update(state, new_state, loss, metrics["grad_norm"],
                                         metrics["param_norm"])
  return new_state, {**metrics, **guard}


def eval_step(params, batch, frozen, *, model, vfm, config) -> dict:
  return refine_terms(params, batch["image"], frozen, model=model, vfm=vfm, config=config)[1]


class Setup:
  """Everything built before the loop; shared by train_and_evaluate, plan and tests."""

  def __init__(self, config, mesh=None, *, abstract_vfm: bool = False):
    self.config = config
    self.mesh = mesh or sharding_lib.make_mesh(config.mesh)
    self.rules = sharding_lib.rules_from_config(config.sharding_rules)
    self.vfm = pae_common.resolve_vfm(config.vfm, common.frozen_dtype(config),
                                      abstract=abstract_vfm)
    self.model = build_model(config, self.vfm)
    common.layout_state(self, functools.partial(_init_fn, config, self.model, self.vfm,
                                                jax.random.key(config.seed)))

  @property
  def fields(self) -> dict:
    return model_fields(self.config, self.vfm)

  def load_frozen(self) -> dict:
    variables = pae_common.load_vfm_variables(self.vfm)
    return jax.device_put({"vfm": common.frozen_storage(self.config, variables)},
                          sharding_lib.replicated(self.mesh))

  def init_state(self):
    with jax.set_mesh(self.mesh):
      return jax.jit(lambda: nn.meta.unbox(self.init_fn()),
                     out_shardings=self.state_shardings)()

  def compile_train_step(self, frozen, donate: Optional[bool] = None):
    step = functools.partial(train_step, model=self.model, vfm=self.vfm, config=self.config)
    return common.compile_frozen_step(self, step, common.image_batch_abstract(self), frozen, donate)

  def eval_fn(self):
    return sharding_lib.with_mesh_rules(
        jax.jit(functools.partial(eval_step, model=self.model, vfm=self.vfm,
                                  config=self.config)), self.mesh, self.rules)

  def train_iterator(self):
    return pipeline.make_iterator(self.config.data, split="train",
                                  batch_size=self.per_process_batch, seed=self.config.seed)

  def eval_batch(self):
    return common.fixed_eval_batch(self)


def plan(config) -> dict:
  """--dry_run: P_t / Q_t and frozen VFM parameter counts via eval_shape."""
  s = Setup(config, abstract_vfm=True)
  counts = pae_common.param_counts(s.abstract_boxed.params)
  frozen = {"vfm_dinov2": pae_common.vfm_param_count(s.vfm)}
  return {"stage": config.stage,
          "params": counts,
          "params_M": {k: round(v / 1e6, 2) for k, v in counts.items()},
          "trainable_total": int(sum(counts.values())),
          "frozen": frozen,
          "frozen_M": {k: round(v / 1e6, 2) for k, v in frozen.items()},
          "vfm": s.vfm.fields,
          "refine": config.refine.to_dict(),
          "mesh": common.mesh_plan(s.mesh),
          "batch": {"global": config.batch_size, "per_process": s.per_process_batch,
                    "image_size": config.data.image_size},
          "compute_dtype": str(common.compute_dtype(config))}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The training loop; returns the last logged metrics."""
  common.write_config(config, workdir)
  s = Setup(config)
  pae_common.write_refine_json(workdir, s.fields)
  if not s.vfm.weights:
    logging.warning("PAE refine: no config.vfm.weights -- the VFM is a seeded random-weight "
                    "DINOv2 stand-in (%s): the machinery runs, the targets carry no "
                    "pretrained semantics", s.vfm.info)
  frozen = s.load_frozen()
  ckpt = common.checkpointer(config, workdir)
  train_iter = s.train_iterator()
  state = common.restore_or_init(ckpt, s.abstract_state, train_iter, s.init_state,
                                 config.total_steps)
  if state is None:
    return {}
  compiled = s.compile_train_step(frozen)
  eval_fn = s.eval_fn()
  eval_batch = s.eval_batch()

  def evaluate(step, state, writer):
    em = {f"val/{k}": v for k, v in common.host_metrics(
        eval_fn(state.params, eval_batch, frozen)).items()}
    writer.write_scalars(step, em)
    logging.info("step %d  val loss %.4f  rep %.4f  gram %.4f", step, em["val/loss"],
                 em["val/rep"], em["val/gram"])
    return em

  return common.run_loop(
      config, workdir, state=state, step_fn=lambda st, b: compiled(st, b, frozen),
      train_iter=train_iter, data_sharding=s.data_sharding, ckpt=ckpt,
      log_keys=(("loss", ".4f"), ("rep", ".4f"), ("gram", ".4f"), ("lr", ".2e")),
      periodic=((config.eval_every, evaluate),),
      banner=f"PAE refiner (d={config.refine.latent_dim}) on DINOv2 tokens "
             f"({s.vfm.grid}x{s.vfm.grid}x{s.vfm.width})")
