"""The Geometric Autoencoder: E_p -> A_p -> latent RMSNorm -> sigma-noise -> D_p.

mu = RMSNorm(A_p(E_p(x))) over the d channels of each token (eps 1e-6, no affine), so every
latent token lies on the sphere of radius sqrt(d). In training z = mu + sigma * eps with one
sigma ~ N(0, (sigma_std / 0.8)^2) per image (E|sigma| ~= sigma_std since 0.8 ~= sqrt(2/pi));
at inference z = mu. `kl=True` replaces the latent norm by a diagonal-Gaussian KL-VAE
bottleneck (paper Tab. 7): A_p outputs (mean, logvar), z = mean + exp(logvar/2) * eps.
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from gae_jax.models import layers
from gae_jax.models import vit

Dtype = Any


def sample_sigma(rng: jax.Array, batch: int, sigma_std: float) -> jax.Array:
  """One noise scale per image: sigma ~ N(0, (sigma_std / 0.8)^2)."""
  return jax.random.normal(rng, (batch,)) * (sigma_std / 0.8)


class GAE(nn.Module):
  """Returns (reconstruction, aux) with aux = {'mu', 'z', 'sigma'[, 'kl_mean', 'kl_logvar']}.

  `train=True` draws sigma-noise (or the KL posterior sample) from the 'noise' rng stream.
  """
  width: int = 1024
  depth: int = 24
  num_heads: int = 16
  decoder_width: Optional[int] = None
  decoder_depth: Optional[int] = None
  decoder_num_heads: Optional[int] = None
  patch_size: int = 16
  latent_dim: int = 32
  sigma_std: float = 0.2
  kl: bool = False
  qk_norm: Optional[str] = "rms"
  attention_impl: Optional[str] = None
  remat: str = "none"
  scan: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  init_scheme: str = "torch"   # config.model.init: "torch" (released) | "flax"; layers.INITS

  def setup(self):
    common = dict(qk_norm=self.qk_norm, attention_impl=self.attention_impl, remat=self.remat,
                  scan=self.scan, dtype=self.dtype, param_dtype=self.param_dtype,
                  patch_size=self.patch_size, init_scheme=self.init_scheme)
    self.encoder = vit.ViTEncoder(width=self.width, depth=self.depth,
                                  num_heads=self.num_heads, **common)
    self.projector = nn.Dense(
        self.latent_dim * (2 if self.kl else 1), use_bias=False, dtype=jnp.float32,
        param_dtype=self.param_dtype,
        kernel_init=layers.dense_init(("embed", "latent"), layers.linear_init(self.init_scheme)))
    self.decoder = vit.ViTDecoder(
        width=self.decoder_width or self.width, depth=self.decoder_depth or self.depth,
        num_heads=self.decoder_num_heads or self.num_heads, **common)

  def encode(self, images: jax.Array, train: bool = False):
    """Images (B, H, W, 3) in [-1, 1] -> (z, aux); latents are float32 (B, h, w, d)."""
    h = self.projector(self.encoder(images).astype(jnp.float32))
    b = images.shape[0]
    if self.kl:
      mean, logvar = jnp.split(h, 2, axis=-1)
      logvar = jnp.clip(logvar, -30.0, 20.0)
      z = mean
      if train:
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(self.make_rng("noise"), mean.shape)
      return z, dict(mu=mean, z=z, kl_mean=mean, kl_logvar=logvar)
    mu = layers.rms_normalize(h, eps=1e-6)
    z, sigma = mu, jnp.zeros((b,), jnp.float32)
    if train and self.sigma_std > 0:
      k_sigma, k_eps = jax.random.split(self.make_rng("noise"))
      sigma = sample_sigma(k_sigma, b, self.sigma_std)
      z = mu + sigma[:, None, None, None] * jax.random.normal(k_eps, mu.shape)
    return z, dict(mu=mu, z=z, sigma=sigma)

  def decode(self, z: jax.Array) -> jax.Array:
    """Latents (B, h, w, d) -> images (B, H, W, 3), float32, unclipped."""
    return self.decoder(z).astype(jnp.float32)

  def __call__(self, images: jax.Array, train: bool = False):
    z, aux = self.encode(images, train=train)
    return self.decode(z), aux


def make_gae(model_config, dtype=jnp.float32, param_dtype=jnp.float32) -> GAE:
  """Builds the GAE from a `config.model` ConfigDict (see gae_jax.configs_lib).

  Sizes come from `variant` / `decoder_variant` (vit.VARIANTS) unless explicit `width`,
  `depth`, `num_heads` (and `decoder_*`) fields are set, as in converted checkpoints.
  """
  c = model_config
  def sizes(prefix, variant):
    table = vit.decode_variant(variant) if variant else {}
    out = {}
    for k in ("width", "depth", "num_heads"):
      v = c.get(prefix + k)
      if v is None:
        if not table:
          raise ValueError(f"model config needs '{prefix}{k}' or a variant")
        v = table[k]
      out[k] = v
    return out
  enc = sizes("", c.get("variant"))
  dec = sizes("decoder_", c.get("decoder_variant") or c.get("variant"))
  return GAE(width=enc["width"], depth=enc["depth"], num_heads=enc["num_heads"],
             decoder_width=dec["width"], decoder_depth=dec["depth"],
             decoder_num_heads=dec["num_heads"], patch_size=c.patch_size,
             latent_dim=c.latent_dim, sigma_std=c.sigma_std, kl=c.kl, qk_norm=c.qk_norm,
             attention_impl=c.get("attention_impl"), remat=c.get("remat", "none"),
             scan=c.get("scan", False), dtype=dtype, param_dtype=param_dtype,
             init_scheme=c.get("init", "torch"))
