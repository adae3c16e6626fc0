"""Linear flow-matching path, training-time sampling, LightningDiT loss (docs/method.md, stage 3).

Convention: t = 0 is noise, t = 1 is data. x_t = t * x1 + (1 - t) * x0 with x0 ~ N(0, I),
the model predicts the velocity u = x1 - x0.
"""

import jax
import jax.numpy as jnp


def time_shift(t: jax.Array, shift: float) -> jax.Array:
  """t' = s t / (1 + (s - 1) t); s < 1 moves t towards 0 (noise). Fixes 0 and 1."""
  return shift * t / (1 + (shift - 1) * t)


def _expand(t: jax.Array, x: jax.Array) -> jax.Array:
  t = jnp.asarray(t, x.dtype)
  return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def interpolate(x0: jax.Array, x1: jax.Array, t: jax.Array) -> jax.Array:
  """x_t = t x1 + (1 - t) x0; t is a scalar or (B,) broadcast over trailing axes."""
  t = _expand(t, x1)
  return t * x1 + (1 - t) * x0


def target_velocity(x0: jax.Array, x1: jax.Array) -> jax.Array:
  """u = x1 - x0 (d x_t / dt)."""
  return x1 - x0


def sample_t(rng: jax.Array, n: int, shift: float = 0.7, mu: float = 0.0,
             sigma: float = 1.0) -> jax.Array:
  """t ~ sigmoid(N(mu, sigma^2)) then `time_shift(t, shift)`; (n,) float32 in (0, 1)."""
  t = jax.nn.sigmoid(mu + sigma * jax.random.normal(rng, (n,), jnp.float32))
  return time_shift(t, shift) if shift != 1.0 else t


def sample_path(rng: jax.Array, x1: jax.Array, shift: float = 0.7, mu: float = 0.0,
                sigma: float = 1.0) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One training draw for data x1 (B, ...): returns (x_t, t (B,), u = x1 - x0)."""
  rng_t, rng_x = jax.random.split(rng)
  t = sample_t(rng_t, x1.shape[0], shift, mu, sigma)
  x0 = jax.random.normal(rng_x, x1.shape, jnp.float32).astype(x1.dtype)
  return interpolate(x0, x1, t), t, target_velocity(x0, x1)


def flow_loss(v: jax.Array, u: jax.Array, eps: float = 1e-8
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """LightningDiT loss: MSE(v, u) + mean over tokens of (1 - cos(v, u) over channels).

  v, u: (B, H, W, C) (channels last). Returns (loss, {'mse': ..., 'cos': ...}), all
  float32 scalars; cos as torch.cosine_similarity: v.u / max(|v| |u|, eps).
  """
  if v.shape != u.shape:
    raise ValueError(f"flow_loss: prediction shape {v.shape} != target shape {u.shape}")
  v = v.astype(jnp.float32)
  u = u.astype(jnp.float32)
  mse = jnp.mean(jnp.square(v - u))
  safe_norm = lambda x: jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1), eps * eps))
  cos = jnp.sum(v * u, axis=-1) / (safe_norm(v) * safe_norm(u))
  cos_loss = jnp.mean(1.0 - cos)
  return mse + cos_loss, {"mse": mse, "cos": cos_loss}
