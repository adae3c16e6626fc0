r"""PAE tokenizer, DINOv2-L/14-reg + d = 32 spherical latent (shared/PAE_SPEC.md §2-3).

CPU smoke run on the embedded photos (tiny 'mu' PAE, random tiny VFM; SSR/SCR off without
stage 0):
  python -m gae_jax.main --config=configs/pae_d32.py:runlocal --workdir=/tmp/pae
with the stage-0 targets (all five loss terms):
  python -m gae_jax.main --config=configs/pae_refine.py:runlocal --workdir=/tmp/pae_refine
  python -m gae_jax.main --config=configs/pae_d32.py:runlocal,refine=/tmp/pae_refine \
      --workdir=/tmp/pae
Measured (2 shared CPU cores, load average 3-6): stage 0 200 steps 50 s; this run 160 steps
3 min 45 s (21 s compile), val PSNR 18.3 dB at step 80, 19.2 dB at 160 (LPIPS 0.56) -- the
GAE runlocal reaches 21.8 / 22.9. runlocal departs from the paper's weights (kept by the full
config): lr 6e-3, lambda_lpips 0.25, lambda_mcr 0.05 with L1-only MCR terms (at 0.5 MCR
stops the tiny model learning: ~13 dB; its LPIPS passes tripled the step's FLOPs).
ImageNet (a user's DINOv2-with-registers file; stage 0 first):
  python -m gae_jax.main --config=configs/pae_d32.py:weights=/p/dinov2_reg.pth,refine=W0 \
      --workdir=gs://bucket/pae_d32 --config.data.tfds_data_dir=gs://bucket/tfds
Plan only: add --dry_run (per-part parameter counts).
"""

from gae_jax import configs_lib


def get_config(arg=None):
  return configs_lib.pae_config(arg, latent_dim=32)
