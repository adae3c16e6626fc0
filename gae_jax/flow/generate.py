"""The DiT -> tokenizer image generator: sampler + de-normalisation + decode + uint8, one jit.

`generate` is pure; `compile_generate` AOT-compiles it sharded over the batch for a mesh.
Flow knows only a velocity function (the DiT as v(x, t, y)) and a decode function
`decode_fn(tokenizer_params, z) -> images in [-1, 1]` (a tokenizer handle's `.decode_fn`,
any family: GAE, PAE, KL); it imports no tokenizer model.
Used by the `sample` stage (gae_jax/trainers/sample.py), the flow trainer's sample grids
and the evaluation stage's DiT-driven gFID.
"""

import functools

import jax
import jax.numpy as jnp

from gae_jax import sharding as sharding_lib
from gae_jax.flow import guidance
from gae_jax.flow import samplers


def velocity_fn(model, params, sampling) -> samplers.VelocityFn:
  """The DiT as v(x, t, y), CFG-wrapped when sampling.cfg_scale != 1."""
  v = lambda x, t, y: model.apply({"params": params}, x, t, y)
  if float(sampling.cfg_scale) != 1.0:
    v = guidance.cfg_velocity(v, float(sampling.cfg_scale), null_label=model.null_label,
                          interval_start=float(sampling.cfg_interval))
  return v


def generate(dit_params, tok_params, noise, labels, rng, mean, std, *, dit, decode_fn,
             sampling) -> jax.Array:
  """noise (B, h, w, d), labels (B,) -> uint8 images (B, H, W, 3). Pure; jit it.

  dit: a module with `.apply` and `.null_label` (the velocity v(x, t, y)); decode_fn:
  (tok_params, z) -> images in [-1, 1]; mean, std (d,): the latent statistics
  (z = x * std + mean).
  """
  x = samplers.sample(velocity_fn(dit, dit_params, sampling), noise, labels, rng,
                      mode=sampling.mode, num_steps=int(sampling.num_steps),
                      shift=float(sampling.shift),
                      last_step=sampling.get("last_step", "release"))
  z = x * std + mean
  img = decode_fn(tok_params, z)
  return jnp.clip(jnp.round((img + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def noise_for(seed: int, indices, shape: tuple[int, ...]) -> jax.Array:
  """N(0, I) noise of samples `indices`, each from fold_in(key(seed), index)."""
  key = jax.random.key(seed)
  return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), shape))(
      jnp.asarray(indices, jnp.uint32))


def compile_generate(dit, decode_fn, sampling, mesh, rules, batch: int, latent_shape,
                     dit_params, tok_params):
  """AOT-compiled generate(dit_params, tok_params, noise, labels, rng, mean, std), batch-sharded.

  decode_fn: the tokenizer's pure (params, z) -> images (`handle.decode_fn`).
  """
  data = sharding_lib.data_sharding(mesh, rules)
  rep = sharding_lib.replicated(mesh)
  fn = functools.partial(generate, dit=dit, decode_fn=decode_fn, sampling=sampling)
  param_sh = lambda t: jax.tree.map(lambda a: a.sharding if isinstance(a, jax.Array) else rep, t)
  jitted = jax.jit(fn, in_shardings=(param_sh(dit_params), param_sh(tok_params), data, data,
                                     rep, rep, rep), out_shardings=data)
  abs_ = lambda t: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), t)
  d = latent_shape[-1]
  with jax.set_mesh(mesh):
    return jitted.lower(
        abs_(dit_params), abs_(tok_params),
        jax.ShapeDtypeStruct((batch, *latent_shape), jnp.float32),
        jax.ShapeDtypeStruct((batch,), jnp.int32),
        jax.eval_shape(lambda: jax.random.key(0)),
        jax.ShapeDtypeStruct((d,), jnp.float32), jax.ShapeDtypeStruct((d,), jnp.float32),
    ).compile()
