"""Guided velocity functions (wrap a `v_fn(x, t, y) -> v` into another one).

CFG: guided = uncond + w (cond - uncond) on all channels, only where t >= interval_start
(the low-noise end, t near 1); the conditional velocity elsewhere (released
`forward_with_cfg`: `if t < cfg_interval_start: cond`). Cond and uncond are evaluated in one
model call on the concatenated batch [x; x] with labels [y; null].

AutoGuidance (Karras et al. 2024): guided = guide + w (main - guide) with a second, weaker
velocity function `guide` (smaller / less trained model), same interval rule.

With interval_start > 0 the guided branch runs under `lax.cond` only when some t in the
batch is >= interval_start (in the samplers all t are equal), so steps outside the interval
cost one plain model call; both branches are compiled. The rule is applied per sample.
"""

from typing import Callable

import jax
import jax.numpy as jnp

from gae_jax.flow.samplers import VelocityFn


def _always(interval_start) -> bool:
  return isinstance(interval_start, (int, float)) and interval_start <= 0.0


def _interval(pair: Callable, plain: VelocityFn, scale, interval_start) -> VelocityFn:
  """pair(x, t, y) -> (strong, weak); guided = weak + w (strong - weak) inside the interval,
  strong (the plain velocity) outside."""
  def guided(x, t, y):
    strong, weak = pair(x, t, y)
    g = weak + scale * (strong - weak)
    if _always(interval_start):
      return g
    mask = (t >= interval_start).reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.where(mask, g, strong)

  if _always(interval_start):
    return guided

  def v(x, t, y):
    return jax.lax.cond(jnp.any(t >= interval_start), lambda _: guided(x, t, y),
                        lambda _: plain(x, t, y).astype(x.dtype), None)
  return v


def cfg_velocity(v_fn: VelocityFn, scale: float, *, null_label: int,
                 interval_start: float = 0.0) -> VelocityFn:
  """Classifier-free guided velocity; `null_label` is the model's null class id
  (`LightningDiT.null_label` == num_classes)."""
  def pair(x, t, y):
    v = v_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
             jnp.concatenate([y, jnp.full_like(y, null_label)])).astype(x.dtype)
    cond, uncond = jnp.split(v, 2)
    return cond, uncond
  return _interval(pair, v_fn, scale, interval_start)


def autoguidance_velocity(v_main: VelocityFn, v_guide: VelocityFn, scale: float, *,
                          interval_start: float = 0.0) -> VelocityFn:
  """guide + w (main - guide) where t >= interval_start, main elsewhere (both conditional)."""
  def pair(x, t, y):
    return v_main(x, t, y).astype(x.dtype), v_guide(x, t, y).astype(x.dtype)
  return _interval(pair, v_main, scale, interval_start)


__all__ = ["cfg_velocity", "autoguidance_velocity"]
