r"""PAE stage 0: VFM prior refinement, the targets of SSR / SCR (shared/PAE_SPEC.md §3.4).

CPU smoke run (a seeded random tiny DINOv2 stands in for the VFM; embedded photos):
  python -m gae_jax.main --config=configs/pae_refine.py:runlocal --workdir=/tmp/pae_refine
then stage 1 with it:
  python -m gae_jax.main --config=configs/pae_d32.py:runlocal,refine=/tmp/pae_refine \
      --workdir=/tmp/pae
ImageNet with DINOv2-L/14-reg (a user's weights file):
  python -m gae_jax.main --config=configs/pae_refine.py:weights=/path/dinov2_reg.pth \
      --workdir=gs://bucket/pae_refine --config.data.tfds_data_dir=gs://bucket/tfds
AnyUp is not available: H_ref is a Gaussian low-pass of the 16 x 16 VFM grid
(config.refine.lowpass_sigma / lowpass_strength), a documented deviation.
"""

from gae_jax import configs_lib


def get_config(arg=None):
  return configs_lib.pae_refine_config(arg, latent_dim=32)
