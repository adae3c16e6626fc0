r"""`stage = "sample"` for any DiT checkpoint, e.g. the authors' released `.pt` files.

The paper's settings are chosen by `latent_dim` and `epochs` (SDE without CFG by default,
with the released last step; `cfg`: Euler ODE with CFG w=2.5 / interval 0.25 at 80
epochs, w=3.3 / interval 0.3 at 800 epochs; shift 0.4 for d=32, 0.5 for d=64; the d=64
CFG scale / interval are ours, the paper gives none). `ablation`: the paper's App. H
protocol (Euler ODE, 250 steps, no CFG, shift 0.7, random labels). 50k class-uniform
samples (random labels with `ablation`) -> .npz (uint8 NHWC, `arr_0`, the ADM evaluator's
layout) + a PNG grid:
  python -m gae_jax.main --config=configs/sample.py:latent_dim=32,epochs=800,cfg,\
ckpt=/ckpt/gae_dit_d32_800ep.pt,tokenizer=/ckpt/gae_d32_inference.ckpt \
      --config.dit.stats=/ckpt/latents_stats.pt --workdir=/tmp/samples_d32_800ep
A gae_jax flow run works the same way (its GAE and stats are found from its cache):
  python -m gae_jax.main --config=configs/sample.py:runlocal,ckpt=/tmp/s3/dit \
      --workdir=/tmp/s3/samples
The DiT configs offer the same through their `sample` arg
(`configs/dit_xl_gae32_800ep.py:sample,cfg,ckpt=...`).
"""

from gae_jax import configs_lib


def get_config(arg=None):
  a = configs_lib.parse_arg(arg, runlocal=False, latent_dim=32, epochs=800, cfg=False,
                            ablation=False, ckpt="", tokenizer="", gae="",
                            num_samples=50_000)
  return configs_lib.sample_config(a, latent_dim=a.latent_dim, epochs=a.epochs)
