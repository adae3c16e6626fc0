r"""GAE ViT-L autoencoder, d=64 latents (paper Tab. 5; docs/method.md, stage 2).

  python -m gae_jax.main --config=configs/gae_l64.py:runlocal --workdir=/tmp/gae64
  python -m gae_jax.main --config=configs/gae_l64.py --workdir=gs://bucket/gae_l64 --distributed
"""

from gae_jax import configs_lib


def get_config(arg=None):
  return configs_lib.autoencoder_config(arg, latent_dim=64)
