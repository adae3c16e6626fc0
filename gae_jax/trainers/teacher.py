"""Stage 1: train the semantic teacher E_sp (+ throw-away decoder D_sp) on frozen VFM features.

  python -m gae_jax.main --config=configs/teacher_l32.py:runlocal --workdir=/tmp/teacher
  python -m gae_jax.main --config=configs/teacher_l32.py --workdir=W \
      --config.teacher.vfm_weights=dinov2_vitl14_pretrain.pth

One jitted, sharded step: images -> frozen VFM (its own preprocessing) -> RMS-normalised
token grid f -> E_sp -> D_sp -> released loss MSE(RMSNorm(recon), RMSNorm(f)) = 2(1 - cos)
(`config.teacher.loss='cos'`: the paper's 1 - cos). The VFM is a separate, non-donated,
replicated argument and never enters the optimizer or the checkpoint.

`config.teacher.downsampler='svd'` does not train: `train_and_evaluate` runs `fit_svd` —
VFM features of `config.teacher.svd_images` train images streamed through
`models.teacher.SVDAccumulator` — and saves the fitted projection (mean, components) as
the checkpoint (`model_state/svd`), which stage 2 and `pretrained.load_teacher` read.

The workdir gets `teacher.json` (kind 'teacher' + the resolved model fields: VFM name /
info / input size / weights path, channels, grid, sizes) beside `config.json`.
"""

import functools
import json
import os
import time
from typing import Optional

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gae_jax import checkpoint as ckpt_lib
from gae_jax import metrics as metrics_lib
from gae_jax import paths
from gae_jax import sharding as sharding_lib
from gae_jax.convert import teacher as convert_teacher
from gae_jax.data import pipeline
from gae_jax.models import teacher as teacher_lib
from gae_jax.models import vfm as vfm_lib
from gae_jax.trainers import common


# ------------------------------------------------------------------------------- building


def build_backend(config, *, abstract: bool = False) -> tuple[vfm_lib.VFMBackend, Optional[dict]]:
  """(VFM backend, DinoV2 info or None) from `config.teacher`; reads no weights.

  abstract=True (the --dry_run plan) takes DINOv2's sizes from `vfm_variant` when no
  weights file is at hand.
  """
  t = config.teacher
  dtype = common.frozen_dtype(config)
  size = int(t.vfm_image_size) or None
  if t.vfm == "vgg16_relu5_3":
    return vfm_lib.vgg16_relu5_3(size or 256, dtype=dtype), None
  if t.vfm != "dinov2":
    raise ValueError(f"config.teacher.vfm={t.vfm!r}; choose from {vfm_lib.VFM_NAMES}")
  weights = t.vfm_weights
  if weights and (not abstract or os.path.isfile(os.path.expanduser(weights))):
    info = convert_teacher.dinov2_info(weights)
    want = t.get("vfm_variant")
    if want and info.get("variant") != want:
      raise ValueError(f"config.teacher.vfm_weights={weights} holds DINOv2-"
                       f"{info.get('variant') or info.get('width')}, config.teacher."
                       f"vfm_variant is {want!r}")
  elif abstract:
    info = {"variant": t.get("vfm_variant") or "L"}
  else:
    raise ValueError("config.teacher.vfm='dinov2' needs config.teacher.vfm_weights=<DINOv2 "
                     "checkpoint> (no weights are downloaded)")
  backend = vfm_lib.dinov2(info, size or 224, dtype=dtype,
                           attention_impl=t.get("attention_impl"))
  return backend, info


def build_model(config, backend: vfm_lib.VFMBackend) -> teacher_lib.SemanticTeacher:
  t = config.teacher
  return teacher_lib.SemanticTeacher(
      channels=backend.channels, latent_dim=t.latent_dim, downsampler=t.downsampler,
      window=t.window, num_heads=t.num_heads, decoder_depth=t.decoder_depth,
      decoder_num_heads=t.decoder_num_heads, decoder_mlp_hidden=t.decoder_mlp_hidden,
      qk_norm=t.qk_norm, attention_impl=t.get("attention_impl"), remat=t.remat,
      dtype=common.compute_dtype(config), param_dtype=jnp.dtype(config.param_dtype))


def model_fields(config, backend: vfm_lib.VFMBackend, info: Optional[dict]) -> dict:
  """What stage 2 / `pretrained.load_teacher` need to rebuild this teacher (teacher.json)."""
  t = config.teacher
  return dict(vfm=t.vfm, vfm_info=info, vfm_image_size=backend.image_size,
              vfm_weights=os.path.abspath(os.path.expanduser(t.vfm_weights))
              if t.vfm_weights else None,
              channels=backend.channels, grid=backend.grid, latent_dim=t.latent_dim,
              downsampler=t.downsampler, window=t.window, num_heads=t.num_heads,
              decoder_depth=t.decoder_depth, decoder_num_heads=t.decoder_num_heads,
              decoder_mlp_hidden=t.decoder_mlp_hidden, qk_norm=t.qk_norm)


def optim_config(config) -> ml_collections.ConfigDict:
  """config.optim with `warmup_fraction` (released: 5% of the steps) turned into steps."""
  opt = ml_collections.ConfigDict(config.optim.to_dict())
  frac = opt.get("warmup_fraction")
  if frac:
    opt.warmup_steps = int(round(float(frac) * config.total_steps))
  return opt


def make_optimizer(config):
  return common.make_optimizer(optim_config(config), config.total_steps)


def _init_fn(config, model, backend, rng):
  """Boxed initial TrainState (abstractly evaluable)."""
  g = backend.grid
  feats = jnp.zeros((1, g, g, backend.channels), jnp.float32)
  k_init, k_state = jax.random.split(rng)
  variables = model.init(k_init, feats)
  params = variables["params"]
  opt_state = make_optimizer(config).init(params)  # boxed: moments sharded like params
  return common.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                           rng=jax.random.key_data(k_state))


# ------------------------------------------------------------------------------- steps


def cosine_similarity(a: jax.Array, b: jax.Array) -> jax.Array:
  """Mean over tokens of cos(a, b) along the channel axis."""
  return 1.0 - teacher_lib.cosine_loss(a, b)


def train_step(state: common.TrainState, batch: dict, frozen: dict, *, model, backend,
               config) -> tuple[common.TrainState, dict]:
  """One E_sp + D_sp update on frozen VFM features. Pure; jitted with donation."""
  feats = backend.features(frozen["vfm"], batch["image"])   # stop_gradient inside

  def loss_fn(params):
    recon, aux = model.apply({"params": params}, feats)
    loss = teacher_lib.teacher_loss(recon, aux["target"], config.teacher.loss)
    return loss, (recon, aux)

  (loss, (recon, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  tx = make_optimizer(config)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = jax.tree.map(lambda p, u: p + u, state.params, updates)
  metrics = dict(
      loss=loss, cos=cosine_similarity(recon, aux["target"]),
      latent_rms=jnp.sqrt(jnp.mean(jnp.square(aux["latent"]))),
      grad_norm=common.global_norm(grads), param_norm=common.global_norm(params),
      update_norm=common.global_norm(updates),
      lr=common.learning_rate_schedule(optim_config(config), config.total_steps)(state.step))
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  # Non-finite loss / gradient / new params: skip the whole update (common.guard_update).
  new_state, guard = common.guard_update(state, new_state, loss, metrics["grad_norm"],
                                         metrics["param_norm"])
  return new_state, {**metrics, **guard}


def eval_step(params, batch, frozen, *, model, backend, config) -> dict:
  feats = backend.features(frozen["vfm"], batch["image"])
  recon, aux = model.apply({"params": params}, feats)
  return dict(loss=teacher_lib.teacher_loss(recon, aux["target"], config.teacher.loss),
              cos=cosine_similarity(recon, aux["target"]))


def load_frozen(config, mesh, info: Optional[dict] = None) -> dict:
  """{'vfm': VFM variables}, loaded once and replicated (non-donated step argument)."""
  t = config.teacher
  if t.vfm == "vgg16_relu5_3":
    variables = vfm_lib.load_vgg16_params()
  else:
    from gae_jax.convert import dinov2 as convert_dinov2  # pylint: disable=g-import-not-at-top
    if not t.vfm_weights:
      raise ValueError("config.teacher.vfm='dinov2' needs config.teacher.vfm_weights")
    params, got = convert_dinov2.load_dinov2_params(os.path.expanduser(t.vfm_weights))
    if info is not None and got != info:
      raise ValueError(f"{t.vfm_weights}: DINOv2 sizes {got} differ from {info}")
    variables = {"params": params}
  return jax.device_put({"vfm": common.frozen_storage(config, variables)},
                        sharding_lib.replicated(mesh))


class Setup:
  """Everything built before the loop; shared by train_and_evaluate, plan and tests."""

  def __init__(self, config, mesh=None, *, abstract_vfm: bool = False):
    self.config = config
    t = config.teacher
    if t.downsampler not in teacher_lib.DOWNSAMPLERS:
      raise ValueError(f"config.teacher.downsampler={t.downsampler!r}; choose from "
                       f"{teacher_lib.DOWNSAMPLERS}")
    self.mesh = mesh or sharding_lib.make_mesh(config.mesh)
    self.rules = sharding_lib.rules_from_config(config.sharding_rules)
    self.backend, self.vfm_info = build_backend(config, abstract=abstract_vfm)
    if not self.backend.resizes and config.data.image_size != self.backend.image_size:
      raise ValueError(f"config.data.image_size={config.data.image_size} must equal the VFM "
                       f"input size config.teacher.vfm_image_size={self.backend.image_size} "
                       f"for {self.backend.name}")
    self.model = build_model(config, self.backend)
    common.layout_state(self, functools.partial(_init_fn, config, self.model, self.backend,
                                                jax.random.key(config.seed)))

  @property
  def fields(self) -> dict:
    return model_fields(self.config, self.backend, self.vfm_info)

  def load_frozen(self) -> dict:
    return load_frozen(self.config, self.mesh, self.vfm_info)

  def init_state(self):
    with jax.set_mesh(self.mesh):
      return jax.jit(lambda: nn.meta.unbox(self.init_fn()),
                     out_shardings=self.state_shardings)()

  def compile_train_step(self, frozen, donate: Optional[bool] = None):
    """AOT-compiled train_step; donate (the state) defaults to config.donate."""
    step = functools.partial(train_step, model=self.model, backend=self.backend,
                             config=self.config)
    return common.compile_frozen_step(self, step, common.image_batch_abstract(self), frozen, donate)

  def eval_fn(self):
    return sharding_lib.with_mesh_rules(
        jax.jit(functools.partial(eval_step, model=self.model, backend=self.backend,
                                  config=self.config)), self.mesh, self.rules)

  def features_fn(self):
    return jax.jit(self.backend.features)

  def train_iterator(self):
    return pipeline.make_iterator(self.config.data, split="train",
                                  batch_size=self.per_process_batch, seed=self.config.seed)

  def eval_batch(self):
    return common.fixed_eval_batch(self)


def write_teacher_json(workdir: str, fields: dict) -> str:
  path = os.path.join(workdir, "teacher.json")
  if jax.process_index() == 0:
    paths.write_text(path, json.dumps({"kind": "teacher", "model": fields}, indent=2))
  return path


# ------------------------------------------------------------------------------- plan


def plan(config) -> dict:
  """--dry_run: trainable and frozen parameter counts via eval_shape (no VFM weights read)."""
  s = Setup(config, abstract_vfm=True)
  counts = common.param_counts(s.abstract_boxed.params)
  size = s.backend.image_size
  vfm_abs = jax.eval_shape(lambda: s.backend.module.init(
      jax.random.key(0), jnp.zeros((1, size, size, 3), jnp.float32)))
  vfm_name = s.backend.name + (f"_{s.vfm_info.get('variant')}" if s.vfm_info and
                               s.vfm_info.get("variant") else "")
  frozen = {vfm_name: sharding_lib.tree_size(nn.meta.unbox(vfm_abs)["params"])}
  if config.teacher.downsampler == "svd":
    frozen["svd_projection"] = s.backend.channels * (config.teacher.latent_dim + 1)
  opt = optim_config(config)
  return {"stage": config.stage,
          "params": counts,
          "params_M": {k: round(v / 1e6, 2) for k, v in counts.items()},
          "trainable_total": int(sum(counts.values())),
          "frozen": frozen,
          "frozen_M": {k: round(v / 1e6, 2) for k, v in frozen.items()},
          "vfm": {"name": s.backend.name, "info": s.vfm_info, "image_size": size,
                  "grid": s.backend.grid, "channels": s.backend.channels,
                  "weights": config.teacher.vfm_weights},
          "teacher": {"latent_dim": config.teacher.latent_dim,
                      "downsampler": config.teacher.downsampler,
                      "window": config.teacher.window,
                      "decoder_depth": config.teacher.decoder_depth,
                      "loss": config.teacher.loss},
          "optim": {"lr": opt.lr, "end_lr": opt.end_lr, "warmup_steps": opt.warmup_steps,
                    "b1": opt.b1, "b2": opt.b2, "weight_decay": opt.weight_decay,
                    "total_steps": config.total_steps},
          "mesh": common.mesh_plan(s.mesh),
          "batch": {"global": config.batch_size, "per_process": s.per_process_batch,
                    "image_size": config.data.image_size},
          "compute_dtype": str(common.compute_dtype(config))}


# ------------------------------------------------------------------------------- svd


def fit_svd(config, workdir: str, setup: Optional[Setup] = None) -> dict:
  """Fits the `svd` downsampler on `config.teacher.svd_images` train images; saves it.

  The checkpoint's state is {'step', 'model_state': {'svd': {'downsampler': {'mean',
  'components'}}}, 'num_vectors'}; returns {'explained_variance', 'num_vectors', ...}.
  """
  s = setup or Setup(config)
  t = config.teacher
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1,
                               keep=config.keep_ckpts, async_save=False)
  if ckpt.latest_step() is not None:
    logging.info("svd teacher already fitted in %s: nothing to do", workdir)
    ckpt.close()
    return {}
  frozen = s.load_frozen()
  feats_fn = s.features_fn()
  acc = teacher_lib.SVDAccumulator(s.backend.channels)
  it = iter(s.train_iterator())
  n_batches = max(1, -(-int(t.svd_images) // config.batch_size))
  start = time.time()
  with jax.set_mesh(s.mesh):
    for i in range(n_batches):
      batch = sharding_lib.to_global(next(it), s.data_sharding)
      acc.update(common.to_host_images(feats_fn(frozen["vfm"], batch["image"])))
      if (i + 1) % max(1, config.log_every) == 0 or i + 1 == n_batches:
        logging.info("svd: %d/%d batches (%d token vectors, %.1fs)", i + 1, n_batches, acc.n,
                     time.time() - start)
  mean, comps = acc.finalize(t.latent_dim, center=t.svd_center)
  # Share of the (centred) token variance the d components keep.
  n = acc.n
  mu = acc.sum / n if t.svd_center else np.zeros_like(acc.sum)
  cov = acc.gram / n - np.outer(mu, mu)
  c64 = comps.astype(np.float64)
  explained = float(np.trace(c64.T @ cov @ c64) / np.trace(cov))
  state = {"step": np.asarray(n_batches, np.int32),
           "model_state": {"svd": {"downsampler": {"mean": mean, "components": comps}}},
           "num_vectors": np.asarray(n, np.int64)}
  ckpt.save(n_batches, state, force=True)
  ckpt.close()
  out = {"explained_variance": explained, "num_vectors": n, "num_images": n_batches *
         config.batch_size, "seconds": time.time() - start}
  writer = metrics_lib.MetricWriter(workdir)
  writer.write_scalars(n_batches, {f"svd/{k}": v for k, v in out.items()})
  writer.close()
  logging.info("svd teacher: %d token vectors, %d components keep %.1f%% of the variance",
               n, t.latent_dim, 100 * explained)
  return out


# ------------------------------------------------------------------------------- loop


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The training loop (or the SVD fit); returns the last logged metrics."""
  common.write_config(config, workdir)
  s = Setup(config)
  write_teacher_json(workdir, s.fields)
  if config.teacher.downsampler == "svd":
    return fit_svd(config, workdir, s)
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
    em = eval_fn(state.params, eval_batch, frozen)
    em = {f"val/{k}": v for k, v in common.host_metrics(em).items()}
    writer.write_scalars(step, em)
    logging.info("step %d  val loss %.4f  val cos %.4f", step, em["val/loss"], em["val/cos"])
    return em

  return common.run_loop(
      config, workdir, state=state, step_fn=lambda st, b: compiled(st, b, frozen),
      train_iter=train_iter, data_sharding=s.data_sharding, ckpt=ckpt,
      log_keys=(("loss", ".4f"), ("cos", ".4f"), ("lr", ".2e")),
      periodic=((config.eval_every, evaluate),),
      banner=f"{config.teacher.downsampler} teacher (d={config.teacher.latent_dim}) on "
             f"{s.backend.name} features")
