r"""PAE tokenizer, DINOv2-L/14-reg + d = 32 spherical latent (shared/PAE_SPEC.md §2-3).

CPU smoke run on the embedded photos (tiny 'mu' PAE, random tiny VFM; SSR/SCR off without
stage 0):
  python -m gae_jax.main --config=configs/pae_d32.py:runlocal --workdir=/tmp/pae
with the stage-0 targets (all five loss terms):
  python -m gae_jax.main --config=configs/pae_refine.py:runlocal --workdir=/tmp/pae_refine
  python -m gae_jax.main --config=configs/pae_d32.py:runlocal,refine=/tmp/pae_refine \
      --workdir=/tmp/pae
ImageNet (a user's DINOv2-with-registers file; stage 0 first):
  python -m gae_jax.main --config=configs/pae_d32.py:weights=/p/dinov2_reg.pth,refine=W0 \
      --workdir=gs://bucket/pae_d32 --config.data.tfds_data_dir=gs://bucket/tfds
Plan only: add --dry_run (per-part parameter counts).
"""

from gae_jax import configs_lib


def get_config(arg=None):
  return configs_lib.pae_config(arg, latent_dim=32)
