"""Latent-manifold diagnostics: the three properties the PAE paper names as what makes a
latent space diffusion-friendly (coherent spatial structure, local continuity, global
semantics), measured on latents z (N, h, w, d) of a set of images. Formulas (also in
docs/metrics.md):

Spatial structure
  spatial_similarity: tokens are centred by the dataset mean token m and unit-normalised,
    u_p = (z_p - m) / ||z_p - m||. For a token distance r (Euclidean on the h x w grid,
    rounded to the nearest integer) S(r) = mean over images and token pairs (p, q) with
    round(||p - q||) = r of <u_p, u_q>. A spatially coherent latent has S(1) near 1 that
    decays with r; i.i.d. tokens give S(r) ~ 0 for every r.
  pca_edge_agreement: P = the projection of the centred tokens on the top-3 principal
    axes (fitted over all tokens of the set), per image a (h, w, 3) map. G(f) = the
    forward-difference gradient magnitude of a map f (h, w, c) on the (h-1) x (w-1) grid,
    G = sqrt(sum_c (f[y, x+1] - f[y, x])^2 + (f[y+1, x] - f[y, x])^2). The image map is
    the image average-pooled to h x w (RGB). The score is the mean over images of the
    Pearson correlation between G(P) and G(pooled image) over grid positions (images with
    a constant G are skipped): 1 when latent PCA edges sit where image edges are.

Local continuity
  decoder_gain(s): delta = s * rms(z) * g, g ~ N(0, I), per image; the gain is
    rms(D(z + delta) - D(z)) / rms(delta) (rms over all elements of an image, then the
    mean over images): output change per unit latent perturbation, dimension-free.
  interpolation: z_t = slerp per token (or lerp) between the latents of two images,
    t = 0, 1/T, ..., 1; x_t = D(z_t); d_t = x_{t+1} - x_t, a_t = x_{t+1} - 2 x_t + x_{t-1}.
    roughness = sum_t ||a_t||^2 / sum_t ||d_t||^2 (0 for a path decoded at constant speed
    along a straight line, grows with kinks / jumps); path_ratio = sum_t ||d_t|| /
    ||x_T - x_0|| (>= 1; 1 for a straight decoded path). Means over image pairs.

Global semantics
  linear probe top-1 (see linear_probe.py) and knn_accuracy: cosine k-NN (k = 20) with
    DINO's weighted vote: class score = sum over the k nearest train latents of
    exp(cos / T) (T = 0.07) for their class; top-1 of the argmax. Latents are flattened
    (or GAP'd) and unit-normalised.
"""

from typing import Callable

import numpy as np

Decoder = Callable[[np.ndarray], np.ndarray]


# ------------------------------------------------------------------------------------------
# Spatial structure.


def _check_latents(z) -> np.ndarray:
  z = np.asarray(z, np.float64)
  if z.ndim != 4:
    raise ValueError(f"latents must be (N, h, w, d), got shape {z.shape}")
  return z


def spatial_similarity(latents, max_distance: int | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
  """(distances r = 1..R, S(r)): mean cosine similarity of centred tokens at distance r."""
  z = _check_latents(latents)
  n, h, w, d = z.shape
  u = z - z.reshape(-1, d).mean(axis=0)
  u = u / np.maximum(np.linalg.norm(u, axis=-1, keepdims=True), 1e-12)
  rmax = max_distance or max(1, min(h, w) // 2)
  sums = np.zeros(rmax + 1)
  counts = np.zeros(rmax + 1)
  for dy in range(0, min(h, rmax + 1)):
    for dx in range(-min(w - 1, rmax), min(w, rmax + 1)):
      if dy == 0 and dx <= 0:
        continue  # each unordered pair once
      r = int(round(np.hypot(dy, dx)))
      if r < 1 or r > rmax:
        continue
      x0, x1 = max(0, -dx), w - max(0, dx)
      a = u[:, :h - dy, x0:x1]
      b = u[:, dy:, x0 + dx:x1 + dx]
      c = np.sum(a * b, axis=-1)
      sums[r] += c.sum()
      counts[r] += c.size
  r = np.arange(1, rmax + 1)
  ok = counts[1:] > 0
  return r[ok], (sums[1:] / np.maximum(counts[1:], 1))[ok]


def pca_maps(latents, k: int = 3) -> np.ndarray:
  """Projection of the centred tokens on the top-k principal axes: (N, h, w, k)."""
  z = _check_latents(latents)
  n, h, w, d = z.shape
  flat = z.reshape(-1, d)
  flat = flat - flat.mean(axis=0)
  cov = flat.T @ flat / max(flat.shape[0] - 1, 1)
  evals, evecs = np.linalg.eigh(cov)
  top = evecs[:, np.argsort(evals)[::-1][:min(k, d)]]
  return (flat @ top).reshape(n, h, w, -1)


def gradient_magnitude(maps) -> np.ndarray:
  """sqrt(sum_c dx^2 + dy^2) with forward differences: (N, h-1, w-1) of (N, h, w, c)."""
  f = np.asarray(maps, np.float64)
  if f.ndim == 3:
    f = f[..., None]
  gx = f[:, :-1, 1:] - f[:, :-1, :-1]
  gy = f[:, 1:, :-1] - f[:, :-1, :-1]
  return np.sqrt(np.sum(gx * gx + gy * gy, axis=-1))


def pool_images(images, grid: tuple[int, int]) -> np.ndarray:
  """Average-pools (N, H, W, C) images to (N, gh, gw, C) (H, W divisible by the grid)."""
  x = np.asarray(images, np.float64)
  n, hh, ww, c = x.shape
  gh, gw = grid
  if hh % gh or ww % gw:
    raise ValueError(f"images {x.shape} are not divisible into a {gh}x{gw} grid")
  return x.reshape(n, gh, hh // gh, gw, ww // gw, c).mean(axis=(2, 4))


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
  a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
  den = np.sqrt((a * a).sum() * (b * b).sum())
  return float((a * b).sum() / den) if den > 0 else float("nan")


def pca_edge_agreement(latents, images, k: int = 3) -> float:
  """Mean over images of corr(G(top-k PCA map), G(image pooled to the latent grid))."""
  z = _check_latents(latents)
  x = np.asarray(images)
  if x.shape[0] != z.shape[0]:
    raise ValueError(f"{x.shape[0]} images for {z.shape[0]} latents")
  gl = gradient_magnitude(pca_maps(z, k))
  gi = gradient_magnitude(pool_images(x, z.shape[1:3]))
  vals = [_pearson(a, b) for a, b in zip(gl, gi)]
  vals = [v for v in vals if np.isfinite(v)]
  return float(np.mean(vals)) if vals else float("nan")


# ------------------------------------------------------------------------------------------
# Local continuity.


def _rms(x: np.ndarray) -> np.ndarray:
  return np.sqrt(np.mean(np.square(x.reshape(x.shape[0], -1)), axis=1))


def decoder_gain(decode: Decoder, latents, scales=(0.01, 0.05, 0.1), seed: int = 0
                 ) -> dict[float, float]:
  """{s: mean_i rms(D(z_i + delta_i) - D(z_i)) / rms(delta_i)}, delta = s rms(z) g."""
  z = np.asarray(latents, np.float32)
  base = np.asarray(decode(z), np.float64)
  rng = np.random.default_rng(seed)
  out = {}
  for s in scales:
    if s <= 0:
      raise ValueError(f"decoder_gain scales must be > 0, got {s}")
    g = rng.standard_normal(z.shape).astype(np.float32)
    delta = (s * _rms(z)[:, None, None, None] * g).astype(np.float32)
    moved = np.asarray(decode(z + delta), np.float64)
    out[float(s)] = float(np.mean(_rms(moved - base) / np.maximum(_rms(delta), 1e-12)))
  return out


def slerp(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
  """Spherical interpolation per token (last axis), norms interpolated linearly."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  na = np.linalg.norm(a, axis=-1, keepdims=True)
  nb = np.linalg.norm(b, axis=-1, keepdims=True)
  ua, ub = a / np.maximum(na, 1e-12), b / np.maximum(nb, 1e-12)
  cos = np.clip(np.sum(ua * ub, axis=-1, keepdims=True), -1.0, 1.0)
  omega = np.arccos(cos)
  so = np.sin(omega)
  small = so < 1e-6
  wa = np.where(small, 1.0 - t, np.sin((1.0 - t) * omega) / np.where(small, 1.0, so))
  wb = np.where(small, t, np.sin(t * omega) / np.where(small, 1.0, so))
  return (wa * ua + wb * ub) * ((1.0 - t) * na + t * nb)


def interpolation_path(za, zb, steps: int = 8, mode: str = "slerp") -> np.ndarray:
  """(steps + 1, *z.shape) latents from za to zb."""
  if mode not in ("slerp", "lerp"):
    raise ValueError(f"interpolation mode must be 'slerp' or 'lerp', got {mode!r}")
  ts = np.linspace(0.0, 1.0, steps + 1)
  za, zb = np.asarray(za, np.float64), np.asarray(zb, np.float64)
  if mode == "lerp":
    return np.stack([(1 - t) * za + t * zb for t in ts]).astype(np.float32)
  return np.stack([slerp(za, zb, t) for t in ts]).astype(np.float32)


def path_smoothness(frames) -> tuple[float, float]:
  """(roughness, path_ratio) of decoded frames (T+1, ...); see the module docstring."""
  x = np.asarray(frames, np.float64).reshape(len(frames), -1)
  d = np.diff(x, axis=0)
  a = np.diff(x, n=2, axis=0)
  dd = np.sum(d * d)
  rough = float(np.sum(a * a) / dd) if dd > 0 else 0.0
  chord = np.linalg.norm(x[-1] - x[0])
  length = np.sum(np.linalg.norm(d, axis=1))
  ratio = float(length / chord) if chord > 0 else float("nan")
  return rough, ratio


def interpolation_smoothness(decode: Decoder, latents, pairs, *, steps: int = 8,
                             mode: str = "slerp") -> dict:
  """Mean roughness / path_ratio over (i, j) pairs; also the first pair's frames."""
  z = np.asarray(latents, np.float32)
  pairs = list(pairs)
  if not pairs:
    raise ValueError("interpolation_smoothness needs at least one pair")
  paths = np.concatenate([interpolation_path(z[i], z[j], steps, mode) for i, j in pairs])
  frames = np.asarray(decode(paths)).reshape(len(pairs), steps + 1, *np.shape(decode(z[:1]))[1:])
  stats = [path_smoothness(f) for f in frames]
  rough = [s[0] for s in stats]
  ratio = [s[1] for s in stats if np.isfinite(s[1])]
  return {"roughness": float(np.mean(rough)),
          "path_ratio": float(np.mean(ratio)) if ratio else float("nan"),
          "frames": frames[0], "num_pairs": len(pairs), "steps": steps, "mode": mode}


# ------------------------------------------------------------------------------------------
# Global semantics.


def knn_accuracy(train_feats, train_labels, val_feats, val_labels, *, k: int = 20,
                 temperature: float = 0.07, num_classes: int | None = None,
                 pool: str = "flatten", batch: int = 1024) -> float:
  """Top-1 of cosine k-NN with DINO's exp(cos / T) weighted vote."""
  def prep(f):
    f = np.asarray(f, np.float64)
    if f.ndim == 4:
      f = f.mean(axis=(1, 2)) if pool == "GAP" else f.reshape(f.shape[0], -1)
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
  tr, va = prep(train_feats), prep(val_feats)
  ytr, yva = np.asarray(train_labels, np.int64), np.asarray(val_labels, np.int64)
  if tr.shape[0] != ytr.shape[0] or va.shape[0] != yva.shape[0]:
    raise ValueError(f"features / labels differ: train {tr.shape} {ytr.shape}, "
                     f"val {va.shape} {yva.shape}")
  c = num_classes or int(max(ytr.max(), yva.max()) + 1)
  k = min(k, tr.shape[0])
  correct = 0
  for s in range(0, va.shape[0], batch):
    sim = va[s:s + batch] @ tr.T
    nn_idx = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    nn_sim = np.take_along_axis(sim, nn_idx, axis=1)
    votes = np.zeros((sim.shape[0], c))
    np.add.at(votes, (np.arange(sim.shape[0])[:, None], ytr[nn_idx]),
              np.exp(nn_sim / temperature))
    correct += int(np.sum(votes.argmax(1) == yva[s:s + batch]))
  return correct / va.shape[0]
