r"""`stage = "eval"`: reconstruction metrics (rFID, PSNR, SSIM, LPIPS) of a GAE.

rFID compares the reconstructions of the center-cropped validation images with those same
images (docs/metrics.md; not the VIRTUAL batch). Add `--config.eval.kind=reconstruction,robustness`
for the decoder-robustness curve of paper Fig. 4 too.

  python -m gae_jax.main --config=configs/eval_reconstruction.py:tokenizer=/runs/gae_l32,\
source=tfds --workdir=/runs/gae_l32/eval_rec
  # CPU smoke run on the embedded photos (64 val crops; `tokenizer=random` for an untrained one):
  python -m gae_jax.main --config=configs/eval_reconstruction.py:runlocal,tokenizer=/tmp/gae \
      --workdir=/tmp/eval_rec
"""

from gae_jax import configs_lib


def get_config(arg=None):
  return configs_lib.eval_config(arg, kind="reconstruction")
