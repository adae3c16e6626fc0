r"""Entry point: flags -> config -> the trainer named by `config.stage`.

  python -m gae_jax.main --config=configs/gae_l32.py:runlocal --workdir=/tmp/gae
  python -m gae_jax.main --config=configs/gae_l32.py --workdir=gs://... --distributed
  python -m gae_jax.main --config=configs/gae_l32.py --workdir=/tmp/plan --dry_run

`--config` takes a path or, from any directory, a name from the checkout's configs/
(`--config=gae_l32:runlocal`). Every flag or config error (unknown `--config.x.y` field or
`:arg`, ignored argument combinations, out-of-range values, a batch the mesh cannot split)
is one line on stderr, `error: ...`, with exit code 2.
"""

import importlib
import importlib.util
import json
import pathlib
import re
import sys

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags

from gae_jax import configs_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Config file or name, e.g. configs/gae_l32.py:runlocal or gae_l32:runlocal",
    lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and images go.")
flags.DEFINE_bool("dry_run", False, "Build everything abstractly, write plan.json, exit.")
flags.DEFINE_bool("distributed", False,
                  "Call jax.distributed.initialize() (multi-host TPU/GPU pods).")
flags.DEFINE_string("coordinator_address", None,
                    "--distributed: host:port of process 0 (default: auto-detect).")
flags.DEFINE_integer("num_processes", None,
                     "--distributed: number of processes (default: auto-detect).")
flags.DEFINE_integer("process_id", None,
                     "--distributed: this process's index (default: auto-detect).")
flags.mark_flags_as_required(["config", "workdir"])

# config.stage -> trainer module (each has train_and_evaluate(config, workdir) and plan(config))
STAGES = {
    "teacher": "gae_jax.trainers.teacher",
    "autoencoder": "gae_jax.trainers.autoencoder",
    "cache_latents": "gae_jax.trainers.cache_latents",
    "flow": "gae_jax.trainers.flow",
    "sample": "gae_jax.trainers.sample",
    "eval": "gae_jax.trainers.evaluate",
    "demo": "gae_jax.trainers.demo",
    "pae_refine": "gae_jax.trainers.pae_refine",
    "pae": "gae_jax.trainers.pae",
}


# The source checkout's configs/ (an editable install, `pip install -e .`, keeps the package
# in the checkout, so names resolve from any working directory).
CONFIGS_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"


def config_names() -> list[str]:
  """Names `--config` accepts without a path: the stems of CONFIGS_DIR/*.py."""
  return sorted(p.stem for p in CONFIGS_DIR.glob("*.py") if not p.name.startswith("_"))


def resolve_config(name: str) -> pathlib.Path:
  """'gae_l32' -> CONFIGS_DIR/gae_l32.py; a value with '/' or '.py' is a path (from the cwd).

  Raises ValueError naming the value and listing the available names when no file exists.
  """
  bare = "/" not in name and not name.endswith(".py")
  path = CONFIGS_DIR / f"{name}.py" if bare else pathlib.Path(name)
  if path.is_file():
    return path
  names = config_names()
  known = (f"Available names: {', '.join(names)}" if names else
           f"No configs/ beside the installed package ({CONFIGS_DIR}): install with "
           "`pip install -e .` from a checkout, or pass a path")
  where = "" if bare else f" (from {pathlib.Path.cwd()})"
  raise ValueError(f"config {name!r} not found{where}."
                   f"{configs_lib.did_you_mean(pathlib.Path(name).stem, names)} {known}")


class _ConfigFile(flags.ArgumentParser):
  """`--config=PATH_OR_NAME[:arg]` -> the locked `get_config(arg)`.

  Replaces ml_collections' file parser on the `config` flag (its _ConfigFlag still applies
  the `--config.x.y` overrides): a name resolves via `resolve_config`, and a missing file or
  a ValueError from `get_config` stays a one-line ValueError (no embedded traceback).
  """

  last_config = None  # the config before overrides, for naming an unknown override field

  def __init__(self, name: str):
    self.name = name

  def flag_type(self):
    return "config object"

  def parse(self, argument):
    name, sep, arg = str(argument).partition(":")
    path = resolve_config(name)
    spec = importlib.util.spec_from_file_location(f"{self.name}_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
      raise ValueError(f"{path} defines no get_config()")
    config = module.get_config(arg) if sep else module.get_config()
    if callable(getattr(config, "lock", None)):
      config.lock()
    _ConfigFile.last_config = config
    return config


FLAGS["config"].parser = _ConfigFile("config")


def _override_error(argv, config) -> str | None:
  """'--config.optim.lrr: unknown field ... Did you mean 'lr'?' for the first override in
  argv whose path is not in `config`; None when every path exists."""
  for a in argv[1:]:
    m = re.match(r"--?(?:no)?config\.([^=]+)", a)
    if not m or config is None:
      continue
    node, where = config, "config"
    for part in m.group(1).split("."):
      if isinstance(node, (ml_collections.ConfigDict, dict)):
        if part not in node:
          keys = [str(k) for k in node.keys()]
          hint = configs_lib.did_you_mean(part, keys) or f" Known: {', '.join(sorted(keys))}"
          return f"--config.{m.group(1)}: unknown field {part!r} in {where}.{hint}"
        node = node[part]
      elif isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
        node = node[int(part)]
      else:
        return (f"--config.{m.group(1)}: {where} is a {type(node).__name__}, it has no "
                f"field {part!r}")
      where = f"{where}.{part}"
  return None


def _fail(message: str) -> None:
  """One line on stderr, exit code 2 (a usage error)."""
  print("error: " + " ".join(str(message).split()), file=sys.stderr)
  sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
  """`app.run` flags parser: absl flags + config loading, overrides and
  `configs_lib.validate`; any error -> `_fail` (one line, exit 2)."""
  try:
    rest = FLAGS(argv)
    configs_lib.validate(FLAGS.config)
    if not FLAGS.dry_run:
      configs_lib.validate_training(FLAGS.config)
    if FLAGS.config.stage not in STAGES:
      raise ValueError(f"config.stage={FLAGS.config.stage!r} is not one of {sorted(STAGES)}")
  except (flags.Error, ValueError) as e:
    _fail(str(e))
  except (AttributeError, KeyError) as e:  # ml_collections: an unknown --config.x.y field
    _fail(_override_error(argv, _ConfigFile.last_config) or repr(e))
  return rest


def trainer_for(stage: str):
  if stage not in STAGES:
    raise ValueError(f"config.stage={stage!r} is not one of {sorted(STAGES)}")
  return importlib.import_module(STAGES[stage])


def _check_mesh_and_batch(config) -> None:
  """config.mesh fits the devices and config.batch_size splits over its batch shards and
  processes (gae_jax/sharding.py; the trainers check the same later)."""
  from gae_jax import sharding  # pylint: disable=g-import-not-at-top
  if "mesh" not in config or "batch_size" not in config:
    return
  try:
    mesh = sharding.make_mesh(config.mesh)
    rules = config.get("sharding_rules") or configs_lib.DEFAULT_SHARDING_RULES
    sharding.global_batch_check(config.batch_size, mesh, sharding.rules_from_config(rules))
  except ValueError as e:
    _fail(str(e))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from gae_jax import console  # pylint: disable=g-import-not-at-top
  console.setup()  # quiet library logs unless --verbosity; persistent XLA compilation cache
  from gae_jax import paths  # pylint: disable=g-import-not-at-top
  paths.configure_cloud_storage()  # gs:// via gcsfs; STORAGE_EMULATOR_HOST honoured
  if FLAGS.distributed:
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes,
                               process_id=FLAGS.process_id)
  config = FLAGS.config
  _check_mesh_and_batch(config)
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
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
