"""Fixed-grid samplers for the linear path (t = 0 noise -> t = 1 data), one jit each.

Every sampler takes a velocity function `v_fn(x, t, y) -> v` with t of shape (B,) (a model
apply with its params closed over, a guided wrapper from `guidance`, or an analytic field)
and runs the whole loop with `jax.lax.fori_loop`, so `jax.jit(lambda params, noise, y, rng:
sample_sde(partial(apply, params), noise, y, rng))` is one program: a batch-sharded `noise`
stays sharded and there are no host round trips.

`num_steps` is the number of grid points (released semantics, 250): Euler/Heun take
num_steps - 1 steps; the SDE takes num_steps - 1 Euler-Maruyama steps plus the last
noise-free "Mean" step (num_steps model calls in all).

SDE time grid and last step as released (sii-research/GAE transport/transport.py
`Sampler.sample_sde` + transport/integrators.py `sde`, with inference_sample.py's
`last_step_size=0.004`): the grid is time_shift(linspace(t0 = 1e-5, t1 = 1 - 0.004), s), so
with s = 0.4 the Euler-Maruyama steps end at t_N = time_shift(0.996, 0.4) = 0.99006; the
last "Mean" step then evaluates the drift at the *unshifted* t1 = 0.996 and steps 0.004,
ending at t_N + 0.004 = 0.99406 (short of t = 1 whenever s != 1). That is `last_step=
'release'`, the default. `last_step='grid'` (ours) evaluates the drift at t_N and steps
1 - t_N (0.0099 at s = 0.4) so the path ends at t = 1; the two agree when s = 1 (hustvl/
LightningDiT's SDE has no shift). The paper does not describe the last step.

SDE (released SiT/LightningDiT/GAE, diffusion form "SBDM"), for a velocity model:
  E[x0 | x_t] = x_t - t v  =>  score = -E[x0 | x_t] / (1 - t) = (t v - x) / (1 - t)
  D(t) = (1 - t) / t,  drift = v + D(t) score
  x <- x + drift dt + sqrt(2 D(t) dt) eps      (dt > 0: forward in t, towards data)
The forward-time SDE dx = (v + D score) dt + sqrt(2D) dW has the same marginals p_t as the
ODE dx = v dt for any D >= 0: in Fokker-Planck the extra drift contributes
-div(p D grad log p) = -D lap p, which the diffusion term +D lap p cancels.
"""

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from gae_jax.flow.path import time_shift

VelocityFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]

SDE_T0 = 1e-5     # released: sample_eps hard-coded to 1e-5 for the SDE
SDE_T1 = 0.996    # released: 1 - last_step_size with last_step_size = 0.004
SDE_LAST_STEPS = ("release", "grid", "none")


def time_grid(num_steps: int, t0: float, t1: float, shift: float = 1.0) -> jax.Array:
  """time_shift(linspace(t0, t1, num_steps), shift) as float32 (computed in float64)."""
  if num_steps < 2:
    raise ValueError(f"num_steps must be >= 2 (grid points), got {num_steps}")
  if not 0.0 <= t0 < t1 <= 1.0:
    raise ValueError(f"time grid needs 0 <= t0 < t1 <= 1, got t0={t0}, t1={t1}")
  if shift <= 0:
    raise ValueError(f"time shift must be > 0, got {shift}")
  t = np.linspace(t0, t1, num_steps, dtype=np.float64)
  return jnp.asarray(time_shift(t, shift), jnp.float32)


def _v(v_fn: VelocityFn, x: jax.Array, t: jax.Array, y: jax.Array) -> jax.Array:
  return v_fn(x, jnp.full((x.shape[0],), t, jnp.float32), y).astype(x.dtype)


def sample_ode(v_fn: VelocityFn, noise: jax.Array, y: jax.Array, *, num_steps: int = 250,
               shift: float = 1.0, method: str = "euler", t0: float = 0.0, t1: float = 1.0
               ) -> jax.Array:
  """Integrates dx/dt = v from x(t0) = noise over the shifted grid; returns x(t1).

  method 'euler' (num_steps - 1 calls) or 'heun' (torchdiffeq heun2: 2 (num_steps - 1)
  calls, the last one at t1). Defaults t0 = 0, t1 = 1: the released ODE interval for a
  velocity model.
  """
  if method not in ("euler", "heun"):
    raise ValueError(f"unknown ODE method {method!r}: use 'euler' or 'heun'")
  ts = time_grid(num_steps, t0, t1, shift)
  x = noise.astype(jnp.float32)

  def body(i, x):
    t, t_next = ts[i], ts[i + 1]
    dt = t_next - t
    d1 = _v(v_fn, x, t, y)
    if method == "euler":
      return x + dt * d1
    d2 = _v(v_fn, x + dt * d1, t_next, y)
    return x + 0.5 * dt * (d1 + d2)

  return jax.lax.fori_loop(0, num_steps - 1, body, x)


def sde_drift(v: jax.Array, x: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(drift, D(t)) of the SBDM SDE from a velocity v at (x, t); t scalar or broadcastable."""
  score = (t * v - x) / (1.0 - t)
  diffusion = (1.0 - t) / t
  return v + diffusion * score, diffusion


def sample_sde(v_fn: VelocityFn, noise: jax.Array, y: jax.Array, rng: jax.Array, *,
               num_steps: int = 250, shift: float = 1.0, t0: float = SDE_T0,
               t1: float = SDE_T1, last_step: str = "release") -> jax.Array:
  """Euler-Maruyama on the shifted grid time_shift(linspace(t0, t1, num_steps), shift),
  then a noise-free last step. noise, y: (B, ...), (B,); returns x of noise's shape.

  last_step:
    'release' (default) the released GAE sampler: drift evaluated at the *unshifted* t1
              (0.996) and a step of 1 - t1 (0.004) from the shifted last grid point t_N
              (0.99006 at shift 0.4), so it ends short of t = 1 when shift != 1.
              t1 = 0.96 gives the released inference.py variant (`last_step_size=0.04`).
    'grid'    ours: drift at t_N and a step of 1 - t_N, ending at t = 1. Equal to
              'release' when shift = 1.
    'none'    return x at t_N.
  The first step from t0 = 1e-5 is very stiff (D dt >> 1); as released, it is not special-
  cased: the Langevin part of the following steps forgets it.
  Raises ValueError for an unknown last_step or a bad grid.
  """
  if last_step not in SDE_LAST_STEPS:
    raise ValueError(f"unknown last_step {last_step!r}: use one of {SDE_LAST_STEPS}")
  ts = time_grid(num_steps, t0, t1, shift)
  x = noise.astype(jnp.float32)

  def body(i, x):
    t, t_next = ts[i], ts[i + 1]
    dt = t_next - t
    drift, diffusion = sde_drift(_v(v_fn, x, t, y), x, t)
    eps = jax.random.normal(jax.random.fold_in(rng, i), x.shape, x.dtype)
    return x + drift * dt + jnp.sqrt(2.0 * diffusion * dt) * eps

  x = jax.lax.fori_loop(0, num_steps - 1, body, x)
  if last_step == "none":
    return x
  if last_step == "grid":
    t_eval, size = ts[-1], 1.0 - ts[-1]
  else:
    t_eval, size = jnp.float32(t1), jnp.float32(1.0 - t1)
  drift, _ = sde_drift(_v(v_fn, x, t_eval, y), x, t_eval)
  return x + drift * size


def sample(v_fn: VelocityFn, noise: jax.Array, y: jax.Array,
           rng: Optional[jax.Array] = None, *, mode: str = "sde", num_steps: int = 250,
           shift: float = 1.0, t0: Optional[float] = None, t1: Optional[float] = None,
           last_step: str = "release") -> jax.Array:
  """Dispatch: mode 'sde' (needs rng; defaults t0=1e-5, t1=0.996, last_step 'release':
  see `sample_sde`), 'euler' or 'heun' (ODE; defaults t0=0, t1=1; last_step unused)."""
  if mode == "sde":
    if rng is None:
      raise ValueError("sampling mode 'sde' needs an rng")
    return sample_sde(v_fn, noise, y, rng, num_steps=num_steps, shift=shift,
                      t0=SDE_T0 if t0 is None else t0, t1=SDE_T1 if t1 is None else t1,
                      last_step=last_step)
  if mode in ("euler", "heun"):
    return sample_ode(v_fn, noise, y, num_steps=num_steps, shift=shift, method=mode,
                      t0=0.0 if t0 is None else t0, t1=1.0 if t1 is None else t1)
  raise ValueError(f"unknown sampling mode {mode!r}: use 'sde', 'euler' or 'heun'")


def class_uniform_labels(num_samples: int, num_classes: int) -> np.ndarray:
  """[0]*k + [1]*k + ... with k = num_samples / num_classes (released order), int32.

  Raises ValueError if num_samples is not a multiple of num_classes.
  """
  if num_samples <= 0 or num_classes <= 0 or num_samples % num_classes:
    raise ValueError(f"class-uniform sampling needs num_samples ({num_samples}) to be a "
                     f"positive multiple of num_classes ({num_classes})")
  return np.repeat(np.arange(num_classes, dtype=np.int32), num_samples // num_classes)


def random_labels(num_samples: int, num_classes: int, seed: int) -> np.ndarray:
  """(num_samples,) int32 labels drawn uniformly from [0, num_classes), from `seed` alone
  (numpy PCG64), so they do not depend on the batch size or the mesh. The VA-VAE /
  LightningDiT evaluation protocol (released inference.py: `torch.randint` per batch),
  which the paper's ablations follow (App. H).

  Raises ValueError unless num_samples and num_classes are positive.
  """
  if num_samples <= 0 or num_classes <= 0:
    raise ValueError(f"random labels need positive num_samples ({num_samples}) and "
                     f"num_classes ({num_classes})")
  return np.random.default_rng(seed).integers(0, num_classes, num_samples).astype(np.int32)


__all__ = ["VelocityFn", "time_grid", "sample_ode", "sample_sde", "sde_drift", "sample",
           "class_uniform_labels", "random_labels", "SDE_T0", "SDE_T1", "SDE_LAST_STEPS"]
