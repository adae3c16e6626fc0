r"""Entry point: flags -> config -> the trainer named by `config.stage`.

  python -m gae_jax.main --config=configs/gae_l32.py:runlocal --workdir=/tmp/gae
  python -m gae_jax.main --config=configs/gae_l32.py --workdir=gs://... --distributed
  python -m gae_jax.main --config=configs/gae_l32.py --workdir=/tmp/plan --dry_run
"""

import importlib
import json

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/gae_l32.py:runlocal", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and images go.")
flags.DEFINE_bool("dry_run", False, "Build everything abstractly, write plan.json, exit.")
flags.DEFINE_bool("distributed", False,
                  "Call jax.distributed.initialize() (multi-host TPU/GPU pods).")
flags.mark_flags_as_required(["config", "workdir"])

# config.stage -> trainer module (each has train_and_evaluate(config, workdir) and plan(config))
STAGES = {
    "teacher": "gae_jax.trainers.teacher",
    "autoencoder": "gae_jax.trainers.autoencoder",
    "cache_latents": "gae_jax.trainers.cache_latents",
    "flow": "gae_jax.trainers.flow",
    "sample": "gae_jax.trainers.sample",
    "eval": "gae_jax.trainers.evaluate",
}


def trainer_for(stage: str):
  if stage not in STAGES:
    raise ValueError(f"config.stage={stage!r} is not one of {sorted(STAGES)}")
  return importlib.import_module(STAGES[stage])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.distributed:
    jax.distributed.initialize()
  config = FLAGS.config
  trainer = trainer_for(config.stage)
  logging.info("gae_jax %s: %d processes, %d devices (%s)", config.stage,
               jax.process_count(), jax.device_count(), jax.default_backend())
  if FLAGS.dry_run:
    from gae_jax.trainers import common
    plan = trainer.plan(config)
    path = common.write_plan(FLAGS.workdir, plan)
    print(json.dumps(plan, indent=2))
    logging.info("wrote %s", path)
    return
  trainer.train_and_evaluate(config, FLAGS.workdir)


def run():
  app.run(main)


if __name__ == "__main__":
  run()
