r"""`stage = "eval"`, kind `manifold`: PAE's latent-manifold metrics of any tokenizer (GAE,
PAE, KL) - SSC (spatial structure coherence), LPC (local perceptual continuity), GSQ (global
semantic quality) and eRank. Formulas and our choices: docs/metrics.md.

  python -m gae_jax.main --config=configs/eval_manifold.py:tokenizer=/runs/gae_l32,source=tfds \
      --workdir=/runs/gae_l32/eval_manifold
  # SSC on COCO-panoptic-style label maps instead of superpixels:
  python -m gae_jax.main --config=configs/eval_manifold.py:tokenizer=/runs/gae_l32,source=tfds \
      --config.eval.manifold.segmentation=labels \
      --config.eval.manifold.label_images=/data/coco/val2017 \
      --config.eval.manifold.label_maps=/data/coco/panoptic_val2017 --workdir=...
  # CPU smoke run on the embedded photos:
  python -m gae_jax.main --config=configs/eval_manifold.py:runlocal,tokenizer=/tmp/gae \
      --workdir=/tmp/eval_manifold
"""

from gae_jax import configs_lib


def get_config(arg=None):
  return configs_lib.eval_config(arg, kind="manifold")
