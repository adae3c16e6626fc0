"""Stage 3: LightningDiT flow matching on cached tokenizer latents (docs/method.md, stage 3).

  python -m gae_jax.main --config=configs/dit_xl_gae32_80ep.py:cache=/data/latents/gae_l32 \
      --workdir=/runs/dit_80ep

One jitted, sharded step: normalise z -> (z - mean) / std, draw t ~ logit-normal shifted
with s = 0.7 and the linear path x_t = t x1 + (1 - t) x0, predict the velocity with label
dropout 0.1, loss = MSE + (1 - cos), AdamW (constant 2e-4, betas (0.9, 0.95), no weight
decay, no clipping), EMA 0.9999 every step; per-step randomness from fold_in(rng, step).
Checkpoints hold params, optimizer, EMA and the grain iterator, so a resume continues the
identical run (the authors' release drops the optimizer state on resume; we do not).
Sample grids (EMA params, fixed noise and class-uniform labels, a short sampler run)
are decoded with the cache's tokenizer (any family; `config.tokenizer.path` overrides it,
opened with `pretrained.open_tokenizer` and used through its `.decode_fn`) and written to
`<workdir>/images/samples_<step>.png`.
"""

import functools
import os
from typing import Optional

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gae_jax import flow
from gae_jax import metrics as metrics_lib
from gae_jax import sharding as sharding_lib
from gae_jax.data import latents as latents_lib
from gae_jax.flow import generate as generate_lib
from gae_jax.models import dit as dit_lib
from gae_jax.trainers import common


def build_model(config, dtype=None) -> dit_lib.LightningDiT:
  m = config.model
  dtype = common.compute_dtype(config) if dtype is None else dtype
  attention_impl = m.attention_impl
  if attention_impl == "cudnn" and jax.default_backend() != "gpu":
    attention_impl = None
  return dit_lib.make_dit(
      m.variant, patch_size=m.patch_size, in_channels=m.latent_dim,
      num_classes=m.num_classes, class_dropout_prob=m.class_dropout_prob, qk_norm=m.qk_norm,
      use_rope=m.use_rope, use_abs_pos=m.use_abs_pos, attention_impl=attention_impl,
      remat=m.remat, scan=m.scan, dtype=dtype, param_dtype=jnp.dtype(config.param_dtype))


def latent_shape(config) -> tuple[int, int, int]:
  return (config.model.latent_size, config.model.latent_size, config.model.latent_dim)


def make_optimizer(config):
  return common.make_optimizer(config.optim, config.total_steps)


def _init_fn(config, model, rng):
  """Boxed initial TrainState (abstractly evaluable)."""
  x = jnp.zeros((1, *latent_shape(config)), jnp.float32)
  k_init, k_state = jax.random.split(rng)
  params = model.init({"params": k_init}, x, jnp.zeros((1,)), jnp.zeros((1,), jnp.int32)
                      )["params"]
  opt_state = make_optimizer(config).init(params)  # boxed: moments sharded like params
  return common.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                           rng=jax.random.key_data(k_state), ema_params=params)


def train_step(state: common.TrainState, batch: dict, stats: dict, *, model, config
               ) -> tuple[common.TrainState, dict]:
  """One AdamW + EMA update on a batch of raw latents. Pure; jitted with donation."""
  rng = common.step_rng(state.rng, state.step)
  k_path, k_drop = jax.random.split(rng)
  x1 = (batch["latent"].astype(jnp.float32) - stats["mean"]) / stats["std"]
  f = config.flow
  x_t, t, u = flow.sample_path(k_path, x1, shift=f.train_shift, mu=f.t_mu, sigma=f.t_sigma)

  def loss_fn(params):
    v = model.apply({"params": params}, x_t, t, batch["label"], train=True,
                    rngs={"dropout": k_drop})
    return flow.flow_loss(v, u)

  (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = make_optimizer(config).update(grads, state.opt_state, state.params)
  params = jax.tree.map(lambda p, d: p + d, state.params, updates)
  ema = common.ema_update(state.ema_params, params, config.ema_decay)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            ema_params=ema)
  metrics = dict(loss=loss, mse=terms["mse"], cos=terms["cos"], t_mean=t.mean(),
                 grad_norm=common.global_norm(grads), param_norm=common.global_norm(params),
                 update_norm=common.global_norm(updates),
                 lr=common.learning_rate_schedule(config.optim, config.total_steps)(
                     state.step))
  # Non-finite loss / gradient / new params: skip the whole update (common.guard_update).
  new_state, guard = common.guard_update(state, new_state, loss, metrics["grad_norm"],
                                         metrics["param_norm"])
  return new_state, {**metrics, **guard}


class Setup:
  """Everything built before the loop; shared by train_and_evaluate, plan and tests."""

  def __init__(self, config, mesh=None, *, need_data: bool = True):
    self.config = config
    self.mesh = mesh or sharding_lib.make_mesh(config.mesh)
    self.rules = sharding_lib.rules_from_config(config.sharding_rules)
    self.manifest = None
    if need_data:
      self.manifest = self._check_cache()
    self.model = build_model(config)
    common.layout_state(self, functools.partial(_init_fn, config, self.model,
                                                jax.random.key(config.seed)))
    self.replicated = sharding_lib.replicated(self.mesh)

  def _check_cache(self) -> dict:
    c = self.config
    if not c.data.cache_dir:
      raise ValueError("config.data.cache_dir must name a latent cache (cache_latents stage)")
    manifest = latents_lib.load_manifest(c.data.cache_dir)
    if tuple(manifest["latent_shape"]) != latent_shape(c):
      raise ValueError(f"latent cache {c.data.cache_dir} holds latents "
                       f"{tuple(manifest['latent_shape'])}, the model expects "
                       f"{latent_shape(c)} (config.model.latent_size / latent_dim)")
    if manifest["num_classes"] > c.model.num_classes:
      raise ValueError(f"latent cache {c.data.cache_dir} has {manifest['num_classes']} "
                       f"classes, config.model.num_classes={c.model.num_classes}")
    return manifest

  def init_state(self):
    with jax.set_mesh(self.mesh):
      return jax.jit(lambda: nn.meta.unbox(self.init_fn()),
                     out_shardings=self.state_shardings)()

  def stats(self) -> dict:
    mean, std = latents_lib.load_stats(self.config.data.cache_dir)
    return jax.device_put({"mean": jnp.asarray(mean), "std": jnp.asarray(std)},
                          self.replicated)

  def compile_train_step(self, donate: Optional[bool] = None, return_lowered: bool = False):
    """AOT-compiled train_step; donate (the state) defaults to config.donate;
    return_lowered: (compiled, lowered) as common.compile_step."""
    step = functools.partial(train_step, model=self.model, config=self.config)
    b, d = self.config.batch_size, self.config.model.latent_dim
    batch = {"latent": jax.ShapeDtypeStruct((b, *latent_shape(self.config)), jnp.float32,
                                            sharding=self.data_sharding),
             "label": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=self.data_sharding)}
    stats = {k: jax.ShapeDtypeStruct((d,), jnp.float32, sharding=self.replicated)
             for k in ("mean", "std")}
    return common.compile_step(
        step, self.state_shardings, (self.data_sharding, self.replicated), self.replicated,
        (self.abstract_state, batch, stats), self.mesh,
        donate=self.config.get("donate", True) if donate is None else donate,
        rules=self.rules, return_lowered=return_lowered)

  def train_iterator(self):
    c = self.config
    return latents_lib.make_latent_iterator(
        c.data.cache_dir, batch_size=self.per_process_batch, seed=c.seed, flip=c.data.flip,
        read_threads=int(c.data.read_threads))


class SampleGrid:
  """Fixed noise + class-uniform labels -> a decoded PNG grid from the EMA params."""

  def __init__(self, setup: Setup, tok_path: str):
    from gae_jax import pretrained  # pylint: disable=g-import-not-at-top
    c = setup.config
    tc = c.get("tokenizer") or {}
    self.tokenizer = pretrained.open_tokenizer(tok_path, use_ema=tc.get("use_ema", True),
                                               vfm_weights=tc.get("vfm_weights"))
    if self.tokenizer.latent_shape != latent_shape(c):
      raise ValueError(f"tokenizer {tok_path} has latents {self.tokenizer.latent_shape}, "
                       f"the DiT {latent_shape(c)}")
    n_dev = setup.data_sharding.mesh.size
    classes = min(c.model.num_classes, setup.manifest["num_classes"])
    n = max(n_dev, -(-c.num_eval_images // n_dev) * n_dev)
    self.labels = sharding_lib.global_array(np.arange(n, dtype=np.int32) % classes,
                                          setup.data_sharding)
    with jax.set_mesh(setup.mesh):
      self.noise = jax.jit(
          functools.partial(generate_lib.noise_for, c.seed + 1, shape=latent_shape(c)),
          out_shardings=setup.data_sharding)(np.arange(n, dtype=np.uint32))
    self.tok_params = jax.device_put(self.tokenizer.params, setup.replicated)
    self.setup = setup
    self._compiled = None

  def __call__(self, ema_params, stats) -> np.ndarray:
    s = self.setup
    if self._compiled is None:
      self._compiled = generate_lib.compile_generate(
          s.model, self.tokenizer.decode_fn, s.config.sample_grid, s.mesh, s.rules,
          self.labels.shape[0], latent_shape(s.config), ema_params, self.tok_params)
    with jax.set_mesh(s.mesh):
      images = self._compiled(ema_params, self.tok_params, self.noise, self.labels,
                              jax.random.key(s.config.seed + 2), stats["mean"], stats["std"])
    return common.to_host_images(images)


def plan(config) -> dict:
  """--dry_run: parameter counts (trainable, and with the frozen pos-embed as the paper)."""
  s = Setup(config, need_data=False)
  counts = {}
  for k, v in common.param_counts(s.abstract_boxed.params).items():
    k = "blocks" if k.startswith("blocks_") else k   # depth x the same block
    counts[k] = counts.get(k, 0) + v
  trainable = int(sum(counts.values()))
  with_pos = dit_lib.param_count(s.model, latent_shape(config), include_pos_embed=True)
  return {"stage": config.stage,
          "model": f"LightningDiT-{config.model.variant}/{config.model.patch_size}",
          "params": counts,
          "trainable_total": trainable,
          "trainable_total_M": round(trainable / 1e6, 2),
          "paper_count": with_pos,
          "paper_count_M": round(with_pos / 1e6, 2),
          "paper_count_note": "trainable + the frozen sin-cos pos_embed buffer, which the "
                              "released PyTorch model registers as a parameter (Tab. 13)",
          "latent_shape": list(latent_shape(config)),
          "qk_norm": bool(config.model.qk_norm),
          "mesh": common.mesh_plan(s.mesh),
          "batch": {"global": config.batch_size, "per_process": s.per_process_batch},
          "total_steps": config.total_steps,
          "compute_dtype": str(common.compute_dtype(config))}


def _tokenizer_path(config, manifest) -> Optional[str]:
  """config.tokenizer.path, else the tokenizer the latent cache was encoded with."""
  return config.tokenizer.path or latents_lib.manifest_tokenizer(manifest)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The training loop; returns the last logged metrics."""
  common.write_config(config, workdir)
  s = Setup(config)
  stats = s.stats()
  ckpt = common.checkpointer(config, workdir)
  train_iter = s.train_iterator()
  state = common.restore_or_init(ckpt, s.abstract_state, train_iter, s.init_state,
                                 config.total_steps)
  if state is None:
    return {}
  compiled = s.compile_train_step()
  grid = None
  tok_path = _tokenizer_path(config, s.manifest)
  if config.image_every and tok_path:
    grid = SampleGrid(s, tok_path)
  elif config.image_every:
    logging.warning("No tokenizer known (config.tokenizer.path, cache manifest): no sample "
                    "grids")

  def sample_grid(step, state, writer):
    images = grid(state.ema_params, stats)
    if jax.process_index() == 0:
      png = metrics_lib.image_grid(images, ncols=8)
      path = os.path.join(workdir, "images", f"samples_{step:07d}.png")
      metrics_lib.save_png(path, png)
      writer.write_images(step, {"samples": png})
      logging.info("step %d  wrote %s", step, path)
    return {}

  return common.run_loop(
      config, workdir, state=state, step_fn=lambda st, b: compiled(st, b, stats),
      train_iter=train_iter, data_sharding=s.data_sharding, ckpt=ckpt,
      log_keys=(("loss", ".4f"), ("mse", ".4f"), ("cos", ".4f"), ("grad_norm", ".3f")),
      periodic=((config.image_every if grid is not None else 0, sample_grid),))
