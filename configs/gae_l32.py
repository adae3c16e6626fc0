r"""GAE ViT-L autoencoder, d=32 latents (paper main model; docs/method.md, stage 2; Tab. 13).

CPU smoke run on the embedded photos:
  python -m gae_jax.main --config=configs/gae_l32.py:runlocal --workdir=/tmp/gae
ImageNet on a TPU VM pod (all hosts run the same command):
  python -m gae_jax.main --config=configs/gae_l32.py --workdir=gs://bucket/gae_l32 \
      --config.data.tfds_data_dir=gs://bucket/tfds --distributed
Other sizes: `configs/gae_l32.py:variant=B`; ablations: `:sigma_std=0.1`, `:kl`.
"""

from gae_jax import configs_lib


def get_config(arg=None):
  return configs_lib.autoencoder_config(arg, latent_dim=32)
