"""PatchGAN discriminator (pix2pixHD / taming-transformers `NLayerDiscriminator`), Linen.

Layout for n_layers=3, ndf=64 (256x256 input -> 30x30 logits, 64x64 -> 6x6):
  conv4x4/s2 (64, bias)                      + LeakyReLU(0.2)
  conv4x4/s2 (128, no bias) + BatchNorm      + LeakyReLU(0.2)
  conv4x4/s2 (256, no bias) + BatchNorm      + LeakyReLU(0.2)
  conv4x4/s1 (512, no bias) + BatchNorm      + LeakyReLU(0.2)
  conv4x4/s1 (1, bias)                       -> patch logits
Every conv emulates torch `padding=1` with explicit ((1, 1), (1, 1)) padding (Flax 'SAME'
would pad a 4x4/s2 kernel asymmetrically and change the output size).

Init (taming `weights_init`): conv kernels N(0, 0.02); BatchNorm scale N(1, 0.02), bias 0.
Conv biases follow torch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)), which taming keeps.
BatchNorm: momentum 0.9 (torch 0.1), eps 1e-5, running stats in the `batch_stats`
collection (apply with `mutable=['batch_stats']` when `train=True`). Differences from torch
BN: the running variance is updated with the biased batch variance. Under jit with a
sharded batch the batch statistics are global (no axis_name needed). Like taming, the
caller decides whether real and fake batches go through separate calls (separate stats).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

_PAD1 = ((1, 1), (1, 1))  # torch padding=1


def _torch_bias_init(fan_in: int):
  """torch.nn.Conv2d default bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / (fan_in ** 0.5)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def _bn_scale_init(key, shape, dtype=jnp.float32):
  return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


class NLayerDiscriminator(nn.Module):
  """PatchGAN. Input NHWC in [-1, 1]; returns patch logits (B, h, w, 1) in float32."""
  ndf: int = 64
  n_layers: int = 3
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    if x.ndim != 4:
      raise ValueError(f"NLayerDiscriminator wants NHWC images, got shape {x.shape}")
    kinit = nn.initializers.normal(stddev=0.02)

    def conv(h, features, stride, use_bias, name):
      fan_in = h.shape[-1] * 16
      return nn.Conv(features, (4, 4), strides=(stride, stride), padding=_PAD1,
                     use_bias=use_bias, kernel_init=kinit,
                     bias_init=_torch_bias_init(fan_in), dtype=self.dtype,
                     param_dtype=self.param_dtype, name=name)(h)

    def bn(h, name):
      return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                          scale_init=_bn_scale_init, bias_init=nn.initializers.zeros,
                          dtype=self.dtype, param_dtype=self.param_dtype, name=name)(h)

    h = x.astype(self.dtype)
    h = nn.leaky_relu(conv(h, self.ndf, 2, True, "conv0"), 0.2)
    for n in range(1, self.n_layers):
      h = conv(h, self.ndf * min(2 ** n, 8), 2, False, f"conv{n}")
      h = nn.leaky_relu(bn(h, f"bn{n}"), 0.2)
    n = self.n_layers
    h = conv(h, self.ndf * min(2 ** n, 8), 1, False, f"conv{n}")
    h = nn.leaky_relu(bn(h, f"bn{n}"), 0.2)
    h = conv(h, 1, 1, True, "conv_out")
    return h.astype(jnp.float32)
