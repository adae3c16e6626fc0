r"""LightningDiT-XL/1 on GAE d=64 latents, 80 epochs
(no QK-norm, 100k steps, batch 1024; docs/method.md, stage 3; paper Tab. 13).

Train (the cache comes from configs/cache_latents.py; the GAE for sample grids is read
from the cache's manifest):
  python -m gae_jax.main --config=configs/dit_xl_gae64_80ep.py:cache=/data/latents/gae_d64 \
      --workdir=gs://bucket/dit_xl_gae64_80ep --distributed
CPU smoke run (a tiny "mu" DiT on the embedded-photo latent cache of a runlocal GAE):
  python -m gae_jax.main --config=configs/gae_l64.py:runlocal --workdir=/tmp/s3/gae64
  python -m gae_jax.main --config=configs/cache_latents.py:runlocal,tokenizer=/tmp/s3/gae64 \
      --workdir=/tmp/s3/latents64
  python -m gae_jax.main --config=configs/dit_xl_gae64_80ep.py:runlocal,cache=/tmp/s3/latents64 \
      --workdir=/tmp/s3/dit64
Parameter count (plan.json; the d=32 model is the paper's 675.26M):
  python -m gae_jax.main --config=configs/dit_xl_gae64_80ep.py --workdir=/tmp/plan --dry_run
Sampling (`stage = "sample"`, same file with the `sample` arg): 50k class-uniform
samples, SDE without CFG by default (released last step), `cfg` for the Euler ODE with
CFG w=2.5, interval 0.25 (both ours: the paper gives no d=64 CFG settings), shift 0.5:
  python -m gae_jax.main --config=configs/dit_xl_gae64_80ep.py:sample,cfg,\
ckpt=/runs/dit_xl_gae64_80ep --workdir=/runs/dit_xl_gae64_80ep/samples
`ablation` (with `sample`): the paper's App. H ablation protocol (Euler ODE, 250 steps, no
CFG, shift 0.7, random labels).
  (runlocal: `:sample,runlocal,ckpt=/tmp/s3/dit64`; the authors' .pt: configs/sample.py)
"""

from gae_jax import configs_lib


def get_config(arg=None):
  return configs_lib.dit_config(arg, latent_dim=64, epochs=80)
