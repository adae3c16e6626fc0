"""Reconstruction evaluation: rFID, PSNR, SSIM, LPIPS and the decoder-robustness curve.

Protocol (docs/metrics.md, "Reconstruction"): the center-cropped validation images x are encoded
to mu = E(x) (no sigma-noise; any tokenizer's deterministic encode); for each noise scale s
the decoder sees z_s = mu + s * eps, eps ~ N(0, I) (paper Fig. 4; s = 0 is the plain
reconstruction); x_hat_s = D(z_s) is clipped to [-1, 1] and quantised to uint8 levels. Then

  rFID(s)  = FD(Inception(x_hat_s), Inception(x)) - against the same center-cropped set,
             not ADM's VIRTUAL batch;
  PSNR(s), SSIM(s), LPIPS(s) = means over images of the per-image values vs x.

eps of image j is drawn from fold_in(fold_in(key(seed), scale index), j) with j the
image's index in the split, so the curve does not depend on batch size or device count.
Everything (tokenizer, LPIPS, Inception for all scales) runs in one jit sharded over the batch.
"""

import dataclasses
import functools
from typing import Any, Callable, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from gae_jax import sharding as sharding_lib
from gae_jax.evaluation import features as features_lib
from gae_jax.evaluation import fid as fid_lib
from gae_jax.evaluation import reconstruction as rec_lib
from gae_jax.models import inception as inception_lib
from gae_jax.models import vgg as vgg_lib

ROBUSTNESS_SCALES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)


@dataclasses.dataclass
class TokenizerFns:
  """Pure tokenizer functions + params for use inside evaluation jits (any family)."""
  encode: Callable[[Any, jax.Array], jax.Array]   # (params, images [-1, 1]) -> z
  decode: Callable[[Any, jax.Array], jax.Array]   # (params, z) -> images (unclipped)
  params: Any
  image_size: int
  latent_shape: tuple[int, int, int]


def tokenizer_fns(handle) -> TokenizerFns:
  """From a tokenizer handle (`tokenizers.base.Tokenizer`: GAE, PAE or KL alike)."""
  return TokenizerFns(handle.encode_fn, handle.decode_fn, handle.params,
                      int(handle.image_size), tuple(int(v) for v in handle.latent_shape))


# The names before the tokenizer interface (callers in tests and evaluation/manifold.py).
GAEFns = TokenizerFns
gae_fns = tokenizer_fns


def perturbation(seed: int, scale_index: int, index: jax.Array, shape) -> jax.Array:
  """eps (B, *shape) ~ N(0, I), image j's from fold_in(fold_in(key(seed), scale_index), j)."""
  key = jax.random.fold_in(jax.random.key(seed), scale_index)
  return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), shape))(
      index.astype(jnp.uint32))


def recon_step(gae_params, lpips_params, inc_vars, images, index, *, fns: TokenizerFns,
               scales: Sequence[float], seed: int, lpips_model, inc_model,
               resize_mode: str) -> dict[str, jax.Array]:
  """One batch: per scale i per-image 's{i}/psnr|ssim|lpips' and 's{i}/pool', + 'orig/pool'."""
  mu = fns.encode(gae_params, images)
  out = {}
  if inc_model is not None:
    out["orig/pool"] = features_lib.inception_outputs(
        inc_model, inc_vars, (images + 1.0) * 127.5, resize_mode)["pool"]
  for i, s in enumerate(scales):
    z = mu if s == 0 else mu + s * perturbation(seed, i, index, mu.shape[1:])
    x = rec_lib.quantize_uint8(jnp.clip(fns.decode(gae_params, z), -1.0, 1.0))
    out[f"s{i}/psnr"] = rec_lib.psnr_per_image(x, images)
    out[f"s{i}/ssim"] = rec_lib.ssim_per_image(x, images)
    if lpips_model is not None:
      out[f"s{i}/lpips"] = lpips_model.apply(lpips_params, x, images)
    if inc_model is not None:
      out[f"s{i}/pool"] = features_lib.inception_outputs(
          inc_model, inc_vars, (x + 1.0) * 127.5, resize_mode)["pool"]
    if i == 0:
      out["s0/images"] = x
  return out


def evaluate_reconstruction(fns: TokenizerFns, batches, *, mesh=None, batch_size: int = 64,
                            scales: Sequence[float] = (0.0,), seed: int = 0,
                            inception_vars: Any = None, lpips_params: Any = None,
                            resize_mode: str = "tf1", keep_images: int = 8
                            ) -> dict[str, Any]:
  """Metrics of D(mu + s eps) for every s in `scales` over `batches`.

  batches: iterable of this process's (images float [-1, 1] (b, S, S, 3), global image
  indices (b,)); every process must yield the same number of batches (b may differ).
  inception_vars None skips rFID; lpips_params None skips LPIPS.
  Returns {"per_scale": [{scale, rfid, psnr, ssim, lpips, num_images}], "images": ...}.
  """
  mesh = mesh if mesh is not None else features_lib.eval_mesh()
  data = features_lib.batch_sharding(mesh)
  rep = sharding_lib.replicated(mesh)
  rows = features_lib.local_batch_size(batch_size, mesh)
  inc_model = None
  if inception_vars is not None:
    inc_model = inception_lib.InceptionV3(
        num_classes=inception_lib.NUM_CLASSES if "fc" in inception_vars["params"] else 0)
  lpips_model = vgg_lib.LPIPS() if lpips_params is not None else None
  step = functools.partial(recon_step, fns=fns, scales=tuple(float(s) for s in scales),
                           seed=seed, lpips_model=lpips_model, inc_model=inc_model,
                           resize_mode=resize_mode)
  jitted = jax.jit(step, in_shardings=(rep, rep, rep, data, data), out_shardings=data)
  gae_params, lpips_params, inception_vars = jax.device_put(
      (fns.params, lpips_params, inception_vars), rep)

  n_s = len(scales)
  stats = [fid_lib.ActivationStats(inception_lib.NUM_FEATURES) for _ in range(n_s)]
  orig = fid_lib.ActivationStats(inception_lib.NUM_FEATURES)
  accs = [rec_lib.ReconstructionAccumulator() for _ in range(n_s)]
  shown_orig, shown_rec = [], []
  for images, index in batches:
    images = np.asarray(images, np.float32)
    n = images.shape[0]
    if images.shape[1:3] != (fns.image_size, fns.image_size):
      raise ValueError(f"images of shape {images.shape} do not match the GAE's "
                       f"{fns.image_size}x{fns.image_size} (set data.image_size)")
    x, idx = features_lib.shard_local_batch(
        (images, np.asarray(index, np.int64).astype(np.uint32)), rows, data)
    with jax.set_mesh(mesh):
      out = jitted(gae_params, lpips_params, inception_vars, x, idx)
    out = {k: features_lib.local_rows(v)[:n] for k, v in out.items()}
    if n == 0:
      continue
    if inc_model is not None:
      orig.update(out["orig/pool"])
    for i in range(n_s):
      accs[i].add(psnr=out[f"s{i}/psnr"], ssim=out[f"s{i}/ssim"])
      if lpips_model is not None:
        accs[i].add(lpips=out[f"s{i}/lpips"])
      if inc_model is not None:
        stats[i].update(out[f"s{i}/pool"])
    have = sum(a.shape[0] for a in shown_orig)
    if have < keep_images:
      shown_orig.append(images[:keep_images - have])
      shown_rec.append(out["s0/images"][:keep_images - have])

  per_scale = []
  ref = None
  if inc_model is not None:
    orig = features_lib.allgather_stats(orig, inception_lib.NUM_FEATURES)
    ref = orig.finalize()
  for i, s in enumerate(scales):
    vals = {k: features_lib.allgather_rows(v) for k, v in accs[i].values().items()}
    if not vals:
      raise ValueError("evaluate_reconstruction got no images")
    row = {"scale": float(s), "num_images": int(vals["psnr"].size)}
    row.update({k: float(np.mean(v)) for k, v in vals.items()})
    if ref is not None:
      st = features_lib.allgather_stats(stats[i], inception_lib.NUM_FEATURES)
      mu, sigma = st.finalize()
      row["rfid"] = fid_lib.frechet_distance(mu, sigma, *ref)
    per_scale.append(row)
    logging.info("reconstruction s=%.2f: %s", s, row)
  result = {"per_scale": per_scale}
  if shown_orig:
    result["images"] = {"original": np.concatenate(shown_orig),
                        "reconstruction": np.concatenate(shown_rec)}
  return result


def data_batches(data_config, split: str, batch_size: int, num_images: int = -1):
  """(float images [-1, 1], global indices) of this process's center-cropped split."""
  from gae_jax.evaluation import generation  # pylint: disable=g-import-not-at-top
  pi, pc = jax.process_index(), jax.process_count()
  seen = 0
  for img in generation.data_images(data_config, split, batch_size, num_images):
    n = img.shape[0]
    # make_dataset gives process p the examples p, p + pc, p + 2 pc, ...
    index = pi + pc * np.arange(seen, seen + n)
    seen += n
    yield img.astype(np.float32) / np.float32(127.5) - np.float32(1.0), index
