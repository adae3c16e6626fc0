r"""`config.stage = "demo"`: the whole pipeline on the embedded photos, one command, one report.

  python -m gae_jax.main --config=configs/demo.py --workdir=/tmp/demo        # CPU minutes
  python -m gae_jax.main --config=configs/demo.py:tiny --workdir=/tmp/demo   # seconds a stage

Six stages, each the project's own trainer called in-process (`train_and_evaluate`) with
the config its README command uses (built by `gae_jax.configs_lib`, held in this config as
`config.<stage>` so any field can be overridden, e.g. `--config.dit.total_steps=800`), each
writing into its own subdirectory of the workdir:

  1 teacher       1_teacher/  configs/teacher_l32.py:runlocal (VGG16 relu5_3 semantic teacher)
  2 gae           2_gae/      configs/gae_l32.py:runlocal, teacher.init_from=1_teacher (L_sp)
  3 latent cache  3_latents/  configs/cache_latents.py:runlocal,tokenizer=2_gae
  4 dit           4_dit/      configs/dit_xl_gae32_80ep.py:runlocal,cache=3_latents
  5 samples       5_samples/  configs/dit_xl_gae32_80ep.py:sample,runlocal,ckpt=4_dit
  6 evaluation    6_eval/     configs/eval_reconstruction.py:runlocal,tokenizer=2_gae with kinds
                              robustness (its s = 0 row is the reconstruction metrics) and
                              generation (FID / precision / recall of 5_samples)

then `report.md` and its PNGs in the workdir (`write_report`: reconstructions, samples per
class, training curves, metrics table, robustness curve), readable without the code.

A stage is done when its outputs exist (training: a checkpoint at total_steps, the
trainers' own "nothing to do" rule; cache: manifest.json; samples: the .npz; evaluation:
metrics.json). A rerun skips done stages and hands unfinished ones to their trainer, which
resumes by its own logic (checkpoint + data iterator, finished cache shards). So raising a
trainer's total_steps continues it; other setting changes of a finished stage are reported
(the fields that differ from its config.json) and need its directory deleted. Each finished
stage records in `demo_stage.json` the outputs of the stages it read; when those changed
since (a GAE trained further), samples and evaluation run again, while a training or cache
stage (whose trainer would see its old outputs as finished) stops the run with one line
naming the directory to delete. Every log line of a stage is prefixed
"[stage i/6 name | elapsed]".
"""

import contextlib
import copy
import dataclasses
import hashlib
import importlib
import json
import logging as py_logging
import os
import time
from typing import Any, Callable, Iterator, Optional

from absl import logging
import jax
import ml_collections
import numpy as np

from gae_jax import configs_lib
from gae_jax import metrics as metrics_lib
from gae_jax.trainers import common

MARKER = "demo_stage.json"
TINY_NOTE = ("tiny demo (`:tiny`): every stage runs 3 steps on 32x32 crops and the evaluation "
             "skips rFID, LPIPS and the sample FID; it checks the plumbing, its numbers and "
             "pictures mean nothing.")


@dataclasses.dataclass(frozen=True)
class Stage:
  key: str                  # config field (config.<key>) and short name
  title: str                # shown in the progress prefix and the report
  subdir: str               # <workdir>/<subdir>
  trainer: str              # module with train_and_evaluate(config, workdir)
  inputs: tuple[str, ...]   # upstream stages whose outputs this one reads
  what: str                 # one line for the report


STAGES = (
    Stage("teacher", "semantic teacher", "1_teacher", "gae_jax.trainers.teacher", (),
          "Stage 1: a small network that compresses frozen VGG16 features of each image "
          "into a d=32 latent grid (the target of the GAE's semantic-preservation loss)."),
    Stage("gae", "GAE autoencoder", "2_gae", "gae_jax.trainers.autoencoder", ("teacher",),
          "Stage 2: the GAE tokenizer: ViT encoder -> latents on the sphere -> ViT "
          "decoder, trained with L1 + LPIPS + GAN + L_sp (latents pulled toward the "
          "teacher's)."),
    Stage("cache", "latent cache", "3_latents", "gae_jax.trainers.cache_latents", ("gae",),
          "Encodes random crops of the photos (and their mirror images) with the frozen "
          "GAE; stores the latents and their per-channel mean / std."),
    Stage("dit", "DiT flow matching", "4_dit", "gae_jax.trainers.flow", ("cache",),
          "Stage 3: a class-conditional LightningDiT learns to turn Gaussian noise into "
          "GAE latents (flow matching on the cached latents)."),
    Stage("sample", "samples", "5_samples", "gae_jax.trainers.sample", ("dit",),
          "Draws the same number of samples for every class with the DiT (SDE sampler) and "
          "decodes them to images with the GAE."),
    Stage("eval", "evaluation", "6_eval", "gae_jax.trainers.evaluate", ("gae", "sample"),
          "Reconstruction metrics of the GAE on held-out crops, its robustness to noise on "
          "the latents, and FID / precision / recall of the samples."),
)
TRAINING_STAGES = ("teacher", "gae", "dit")
# Robustness includes s = 0, the plain reconstruction metrics (the `reconstruction` kind
# would compute that row a second time, with its own compile).
EVAL_KINDS = "robustness,generation"


# ------------------------------------------------------------------------------------------
# Config.


def demo_config(arg: Optional[str] = None) -> ml_collections.ConfigDict:
  """The demo config: `stage = "demo"` + one full stage config per field of STAGES.

  arg: '' (the README's runlocal settings of every stage) or 'tiny' (every stage shrunk to
  a few steps on 32x32 crops: seconds a stage, for tests and notebooks).
  """
  a = configs_lib.parse_arg(arg, tiny=False)
  c = ml_collections.ConfigDict()
  c.stage = "demo"
  c.tiny = a.tiny
  c.teacher = configs_lib.teacher_config("runlocal", latent_dim=32)
  c.gae = configs_lib.autoencoder_config("runlocal", latent_dim=32)
  c.gae.loss.sp_weight = 1.0     # L_sp on: the teacher comes from stage 1 (stage_configs)
  c.cache = configs_lib.cache_latents_config("runlocal")
  c.dit = configs_lib.dit_config("runlocal", latent_dim=32, epochs=80)
  c.sample = configs_lib.dit_config("sample,runlocal", latent_dim=32, epochs=80)
  c.eval = configs_lib.eval_config("runlocal", kind=EVAL_KINDS)
  # Every sample of stage 5 is scored (runlocal's 176 would ask for more than it draws).
  c.eval.eval.generation.num_samples = -1
  # Half the runlocal Inception work (each image is one 299 px InceptionV3 pass per scale):
  # 32 held-out crops (~3 a photo, as the GAE stage's val PSNR) through the robustness
  # scales, and 88 real training crops (8 a photo) as the FID / precision / recall reference
  # of the 44 samples. The report's metrics keep their meaning; only the counts change.
  c.eval.eval.num_images = 32
  c.eval.eval.generation.reference_num_images = 88
  if a.tiny:
    _shrink(c)
  return c


def _shrink(c: ml_collections.ConfigDict) -> None:
  """`:tiny`: 32x32 GAE crops (4x4 latent grid; the teacher sees 64 px so VGG16's stride-16
  relu5_3 gives the same 4x4 grid), 3 steps a trainer, a few images elsewhere, and nothing
  that only adds a compile: no periodic eval / image grids in the trainers, and the
  evaluation without Inception (rFID, generation FID) and LPIPS. Compiling dominates at
  this size. Batches are multiples of 8 (the 8 fake CPU devices of the tests)."""
  for key in TRAINING_STAGES:
    s = c[key]
    s.total_steps = 3
    s.batch_size = 8
    s.log_every = 1
    s.ckpt_every = 3
    s.num_eval_images = 8
  c.teacher.teacher.vfm_image_size = c.teacher.data.image_size = 64
  c.teacher.eval_every = 0
  c.teacher.optim.warmup_fraction = 0.0
  c.gae.data.image_size = 32
  c.gae.image_every = 0
  c.gae.optim.warmup_steps = 1
  c.gae.loss.disc_start = 3              # the GAN branch runs on the last step
  c.cache.data.embedded_length = 32
  c.cache.cache.shard_size = 16
  c.cache.batch_size = 8
  c.dit.model.latent_size = 4
  c.dit.image_every = 0
  c.dit.sample_grid.num_steps = 3
  c.sample.sample.num_samples = 22       # 2 per class
  c.sample.sample.num_steps = 3
  c.sample.sample.grid_images = 22
  c.sample.batch_size = 8
  c.eval.batch_size = 8
  c.eval.eval.kind = "robustness"
  c.eval.eval.rfid = False
  c.eval.eval.lpips = False
  c.eval.eval.num_images = 16
  c.eval.eval.robustness.scales = [0.0, 0.5]


def stage_dir(workdir: str, stage: Stage) -> str:
  return os.path.join(workdir, stage.subdir)


def stage_configs(config: ml_collections.ConfigDict, workdir: str
                  ) -> dict[str, ml_collections.ConfigDict]:
  """Copies of config.<stage> with the paths between stages filled in (absolute)."""
  d = {s.key: stage_dir(os.path.abspath(workdir), s) for s in STAGES}
  out = {s.key: copy.deepcopy(config[s.key]) for s in STAGES}
  out["gae"].teacher.init_from = d["teacher"]
  out["cache"].tokenizer.path = d["gae"]
  out["dit"].data.cache_dir = d["cache"]
  out["sample"].dit.init_from = d["dit"]
  out["eval"].tokenizer.path = d["gae"]
  out["eval"].eval.generation.samples = os.path.join(
      d["sample"], f"{out['sample'].sample.output}.npz")
  return out


def fingerprint(config: ml_collections.ConfigDict) -> str:
  """sha256 (16 hex digits) of the config's sorted JSON: any field change changes it."""
  text = json.dumps(json.loads(config.to_json_best_effort()), sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------
# Which stages are done.


def _latest_step(workdir: str) -> Optional[int]:
  ckpts = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpts):
    return None
  steps = [int(n) for n in os.listdir(ckpts) if n.isdigit()
           and os.path.isdir(os.path.join(ckpts, n))]
  return max(steps) if steps else None


def _file_sig(path: str) -> Optional[str]:
  if not os.path.isfile(path):
    return None
  st = os.stat(path)
  return f"{st.st_size}:{st.st_mtime_ns}"


def output_signature(stage: Stage, config, workdir: str) -> Optional[str]:
  """A string that changes when the stage's outputs change; None while they are incomplete.

  Training stages: the latest checkpoint step once it reaches total_steps (any step for the
  fitted SVD teacher); cache: manifest.json; samples: the .npz; evaluation: metrics.json.
  """
  if stage.key in TRAINING_STAGES:
    step = _latest_step(workdir)
    svd = stage.key == "teacher" and config.teacher.downsampler == "svd"
    if step is None or (not svd and step < int(config.total_steps)):
      return None
    return f"step {step}"
  if stage.key == "cache":
    return _file_sig(os.path.join(workdir, "manifest.json"))
  if stage.key == "sample":
    return _file_sig(os.path.join(workdir, f"{config.sample.output}.npz"))
  return _file_sig(os.path.join(workdir, "metrics.json"))


def config_diff(config: ml_collections.ConfigDict, path: str) -> list[str]:
  """Dotted keys whose values differ between `config` and the JSON config at `path`
  (a trainer's config.json); [] when equal or when `path` does not exist."""
  if not os.path.isfile(path):
    return []
  with open(path) as f:
    saved = json.load(f)
  now = json.loads(config.to_json_best_effort())

  def flat(d, prefix=""):
    out = {}
    for k, v in d.items():
      if isinstance(v, dict):
        out.update(flat(v, f"{prefix}{k}."))
      else:
        out[f"{prefix}{k}"] = v
    return out

  a, b = flat(now), flat(saved)
  return sorted(k for k in set(a) | set(b) if a.get(k, "<missing>") != b.get(k, "<missing>"))


def read_marker(workdir: str) -> Optional[dict]:
  path = os.path.join(workdir, MARKER)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def _write_json(path: str, obj: dict) -> None:
  if jax.process_index() != 0:
    return
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


class StaleStageError(RuntimeError):
  """A finished stage was built from outputs of an upstream stage that changed since."""


# ------------------------------------------------------------------------------------------
# Progress: every log record of a stage carries "[stage i/n title | elapsed]".


def _elapsed(seconds: float) -> str:
  m, s = divmod(int(seconds), 60)
  return f"{m}m{s:02d}s"


@contextlib.contextmanager
def log_prefix(tag: str, t0: float) -> Iterator[None]:
  """Prefixes every log record (absl and Python logging) created inside the block."""
  old = py_logging.getLogRecordFactory()

  def factory(*args, **kwargs):
    record = old(*args, **kwargs)
    prefix = f"[{tag} | {_elapsed(time.perf_counter() - t0)}] "
    record.msg = prefix + str(record.msg)     # the prefix holds no '%': args stay valid
    return record

  py_logging.setLogRecordFactory(factory)
  try:
    yield
  finally:
    py_logging.setLogRecordFactory(old)


# ------------------------------------------------------------------------------------------
# Stage.


def trainer_module(name: str):
  """The stage's trainer module (the one gae_jax.main runs for its config.stage)."""
  return importlib.import_module(name)


def plan(config) -> dict:
  """--dry_run: the stages, their trainers, workdirs and sizes (nothing is built)."""
  out = {"stage": "demo", "tiny": bool(config.tiny), "stages": []}
  for i, s in enumerate(STAGES, 1):
    c = config[s.key]
    row = {"index": i, "name": s.key, "trainer": s.trainer, "subdir": s.subdir,
           "fingerprint": fingerprint(c), "global_batch": int(c.batch_size)}
    if s.key in TRAINING_STAGES:
      row["total_steps"] = int(c.total_steps)
    out["stages"].append(row)
  return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       echo: Optional[Callable[[str], None]] = None) -> dict:
  """Runs the unfinished stages in order, then writes report.md (kept as it is when every
  stage was reused and it exists); returns {"stages": {key: {"status": "ran"|"reused",
  "seconds", "subdir"}}, "report": path, "seconds": this call's wall time}.

  echo: also called with one line per stage start / end (notebooks pass `print`).
  Raises StaleStageError when a finished training / cache stage was built from upstream
  outputs that changed since (the message names the directory to delete).
  """
  say = echo or (lambda line: None)
  workdir = os.path.abspath(workdir)
  common.write_config(config, workdir)
  cfgs = stage_configs(config, workdir)
  t0 = time.perf_counter()
  n = len(STAGES)
  sigs: dict[str, str] = {}
  statuses: dict[str, dict] = {}
  for i, s in enumerate(STAGES, 1):
    tag = f"stage {i}/{n} {s.title}"
    cfg, d = cfgs[s.key], stage_dir(workdir, s)
    fp = fingerprint(cfg)
    inputs = {k: sigs[k] for k in s.inputs}
    marker = read_marker(d)
    sig = output_signature(s, cfg, d)
    with log_prefix(tag, t0):
      stale = marker is not None and marker.get("inputs") != inputs
      if sig is not None and not stale:
        seconds = float(marker["seconds"]) if marker else 0.0
        logging.info("done earlier (%s): reusing %s", _elapsed(seconds), d)
        say(f"[{tag}] done earlier ({_elapsed(seconds)}): reusing {d}")
        diff = config_diff(cfg, os.path.join(d, "config.json"))
        if diff:
          logging.info("its config.json differs from this run's config in %s; delete %s to "
                       "redo the stage with the new settings", ", ".join(diff[:6]) +
                       (f" and {len(diff) - 6} more" if len(diff) > 6 else ""), d)
        if marker is None:      # finished outside the demo (or before its marker was written)
          _write_json(os.path.join(d, MARKER), {
              "stage": s.key, "config": fp, "inputs": inputs, "outputs": sig,
              "seconds": 0.0, "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
        sigs[s.key] = sig
        statuses[s.key] = {"status": "reused", "seconds": seconds, "subdir": s.subdir}
        continue
      if stale and sig is not None and s.key in TRAINING_STAGES + ("cache",):
        changed = [k for k in s.inputs if (marker.get("inputs") or {}).get(k) != inputs[k]]
        raise StaleStageError(
            f"{tag}: {d} was built from older outputs of {', '.join(changed)}; delete {d} "
            f"(and the later stages' directories) to rebuild it, or use a new --workdir")
      logging.info("running %s -> %s", s.trainer, d)
      say(f"[{tag}] running {s.trainer} -> {d}")
      start = time.perf_counter()
      trainer_module(s.trainer).train_and_evaluate(cfg, d)
      seconds = time.perf_counter() - start
      sig = output_signature(s, cfg, d)
      if sig is None:
        raise RuntimeError(f"{tag}: {s.trainer} returned but its outputs are incomplete "
                           f"in {d}")
      if marker is not None and marker.get("outputs") == sig:
        # The trainer found its outputs finished ("nothing to do"): they took the old time.
        seconds = float(marker["seconds"])
      _write_json(os.path.join(d, MARKER), {
          "stage": s.key, "config": fp, "inputs": inputs, "outputs": sig,
          "seconds": round(seconds, 2), "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
      logging.info("finished in %s", _elapsed(time.perf_counter() - start))
      say(f"[{tag}] finished in {_elapsed(time.perf_counter() - start)}")
    sigs[s.key] = sig
    statuses[s.key] = {"status": "ran", "seconds": round(seconds, 2), "subdir": s.subdir}
  ran = sum(v["status"] == "ran" for v in statuses.values())
  report = os.path.join(workdir, "report.md")
  if jax.process_index() == 0 and (ran or not os.path.isfile(report)):
    with log_prefix("report", t0):
      files = write_report(config, workdir, cfgs, statuses)
      logging.info("wrote %s, %s and %d figures", files["report"], files["metrics"],
                   len(files) - 2)
  else:
    files = {"report": report}
  total = time.perf_counter() - t0
  logging.info("demo: %d of %d stages ran, %s in all; read %s", ran, n, _elapsed(total),
               report)
  say(f"demo: {ran} of {n} stages ran ({_elapsed(total)}); report: {report}")
  return {"stages": statuses, "report": report, "files": files, "seconds": total}


def run(workdir: str, arg: Optional[str] = "tiny", *,
        echo: Optional[Callable[[str], None]] = print) -> dict:
  """The demo from Python (notebooks): `train_and_evaluate(demo_config(arg), workdir)`,
  printing one line per stage. arg: 'tiny' or '' / None (the full CPU demo)."""
  return train_and_evaluate(demo_config(arg or None), workdir, echo=echo)


# ------------------------------------------------------------------------------------------
# Report.


def _class_names(data, num_classes: int) -> list[str]:
  from gae_jax.data import sources  # pylint: disable=g-import-not-at-top
  if data.source == "embedded" and num_classes == len(sources.EMBEDDED_NAMES):
    return list(sources.EMBEDDED_NAMES)
  return [f"class {i}" for i in range(num_classes)]


def _one_val_image_per_class(data, num_classes: int) -> np.ndarray:
  """The first validation crop of every class: (C, S, S, 3) float in [-1, 1]."""
  from gae_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  found: dict[int, np.ndarray] = {}
  it = pipeline.make_iterator(data, split="val", batch_size=16, seed=0, shuffle=False,
                              repeat=False)
  for batch in it:
    for x, y in zip(np.asarray(batch["image"]), np.asarray(batch["label"])):
      found.setdefault(int(y), x)
    if len(found) == num_classes:
      break
  return np.stack([found[c] for c in sorted(found)])


def _last(curves: dict, key: str) -> Optional[float]:
  return float(curves[key][1][-1]) if key in curves and len(curves[key][1]) else None


def _fmt(v: Any, digits: int = 4) -> str:
  if v is None:
    return "n/a"
  if isinstance(v, float):
    return f"{v:.{digits}g}"
  return str(v)


def write_report(config, workdir: str, cfgs: dict, statuses: dict) -> dict[str, str]:
  """report.md, metrics.json (stage times + the metrics table) and reconstructions.png,
  samples_per_class.png, training_curves.png, robustness.png in `workdir`, all from the
  stages' files on disk (process 0 calls it); returns {name: path}."""
  from gae_jax import pretrained  # pylint: disable=g-import-not-at-top
  from gae_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from gae_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from gae_jax.evaluation import report as rep  # pylint: disable=g-import-not-at-top
  dirs = {s.key: stage_dir(workdir, s) for s in STAGES}
  files: dict[str, str] = {}
  curves = {k: rep.read_metrics_jsonl(os.path.join(dirs[k], "metrics.jsonl"))
            for k in TRAINING_STAGES}
  with open(os.path.join(dirs["eval"], "metrics.json")) as f:
    ev = json.load(f)

  # Reconstructions: the first held-out crop of every photo, through the trained GAE.
  gae = pretrained.open_tokenizer(dirs["gae"])
  data = pipeline.default_data_config()
  data.source = cfgs["eval"].data.source
  data.root = cfgs["eval"].data.root
  data.image_size = gae.image_size
  num_classes = int(pipeline.num_classes(data))
  names = _class_names(data, num_classes)
  real = _one_val_image_per_class(data, num_classes)
  recon = np.asarray(jax.device_get(gae.reconstruct(real)))
  files["reconstructions"] = rep.plot_image_rows(
      os.path.join(workdir, "reconstructions.png"),
      {"input": real, "reconstruction": np.clip(recon, -1.0, 1.0)},
      title="Held-out crops (top) and their GAE reconstructions (bottom)")

  # Samples: the sample stage's class-uniform .npz, one row per class.
  s_cfg = cfgs["sample"].sample
  samples = np.load(os.path.join(dirs["sample"], f"{s_cfg.output}.npz"))["arr_0"]
  k = len(samples) // s_cfg.num_classes
  per_class = samples[:k * s_cfg.num_classes].reshape(s_cfg.num_classes, k,
                                                      *samples.shape[1:])[:, :8]
  sample_names = names if s_cfg.num_classes == num_classes else \
      [f"class {i}" for i in range(s_cfg.num_classes)]
  files["samples"] = rep.plot_class_samples(
      os.path.join(workdir, "samples_per_class.png"), per_class, sample_names,
      real=metrics_lib.to_uint8(real) if s_cfg.num_classes == num_classes else None,
      title=f"DiT samples, {k} per class ({s_cfg.mode.upper()} sampler, {s_cfg.num_steps} "
            f"steps, CFG {s_cfg.cfg_scale:g})")

  # Training curves from the trainers' metrics.jsonl.
  pick = lambda stage, keys: {label: curves[stage][key] for key, label in keys
                              if key in curves[stage]}
  files["curves"] = rep.plot_training_curves(os.path.join(workdir, "training_curves.png"), [
      {"title": "1 teacher: feature loss 2(1 - cos)", "ylabel": "loss",
       "curves": pick("teacher", (("loss", "train"), ("val/loss", "held-out")))},
      {"title": "2 GAE: reconstruction losses", "ylabel": "loss",
       "curves": pick("gae", (("l1", "L1"), ("lpips", "LPIPS")))},
      {"title": "2 GAE: semantic preservation L_sp", "ylabel": "MSE to teacher latents",
       "curves": pick("gae", (("sp", "L_sp"),))},
      {"title": "2 GAE: PSNR", "ylabel": "dB",
       "curves": pick("gae", (("psnr", "train"), ("val/psnr", "held-out")))},
      {"title": "4 DiT: flow-matching loss", "ylabel": "MSE + (1 - cos)",
       "curves": pick("dit", (("loss", "train"),))},
  ])

  rob = (ev.get("robustness") or {}).get("per_scale") or []
  if rob:
    files["robustness"] = rep.plot_robustness(os.path.join(workdir, "robustness.png"), rob)

  rec_rows = (ev.get("reconstruction") or {}).get("per_scale") or \
      [r for r in rob if float(r.get("scale", -1)) == 0.0]
  rec = rec_rows[0] if rec_rows else {}
  gen = ev.get("generation") or {}
  n_params = lambda tree: sharding_lib.tree_size(tree) / 1e6
  dit_cfg = cfgs["dit"]
  metric_rows = [
      ("teacher: held-out cosine", _last(curves["teacher"], "val/cos"), "higher",
       "cosine between the VGG16 features the teacher reconstructs from its d=32 latents "
       "and the true ones (1 = perfect)"),
      ("GAE: L_sp (last step)", _last(curves["gae"], "sp"), "lower",
       "distance of the GAE latents from the teacher's: how much semantic structure they keep"),
      ("GAE: PSNR (dB)", rec.get("psnr"), "higher",
       "pixel fidelity of the reconstructions of held-out crops"),
      ("GAE: SSIM", rec.get("ssim"), "higher", "structural similarity, 1 = identical"),
      ("GAE: LPIPS", rec.get("lpips"), "lower", "perceptual distance (VGG16 features)"),
      ("GAE: rFID", rec.get("rfid"), "lower",
       f"Frechet Inception distance of {rec.get('num_images', '?')} reconstructions to "
       "the same crops"),
      ("DiT: flow loss (last step)", _last(curves["dit"], "loss"), "lower",
       "MSE + (1 - cos) between predicted and true velocity"),
      ("samples: FID", gen.get("fid"), "lower",
       f"{gen.get('num_samples', '?')} samples against real training crops"),
      ("samples: precision", gen.get("precision"), "higher",
       "share of samples that look like some real crop (Inception features, k=3)"),
      ("samples: recall", gen.get("recall"), "higher",
       "share of real crops that some sample looks like"),
  ]

  md = ["# gae_jax demo report", ""]
  if config.tiny:
    md += [f"> {TINY_NOTE}", ""]
  md += [
      "This directory holds one run of the whole pipeline of *GAE: Geometric Autoencoder "
      "for Diffusion Models* (arXiv 2603.10365), shrunk to run on a laptop CPU. The data "
      f"are {num_classes} photos bundled with scikit-image / scikit-learn; each photo is "
      "one class. Training uses random crops of the left three quarters of every photo, "
      "evaluation fixed crops of the held-out right quarter.",
      "",
      f"The models are tiny (GAE {n_params(gae.params):.2f}M parameters, "
      f"{gae.image_size}x{gae.image_size} images, a {gae.latent_shape[0]}x"
      f"{gae.latent_shape[1]} grid of d={gae.latent_shape[2]} latents; DiT "
      f"variant '{dit_cfg.model.variant}', {dit_cfg.total_steps} steps) and the data are "
      "11 pictures, so the numbers below are not comparable with the paper's ImageNet "
      "results: they show that every stage runs and learns, and how to read each output.",
      "",
      "## Stages", "",
      "| # | stage | what it does | directory | this run | time |",
      "|---|---|---|---|---|---|",
  ]
  for i, s in enumerate(STAGES, 1):
    st = statuses[s.key]
    md.append(f"| {i} | {s.title} | {s.what} | `{s.subdir}/` | "
              f"{'ran' if st['status'] == 'ran' else 'reused (already done)'} | "
              f"{_elapsed(st['seconds'])} |")
  total = sum(v["seconds"] for v in statuses.values())
  md += ["", f"Stage time in all: {_elapsed(total)} "
         f"(on {jax.device_count()} {jax.default_backend()} device(s)).", ""]

  md += ["## Metrics", "",
         "| metric | value | better | what it measures |", "|---|---|---|---|"]
  md += [f"| {name} | {_fmt(v)} | {better} | {meaning} |"
         for name, v, better, meaning in metric_rows]
  md += ["", "FIDs from a few dozen images are strongly biased upwards (the paper uses "
         "50,000); compare them only between runs with the same image counts.", ""]

  md += ["## Reconstructions", "",
         "Top row: one held-out crop of every photo, never seen in training. Bottom row: "
         "the same crop encoded to latents and decoded again by the GAE. A good "
         "autoencoder keeps the colours, the layout and, as training goes on, the edges "
         "and textures.", "", "![reconstructions](reconstructions.png)", ""]
  md += ["## Samples per class", "",
         "Each row is one class (photo). The first column is a real held-out crop; the "
         "others are images the DiT generated from pure noise given only the class label, "
         "decoded by the GAE. Samples of a class should share the colours and motifs of "
         "its photo and differ from each other.", "",
         "![samples per class](samples_per_class.png)", ""]
  md += ["## Training curves", "",
         "Loss against training step for the three trained networks, read from each "
         "stage's `metrics.jsonl` (the same numbers TensorBoard shows from `*/tb`). "
         "Falling curves mean the stage learns; a held-out curve far above the training "
         "curve means over-fitting.", "", "![training curves](training_curves.png)", ""]
  if rob:
    md += ["## Decoder robustness (paper Fig. 4)", "",
           "The GAE decoder is trained on latents with added noise, so it should degrade "
           "gracefully when its input is perturbed: here every latent gets Gaussian noise "
           "of scale s before decoding (s = 0 is the plain reconstruction). Flat curves "
           "mean a robust latent space, which makes the DiT's job easier.", ""]
    md += rep.markdown_table(rob, ["scale", "psnr", "ssim", "lpips", "rfid"])
    md += ["", "![robustness](robustness.png)", ""]
  md += ["## Files and how to rerun", "",
         "Every stage directory holds its `config.json`; the trained ones hold "
         "`checkpoints/`, `metrics.jsonl` and TensorBoard logs in `tb/`; `2_gae/images/` "
         "has reconstruction grids during training, `4_dit/images/` sample grids, "
         "`5_samples/samples.npz` all samples (uint8, `arr_0`), `6_eval/` the evaluation's "
         "own `report.md` and `metrics.json`.", "",
         "Running the same command again reuses finished stages and resumes an "
         "interrupted one; to redo a stage, delete its directory and the later ones.", ""]
  path = os.path.join(workdir, "report.md")
  with open(path, "w") as f:
    f.write("\n".join(md) + "\n")
  files["report"] = path
  # The same numbers for scripts: stage times and the metrics table (missing -> null).
  files["metrics"] = rep.write_metrics(workdir, {
      "tiny": bool(config.tiny), "stages": statuses,
      "metrics": {name: v for name, v, _, _ in metric_rows}})
  return files

