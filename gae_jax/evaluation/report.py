"""Evaluation outputs in a workdir: metrics.json, matplotlib PNG plots and a short report.md.

`write_report(workdir, results)` takes the dict the eval stage assembles:
  {"reconstruction": {"per_scale": [row]}, "robustness": {"per_scale": [rows]},
   "generation": {...}, "linear_probe": {head: {...}}, "diagnostics": {...},
   "images": {name: uint8 (N, H, W, 3) or (H, W, 3)}, "meta": {...}}
Arrays (curves, images) are plotted / saved as PNG; metrics.json holds every scalar and
short list (non-finite floats as null) and never an image.
"""

import io
import json
import math
import os
from typing import Any

import numpy as np

from gae_jax import metrics as metrics_lib
from gae_jax import paths


def _jsonable(x: Any) -> Any:
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()
            if not (isinstance(v, np.ndarray) and v.size > 4096)}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return _jsonable(x.tolist())
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (float, np.floating)):
    x = float(x)
    return x if math.isfinite(x) else None
  if isinstance(x, (str, int, bool)) or x is None:
    return x
  return str(x)


def write_metrics(workdir: str, results: dict) -> str:
  path = os.path.join(workdir, "metrics.json")
  clean = _jsonable({k: v for k, v in results.items() if k != "images"})
  paths.write_text(path, json.dumps(clean, indent=2, allow_nan=False))
  return path


def _savefig(fig, path: str) -> None:
  """fig as a PNG (100 dpi) at `path`, local or remote (gs://...), atomically."""
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=100)
  paths.write_bytes(path, buf.getvalue())

def _finish(plt, fig, path: str, title: str = "") -> str:
  """Suptitle (if any), tight layout, save as PNG at `path`, close; returns `path`."""
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  _savefig(fig, path)
  plt.close(fig)
  return path



def _plt():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def plot_robustness(path: str, rows: list[dict]) -> str:
  """rFID / PSNR / SSIM / LPIPS of D(mu + s eps) against s (paper Fig. 4)."""
  plt = _plt()
  keys = [k for k in ("rfid", "psnr", "ssim", "lpips") if all(k in r for r in rows)]
  fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.0), squeeze=False)
  s = [r["scale"] for r in rows]
  for ax, k in zip(axes[0], keys):
    ax.plot(s, [r[k] for r in rows], "o-")
    ax.set_xlabel("noise scale s")
    ax.set_title({"rfid": "rFID", "psnr": "PSNR (dB)", "ssim": "SSIM", "lpips": "LPIPS"}[k])
    ax.grid(alpha=0.3)
  fig.suptitle("Decoder robustness: D(mu + s * eps)")
  fig.tight_layout()
  _savefig(fig, path)
  plt.close(fig)
  return path


def plot_curve(path: str, x, ys: dict[str, Any], *, xlabel: str, ylabel: str,
               title: str) -> str:
  plt = _plt()
  fig, ax = plt.subplots(figsize=(4.5, 3.2))
  for name, y in ys.items():
    ax.plot(x if x is not None else np.arange(len(y)), y, "o-" if len(y) < 30 else "-",
            label=name)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  if len(ys) > 1:
    ax.legend()
  fig.tight_layout()
  _savefig(fig, path)
  plt.close(fig)
  return path


def save_image(path: str, images: np.ndarray, ncols: int | None = None) -> str:
  """A uint8 (H, W, 3) image or an (N, H, W, 3) grid (float [-1, 1] is converted)."""
  x = np.asarray(images)
  if x.dtype != np.uint8:
    x = metrics_lib.to_uint8(x)
  if x.ndim == 4:
    x = metrics_lib.image_grid(x, ncols=ncols)
  metrics_lib.save_png(path, x)
  return path


def _fmt(v: Any) -> str:
  if isinstance(v, float):
    return f"{v:.4g}"
  return str(v)


def _table(rows: list[dict], keys: list[str]) -> list[str]:
  keys = [k for k in keys if any(k in r for r in rows)]
  out = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
  out += ["| " + " | ".join(_fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
  return out


def write_report(workdir: str, results: dict) -> dict[str, str]:
  """Writes metrics.json, the PNGs and report.md; returns {name: path}."""
  paths.makedirs(workdir)
  files = {"metrics": write_metrics(workdir, results)}
  md = ["# Evaluation report", ""]
  meta = results.get("meta", {})
  if meta:
    md += [f"- {k}: `{_fmt(v)}`" for k, v in meta.items()] + [""]
  for note in results.get("notes", []):
    md.append(f"> {note}")
  md.append("")

  if "reconstruction" in results:
    md += ["## Reconstruction", "",
           "rFID against the same center-cropped images; PSNR / SSIM / LPIPS per image, "
           "averaged. Reconstructions are clipped and quantised to uint8.", ""]
    md += _table(results["reconstruction"]["per_scale"],
                 ["num_images", "rfid", "psnr", "ssim", "lpips"]) + [""]
  if "robustness" in results:
    rows = results["robustness"]["per_scale"]
    files["robustness"] = plot_robustness(os.path.join(workdir, "robustness.png"), rows)
    md += ["## Decoder robustness (paper Fig. 4)", "",
           "Metrics of D(mu + s * eps), eps ~ N(0, I).", ""]
    md += _table(rows, ["scale", "rfid", "psnr", "ssim", "lpips"])
    md += ["", "![robustness](robustness.png)", ""]
  if "generation" in results:
    g = results["generation"]
    md += ["## Generation", ""]
    md += _table([g], ["num_samples", "fid", "sfid", "inception_score", "precision",
                       "recall"]) + [""]
    for k in ("inception_score_note", "precision_recall_note", "reference", "samples"):
      if k in g:
        md.append(f"- {k}: {g[k]}")
    md.append("")
  if "linear_probe" in results:
    lp = results["linear_probe"]
    rows = [{"head": h, **{k: v for k, v in r.items() if k != "loss_curve"}}
            for h, r in lp.items()]
    md += ["## Linear probe (paper App. I)", ""]
    md += _table(rows, ["head", "top1", "train_top1", "val_loss", "num_train", "num_val",
                        "num_params"]) + [""]
    curves = {h: r["loss_curve"] for h, r in lp.items() if r.get("loss_curve")}
    if curves:
      files["probe_loss"] = plot_curve(os.path.join(workdir, "probe_loss.png"), None,
                                        curves, xlabel="epoch", ylabel="train loss",
                                        title="Linear probe")
      md += ["![probe loss](probe_loss.png)", ""]
  if "diagnostics" in results:
    d = results["diagnostics"]
    md += ["## Latent-manifold diagnostics", ""]
    scal = {k: v for k, v in d.items() if isinstance(v, (int, float))}
    md += [f"- {k}: {_fmt(v)}" for k, v in scal.items()] + [""]
    if "spatial_similarity" in d:
      ss = d["spatial_similarity"]
      files["spatial"] = plot_curve(os.path.join(workdir, "spatial_similarity.png"),
                                    ss["distance"], {"S(r)": ss["similarity"]},
                                    xlabel="token distance r", ylabel="mean cosine",
                                    title="Latent similarity vs distance")
      md += ["![spatial](spatial_similarity.png)", ""]
    if "decoder_gain" in d:
      dg = d["decoder_gain"]
      md += _table([{"scale": s, "gain": g} for s, g in dg.items()], ["scale", "gain"])
      md.append("")
  if "manifold" in results:
    m = results["manifold"]
    md += ["## Latent manifold (PAE's SSC, LPC, GSQ, eRank)", "",
           "SSC higher is better, LPC lower, GSQ higher; erank_ratio = eRank / channels "
           "(docs/metrics.md).", ""]
    md += _table([m], ["ssc", "ssc_std", "lpc", "gsq", "gsq_std", "erank", "erank_ratio"])
    fmt = lambda v: (", ".join(f"rho={k}: {_fmt(x)}" for k, x in v.items())
                     if isinstance(v, dict) else _fmt(v))
    md += [""] + [f"- {k}: {fmt(m[k])}" for k in (
        "ssc_segmentation", "ssc_num_images", "ssc_mean_segments", "lpc_per_scale",
        "lpc_num_images", "gsq_classes_per_draw", "num_images") if k in m] + [""]
  for name, img in results.get("images", {}).items():
    files[name] = save_image(os.path.join(workdir, f"{name}.png"), img)
    md += [f"![{name}]({name}.png)", ""]
  path = os.path.join(workdir, "report.md")
  paths.write_text(path, "\n".join(md) + "\n")
  files["report"] = path
  return files


# ------------------------------------------------------------------------------------------
# Training curves and labelled image figures (the demo report, gae_jax/trainers/demo.py).


def markdown_table(rows: list[dict], keys: list[str]) -> list[str]:
  """Markdown table lines of `rows` with the columns `keys` present in any row."""
  return _table(rows, keys)


def read_metrics_jsonl(path: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """A trainer's `metrics.jsonl` (gae_jax/metrics.py MetricWriter) as {key: (steps, values)}.

  A resumed run logs some steps twice: the last value written for a step wins. Steps are
  sorted ascending. A missing file gives {}; a line that is not JSON raises ValueError
  naming the file and line.
  """
  if not paths.path(path).is_file():
    return {}
  per_key: dict[str, dict[int, float]] = {}
  with paths.path(path).open("r") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno} is not a JSON line: {e}") from e
      step = int(row.pop("step"))
      for k, v in row.items():
        if isinstance(v, (int, float)):
          per_key.setdefault(k, {})[step] = float(v)
  out = {}
  for k, d in per_key.items():
    steps = np.asarray(sorted(d), np.int64)
    out[k] = (steps, np.asarray([d[s] for s in steps], np.float64))
  return out


def plot_training_curves(path: str, panels: list[dict]) -> str:
  """One subplot per panel: {"title", "ylabel", "curves": {label: (steps, values)},
  optional "logy"}; panels without any curve are dropped. Returns `path`."""
  plt = _plt()
  panels = [p for p in panels if any(len(s) for s, _ in p["curves"].values())]
  if not panels:
    raise ValueError(f"plot_training_curves({path}): no curve has any point")
  ncols = min(3, len(panels))
  nrows = -(-len(panels) // ncols)
  fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.1 * nrows), squeeze=False)
  for ax in axes.flat[len(panels):]:
    ax.axis("off")
  for ax, p in zip(axes.flat, panels):
    for label, (steps, values) in p["curves"].items():
      if len(steps):
        ax.plot(steps, values, "o-" if len(steps) < 20 else "-", ms=3, label=label)
    if p.get("logy"):
      ax.set_yscale("log")
    ax.set_title(p["title"], fontsize=10)
    ax.set_xlabel("training step")
    ax.set_ylabel(p.get("ylabel", ""))
    ax.grid(alpha=0.3)
    if len(p["curves"]) > 1:
      ax.legend(fontsize=8)
  fig.tight_layout()
  _savefig(fig, path)
  plt.close(fig)
  return path


def _show(ax, image: np.ndarray):
  x = np.asarray(image)
  ax.imshow(x if x.dtype == np.uint8 else metrics_lib.to_uint8(x), interpolation="nearest")
  ax.set_xticks([])
  ax.set_yticks([])


def plot_image_rows(path: str, rows: dict[str, np.ndarray], *, title: str = "",
                    cell: float = 1.4) -> str:
  """Labelled rows of images: {row label: (N, H, W, 3) uint8 or float [-1, 1]}, every row
  the same N. Used for input-vs-reconstruction figures. Returns `path`."""
  plt = _plt()
  n = {len(v) for v in rows.values()}
  if len(n) != 1:
    raise ValueError(f"plot_image_rows({path}): rows have different lengths {sorted(n)}")
  n = n.pop()
  fig, axes = plt.subplots(len(rows), n, figsize=(cell * n + 1.2, cell * len(rows) + 0.4),
                           squeeze=False)
  for r, (label, images) in enumerate(rows.items()):
    for c in range(n):
      _show(axes[r, c], images[c])
    axes[r, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
  return _finish(plt, fig, path, title)


def plot_class_samples(path: str, samples: np.ndarray, class_names: list[str], *,
                       real: np.ndarray | None = None, title: str = "",
                       cell: float = 1.1) -> str:
  """One row per class: an optional real image of the class, then its samples.

  samples: (C, K, H, W, 3) uint8, K samples of each of the C classes (the sample stage's
  class-uniform order reshaped); real: (C, H, W, 3) or None. Returns `path`.
  """
  plt = _plt()
  samples = np.asarray(samples)
  if samples.ndim != 5 or samples.shape[0] != len(class_names):
    raise ValueError(f"plot_class_samples({path}): samples {samples.shape} is not "
                     f"(C={len(class_names)}, K, H, W, 3)")
  c, k = samples.shape[:2]
  off = 0 if real is None else 1
  fig, axes = plt.subplots(c, k + off, figsize=(cell * (k + off) + 1.6, cell * c + 0.5),
                           squeeze=False)
  for i in range(c):
    if real is not None:
      _show(axes[i, 0], real[i])
    for j in range(k):
      _show(axes[i, j + off], samples[i, j])
    axes[i, 0].set_ylabel(class_names[i], rotation=0, ha="right", va="center", fontsize=8)
  if real is not None:
    axes[0, 0].set_title("real", fontsize=8)
  for j in range(k):
    axes[0, j + off].set_title(f"sample {j + 1}", fontsize=8)
  return _finish(plt, fig, path, title)
