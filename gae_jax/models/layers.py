"""Transformer building blocks shared by the GAE ViTs, the teacher and the DiT.

Every parameter carries logical axis names (see `gae_jax.sharding` for the rules that map
them onto mesh axes):
  "embed"  model width            "mlp"   MLP hidden width
  "qkv"    fused q/k/v output     "heads" attention output input (num_heads*head_dim)
  "patch"  flattened patch        "pos"   position-embedding rows
  "latent" latent channels d
Activations are constrained at block edges to ("batch", "length", "embed").
"""

import functools
import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Initializer = Callable[..., jax.Array]

ACT_AXES = ("batch", "length", "embed")


def dense_init(names, init: Initializer = nn.initializers.xavier_uniform()):
  """`init` boxed with logical axis `names` (the trainers' shardings read them).

  The box holds empty rules, so unboxing it never adds a sharding constraint: flax's
  DenseGeneral unboxes its *flattened* kernel / bias with the unflattened names (also in
  apply, where it checks shapes), which fails inside `nn.logical_axis_rules`; the
  parameters are laid out by the step's in/out shardings instead (gae_jax/sharding.py).
  """
  return nn.with_logical_partitioning(init, names, rules=())


# Parameter initialisation schemes of the GAE ViTs (`config.model.init`, docs/fidelity.md):
#   "torch" what the released PyTorch modules hold after construction (sii-research/GAE
#           tokenizer/utils/decoder.py ViTEncoder / ViTDecoder, encoder/adapter.py): every
#           nn.Linear keeps torch's default kaiming_uniform(a=sqrt(5)), i.e. U(+-1/sqrt(fan_in));
#           the patch Conv2d is re-initialised by the modules' `_init_weights` with
#           kaiming_normal(mode='fan_out', nonlinearity='relu'); pos_embed gets
#           torch trunc_normal_(std=0.02), whose cut-off is at +-2 absolute (+-100 std).
#   "flax"  this project's earlier scheme: xavier_uniform kernels, lecun_normal patch conv,
#           flax truncated_normal(0.02) (cut at +-2 std) position table.
INITS = ("torch", "flax")


def check_init(init: str) -> str:
  if init not in INITS:
    raise ValueError(f"unknown init {init!r} (config.model.init): use one of {INITS}")
  return init


def torch_linear_init() -> Initializer:
  """torch.nn.Linear / Conv2d default weight init, kaiming_uniform(a=sqrt(5)).

  gain sqrt(2 / (1 + 5)) times sqrt(3 / fan_in) gives U(-1/sqrt(fan_in), 1/sqrt(fan_in)):
  variance 1 / (3 fan_in). fan_in is the kernel's input size (Dense: shape[0]; Conv:
  k*k*in_channels, as torch's in_ch*k*k).
  """
  return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def linear_init(init: str) -> Initializer:
  """The kernel init of every Linear of a GAE ViT under scheme `init` (see INITS)."""
  return torch_linear_init() if check_init(init) == "torch" else nn.initializers.xavier_uniform()


def pos_embed_init(init: str, stddev: float = 0.02) -> Initializer:
  """Learned position table: torch trunc_normal_(std) cuts at +-2 absolute (~untruncated)."""
  if check_init(init) == "flax":
    return nn.initializers.truncated_normal(stddev)

  def f(key, shape, dtype=jnp.float32):
    bound = 2.0 / stddev
    return (jax.random.truncated_normal(key, -bound, bound, shape, jnp.float32)
            * stddev).astype(dtype)
  return f


def constrain(x: jax.Array, names=ACT_AXES) -> jax.Array:
  """Logical sharding constraint; a no-op outside a mesh / rules context."""
  return nn.with_logical_constraint(x, names)


def swiglu_hidden(width: int, mlp_ratio: float = 4.0, multiple_of: int = 256) -> int:
  """Hidden width of the released SwiGLU: multiple_of * ceil(width * ratio * 2/3 / multiple_of).

  1024 -> 2816, 768 -> 2048, 384 -> 1024 (docs/method.md, stage 2).
  """
  return multiple_of * math.ceil(width * mlp_ratio * 2 / 3 / multiple_of)


class RMSNorm(nn.Module):
  """RMSNorm over the last axis; `use_scale=False` is the parameter-free variant.

  Statistics are computed in float32 whatever the compute dtype.
  """
  eps: float = 1e-6
  use_scale: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  scale_axis: str = "embed"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    if self.use_scale:
      scale = self.param("scale", nn.with_logical_partitioning(
          nn.initializers.ones, (self.scale_axis,)), (x.shape[-1],), self.param_dtype)
      y = y * scale.astype(jnp.float32)
    return y.astype(self.dtype)


def rms_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Functional parameter-free RMSNorm (float32 statistics), keeps x's dtype."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  return y.astype(x.dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotary embedding, EVA style: rotates interleaved pairs (x0, x1), (x2, x3), ...

  x: (B, N, H, D); cos, sin: (N, D) with each frequency repeated for its pair.
  """
  x32 = x.astype(jnp.float32)
  pairs = x32.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
  rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
  cos = cos[None, :, None, :]
  sin = sin[None, :, None, :]
  return (x32 * cos + rotated * sin).astype(x.dtype)


class Attention(nn.Module):
  """Multi-head self-attention with a fused qkv projection and optional QK-RMSNorm / RoPE.

  qk_norm: None, "rms" (parameter-free, the GAE release) or "rms_affine" (learned weight,
  LightningDiT). Uses `jax.nn.dot_product_attention` (cuDNN flash attention on GPU when
  `attention_impl="cudnn"`).
  """
  num_heads: int
  qkv_bias: bool = False
  proj_bias: bool = False
  qk_norm: Optional[str] = "rms"
  attention_impl: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = nn.initializers.xavier_uniform()

  @nn.compact
  def __call__(self, x: jax.Array, rope: Optional[tuple[jax.Array, jax.Array]] = None
               ) -> jax.Array:
    b, n, width = x.shape
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
    head_dim = width // self.num_heads
    qkv = nn.DenseGeneral(
        (3, self.num_heads, head_dim), use_bias=self.qkv_bias, dtype=self.dtype,
        param_dtype=self.param_dtype, name="qkv",
        kernel_init=dense_init(("embed", None, "heads", "kv"), _fused_init(self.kernel_init)),
        bias_init=dense_init((None, "heads", "kv"), nn.initializers.zeros),
    )(x)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if self.qk_norm:
      affine = self.qk_norm == "rms_affine"
      if self.qk_norm not in ("rms", "rms_affine"):
        raise ValueError(f"unknown qk_norm {self.qk_norm!r}: use None, 'rms' or 'rms_affine'")
      q = RMSNorm(use_scale=affine, dtype=self.dtype, param_dtype=self.param_dtype,
                  scale_axis="kv", name="q_norm")(q)
      k = RMSNorm(use_scale=affine, dtype=self.dtype, param_dtype=self.param_dtype,
                  scale_axis="kv", name="k_norm")(k)
    if rope is not None:
      q = apply_rope(q, *rope)
      k = apply_rope(k, *rope)
    out = jax.nn.dot_product_attention(q, k, v, implementation=self.attention_impl)
    return nn.DenseGeneral(
        width, axis=(-2, -1), use_bias=self.proj_bias, dtype=self.dtype,
        param_dtype=self.param_dtype, name="proj",
        kernel_init=dense_init(("heads", "kv", "embed"), _merged_init(self.kernel_init)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
    )(out)


def _fused_init(init: Initializer) -> Initializer:
  """Initialises a (width, 3, heads, head_dim) kernel as one (width, 3*width) matrix."""
  def f(key, shape, dtype=jnp.float32):
    return init(key, (shape[0], math.prod(shape[1:])), dtype).reshape(shape)
  return f


def _merged_init(init: Initializer) -> Initializer:
  """Initialises a (heads, head_dim, width) kernel as one (width, width) matrix."""
  def f(key, shape, dtype=jnp.float32):
    return init(key, (math.prod(shape[:-1]), shape[-1]), dtype).reshape(shape)
  return f


class SwiGLU(nn.Module):
  """fc2(silu(fc1(x)) * gate(x)); the activated branch is the one named fc1 (release)."""
  hidden: int
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = nn.initializers.xavier_uniform()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dense = functools.partial(nn.Dense, use_bias=self.use_bias, dtype=self.dtype,
                              param_dtype=self.param_dtype)
    up = dict(kernel_init=dense_init(("embed", "mlp"), self.kernel_init),
              bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)))
    h = nn.silu(dense(self.hidden, name="fc1", **up)(x)) * dense(
        self.hidden, name="gate", **up)(x)
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    return dense(x.shape[-1], name="fc2",
                 kernel_init=dense_init(("mlp", "embed"), self.kernel_init),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",))
                 )(h)


class Block(nn.Module):
  """Pre-norm block: x + attn(RMSNorm(x)); x + mlp(RMSNorm(x)) (parameter-free norms).

  kernel_init: of every Linear in the block (see `linear_init`).
  """
  num_heads: int
  mlp_hidden: int
  qk_norm: Optional[str] = "rms"
  attention_impl: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = nn.initializers.xavier_uniform()

  @nn.compact
  def __call__(self, x: jax.Array, _=None):
    x = constrain(x)
    h = RMSNorm(dtype=self.dtype, name="norm1")(x)
    x = x + Attention(self.num_heads, qk_norm=self.qk_norm,
                      attention_impl=self.attention_impl, dtype=self.dtype,
                      param_dtype=self.param_dtype, kernel_init=self.kernel_init,
                      name="attn")(h)
    h = RMSNorm(dtype=self.dtype, name="norm2")(x)
    x = x + SwiGLU(self.mlp_hidden, dtype=self.dtype, param_dtype=self.param_dtype,
                   kernel_init=self.kernel_init, name="mlp")(h)
    return constrain(x), None


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Transformer(nn.Module):
  """A stack of `Block`s, optionally rematerialised and/or `nn.scan`ned over depth.

  With scan the block parameters are stacked on a leading "layers" axis (one compile of
  one block instead of `depth`); the parameter count is the same.
  """
  depth: int
  num_heads: int
  mlp_hidden: int
  qk_norm: Optional[str] = "rms"
  attention_impl: Optional[str] = None
  remat: str = "none"
  scan: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = nn.initializers.xavier_uniform()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"unknown remat policy {self.remat!r}; choose from "
                       f"{sorted(REMAT_POLICIES)}")
    block_cls = Block
    if self.remat != "none":
      block_cls = nn.remat(Block, policy=REMAT_POLICIES[self.remat], prevent_cse=not self.scan)
    kw = dict(num_heads=self.num_heads, mlp_hidden=self.mlp_hidden, qk_norm=self.qk_norm,
              attention_impl=self.attention_impl, dtype=self.dtype,
              param_dtype=self.param_dtype, kernel_init=self.kernel_init)
    if self.scan:
      stack = nn.scan(block_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                      length=self.depth, metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = stack(**kw, name="blocks")(x, None)
    else:
      for i in range(self.depth):
        x, _ = block_cls(**kw, name=f"blocks_{i}")(x, None)
    return x
