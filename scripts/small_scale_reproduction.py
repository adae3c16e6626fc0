r"""SKELETON (not yet run): the small-scale reproduction of issue 6, deliverable 6.

On the embedded photos, measure the paper's directions with the runlocal configs:
  1. lambda_sp = 1 vs 0 -> linear-probe accuracy (paper Tab. 6);
  2. larger sigma_std -> flatter decoder-robustness curve (paper Fig. 4);
  3. latent norm vs KL-VAE bottleneck -> probe / robustness / diagnostics (paper Tab. 7).
Each variant trains `configs/gae_l32.py:runlocal,...` (needs the stage-1 teacher for
lambda_sp > 0: pass --teacher=<teacher workdir>), then runs
`configs/eval_latents.py:runlocal,gae=<run>` and collects metrics.json into
docs/small_scale_reproduction.md with the figures, whatever the numbers are.

  python scripts/small_scale_reproduction.py --out=/tmp/ssr --teacher=/tmp/teacher \
      --doc=docs/small_scale_reproduction.md

TODO (lead): the teacher stage and the autoencoder's teacher wiring are still being built;
fill in `train_variant` once `config.teacher.init_from` is live, then run and commit.
"""

import argparse
import json
import os
import subprocess
import sys

# name -> autoencoder config arg overrides and --config.* flags
VARIANTS = {
    "sp1_sigma0.2": ("runlocal,sigma_std=0.2", {"loss.sp_weight": 1.0}),
    "sp0_sigma0.2": ("runlocal,sigma_std=0.2", {"loss.sp_weight": 0.0}),
    "sp1_sigma0.0": ("runlocal,sigma_std=0.0", {"loss.sp_weight": 1.0}),
    "sp1_sigma0.4": ("runlocal,sigma_std=0.4", {"loss.sp_weight": 1.0}),
    "sp1_kl": ("runlocal,kl", {"loss.sp_weight": 1.0}),
}


def _run(args: list[str]) -> None:
  print("+", " ".join(args), flush=True)
  subprocess.run(args, check=True)


def train_variant(name: str, out: str, teacher: str | None) -> str:
  arg, flags = VARIANTS[name]
  workdir = os.path.join(out, name)
  cmd = [sys.executable, "-m", "gae_jax.main", f"--config=configs/gae_l32.py:{arg}",
         f"--workdir={workdir}"]
  cmd += [f"--config.{k}={v}" for k, v in flags.items()]
  if teacher:
    cmd.append(f"--config.teacher.init_from={teacher}")
  _run(cmd)
  return workdir


def evaluate_variant(workdir: str) -> dict:
  ev = os.path.join(workdir, "eval")
  _run([sys.executable, "-m", "gae_jax.main",
        f"--config=configs/eval_latents.py:runlocal,gae={workdir}", f"--workdir={ev}"])
  with open(os.path.join(ev, "metrics.json")) as f:
    return json.load(f)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", required=True)
  p.add_argument("--teacher", default=None)
  p.add_argument("--doc", default="docs/small_scale_reproduction.md")
  p.add_argument("--variants", default=",".join(VARIANTS))
  a = p.parse_args()
  results = {}
  for name in a.variants.split(","):
    results[name] = evaluate_variant(train_variant(name, a.out, a.teacher))
  # TODO: tables (probe top-1 per variant, robustness rows, latent norms) + figures
  # (overlayed robustness curves) written to a.doc.
  with open(os.path.join(a.out, "all_metrics.json"), "w") as f:
    json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
