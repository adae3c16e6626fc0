"""Float64 PyTorch reference of the released LightningDiT forward, for parity tests.

Written from reading the released model (hustvl/LightningDiT `models/lightningdit.py`,
sii-research/GAE `models/lightningdit_we.py`, their `models/pos_embed.py` (EVA
VisionRotaryEmbeddingFast), `models/rmsnorm.py`, `models/swiglu_ffn.py`), independently of
`gae_jax`: nothing here imports the package. It works on a state dict in exactly the key
layout the authors' `torch.save` writes (`model.state_dict()` / `ema.state_dict()`):

  x_embedder.proj.{weight (W, C, p, p), bias (W,)}        timm PatchEmbed conv
  pos_embed (1, N, W)                                     frozen 2-D sin-cos (zeros when
                                                          use_abs_pos is off)
  feat_rope.freqs_{cos,sin} (N, W / heads)                RoPE buffers (only with use_rope)
  t_embedder.mlp.{0,2}.{weight, bias}                     256 sinusoidal features -> MLP
  y_embedder.embedding_table.weight (classes [+1], W)     + a null row when dropout > 0
  blocks.{i}.norm{1,2}.weight (W,)                        RMSNorm (eps 1e-6, learned weight)
  blocks.{i}.attn.qkv.{weight (3W, W), bias}              rows [q | k | v], heads inside
  blocks.{i}.attn.{q,k}_norm.weight (W / heads,)          QK RMSNorm (use_qknorm only)
  blocks.{i}.attn.proj.{weight (W, W), bias}
  blocks.{i}.mlp.w12.{weight (2H, W), bias}, w3.{weight (W, H), bias}   fused SwiGLU
  blocks.{i}.adaLN_modulation.1.{weight (6W, W), bias}    [shift|scale|gate] msa, then mlp
  final_layer.norm_final.weight, final_layer.adaLN_modulation.1.* (2W, W) [shift|scale],
  final_layer.linear.{weight (p*p*C_out, W), bias}        C_out = 2C when learn_sigma

Everything is computed in float64 with the loaded buffers (pos_embed, RoPE tables), as the
released model uses whatever its state dict holds.
"""

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

DTYPE = torch.float64
EPS = 1e-6


# ------------------------------------------------------------------------------ buffers


def _sincos(positions: np.ndarray, dim: int) -> np.ndarray:
  """[sin(pos * w_k), cos(pos * w_k)], w_k = 10000^(-k / (dim/2)), k < dim/2."""
  w = 10000.0 ** (-np.arange(dim // 2, dtype=np.float64) / (dim / 2))
  ang = positions.astype(np.float64)[:, None] * w[None]
  return np.concatenate([np.sin(ang), np.cos(ang)], axis=1)


def pos_embed_table(width: int, grid: int) -> np.ndarray:
  """Released frozen pos-embed (1, grid^2, width), tokens row-major.

  The release builds its grid with `np.meshgrid(grid_w, grid_h)` and encodes that grid's
  first plane (the column index) into the first width/2 channels and the row index into
  the rest.
  """
  rows, cols = np.divmod(np.arange(grid * grid), grid)
  return np.concatenate([_sincos(cols, width // 2), _sincos(rows, width // 2)], 1)[None]


def rope_tables(head_dim: int, grid: int, theta: float = 10000.0
                ) -> tuple[np.ndarray, np.ndarray]:
  """EVA `VisionRotaryEmbeddingFast(dim=head_dim/2, pt_seq_len=grid)` buffers (N, head_dim).

  Per axis dim = head_dim/2 channels: dim/2 frequencies theta^(-2j/dim), j < dim/2, each
  repeated for its interleaved pair; the first dim channels rotate with the token's row,
  the last dim with its column (their `broadcat` of [freqs[:, None], freqs[None, :]]).
  """
  dim = head_dim // 2
  freqs = theta ** (-np.arange(0, dim, 2, dtype=np.float64)[: dim // 2] / dim)
  rows, cols = np.divmod(np.arange(grid * grid), grid)
  ang_r = np.repeat(rows[:, None] * freqs[None], 2, axis=1)     # (N, dim), pairs equal
  ang_c = np.repeat(cols[:, None] * freqs[None], 2, axis=1)
  ang = np.concatenate([ang_r, ang_c], axis=1)
  return np.cos(ang), np.sin(ang)


# ------------------------------------------------------------------------------ weights


def random_state_dict(rng: np.random.Generator, *, width: int, depth: int, num_heads: int,
                      patch: int, in_channels: int, num_classes: int, latent: int,
                      qk_norm: bool, use_rope: bool, use_abs_pos: bool = True,
                      class_dropout_prob: float = 0.1, learn_sigma: bool = False
                      ) -> dict[str, np.ndarray]:
  """Random float32 values in the released key layout (none of the zero inits, so every
  weight shapes the output). Returns numpy; wrap in torch tensors to `torch.save`."""
  sd: dict[str, np.ndarray] = {}
  f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)

  def linear(key: str, out: int, inp: int, gain: float = 1.0, bias_std: float = 0.05):
    sd[key + ".weight"] = f32(rng.normal(0.0, gain / math.sqrt(inp), (out, inp)))
    sd[key + ".bias"] = f32(rng.normal(0.0, bias_std, (out,)))

  def norm_weight(key: str, n: int):
    sd[key] = f32(1.0 + 0.2 * rng.normal(size=(n,)))

  grid = latent // patch
  head_dim = width // num_heads
  hidden = int(2 / 3 * int(width * 4.0))                   # released SwiGLU width
  out_ch = 2 * in_channels if learn_sigma else in_channels
  sd["x_embedder.proj.weight"] = f32(rng.normal(
      0.0, 1.0 / math.sqrt(in_channels * patch * patch), (width, in_channels, patch, patch)))
  sd["x_embedder.proj.bias"] = f32(rng.normal(0.0, 0.05, (width,)))
  sd["pos_embed"] = f32(pos_embed_table(width, grid) if use_abs_pos
                        else np.zeros((1, grid * grid, width)))
  if use_rope:
    cos, sin = rope_tables(head_dim, grid)
    sd["feat_rope.freqs_cos"], sd["feat_rope.freqs_sin"] = f32(cos), f32(sin)
  linear("t_embedder.mlp.0", width, 256)
  linear("t_embedder.mlp.2", width, width)
  rows = num_classes + int(class_dropout_prob > 0)
  sd["y_embedder.embedding_table.weight"] = f32(rng.normal(0.0, 0.5, (rows, width)))
  for i in range(depth):
    b = f"blocks.{i}."
    norm_weight(b + "norm1.weight", width)
    norm_weight(b + "norm2.weight", width)
    linear(b + "attn.qkv", 3 * width, width)
    if qk_norm:
      norm_weight(b + "attn.q_norm.weight", head_dim)
      norm_weight(b + "attn.k_norm.weight", head_dim)
    linear(b + "attn.proj", width, width)
    linear(b + "mlp.w12", 2 * hidden, width)
    linear(b + "mlp.w3", width, hidden)
    linear(b + "adaLN_modulation.1", 6 * width, width, gain=0.5)
  norm_weight("final_layer.norm_final.weight", width)
  linear("final_layer.adaLN_modulation.1", 2 * width, width, gain=0.5)
  linear("final_layer.linear", patch * patch * out_ch, width)
  return sd


# ------------------------------------------------------------------------------ forward


def _rms(x: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
  y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)
  return y if weight is None else y * weight


def _lin(x: torch.Tensor, sd: dict, key: str) -> torch.Tensor:
  return x @ sd[key + ".weight"].T + sd[key + ".bias"]


def _rotate_pairs(x: torch.Tensor) -> torch.Tensor:
  """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)."""
  pairs = x.unflatten(-1, (-1, 2))
  return torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
  return x * (1 + scale[:, None]) + shift[:, None]


def _timestep_features(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0):
  half = dim // 2
  freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=DTYPE) / half)
  ang = t.to(DTYPE)[:, None] * freqs[None]
  return torch.cat([torch.cos(ang), torch.sin(ang)], dim=-1)


def _attention(h: torch.Tensor, sd: dict, b: str, heads: int, rope) -> torch.Tensor:
  bsz, n, width = h.shape
  hd = width // heads
  qkv = _lin(h, sd, b + "attn.qkv").reshape(bsz, n, 3, heads, hd).permute(2, 0, 3, 1, 4)
  q, k, v = qkv[0], qkv[1], qkv[2]                          # (B, heads, N, hd)
  if b + "attn.q_norm.weight" in sd:
    q = _rms(q, sd[b + "attn.q_norm.weight"])
    k = _rms(k, sd[b + "attn.k_norm.weight"])
  if rope is not None:
    cos, sin = rope
    q = q * cos + _rotate_pairs(q) * sin
    k = k * cos + _rotate_pairs(k) * sin
  att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)
  out = (att @ v).transpose(1, 2).reshape(bsz, n, width)
  return _lin(out, sd, b + "attn.proj")


def _swiglu(h: torch.Tensor, sd: dict, b: str) -> torch.Tensor:
  a, g = _lin(h, sd, b + "mlp.w12").chunk(2, dim=-1)
  return _lin(F.silu(a) * g, sd, b + "mlp.w3")


def velocity(sd_np: dict, x_nhwc: np.ndarray, t: np.ndarray, y: np.ndarray, *,
             num_heads: int, use_abs_pos: bool = True) -> np.ndarray:
  """The released `LightningDiT.forward(x, t, y)` in eval mode, float64.

  sd_np: released-layout state dict (numpy or torch); x_nhwc (B, H, W, C) (transposed to
  the model's NCHW here); t (B,) as given to the model; y (B,) int labels (num_classes is
  the null class). Returns the velocity (B, H, W, C) float64 (NHWC); with learn_sigma the
  first C output channels, as released. QK-norm / RoPE follow the keys present.
  """
  sd = {k: torch.as_tensor(np.asarray(v)).to(DTYPE) for k, v in sd_np.items()}
  x = torch.as_tensor(np.array(x_nhwc)).to(DTYPE).permute(0, 3, 1, 2)
  bsz, chans, height, wid = x.shape
  w_pe = sd["x_embedder.proj.weight"]
  p = w_pe.shape[-1]
  tok = F.conv2d(x, w_pe, sd["x_embedder.proj.bias"], stride=p).flatten(2).transpose(1, 2)
  if use_abs_pos:
    tok = tok + sd["pos_embed"]
  c = _lin(F.silu(_lin(_timestep_features(torch.as_tensor(np.array(t))), sd,
                       "t_embedder.mlp.0")), sd, "t_embedder.mlp.2")
  c = c + sd["y_embedder.embedding_table.weight"][torch.as_tensor(np.array(y)).long()]
  rope = None
  if "feat_rope.freqs_cos" in sd:
    rope = (sd["feat_rope.freqs_cos"], sd["feat_rope.freqs_sin"])
  depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
  for i in range(depth):
    b = f"blocks.{i}."
    mod = _lin(F.silu(c), sd, b + "adaLN_modulation.1").chunk(6, dim=1)
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod
    h = _modulate(_rms(tok, sd[b + "norm1.weight"]), shift_a, scale_a)
    tok = tok + gate_a[:, None] * _attention(h, sd, b, num_heads, rope)
    h = _modulate(_rms(tok, sd[b + "norm2.weight"]), shift_m, scale_m)
    tok = tok + gate_m[:, None] * _swiglu(h, sd, b)
  shift, scale = _lin(F.silu(c), sd, "final_layer.adaLN_modulation.1").chunk(2, dim=1)
  out = _lin(_modulate(_rms(tok, sd["final_layer.norm_final.weight"]), shift, scale), sd,
             "final_layer.linear")                              # (B, N, p*p*C_out)
  c_out = out.shape[-1] // (p * p)
  gh, gw = height // p, wid // p
  img = out.reshape(bsz, gh, gw, p, p, c_out).permute(0, 5, 1, 3, 2, 4)
  img = img.reshape(bsz, c_out, height, wid)[:, :chans]         # learn_sigma: first half
  return img.permute(0, 2, 3, 1).numpy()


def velocity_with_cfg(sd_np: dict, x_nhwc: np.ndarray, t: np.ndarray, y: np.ndarray,
                      scale: float, interval_start: float, null_label: int, *,
                      num_heads: int, use_abs_pos: bool = True) -> np.ndarray:
  """The GAE release's `forward_with_cfg` with cfg_interval=True for a batch x (B, ...):
  run [x; x] with labels [y; null], guided = uncond + scale (cond - uncond) on every
  channel, or cond when t[0] < interval_start. Returns the guided half (B, H, W, C)."""
  xx = np.concatenate([x_nhwc, x_nhwc])
  tt = np.concatenate([t, t])
  yy = np.concatenate([y, np.full_like(y, null_label)])
  out = velocity(sd_np, xx, tt, yy, num_heads=num_heads, use_abs_pos=use_abs_pos)
  cond, uncond = np.split(out, 2)
  if float(t[0]) < interval_start:
    return cond
  return uncond + scale * (cond - uncond)
