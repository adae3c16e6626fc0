r"""`config.stage = "eval"`: generation / reconstruction / robustness / linear-probe /
latent-diagnostics evaluations, written to the workdir as metrics.json, PNGs and report.md.

  python -m gae_jax.main --config=configs/eval_reconstruction.py:tokenizer=/runs/gae_l32 \
      --workdir=/runs/gae_l32/eval
  python -m gae_jax.main --config=configs/eval_generation.py:samples=/runs/samples.npz,\
reference=/data/VIRTUAL_imagenet256_labeled.npz --workdir=/runs/eval_gen
  python -m gae_jax.main --config=configs/eval_latents.py:tokenizer=/runs/gae_l32 --workdir=...

`config.eval.kind` is one of {"generation", "reconstruction", "robustness", "linear_probe",
"diagnostics", "manifold"} or several, comma-separated (or a list). Everything is data-parallel over
all devices and hosts (`evaluation.features`); only process 0 writes files.
The tokenizer under test (`config.tokenizer.path`, any family: GAE, PAE, KL) is opened with
`pretrained.open_tokenizer` and used only through `.encode_fn` / `.decode_fn` / `.params`.
"""

import importlib
import os
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gae_jax.evaluation import diagnostics as diag_lib
from gae_jax.evaluation import features as features_lib
from gae_jax.evaluation import generation as gen_lib
from gae_jax.evaluation import linear_probe as probe_lib
from gae_jax.evaluation import manifold as manifold_lib
from gae_jax.evaluation import reconstruction_eval as rec_lib
from gae_jax.evaluation import reference as reference_lib
from gae_jax.evaluation import report as report_lib
from gae_jax.trainers import common

KINDS = ("generation", "reconstruction", "robustness", "linear_probe", "diagnostics",
         "manifold")
NEEDS_TOKENIZER = ("reconstruction", "robustness", "linear_probe", "diagnostics", "manifold")
RANDOM_GAE = "random"
RANDOM_GAE_NOTE = ("tokenizer.path='random': a randomly initialised tiny GAE (smoke test of "
                   "the pipeline); its numbers mean nothing about any trained model.")


def kinds(config) -> list[str]:
  k = config.eval.kind
  names = [s.strip() for s in (k.split(",") if isinstance(k, str) else k) if s.strip()]
  bad = [n for n in names if n not in KINDS]
  if bad or not names:
    raise ValueError(f"config.eval.kind={k!r}: expected one or more of {KINDS}")
  return names


# ------------------------------------------------------------------------------------------
# Networks.


def random_gae(image_size: int, *, latent_dim: int = 8, patch_size: int = 8, seed: int = 0):
  """An explicitly random-init "mu"-sized GAE tokenizer handle (smoke tests only)."""
  from gae_jax.models import vit  # pylint: disable=g-import-not-at-top
  from gae_jax.tokenizers import gae as gae_tokenizer  # pylint: disable=g-import-not-at-top
  v = vit.decode_variant("mu")
  cfg = ml_collections.ConfigDict(dict(
      width=v["width"], depth=v["depth"], num_heads=v["num_heads"],
      decoder_width=v["width"], decoder_depth=v["depth"], decoder_num_heads=v["num_heads"],
      patch_size=patch_size, latent_dim=latent_dim, image_size=image_size, sigma_std=0.2,
      kl=False, qk_norm="rms", attention_impl=None, remat="none", scan=False,
      variant="mu", decoder_variant="mu"))
  model = gae_tokenizer.build_gae(cfg)
  x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  params = jax.jit(model.init)({"params": jax.random.key(seed)}, x)["params"]
  return gae_tokenizer.GAEHandle(params, cfg, source="random init")


def load_tokenizer(config, image_size: int):
  """The tokenizer handle `config.tokenizer.path` names ('random': `random_gae`)."""
  t = config.tokenizer
  if not t.path:
    raise ValueError("config.tokenizer.path must name a tokenizer (GAE / PAE / KL workdir, "
                     f"converted dir or released file) for eval kinds {NEEDS_TOKENIZER}")
  if t.path == RANDOM_GAE:
    logging.warning(RANDOM_GAE_NOTE)
    return random_gae(image_size or 64)
  from gae_jax import pretrained  # pylint: disable=g-import-not-at-top
  return pretrained.open_tokenizer(t.path, use_ema=t.get("use_ema", True),
                                   vfm_weights=t.get("vfm_weights"))


def _data_config(config, tok_size: int | None):
  data = ml_collections.ConfigDict(config.data.to_dict())
  if int(data.image_size) <= 0:
    if tok_size is None:
      raise ValueError("config.data.image_size=0 (the tokenizer's size) but no tokenizer is "
                       "loaded")
    data.image_size = tok_size
  if tok_size is not None and int(data.image_size) != tok_size:
    raise ValueError(f"config.data.image_size={data.image_size} differs from the tokenizer's "
                     f"image size {tok_size}")
  return data


def _inception_vars(config):
  from gae_jax.convert import inception as inc_convert  # pylint: disable=g-import-not-at-top
  return inc_convert.load_inception_params(config.eval.get("inception_path") or None)


def _lpips_params(config):
  if not config.eval.get("lpips", True):
    return None
  from gae_jax.models import vgg  # pylint: disable=g-import-not-at-top
  return vgg.load_lpips_params()


# ------------------------------------------------------------------------------------------
# Evaluations.


def run_reconstruction(config, tok, data, mesh, scales) -> dict:
  e = config.eval
  fns = rec_lib.tokenizer_fns(tok)
  inc = _inception_vars(config) if e.get("rfid", True) else None
  batches = rec_lib.data_batches(data, e.split, config.batch_size, e.num_images)
  return rec_lib.evaluate_reconstruction(
      fns, batches, mesh=mesh, batch_size=config.batch_size, scales=scales, seed=e.seed,
      inception_vars=inc, lpips_params=_lpips_params(config),
      resize_mode=e.get("resize_mode", "tf1"))


def _sample_from_dit(config, workdir: str) -> str:
  """Runs the `sample` stage into <workdir>/samples and returns its .npz."""
  from gae_jax import configs_lib  # pylint: disable=g-import-not-at-top
  g = config.eval.generation
  a = ml_collections.ConfigDict(dict(ckpt=g.dit, tokenizer=(
      config.tokenizer.path if config.tokenizer.path != RANDOM_GAE else "") or "",
                                     cfg=g.get("cfg", False),
                                     ablation=g.get("ablation", False),
                                     num_samples=g.num_samples
                                     if g.num_samples > 0 else 50_000, runlocal=False))
  sc = configs_lib.sample_config(a, latent_dim=g.get("latent_dim", 32),
                                 epochs=g.get("epochs", 800))
  sc.batch_size = config.batch_size
  if g.get("dit_stats"):
    sc.dit.stats = g.dit_stats
  if g.get("num_classes", 0):
    sc.sample.num_classes = g.num_classes
  out = os.path.join(workdir, "samples")
  importlib.import_module("gae_jax.trainers.sample").train_and_evaluate(sc, out)
  return os.path.join(out, f"{sc.sample.output}.npz")


def run_generation(config, data, mesh, workdir: str) -> dict:
  g = config.eval.generation
  inc_vars = _inception_vars(config)
  want_is = "fc" in inc_vars["params"]
  extractor = features_lib.InceptionFeatures(
      inc_vars, mesh=mesh, batch_size=config.batch_size,
      resize_mode=config.eval.get("resize_mode", "tf1"), spatial=True,
      keep_feats=bool(g.precision_recall), keep_logits=want_is)
  ref_extractor = extractor
  if g.reference:
    ref = reference_lib.load_reference_stats(g.reference)
  else:
    ref_extractor = features_lib.InceptionFeatures(
        inc_vars, mesh=mesh, batch_size=config.batch_size,
        resize_mode=config.eval.get("resize_mode", "tf1"), keep_feats=True)
    ref = gen_lib.reference_from_data(ref_extractor, data, g.reference_split,
                                      num_images=g.reference_num_images)
  samples: Any = g.samples
  if g.get("dit"):
    samples = _sample_from_dit(config, workdir)
  elif not samples:
    raise ValueError("config.eval.generation.samples (an .npz, a sample workdir or "
                     "'data:<split>') or .dit must be set")
  if isinstance(samples, str) and samples.startswith("data:"):
    split = samples[len("data:"):]
    imgs = list(gen_lib.data_images(data, split, extractor.rows, g.num_samples))
    samples = features_lib.allgather_rows(np.concatenate(imgs))
  ref_feats = gen_lib.reference_feats(ref_extractor, ref) if g.precision_recall else None
  out = gen_lib.evaluate_samples(extractor, samples, ref, num_samples=g.num_samples,
                                 precision_recall=bool(g.precision_recall), k=g.k,
                                 is_splits=g.is_splits, ref_feats=ref_feats)
  if isinstance(samples, np.ndarray):
    out["samples"] = g.samples
    out["_grid"] = samples[:32]
  return out


def _encode(fns, data, split, n, config, mesh, keep_images: bool = False):
  """On-the-fly latents (+ float images when keep_images) of a split, all gathered."""
  imgs = []

  def batches():
    for u8, y in gen_lib.data_images(data, split, config.batch_size, n, labels=True):
      x = u8.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
      if keep_images:
        imgs.append(x)
      yield x, y

  lat = probe_lib.encode_split(fns.encode, fns.params, batches(), mesh=mesh,
                               batch_size=config.batch_size)
  images = features_lib.allgather_rows(np.concatenate(imgs)) if keep_images else None
  return lat, images


def _num_classes(data) -> int:
  from gae_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  return int(pipeline.num_classes(data))


def run_linear_probe(config, tok, data, mesh, cache: dict) -> dict:
  p = config.eval.probe
  fns = rec_lib.tokenizer_fns(tok)
  if p.get("train_cache"):
    train = probe_lib.CachedLatents(p.train_cache, max_examples=p.num_train)
  else:
    train = cache.setdefault("train", _encode(fns, data, p.train_split, p.num_train,
                                              config, mesh)[0])
  if p.get("val_cache"):
    val = probe_lib.CachedLatents(p.val_cache, max_examples=p.num_val)
  else:
    val = cache.setdefault("val", _encode(fns, data, p.val_split, p.num_val, config,
                                          mesh, keep_images=True))[0]
  num_classes = p.get("num_classes", 0) or _num_classes(data)
  res = probe_lib.run_probes(train, val, num_classes=num_classes, heads=list(p.heads),
                             epochs=p.epochs, batch_size=p.batch_size, lr=p.lr,
                             seed=config.seed, mesh=mesh)
  return {h: {k: v for k, v in vars(r).items() if k != "head"} for h, r in res.items()}


def run_diagnostics(config, tok, data, mesh, cache: dict) -> tuple[dict, dict]:
  d = config.eval.diagnostics
  fns = rec_lib.tokenizer_fns(tok)
  val, images = cache.get("val") or (None, None)
  if val is None or images is None or len(val) < min(d.num_images, 2):
    val, images = _encode(fns, data, config.eval.probe.val_split, d.num_images, config,
                          mesh, keep_images=True)
    cache["val"] = (val, images)
  z, x, y = val.latents, images, val.labels
  if d.num_images > 0:
    z, x, y = z[:d.num_images], x[:d.num_images], y[:d.num_images]
  decode = lambda lat: features_lib.replicated_apply(fns.decode, fns.params, lat, mesh=mesh,
                                                     batch_size=config.batch_size)
  out: dict[str, Any] = {"num_images": int(z.shape[0])}
  r, s = diag_lib.spatial_similarity(z, d.max_distance or None)
  out["spatial_similarity"] = {"distance": r.tolist(), "similarity": s.tolist()}
  out["spatial_sim_r1"] = float(s[0])
  out["spatial_sim_rmax"] = float(s[-1])
  out["pca_edge_agreement"] = diag_lib.pca_edge_agreement(z, x)
  gains = diag_lib.decoder_gain(decode, z[:d.gain_images], tuple(d.gain_scales), seed=config.seed)
  out["decoder_gain"] = {str(k): v for k, v in gains.items()}
  rng = np.random.default_rng(config.seed)
  perm = rng.permutation(z.shape[0])
  pairs = [(int(perm[2 * i]), int(perm[2 * i + 1]))
           for i in range(min(d.interp_pairs, z.shape[0] // 2))]
  interp = diag_lib.interpolation_smoothness(decode, z, pairs, steps=d.interp_steps,
                                             mode=d.interp_mode)
  out["interp_roughness"] = interp["roughness"]
  out["interp_path_ratio"] = interp["path_ratio"]
  train = cache.get("train")
  if train is None:
    train = _encode(fns, data, config.eval.probe.train_split, d.knn_train_images, config,
                    mesh)[0]
    cache["train"] = train
  out["knn_top1"] = diag_lib.knn_accuracy(train.latents, train.labels, z, y, k=d.knn_k,
                                          temperature=d.knn_temperature)
  pca = diag_lib.pca_maps(z[:8])
  lo, hi = pca.min(axis=(0, 1, 2)), pca.max(axis=(0, 1, 2))
  pca = (pca - lo) / np.maximum(hi - lo, 1e-12)
  up = x.shape[1] // pca.shape[1]
  pca_img = np.repeat(np.repeat(pca, up, axis=1), up, axis=2) * 2.0 - 1.0
  images_out = {"pca_maps": np.concatenate([x[:8], pca_img.astype(np.float32)]),
                "interpolation": np.clip(interp["frames"], -1.0, 1.0)}
  return out, images_out


def run_manifold(config, tok, data, mesh, cache: dict) -> dict:
  """PAE's SSC / LPC / GSQ / eRank (evaluation/manifold.py) of any tokenizer handle."""
  m = config.eval.manifold
  if m.segmentation not in manifold_lib.SEGMENTATIONS:
    raise ValueError(f"config.eval.manifold.segmentation={m.segmentation!r}: expected one of "
                     f"{manifold_lib.SEGMENTATIONS}")
  fns = manifold_lib.tokenizer_fns(tok)
  split = config.eval.probe.val_split
  val = (cache.get("val") or (None, None))[0]
  if val is None or m.num_images < 0 or len(val) < m.num_images:
    val = _encode(fns, data, split, m.num_images, config, mesh)[0]
  n = len(val) if m.num_images < 0 else m.num_images
  segs = None
  if m.segmentation == "labels":
    images, segs, _ = manifold_lib.load_labelled_images(
        m.label_images, m.label_maps, int(data.image_size), m.ssc_images)
  elif m.ssc_images:
    u8 = list(gen_lib.data_images(data, split, config.batch_size, m.ssc_images))
    images = features_lib.allgather_rows(np.concatenate(u8)).astype(np.float32) / 127.5 - 1.0
  else:
    images = None
  lpips = _lpips_params(config) if m.lpc_images else None
  return manifold_lib.evaluate_manifold(
      fns, val.latents[:n], val.labels[:n], m, ssc_images=images, ssc_segmentations=segs,
      mesh=mesh, batch_size=config.batch_size, seed=config.seed, lpips_params=lpips)


# ------------------------------------------------------------------------------------------
# Stage.


def plan(config) -> dict:
  ks = kinds(config)
  e = config.eval
  mesh = features_lib.eval_mesh()
  return {"stage": "eval", "kinds": ks, "tokenizer": config.tokenizer.path if any(
              k in NEEDS_TOKENIZER for k in ks) else None,
          "data": {"source": config.data.source, "split": e.split,
                   "image_size": config.data.image_size, "num_images": e.num_images},
          "global_batch": config.batch_size,
          "per_process_batch": features_lib.local_batch_size(config.batch_size, mesh),
          "mesh": common.mesh_plan(mesh),
          "robustness_scales": list(e.robustness.scales) if "robustness" in ks else None,
          "generation": dict(e.generation.to_dict()) if "generation" in ks else None,
          "probe": dict(e.probe.to_dict()) if "linear_probe" in ks else None,
          "diagnostics": dict(e.diagnostics.to_dict()) if "diagnostics" in ks else None,
          "manifold": dict(e.manifold.to_dict()) if "manifold" in ks else None}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, tokenizer=None,
                       gae=None) -> dict:
  """Runs the requested evaluations; writes metrics.json, PNGs, report.md; returns results.

  tokenizer: an already opened tokenizer handle (else `config.tokenizer.path` is opened);
  `gae=` is its old name.
  """
  tok = tokenizer if tokenizer is not None else gae
  ks = kinds(config)
  common.write_config(config, workdir)
  mesh = features_lib.eval_mesh()
  results: dict[str, Any] = {"meta": {"kinds": ",".join(ks), "devices": mesh.size,
                                      "processes": jax.process_count(),
                                      "data_source": config.data.source},
                             "notes": [], "images": {}, "timings_s": {}}
  if any(k in NEEDS_TOKENIZER for k in ks) and tok is None:
    tok = load_tokenizer(config, int(config.data.image_size))
    if config.tokenizer.path == RANDOM_GAE:
      results["notes"].append(RANDOM_GAE_NOTE)
  if tok is not None:
    results["meta"]["tokenizer"] = str(config.tokenizer.path or getattr(tok, "source", None)
                                       or "<handle>")
    results["meta"]["tokenizer_family"] = tok.family
  data = _data_config(config, int(tok.image_size) if tok is not None else None)
  results["meta"]["image_size"] = int(data.image_size)
  cache: dict[str, Any] = {}
  for kind in ks:
    t0 = time.perf_counter()
    logging.info("eval: %s", kind)
    if kind == "reconstruction":
      r = run_reconstruction(config, tok, data, mesh, (0.0,))
      results["reconstruction"] = {"per_scale": r["per_scale"]}
      if "images" in r:
        results["images"]["reconstructions"] = np.concatenate(
            [r["images"]["original"], r["images"]["reconstruction"]])
    elif kind == "robustness":
      r = run_reconstruction(config, tok, data, mesh, tuple(config.eval.robustness.scales))
      results["robustness"] = {"per_scale": r["per_scale"]}
    elif kind == "generation":
      g = run_generation(config, data, mesh, workdir)
      grid = g.pop("_grid", None)
      results["generation"] = g
      if grid is not None:
        results["images"]["generation_samples"] = grid
    elif kind == "linear_probe":
      results["linear_probe"] = run_linear_probe(config, tok, data, mesh, cache)
    elif kind == "diagnostics":
      out, imgs = run_diagnostics(config, tok, data, mesh, cache)
      results["diagnostics"] = out
      results["images"].update(imgs)
    elif kind == "manifold":
      results["manifold"] = run_manifold(config, tok, data, mesh, cache)
    results["timings_s"][kind] = round(time.perf_counter() - t0, 2)
  n_fid = [r["num_images"] for k in ("reconstruction", "robustness") if k in results
           for r in results[k]["per_scale"] if "rfid" in r]
  n_fid += [results["generation"]["num_samples"]] if "generation" in results else []
  if n_fid and min(n_fid) <= 2048:
    results["notes"].append(
        f"FID from {min(n_fid)} <= 2048 images: the 2048-d covariance is rank-deficient, "
        "so these FIDs are biased upwards and only comparable at equal image counts "
        "(the paper uses 50k).")
  if jax.process_index() == 0:
    files = report_lib.write_report(workdir, results)
    logging.info("eval: wrote %s", ", ".join(sorted(files.values())))
  return results
