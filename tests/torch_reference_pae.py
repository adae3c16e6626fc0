"""Float64 PyTorch reference of the released PAE forward, for parity tests.

Written from reading the authors' inference code (github ZhengrongYue/PAE, commit 51f8fa6:
`tokenizer/pae.py`, `tokenizer/encoders/delta.py`, `tokenizer/encoders/dinov2.py`,
`tokenizer/decoders/decoder.py` (RAE's GeneralDecoder), `tokenizer/latents/
distributions.py`) independently of `gae_jax`: nothing here imports the package. It runs on
a state dict in the key layout of the authors' `{"model": model.state_dict()}`:

  encoder.encoder.*                       HF Dinov2WithRegistersModel, final layernorm with
                                          weight = bias = None (no keys)
  delta_encoder.patch_embed.proj.{weight (D, 3, p, p), bias}
  delta_encoder.pos_embed (1, N, D)       fixed 2-D sin-cos (stored, used as stored)
  delta_encoder.layers.{i}.norm1 | norm2_q | norm2_kv | norm3 .{weight, bias}   eps 1e-5
  delta_encoder.layers.{i}.self_attn.qkv.{weight (3D, D), bias}, .self_attn.proj.*
  delta_encoder.layers.{i}.cross_attn.{q,k,v}_proj.*, .cross_attn.proj.*
  delta_encoder.layers.{i}.mlp.fc1.* (4D, D), .mlp.fc2.*          exact GELU
  delta_encoder.fusion_proj.* (2D, D) sft | (D, D) add | (D, 2D) concat; final_ln.*
  latent_compressor.0.{qkv.weight (3D, D) (no bias), proj.*}       timm Attention
  latent_compressor.1.{weight (d, D, 3, 3), bias}                  (2 = RMSNorm, no keys)
  latent_decompressor.0.{weight (D, d, 3, 3), bias}, latent_decompressor.1.* (Attention)
  decoder.decoder_embed.* (W, D), decoder.decoder_pos_embed (1, 1+N, W) (fixed),
  decoder.trainable_cls_token (1, 1, W),
  decoder.decoder_layers.{i}.layernorm_before | layernorm_after .*  eps 1e-12
  decoder.decoder_layers.{i}.attention.attention.{query,key,value}.*,
  decoder.decoder_layers.{i}.attention.output.dense.*, .intermediate.dense.*,
  decoder.decoder_layers.{i}.output.dense.*, decoder.decoder_norm.*, decoder.decoder_pred.*

Images are NCHW [0, 1]; `encode` resizes to the VFM size with torch bicubic (no antialias),
normalises with ImageNet mean/std, runs the VFM (HF, double), the DAM, the compressor and
the per-token RMSNorm; `decode` the decompressor and the decoder and de-normalises.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F

DTYPE = torch.float64
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _t(sd, k):
  return torch.as_tensor(np.asarray(sd[k]), dtype=DTYPE)


def _linear(sd, prefix, x, bias=True):
  return F.linear(x, _t(sd, prefix + ".weight"), _t(sd, prefix + ".bias") if bias else None)


def _ln(sd, prefix, x, eps):
  return F.layer_norm(x, x.shape[-1:], _t(sd, prefix + ".weight"), _t(sd, prefix + ".bias"),
                      eps)


def _heads(x, n):
  b, l, c = x.shape
  return x.reshape(b, l, n, c // n).permute(0, 2, 1, 3)


def _attend(q, k, v):
  """(B, H, L, hd) softmax attention, scale hd^-0.5, -> (B, L, H*hd)."""
  w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
  o = w @ v
  b, h, l, hd = o.shape
  return o.permute(0, 2, 1, 3).reshape(b, l, h * hd)


def fused_attention(sd, prefix, x, heads, qkv_bias):
  """timm-style Attention: one qkv Linear (rows [q | k | v]) and a proj Linear."""
  qkv = _linear(sd, prefix + ".qkv", x, bias=qkv_bias)
  q, k, v = qkv.chunk(3, dim=-1)
  return _linear(sd, prefix + ".proj", _attend(_heads(q, heads), _heads(k, heads),
                                               _heads(v, heads)))


def delta_encoder(sd, pixels, u, heads, fusion):
  """The DAM on normalised NCHW pixels and VFM tokens u (B, N, D) -> fused tokens."""
  p = "delta_encoder."
  w = _t(sd, p + "patch_embed.proj.weight")
  x = F.conv2d(pixels, w, _t(sd, p + "patch_embed.proj.bias"), stride=w.shape[-1])
  x = x.flatten(2).transpose(1, 2) + _t(sd, p + "pos_embed")
  i = 0
  while f"{p}layers.{i}.norm1.weight" in sd:
    s = f"{p}layers.{i}."
    x = x + fused_attention(sd, s + "self_attn", _ln(sd, s + "norm1", x, 1e-5), heads, True)
    if f"{s}cross_attn.q_proj.weight" in sd:
      q = _linear(sd, s + "cross_attn.q_proj", _ln(sd, s + "norm2_q", x, 1e-5))
      c = _ln(sd, s + "norm2_kv", u, 1e-5)
      k = _linear(sd, s + "cross_attn.k_proj", c)
      v = _linear(sd, s + "cross_attn.v_proj", c)
      x = x + _linear(sd, s + "cross_attn.proj",
                      _attend(_heads(q, heads), _heads(k, heads), _heads(v, heads)))
    h = F.gelu(_linear(sd, s + "mlp.fc1", _ln(sd, s + "norm3", x, 1e-5)))
    x = x + _linear(sd, s + "mlp.fc2", h)
    i += 1
  if fusion == "none":
    return x
  if fusion == "sft":
    gamma, beta = _linear(sd, p + "fusion_proj", x).chunk(2, dim=-1)
    pre = u * (1 + gamma) + beta
  elif fusion == "add":
    pre = _linear(sd, p + "fusion_proj", x) + u
  else:
    pre = _linear(sd, p + "fusion_proj", torch.cat([u, x], dim=-1))
  return _ln(sd, p + "final_ln", pre, 1e-5)


def vfm_pixels(images01, size):
  """NCHW [0, 1] -> torch bicubic (align_corners=False, no antialias) + ImageNet mean/std."""
  x = images01.to(DTYPE)
  if x.shape[-2:] != (size, size):
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
  mean = torch.tensor(MEAN, dtype=DTYPE).view(1, 3, 1, 1)
  std = torch.tensor(STD, dtype=DTYPE).view(1, 3, 1, 1)
  return (x - mean) / std


def encode(sd, vfm, images01, *, size, heads, fusion, num_registers=4):
  """(z NCHW (B, d, g, g), h_z (B, N, D)) for NCHW [0, 1] images. vfm: a float64 HF model."""
  x = vfm_pixels(images01, size)
  with torch.no_grad():
    u = vfm(pixel_values=x).last_hidden_state[:, 1 + num_registers:]
  h = delta_encoder(sd, x, u, heads, fusion) if "delta_encoder.pos_embed" in sd else u
  z = fused_attention(sd, "latent_compressor.0", h, heads, qkv_bias=False)
  b, n, c = z.shape
  g = math.isqrt(n)
  z = z.transpose(1, 2).reshape(b, c, g, g)
  z = F.conv2d(z, _t(sd, "latent_compressor.1.weight"), _t(sd, "latent_compressor.1.bias"),
               padding=1)
  zp = z.permute(0, 2, 3, 1)
  zp = zp * torch.rsqrt(zp.pow(2).mean(-1, keepdim=True) + 1e-6)
  return zp.permute(0, 3, 1, 2), h


def decode(sd, z, *, heads, decoder_heads):
  """NCHW latents (B, d, g, g) -> de-normalised NCHW images (B, 3, g*p, g*p)."""
  h = F.conv2d(z.to(DTYPE), _t(sd, "latent_decompressor.0.weight"),
               _t(sd, "latent_decompressor.0.bias"), padding=1)
  b, c, g, _ = h.shape
  h = h.reshape(b, c, g * g).transpose(1, 2)
  h = fused_attention(sd, "latent_decompressor.1", h, heads, qkv_bias=False)
  p = "decoder."
  x = _linear(sd, p + "decoder_embed", h)
  cls = _t(sd, p + "trainable_cls_token").expand(b, -1, -1)
  x = torch.cat([cls, x], dim=1) + _t(sd, p + "decoder_pos_embed")
  i = 0
  while f"{p}decoder_layers.{i}.layernorm_before.weight" in sd:
    s = f"{p}decoder_layers.{i}."
    a = _ln(sd, s + "layernorm_before", x, 1e-12)
    q = _linear(sd, s + "attention.attention.query", a)
    k = _linear(sd, s + "attention.attention.key", a)
    v = _linear(sd, s + "attention.attention.value", a)
    o = _attend(_heads(q, decoder_heads), _heads(k, decoder_heads), _heads(v, decoder_heads))
    x = x + _linear(sd, s + "attention.output.dense", o)
    m = F.gelu(_linear(sd, s + "intermediate.dense", _ln(sd, s + "layernorm_after", x, 1e-12)))
    x = x + _linear(sd, s + "output.dense", m)
    i += 1
  logits = _linear(sd, p + "decoder_pred", _ln(sd, p + "decoder_norm", x, 1e-12))[:, 1:]
  pp = math.isqrt(logits.shape[-1] // 3)
  img = logits.reshape(b, g, g, pp, pp, 3)
  img = torch.einsum("nhwpqc->nchpwq", img).reshape(b, 3, g * pp, g * pp)
  mean = torch.tensor(MEAN, dtype=DTYPE).view(1, 3, 1, 1)
  std = torch.tensor(STD, dtype=DTYPE).view(1, 3, 1, 1)
  return img * std + mean


# ------------------------------------------------------------------ random checkpoints


def sincos_table(dim, grid, cls_token=False):
  """MAE 2-D sin-cos (numpy, as the release computes it): w coordinate first."""
  def one_d(d, pos):
    omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
  gw, gh = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
  emb = np.concatenate([one_d(dim // 2, gw), one_d(dim // 2, gh)], axis=1)
  if cls_token:
    emb = np.concatenate([np.zeros((1, dim)), emb], axis=0)
  return emb[None].astype(np.float32)


def random_vfm(*, width, depth, heads, patch, pos_image_size, seed):
  """A float64 HF Dinov2WithRegistersModel with random weights and the release's
  affine-free final LayerNorm; returns (model, state dict of numpy float32)."""
  import transformers  # pylint: disable=g-import-not-at-top
  cfg = transformers.Dinov2WithRegistersConfig(
      hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
      image_size=pos_image_size, patch_size=patch, num_register_tokens=4)
  model = transformers.Dinov2WithRegistersModel(cfg).eval()
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, prm in model.named_parameters():
      if name.endswith("lambda1"):
        prm.copy_(0.25 + 0.5 * torch.rand(prm.shape, generator=g))
      elif "norm" in name and name.endswith("weight"):
        prm.copy_(1 + 0.2 * torch.randn(prm.shape, generator=g))
      else:
        prm.copy_(0.05 * torch.randn(prm.shape, generator=g))
  model.layernorm.elementwise_affine = False
  model.layernorm.weight = None
  model.layernorm.bias = None
  model = model.double()
  sd = {k: v.detach().float().numpy().copy() for k, v in model.state_dict().items()}
  return model, sd


def random_pae_state_dict(rng, *, width, heads, patch, grid, latent_dim, dam_depth,
                          decoder_width, decoder_depth, decoder_patch, fusion="sft",
                          cross=True, mlp_ratio=4):
  """Random float32 PAE tensors (no VFM) in the release's key layout; LayerNorm weights
  near 1, everything else ~N(0, s) with s keeping activations O(1)."""
  sd = {}
  lin = lambda o, i: (rng.standard_normal((o, i)) / math.sqrt(i)).astype(np.float32)
  vec = lambda n, s=0.05: (s * rng.standard_normal(n)).astype(np.float32)

  def ln(k, n):
    sd[k + ".weight"] = (1 + 0.2 * rng.standard_normal(n)).astype(np.float32)
    sd[k + ".bias"] = vec(n, 0.1)

  def dense(k, o, i, bias=True):
    sd[k + ".weight"] = lin(o, i)
    if bias:
      sd[k + ".bias"] = vec(o)

  d = "delta_encoder."
  sd[d + "patch_embed.proj.weight"] = (rng.standard_normal((width, 3, patch, patch))
                                       / patch / math.sqrt(3)).astype(np.float32)
  sd[d + "patch_embed.proj.bias"] = vec(width)
  sd[d + "pos_embed"] = sincos_table(width, grid)
  for i in range(dam_depth):
    s = f"{d}layers.{i}."
    ln(s + "norm1", width)
    dense(s + "self_attn.qkv", 3 * width, width)
    dense(s + "self_attn.proj", width, width)
    if cross:
      ln(s + "norm2_q", width)
      ln(s + "norm2_kv", width)
      for n in ("q_proj", "k_proj", "v_proj", "proj"):
        dense(s + "cross_attn." + n, width, width)
    ln(s + "norm3", width)
    dense(s + "mlp.fc1", mlp_ratio * width, width)
    dense(s + "mlp.fc2", width, mlp_ratio * width)
  if fusion == "sft":
    sd[d + "fusion_proj.weight"] = 0.3 * lin(2 * width, width)
    sd[d + "fusion_proj.bias"] = vec(2 * width)
  elif fusion == "add":
    dense(d + "fusion_proj", width, width)
  elif fusion == "concat":
    dense(d + "fusion_proj", width, 2 * width)
  if fusion != "none":
    ln(d + "final_ln", width)
  dense("latent_compressor.0.qkv", 3 * width, width, bias=False)
  dense("latent_compressor.0.proj", width, width)
  sd["latent_compressor.1.weight"] = (rng.standard_normal((latent_dim, width, 3, 3))
                                      / math.sqrt(9 * width)).astype(np.float32)
  sd["latent_compressor.1.bias"] = vec(latent_dim)
  sd["latent_decompressor.0.weight"] = (rng.standard_normal((width, latent_dim, 3, 3))
                                        / math.sqrt(9 * latent_dim)).astype(np.float32)
  sd["latent_decompressor.0.bias"] = vec(width)
  dense("latent_decompressor.1.qkv", 3 * width, width, bias=False)
  dense("latent_decompressor.1.proj", width, width)
  p = "decoder."
  dense(p + "decoder_embed", decoder_width, width)
  sd[p + "decoder_pos_embed"] = sincos_table(decoder_width, grid, cls_token=True)
  sd[p + "trainable_cls_token"] = vec((1, 1, decoder_width), 0.5)
  for i in range(decoder_depth):
    s = f"{p}decoder_layers.{i}."
    ln(s + "layernorm_before", decoder_width)
    for n in ("query", "key", "value"):
      dense(s + "attention.attention." + n, decoder_width, decoder_width)
    dense(s + "attention.output.dense", decoder_width, decoder_width)
    ln(s + "layernorm_after", decoder_width)
    dense(s + "intermediate.dense", 4 * decoder_width, decoder_width)
    dense(s + "output.dense", decoder_width, 4 * decoder_width)
  ln(p + "decoder_norm", decoder_width)
  dense(p + "decoder_pred", decoder_patch * decoder_patch * 3, decoder_width)
  return sd
