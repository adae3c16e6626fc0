"""Analytic FLOP counts of the networks the benchmark times (per image, multiply-add = 2).

A matmul (M, K) x (K, N) is 2·M·N·K FLOPs. Biases, norms, activations, softmax and the
optimizer are not counted (they are a few percent at the paper's sizes; XLA's
cost analysis counts them, which is one reason the two numbers differ).

Convolutions count only the taps that read an input pixel, not the zero padding:
2·Cout·Cin·Σ_outputs(valid taps), the count XLA's cost analysis uses. At 256 px a 3x3
"same" conv loses (3S - 2)²/(3S)² of the taps to padding (<1% at S = 256, 16% at S = 8).

Per network (forward, per image):
  `vit_block`     qkv 2N·W·3W + attention 2·2N²W + proj 2N·W² + SwiGLU 3 · 2N·W·F
  `gae_encoder`   patch conv 2N·(p²·3)·W + blocks + head 2N·W² + projector 2N·W·d(·2 KL)
  `gae_decoder`   embed 2N·d·W + blocks + head 2N·W·(p²·3)
  `dit`           LightningDiT: per token qkv/proj/SwiGLU (w12 W->2F, w3 F->W) and
                  attention as above; the adaLN modulation Linear(W, 6W) of every block and
                  the final layer's Linear(W, 2W) act on the class/time vector c, i.e.
                  ONCE PER SAMPLE, not per token; timestep MLP 2·(256W + W²) per sample.
  `dinov2`        1 + registers + patches tokens; GELU MLP (W->4W->W) or fused SwiGLU
  `vgg16`         the 13 conv3x3 (pad 1) of torchvision's vgg16.features up to a tap
  `lpips`         VGG16 on one image + the 1x1 heads (Cl -> 1) at the 5 taps
  `patchgan`      NLayerDiscriminator conv4x4 (pad 1) stack
Networks without a closed form here (the stage-1 teacher's downsampler and decoder, the
FID Inception) are counted by `jaxpr_flops`: the same rules applied to every dot_general /
conv_general_dilated of the traced program (scan bodies times their length).

Training multiplies by how the step runs, counted per network in gae_jax/benchmark/
stages.py: a trained network costs forward + input-gradient + weight-gradient = 3 forwards
(minus the first layer's input gradient when its input needs none); a frozen network that
a gradient flows through costs forward + input-gradient = 2 forwards; a frozen network
behind stop_gradient costs 1 forward.
"""

import math
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np


def dense(tokens: float, d_in: int, d_out: int) -> float:
  """FLOPs of a Linear on `tokens` rows: 2·tokens·d_in·d_out."""
  return 2.0 * tokens * d_in * d_out


def attention_core(tokens: int, width: int) -> float:
  """Softmax attention of one sequence: QK^T and AV, 2·(2·N²·W)."""
  return 4.0 * tokens * tokens * width


def valid_taps(in_size: int, kernel: int, stride: int = 1, pad: tuple[int, int] = (0, 0),
               lhs_dilation: int = 1, rhs_dilation: int = 1) -> tuple[int, int]:
  """(output size, Σ over outputs of kernel taps that land on an input element) along one
  spatial axis, with XLA's conv semantics (explicit (lo, hi) padding, dilations)."""
  lo, hi = pad
  span = (in_size - 1) * lhs_dilation + 1
  k_span = (kernel - 1) * rhs_dilation + 1
  out = (span + lo + hi - k_span) // stride + 1
  if out <= 0:
    raise ValueError(f"conv: input {in_size}, kernel {kernel}, stride {stride}, pad {pad} "
                     "gives no output")
  taps = 0
  for o in range(out):
    for j in range(kernel):
      pos = o * stride + j * rhs_dilation - lo
      if 0 <= pos < span and pos % lhs_dilation == 0:
        taps += 1
  return out, taps


def conv2d(size: int | tuple[int, int], c_in: int, c_out: int, kernel: int, stride: int = 1,
           pad: int | tuple[int, int] = 0, groups: int = 1) -> tuple[float, tuple[int, int]]:
  """(FLOPs of a square-kernel conv on one (H, W, c_in) image, output (H', W')).

  Only taps on real input pixels are counted (see the module docstring).
  """
  h, w = (size, size) if isinstance(size, int) else size
  p = (pad, pad) if isinstance(pad, int) else pad
  oh, th = valid_taps(h, kernel, stride, p)
  ow, tw = valid_taps(w, kernel, stride, p)
  return 2.0 * c_out * (c_in // groups) * th * tw, (oh, ow)


# ------------------------------------------------------------------------- transformers


def vit_block(tokens: int, width: int, mlp_hidden: int) -> float:
  """GAE / teacher pre-norm block with the SwiGLU of `layers.SwiGLU` (fc1, gate, fc2)."""
  return (dense(tokens, width, 3 * width) + attention_core(tokens, width)
          + dense(tokens, width, width) + 2 * dense(tokens, width, mlp_hidden)
          + dense(tokens, mlp_hidden, width))


def gae_encoder(image_size: int, patch: int, width: int, depth: int, mlp_hidden: int,
                latent_dim: int, kl: bool = False) -> dict:
  """{'patch_embed', 'blocks', 'head', 'projector'} of E_p + A_p on one image."""
  n = (image_size // patch) ** 2
  return {"patch_embed": dense(n, patch * patch * 3, width),
          "blocks": depth * vit_block(n, width, mlp_hidden),
          "head": dense(n, width, width),
          "projector": dense(n, width, latent_dim * (2 if kl else 1))}


def gae_decoder(image_size: int, patch: int, width: int, depth: int, mlp_hidden: int,
                latent_dim: int) -> dict:
  """{'embed', 'blocks', 'head'} of D_p on one latent."""
  n = (image_size // patch) ** 2
  return {"embed": dense(n, latent_dim, width),
          "blocks": depth * vit_block(n, width, mlp_hidden),
          "head": dense(n, width, patch * patch * 3)}


def gae_model(model, image_size: int) -> dict:
  """{'encoder': {...}, 'decoder': {...}} for a `gae_jax.models.gae.GAE` instance."""
  from gae_jax.models import layers  # pylint: disable=g-import-not-at-top
  dec_w = model.decoder_width or model.width
  return {
      "encoder": gae_encoder(image_size, model.patch_size, model.width, model.depth,
                             layers.swiglu_hidden(model.width), model.latent_dim, model.kl),
      "decoder": gae_decoder(image_size, model.patch_size, dec_w,
                             model.decoder_depth or model.depth, layers.swiglu_hidden(dec_w),
                             model.latent_dim)}


def dit(latent_size: int, latent_dim: int, patch: int, width: int, depth: int,
        mlp_hidden: int, freq_dim: int = 256) -> dict:
  """LightningDiT forward on one latent; adaLN (and the timestep MLP) once per sample."""
  n = (latent_size // patch) ** 2
  block_tokens = (dense(n, width, 3 * width) + attention_core(n, width)
                  + dense(n, width, width) + dense(n, width, 2 * mlp_hidden)
                  + dense(n, mlp_hidden, width))
  return {"x_embedder": dense(n, patch * patch * latent_dim, width),
          "t_embedder": dense(1, freq_dim, width) + dense(1, width, width),
          "blocks": depth * block_tokens,
          "adaln": depth * dense(1, width, 6 * width),
          "final": dense(1, width, 2 * width) + dense(n, width, patch * patch * latent_dim)}


def dit_model(model, latent_size: int) -> dict:
  """`dit` for a `gae_jax.models.dit.LightningDiT` instance."""
  from gae_jax.models import dit as dit_lib  # pylint: disable=g-import-not-at-top
  return dit(latent_size, model.in_channels, model.patch_size, model.width, model.depth,
             dit_lib.dit_swiglu_hidden(model.width, model.mlp_ratio))


def dinov2(image_size: int, width: int, depth: int, mlp_hidden: int, ffn: str = "mlp",
           patch: int = 14, num_registers: int = 0) -> dict:
  """DINOv2 forward on one image at `image_size` (after its resize + crop)."""
  grid = image_size // patch
  n = 1 + num_registers + grid * grid
  mlp = (dense(n, width, 2 * mlp_hidden) + dense(n, mlp_hidden, width) if ffn == "swiglu"
         else dense(n, width, mlp_hidden) + dense(n, mlp_hidden, width))
  block = (dense(n, width, 3 * width) + attention_core(n, width) + dense(n, width, width)
           + mlp)
  return {"patch_embed": dense(grid * grid, patch * patch * 3, width),
          "blocks": depth * block}


def dinov2_module(module, image_size: int) -> dict:
  """`dinov2` for a `gae_jax.models.dinov2.DinoV2` instance."""
  cfg = module.config
  return dinov2(image_size, cfg["width"], cfg["depth"], cfg["mlp_hidden"], cfg["ffn"],
                module.patch_size, module.num_registers)


# ------------------------------------------------------------------------- conv nets


def vgg16(image_size: int, last_tap: str = "relu5_3") -> dict:
  """{conv name: FLOPs} of torchvision's vgg16.features up to `last_tap` on one image."""
  from gae_jax.models import vgg  # pylint: disable=g-import-not-at-top
  out, size, c_in = {}, image_size, 3
  last = "conv" + last_tap[len("relu"):]
  for layer in vgg.VGG16_CFG:
    if layer == "M":
      size //= 2
      continue
    name, c_out = layer
    out[name], _ = conv2d(size, c_in, c_out, 3, 1, 1)
    c_in = c_out
    if name == last:
      break
  return out


def lpips(image_size: int) -> dict:
  """LPIPS-VGG16 on ONE image (its call runs this on both inputs): trunk + 1x1 heads."""
  from gae_jax.models import vgg  # pylint: disable=g-import-not-at-top
  trunk = vgg16(image_size)
  heads = 0.0
  channels = {"relu1_2": 64, "relu2_2": 128, "relu3_3": 256, "relu4_3": 512, "relu5_3": 512}
  for i, tap in enumerate(vgg.LPIPS_TAPS):
    size_i = image_size // 2 ** i
    heads += dense(size_i * size_i, channels[tap], 1) / 2  # one head per image pair
  return {"vgg": sum(trunk.values()), "heads": heads}


def patchgan(image_size: int, ndf: int = 64, n_layers: int = 3) -> dict:
  """{conv name: FLOPs} of `NLayerDiscriminator` (conv4x4, pad 1) on one image."""
  out, size, c_in = {}, image_size, 3
  layers_ = [("conv0", ndf, 2)]
  for n in range(1, n_layers):
    layers_.append((f"conv{n}", ndf * min(2 ** n, 8), 2))
  layers_.append((f"conv{n_layers}", ndf * min(2 ** n_layers, 8), 1))
  layers_.append(("conv_out", 1, 1))
  for name, c_out, stride in layers_:
    out[name], (size, _) = conv2d(size, c_in, c_out, 4, stride, 1)
    c_in = c_out
  return out


# ------------------------------------------------------------------------- jaxpr count


def _conv_flops(eqn) -> float:
  p = eqn.params
  lhs, rhs = eqn.invars[0].aval, eqn.invars[1].aval
  dn = p["dimension_numbers"]
  lhs_spec, rhs_spec, _ = dn.lhs_spec, dn.rhs_spec, dn.out_spec
  batch = lhs.shape[lhs_spec[0]] // p.get("batch_group_count", 1)
  c_out = rhs.shape[rhs_spec[0]]
  c_in_per_group = rhs.shape[rhs_spec[1]]
  taps = 1
  for i, (ld, rd) in enumerate(zip(lhs_spec[2:], rhs_spec[2:])):
    _, t = valid_taps(lhs.shape[ld], rhs.shape[rd], p["window_strides"][i], p["padding"][i],
                      p["lhs_dilation"][i], p["rhs_dilation"][i])
    taps *= t
  return 2.0 * batch * c_out * c_in_per_group * taps


def _dot_flops(eqn) -> float:
  (lc, _), _ = eqn.params["dimension_numbers"]
  lhs = eqn.invars[0].aval
  k = math.prod(lhs.shape[d] for d in lc)
  return 2.0 * math.prod(eqn.outvars[0].aval.shape) * k


def _jaxpr_count(jaxpr, notes: list) -> float:
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot_flops(eqn)
      continue
    if name == "conv_general_dilated":
      total += _conv_flops(eqn)
      continue
    subs = []
    for v in eqn.params.values():
      items = v if isinstance(v, (tuple, list)) else (v,)
      for it in items:
        if isinstance(it, jax.extend.core.ClosedJaxpr):
          subs.append(it.jaxpr)
        elif isinstance(it, jax.extend.core.Jaxpr):
          subs.append(it)
    if not subs:
      continue
    counts = [_jaxpr_count(s, notes) for s in subs]
    if name == "scan":
      total += eqn.params["length"] * sum(counts)
    elif name == "cond":
      total += max(counts)
    else:
      if name == "while":
        notes.append("a while loop body is counted once")
      total += sum(counts)
  return total


def jaxpr_flops(fn: Callable, *args, notes: Optional[list] = None, **kwargs) -> float:
  """Matmul + conv FLOPs of `fn(*args)` from its jaxpr (nothing is compiled or run).

  args may be ShapeDtypeStructs. dot_general: 2·|out|·K; conv: valid taps as `conv2d`;
  scan bodies times their length; cond: the costliest branch; while: the body once (a
  note is appended to `notes`).
  """
  closed = jax.make_jaxpr(lambda *a: fn(*a, **kwargs))(*args)
  return _jaxpr_count(closed.jaxpr, notes if notes is not None else [])


def total(tree: Any) -> float:
  """Sum of a nested dict of FLOP counts."""
  if isinstance(tree, dict):
    return float(sum(total(v) for v in tree.values()))
  return float(tree)


def scaled(tree: Any, factor: float) -> Any:
  if isinstance(tree, dict):
    return {k: scaled(v, factor) for k, v in tree.items()}
  return float(tree) * factor


def gflop(x: float) -> float:
  return round(float(x) / 1e9, 4)


__all__ = ["dense", "attention_core", "valid_taps", "conv2d", "vit_block", "gae_encoder",
           "gae_decoder", "gae_model", "dit", "dit_model", "dinov2", "dinov2_module",
           "vgg16", "lpips", "patchgan", "jaxpr_flops", "total", "scaled", "gflop"]
