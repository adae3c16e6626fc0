r"""`stage = "eval"`: gFID / sFID / IS / precision / recall of a sample set.

Samples: an .npz with uint8 `arr_0` (ADM layout, what the `sample` stage writes), a sample
workdir, `data:<split>` (real images, a baseline) or `dit=<flow run or .pt>` to sample first
(the `sample` stage, then the evaluation: by default the paper's main protocol, SDE without
CFG with the released last step and class-uniform labels, shift/CFG from
`--config.eval.generation.latent_dim/epochs/cfg`; `dit=...,ablation` the App. H ablation
protocol: Euler ODE, 250 steps, no CFG, shift 0.7, random labels). Reference: ADM's
VIRTUAL_imagenet256_labeled.npz, one of our stats files, or (empty) statistics computed
from `config.data` (`eval.generation.reference_split`, cached in ~/.cache/gae_jax/fid_refs).
IS needs Inception params with the classifier: `inception=<pt_inception-2015-12-05.pth>`.

  python -m gae_jax.main --config=configs/eval_generation.py:samples=/runs/s/samples.npz,\
reference=/data/VIRTUAL_imagenet256_labeled.npz --workdir=/runs/s/eval
  # CPU smoke run: the embedded val crops against seeded train crops of the same photos.
  python -m gae_jax.main --config=configs/eval_generation.py:runlocal --workdir=/tmp/eval_gen
"""

from gae_jax import configs_lib


def get_config(arg=None):
  c = configs_lib.eval_config(arg, kind="generation")
  runlocal = "runlocal" in (arg or "").split(",")
  c.data.image_size = 64 if runlocal else 256
  if runlocal:
    c.eval.generation.reference_split = "train"
    c.batch_size = 32
  return c
