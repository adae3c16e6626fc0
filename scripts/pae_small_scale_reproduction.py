r"""PAE's small-scale reproduction on the embedded photos (issue 12, deliverable 6).

Trains, with the `runlocal` configs (CPU minutes each):
  0. stage 0 `pae_refine` once (configs/pae_refine.py:runlocal): the SSR / SCR targets;
  1. tiny PAE tokenizers (configs/pae_d32.py:runlocal,refine=<stage 0>) for the rows of PAE's
     Tab. 2(a) (shared/PAE_SPEC.md §6): none / +SSR / +MCR / +SCR / all three, the weights
     set by --config.loss.{ssr,mcr,scr}_weight: 0, or on (SSR 0.2 and SCR 1.0 as the paper;
     MCR at runlocal's 0.05 with L1-only terms, read from the frozen config: at the paper's 0.5
     the tiny model does not learn, 12.7 dB and two-colour patches);
  2. a GAE (configs/gae_l32.py:runlocal, lambda_sp = 1 with its runlocal teacher) on the same
     budget: PAE's step count and batch, and PAE's GAN start (no GAN within either run);
then evaluates every tokenizer through `tokenizer=PATH` with the `manifold` eval kind (SSC,
LPC, GSQ, eRank; configs/eval_manifold.py:runlocal) and the `reconstruction` kind (PSNR,
LPIPS, rFID; configs/eval_reconstruction.py:runlocal), caches its latents, trains a tiny
LightningDiT on them (configs/dit_xl_gae32_800ep.py:runlocal) and samples it for gFID
(configs/eval_generation.py:runlocal), and writes docs/pae_small_scale_reproduction.md with
its figures. Every number in the document is measured by this script; nothing is typed in
by hand, except the paper's Tab. 2(a) row values quoted for the direction check.

  python scripts/pae_small_scale_reproduction.py --out=/tmp/pae_ssr --seeds=0
  python scripts/pae_small_scale_reproduction.py --out=/tmp/pae_ssr --smoke   # 2-step runs,
      # document under --out (never over the committed one)
  # two processes on one --out (stage 0 / the teacher first, then disjoint variants):
  python scripts/pae_small_scale_reproduction.py --out=O --variants=none,all --no_doc &
  python scripts/pae_small_scale_reproduction.py --out=O --variants=gae,ssr --no_doc &
  python scripts/pae_small_scale_reproduction.py --out=O --variants=   # document only

Runs are resumable: a step whose output exists (finished training, metrics.json, the
cache's stats.npz) is not redone, so a killed run restarts where it stopped, and the
document lists the rows that have not finished. The experiment is frozen as the GAE
reproduction's is (scripts/small_scale_reproduction.py, whose pinning this script reuses):
each command's config is compared with docs/pae_small_scale_reproduction/configs.json and
each drifted field is passed back as --config.FIELD=VALUE (`--unpinned` drops that).
"""

import argparse
import datetime
import importlib.util
import json
import os
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_gae_script():
  """scripts/small_scale_reproduction.py as a module: its runner, timings and pinning."""
  spec = importlib.util.spec_from_file_location(
      "small_scale_reproduction", os.path.join(REPO, "scripts", "small_scale_reproduction.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


ssr = _load_gae_script()
# Paths set per run by this script: never pinned.
ssr.UNPINNED = ssr.UNPINNED + ("refine.init_from",)

REFINE_CFG = "configs/pae_refine.py:runlocal"
PAE_CFG = "configs/pae_d32.py:runlocal"
GAE_CFG = "configs/gae_l32.py:runlocal"
TEACHER_CFG = ssr.TEACHER_CFG
MANIFOLD_CFG = "configs/eval_manifold.py:runlocal"
REC_CFG = "configs/eval_reconstruction.py:runlocal"
CACHE_CFG, DIT_CFG, EVAL_GEN_CFG = ssr.CACHE_CFG, ssr.DIT_CFG, ssr.EVAL_GEN_CFG

# The paper's weights (PAE_SPEC §3): lambda_ssr 0.2, lambda_mcr 0.5, lambda_scr 1.0.
PAPER_WEIGHTS = {"ssr": 0.2, "mcr": 0.5, "scr": 1.0}


def on_weights() -> dict:
  """A regulariser's weight when its row turns it on: the paper's for SSR and SCR, runlocal's
  (frozen config) for MCR, whose paper weight stops the tiny model learning."""
  return dict(PAPER_WEIGHTS, mcr=ssr.PINNING["snapshot"][PAE_CFG]["loss.mcr_weight"])
# name -> (regularisers on, label). `gae` is the GAE on the same budget.
VARIANTS = {
    "none": ((), "PAE, no regulariser"),
    "ssr": (("ssr",), "PAE + SSR"),
    "mcr": (("mcr",), "PAE + MCR"),
    "scr": (("scr",), "PAE + SCR"),
    "all": (("ssr", "mcr", "scr"), "PAE + SSR + MCR + SCR"),
    "gae": (None, "GAE (lambda_sp = 1, sigma_std = 0.2), same steps / batch"),
}
PAE_VARIANTS = ("none", "ssr", "mcr", "scr", "all")
# PAE Tab. 2(a) rows quoted from shared/PAE_SPEC.md §6 (SSC, LPC, GSQ, gFID), for direction.
PAPER_TAB2A = {"none": (0.18, 0.320, 0.19, 7.18), "ssr": (0.29, 0.296, 0.26, 2.74),
               "mcr": (0.23, 0.221, 0.24, 2.53), "scr": (0.21, 0.286, 0.39, 2.63),
               "all": (0.35, 0.170, 0.50, 1.86)}
# metric key -> (label, better: +1 higher / -1 lower, digits)
METRICS = {"ssc": ("SSC", 1, 3), "lpc": ("LPC", -1, 4), "gsq": ("GSQ", 1, 3),
           "erank_ratio": ("eRank / C", 1, 3), "psnr": ("PSNR", 1, 2),
           "lpips": ("LPIPS", -1, 3), "rfid": ("rFID (64)", -1, 1), "gfid": ("gFID (176)", -1, 1)}
# Which metric each regulariser should mainly move (PAE_SPEC §4.5).
OWN_METRIC = {"ssr": "ssc", "mcr": "lpc", "scr": "gsq"}
SMOKE = {"total_steps": 2, "ckpt_every": 2, "image_every": 2, "log_every": 1}


def _budget_flags(smoke: bool) -> dict:
  return dict(SMOKE) if smoke else {}


def _pae_steps() -> tuple[int, int, int]:
  """(total_steps, batch_size, disc_start) of the frozen PAE config: the shared budget."""
  c = ssr.PINNING["snapshot"][PAE_CFG]
  return c["total_steps"], c["batch_size"], c["loss.disc_start"]


def train_refine(out: str, smoke: bool) -> str:
  workdir = os.path.join(out, "refine")
  if not ssr._finished(workdir):     # pylint: disable=protected-access
    ssr._run(ssr._main_cmd(REFINE_CFG, workdir, _budget_flags(smoke)), workdir + ".log")
  return workdir


def train_teacher(out: str, smoke: bool) -> str:
  workdir = os.path.join(out, "teacher")
  if not os.path.exists(os.path.join(workdir, "checkpoints")):
    ssr._run(ssr._main_cmd(TEACHER_CFG, workdir, _budget_flags(smoke)), workdir + ".log")
  return workdir


def train_variant(name: str, seed: int, out: str, smoke: bool) -> str:
  """Trains one tokenizer (resumes an unfinished run); returns its workdir."""
  workdir = os.path.join(out, f"{name}_s{seed}")
  regs = VARIANTS[name][0]
  if regs is None:              # the GAE, on PAE's budget
    steps, batch, disc_start = _pae_steps()
    flags = {"seed": seed, "loss.sp_weight": 1.0, "total_steps": steps, "batch_size": batch,
             "loss.disc_start": disc_start, **_budget_flags(smoke)}
    flags["teacher.init_from"] = train_teacher(out, smoke)
    cmd = ssr._main_cmd(GAE_CFG, workdir, flags)
  else:
    flags = {"seed": seed, **{f"loss.{r}_weight": (w if r in regs else 0.0)
                              for r, w in on_weights().items()}, **_budget_flags(smoke)}
    refine = os.path.join(out, "refine")
    cmd = ssr._main_cmd(PAE_CFG, workdir, flags, f"refine={refine}")
  if not ssr._finished(workdir):
    ssr._run(cmd, workdir + ".log")
  return workdir


def evaluate(workdir: str, config: str, sub: str) -> dict:
  ev = os.path.join(workdir, sub)
  if not os.path.exists(os.path.join(ev, "metrics.json")):
    ssr._run(ssr._main_cmd(config, ev, {}, f"tokenizer={workdir}"), ev + ".log")
  with open(os.path.join(ev, "metrics.json")) as f:
    return json.load(f)


def generation(workdir: str, smoke: bool) -> dict:
  """Latent cache -> tiny LightningDiT (runlocal) -> 176 samples -> gFID vs the train crops."""
  cache, dit, ev = (os.path.join(workdir, n) for n in ("latents", "dit", "eval_generation"))
  if not os.path.exists(os.path.join(cache, "stats.npz")):     # written last, once complete
    ssr._run(ssr._main_cmd(CACHE_CFG, cache, {}, f"tokenizer={workdir}"), cache + ".log")
  if not ssr._finished(dit):
    ssr._run(ssr._main_cmd(DIT_CFG, dit, _budget_flags(smoke), f"cache={cache}"), dit + ".log")
  if not os.path.exists(os.path.join(ev, "metrics.json")):
    flags = {"eval.generation.num_classes": 11}
    if smoke:
      flags.update({"eval.generation.num_samples": 22,
                    "eval.generation.reference_num_images": 22})
    ssr._run(ssr._main_cmd(EVAL_GEN_CFG, ev, flags, f"dit={dit}"), ev + ".log")
  with open(os.path.join(ev, "metrics.json")) as f:
    return json.load(f)


def generation_floor(out: str, smoke: bool) -> dict:
  """FID of the real val crops against the train-crop reference: the floor at this size."""
  ev = os.path.join(out, "gen_floor")
  if not os.path.exists(os.path.join(ev, "metrics.json")):
    flags = ({"eval.generation.num_samples": 22, "eval.generation.reference_num_images": 22}
             if smoke else {})
    ssr._run(ssr._main_cmd(EVAL_GEN_CFG, ev, flags), ev + ".log")
  with open(os.path.join(ev, "metrics.json")) as f:
    return json.load(f)


def _row(manifold: dict, rec: dict, gen: dict | None) -> dict:
  """The numbers of one tokenizer, flat: {metric key: value} (+ LPC per scale)."""
  m = manifold["manifold"]
  r = next(x for x in rec["reconstruction"]["per_scale"] if x["scale"] == 0.0)
  row = dict(ssc=m.get("ssc"), lpc=m.get("lpc"), gsq=m.get("gsq"), gsq_std=m.get("gsq_std"),
             erank=m.get("erank"), erank_ratio=m.get("erank_ratio"),
             lpc_per_scale=m.get("lpc_per_scale"), psnr=r.get("psnr"), lpips=r.get("lpips"),
             rfid=r.get("rfid"), ssim=r.get("ssim"))
  if gen is not None:
    g = gen["generation"]
    row.update(gfid=g["fid"], precision=g.get("precision"), recall=g.get("recall"))
  return row


def collect(out: str, name: str, seeds: list[int]) -> list[dict] | None:
  """Per-seed rows of a variant whose evaluations have all finished, else None."""
  rows = []
  for seed in seeds:
    wd = os.path.join(out, f"{name}_s{seed}")
    paths = [os.path.join(wd, s, "metrics.json") for s in ("eval_manifold", "eval_rec")]
    if not all(os.path.exists(p) for p in paths):
      return None
    loaded = []
    for p in paths:
      with open(p) as f:
        loaded.append(json.load(f))
    gp = os.path.join(wd, "eval_generation", "metrics.json")
    gen = None
    if os.path.exists(gp):
      with open(gp) as f:
        gen = json.load(f)
    row = _row(*loaded, gen)
    row["train"] = train_terms(wd)
    rows.append(row)
  return rows


TRAIN_TERMS = ("l1", "lpips", "ssr", "mcr", "scr", "sp")   # logged, unweighted


def train_terms(workdir: str) -> dict:
  """The loss terms the trainer logged (unweighted) at its first and last logged step."""
  rows = []
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      r = json.loads(line) if line.strip() else {}
      if "loss" in r:
        rows.append(r)
  pick = lambda r: {k: r[k] for k in TRAIN_TERMS if k in r}
  return {"first_step": rows[0]["step"], "first": pick(rows[0]),
          "last_step": rows[-1]["step"], "last": pick(rows[-1])}


# ------------------------------------------------------------------------------------------
# The document.


def _vals(rows: list[dict] | None, key: str) -> list[float]:
  if not rows:
    return []
  return [float(r[key]) for r in rows if r.get(key) is not None]


def _fmt(xs: list[float], digits: int) -> str:
  if not xs:
    return "-"
  if len(xs) == 1:
    return f"{xs[0]:.{digits}f}"
  return f"{np.mean(xs):.{digits}f} ± {np.std(xs, ddof=1):.{digits}f}"


def _better(key: str, a: list[float], b: list[float]) -> bool | None:
  """Is b better than a on `key` (means)? None when either is missing."""
  if not a or not b:
    return None
  return bool((np.mean(b) - np.mean(a)) * METRICS[key][1] > 0)


def _word(ok: bool | None) -> str:
  return {True: "**same direction**", False: "**opposite direction**", None: "not run"}[ok]


def write_figures(results: dict, fig_dir: str) -> dict:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  figs = {}
  names = [n for n in VARIANTS if results.get(n)]
  if not names:
    return figs
  keys = ["ssc", "lpc", "gsq", "erank_ratio", "psnr", "gfid"]
  fig, axes = plt.subplots(1, len(keys), figsize=(3.0 * len(keys), 3.2))
  for ax, key in zip(axes, keys):
    xs = [n for n in names if _vals(results[n], key)]
    ms = [np.mean(_vals(results[n], key)) for n in xs]
    sd = [np.std(_vals(results[n], key), ddof=1) if len(_vals(results[n], key)) > 1 else 0
          for n in xs]
    ax.bar(range(len(xs)), ms, yerr=sd, capsize=3,
           color=["tab:gray" if n == "gae" else "tab:blue" for n in xs])
    ax.set_xticks(range(len(xs)), xs, rotation=45)
    label, sign, _ = METRICS[key]
    if not xs:
      ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes)
      ax.set_yticks([])
    ax.set_title(f"{label} ({'higher' if sign > 0 else 'lower'} better)", fontsize=9)
  fig.suptitle("PAE Tab. 2(a) rows and the GAE on the same budget (embedded photos)")
  figs["bars"] = ssr._save(fig, fig_dir, "metrics_by_variant.png")

  lpc_names = [n for n in names if results[n][0].get("lpc_per_scale")]
  if lpc_names:
    fig, ax = plt.subplots(figsize=(5.0, 3.2))
    for n in lpc_names:
      per = [r["lpc_per_scale"] for r in results[n]]
      rhos = sorted(per[0], key=float)
      ys = np.asarray([[p[k] for k in rhos] for p in per])
      ax.plot([float(k) for k in rhos], ys.mean(0), marker="o", label=n,
              ls="--" if n == "gae" else "-")
    ax.set_xscale("log")
    ax.set_xlabel("rho (eps = rho * ||z||)")
    ax.set_ylabel("LPIPS(D(z +- eps u), D(z))")
    ax.set_title("LPC per scale (lower: smoother decoder)", fontsize=9)
    ax.legend(fontsize=8)
    figs["lpc"] = ssr._save(fig, fig_dir, "lpc_per_scale.png")
  return figs


def write_doc(results: dict, floor: dict | None, figs: dict, doc: str, fig_rel: str,
              seeds: list[int], prov: dict, pae: dict, refine: dict, gae: dict,
              gfid_names: list[str]) -> None:
  n_seeds = len(seeds)
  spread = (f"mean ± standard deviation over {n_seeds} seeds ({', '.join(map(str, seeds))})"
            if n_seeds > 1 else f"one seed ({seeds[0]}), so no spread: read directions only")
  lines = [
      "# PAE: small-scale reproduction of the prior-alignment ablation (Tab. 2(a)) and PAE vs "
      "GAE",
      "",
      "Generated by `python scripts/pae_small_scale_reproduction.py --out=<dir> --seeds="
      f"{','.join(map(str, seeds))}` (do not edit by hand; the script is resumable, rerun it "
      "to finish missing rows). Every command runs with the config frozen in "
      f"[{fig_rel}/configs.json]({fig_rel}/configs.json).",
      "",
      f"Run: commit {prov['commit'][:7]}, {prov['date']}, jax {prov['jax']}; "
      f"{prov['minutes']:.0f} compute minutes recorded over all commands (wall clock of "
      "each command, summed; up to two commands ran at once on a shared 2-core CPU machine "
      "under load from other jobs).",
      "",
      "Rows finished: " + (", ".join(f"`{n}`" for n in VARIANTS if results.get(n)) or "none")
      + "; not finished: " + (", ".join(f"`{n}`" for n in VARIANTS if not results.get(n))
                              or "none") + ". Finish them with `python scripts/"
      "pae_small_scale_reproduction.py --out=<the same dir> --variants=<those>` (resumes "
      "unfinished training from its last checkpoint), then rerun with `--variants=` to "
      "rewrite this page.",
      "",
      "## Setup",
      "",
      "- Data: the 11 embedded photos (scikit-image / scikit-learn); train: random-scale "
      "crops of the top part of each photo, val: fixed crops of the held-out part; the "
      "'class' of a crop is its photo (11 classes).",
      f"- Stage 0: `{REFINE_CFG}` ({refine['total_steps']} steps at batch "
      f"{refine['batch_size']}): projector P_t / de-projector Q_t on the VFM tokens, Gram "
      "loss to a Gaussian low-pass structural target (AnyUp fallback).",
      f"- PAE: `{PAE_CFG},refine=<stage 0>` - `{pae['model.variant']}` DAM / decoder, "
      f"{pae['data.image_size']} px, d = {pae['model.latent_dim']}, {pae['total_steps']} "
      f"steps at batch {pae['batch_size']}, GAN from step {pae['loss.disc_start']} (none "
      "within the run), compressor started from P_t, lr "
      f"{pae['optim.lr']:g}, lambda_lpips {pae['loss.lpips_weight']:g}. Regulariser weights "
      f"0 or on: SSR {on_weights()['ssr']:g} and SCR {on_weights()['scr']:g} as the paper, "
      f"MCR {on_weights()['mcr']:g} (paper 0.5) at 42.5 / 85 degrees cascaded with "
      + ("LPIPS + L1" if pae["loss.mcr.lpips"] else "L1-only") + " terms. With the paper's "
      "0.5 (LPIPS + L1 terms) the tiny model does not learn: an earlier run of this script "
      "(the pre-retune runlocal: lr 2e-3, lambda_lpips 1) gave the all-three row 12.7 dB "
      "and two-colour patches.",
      f"- GAE on the same budget: `{GAE_CFG}` with lambda_sp = 1 (its runlocal teacher, "
      f"`{TEACHER_CFG}`, VGG16 relu5_3 features) and sigma_std = {gae['model.sigma_std']:g}, "
      f"trained for PAE's {pae['total_steps']} steps at batch {pae['batch_size']} with "
      f"PAE's GAN start {pae['loss.disc_start']} (the frozen GAE runlocal: "
      f"{gae['total_steps']} steps at batch {gae['batch_size']}, GAN from "
      f"{gae['loss.disc_start']}). Its latent is {gae['data.image_size'] // gae['model.patch_size']}"
      f"x{gae['data.image_size'] // gae['model.patch_size']}x{gae['model.latent_dim']}, "
      f"the PAE's {pae['vfm.image_size'] // pae['vfm.patch_size']}x"
      f"{pae['vfm.image_size'] // pae['vfm.patch_size']}x{pae['model.latent_dim']} (the VFM "
      "grid).",
      "- Metrics (docs/metrics.md has every formula): `configs/eval_manifold.py:runlocal` - "
      "SSC on SLIC superpixels (no segmentation labels offline; 32 val crops, 8 segments), "
      "LPC on 16 val crops (rho 0.1, 0.5, 1, 2), GSQ (1-NN photo purity of centred pooled "
      "latents) and eRank / C on 176 val crops; `configs/eval_reconstruction.py:runlocal` - "
      "PSNR, LPIPS, rFID on 64 val crops. gFID: latent cache (`configs/cache_latents.py:"
      "runlocal`), tiny LightningDiT (`configs/dit_xl_gae32_800ep.py:runlocal`), 176 "
      "class-balanced SDE samples vs 176 train crops (`configs/eval_generation.py:runlocal`)"
      + (f"; real val crops against the same reference give FID {floor['fid']:.1f} (the "
         "floor at this sample size)." if floor else "."),
      f"- Spread: {spread}.",
      "",
      "## What the random VFM means here",
      "",
      "No DINOv2 weights exist offline, so the frozen VFM of every PAE here is a seeded "
      "random-weight tiny DINOv2 (`config.vfm`: seed "
      f"{pae['vfm.seed']}, patch {pae['vfm.patch_size']} at the {pae['vfm.image_size']} px "
      f"VFM input, width {pae['vfm.width']}, depth {pae['vfm.depth']}, "
      f"{pae['vfm.num_registers']} registers). Consequences: (1) the DAM's cross-attention reads random features: "
      "they carry the image's local colour / texture statistics (a random patch embedding "
      "and random attention layers) but no learned semantics; (2) stage 0 "
      "refines those random tokens, so the SSR target Z_T (its token Gram) is a smoothed "
      "random-feature structure and the SCR target is a random projection of them - "
      "SSR/SCR therefore pull the latent towards the geometry of random features, not "
      "towards DINOv2's semantic prior. A regulariser can still move its own metric "
      "(SSR makes token similarities follow a low-pass image structure, which SLIC "
      "superpixels also follow), but the paper's mechanism (importing a VFM's semantics) "
      "cannot show up; GSQ gains from SCR in particular are not expected. The GAE's "
      "teacher uses VGG16 features (pretrained, offline) instead.",
      "",
  ]

  # Tab. 2(a).
  lines += [
      "## 1. Prior-alignment ablation (PAE Tab. 2(a))",
      "",
      "| SSR | MCR | SCR | SSC ↑ | LPC ↓ | GSQ ↑ | eRank/C ↑ | PSNR ↑ | LPIPS ↓ | rFID ↓ | "
      "gFID ↓ | paper SSC / LPC / GSQ / gFID |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for n in PAE_VARIANTS:
    regs = VARIANTS[n][0]
    marks = " | ".join("✓" if r in regs else "–" for r in ("ssr", "mcr", "scr"))
    rs = results.get(n)
    if not rs:
      lines.append(f"| {marks} | not finished | | | | | | | | "
                   f"{' / '.join(map(str, PAPER_TAB2A[n]))} |")
      continue
    cells = [_fmt(_vals(rs, k), METRICS[k][2])
             for k in ("ssc", "lpc", "gsq", "erank_ratio", "psnr", "lpips", "rfid", "gfid")]
    lines.append(f"| {marks} | " + " | ".join(cells)
                 + f" | {' / '.join(map(str, PAPER_TAB2A[n]))} |")
  lines += ["", "Direction of each row vs `none`, metric by metric (paper: every regulariser "
            "improves SSC, LPC, GSQ and gFID over `none`; each mainly its own metric, "
            "PAE_SPEC §4.5):", "",
            "| row | SSC | LPC | GSQ | gFID | own metric (paper's largest move) |",
            "|---|---|---|---|---|---|"]
  base = results.get("none")
  for n in ("ssr", "mcr", "scr", "all"):
    rs = results.get(n)
    cells = []
    for k in ("ssc", "lpc", "gsq", "gfid"):
      a, b = _vals(base, k), _vals(rs, k)
      ok = _better(k, a, b)
      cells.append("-" if ok is None else
                   f"{np.mean(a):.{METRICS[k][2]}f} -> {np.mean(b):.{METRICS[k][2]}f} "
                   f"{'✓' if ok else '✗'}")
    own = OWN_METRIC.get(n)
    if own is None:
      own_cell = "all metrics better: " + (
          "-" if not rs or not base else
          ("yes" if all(_better(k, _vals(base, k), _vals(rs, k)) for k in
                        ("ssc", "lpc", "gsq") if _vals(rs, k)) else "no"))
    else:
      own_cell = f"{METRICS[own][0]}: {_word(_better(own, _vals(base, own), _vals(rs, own)))}"
    lines.append(f"| +{n.upper() if n != 'all' else 'all three'} | " + " | ".join(cells)
                 + f" | {own_cell} |")
  # Tally.
  tally = [_better(k, _vals(base, k), _vals(results.get(n), k))
           for n in ("ssr", "mcr", "scr", "all") for k in ("ssc", "lpc", "gsq", "gfid")]
  done = [t for t in tally if t is not None]
  lines += ["", f"In total {sum(done)} of {len(done)} (row, metric) comparisons move in the "
            "paper's direction (✓)." if done else "", ""]
  # Training terms as logged (unweighted), first and last logged step.
  lines += ["Training terms as the trainer logged them (unweighted; '-': not computed, its "
            "weight is 0), first -> last logged step:", "",
            "| row | " + " | ".join(TRAIN_TERMS[:5]) + " |", "|---|" + "---|" * 5]
  for n in PAE_VARIANTS:
    rs = results.get(n)
    if not rs:
      continue
    t = rs[0]["train"]
    cells = [(f"{t['first'][k]:.3g} -> {t['last'][k]:.3g}" if k in t["last"] else "-")
             for k in TRAIN_TERMS[:5]]
    lines.append(f"| {n} (steps {t['first_step']} -> {t['last_step']}, seed {seeds[0]}) | "
                 + " | ".join(cells) + " |")
  firsts = [abs(r["train"]["first"][k]) for n in PAE_VARIANTS for r in (results.get(n) or [])
            for k in ("ssr", "scr") if k in r["train"]["first"]]
  lines.append("")
  if firsts and max(firsts) < 1e-4:
    lines += [f"SSR and SCR are at most {max(firsts):.1e} at step 1 in every row that computes "
              "them: the compressor starts from stage 0's projector P_t (`refine."
              "init_compressor`), so the initial latent is the target Z_T itself. The two "
              "regularisers therefore act as anchors that keep the latent near the refined "
              "VFM projection while the reconstruction loss pulls it away.", ""]
  if "bars" in figs:
    lines += [f"![metrics by variant]({fig_rel}/{figs['bars']})", ""]
  if "lpc" in figs:
    lines += [f"![LPC per scale]({fig_rel}/{figs['lpc']})", ""]

  # PAE vs GAE.
  lines += [
      "## 2. PAE vs GAE on the same budget",
      "",
      "| tokenizer | SSC ↑ | LPC ↓ | GSQ ↑ | eRank/C ↑ | PSNR ↑ | LPIPS ↓ | rFID ↓ | "
      "gFID ↓ | precision | recall |",
      "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for n in ("all", "none", "gae"):
    rs = results.get(n)
    if not rs:
      lines.append(f"| {VARIANTS[n][1]} | not finished | | | | | | | | | |")
      continue
    cells = [_fmt(_vals(rs, k), d) for k, d in
             (("ssc", 3), ("lpc", 4), ("gsq", 3), ("erank_ratio", 3), ("psnr", 2),
              ("lpips", 3), ("rfid", 1), ("gfid", 1), ("precision", 2), ("recall", 2))]
    lines.append(f"| {VARIANTS[n][1]} | " + " | ".join(cells) + " |")
  pae_name = "all" if results.get("all") else "none"
  pa, ga = results.get(pae_name), results.get("gae")
  if pa and ga:
    wins = {k: _better(k, _vals(ga, k), _vals(pa, k))
            for k in ("ssc", "lpc", "gsq", "psnr", "gfid")}
    lines += ["", f"{VARIANTS[pae_name][1]} better than the GAE on: "
              + (", ".join(METRICS[k][0] for k, v in wins.items() if v) or "none of them")
              + "; worse on: " + (", ".join(METRICS[k][0] for k, v in wins.items()
                                             if v is False) or "none")
              + ". The paper (PAE_SPEC §7) reports PAE's gFID below GAE's at ImageNet scale; "
              "here the GAE has a pretrained (VGG16) teacher while the PAE's VFM is random, "
              "so this comparison is not the paper's."]
  mins = prov.get("variant_minutes", {})
  lines += ["", "## Timings", "",
            "Wall minutes per command, summed per row (training + evaluations + gFID "
            "pipeline where run; up to two commands at once on the shared machine): "
            + ", ".join(f"`{n}` {m:.1f}" for n, m in mins.items()) + "."]
  lines += [
      "",
      "## Not run / caveats",
      "",
      "- gFID was measured for: " + (", ".join(f"`{n}`" for n in gfid_names) or "no variant")
      + "; rows with '-' in the gFID column were not sampled (time).",
      "- Tiny models (`mu`), 11 source photos, a few hundred steps, 1 seed unless shown: "
      "differences of a few hundredths in SSC / GSQ are within what a second seed would move "
      "(GSQ on 176 crops: one crop is 0.006); read the directions, not the magnitudes.",
      "- SSC uses SLIC superpixels of each 64 px crop (8 segments), not COCO panoptic labels, "
      "so it measures agreement with colour-coherent regions, not objects.",
      "- FIDs on 64-176 images are strongly biased upward; compare them within a table only.",
      "- LPC is lowest for a decoder that ignores its input (a constant decoder scores 0): "
      "read it together with PSNR; a low LPC at a low PSNR is an insensitive decoder, not a "
      "smooth manifold.",
      "- The random-weight VFM (above) is the main reason any row may disagree with the "
      "paper: the regularisers are run as specified, their targets are not DINOv2's.",
      "",
      f"Raw numbers: [{fig_rel}/metrics.json]({fig_rel}/metrics.json).",
      "",
  ]
  with open(doc, "w") as f:
    f.write("\n".join(lines))


def freeze_configs(path: str) -> None:
  """Snapshot of every command this script runs (today's values)."""
  snap = {}
  for cfg in (REFINE_CFG, PAE_CFG, GAE_CFG, TEACHER_CFG, MANIFOLD_CFG, REC_CFG, CACHE_CFG,
              DIT_CFG, EVAL_GEN_CFG):
    snap[cfg] = ssr.resolved_config(*cfg.split(":"))
  snap = {k: {f: v for f, v in c.items() if not ssr._unpinned(f)} for k, c in snap.items()}
  with open(path, "w") as fh:
    json.dump(snap, fh, indent=1, sort_keys=True)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", required=True, help="directory for the runs (resumable)")
  p.add_argument("--seeds", default="0", help="comma-separated training seeds")
  p.add_argument("--variants", default=",".join(VARIANTS),
                 help="comma-separated variants to run now (empty: write the document from "
                      "what has finished under --out)")
  p.add_argument("--gfid", default=",".join(VARIANTS),
                 help="variants that also get a latent cache + tiny DiT + gFID")
  p.add_argument("--smoke", action="store_true",
                 help="2-step training runs and 22-sample gFID: checks the pipeline end to "
                      "end; the document goes under --out unless --doc is given")
  p.add_argument("--no_doc", action="store_true", help="run, but write no document")
  p.add_argument("--unpinned", action="store_true",
                 help="run today's `runlocal` configs instead of the frozen ones")
  p.add_argument("--freeze_configs", action="store_true",
                 help="(new experiment only) snapshot today's configs as the frozen ones")
  p.add_argument("--doc", default="")
  a = p.parse_args()
  t0 = time.time()
  seeds = [int(s) for s in a.seeds.split(",")]
  todo = [v for v in a.variants.split(",") if v]
  gfid = [v for v in a.gfid.split(",") if v]
  for v in todo + gfid:
    if v not in VARIANTS:
      raise SystemExit(f"--variants/--gfid: unknown variant {v!r}; known: {', '.join(VARIANTS)}")
  doc = a.doc or (os.path.join(a.out, "pae_small_scale_reproduction.md") if a.smoke else
                  os.path.join(REPO, "docs", "pae_small_scale_reproduction.md"))
  fig_rel = os.path.splitext(os.path.basename(doc))[0]
  fig_dir = os.path.join(os.path.dirname(os.path.abspath(doc)), fig_rel)
  pin_dir = os.path.join(REPO, "docs", "pae_small_scale_reproduction")
  os.makedirs(fig_dir, exist_ok=True)
  ssr.PINNING["path"] = os.path.join(pin_dir, "configs.json")
  if a.freeze_configs:
    os.makedirs(pin_dir, exist_ok=True)
    freeze_configs(ssr.PINNING["path"])
    print(f"wrote {ssr.PINNING['path']}")
    return
  ssr.PINNING["on"] = not a.unpinned
  with open(ssr.PINNING["path"]) as f:
    ssr.PINNING["snapshot"] = json.load(f)

  os.makedirs(a.out, exist_ok=True)
  if any(VARIANTS[n][0] is not None for n in todo):
    train_refine(a.out, a.smoke)
  for name in todo:
    for seed in seeds:
      wd = train_variant(name, seed, a.out, a.smoke)
      evaluate(wd, MANIFOLD_CFG, "eval_manifold")
      evaluate(wd, REC_CFG, "eval_rec")
      if name in gfid:
        generation(wd, a.smoke)
  if a.no_doc:
    print(f"ran {todo} in {(time.time() - t0) / 60:.1f} min (--no_doc: no document)")
    return
  floor = None       # measured with the first gFID run; read back when it exists
  if set(todo) & set(gfid) or os.path.exists(os.path.join(a.out, "gen_floor", "metrics.json")):
    floor = generation_floor(a.out, a.smoke)["generation"]
  results = {n: collect(a.out, n, seeds) for n in VARIANTS}
  gfid_done = [n for n in VARIANTS if results[n] and all("gfid" in r for r in results[n])]
  minutes = ssr._compute_minutes(a.out)        # every command under --out, once
  variant_minutes = {n: round(ssr._variant_minutes(a.out, n, seeds), 1) for n in VARIANTS
                     if results[n]}
  for stage in ("refine", "teacher"):
    if os.path.isdir(os.path.join(a.out, stage)):
      variant_minutes[stage] = round(ssr._log_minutes(a.out, f"{stage}.log"), 1)
  prov = dict(variant_minutes=variant_minutes, commit=ssr._git_head(), date=datetime.date.today().isoformat(),
              jax=ssr._jax_version(), minutes=round(minutes, 1), pinned=ssr.PINNING["on"],
              pinned_overrides=ssr.PINNING["overrides"],
              unpinned_new_fields=ssr.PINNING["new_fields"], smoke=a.smoke)
  figs = write_figures(results, fig_dir)
  with open(os.path.join(fig_dir, "metrics.json"), "w") as f:
    json.dump(dict(seeds=seeds, variants={n: VARIANTS[n][1] for n in VARIANTS},
                   paper_tab2a=PAPER_TAB2A, results=results, floor=floor, provenance=prov),
              f, indent=1)
  snap = ssr.PINNING["snapshot"]
  write_doc(results, floor, figs, doc, fig_rel, seeds, prov, snap[PAE_CFG], snap[REFINE_CFG],
            snap[GAE_CFG], gfid_done)
  print(f"wrote {doc} and {fig_dir}/ in {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
  main()
