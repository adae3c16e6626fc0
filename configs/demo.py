r"""The whole pipeline on the embedded photos in one command (`stage = "demo"`).

  python -m gae_jax.main --config=configs/demo.py --workdir=/tmp/demo

runs, each in its own subdirectory of the workdir and with the README's `runlocal` config
of that stage: the semantic teacher (1_teacher), the GAE with L_sp (2_gae), the latent
cache (3_latents), the DiT (4_dit), class-uniform samples (5_samples) and the evaluation
(6_eval), then writes <workdir>/report.md with its PNGs. Rerunning skips finished stages
and resumes an interrupted one. Every stage config is a field: override any of it with
e.g. --config.dit.total_steps=800 or --config.gae.loss.sp_weight=0.
`:tiny` shrinks every stage to a few steps on 32x32 crops (seconds a stage; tests,
notebooks). Plan only: add --dry_run. The stages and the report: gae_jax/trainers/demo.py.
"""

from gae_jax.trainers import demo


def get_config(arg=None):
  return demo.demo_config(arg)
