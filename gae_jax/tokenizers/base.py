"""The one tokenizer interface: images (NHWC, [-1, 1]) <-> latents (B, h, w, d).

GAE, PAE and the KL ablation all answer to this handle (STYLE.md, "Two tokenizer
families, one interface"; issue 12 deliverable 5). A family builds its pure functions

  encode_fn(params, images) -> z       images (B, H, W, 3) float in [-1, 1]; z (B, h, w, d)
  decode_fn(params, z) -> images       (B, image_size, image_size, 3) float, unclipped

(any family-specific resize / [0, 1] / ImageNet normalisation happens inside them) and
passes them here. The handle keeps `params` on device, jits the functions with the
params as an argument (never baked-in constants) and checks shapes and dtypes at the
boundary with a one-line error. Stages that jit or shard themselves (latent cache, DiT
trainer, sampling, evaluation) take `.encode_fn` / `.decode_fn` / `.params` /
`.latent_shape` and never branch on `.family`.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

FAMILIES = ("gae", "pae", "kl")

EncodeFn = Callable[[Any, jax.Array], jax.Array]
DecodeFn = Callable[[Any, jax.Array], jax.Array]


class Tokenizer:
  """A frozen tokenizer handle: `.encode`, `.decode`, `.reconstruct`, `.params`, `.config`.

  Attributes:
    family: "gae" | "pae" | "kl" (for reports and file names only; stages never branch on it).
    params: the tokenizer's parameters, on device.
    config: ml_collections.ConfigDict describing the network (family-specific fields,
      plus `source`, where the weights came from, when known).
    image_size: side of the decoded images (and the native encoder input size), pixels.
    latent_shape: (h, w, d) of one image's latent.
    encode_fn, decode_fn: the pure functions above, for callers that jit/shard themselves.
  """

  def __init__(self, *, family: str, params: Any, config: ml_collections.ConfigDict,
               encode_fn: EncodeFn, decode_fn: DecodeFn, image_size: int,
               latent_shape: tuple[int, int, int], source: str = "<params>"):
    if family not in FAMILIES:
      raise ValueError(f"tokenizer family {family!r} from {source} is not one of {FAMILIES}")
    latent_shape = tuple(int(v) for v in latent_shape)
    if len(latent_shape) != 3 or min(latent_shape) < 1:
      raise ValueError(f"tokenizer from {source}: latent_shape must be (h, w, d) > 0, got "
                       f"{latent_shape}")
    self.family = family
    self.config = config
    self.source = source
    self.params = jax.device_put(params)
    self.encode_fn = encode_fn
    self.decode_fn = decode_fn
    self._image_size = int(image_size)
    self._latent_shape = latent_shape
    self._encode = jax.jit(encode_fn)
    self._decode = jax.jit(decode_fn)
    self._reconstruct = jax.jit(lambda p, x: decode_fn(p, encode_fn(p, x)))

  @property
  def name(self) -> str:
    """The family in capitals ("GAE", "PAE", "KL"), for messages."""
    return self.family.upper()

  @property
  def image_size(self) -> int:
    return self._image_size

  @property
  def latent_shape(self) -> tuple[int, int, int]:
    return self._latent_shape

  def check_images(self, images) -> jax.Array:
    """`images` as a float jax.Array (B, H, W, 3); ValueError otherwise."""
    x = jnp.asarray(images)
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"{self.name} expects NHWC RGB images (B, H, W, 3) in [-1, 1], "
                       f"got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{self.name} expects float images in [-1, 1], got dtype {x.dtype}")
    return x

  def check_latents(self, z) -> jax.Array:
    """`z` as float32 (B, h, w, d) matching `latent_shape`; ValueError otherwise."""
    z = jnp.asarray(z, jnp.float32)
    if z.ndim != 4 or z.shape[1:] != self.latent_shape:
      raise ValueError(f"{self.name} decode expects latents "
                       f"(B, {', '.join(map(str, self.latent_shape))}), got {z.shape}")
    return z

  def encode(self, images) -> jax.Array:
    """(B, H, W, 3) float in [-1, 1] -> latents (B, h, w, d), float32, deterministic."""
    return self._encode(self.params, self.check_images(images))

  def decode(self, z) -> jax.Array:
    """(B, h, w, d) latents -> (B, image_size, image_size, 3) images, float32, unclipped."""
    return self._decode(self.params, self.check_latents(z))

  def reconstruct(self, images) -> jax.Array:
    """decode(encode(images)); output at `image_size`."""
    return self._reconstruct(self.params, self.check_images(images))

  def __repr__(self) -> str:
    return (f"{type(self).__name__}(family={self.family!r}, image_size={self.image_size}, "
            f"latent_shape={self.latent_shape}, source={self.source!r})")
