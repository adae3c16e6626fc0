"""Side by side on CPU: gae_jax against the authors' PyTorch modules on the same weights.

  rows = run("/path/to/GAE")      # a checkout of github.com/sii-research/GAE (never committed)
  print(format_rows(rows))

Three tasks, each on one set of random weights: the release's modules are built and
random-initialised (their own init; the parameters they zero-initialise, the DiT's adaLN
and output layers, get N(0, 0.02^2) so the outputs are not trivially zero), their
state_dict is converted with gae_jax.convert (`gae.convert_gae`, `dit.convert_dit`, the
released-layout readers), the outputs are checked to agree, then both are timed:

  gae_encode_decode  FoundationEncoderModel.encode -> posterior mode -> decode
                     (tokenizer/gae.py; ViT encoder / adapter / RMS latent norm / ViT
                     decoder) vs gae_jax `GAE.encode` (z = mu) -> `GAE.decode`, no grad.
  dit_train_step     LightningDiT (models/lightningdit_we.py) + their Transport
                     (transport/: Linear path, velocity, cosine loss, logit-normal t,
                     shift 0.7) + torch.optim.AdamW (2e-4, betas (0.9, 0.95)) + an EMA
                     update, vs gae_jax's `trainers.flow.train_step` (same loss, optax
                     AdamW, EMA) jitted. Train-step outputs are random (t, noise), so the
                     agreement check is on the velocity forward at fixed (x, t, y).
  dit_sample         their `Sampler.sample_ode` (torchdiffeq Euler on the shifted grid,
                     250 grid points) vs gae_jax `flow.sample(mode="euler")`, same noise
                     and labels (the paper's App. H ablation protocol: Euler ODE, no CFG,
                     shift 0.7); the final latents are compared.

Timings are medians of `repeats` runs after `warmup` (>= 1) untimed runs (the first JAX
call compiles), wall clock, float32 on both sides. torch runs with torch.set_num_threads(n)
for the n cores this process may use (XLA's CPU backend uses one thread per core by
default), and again on 1 thread (see `_torch_times`); each row records the 1-minute load
average, since on a shared machine the figures move with the load.
A task whose release module cannot be imported (a missing dependency such as fairscale or
torchdiffeq) is reported as not run, with the import chain; nothing of theirs is stubbed.
timm is not theirs: the release's LightningDiT takes only `PatchEmbed` and `Mlp` from it, so
where timm cannot be imported (it imports torchvision) gae_jax/benchmark/timm_shim.py
supplies torch stand-ins with timm's parameter names. The DiT rows then say so (`timm`), a
line on stderr says so, and the velocity agreement checks the shimmed forward against ours.
"""

import copy
import importlib
import os
import statistics
import sys
import time
import traceback
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

# ViT sizes of the GAE encoder / decoder (gae_jax.models.vit.VARIANTS): width, depth, heads.
GAE_SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16)}
TOLERANCE = 2e-3   # max |torch - jax| <= TOLERANCE * max(1, max |torch|), float32 both


def _cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def _median_time(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
  """Median wall seconds of fn() over `repeats` runs, after max(1, warmup) untimed runs."""
  for _ in range(max(1, warmup)):
    fn()
  times = []
  for _ in range(max(1, repeats)):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def _torch_times(fn: Callable[[], Any], repeats: int, warmup: int,
                 single_thread: bool) -> dict:
  """{'torch_s': median at the current torch thread count[, 'torch_1thread_s': at 1]}.

  One thread as well: on a machine shared with other jobs, OpenMP's spinning barriers can
  make a multi-threaded torch far slower than a single thread (2 threads took 4-6x longer
  than 1 on this project's loaded 2-core machine), which the ratio should not hide.
  """
  import torch  # pylint: disable=g-import-not-at-top
  out = {"torch_s": _median_time(fn, repeats, warmup)}
  if single_thread and torch.get_num_threads() != 1:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
      out["torch_1thread_s"] = _median_time(fn, repeats, warmup)
    finally:
      torch.set_num_threads(n)
  return out


def _describe_import_error(e: BaseException, path: str) -> str:
  """'models/lightningdit_we.py -> timm -> torchvision: No module named ...' from a traceback."""
  chain = []
  for frame in traceback.extract_tb(e.__traceback__):
    f = os.path.abspath(frame.filename)
    if f.startswith(path + os.sep):
      name = os.path.relpath(f, path)
    elif "site-packages" in f:
      name = f.split("site-packages" + os.sep, 1)[1].split(os.sep, 1)[0]
    else:
      continue
    if not chain or chain[-1] != name:
      chain.append(name)
  missing = getattr(e, "name", None)
  if missing and (not chain or chain[-1] != missing):
    chain.append(missing)
  return f"{' -> '.join(chain)}: {type(e).__name__}: {e}"


def import_release(path: str, module: str):
  """Imports `module` (e.g. 'tokenizer.gae') from the release checkout at `path`.

  Returns (module, None) or (None, why) when an import fails (a missing dependency: the
  chain of files / packages that led to it). Raises FileNotFoundError when `path` is not
  a checkout of sii-research/GAE, ValueError when `module` resolves outside it.
  """
  path = os.path.abspath(os.path.expanduser(os.fspath(path)))
  if not os.path.isfile(os.path.join(path, "tokenizer", "gae.py")):
    raise FileNotFoundError(f"--compare_torch={path}: not a checkout of sii-research/GAE "
                            f"(no tokenizer/gae.py)")
  sys.path.insert(0, path)
  try:
    mod = importlib.import_module(module)
  except ImportError as e:
    return None, _describe_import_error(e, path)
  finally:
    sys.path.remove(path)
  f = os.path.abspath(getattr(mod, "__file__", "") or "")
  if not f.startswith(path + os.sep):
    raise ValueError(f"module {module!r} was imported from {f}, not from the release at "
                     f"{path} (a module of that name was already loaded)")
  return mod, None


def _quiet(fn, *a, **kw):
  """Calls fn with stdout silenced (the release's modules print on construction)."""
  import contextlib  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  with contextlib.redirect_stdout(io.StringIO()):
    return fn(*a, **kw)


def _state_dict_numpy(module) -> dict:
  return {k: v.detach().cpu().float().numpy() for k, v in module.state_dict().items()}


def _agreement(ref: np.ndarray, got: np.ndarray) -> dict:
  diff = float(np.max(np.abs(np.asarray(ref, np.float64) - np.asarray(got, np.float64))))
  tol = TOLERANCE * max(1.0, float(np.max(np.abs(ref))))
  return {"max_abs_diff": diff, "tolerance": tol, "agree": diff <= tol}


def _row(task: str, size: str, batch: int, **kw) -> dict:
  row = {"task": task, "size": size, "batch": batch, "torch_s": None, "jax_s": None,
         "torch_over_jax": None, "torch_1thread_s": None, "max_abs_diff": None,
         "tolerance": None, "agree": None, "status": "ok",
         "load_avg_1min": round(os.getloadavg()[0], 2)}
  row.update(kw)
  if row["torch_s"] and row["jax_s"]:
    row["torch_over_jax"] = row["torch_s"] / row["jax_s"]
  if row["torch_1thread_s"] and row["jax_s"]:
    row["torch_1thread_over_jax"] = row["torch_1thread_s"] / row["jax_s"]
  return row


# ------------------------------------------------------------------------------- tasks


def compare_gae(path: str, *, variant: str = "S", batch: int = 4, image_size: int = 256,
                patch_size: int = 16, latent_dim: int = 32, repeats: int = 3,
                warmup: int = 1, single_thread: bool = True, seed: int = 0) -> dict:
  """GAE encode (z = mu) + decode: the release's FoundationEncoderModel vs gae_jax."""
  import torch  # pylint: disable=g-import-not-at-top
  from gae_jax.convert import gae as convert_gae  # pylint: disable=g-import-not-at-top
  from gae_jax.models import gae as gae_lib  # pylint: disable=g-import-not-at-top
  task, size = "gae_encode_decode", f"ViT-{variant} enc + dec, {image_size} px, d={latent_dim}"
  mod, why = import_release(path, "tokenizer.gae")
  if mod is None:
    return _row(task, size, batch, status=f"not run: {why}")
  width, depth, heads = GAE_SIZES[variant]
  grid = image_size // patch_size
  vit = dict(embed_dim=width, num_layers=depth, num_heads=heads, mlp_ratio=4.0, dropout=0.0)
  torch.manual_seed(seed)
  model = _quiet(
      mod.FoundationEncoderModel,
      ddconfig=dict(input_resolution=grid, out_ch=3, resolution=image_size,
                    z_channels=latent_dim, give_pre_end=False, tanh_out=False,
                    double_z=False, **vit),
      lossconfig=None,
      encoder_config={"target": "tokenizer.utils.decoder.ViTEncoder",
                      "params": dict(img_size=image_size, patch_size=patch_size, in_ch=3,
                                     out_ch=width, **vit)},
      adapter_config={"target": "tokenizer.utils.encoder.adapter.Adapter",
                      "params": dict(in_channels=width, out_channels=latent_dim)},
      sigma_std=0.2, use_sigma_vae=True, latent_dim=latent_dim, encoder_channels=width,
      use_norm=True, align_type="mid").eval()
  params, kw = convert_gae.convert_gae(_state_dict_numpy(model))
  ours = gae_lib.GAE(width=kw["width"], depth=kw["depth"], num_heads=kw["num_heads"],
                     decoder_width=kw["decoder_width"], decoder_depth=kw["decoder_depth"],
                     decoder_num_heads=kw["decoder_num_heads"], patch_size=kw["patch_size"],
                     latent_dim=kw["latent_dim"])
  params = jax.device_put(params)

  @jax.jit
  def reconstruct(p, x):
    _, aux = ours.apply({"params": p}, x, train=False, method=gae_lib.GAE.encode)
    return ours.apply({"params": p}, aux["mu"], method=gae_lib.GAE.decode)

  x = np.random.default_rng(seed).uniform(-1, 1, (batch, image_size, image_size, 3)
                                          ).astype(np.float32)
  x_t = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  x_j = jnp.asarray(x)

  def run_torch():
    with torch.no_grad():
      posterior, _ = model.encode(x_t)
      return model.decode(posterior.mode())

  run_jax = lambda: jax.block_until_ready(reconstruct(params, x_j))  # noqa: E731
  agree = _agreement(run_torch().numpy().transpose(0, 2, 3, 1), np.asarray(run_jax()))
  row = _row(task, size, batch, **_torch_times(run_torch, repeats, warmup, single_thread),
             jax_s=_median_time(run_jax, repeats, warmup), **agree)
  if not agree["agree"]:
    row["status"] = "outputs differ"
  return row


def _release_dit(path: str, variant: str, latent_size: int, latent_dim: int, seed: int):
  """(their LightningDiT, their transport package, our converted params + kwargs) or why."""
  import torch  # pylint: disable=g-import-not-at-top
  from gae_jax.convert import dit as convert_dit  # pylint: disable=g-import-not-at-top
  from gae_jax.benchmark import timm_shim  # pylint: disable=g-import-not-at-top
  with timm_shim.release_timm(log=lambda m: print(m, file=sys.stderr)) as timm_used:
    mod, why = import_release(path, "models.lightningdit_we")
  if mod is None:
    return None, why
  transport, why = import_release(path, "transport")
  if transport is None:
    return None, why
  model_cfg = dict(model_type=f"LightningDiT-{variant}", use_qknorm=False, use_swiglu=True,
                   use_rope=True, use_rmsnorm=True, wo_shift=False, in_chans=latent_dim)
  torch.manual_seed(seed)
  model = mod.LightningDiT_models[model_cfg["model_type"]](
      input_size=latent_size, num_classes=1000, use_qknorm=False, use_swiglu=True,
      use_rope=True, use_rmsnorm=True, wo_shift=False, in_channels=latent_dim,
      use_abs_pos=True)
  with torch.no_grad():
    for _, p in model.named_parameters():
      if p.requires_grad and not bool(p.any()):   # zero-initialised (adaLN, output layer)
        p.normal_(0.0, 0.02)
  params, kw = convert_dit.convert_dit(_state_dict_numpy(model), config={"model": model_cfg},
                                       source="release LightningDiT")
  return (model, transport, params, kw, timm_used), None


def compare_dit(path: str, *, variant: str = "B/1", batch: int = 4, sample_batch: int = 1,
                num_steps: int = 250, latent_size: int = 16, latent_dim: int = 32,
                shift: float = 0.7, repeats: int = 3, warmup: int = 1,
                single_thread: bool = True, seed: int = 0) -> list[dict]:
  """DiT train step and `num_steps`-point Euler sampling: the release vs gae_jax."""
  import torch  # pylint: disable=g-import-not-at-top
  from gae_jax import configs_lib  # pylint: disable=g-import-not-at-top
  from gae_jax import pretrained  # pylint: disable=g-import-not-at-top
  from gae_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from gae_jax.trainers import flow as flow_trainer  # pylint: disable=g-import-not-at-top
  size = f"LightningDiT-{variant}, {latent_size}x{latent_size}x{latent_dim} latents"
  train_task, sample_task = "dit_train_step", f"dit_sample_{num_steps}"
  got, why = _release_dit(path, variant, latent_size, latent_dim, seed)
  if got is None:
    return [_row(train_task, size, batch, status=f"not run: {why}"),
            _row(sample_task, size, sample_batch, status=f"not run: {why}")]
  model, transport_pkg, params, kw, timm_used = got
  handle = pretrained.DiTHandle(params, kw, source="release LightningDiT")
  rng = np.random.default_rng(seed)
  shape = (latent_size, latent_size, latent_dim)
  nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # noqa
  nhwc = lambda t: t.detach().numpy().transpose(0, 2, 3, 1)  # noqa: E731

  # Velocity agreement at fixed inputs (the train step's own inputs are random).
  x = rng.standard_normal((batch, *shape)).astype(np.float32)
  t = rng.uniform(0, 1, (batch,)).astype(np.float32)
  y = rng.integers(0, 1000, (batch,)).astype(np.int64)
  model.eval()
  with torch.no_grad():
    v_ref = nhwc(model(nchw(x), torch.from_numpy(t), torch.from_numpy(y)))
  v_agree = _agreement(v_ref, np.asarray(handle.velocity(x, t, y.astype(np.int32))))

  # Train step, theirs: Transport.training_losses (MSE + cosine) -> backward -> AdamW -> EMA.
  tr = transport_pkg.create_transport("Linear", "velocity", None, None, None,
                                      use_cosine_loss=True, use_lognorm=True,
                                      train_timestep_shift=shift)
  train_model = copy.deepcopy(model).train()
  ema = copy.deepcopy(model).requires_grad_(False)
  opt = torch.optim.AdamW(train_model.parameters(), lr=2e-4, betas=(0.9, 0.95),
                          weight_decay=0.0)
  x_t, y_t = nchw(x), torch.from_numpy(y)

  def torch_step():
    terms = tr.training_losses(train_model, x_t, dict(y=y_t))
    loss = terms["loss"].mean() + terms["cos_loss"].mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():
      for e, p in zip(ema.parameters(), train_model.parameters()):
        e.mul_(0.9999).add_(p.detach(), alpha=1 - 0.9999)
    return loss.item()

  # Ours: the flow trainer's step, compiled as in training, on the converted params.
  cfg = configs_lib.dit_config(f"variant={variant}", latent_dim=latent_dim, epochs=80)
  cfg.batch_size = batch
  cfg.model.latent_size = latent_size
  cfg.mesh = [("data", 1), ("fsdp", 1), ("tensor", 1)]
  s = flow_trainer.Setup(cfg, mesh=sharding_lib.make_mesh(cfg.mesh, jax.devices()[:1]),
                         need_data=False)
  state = s.init_state()
  p = jax.device_put(jax.tree.map(jnp.asarray, params), s.state_shardings.params)
  state = state.replace(params=p, ema_params=jax.tree.map(jnp.copy, p),   # own buffers:
                        opt_state=flow_trainer.make_optimizer(cfg).init(p))  # state is donated
  compiled = s.compile_train_step()
  batch_j = {"latent": jax.device_put(x, s.data_sharding),
             "label": jax.device_put(y.astype(np.int32), s.data_sharding)}
  stats = jax.device_put({"mean": jnp.zeros((latent_dim,)), "std": jnp.ones((latent_dim,))},
                         s.replicated)
  holder = {"state": state}

  def jax_step():
    holder["state"], m = compiled(holder["state"], batch_j, stats)
    return float(m["loss"])

  train_row = _row(train_task, size, batch,
                   **_torch_times(torch_step, repeats, warmup, single_thread),
                   jax_s=_median_time(jax_step, repeats, warmup),
                   agreement_on="velocity forward", timm=timm_used, **v_agree)
  if not v_agree["agree"]:
    train_row["status"] = "outputs differ"

  # Sampling: Euler ODE over the shifted grid, same noise and labels.
  noise = rng.standard_normal((sample_batch, *shape)).astype(np.float32)
  labels = rng.integers(0, 1000, (sample_batch,))
  sample_fn = transport_pkg.Sampler(tr).sample_ode(sampling_method="euler",
                                                  num_steps=num_steps, timestep_shift=shift)

  def torch_sample():
    with torch.no_grad():
      return sample_fn(nchw(noise), model.forward, y=torch.from_numpy(labels))[-1]

  def jax_sample():
    return jax.block_until_ready(handle.sample(labels.astype(np.int32), noise=noise,
                                               mode="euler", num_steps=num_steps,
                                               shift=shift, denormalize=False))

  # The train step's state is no longer needed: free it before sampling (a DiT-B/1 run
  # peaked at 12 GB with both alive).
  del holder, compiled, state, p, s, train_model, ema, opt
  import gc  # pylint: disable=g-import-not-at-top
  gc.collect()
  if repeats > 1:
    s_agree = _agreement(nhwc(torch_sample()), np.asarray(jax_sample()))
    times = dict(**_torch_times(torch_sample, max(1, repeats // 2), warmup, single_thread),
                 jax_s=_median_time(jax_sample, max(1, repeats // 2), warmup))
  else:
    # repeats=1: the agreement runs are the timed runs (one sampling loop is minutes on a
    # CPU): torch once (nothing to compile), jax once after one untimed compile-and-run.
    t0 = time.perf_counter()
    ref = nhwc(torch_sample())
    torch_s = time.perf_counter() - t0
    jax_sample()
    t0 = time.perf_counter()
    got = np.asarray(jax_sample())
    times = dict(torch_s=torch_s, jax_s=time.perf_counter() - t0,
                 timing="repeats=1: the agreement runs, jax after one warm-up run")
    s_agree = _agreement(ref, got)
  sample_row = _row(sample_task, size, sample_batch, **times,
                    agreement_on="final latents", timm=timm_used, **s_agree)
  if not s_agree["agree"]:
    sample_row["status"] = "outputs differ"
  return [train_row, sample_row]


def run(path: str, *, threads: Optional[int] = None, gae_variant: str = "S",
        gae_batch: int = 4, dit_variant: str = "B/1", dit_batch: int = 4,
        sample_batch: int = 1, num_steps: int = 250, repeats: int = 3, warmup: int = 1,
        steps: Optional[int] = None, single_thread: bool = True, seed: int = 0,
        config: Any = None) -> list[dict]:
  """All three tasks; one dict per row (see module docstring), each with 'threads'.

  path: a checkout of github.com/sii-research/GAE (its tokenizer/, models/, transport/).
  threads: torch threads (default: the cores this process may use). repeats (or `steps`,
  the benchmark CLI's name): timed runs per task, median reported; warmup: untimed runs
  first. single_thread: also time torch on 1 thread (`_torch_times`). config: unused
  (the sizes are this function's arguments: ViT-S GAE, DiT-B/1 by default); accepted so
  the CLI can pass its --config.
  Raises FileNotFoundError when `path` is not such a checkout; a task whose release
  module cannot be imported is a row with status 'not run: <import chain>: <error>'.
  """
  del config
  import torch  # pylint: disable=g-import-not-at-top
  warmup = max(1, int(warmup))
  repeats = int(steps) if steps else repeats
  threads = threads or _cores()
  torch.set_num_threads(threads)
  kw = dict(repeats=repeats, warmup=warmup, single_thread=single_thread, seed=seed)
  rows = [compare_gae(path, variant=gae_variant, batch=gae_batch, **kw)]
  rows += compare_dit(path, variant=dit_variant, batch=dit_batch, sample_batch=sample_batch,
                      num_steps=num_steps, **kw)
  for r in rows:
    r.update(threads=threads, repeats=repeats, warmup=warmup, torch=torch.__version__,
             jax=jax.__version__)
  return rows


def format_rows(rows: list[dict]) -> str:
  """A markdown table of `run`'s rows (seconds, torch / jax time ratio, agreement)."""
  out = ["| task | size | batch | torch s (n threads) | torch s (1 thread) | jax s | "
         "torch / jax | torch 1 thread / jax | max abs diff | status |",
         "|---|---|---|---|---|---|---|---|---|---|"]
  f = lambda v, spec: "—" if v is None else format(v, spec)  # noqa: E731
  for r in rows:
    out.append(f"| {r['task']} | {r['size']} | {r['batch']} | {f(r['torch_s'], '.3f')} | "
               f"{f(r.get('torch_1thread_s'), '.3f')} | {f(r['jax_s'], '.3f')} | "
               f"{f(r['torch_over_jax'], '.2f')} | "
               f"{f(r.get('torch_1thread_over_jax'), '.2f')} | "
               f"{f(r['max_abs_diff'], '.2e')} | {r['status']} |")
  return "\n".join(out)
