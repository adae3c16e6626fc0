r"""Semantic teacher for d=64 latents: E_sp + D_sp on frozen DINOv2-L/14 (docs/method.md, stage 1).

CPU smoke run (VGG16 relu5_3 features of the embedded photos, 8x8 grid; no DINOv2 needed):
  python -m gae_jax.main --config=configs/teacher_l64.py:runlocal --workdir=/tmp/teacher64
then stage 2 with it:
  python -m gae_jax.main --config=configs/gae_l64.py:runlocal \
      --config.teacher.init_from=/tmp/teacher64 --workdir=/tmp/gae64
ImageNet with DINOv2-L (a user's torch-hub `dinov2_vitl14_pretrain.pth`):
  python -m gae_jax.main --config=configs/teacher_l64.py --workdir=gs://bucket/teacher64 \
      --config.teacher.vfm_weights=/path/dinov2_vitl14_pretrain.pth \
      --config.data.tfds_data_dir=gs://bucket/tfds
Variants: `:paper` (Tab. 13 schedule, L=4 decoder, window 4), `:window=4`,
`:decoder_depth=4`, `:downsampler=svd` (fits the SVD projection instead of training),
`:downsampler=attn|attn_linear`. Plan only: add --dry_run.
"""

from gae_jax import configs_lib


def get_config(arg=None):
  return configs_lib.teacher_config(arg, latent_dim=64)
