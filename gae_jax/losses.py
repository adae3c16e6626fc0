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

PAE's latent regularisers (its stage-1 trainer, gae_jax/trainers/pae.py) follow at the end:
SSR (`ssr_loss`, Eq. 3), MCR (`perturb_latent` + `mcr_loss`, Eq. 4), SCR (`scr_loss`,
Eq. 5), and stage 0's Gram loss and low-pass structural target (`gram_loss`, `low_pass`).
"""

from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

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


# ------------------------------------------------------------------------------------------
# PAE's latent-shaping regularisers (arXiv 2605.07915, Eqs. 3-5; shared/PAE_SPEC.md §3).
# The authors' release has no training code: the formulas come from the paper; every
# choice the paper leaves open is a keyword here (its default the spec's [I] default) and a
# config switch in configs_lib.pae_config.

GRAM_NORMS = ("cosine", "none")
GRAM_REDUCTIONS = ("mean", "sum")


def _tokens(x: jax.Array, name: str) -> jax.Array:
  """(B, h, w, C) or (B, N, C) -> (B, N, C) float32."""
  if x.ndim == 4:
    x = x.reshape(x.shape[0], -1, x.shape[-1])
  if x.ndim != 3:
    raise ValueError(f"{name}: expected (B, h, w, C) or (B, N, C) tokens, got shape {x.shape}")
  return x.astype(_F32)


def token_gram(x: jax.Array, normalize: str = "cosine", eps: float = 1e-8) -> jax.Array:
  """Per-image token-by-token Gram matrix G = Z Z^T, (B, N, N) float32.

  x: (B, h, w, C) or (B, N, C) tokens. normalize: 'cosine' l2-normalises every token first
  (entries are cosines in [-1, 1]); 'none' uses the raw inner products. The Gram is
  invariant to any orthogonal map of the channel axis, so two token sets with different
  channel counts can be compared (PAE Eq. 3). Raises ValueError for another normalize.
  """
  if normalize not in GRAM_NORMS:
    raise ValueError(f"gram normalize={normalize!r} is not one of {GRAM_NORMS} "
                     "(config.loss.ssr.normalize)")
  t = _tokens(x, "token_gram")
  if normalize == "cosine":
    t = t * jax.lax.rsqrt(jnp.sum(jnp.square(t), -1, keepdims=True) + eps)
  return jnp.einsum("bnc,bmc->bnm", t, t, precision=jax.lax.Precision.HIGHEST)


def gram_loss(x: jax.Array, target: jax.Array, *, normalize: str = "cosine",
              reduction: str = "mean") -> jax.Array:
  """||Gram(x) - Gram(target)||_F^2 per image, reduced to a float32 scalar.

  x: (B, h, w, C) / (B, N, C); target: the same B and N, any channel count. reduction:
  'mean' the mean over the N^2 entries and the batch (spec [I] default); 'sum' the
  Frobenius norm squared per image (sum over entries), mean over the batch. The target
  side is not stopped here: callers pass a frozen target. Raises ValueError when the token
  counts differ or for an unknown normalize / reduction.
  """
  if reduction not in GRAM_REDUCTIONS:
    raise ValueError(f"gram reduction={reduction!r} is not one of {GRAM_REDUCTIONS} "
                     "(config.loss.ssr.reduction)")
  a, b = _tokens(x, "gram_loss"), _tokens(target, "gram_loss target")
  if a.shape[:2] != b.shape[:2]:
    raise ValueError(f"gram_loss: {a.shape[1]} tokens x {a.shape[0]} images vs target "
                     f"{b.shape[1]} tokens x {b.shape[0]} images; they must match")
  d = jnp.square(token_gram(a, normalize) - token_gram(b, normalize))
  if reduction == "mean":
    return jnp.mean(d)
  return jnp.mean(jnp.sum(d, axis=(1, 2)))


def ssr_loss(z: jax.Array, target: jax.Array, *, normalize: str = "cosine",
             reduction: str = "mean") -> jax.Array:
  """PAE Spatial Structure Regularisation (Eq. 3): L_SSR = ||G_z - G_T||_F^2, float32.

  z: the spherical latent (B, h, w, d); target: the refined VFM target T with the same
  h*w tokens (the stage-0 semantic target Z_T by default, or the structural H_ref;
  config.loss.ssr.target), any channel count, treated as constant (stop_gradient).
  G = Z Z^T is the N x N token Gram of one image. Not in the paper (spec §3.1 [I]):
  normalize='cosine' (l2-normalised tokens on both sides; 'none' raw inner products) and
  reduction='mean' over the N^2 entries and the batch ('sum': Frobenius^2 per image).
  Invariant to rotations of z's channel basis.
  """
  return gram_loss(z, jax.lax.stop_gradient(target), normalize=normalize,
                   reduction=reduction)


PERTURB_MODES = ("rotate", "additive")


def orthogonal_direction(z: jax.Array, noise: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Per token, the unit vector of `noise` orthogonal to z: (noise - <noise, z^> z^)/||.||.

  z, noise: (..., d), same shape. float32 output of shape z.shape.
  """
  z32, n32 = z.astype(_F32), noise.astype(_F32)
  zh = z32 * jax.lax.rsqrt(jnp.sum(jnp.square(z32), -1, keepdims=True) + eps)
  perp = n32 - jnp.sum(n32 * zh, -1, keepdims=True) * zh
  return perp * jax.lax.rsqrt(jnp.sum(jnp.square(perp), -1, keepdims=True) + eps)


def perturb_latent(z: jax.Array, noise: jax.Array, angle_deg: float, *,
                   mode: str = "rotate", renormalize: bool = False) -> jax.Array:
  """PAE MCR's perturbation of a latent by a fixed angle (Eq. 4; spec §3.2), per token.

  z: (B, h, w, d) latent (on the sphere of radius sqrt(d) for PAE); noise: a Gaussian
  sample of z's shape whose part orthogonal to each token, u (unit), is the shared
  direction (pass the same noise for every angle of the cascade). angle_deg in [0, 180).
  mode:
    'rotate' (spec [I] default): z(theta) = cos(theta) z + sin(theta) ||z|| u, a geodesic
             step on each token's sphere: same norm, angle exactly theta to z.
    'additive': z + tan(theta) ||z|| u (the paper's z + alpha * Delta with alpha =
             tan(theta), Delta orthogonal to z at z's norm): angle theta, norm grows by
             1 / cos(theta); `renormalize=True` puts every token back on the sphere of
             radius sqrt(d) (parameter-free RMSNorm), as the encoder's output is.
  Gradients flow into z (the spec's default: the encoder sees the MCR terms). float32.
  Raises ValueError for another mode or an angle outside [0, 180) (additive: [0, 90)).
  """
  if mode not in PERTURB_MODES:
    raise ValueError(f"perturbation mode={mode!r} is not one of {PERTURB_MODES} "
                     "(config.loss.mcr.mode)")
  limit = 180.0 if mode == "rotate" else 90.0
  if not 0.0 <= float(angle_deg) < limit:
    raise ValueError(f"perturbation angle {angle_deg} deg is outside [0, {limit:g}) for "
                     f"mode {mode!r} (config.loss.mcr.angles)")
  if z.shape != noise.shape:
    raise ValueError(f"perturb_latent: noise shape {noise.shape} != latent shape {z.shape}")
  z32 = z.astype(_F32)
  u = orthogonal_direction(z32, noise)
  norm = jnp.sqrt(jnp.sum(jnp.square(z32), -1, keepdims=True))
  theta = float(angle_deg) * float(np.pi) / 180.0
  if mode == "rotate":
    out = float(np.cos(theta)) * z32 + float(np.sin(theta)) * norm * u
  else:
    out = z32 + float(np.tan(theta)) * norm * u
  if renormalize:
    out = out * jax.lax.rsqrt(jnp.mean(jnp.square(out), -1, keepdims=True) + 1e-6)
  return out


def consistency_term(x: jax.Array, target: jax.Array,
                     lpips_fn: Optional[Callable[[jax.Array, jax.Array], jax.Array]] = None,
                     lpips_weight: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """(L1, LPIPS) of x against stop_gradient(target); LPIPS 0 without `lpips_fn`.

  lpips_fn(a, b) -> per-image distances (B,); both float32 scalars (batch means); the term
  is l1 + lpips_weight * lpips.
  """
  t = jax.lax.stop_gradient(target.astype(_F32))
  l1_term = jnp.mean(jnp.abs(x.astype(_F32) - t))
  p = jnp.zeros((), _F32) if lpips_fn is None else jnp.mean(lpips_fn(x, t).astype(_F32))
  return l1_term, lpips_weight * p


def mcr_loss(x_r: jax.Array, x_perturbed: Sequence[jax.Array],
             lpips_fn: Optional[Callable[[jax.Array, jax.Array], jax.Array]] = None, *,
             lpips_weight: float = 1.0, chain: str = "cascade") -> tuple[jax.Array, dict]:
  """PAE Manifold Continuity Regularisation (Eq. 4), float32 scalar and its terms.

  x_r: D(z_r), the reconstruction (B, H, W, 3); x_perturbed: the decodes of the latent
  perturbed by increasing angles, e.g. [D(z_m), D(z_l)] at 42.5 / 85 deg (spec §3.2).
  chain='cascade' (the paper): sum_k [|x_k - sg(x_{k-1})|_1 + LPIPS(x_k, sg(x_{k-1}))] with
  x_0 = x_r: medium -> recon, large -> medium, no direct large -> recon term. chain='anchor'
  (ours, an ablation switch): every x_k against sg(x_r). The targets are detached, so each
  decode is pushed only by its own term. L1 is the mean over pixels, LPIPS the batch mean.
  Returns (loss, {'mcr_l1': sum of L1 terms, 'mcr_lpips': sum of weighted LPIPS terms}).
  """
  if chain not in ("cascade", "anchor"):
    raise ValueError(f"mcr chain={chain!r} is not 'cascade' or 'anchor' (config.loss.mcr.chain)")
  if not x_perturbed:
    raise ValueError("mcr_loss needs at least one perturbed decode (config.loss.mcr.angles)")
  l1_sum, lp_sum = jnp.zeros((), _F32), jnp.zeros((), _F32)
  prev = x_r
  for x_k in x_perturbed:
    a, b = consistency_term(x_k, prev if chain == "cascade" else x_r, lpips_fn, lpips_weight)
    l1_sum, lp_sum = l1_sum + a, lp_sum + b
    prev = x_k
  return l1_sum + lp_sum, {"mcr_l1": l1_sum, "mcr_lpips": lp_sum}


SCR_POOLS = ("mean", "max")


def _cos(a: jax.Array, b: jax.Array, eps: float = 1e-8) -> jax.Array:
  num = jnp.sum(a * b, -1)
  den = jnp.sqrt(jnp.sum(jnp.square(a), -1) * jnp.sum(jnp.square(b), -1) + eps)
  return num / den


def scr_loss(z: jax.Array, target: jax.Array, *, pooling: str = "mean",
             global_weight: float = 1.0, patch_weight: float = 1.0
             ) -> tuple[jax.Array, dict]:
  """PAE Semantic Consistency Regularisation (Eq. 5), float32 scalar and its two terms.

  L_SCR = global_weight * (1 - cos(pool(z_T), pool(z))) + patch_weight * mean_i (1 -
  cos(z_T,i, z_i)), averaged over the batch. z: the latent (B, h, w, d); target: the
  stage-0 semantic target Z_T with the same shape (stop_gradient). pooling over the tokens:
  'mean' (spec [I]: "globally pooled", GSQ's GAP) or 'max'. The weights (both 1 in the
  paper) give Tab. 3(c)'s ablations (pooled only / patch only). The patch term is half of
  GAE's L_sp for a target on the same sphere. Returns (loss, {'scr_global', 'scr_patch'}).
  Raises ValueError when the shapes differ or for an unknown pooling.
  """
  if pooling not in SCR_POOLS:
    raise ValueError(f"scr pooling={pooling!r} is not one of {SCR_POOLS} "
                     "(config.loss.scr.pooling)")
  a = _tokens(z, "scr_loss")
  b = _tokens(jax.lax.stop_gradient(target), "scr_loss target")
  if a.shape != b.shape:
    raise ValueError(f"scr_loss: latent {z.shape} vs target {target.shape}; they must match")
  pool = (lambda t: jnp.mean(t, 1)) if pooling == "mean" else (lambda t: jnp.max(t, 1))
  g = jnp.mean(1.0 - _cos(pool(a), pool(b)))
  p = jnp.mean(1.0 - _cos(a, b))
  return global_weight * g + patch_weight * p, {"scr_global": g, "scr_patch": p}


def gaussian_kernel1d(sigma: float, radius: Optional[int] = None) -> np.ndarray:
  """Normalised 1-D Gaussian taps exp(-k^2 / (2 sigma^2)), k = -r..r, r = ceil(3 sigma)."""
  if sigma <= 0:
    raise ValueError(f"gaussian sigma={sigma} must be > 0 (config.refine.lowpass_sigma)")
  r = int(np.ceil(3.0 * sigma)) if radius is None else int(radius)
  k = np.arange(-r, r + 1, dtype=np.float64)
  w = np.exp(-0.5 * (k / sigma) ** 2)
  return (w / w.sum()).astype(np.float32)


def low_pass(h: jax.Array, sigma: float, strength: float = 1.0) -> jax.Array:
  """Structural target H_ref of PAE's stage 0 (spec §3.4, the [I] fallback for AnyUp).

  h: VFM token grid (B, g, g, C). A separable Gaussian blur of std `sigma` tokens with
  edge-replicated borders, blended in: (1 - strength) h + strength blur(h). The paper
  upsamples with AnyUp, applies a 'low-pass spatial normalization' of strength 0.4 and
  downsamples back; AnyUp is a pretrained network we do not have, so this blur on the
  16 x 16 grid stands in (docs: a deviation). float32 output of h's shape.
  """
  if h.ndim != 4:
    raise ValueError(f"low_pass expects a (B, g, g, C) token grid, got shape {h.shape}")
  if not 0.0 <= strength <= 1.0:
    raise ValueError(f"low-pass strength={strength} must be in [0, 1] "
                     "(config.refine.lowpass_strength)")
  x = h.astype(_F32)
  if strength == 0.0:
    return x
  w = jnp.asarray(gaussian_kernel1d(sigma))
  r = (w.shape[0] - 1) // 2
  blur = x
  for axis in (1, 2):
    pad = [(0, 0)] * 4
    pad[axis] = (r, r)
    p = jnp.pad(blur, pad, mode="edge")
    n = blur.shape[axis]
    blur = sum(w[k] * jax.lax.slice_in_dim(p, k, k + n, axis=axis) for k in range(2 * r + 1))
  return (1.0 - strength) * x + strength * blur
