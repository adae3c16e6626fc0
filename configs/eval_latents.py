r"""`stage = "eval"`: the latent space of a GAE - linear probe (paper App. I), latent-
manifold diagnostics (spatial structure, local continuity, global semantics) and the
decoder-robustness curve (paper Fig. 4). See docs/metrics.md for every formula.

  python -m gae_jax.main --config=configs/eval_latents.py:tokenizer=/runs/gae_l32,source=tfds \
      --config.eval.probe.train_cache=/runs/latents_train \
      --config.eval.probe.val_cache=/runs/latents_val --workdir=/runs/gae_l32/eval_latents
  # CPU smoke run on the embedded photos:
  python -m gae_jax.main --config=configs/eval_latents.py:runlocal,tokenizer=/tmp/gae \
      --workdir=/tmp/eval_latents
"""

from gae_jax import configs_lib


def get_config(arg=None):
  return configs_lib.eval_config(arg, kind="linear_probe,diagnostics,robustness")
