"""Float64 PyTorch reference of the released semantic teacher, for parity tests.

Written from reading sii-research/GAE `tokenizer/utils/sp_teacher/sp_teacher.py`
(`DinoReconstructor4D.forward` after its frozen DINOv2), `model_simple.py`
(`BasicTransformerBlock_Simple`: attention only, no residual) and `model.py`
(`BasicTransformerBlock`: pre-norm attention + SwiGLU, residuals), independently of
`gae_jax`. It reads a state dict in the key layout of their `latest.pth`
(`model_state_dict`):

  base_model.model.*                          the frozen DINOv2 (torch-hub names)
  pos_embed_pro (1, N, C)                     added to RMSNorm(features)
  projector_block.attn.qkv.weight (3C, C)     rows [q | k | v], no biases anywhere
  projector_block.attn.proj.weight (C, C)
  to_latent.weight (w^2 d, w^2 C)             per w x w window, flattened (wy, wx, c)
  recon_head.weight (C, d)
  pos_embed_dec (1, N, C)
  decoder_layers.{i}.attn.{qkv,proj}.weight, decoder_layers.{i}.mlp.{fc1,gate,fc2}.weight
Every norm is RMSNorm(eps 1e-6) without weight; heads = C // 64 as released.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F

DTYPE = torch.float64
EPS = 1e-6


def random_state_dict(rng: np.random.Generator, *, channels: int, latent_dim: int,
                      window: int, decoder_depth: int, grid: int = 16,
                      dino_depth: int = 1) -> dict[str, np.ndarray]:
  """Random float32 values in the released `model_state_dict` layout, with a tiny DINOv2
  (width `channels`, patch 14, no registers) under base_model.model.* as in the file."""
  c, d, n = channels, latent_dim, grid * grid
  f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)
  lin = lambda out, inp: f32(rng.normal(0.0, 1.0 / math.sqrt(inp), (out, inp)))
  hidden = 256 * ((int(c * 4.0 * 2 / 3) + 255) // 256)          # released SwiGLU width
  sd = {"pos_embed_pro": f32(rng.normal(0.0, 0.3, (1, n, c))),
        "projector_block.attn.qkv.weight": lin(3 * c, c),
        "projector_block.attn.proj.weight": lin(c, c),
        "to_latent.weight": lin(window * window * d, window * window * c),
        "recon_head.weight": lin(c, d),
        "pos_embed_dec": f32(rng.normal(0.0, 0.3, (1, n, c)))}
  for i in range(decoder_depth):
    b = f"decoder_layers.{i}."
    sd[b + "attn.qkv.weight"] = lin(3 * c, c)
    sd[b + "attn.proj.weight"] = lin(c, c)
    sd[b + "mlp.fc1.weight"] = lin(hidden, c)
    sd[b + "mlp.gate.weight"] = lin(hidden, c)
    sd[b + "mlp.fc2.weight"] = lin(c, hidden)
  v = "base_model.model."
  pos_grid = 4
  sd[v + "cls_token"] = f32(rng.normal(0.0, 0.02, (1, 1, c)))
  sd[v + "pos_embed"] = f32(rng.normal(0.0, 0.02, (1, 1 + pos_grid ** 2, c)))
  sd[v + "mask_token"] = f32(np.zeros((1, c)))
  sd[v + "patch_embed.proj.weight"] = f32(rng.normal(0.0, 0.02, (c, 3, 14, 14)))
  sd[v + "patch_embed.proj.bias"] = f32(np.zeros(c))
  for i in range(dino_depth):
    b = f"{v}blocks.{i}."
    for k, shape in (("norm1.weight", (c,)), ("norm1.bias", (c,)),
                     ("attn.qkv.weight", (3 * c, c)), ("attn.qkv.bias", (3 * c,)),
                     ("attn.proj.weight", (c, c)), ("attn.proj.bias", (c,)),
                     ("ls1.gamma", (c,)), ("norm2.weight", (c,)), ("norm2.bias", (c,)),
                     ("mlp.fc1.weight", (4 * c, c)), ("mlp.fc1.bias", (4 * c,)),
                     ("mlp.fc2.weight", (c, 4 * c)), ("mlp.fc2.bias", (c,)),
                     ("ls2.gamma", (c,))):
      sd[b + k] = f32(rng.normal(0.0, 0.02, shape))
  sd[v + "norm.weight"] = f32(np.ones(c))
  sd[v + "norm.bias"] = f32(np.zeros(c))
  return sd


def _rms(x: torch.Tensor) -> torch.Tensor:
  return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)


def _attention(x: torch.Tensor, qkv_w: torch.Tensor, proj_w: torch.Tensor) -> torch.Tensor:
  """Their Attention: fused qkv split [q | k | v], heads of 64, q/k RMSNorm, no biases."""
  bsz, n, c = x.shape
  heads = c // 64
  hd = c // heads
  q, k, v = (a.reshape(bsz, n, heads, hd).transpose(1, 2)
             for a in (x @ qkv_w.T).split(c, dim=-1))
  q, k = _rms(q), _rms(k)
  att = torch.softmax(q @ k.transpose(-1, -2) * hd ** -0.5, dim=-1)
  return (att @ v).transpose(1, 2).reshape(bsz, n, c) @ proj_w.T


def forward(sd_np: dict, feats_bhwc: np.ndarray, window: int
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """`DinoReconstructor4D.forward` from the DINOv2 patch features on, float64.

  feats_bhwc: (B, h, w, C) patch features (their (B, C, h, w) transposed), tokens
  row-major. Returns (recon, latent, target) as numpy float64: recon and target
  (B, h, w, C), latent (B, h, w, d), the tensor fed to recon_head (stage 2's z_sp).
  """
  sd = {k: torch.as_tensor(np.asarray(a)).to(DTYPE) for k, a in sd_np.items()
        if not k.startswith("base_model.")}
  f = torch.as_tensor(np.array(feats_bhwc)).to(DTYPE)
  b, h, w, c = f.shape
  target = _rms(f.reshape(b, h * w, c))
  x = target + sd["pos_embed_pro"]
  x = _attention(_rms(x), sd["projector_block.attn.qkv.weight"],
                 sd["projector_block.attn.proj.weight"])            # no residual
  x = _rms(x)
  ws = window
  win = x.reshape(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
  z = win.reshape(b, (h // ws) * (w // ws), ws * ws * c) @ sd["to_latent.weight"].T
  z = z.reshape(b, h // ws, w // ws, ws, ws, -1).permute(0, 1, 3, 2, 4, 5)
  z = _rms(z.reshape(b, h * w, -1))
  r = z @ sd["recon_head.weight"].T + sd["pos_embed_dec"]
  depth = len({k.split(".")[1] for k in sd if k.startswith("decoder_layers.")})
  for i in range(depth):
    p = f"decoder_layers.{i}."
    r = r + _attention(_rms(r), sd[p + "attn.qkv.weight"], sd[p + "attn.proj.weight"])
    hh = _rms(r)
    r = r + (F.silu(hh @ sd[p + "mlp.fc1.weight"].T) * (hh @ sd[p + "mlp.gate.weight"].T)
             ) @ sd[p + "mlp.fc2.weight"].T
  r = _rms(r)
  as_grid = lambda a: a.reshape(b, h, w, -1).numpy()
  return as_grid(r), as_grid(z), as_grid(target)
