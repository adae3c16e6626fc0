r"""`python -m gae_jax.benchmark`: time each stage's real jitted program; MFU and memory.

  python -m gae_jax.benchmark --config=dit_xl_gae32_80ep --config.batch_size=256 --steps=20
  python -m gae_jax.benchmark --config=gae_l32 --config.batch_size=32 --sweep=remat,scan
  python -m gae_jax.benchmark --config=gae_l32:runlocal --stage=autoencoder,latent_cache
  python -m gae_jax.benchmark --config=gae_l32:runlocal --data_only
  python -m gae_jax.benchmark --config=dit_xl_gae32_80ep --topology=v5p-256
  python -m gae_jax.benchmark --config=dit_xl_gae32_80ep --compare_torch=/path/LightningDiT

`--config` is gae_jax.main's flag (path or name, `:arg`, `--config.x.y=` overrides, the
same one-line errors). `--stage` (comma-separated) picks from teacher, autoencoder,
dit_train, sampling, latent_cache, fid_features; by default the config's own stage(s)
(a DiT config: dit_train and sampling). Each run warms up (`--warmup`), times `--steps`
calls and writes ONE JSON line (to `--out`, appended, or stdout): img/s, median step time,
FLOPs per image (analytic and from XLA's cost analysis), MFU (no MFU on CPU), compiled and
device peak memory, the targets and the gap. A human summary goes to stderr.

`--sweep=a,b` (or `all`) runs the stage with each switch on and off and prints a table:
compute_dtype, attention_impl (cudnn: GPU only), remat (every policy), scan, donate,
frozen_dtype, disc_dtype and skip_disc (autoencoder; skip_disc times a step before
loss.disc_start with and without the PatchGAN's work), teacher_cache (autoencoder: the
step on cached L_sp targets, `teacher.cache_outputs`, against the one running the VFM), xla_flags (the recommended GPU/TPU
flags, re-run in a child process). `--disc_phase=before` times the autoencoder step the
trainer runs before loss.disc_start (default: after it, the full program).
`--data_only` times the grain input pipeline alone (gae_jax/benchmark/data.py).
`--topology=NAME` prints gae_jax.benchmark.topology.compile_report(config, NAME);
`--compare_torch=PATH` runs gae_jax.benchmark.torch_compare.run(PATH, ...).
"""

import copy
import dataclasses
import json
import os
import subprocess
import sys
import tempfile

from absl import app
from absl import flags
from absl import logging

from gae_jax import main as gae_main  # defines --config (and the trainer CLI's flags)

FLAGS = flags.FLAGS
flags.DEFINE_string("stage", None, "Comma-separated benchmark stages (default: the "
                    "config's own).")
flags.DEFINE_integer("steps", 10, "Timed calls (the median is reported).")
flags.DEFINE_integer("warmup", 2, "Untimed calls before timing (after compiling).")
flags.DEFINE_string("out", None, "Append the JSON lines to this file instead of stdout.")
flags.DEFINE_bool("data_only", False, "Time the grain input pipeline alone.")
flags.DEFINE_string("data_sources", "folder,tfds", "--data_only sources: folder, tfds, "
                    "configured (the config's own data block).")
flags.DEFINE_integer("data_batches", 20, "--data_only: timed batches per source.")
flags.DEFINE_string("topology", None, "Compile for a TPU topology on paper "
                    "(gae_jax.benchmark.topology).")
flags.DEFINE_string("compare_torch", None, "PyTorch reference checkout to time side by side "
                    "(gae_jax.benchmark.torch_compare).")
flags.DEFINE_string("sweep", None, "Switches to run on and off: comma-separated names or "
                    "'all'.")
flags.DEFINE_integer("sample_steps", 250, "sampling stage: grid points of the sampler.")
flags.DEFINE_enum("disc_phase", "after", ["after", "before"],
                  "autoencoder stage: time the step after loss.disc_start (the full "
                  "program) or before it (without the PatchGAN when "
                  "loss.skip_disc_before_start is on).")
flags.DEFINE_enum("teacher", "auto", ["auto", "dinov2", "vgg16_relu5_3", "none"],
                  "autoencoder stage without config.teacher.init_from: the synthesised "
                  "stage-1 teacher's VFM (auto: DINOv2-L for a 16x16 latent grid).")
# gae_jax.main requires --workdir; the benchmark writes no workdir. Its parser checks a
# training run's config (validate_training) unless --dry_run: the benchmark trains nothing
# (the autoencoder stage synthesises the L_sp teacher that check asks for).
FLAGS.set_default("workdir", "")
FLAGS.set_default("dry_run", True)


PHASE = "--disc_phase"   # a sweep entry's key that sets stages.Options.disc_phase


# name -> [(label, {config path: value})]; paths with "{model}" resolve per stage.
def switches(stage: str, platform: str) -> dict:
  """The sweepable switches of `stage` on `platform` (see the module docstring)."""
  from gae_jax.models import layers  # pylint: disable=g-import-not-at-top
  model = "teacher" if stage == "teacher" else "model"
  out = {"compute_dtype": [
      ("bfloat16", {"compute_dtype": "bfloat16", "compute_dtype_cpu": "bfloat16"}),
      ("float32", {"compute_dtype": "float32", "compute_dtype_cpu": "float32"})]}
  if stage in ("latent_cache", "fid_features"):
    return {}   # these stages fix their dtype (float32) and have no model switches
  impls = [("xla", "xla")] + ([("cudnn", "cudnn")] if platform == "gpu" else [])
  out["attention_impl"] = [(k, {f"{model}.attention_impl": v}) for k, v in impls]
  out["remat"] = [(p, {f"{model}.remat": p}) for p in layers.REMAT_POLICIES]
  if stage != "teacher":
    out["scan"] = [("on", {"model.scan": True}), ("off", {"model.scan": False})]
  if stage != "sampling":
    out["donate"] = [("on", {"donate": True}), ("off", {"donate": False})]
  if stage in ("teacher", "autoencoder"):
    out["frozen_dtype"] = [("bfloat16", {"frozen_dtype": "bfloat16"}),
                           ("float32", {"frozen_dtype": "float32"})]
  if stage == "autoencoder":
    out["disc_dtype"] = [("bfloat16", {"disc_dtype": "bfloat16"}),
                         ("float32", {"disc_dtype": "float32"})]
    # Both rows time a step before disc_start: without / with the discriminator's work.
    out["skip_disc"] = [("on", {"loss.skip_disc_before_start": True, PHASE: "before"}),
                        ("off", {"loss.skip_disc_before_start": False, PHASE: "before"})]
    # on: the step reads cached L_sp targets (no VFM / teacher forward); off: runs them
    out["teacher_cache"] = [("on", {"teacher.cache_outputs": True}),
                            ("off", {"teacher.cache_outputs": False})]
  if platform in ("gpu", "tpu"):
    out["xla_flags"] = [("recommended", "env"), ("none", "noenv")]
  return out


def with_overrides(config, overrides: dict):
  """A copy of `config` with {dotted path: value} set (new keys allowed)."""
  c = copy.deepcopy(config)
  with c.unlocked():
    for path, value in overrides.items():
      node = c
      *parents, leaf = path.split(".")
      for p in parents:
        node = node[p]
      node[leaf] = value
  return c


def emit(rec: dict) -> None:
  line = json.dumps(rec, default=str)
  if FLAGS.out:
    with open(FLAGS.out, "a") as f:
      f.write(line + "\n")
  else:
    print(line, flush=True)


def summary(rec: dict) -> str:
  """One human line for stderr."""
  if rec.get("stage") == "input_pipeline":
    return (f"input_pipeline[{rec['source']}]: {rec['img_per_s_per_host']:.1f} img/s per "
            f"host (batch {rec['per_host_batch']}, workers {rec.get('num_workers', '-')})")
  g = lambda x: "-" if x is None else f"{x / 1e9:.2f}"
  mfu = "n/a" if rec["mfu"] is None else f"{100 * rec['mfu']:.1f}%"
  mem = rec["memory"].get("device_peak_bytes_in_use") or rec["memory"].get(
      "compiled_peak_bytes")
  return (f"{rec['stage']}: {rec['img_per_s']:.2f} img/s, step {1e3 * rec['step_time_s']:.1f} "
          f"ms (median of {rec['steps']}), GFLOP/img analytic {g(rec['flops_per_image_analytic'])}"
          f" / XLA {g(rec['flops_per_image_xla'])}, MFU {mfu} ({rec['peak']}), memory "
          f"{'-' if mem is None else f'{mem / 2**20:.1f} MiB'} per device, {rec['devices']} "
          f"x {rec['device_kind']}")


def run_stage(stage: str, config, opts) -> dict:
  from gae_jax.benchmark import stages  # pylint: disable=g-import-not-at-top
  bench = stages.build(stage, config, opts)
  return stages.measure(bench, FLAGS.steps, FLAGS.warmup)


def _child_argv(stage: str, switch_label: str, out_path: str) -> list:
  skip = ("--sweep", "--out", "--stage")
  argv = [a for a in sys.argv[1:] if not a.startswith(skip)]
  return [sys.executable, "-m", "gae_jax.benchmark", *argv, f"--stage={stage}",
          f"--out={out_path}"]


def run_xla_flags(stage: str, label: str, mode: str, platform: str) -> dict:
  """The stage in a child process with (mode 'env') or without the recommended flags."""
  from gae_jax.benchmark import peaks  # pylint: disable=g-import-not-at-top
  env = dict(os.environ)
  for k, v in peaks.recommended_env(platform).items():
    if mode == "env":
      env[k] = v
    else:
      env.pop(k, None)
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "rec.jsonl")
    proc = subprocess.run(_child_argv(stage, label, out), env=env, capture_output=True,
                          text=True)
    if proc.returncode != 0:
      raise RuntimeError(f"xla_flags={label} child failed: {proc.stderr[-2000:]}")
    with open(out) as f:
      return json.loads(f.read().splitlines()[-1])


def sweep(stage: str, config, opts, names: list, platform: str) -> list:
  table = []
  avail = switches(stage, platform)
  wanted = list(avail) if names == ["all"] else names
  for name in wanted:
    if name not in avail:
      logging.warning("sweep: %s is not a switch of %s on %s (available: %s)", name, stage,
                      platform, ", ".join(avail) or "none")
      continue
    for label, overrides in avail[name]:
      if overrides in ("env", "noenv"):
        rec = run_xla_flags(stage, label, overrides, platform)
      else:
        overrides = dict(overrides)
        o = dataclasses.replace(opts, disc_phase=overrides.pop(PHASE, opts.disc_phase))
        rec = run_stage(stage, with_overrides(config, overrides), o)
      rec["sweep"] = {"switch": name, "value": label}
      emit(rec)
      print(summary(rec), file=sys.stderr, flush=True)
      table.append(rec)
  return table


def table_text(rows: list) -> str:
  """The sweep as a markdown table."""
  head = ("| stage | switch | value | img/s | step ms | MFU | GFLOP/img XLA | "
          "compiled peak MiB | device peak MiB |")
  lines = [head, "|" + "---|" * 9]
  for r in rows:
    mem = r["memory"]
    mib = lambda k: "-" if mem.get(k) is None else f"{mem[k] / 2**20:.1f}"
    mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    xla = "-" if r["flops_per_image_xla"] is None else f"{r['flops_per_image_xla'] / 1e9:.3f}"
    lines.append(f"| {r['stage']} | {r['sweep']['switch']} | {r['sweep']['value']} | "
                 f"{r['img_per_s']:.2f} | {1e3 * r['step_time_s']:.1f} | {mfu} | {xla} | "
                 f"{mib('compiled_peak_bytes')} | {mib('device_peak_bytes_in_use')} |")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from gae_jax import console  # pylint: disable=g-import-not-at-top
  console.setup()
  import jax  # pylint: disable=g-import-not-at-top
  from gae_jax.benchmark import peaks  # pylint: disable=g-import-not-at-top
  from gae_jax.benchmark import stages  # pylint: disable=g-import-not-at-top
  if FLAGS.distributed:
    jax.distributed.initialize()
  config = FLAGS.config
  platform = jax.default_backend()
  rec_env = peaks.recommended_env(platform)
  if rec_env:
    print("recommended: " + " ".join(f'{k}="{v}"' for k, v in rec_env.items()),
          file=sys.stderr)
  if FLAGS.topology:
    try:
      from gae_jax.benchmark import topology  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      gae_main._fail(f"--topology needs gae_jax/benchmark/topology.py: {e}")  # pylint: disable=protected-access
    try:
      rec = topology.compile_report(config, FLAGS.topology)
    except (RuntimeError, ValueError) as e:   # no libtpu, unknown topology, bad mesh
      gae_main._fail(f"--topology={FLAGS.topology}: {e}")  # pylint: disable=protected-access
    emit(rec)
    return
  if FLAGS.compare_torch:
    try:
      from gae_jax.benchmark import torch_compare  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      gae_main._fail(f"--compare_torch needs gae_jax/benchmark/torch_compare.py: {e}")  # pylint: disable=protected-access
    for rec in torch_compare.run(FLAGS.compare_torch, config=config, steps=FLAGS.steps,
                                 warmup=FLAGS.warmup):
      emit(rec)
    return
  if FLAGS.data_only:
    from gae_jax.benchmark import data  # pylint: disable=g-import-not-at-top
    try:
      recs = data.run(config, batches=FLAGS.data_batches, warmup=FLAGS.warmup,
                      sources=tuple(s for s in FLAGS.data_sources.split(",") if s))
    except ValueError as e:
      gae_main._fail(str(e))  # pylint: disable=protected-access
    for rec in recs:
      emit(rec)
      print(summary(rec), file=sys.stderr, flush=True)
    return
  names = FLAGS.stage.split(",") if FLAGS.stage else list(
      stages.DEFAULT_STAGES.get(config.stage, ()))
  if not names:
    gae_main._fail(f"config.stage={config.stage!r} has no default benchmark stage; pass "  # pylint: disable=protected-access
                   f"--stage= one of {', '.join(stages.STAGES)}")
  for n in names:
    if n not in stages.STAGES:
      gae_main._fail(f"--stage={n!r} is not a benchmark stage; choose from "  # pylint: disable=protected-access
                     f"{', '.join(stages.STAGES)}")
  opts = stages.Options(sample_steps=FLAGS.sample_steps, teacher=FLAGS.teacher,
                        disc_phase=FLAGS.disc_phase)
  for stage in names:
    try:
      if FLAGS.sweep:
        rows = sweep(stage, config, opts, FLAGS.sweep.split(","), platform)
        print(table_text(rows), file=sys.stderr if not FLAGS.out else sys.stdout,
              flush=True)
        continue
      rec = run_stage(stage, config, opts)
    except ValueError as e:
      gae_main._fail(f"{stage}: {e}")  # pylint: disable=protected-access
    emit(rec)
    print(summary(rec), file=sys.stderr, flush=True)


def run():
  app.run(main, flags_parser=gae_main.parse_flags)


if __name__ == "__main__":
  run()
