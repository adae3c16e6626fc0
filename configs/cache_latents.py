r"""Latent cache for stage 3: z = mu of every image and its horizontal flip (docs/method.md).

ImageNet train set (ADM center crop 256), all hosts run the same command; each process
writes its own ArrayRecord shards, and a rerun resumes after the last finished shard:
  python -m gae_jax.main --config=configs/cache_latents.py:tokenizer=/runs/gae_l32 \
      --workdir=/data/latents/gae_l32 --config.data.tfds_data_dir=gs://bucket/tfds \
      --distributed
CPU smoke run on the embedded photos (1024 random crops, shards of 256):
  python -m gae_jax.main --config=configs/cache_latents.py:runlocal,tokenizer=/tmp/s3/gae \
      --workdir=/tmp/s3/latents
--workdir is the cache directory (point a flow config's `data.cache_dir` / `cache=` arg at
it). The GAE may be a gae_jax workdir, a converted dir or the authors' `.ckpt`.
"""

from gae_jax import configs_lib


def get_config(arg=None):
  return configs_lib.cache_latents_config(arg)
