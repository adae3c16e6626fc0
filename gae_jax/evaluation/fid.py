"""Sample-quality metrics over feature arrays: Fréchet distance, IS, precision / recall.

Pure metric code: the Inception features (pool_3, 2048-d) and logits come from elsewhere.
The numbers follow ADM's evaluator (guided-diffusion `evaluations/evaluator.py`), which is
what the paper and its baselines report:

- FID: mu = mean, sigma = unbiased covariance (`np.cov(rowvar=False)`) of the features;
  ||mu1 - mu2||^2 + tr(s1) + tr(s2) - 2 tr sqrt(s1 s2). The matrix square root is not
  taken with `scipy.linalg.sqrtm` (complex residue, NaNs on singular products) but from
  eigenvalues: tr sqrt(s1 s2) = sum_i sqrt(lambda_i(A s2 A)), A = s1^(1/2) (eigh), which is
  the same quantity in exact arithmetic, real and finite for any PSD pair.
- IS: softmax probabilities p(y|x); per split exp(mean_x KL(p(y|x) || p(y))); mean and std
  over splits (ADM reports the mean with 10 splits of 5000 for 50k samples).
- Precision / recall: Kynkäänniemi et al. 2019 as in ADM's `ManifoldEstimator` (k = 3):
  each point's radius is its squared distance to its k-th nearest neighbour in its own set
  (the (k+1)-th smallest distance counting itself at 0); a point is inside the other set's
  manifold if its squared distance to some point of that set is <= that point's radius.
  precision = fraction of fakes inside the real manifold, recall = reals inside the fake
  manifold. Distances are computed in float32 blocks with JAX (bounded memory for 50k x
  50k); ADM computes them in float16 with a float32 fallback, so its values can differ
  from ours in the last digit.
"""

import collections
from collections.abc import Sequence
import functools
import hashlib
import math
import threading
import warnings

import jax
import jax.numpy as jnp
import numpy as np

# A covariance whose condition number exceeds this is reported as near-singular.
COND_WARN = 1e12


def _as_features(feats, name: str = "feats") -> np.ndarray:
  """Features as a float64 [N, D] array (leading dims kept, trailing flattened like ADM)."""
  x = np.asarray(feats)
  if x.ndim < 2:
    raise ValueError(f"{name} must be [N, D] features, got shape {x.shape}")
  x = x.reshape(x.shape[0], -1).astype(np.float64, copy=False)
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{name} contains non-finite values (shape {x.shape})")
  return x


def _warn_if_few_samples(n: int, dim: int, what: str):
  if n <= dim:
    warnings.warn(
        f"{what}: {n} samples for {dim} dims, the covariance is rank-deficient "
        f"(rank <= {n - 1}); the Fréchet distance is biased and not comparable.",
        stacklevel=3)


_EIGH_CACHE: "collections.OrderedDict[bytes, tuple[np.ndarray, np.ndarray]]" = (
    collections.OrderedDict())
_EIGH_CACHE_SIZE = 4
_EIGH_LOCK = threading.Lock()


def _sym_eigh(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """np.linalg.eigh of a symmetric float64 matrix, memoised on its bytes.

  An evaluation compares many sets with one reference (a robustness curve, sFID + FID,
  several checkpoints): its 2048 x 2048 decomposition - seconds on a CPU - is done once.
  """
  key = hashlib.blake2b(s.tobytes(), digest_size=16).digest() + repr(s.shape).encode()
  with _EIGH_LOCK:
    hit = _EIGH_CACHE.get(key)
    if hit is not None:
      _EIGH_CACHE.move_to_end(key)
      return hit
  hit = np.linalg.eigh(s)
  with _EIGH_LOCK:
    _EIGH_CACHE[key] = hit
    while len(_EIGH_CACHE) > _EIGH_CACHE_SIZE:
      _EIGH_CACHE.popitem(last=False)
  return hit


def _check_cov(sigma: np.ndarray, evals: np.ndarray, name: str):
  """Warns when a covariance is (near-)singular: min eigenvalue <= 0 or cond > COND_WARN."""
  top = float(evals.max())
  low = float(evals.min())
  if top <= 0.0:
    warnings.warn(f"{name} is zero (all eigenvalues <= 0)", stacklevel=3)
    return
  cond = math.inf if low <= 0.0 else top / low
  if cond > COND_WARN:
    warnings.warn(
        f"{name} ({sigma.shape[0]}x{sigma.shape[1]}) is near-singular: condition number "
        f"{cond:.3g} > {COND_WARN:.0e} (min eigenvalue {low:.3g}); too few samples? "
        "The Fréchet distance is still computed (eigenvalues clipped at 0).",
        stacklevel=3)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

  Equals pytorch-fid's / ADM's sqrtm formula on well-conditioned inputs; stays real,
  finite and >= 0 on rank-deficient covariances (with a warning).
  """
  mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
  mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or mu1.ndim != 1:
    raise ValueError(f"mean vectors differ or are not 1-D: mu1 {mu1.shape}, mu2 {mu2.shape}")
  d = mu1.shape[0]
  for name, s in (("sigma1", sigma1), ("sigma2", sigma2)):
    if s.shape != (d, d):
      raise ValueError(f"{name} has shape {s.shape}, expected {(d, d)} to match mu1 {mu1.shape}")
  for name, a in (("mu1", mu1), ("mu2", mu2), ("sigma1", sigma1), ("sigma2", sigma2)):
    if not np.all(np.isfinite(a)):
      raise ValueError(f"{name} contains non-finite values")

  # Symmetrise (stats files may carry float32 round-off asymmetry).
  s1 = 0.5 * (sigma1 + sigma1.T)
  s2 = 0.5 * (sigma2 + sigma2.T)
  w1, v1 = _sym_eigh(s1)
  w2, _ = _sym_eigh(s2)          # for the conditioning check; memoised like s1's
  _check_cov(sigma1, w1, "sigma1")
  _check_cov(sigma2, w2, "sigma2")
  # A = s1^(1/2); eig(A s2 A) = eig(s1 s2) (similar / same non-zero spectrum).
  root1 = (v1 * np.sqrt(np.clip(w1, 0.0, None))) @ v1.T
  m = root1 @ s2 @ root1
  m = 0.5 * (m + m.T)
  tr_covmean = float(np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(m), 0.0, None))))

  diff = mu1 - mu2
  fd = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
  # FD is a squared (Bures-Wasserstein) distance: >= 0; a negative value is round-off
  # (order 1e-12 of the traces) from the clipped eigenvalues.
  return max(fd, 0.0)


def stats_from_features(feats) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) of [N, D] features in float64; sigma unbiased (np.cov, as pytorch-fid / ADM)."""
  x = _as_features(feats)
  n, d = x.shape
  if n < 2:
    raise ValueError(f"need >= 2 samples for a covariance, got feats of shape {x.shape}")
  _warn_if_few_samples(n, d, "stats_from_features")
  return x.mean(axis=0), np.cov(x, rowvar=False)


class ActivationStats:
  """Streaming, mergeable float64 mean / covariance of features.

  Keeps (count, mean, M2 = sum of outer products of deviations from the mean) and combines
  parts with Chan et al.'s pairwise update: unlike raw sums of x x^T it loses no digits
  when |mean| >> std, and the result does not depend (beyond float64 round-off) on the
  batch size, the order of batches or how they were split over devices / hosts. For a
  multi-host run, gather every process's `state_dict()` and `merge` them (or gather the
  features and `update`).
  """

  def __init__(self, dim: int | None = None):
    self.dim = dim
    self.count = 0
    self._mean = None if dim is None else np.zeros((dim,), np.float64)
    self._m2 = None if dim is None else np.zeros((dim, dim), np.float64)

  def _init(self, dim: int):
    self.dim = dim
    self._mean = np.zeros((dim,), np.float64)
    self._m2 = np.zeros((dim, dim), np.float64)

  def update(self, feats) -> "ActivationStats":
    """Adds a batch of features [B, D] (trailing dims are flattened). Returns self."""
    x = _as_features(feats)
    if self._mean is None:
      self._init(x.shape[1])
    if x.shape[1] != self.dim:
      raise ValueError(f"feature dim mismatch: batch {x.shape} vs accumulated dim {self.dim}")
    nb = x.shape[0]
    if nb == 0:
      return self
    mb = x.mean(axis=0)
    xc = x - mb
    self._combine(nb, mb, xc.T @ xc)
    return self

  def _combine(self, nb: int, mb: np.ndarray, m2b: np.ndarray):
    na = self.count
    n = na + nb
    delta = mb - self._mean
    self._mean = self._mean + delta * (nb / n)
    self._m2 = self._m2 + m2b + np.outer(delta, delta) * (na * nb / n)
    self.count = n

  def merge(self, other: "ActivationStats") -> "ActivationStats":
    """Returns a new accumulator holding the samples of both (neither input changes)."""
    out = ActivationStats.from_state_dict(self.state_dict())
    if other.count == 0:
      return out
    if out._mean is None:
      out._init(other.dim)
    if other.dim != out.dim:
      raise ValueError(f"cannot merge stats of dim {out.dim} with dim {other.dim}")
    out._combine(other.count, other._mean, other._m2)
    return out

  @staticmethod
  def combine(parts: Sequence["ActivationStats"]) -> "ActivationStats":
    """Merges a sequence of accumulators (e.g. one per shard or host)."""
    return functools.reduce(ActivationStats.merge, parts, ActivationStats())

  @property
  def mean(self) -> np.ndarray:
    if self.count == 0:
      raise ValueError("ActivationStats is empty")
    return self._mean.copy()

  @property
  def cov(self) -> np.ndarray:
    """Unbiased covariance (divides by count - 1, like np.cov)."""
    if self.count < 2:
      raise ValueError(f"need >= 2 samples for a covariance, have {self.count}")
    return self._m2 / (self.count - 1)

  def finalize(self) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma), warning when there are no more samples than dims."""
    sigma = self.cov
    _warn_if_few_samples(self.count, self.dim, "ActivationStats")
    return self.mean, sigma

  def state_dict(self) -> dict:
    return {"count": np.asarray(self.count, np.int64),
            "mean": None if self._mean is None else self._mean.copy(),
            "m2": None if self._m2 is None else self._m2.copy()}

  @classmethod
  def from_state_dict(cls, state: dict) -> "ActivationStats":
    out = cls()
    if state.get("mean") is not None:
      mean = np.asarray(state["mean"], np.float64)
      m2 = np.asarray(state["m2"], np.float64)
      if m2.shape != (mean.shape[0],) * 2:
        raise ValueError(f"state m2 {m2.shape} does not match mean {mean.shape}")
      out._init(mean.shape[0])
      out._mean, out._m2 = mean.copy(), m2.copy()
      out.count = int(state["count"])
    return out


# ------------------------------------------------------------------------ Inception Score


def _looks_like_probs(x: np.ndarray) -> bool:
  return bool(np.all(x >= 0) and np.all(x <= 1) and np.allclose(x.sum(axis=1), 1.0, atol=1e-3))


def inception_score(logits_or_probs, splits: int = 10, *, from_logits: bool | None = None,
                    split_size: int | None = None) -> tuple[float, float]:
  """Inception Score (mean, std over splits) from classifier logits or softmax probs [N, C].

  from_logits=None guesses: rows in [0, 1] summing to 1 are probabilities, else logits.
  The N samples are cut into `splits` contiguous near-equal parts (np.array_split); pass
  `split_size` to cut as ADM does (`range(0, N, split_size)`, ADM uses 5000). Computed in
  float64 with 0 log 0 = 0 (ADM's float32 np.log gives NaN when a probability underflows).
  """
  x = np.asarray(logits_or_probs, np.float64)
  if x.ndim != 2 or x.shape[0] < 1:
    raise ValueError(f"inception_score expects [N, C] logits or probs, got shape {x.shape}")
  if not np.all(np.isfinite(x)):
    raise ValueError("inception_score input contains non-finite values")
  if from_logits is None:
    from_logits = not _looks_like_probs(x)
  if from_logits:
    z = x - x.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    p = np.exp(logp)
  else:
    if not _looks_like_probs(x):
      raise ValueError("from_logits=False but the rows are not probability vectors")
    p = x / x.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore"):
      logp = np.log(p)
  n = x.shape[0]
  if split_size is not None:
    if split_size < 1:
      raise ValueError(f"split_size must be >= 1, got {split_size}")
    parts = [np.arange(i, min(i + split_size, n)) for i in range(0, n, split_size)]
  else:
    if not 1 <= splits <= n:
      raise ValueError(f"splits must be in [1, N={n}], got {splits}")
    parts = np.array_split(np.arange(n), splits)
  scores = []
  for idx in parts:
    pp = p[idx]
    py = pp.mean(axis=0, keepdims=True)
    # Where p(y|x) = 0 the term is 0 (and then p(y) may be 0 too): use finite stand-ins.
    lp = np.where(pp > 0, logp[idx], 0.0)
    log_py = np.log(np.where(py > 0, py, 1.0))
    kl = np.sum(pp * (lp - log_py), axis=1)
    scores.append(np.exp(np.mean(kl)))
  scores = np.asarray(scores)
  return float(np.mean(scores)), float(np.std(scores))


# ---------------------------------------------------------------- precision / recall


def _sq_dists(a: jax.Array, b: jax.Array) -> jax.Array:
  """Squared euclidean distances [A, B] as ADM: max(|a|^2 - 2 a.b + |b|^2, 0)."""
  na = jnp.sum(a * a, axis=1)[:, None]
  nb = jnp.sum(b * b, axis=1)[None, :]
  ab = jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)  # no TF32/bf16 passes
  return jnp.maximum(na - 2.0 * ab + nb, 0.0)


@functools.partial(jax.jit, static_argnames=("k",))
def _radii_rows(rows, col_blocks, col_valid, *, k: int):
  """(k+1)-th smallest squared distance of each row to all (valid) columns, self included."""

  def body(best, inp):
    cols, valid = inp
    d = jnp.where(valid[None, :], _sq_dists(rows, cols), jnp.inf)
    neg, _ = jax.lax.top_k(-jnp.concatenate([best, d], axis=1), k + 1)
    return -neg, None

  best0 = jnp.full((rows.shape[0], k + 1), jnp.inf, rows.dtype)
  best, _ = jax.lax.scan(body, best0, (col_blocks, col_valid))
  return best[:, k]  # ascending: index k is the (k+1)-th smallest


@jax.jit
def _coverage_rows(rows, row_radii, row_valid, col_blocks, col_radii, col_valid):
  """For a row block of set 1 against all of set 2: (rows inside set-2 manifold [R],
  per column block: columns inside the row block's manifold [nb, C])."""

  def body(rows_in, inp):
    cols, radii, valid = inp
    d = _sq_dists(rows, cols)
    rows_in = rows_in | jnp.any((d <= radii[None, :]) & valid[None, :], axis=1)
    cols_in = jnp.any((d <= row_radii[:, None]) & row_valid[:, None], axis=0)
    return rows_in, cols_in

  rows_in0 = jnp.zeros((rows.shape[0],), bool)
  return jax.lax.scan(body, rows_in0, (col_blocks, col_radii, col_valid))


def _blocks(x: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray]:
  """Pads [N, D] to a multiple of `batch` -> ([nb, batch, D], valid [nb, batch])."""
  n = x.shape[0]
  nb = -(-n // batch)
  xp = np.zeros((nb * batch, x.shape[1]), np.float32)
  xp[:n] = x
  valid = np.arange(nb * batch) < n
  return xp.reshape(nb, batch, -1), valid.reshape(nb, batch)


def _check_pr_inputs(feats, name: str, k: int) -> np.ndarray:
  x = np.asarray(feats)
  if x.ndim != 2:
    raise ValueError(f"{name} must be [N, D] features, got shape {x.shape}")
  if x.shape[0] <= k:
    raise ValueError(f"{name} has {x.shape[0]} samples; need more than k={k}")
  x = x.astype(np.float32)
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{name} contains non-finite values")
  return x


def manifold_radii(feats, *, k: int = 3, batch: int = 10000) -> np.ndarray:
  """Squared distance of each point to its k-th nearest neighbour in `feats` ([N] float32).

  Counts the point itself at distance 0 (ADM: the (k+1)-th smallest distance), so exact
  duplicates count as neighbours. Memory: O(batch^2) per block.
  """
  x = _check_pr_inputs(feats, "feats", k)
  blocks, valid = _blocks(x, min(batch, x.shape[0]))
  jb, jv = jnp.asarray(blocks), jnp.asarray(valid)
  radii = [_radii_rows(jb[i], jb, jv, k=k) for i in range(blocks.shape[0])]
  return np.asarray(jnp.concatenate(radii))[: x.shape[0]]


def precision_recall(real_feats, fake_feats, *, k: int = 3,
                     batch: int = 10000) -> tuple[float, float]:
  """(precision, recall) of fake vs real features as ADM's evaluator (k-NN manifolds).

  `batch` bounds the pairwise-distance blocks (batch x batch float32 at a time; 10000 as
  ADM); the result does not depend on it.
  """
  real = _check_pr_inputs(real_feats, "real_feats", k)
  fake = _check_pr_inputs(fake_feats, "fake_feats", k)
  if real.shape[1] != fake.shape[1]:
    raise ValueError(f"feature dims differ: real_feats {real.shape}, fake_feats {fake.shape}")
  batch = max(1, min(batch, max(real.shape[0], fake.shape[0])))
  r_blocks, r_valid = _blocks(real, batch)
  f_blocks, f_valid = _blocks(fake, batch)
  jr, jrv = jnp.asarray(r_blocks), jnp.asarray(r_valid)
  jf, jfv = jnp.asarray(f_blocks), jnp.asarray(f_valid)
  r_radii = jnp.stack([_radii_rows(jr[i], jr, jrv, k=k) for i in range(jr.shape[0])])
  f_radii = jnp.stack([_radii_rows(jf[i], jf, jfv, k=k) for i in range(jf.shape[0])])

  real_in = []
  fake_in = jnp.zeros(jfv.shape, bool)
  for i in range(jr.shape[0]):
    rows_in, cols_in = _coverage_rows(jr[i], r_radii[i], jrv[i], jf, f_radii, jfv)
    real_in.append(rows_in)
    fake_in = fake_in | cols_in
  real_in = np.asarray(jnp.concatenate(real_in))[: real.shape[0]]
  fake_in = np.asarray(fake_in).reshape(-1)[: fake.shape[0]]
  return float(fake_in.mean()), float(real_in.mean())
