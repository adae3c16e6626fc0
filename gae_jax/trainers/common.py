"""Pieces every trainer shares: optimizer, train state, sharded init, step compile, logging.

A trainer (teacher / autoencoder / flow) is a module with
  `train_and_evaluate(config, workdir)` and `plan(config) -> dict` (the --dry_run plan),
in the shape of big_vision/train.py: mesh -> data -> abstract state -> shardings -> sharded
init or restore -> AOT-compiled step -> loop with metrics, image grids and checkpoints.
"""

import json
import os
import signal
import threading
from typing import Any, Callable, Optional

from absl import logging
from flax import struct
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from gae_jax import checkpoint as ckpt_lib
from gae_jax import console
from gae_jax import metrics as metrics_lib
from gae_jax import paths
from gae_jax import sharding as sharding_lib
from gae_jax.data import pipeline


@struct.dataclass
class TrainState:
  """Everything a step reads and writes; frozen networks are passed separately."""
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array                    # raw uint32 key data; per-step keys by fold_in(step)
  ema_params: Any = None
  model_state: Any = None           # e.g. discriminator BatchNorm statistics
  # Updates skipped because the loss, a gradient or the new parameters were non-finite:
  # consecutive (reset by a finite update) and in total (guard_update).
  skipped_run: Any = struct.field(default_factory=lambda: jnp.zeros((), jnp.int32))
  skipped_total: Any = struct.field(default_factory=lambda: jnp.zeros((), jnp.int32))


def learning_rate_schedule(opt: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warm-up from 0, then cosine decay to `end_lr`, or constant."""
  warmup = int(opt.warmup_steps)
  if opt.schedule == "cosine":
    decay_steps = max(1, int(total_steps) - warmup)
    main = optax.cosine_decay_schedule(opt.lr, decay_steps, alpha=opt.end_lr / opt.lr)
  elif opt.schedule == "constant":
    main = optax.constant_schedule(opt.lr)
  else:
    raise ValueError(f"unknown schedule {opt.schedule!r}: use 'cosine' or 'constant'")
  if warmup <= 0:
    return main
  return optax.join_schedules(
      [optax.linear_schedule(0.0, opt.lr, warmup), main], boundaries=[warmup])


def decay_mask(params):
  """No weight decay on vectors/scalars (norm scales, biases, logvar)."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(opt: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  """(optional global-norm clipping) + AdamW with the schedule above."""
  tx = optax.adamw(learning_rate_schedule(opt, total_steps), b1=opt.b1, b2=opt.b2,
                   eps=opt.get("eps", 1e-8), weight_decay=opt.weight_decay, mask=decay_mask)
  if opt.get("grad_clip"):
    tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip), tx)
  return tx


def ema_update(ema, params, decay: float):
  return jax.tree.map(lambda e, p: e * decay + (1.0 - decay) * p.astype(e.dtype), ema, params)


def global_norm(tree) -> jax.Array:
  return optax.tree.norm(tree)


def guard_update(old: TrainState, new: TrainState, *checks: jax.Array
                 ) -> tuple[TrainState, dict]:
  """`new` when every scalar in `checks` (loss, gradient norms, new parameter norm) is
  finite, else `old` with only the step advanced: params, optimizer, EMA and model state
  untouched, so a non-finite state never exists. On device, no host sync (one select per
  leaf). Returns (state, metrics): update_skipped (0/1), skipped_run (consecutive skips),
  skipped_total. A norm is non-finite iff some element of its tree is (or it overflowed).
  """
  ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(jnp.asarray(c, jnp.float32)))
                          for c in checks]))
  keep = lambda n, o: jax.tree.map(lambda a, b: jnp.where(ok, a, b), n, o)
  state = new.replace(
      params=keep(new.params, old.params), opt_state=keep(new.opt_state, old.opt_state),
      ema_params=keep(new.ema_params, old.ema_params),
      model_state=keep(new.model_state, old.model_state),
      skipped_run=jnp.where(ok, 0, old.skipped_run + 1).astype(jnp.int32),
      skipped_total=(old.skipped_total + jnp.where(ok, 0, 1)).astype(jnp.int32))
  return state, dict(update_skipped=1.0 - ok.astype(jnp.float32),
                     skipped_run=state.skipped_run, skipped_total=state.skipped_total)


def compute_dtype(config) -> jnp.dtype:
  """bf16 (or whatever the config says) on accelerators, float32 on CPU."""
  name = config.compute_dtype
  if jax.default_backend() == "cpu":
    name = config.get("compute_dtype_cpu", "float32")
  return jnp.dtype(name)


def frozen_dtype(config) -> jnp.dtype:
  """Compute dtype of the frozen networks (LPIPS VGG, VFM, teacher): `config.frozen_dtype`,
  or the compute dtype when it is None (or absent)."""
  name = config.get("frozen_dtype")
  return jnp.dtype(name) if name else compute_dtype(config)


def frozen_storage(config, tree):
  """Frozen weights as the step receives them: float leaves cast to `config.frozen_dtype`
  when it is set (bfloat16 halves their memory and reads); unchanged when it is None."""
  if not config.get("frozen_dtype"):
    return tree
  dtype = jnp.dtype(config.frozen_dtype)
  return jax.tree.map(lambda a: np.asarray(a).astype(dtype)
                      if np.issubdtype(np.asarray(a).dtype, np.floating) else a, tree)


def rng_from_seed(seed: int) -> jax.Array:
  return jax.random.key_data(jax.random.key(seed))


def step_rng(state_rng: jax.Array, step) -> jax.Array:
  return jax.random.fold_in(jax.random.wrap_key_data(state_rng), step)


def param_counts(params) -> dict:
  """{top-level module: parameter count} of a (possibly abstract, possibly boxed) tree."""
  params = nn.meta.unbox(params)
  return {k: sharding_lib.tree_size(v) for k, v in params.items()}


def sharded_init(init_fn: Callable[[], Any], mesh, rules, mode: str = "logical"):
  """Shapes first: eval_shape -> shardings from logical rules -> jitted init with out_shardings.

  `init_fn` returns a (possibly boxed) pytree; returns (unboxed arrays, their shardings).
  """
  abstract = jax.eval_shape(init_fn)
  shardings = sharding_lib.tree_shardings(abstract, mesh, rules, mode)
  with jax.set_mesh(mesh):  # no rules: see layout_state
    values = jax.jit(lambda: nn.meta.unbox(init_fn()), out_shardings=shardings)()
  return values, shardings


def abstract_with_shardings(abstract, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      nn.meta.unbox(abstract), shardings)


def compile_step(step_fn, state_shardings, in_shardings_rest, out_metrics_sharding,
                 abstract_args, mesh, donate: bool = True, name: str = "train_step",
                 rules=None, return_lowered: bool = False):
  """AOT: jit with shardings (+ donation of the state), lower, compile.

  Lowered inside `sharding_lib.mesh_rules(mesh, rules)`, so the models' logical activation
  constraints become sharding constraints (rules None: no constraints). Returns the
  compiled step, or (compiled, jax.stages.Lowered) with return_lowered.

  Logs 'compiling <name> ...' and then the time it took (or that it came from the
  persistent compilation cache) with the program's memory use per device.
  """
  jitted = jax.jit(step_fn, in_shardings=(state_shardings, *in_shardings_rest),
                   out_shardings=(state_shardings, out_metrics_sharding),
                   donate_argnums=(0,) if donate else ())
  rules_ctx = (sharding_lib.mesh_rules(mesh, rules) if rules is not None
               else jax.set_mesh(mesh))
  with console.compiling(name) as info, rules_ctx:
    lowered = jitted.lower(*abstract_args)
    compiled = lowered.compile()
    try:
      mem = compiled.memory_analysis()
      if mem is not None:
        info["detail"] = (f"per device: args {mem.argument_size_in_bytes / 2**20:.1f} MiB, "
                          f"temps {mem.temp_size_in_bytes / 2**20:.1f} MiB, "
                          f"outputs {mem.output_size_in_bytes / 2**20:.1f} MiB")
    except Exception:  # memory_analysis is unsupported on some backends
      pass
  return (compiled, lowered) if return_lowered else compiled


def image_batch_abstract(setup) -> dict:
  """The train step's abstract image batch: {"image": (B, H, W, 3) float32, "label": (B,)
  int32}, global batch B = config.batch_size, sharded like setup.data_sharding."""
  b, size = setup.config.batch_size, setup.config.data.image_size
  return {"image": jax.ShapeDtypeStruct((b, size, size, 3), jnp.float32,
                                        sharding=setup.data_sharding),
          "label": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=setup.data_sharding)}


def compile_frozen_step(setup, step_fn, batch: dict, frozen, donate: Optional[bool] = None,
                        return_lowered: bool = False):
  """compile_step for `step_fn(state, batch, frozen)`: the frozen networks' tree is a
  non-donated argument laid out as it already is; donate (the state) defaults to
  config.donate."""
  frozen_sh = jax.tree.map(lambda a: a.sharding, frozen)
  frozen_abs = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), frozen)
  return compile_step(
      step_fn, setup.state_shardings, (setup.data_sharding, frozen_sh),
      sharding_lib.replicated(setup.mesh), (setup.abstract_state, batch, frozen_abs),
      setup.mesh, donate=setup.config.get("donate", True) if donate is None else donate,
      rules=setup.rules, return_lowered=return_lowered)


def fixed_eval_batch(setup) -> dict:
  """A fixed validation batch (the same images every call) as global arrays: the largest
  multiple of the device count <= config.num_eval_images (at least one per device)."""
  n_dev = setup.data_sharding.mesh.size   # a multiple of every batch-shard count
  n = max(n_dev, (setup.config.num_eval_images // n_dev) * n_dev)
  it = pipeline.make_iterator(setup.config.data, split="val",
                              batch_size=n // jax.process_count(), seed=0, shuffle=False,
                              repeat=True, drop_remainder=True)
  return sharding_lib.to_global(next(iter(it)), setup.data_sharding)


def reconstruction_evaluator(workdir: str, eval_fn, eval_batch: dict, frozen):
  """The autoencoders' periodic eval: `evaluate(step, state, writer) -> metrics`.

  eval_fn(params, batch, frozen) -> (x_hat, metrics) on the generator's EMA params (else the
  params); writes val/* scalars, an original|reconstruction PNG grid
  (<workdir>/images/recon_<step>.png, process 0) and one console line.
  """

  def evaluate(step, state, writer):
    params = state.ema_params if state.ema_params is not None else state.params["generator"]
    x_hat, em = eval_fn(params, eval_batch, frozen)
    em = {f"val/{k}": v for k, v in host_metrics(em).items()}
    writer.write_scalars(step, em)
    originals = metrics_lib.to_uint8(to_host_images(eval_batch["image"]))
    recons = metrics_lib.to_uint8(to_host_images(x_hat))
    pairs = np.stack([originals, recons], 1).reshape(-1, *originals.shape[1:])
    png = os.path.join(workdir, "images", f"recon_{step:07d}.png")
    if jax.process_index() == 0:
      grid = metrics_lib.image_grid(pairs, ncols=8)
      metrics_lib.save_png(png, grid)
      writer.write_images(step, {"reconstructions": grid})
    logging.info("eval step %d: val psnr %.2f dB  l1 %.4f  lpips %.4f on %d images; "
                 "original|reconstruction pairs in %s", step, em["val/psnr"], em["val/l1"],
                 em["val/lpips"], len(originals), png)
    return em

  return evaluate


def write_config(config, workdir: str):
  """<workdir>/config.json; also starts the run's console record (plan, summary)."""
  console.begin_run(config, workdir)
  if jax.process_index() == 0:
    paths.write_text(paths.join(workdir, "config.json"), config.to_json_best_effort(indent=2))


def write_plan(workdir: str, plan: dict) -> str:
  path = paths.join(workdir, "plan.json")
  if jax.process_index() == 0:
    paths.write_text(path, json.dumps(plan, indent=2))
  return path


def mesh_plan(mesh) -> dict:
  return {"axes": dict(mesh.shape), "devices": int(mesh.size),
          "processes": jax.process_count(), "platform": jax.default_backend()}


def host_metrics(metrics) -> dict:
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


def to_host_images(x: jax.Array) -> np.ndarray:
  """Gathers a (possibly sharded, multi-host) image batch to host numpy."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def layout_state(setup, init_fn: Callable[[], Any]) -> None:
  """Sharded train-state layout of a trainer's Setup (which has .config, .mesh, .rules).

  Sets setup.init_fn, .abstract_boxed (eval_shape of init_fn, with logical axes),
  .state_shardings, .abstract_state (ShapeDtypeStructs carrying them), .data_sharding and
  .per_process_batch (checked against the mesh).

  init_fn must initialise the optimizer (and EMA) from the *boxed* params, so that every
  moment carries its parameter's logical names and gets exactly its sharding. The init is
  traced without the logical rules (flax's DenseGeneral would constrain its flattened
  kernel with the unflattened names); its layout comes from out_shardings. The step is
  lowered inside the rules (compile_step), where the activation constraints apply.
  """
  c = setup.config
  setup.init_fn = init_fn
  setup.abstract_boxed = jax.eval_shape(init_fn)
  setup.state_shardings = sharding_lib.tree_shardings(
      setup.abstract_boxed, setup.mesh, setup.rules, c.param_sharding)
  setup.abstract_state = abstract_with_shardings(setup.abstract_boxed, setup.state_shardings)
  setup.data_sharding = sharding_lib.data_sharding(setup.mesh, setup.rules)
  setup.per_process_batch = sharding_lib.global_batch_check(c.batch_size, setup.mesh,
                                                            setup.rules)


# ------------------------------------------------------------------------------- loop


def checkpointer(config, workdir: str):
  """The run's Checkpointer: <workdir>/checkpoints, every config.ckpt_every, keep_ckpts."""
  return ckpt_lib.Checkpointer(paths.join(workdir, "checkpoints"),
                               save_every=config.ckpt_every, keep=config.keep_ckpts)


def _restore_with_legacy_counters(ckpt, step: int, abstract_state, train_iter):
  """ckpt.restore; a checkpoint written before the skip counters existed (no skipped_run /
  skipped_total entries) restores the rest and starts both counters at 0."""
  saved = ckpt_lib.metadata_tree(ckpt.directory, step)
  if (not isinstance(saved, dict) or saved.get("skipped_run") is not None
      or not isinstance(abstract_state, TrainState)):
    return ckpt.restore(abstract_state, train_iter)
  state = ckpt.restore(abstract_state.replace(skipped_run=None, skipped_total=None),
                       train_iter)
  zero = lambda a: jax.device_put(jnp.zeros(a.shape, a.dtype), a.sharding)
  logging.info("checkpoint %s/%d predates the non-finite skip counters: they start at 0",
               ckpt.directory, step)
  return state.replace(skipped_run=zero(abstract_state.skipped_run),
                       skipped_total=zero(abstract_state.skipped_total))


def restore_or_init(ckpt, abstract_state, train_iter, init_fn: Callable[[], Any],
                    total_steps: int):
  """The latest checkpoint (state + data iterator) or `init_fn()`; None when already done.

  Logs the run's plan first (module sizes, mesh, batch, steps, outputs). Closes `ckpt` in
  the None case (the run has nothing left to do).
  """
  latest = ckpt.latest_step()
  mesh = next(l.sharding.mesh for l in jax.tree.leaves(abstract_state)
              if hasattr(getattr(l, "sharding", None), "mesh"))
  console.log_plan(params=abstract_state.params, mesh=mesh, total_steps=total_steps,
                   start_step=latest or 0)
  if latest is not None:
    state = _restore_with_legacy_counters(ckpt, latest, abstract_state, train_iter)
  else:
    with console.compiling("init", starting="initialising the train state",
                           done="train state initialised"):
      state = jax.block_until_ready(init_fn())
  if int(state.step) >= total_steps:
    logging.info("checkpoint step %d already reaches total_steps=%d: nothing to do "
                 "(raise --config.total_steps to train on)", int(state.step), total_steps)
    steps = ckpt.all_steps()
    ckpt.close()
    console.log_summary(step=int(state.step), start_step=int(state.step), metrics={},
                        checkpoint_dir=ckpt.directory, checkpoint_steps=steps)
    return None
  return state


class _StopFlag:
  """SIGTERM -> a flag the loop reads at the next step boundary (installed in the main
  thread of a single-process run only; the previous handler is restored on exit). With
  several processes JAX's preemption service owns SIGTERM and the processes agree on the
  step through orbax's reached_preemption (Checkpointer.preempted)."""

  def __init__(self):
    self.set = False
    self._previous = None

  def _handler(self, signum, frame):  # pylint: disable=unused-argument
    self.set = True
    logging.warning("SIGTERM received: saving a checkpoint at the next step boundary, "
                    "then exiting")

  def __enter__(self):
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handler)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


class NonFiniteStop(FloatingPointError):
  """Too many consecutive non-finite updates were skipped (run_loop)."""


def _last_good(ckpt) -> str:
  steps = ckpt.all_steps()
  return f"{ckpt.directory}/{steps[-1]}" if steps else "none (no checkpoint yet)"


def run_loop(config, workdir: str, *, state, step_fn: Callable[[Any, dict], tuple[Any, Any]],
             train_iter, data_sharding, ckpt, log_keys: tuple[tuple[str, str], ...],
             periodic: tuple[tuple[int, Callable], ...] = (), banner: str = "") -> dict:
  """Steps `state` to config.total_steps; returns the last logged metrics.

  step_fn(state, global_batch) -> (state, device metrics); the step skips non-finite
  updates on device (guard_update) and reports skipped_run / skipped_total. Every
  config.log_every steps (and on the first and last) the metrics are written and logged
  with `log_keys` ((name, format) pairs); there the host reads the skip counter and stops
  (NonFiniteStop, one line naming the step and the last good checkpoint) after
  config.max_nonfinite_steps consecutive skips. `periodic` holds (every, fn(step, state,
  writer) -> dict) actions (eval, image grids) run every `every` steps and on the last;
  their dicts join the returned metrics. A checkpoint (with the data iterator) is offered
  every step: the Checkpointer saves on its interval and (forced) on the last step, but
  never while the latest update was skipped, so divergence cannot rotate good checkpoints
  out. SIGTERM (single process) or the preemption notice (several processes): a forced
  save at the next step boundary, wait for it, SystemExit(0).
  """
  total = int(config.total_steps)
  max_bad = int(config.get("max_nonfinite_steps", 20) or 0)
  writer = metrics_lib.MetricWriter(workdir)
  start = int(state.step)
  progress = metrics_lib.Progress(total, config.batch_size, start)
  mesh = data_sharding.mesh
  if banner:
    logging.info("training %s", banner)
  last = {}
  with _StopFlag() as sigterm:
    for step in range(start + 1, total + 1):
      batch = sharding_lib.to_global(next(train_iter), data_sharding)
      state, m = step_fn(state, batch)
      if step % config.log_every == 0 or step == total or step == start + 1:
        last = host_metrics(m)
        last.update(progress(step))
        writer.write_scalars(step, last)
        logging.info("%s", console.progress_line(step, total, last, log_keys))
        run_bad = int(last.get("skipped_run", 0))
        if run_bad:
          logging.warning("step %d: %d consecutive non-finite update(s) skipped (%d in "
                          "total)", step, run_bad, int(last.get("skipped_total", 0)))
        if max_bad and run_bad >= max_bad:
          ckpt.wait()
          good = _last_good(ckpt)
          ckpt.close()
          writer.close()
          raise NonFiniteStop(
              f"step {step}: {run_bad} consecutive non-finite updates skipped (>= "
              f"config.max_nonfinite_steps={max_bad}); last good checkpoint: {good}")
      for every, fn in periodic:
        if every and (step % every == 0 or step == total):
          with jax.set_mesh(mesh):
            last.update(fn(step, state, writer) or {})
      preempted = sigterm.set or ckpt.preempted(step)
      if ckpt.due(step) or preempted or step == total:
        if int(jax.device_get(state.skipped_run)):
          logging.warning("step %d: checkpoint skipped: the latest update was non-finite "
                          "(last good checkpoint: %s)", step, _last_good(ckpt))
        else:
          ckpt.save(step, state, train_iter, force=True)
      if preempted:
        ckpt.wait()
        saved = ckpt.all_steps()
        ckpt.close()
        writer.close()
        logging.warning("preempted at step %d: checkpoints %s in %s; exiting (resume with "
                        "the same command)", step, saved, ckpt.directory)
        raise SystemExit(0)
  ckpt.wait()
  saved = ckpt.all_steps()
  ckpt.close()
  writer.close()
  console.log_summary(step=total, start_step=start, metrics=last, keys=log_keys,
                      checkpoint_dir=ckpt.directory, checkpoint_steps=saved)
  return last


# ------------------------------------------------------------------------------- GAN


def discriminator_update(disc, params, batch_stats, opt_state, tx, x_real: jax.Array,
                         x_fake: jax.Array, active: jax.Array, loss: str = "hinge"
                         ) -> tuple[Any, Any, Any, dict]:
  """One PatchGAN step (taming's LPIPSWithDiscriminator optimizer_idx=1), jit-safe.

  disc: the NLayerDiscriminator; params / batch_stats: its variables; tx: its optimizer.
  D sees the real batch, then the (detached) fake batch, BatchNorm statistics threaded
  through both (train mode). loss: 'hinge' or 'vanilla' (`losses.hinge_d_loss` /
  `vanilla_d_loss`). `active` (traced bool, step >= disc_start): when False the params,
  optimizer state and statistics are returned unchanged (no weight decay creeping in).
  Returns (params, opt_state, batch_stats, metrics: d_loss, logits_real, logits_fake,
  disc_grad_norm).
  """
  from gae_jax import losses  # pylint: disable=g-import-not-at-top
  if loss not in ("hinge", "vanilla"):
    raise ValueError(f"config.loss.disc_loss={loss!r}; choose 'hinge' or 'vanilla'")
  d_fn = losses.hinge_d_loss if loss == "hinge" else losses.vanilla_d_loss
  x_fake = jax.lax.stop_gradient(x_fake)

  def loss_fn(p):
    real, upd = disc.apply({"params": p, "batch_stats": batch_stats}, x_real, train=True,
                           mutable=["batch_stats"])
    fake, upd = disc.apply({"params": p, "batch_stats": upd["batch_stats"]}, x_fake,
                           train=True, mutable=["batch_stats"])
    return d_fn(real, fake), (upd["batch_stats"], real.mean(), fake.mean())

  (d_loss, (new_stats, real_m, fake_m)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(params)
  updates, new_opt = tx.update(grads, opt_state, params)
  new_params = jax.tree.map(lambda p, u: p + u, params, updates)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(active, a, b), new, old)
  return (keep(new_params, params), keep(new_opt, opt_state), keep(new_stats, batch_stats),
          dict(d_loss=d_loss, logits_real=real_m, logits_fake=fake_m,
               disc_grad_norm=global_norm(grads)))
