r"""LightningDiT-XL/1 on GAE d=32 latents, 800 epochs
(QK-norm, 1M steps, batch 1024; docs/method.md, stage 3; paper Tab. 13).

Train (the cache comes from configs/cache_latents.py; the GAE for sample grids is read
from the cache's manifest):
  python -m gae_jax.main --config=configs/dit_xl_gae32_800ep.py:cache=/data/latents/gae_d32 \
      --workdir=gs://bucket/dit_xl_gae32_800ep --distributed
CPU smoke run (a tiny "mu" DiT on the embedded-photo latent cache of a runlocal GAE):
  python -m gae_jax.main --config=configs/gae_l32.py:runlocal --workdir=/tmp/s3/gae
  python -m gae_jax.main --config=configs/cache_latents.py:runlocal,tokenizer=/tmp/s3/gae \
      --workdir=/tmp/s3/latents
  python -m gae_jax.main --config=configs/dit_xl_gae32_800ep.py:runlocal,cache=/tmp/s3/latents \
      --workdir=/tmp/s3/dit
Parameter count (675.26M as the paper counts it, see plan.json):
  python -m gae_jax.main --config=configs/dit_xl_gae32_800ep.py --workdir=/tmp/plan --dry_run
Sampling (`stage = "sample"`, same file with the `sample` arg): 50k class-uniform
samples, SDE without CFG by default (released last step), `cfg` for the Euler ODE with
the paper's CFG (w=3.3, interval 0.3, shift 0.4):
  python -m gae_jax.main --config=configs/dit_xl_gae32_800ep.py:sample,cfg,\
ckpt=/runs/dit_xl_gae32_800ep --workdir=/runs/dit_xl_gae32_800ep/samples
`ablation` (with `sample`): the paper's App. H ablation protocol (Euler ODE, 250 steps, no
CFG, shift 0.7, random labels).
  (runlocal: `:sample,runlocal,ckpt=/tmp/s3/dit`; the authors' .pt: configs/sample.py)
"""

from gae_jax import configs_lib


def get_config(arg=None):
  return configs_lib.dit_config(arg, latent_dim=32, epochs=800)
