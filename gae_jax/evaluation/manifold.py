"""PAE's latent-manifold metrics: SSC, LPC, GSQ and eRank, for the latents of any tokenizer.

Source: Yue et al. 2026, "Prior-Aligned Autoencoders" (arXiv 2605.07915), appendix Eqs. 7-14
and Fig. 6(b), as collected in PAE_SPEC.md §4. Where the paper is silent the choice is ours,
marked [I] and exposed as a keyword argument (config `eval.manifold.*`); docs/metrics.md
repeats every formula.

  SSC (Eqs. 7-8, higher is better): per image, the tokens z_i (N = h*w of them) are
    unit-normalised, z^_i = z_i / ||z_i||, the affinity is A_ij = exp(<z^_i, z^_j> / sigma),
    A_ii = 0; normalised spectral clustering (von Luxburg 2007, Ng-Jordan-Weiss form) of A
    into k clusters gives y^; the segmentation projected to the h x w grid gives y;
    SSC = NMI(y, y^) = I(y; y^) / sqrt(H(y) H(y^)), averaged over images.
  LPC (Eqs. 9-10, lower is better): LPC_eps = E_{x,u}[(d(D(z + eps u), D(z)) +
    d(D(z - eps u), D(z))) / 2], z = E(x), u uniform on the unit sphere of the whole latent
    (C*H*W dims), eps_s = rho_s ||z||_2 per image, d = LPIPS-VGG;
    LPC = sum_s w_s LPC_{eps_s}, w_s = rho_s^-1 / sum_r rho_r^-1.
  GSQ (Eqs. 11-14, higher is better): f_i = the mean of Z_i over H x W; f~_i = (f_i - f_bar) /
    ||f_i - f_bar|| (f_bar the set mean); j*(i) = argmax_{j != i} <f~_i, f~_j>;
    GSQ = mean_i 1[y_{j*(i)} = y_i], reported as mean +- std over draws of class subsets.
  eRank (Roy & Vetterli 2007; PAE Fig. 6(b)): erank(F) = exp(-sum_i p_i log p_i),
    p_i = s_i / sum_j s_j over the singular values s of the pooled features F (N, C);
    the paper reports erank / C.
"""

import io
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Defaults for what the paper does not give ([I], PAE_SPEC.md §4 and §8).
SSC_SIGMA = 0.1            # [I] affinity temperature on cosine similarities
LPC_RHOS = (0.1, 0.5, 1.0, 2.0)    # [N] relative perturbation radii rho_s
GSQ_CLASSES = 100          # [N] classes per draw
GSQ_DRAWS = 5              # [N] draws
SEGMENTATIONS = ("slic", "felzenszwalb", "labels")

Decoder = Callable[[jax.Array], jax.Array]
Distance = Callable[[jax.Array, jax.Array], jax.Array]


def _latents(z, name: str = "latents") -> np.ndarray:
  z = np.asarray(z, np.float64)
  if z.ndim != 4:
    raise ValueError(f"{name} must be (B, h, w, d), got shape {z.shape}")
  return z


# ------------------------------------------------------------------------------------------
# SSC: spatial structure coherence.


def project_labels(segmentation, grid: tuple[int, int]) -> np.ndarray:
  """(H, W) integer label map -> (h, w) labels on the latent grid, by majority vote per cell.

  Pixel (r, c) falls in cell (r * h // H, c * w // W); ties go to the smaller label. [I] the
  paper says only "projected down to the latent grid". Raises ValueError for a map that is
  not 2-D or smaller than the grid.
  """
  seg = np.asarray(segmentation)
  if seg.ndim != 2 or seg.shape[0] < grid[0] or seg.shape[1] < grid[1]:
    raise ValueError(f"segmentation must be a 2-D label map at least {grid}, got {seg.shape}")
  values, codes = np.unique(seg, return_inverse=True)
  codes = codes.reshape(seg.shape)
  hh, ww = seg.shape
  h, w = grid
  cell = ((np.arange(hh) * h // hh)[:, None] * w + (np.arange(ww) * w // ww)[None, :])
  counts = np.zeros((h * w, len(values)), np.int64)
  np.add.at(counts, (cell.ravel(), codes.ravel()), 1)
  return values[counts.argmax(axis=1)].reshape(h, w)


def token_affinity(tokens, sigma: float = SSC_SIGMA) -> np.ndarray:
  """A_ij = exp(<z^_i, z^_j> / sigma), A_ii = 0, z^ = z / ||z|| (Eq. 7). tokens: (N, d).

  Computed as exp((cos - 1) / sigma), i.e. A divided by the constant e^(1/sigma): normalised
  spectral clustering is invariant to scaling A, and this cannot overflow for small sigma.
  """
  t = np.asarray(tokens, np.float64)
  if t.ndim != 2:
    raise ValueError(f"tokens must be (N, d), got shape {t.shape}")
  if not sigma > 0:
    raise ValueError(f"SSC sigma must be > 0, got {sigma}")
  u = t / np.maximum(np.linalg.norm(t, axis=-1, keepdims=True), 1e-12)
  a = np.exp((np.clip(u @ u.T, -1.0, 1.0) - 1.0) / sigma)
  np.fill_diagonal(a, 0.0)
  return a


def spectral_clustering(affinity, num_clusters: int, *, seed: int = 0, n_init: int = 10
                        ) -> np.ndarray:
  """Normalised spectral clustering (von Luxburg 2007, Alg. 3 / Ng, Jordan & Weiss 2002).

  affinity: (N, N) symmetric, non-negative. The k eigenvectors of the smallest eigenvalues
  of L_sym = I - D^-1/2 A D^-1/2 (the largest of D^-1/2 A D^-1/2) form U (N, k); its rows
  are unit-normalised and clustered by k-means (scikit-learn, `n_init` restarts, seeded).
  Returns (N,) int labels in [0, k). Raises ValueError for a bad shape or k.
  """
  from sklearn.cluster import KMeans  # pylint: disable=g-import-not-at-top
  a = np.asarray(affinity, np.float64)
  n = a.shape[0]
  if a.ndim != 2 or a.shape != (n, n):
    raise ValueError(f"affinity must be square (N, N), got shape {a.shape}")
  if not 1 <= num_clusters <= n:
    raise ValueError(f"num_clusters={num_clusters} must be in [1, {n}]")
  inv_sqrt = 1.0 / np.sqrt(np.maximum(a.sum(axis=1), 1e-300))
  m = a * inv_sqrt[:, None] * inv_sqrt[None, :]
  _, vecs = np.linalg.eigh((m + m.T) / 2.0)      # ascending eigenvalues
  u = vecs[:, ::-1][:, :num_clusters]
  u = u / np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-12)
  km = KMeans(n_clusters=num_clusters, n_init=n_init, random_state=seed)
  return km.fit_predict(u).astype(np.int64)


def nmi(labels_true, labels_pred) -> float:
  """NMI with the geometric-mean normalisation, I(y; y^) / sqrt(H(y) H(y^)) (Eq. 8)."""
  from sklearn.metrics import normalized_mutual_info_score  # pylint: disable=g-import-not-at-top
  return float(normalized_mutual_info_score(np.ravel(labels_true), np.ravel(labels_pred),
                                            average_method="geometric"))


def ssc(latents, segmentations, *, sigma: float = SSC_SIGMA, num_clusters: int = 0,
        min_segments: int = 2, seed: int = 0) -> dict[str, Any]:
  """Spatial Structure Coherence (PAE Eqs. 7-8); higher is better, in [0, 1].

  latents: (B, h, w, d); segmentations: (B, H, W) integer label maps (any H, W >= h, w).
  sigma: affinity temperature ([I] default 0.1). num_clusters: k; 0 = the number of distinct
  labels of the image's projected segmentation ([I]). Images whose projected segmentation has
  fewer than `min_segments` labels are skipped (H(y) = 0 makes NMI undefined).
  Returns {"ssc": mean NMI, "ssc_std", "num_images" (scored), "num_skipped", "per_image"}.
  """
  z = _latents(latents)
  segs = np.asarray(segmentations)
  if segs.ndim != 3 or segs.shape[0] != z.shape[0]:
    raise ValueError(f"segmentations must be (B, H, W) with B = {z.shape[0]}, got {segs.shape}")
  from threadpoolctl import threadpool_limits  # pylint: disable=g-import-not-at-top
  b, h, w, d = z.shape
  scores = []
  # One BLAS / OpenMP thread: the (h*w)^2 problems are tiny, and threaded eigh / k-means on
  # them is slower, ~100x on a loaded 2-core host (measured 4 s vs 0.05 s an image at 16x16).
  with threadpool_limits(limits=1):
    for i in range(b):
      y = project_labels(segs[i], (h, w)).ravel()
      k_true = len(np.unique(y))
      if k_true < min_segments:
        continue
      k = int(num_clusters) if num_clusters > 0 else k_true
      pred = spectral_clustering(token_affinity(z[i].reshape(h * w, d), sigma),
                                 min(k, h * w), seed=seed)
      scores.append(nmi(y, pred))
  if not scores:
    raise ValueError(f"SSC: no image has >= {min_segments} segments on the {h}x{w} grid")
  s = np.asarray(scores)
  return {"ssc": float(s.mean()), "ssc_std": float(s.std()), "num_images": len(scores),
          "num_skipped": b - len(scores), "per_image": s.tolist()}


def superpixels(images, *, method: str = "slic", num_segments: int = 16,
                compactness: float = 10.0, scale: float = 100.0, fz_sigma: float = 0.8,
                min_size: int = 50) -> np.ndarray:
  """Offline segmentations for SSC when no label maps are given: (B, H, W) int64.

  images: (B, H, W, 3) float in [-1, 1]. method "slic" (scikit-image SLIC, `num_segments`
  superpixels of `compactness`) or "felzenszwalb" (scikit-image, `scale`, `fz_sigma`,
  `min_size`). [I] the paper uses COCO panoptic labels; superpixels follow colour edges and
  are a stand-in for object-aware segments, so SSC numbers from them are comparable only
  with each other.
  """
  from skimage import segmentation as seg_lib  # pylint: disable=g-import-not-at-top
  x = np.asarray(images, np.float64)
  if x.ndim != 4 or x.shape[-1] != 3:
    raise ValueError(f"images must be (B, H, W, 3), got shape {x.shape}")
  x = np.clip((x + 1.0) / 2.0, 0.0, 1.0)
  out = []
  for img in x:
    if method == "slic":
      out.append(seg_lib.slic(img, n_segments=num_segments, compactness=compactness,
                              start_label=0, channel_axis=-1))
    elif method == "felzenszwalb":
      out.append(seg_lib.felzenszwalb(img, scale=scale, sigma=fz_sigma, min_size=min_size,
                                      channel_axis=-1))
    else:
      raise ValueError(f"superpixel method={method!r}: expected 'slic' or 'felzenszwalb'")
  return np.stack(out).astype(np.int64)


def read_label_map(path: str) -> np.ndarray:
  """A PNG label map -> (H, W) int64. RGB maps use COCO panoptic's id = R + 256 G + 256^2 B."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from gae_jax import paths  # pylint: disable=g-import-not-at-top
  img = Image.open(io.BytesIO(paths.path(path).read_bytes()))
  a = np.asarray(img).astype(np.int64)
  if a.ndim == 3:
    if a.shape[-1] < 3:
      a = a[..., 0]
    else:
      a = a[..., 0] + 256 * a[..., 1] + 65536 * a[..., 2]
  return a


def load_labelled_images(images_dir: str, labels_dir: str, image_size: int,
                         num_images: int = -1) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """Images of `images_dir` paired with the PNG label maps of `labels_dir` by file stem.

  Both are resized (short side to image_size; bicubic for images, nearest for labels) and
  center-cropped identically. Returns (images (B, S, S, 3) float32 in [-1, 1], label maps
  (B, S, S) int64, stems). Raises ValueError when no image has a label map.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from gae_jax import paths  # pylint: disable=g-import-not-at-top
  from gae_jax.data import transforms  # pylint: disable=g-import-not-at-top
  labels = {p.stem: p for p in paths.path(labels_dir).iterdir() if p.suffix.lower() == ".png"}
  imgs = sorted(p for p in paths.path(images_dir).iterdir() if p.stem in labels)
  if not imgs:
    raise ValueError(f"eval.manifold.ssc_labels={labels_dir!r}: no PNG label map shares a "
                     f"file name with an image of ssc_images={images_dir!r}")
  if num_images > 0:
    imgs = imgs[:num_images]

  def fit(im, resample):
    w, h = im.size
    s = image_size / min(w, h)
    im = im.resize((max(image_size, round(w * s)), max(image_size, round(h * s))), resample)
    w, h = im.size
    left, top = (w - image_size) // 2, (h - image_size) // 2
    return np.asarray(im.crop((left, top, left + image_size, top + image_size)))

  xs, ys = [], []
  for p in imgs:
    im = transforms.decode_image(p.read_bytes(), str(p))
    xs.append(fit(im, Image.BICUBIC).astype(np.float32) / 127.5 - 1.0)
    lab = read_label_map(str(labels[p.stem]))
    values, codes = np.unique(lab, return_inverse=True)
    codes = Image.fromarray(codes.reshape(lab.shape).astype(np.int32), mode="I")
    ys.append(values[fit(codes, Image.NEAREST).astype(np.int64)])
  return np.stack(xs), np.stack(ys), [p.stem for p in imgs]


# ------------------------------------------------------------------------------------------
# LPC: local perceptual continuity.


def lpc_weights(rhos: Sequence[float] = LPC_RHOS) -> np.ndarray:
  """w_s = rho_s^-1 / sum_r rho_r^-1 (Eq. 10)."""
  r = np.asarray(rhos, np.float64)
  if r.ndim != 1 or r.size == 0 or np.any(r <= 0):
    raise ValueError(f"LPC rhos must be a non-empty list of positive radii, got {rhos}")
  return (1.0 / r) / np.sum(1.0 / r)


def sphere_directions(seed: int, indices, latent_shape: tuple[int, ...]) -> np.ndarray:
  """u uniform on the unit sphere of R^(h*w*d), one per image: (B, h, w, d) float32.

  Image j's direction is g / ||g||, g ~ N(0, I) from fold_in(key(seed), j) with j the image's
  index in the evaluated set, so LPC does not depend on batch size or device count.
  """
  def one(j):
    g = jax.random.normal(jax.random.fold_in(jax.random.key(seed), j), latent_shape)
    return g / jnp.linalg.norm(g)
  return np.asarray(jax.jit(jax.vmap(one))(jnp.asarray(indices, jnp.int32)))


def lpc_terms(decode: Decoder, distance: Distance, z: jax.Array, u: jax.Array,
              rhos: Sequence[float] = LPC_RHOS, *, clip: bool = True) -> jax.Array:
  """Per image and scale (d(D(z + eps u), D(z)) + d(D(z - eps u), D(z))) / 2: (B, S).

  z, u: (B, h, w, d); eps_s = rhos[s] * ||z_b||_2 (whole latent). [I] z +- eps u is decoded
  as is (no re-normalisation onto the sphere); clip=True clips decoded images to [-1, 1]
  (LPIPS's input range). Jittable.
  """
  norm = jnp.sqrt(jnp.sum(jnp.square(z), axis=(1, 2, 3), keepdims=True))
  dec = (lambda v: jnp.clip(decode(v), -1.0, 1.0)) if clip else decode
  x0 = dec(z)
  cols = []
  for rho in rhos:
    e = float(rho) * norm * u
    cols.append(0.5 * (distance(dec(z + e), x0) + distance(dec(z - e), x0)))
  return jnp.stack(cols, axis=-1)


def lpc_summary(terms, rhos: Sequence[float] = LPC_RHOS) -> dict[str, Any]:
  """(B, S) terms -> {"lpc": sum_s w_s mean_b terms, "per_scale": {rho: mean}, "weights"}."""
  t = np.asarray(terms, np.float64)
  w = lpc_weights(rhos)
  if t.ndim != 2 or t.shape[1] != len(w):
    raise ValueError(f"LPC terms must be (B, {len(w)}), got shape {t.shape}")
  means = t.mean(axis=0)
  return {"lpc": float(np.dot(w, means)),
          "per_scale": {str(float(r)): float(m) for r, m in zip(rhos, means)},
          "weights": [float(v) for v in w], "num_images": int(t.shape[0])}


def lpc(decode: Decoder, distance: Distance, latents, *, rhos: Sequence[float] = LPC_RHOS,
        seed: int = 0, batch_size: int = 16, clip: bool = True) -> dict[str, Any]:
  """Local Perceptual Continuity (PAE Eqs. 9-10) on one device; lower is better.

  decode: z (b, h, w, d) -> images (b, H, W, 3) in [-1, 1]; distance: two image batches ->
  (b,) (LPIPS-VGG in the paper; `models.vgg.LPIPS`). latents: (B, h, w, d). Returns
  `lpc_summary`'s dict. The eval stage runs the same `lpc_terms` sharded over devices.
  """
  z = _latents(latents).astype(np.float32)
  u = sphere_directions(seed, np.arange(z.shape[0]), z.shape[1:])
  fn = jax.jit(lambda a, b: lpc_terms(decode, distance, a, b, rhos, clip=clip))
  terms = [np.asarray(fn(z[s:s + batch_size], u[s:s + batch_size]))
           for s in range(0, z.shape[0], batch_size)]
  return lpc_summary(np.concatenate(terms), rhos)


# ------------------------------------------------------------------------------------------
# GSQ: global semantic quality; eRank.


def pooled(latents) -> np.ndarray:
  """GAP over the token grid: (B, h, w, d) -> (B, d); (B, d) passes through."""
  f = np.asarray(latents, np.float64)
  if f.ndim == 4:
    return f.mean(axis=(1, 2))
  if f.ndim != 2:
    raise ValueError(f"latents must be (B, h, w, d) or pooled (B, d), got shape {f.shape}")
  return f


def gsq(latents, labels) -> float:
  """1-NN label purity of centred, unit-normalised pooled latents (PAE Eqs. 11-14), in [0, 1].

  latents: (B, h, w, d) or pooled (B, d); labels: (B,) ints. Raises ValueError for B < 2.
  """
  f = pooled(latents)
  y = np.asarray(labels).ravel()
  if f.shape[0] != y.shape[0] or f.shape[0] < 2:
    raise ValueError(f"GSQ needs >= 2 latents with one label each, got {f.shape[0]} latents "
                     f"and {y.shape[0]} labels")
  f = f - f.mean(axis=0)
  f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
  sim = f @ f.T
  np.fill_diagonal(sim, -np.inf)
  return float(np.mean(y[sim.argmax(axis=1)] == y))


def gsq_draws(latents, labels, *, num_classes: int = GSQ_CLASSES, draws: int = GSQ_DRAWS,
              seed: int = 0) -> dict[str, Any]:
  """GSQ on `draws` random subsets of `num_classes` classes: {"gsq": mean, "gsq_std", ...}.

  The centring mean is the subset's own (Eq. 12). With <= num_classes classes present every
  draw is the whole set (std 0), reported as classes_per_draw.
  """
  f = pooled(latents)
  y = np.asarray(labels).ravel()
  classes = np.unique(y)
  k = min(int(num_classes), len(classes))
  rng = np.random.default_rng(seed)
  vals = []
  for _ in range(max(int(draws), 1) if k < len(classes) else 1):
    keep = np.isin(y, rng.choice(classes, size=k, replace=False))
    vals.append(gsq(f[keep], y[keep]))
  v = np.asarray(vals)
  return {"gsq": float(v.mean()), "gsq_std": float(v.std()), "draws": v.tolist(),
          "classes_per_draw": k, "num_points": int(f.shape[0])}


def erank(features, *, center: bool = False) -> float:
  """Effective rank (Roy & Vetterli 2007): exp(-sum p_i log p_i), p = s / sum(s).

  features: (N, C), or latents (B, h, w, d) which are GAP-pooled first (PAE Fig. 6(b)).
  center=True subtracts the mean row first ([I]; the paper's F is not said to be centred).
  In [1, min(N, C)]; a zero matrix raises ValueError.
  """
  f = pooled(features)
  if center:
    f = f - f.mean(axis=0)
  s = np.linalg.svd(f, compute_uv=False)
  if not s.sum() > 0:
    raise ValueError("eRank of a zero matrix is undefined")
  p = s / s.sum()
  p = p[p > 0]
  return float(np.exp(-np.sum(p * np.log(p))))


# ------------------------------------------------------------------------------------------
# The eval stage's `manifold` kind (trainers/evaluate.py), for any tokenizer handle.


def tokenizer_fns(handle):
  """Pure (params, images) -> z and (params, z) -> images functions of a tokenizer handle.

  Takes the one tokenizer interface (`.encode_fn`, `.decode_fn`, `.params`, `.image_size`,
  `.latent_shape`; GAE, PAE or KL alike) and falls back to a GAE handle's model.
  """
  # pylint: disable-next=g-import-not-at-top
  from gae_jax.evaluation import reconstruction_eval as rec_lib
  if hasattr(handle, "encode_fn") and hasattr(handle, "decode_fn"):
    return rec_lib.GAEFns(handle.encode_fn, handle.decode_fn, handle.params,
                          int(handle.image_size), tuple(int(v) for v in handle.latent_shape))
  return rec_lib.gae_fns(handle)


def evaluate_manifold(fns, latents, labels, cfg, *, ssc_images=None, ssc_segmentations=None,
                      mesh=None, batch_size: int = 64, seed: int = 0,
                      lpips_params=None) -> dict[str, Any]:
  """SSC, LPC, GSQ and eRank of one tokenizer, as the eval stage reports them.

  fns: `tokenizer_fns(handle)`. latents (B, h, w, d) and labels (B,): the validation set
  (GSQ, eRank; LPC on its first cfg.lpc_images). ssc_images: (S, H, W, 3) in [-1, 1],
  encoded here for SSC; ssc_segmentations: their (S, H, W) label maps, or None for
  cfg.segmentation's superpixels. lpips_params None (or cfg.lpc_images = 0) skips LPC.
  cfg: `eval.manifold` (configs_lib.eval_config). Device work is sharded over `mesh`.
  """
  from gae_jax.evaluation import features as features_lib  # pylint: disable=g-import-not-at-top
  from gae_jax.models import vgg as vgg_lib  # pylint: disable=g-import-not-at-top
  mesh = mesh if mesh is not None else features_lib.eval_mesh()
  z = np.asarray(latents, np.float32)
  out: dict[str, Any] = {"num_images": int(z.shape[0])}
  if ssc_images is not None and len(ssc_images):
    if cfg.segmentation not in SEGMENTATIONS:
      raise ValueError(f"eval.manifold.segmentation={cfg.segmentation!r}: expected one of "
                       f"{SEGMENTATIONS}")
    z_ssc = features_lib.replicated_apply(fns.encode, fns.params, np.asarray(ssc_images),
                                          mesh=mesh, batch_size=batch_size)
    if ssc_segmentations is None:
      if cfg.segmentation == "labels":
        raise ValueError("eval.manifold.segmentation='labels' needs label maps "
                         "(eval.manifold.label_images and .label_maps)")
      segs = superpixels(ssc_images, method=cfg.segmentation, num_segments=cfg.slic_segments,
                         compactness=cfg.slic_compactness, scale=cfg.fz_scale,
                         fz_sigma=cfg.fz_sigma, min_size=cfg.fz_min_size)
      how = (f"superpixels: scikit-image slic(n_segments={cfg.slic_segments}, compactness="
             f"{cfg.slic_compactness})" if cfg.segmentation == "slic" else
             f"superpixels: scikit-image felzenszwalb(scale={cfg.fz_scale}, sigma="
             f"{cfg.fz_sigma}, min_size={cfg.fz_min_size})")
    else:
      segs, how = ssc_segmentations, f"label maps: {cfg.label_maps}"
    r = ssc(z_ssc, segs, sigma=cfg.ssc_sigma, num_clusters=cfg.ssc_clusters, seed=seed)
    h, w = z_ssc.shape[1:3]
    segments = [len(np.unique(project_labels(s, (h, w)))) for s in segs]
    out.update(ssc=r["ssc"], ssc_std=r["ssc_std"], ssc_num_images=r["num_images"],
               ssc_skipped=r["num_skipped"], ssc_segmentation=how,
               ssc_mean_segments=float(np.mean(segments)))
  if lpips_params is not None and cfg.lpc_images:
    zl = z[:cfg.lpc_images] if cfg.lpc_images > 0 else z
    u = sphere_directions(seed, np.arange(zl.shape[0]), zl.shape[1:])
    lpips = vgg_lib.LPIPS()
    rhos = tuple(float(r) for r in cfg.lpc_rhos)

    def terms(params, zu):
      return lpc_terms(lambda v: fns.decode(params[0], v),
                       lambda a, b: lpips.apply(params[1], a, b), zu[:, 0], zu[:, 1], rhos)

    t = features_lib.replicated_apply(terms, (fns.params, lpips_params), np.stack([zl, u], 1),
                                      mesh=mesh, batch_size=batch_size)
    s = lpc_summary(t, rhos)
    out.update(lpc=s["lpc"], lpc_per_scale=s["per_scale"], lpc_weights=s["weights"],
               lpc_num_images=s["num_images"])
  g = gsq_draws(z, labels, num_classes=cfg.gsq_classes, draws=cfg.gsq_draws, seed=seed)
  out.update(gsq=g["gsq"], gsq_std=g["gsq_std"], gsq_classes_per_draw=g["classes_per_draw"],
             gsq_draws=g["draws"])
  e = erank(z, center=cfg.erank_center)
  out.update(erank=e, erank_ratio=e / z.shape[-1])
  return out
