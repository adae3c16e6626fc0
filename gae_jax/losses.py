"""Autoencoder losses: L1, LPIPS, learned-logvar NLL, GAN (hinge / vanilla), KL.

Composition used by the stage-2 trainer (docs/method.md; taming/LDM `LPIPSWithDiscriminator`):
  rec  = |x - x_hat| + lpips_weight * LPIPS(x, x_hat)        per pixel (LPIPS broadcast)
  nll  = nll_loss(rec, logvar)                               learned scalar logvar, init 0
  g    = generator_loss(D(x_hat))
  loss = nll + disc_weight * disc_factor(step, disc_start) * g  (+ kl_weight * kl_loss)
The KL is reduced like the nll (a per-element mean) as the GAE release does; see `kl_loss`.
  d    = hinge_d_loss(D(x), D(x_hat))                        for the discriminator step
`disc_weight` is 0.5, fixed (the release keeps `adaptive_weight` off). All losses return
float32 scalars whatever the input dtype.
"""

from typing import Any, Optional

import jax
import jax.numpy as jnp

from gae_jax.models import vgg

_F32 = jnp.float32


def l1(x: jax.Array, y: jax.Array) -> jax.Array:
  """mean |x - y| over all elements."""
  return jnp.mean(jnp.abs(x.astype(_F32) - y.astype(_F32)))


def lpips_loss(lpips_params: Any, x: jax.Array, y: jax.Array,
               model: Optional[vgg.LPIPS] = None) -> jax.Array:
  """Batch-mean LPIPS-VGG16 distance; `lpips_params` from `vgg.load_lpips_params()`.

  Gradients flow to x and y (not meant for the frozen params: keep those out of the
  optimizer). `model` picks the compute dtype, e.g. `vgg.LPIPS(dtype=jnp.bfloat16)`.
  """
  model = vgg.LPIPS() if model is None else model
  return jnp.mean(model.apply(lpips_params, x, y))


def rec_loss_map(x: jax.Array, x_hat: jax.Array, lpips_per_image: Optional[jax.Array] = None,
                 lpips_weight: float = 1.0) -> jax.Array:
  """Per-pixel rec = |x - x_hat| + lpips_weight * LPIPS_b (broadcast), shape of x (f32)."""
  rec = jnp.abs(x.astype(_F32) - x_hat.astype(_F32))
  if lpips_per_image is not None:
    p = jnp.reshape(lpips_per_image.astype(_F32), (-1,) + (1,) * (rec.ndim - 1))
    rec = rec + lpips_weight * p
  return rec


def nll_loss(rec: jax.Array, logvar: jax.Array, reduction: str = "mean") -> jax.Array:
  """rec / exp(logvar) + logvar, elementwise over `rec`, then reduced to a scalar.

  As in taming/LDM `LPIPSWithDiscriminator`, the NLL is taken over the per-pixel rec map
  (L1 + weighted LPIPS broadcast per image), `logvar` a learned scalar (init 0). Reduction:
    'mean'  mean over all elements (default; logvar=0 gives mean rec, so the fixed GAN
            weight 0.5 is on the same scale as the L1/LPIPS terms of the paper's Eq. 1).
    'sum'   sum over non-batch dims, mean over batch (LDM's torch.sum(nll) / B).
  A scalar `rec` is accepted too (then it is returned as rec / exp(logvar) + logvar).
  """
  rec = rec.astype(_F32)
  logvar = jnp.asarray(logvar, _F32)
  nll = rec / jnp.exp(logvar) + logvar
  if reduction == "mean":
    return jnp.mean(nll)
  if reduction == "sum":
    return jnp.sum(nll) / (nll.shape[0] if nll.ndim else 1)
  raise ValueError(f"nll_loss: reduction must be 'mean' or 'sum', got {reduction!r}")


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  """0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat)))."""
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real.astype(_F32)))
                + jnp.mean(jax.nn.relu(1.0 + logits_fake.astype(_F32))))


def vanilla_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  """0.5 * (mean softplus(-D(x)) + mean softplus(D(x_hat)))  (non-saturating BCE)."""
  return 0.5 * (jnp.mean(jax.nn.softplus(-logits_real.astype(_F32)))
                + jnp.mean(jax.nn.softplus(logits_fake.astype(_F32))))


def generator_loss(logits_fake: jax.Array) -> jax.Array:
  """-mean D(x_hat)."""
  return -jnp.mean(logits_fake.astype(_F32))


def _global_norm(tree: Any) -> jax.Array:
  leaves = jax.tree.leaves(tree)
  return jnp.sqrt(sum(jnp.sum(jnp.square(l.astype(_F32))) for l in leaves))


def adaptive_weight(nll_grads_last_layer: Any, g_grads_last_layer: Any,
                    max_weight: float = 1e4, eps: float = 1e-4) -> jax.Array:
  """taming `calculate_adaptive_weight`: ||grad nll|| / (||grad g|| + eps), clipped, no grad.

  Both arguments are the gradients (array or pytree, global L2 norm) of the NLL and of the
  generator loss w.r.t. the decoder's last layer, computed by the caller. The result is
  then multiplied by `disc_weight` by the caller (taming does `d_weight *= disc_weight`).
  """
  w = _global_norm(nll_grads_last_layer) / (_global_norm(g_grads_last_layer) + eps)
  return jax.lax.stop_gradient(jnp.clip(w, 0.0, max_weight))


def disc_factor(step: jax.Array | int, disc_start: int, factor: float = 1.0) -> jax.Array:
  """taming `adopt_weight`: 0 while step < disc_start, else `factor` (jit-safe)."""
  return jnp.where(jnp.asarray(step) >= disc_start, jnp.asarray(factor, _F32),
                   jnp.zeros((), _F32))


KL_REDUCTIONS = ("mean", "sum")


def kl_loss(mean: jax.Array, logvar: jax.Array, reduction: str = "mean") -> jax.Array:
  """KL(N(mean, exp(logvar)) || N(0, I)) of a diagonal Gaussian posterior, float32 scalar.

  mean, logvar: (B, ...) posterior moments (the KL-VAE latents, (B, h, w, d)), logvar in
  natural log units. The element-wise KL is 0.5 (mean^2 + exp(logvar) - 1 - logvar), in nats.
  reduction:
    'mean' (default) the mean over every element (batch and latent), the same reduction as
           the nll (`nll_loss`: per-pixel mean). This is the released GAE: its
           DiagonalGaussianDistribution.kl() is element-wise (sii-research/GAE
           tokenizer/utils/sample/ldm_vae.py, no sum) and LPIPSWithDiscriminator.forward
           takes `torch.mean` of both the nll and the kl (tokenizer/utils/loss/
           contperceptual.py). The paper's Tab. 7 KL weight 0.1 (Sec. 5.4.3) is read on
           this reduction (the KL run itself is not released).
    'sum'  the sum over the latent elements of each image, mean over the batch: CompVis
           latent-diffusion's DiagonalGaussianDistribution.kl() (ldm/modules/distributions/
           distributions.py, sum over dims [1, 2, 3]) and `torch.sum(kl) / batch` in
           ldm/modules/losses/contperceptual.py. There the nll is *also* summed per image
           (`torch.sum(nll) / batch`) and configs/autoencoder/autoencoder_kl_*.yaml set
           kl_weight 1e-6; next to our per-pixel-mean nll it weighs the KL h*w*d times
           more than the release (8192x for 16x16x32 latents), which with weight 0.1
           collapses the posterior onto the prior.
  Raises ValueError for another reduction. See docs/fidelity.md.
  """
  if reduction not in KL_REDUCTIONS:
    raise ValueError(f"kl reduction {reduction!r} is not one of {KL_REDUCTIONS} "
                     "(config.loss.kl_reduction)")
  mean = mean.astype(_F32)
  logvar = logvar.astype(_F32)
  kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
  if reduction == "mean":
    return jnp.mean(kl)
  return jnp.mean(jnp.sum(jnp.reshape(kl, (kl.shape[0], -1)), axis=-1))
