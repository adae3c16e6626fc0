"""The command line: config errors are one line with exit code 2, configs resolve by name.

The CLI tests run `python -m gae_jax.main` (a few seconds each: jax's import); the rest call
`configs_lib.parse_arg` / `validate` and `gae_jax.main`'s helpers directly.
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

from gae_jax import configs_lib
from gae_jax import main as main_lib

REPO = pathlib.Path(__file__).resolve().parent.parent


def _main(args, cwd):
  return subprocess.run([sys.executable, "-m", "gae_jax.main", *args], cwd=cwd,
                        capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})


def _one_error_line(r) -> str:
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
  assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
  return lines[0]


def test_mistyped_override_is_one_line_with_suggestion(tmp_path):
  r = _main(["--config=configs/gae_l32.py:runlocal", "--config.optim.lrr=1",
             f"--workdir={tmp_path}", "--dry_run"], REPO)
  line = _one_error_line(r)
  assert "--config.optim.lrr" in line and "Did you mean 'lr'?" in line
  assert not (tmp_path / "plan.json").exists()


def test_runlocal_with_variant_names_both(tmp_path):
  r = _main(["--config=gae_l32:runlocal,variant=S", f"--workdir={tmp_path}", "--dry_run"],
            tmp_path)
  line = _one_error_line(r)
  assert "'runlocal'" in line and "'variant'" in line


def test_out_of_range_override_and_missing_config_are_one_line(tmp_path):
  line = _one_error_line(_main(["--config=gae_l32:runlocal", "--config.optim.lr=-0.001",
                                f"--workdir={tmp_path}", "--dry_run"], tmp_path))
  assert "config.optim.lr=-0.001 must be > 0" in line
  # A relative path that does not exist from the working directory: named, with the names.
  line = _one_error_line(_main(["--config=configs/gae_l23.py", f"--workdir={tmp_path}"],
                               tmp_path))
  assert "'configs/gae_l23.py' not found" in line and "Did you mean 'gae_l32'?" in line
  assert "gae_l32, gae_l64" in line


def test_config_by_name_from_another_directory(tmp_path):
  r = _main(["--config=gae_l32", f"--workdir={tmp_path}", "--dry_run"], tmp_path)
  assert r.returncode == 0, r.stderr[-2000:]
  plan = json.load(open(tmp_path / "plan.json"))
  assert plan["batch"]["global"] == 1024          # gae_l32.py's default, not runlocal's 8
  assert round(plan["params"]["encoder"] / 1e6) == 310   # ViT-L (paper Tab. 13: 310.38M)


def test_bad_arg_key_is_named_with_suggestion():
  with pytest.raises(ValueError, match=r"unknown config arg 'varaint'.*Did you mean 'variant'"):
    configs_lib.autoencoder_config("runlocal,varaint=S", latent_dim=32)
  with pytest.raises(ValueError, match=r"'zzz'.* Known: .*runlocal"):
    configs_lib.dit_config("zzz", latent_dim=32, epochs=80)


@pytest.mark.parametrize("arg, match", [
    ("variant", r"'variant' needs a value"),                 # bare name for a string arg
    ("latent_dim=2.5", r"latent_dim='2.5' is not an integer"),   # no silent truncation
    ("sigma_std=abc", r"sigma_std='abc' is not a number"),
    ("kl=maybe", r"kl='maybe' is not a boolean"),
    ("kl,kl", r"'kl' is given twice"),
    ("runlocal,source=folder", r"'runlocal' and 'source' cannot be combined"),
])
def test_parse_arg_rejects(arg, match):
  with pytest.raises(ValueError, match=match):
    configs_lib.autoencoder_config(arg, latent_dim=32)


def test_parse_arg_values_and_exclusive_pairs():
  a = configs_lib.parse_arg("n=3,x=0.5,s=hi,b", n=1, x=1.0, s="", b=False, c=False)
  assert (a.n, a.x, a.s, a.b, a.c) == (3, 0.5, "hi", True, False)
  assert isinstance(a.x, float) and configs_lib.parse_arg("x=2", x=1.0).x == 2.0
  with pytest.raises(ValueError, match=r"'b' and 'n' cannot be combined"):
    configs_lib.parse_arg("n=3,b", n=1, b=False, exclusive=[("b", "n")])
  assert configs_lib.parse_arg("n=3", n=1, b=False, exclusive=[("b", "n")]).n == 3
  with pytest.raises(ValueError, match=r"'runlocal' and 'variant'"):
    configs_lib.dit_config("runlocal,variant=XL/1", latent_dim=32, epochs=80)


@pytest.mark.parametrize("field, value, match", [
    ("optim.lr", -1e-4, r"config.optim.lr=-0.0001 must be > 0"),
    ("disc_optim.b2", 1.0, r"config.disc_optim.b2=1.0 must be in \[0, 1\)"),
    ("optim.schedule", "cos", r"config.optim.schedule='cos' must be"),
    ("batch_size", 0, r"config.batch_size=0 must be > 0"),
    ("model.sigma_std", -0.1, r"config.model.sigma_std=-0.1 must be >= 0"),
    ("model.variant", "l", r"config.model.variant='l' is not a model size. Did you mean 'L'"),
    ("model.decoder_variant", "XXL", r"decoder_variant='XXL' is not a model size"),
    ("data.image_size", 60, r"config.data.image_size=60 must be a multiple of .*=8"),
])
def test_validate_names_the_bad_value(field, value, match):
  c = configs_lib.autoencoder_config("runlocal", latent_dim=32)
  configs_lib.validate(c)
  *parents, leaf = field.split(".")
  node = c
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(ValueError, match=match):
    configs_lib.validate(c)


def test_validate_checks_the_flow_variant():
  c = configs_lib.dit_config("runlocal", latent_dim=32, epochs=80)
  c.model.variant = "XXL"
  with pytest.raises(ValueError, match=r"variant='XXL'.*Did you mean 'XL'"):
    configs_lib.validate(c)


def test_every_shipped_config_validates():
  names = main_lib.config_names()
  assert {"gae_l32", "teacher_l32", "dit_xl_gae32_800ep", "cache_latents"} <= set(names)
  for name in names:
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", main_lib.CONFIGS_DIR /
                                                  f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    configs_lib.validate(module.get_config())
    try:
      local = module.get_config("runlocal")
    except ValueError as e:            # a config without a runlocal arg (the demo)
      assert "unknown config arg 'runlocal'" in str(e), (name, e)
      continue
    configs_lib.validate(local)


def test_resolve_config(tmp_path, monkeypatch):
  assert main_lib.resolve_config("gae_l32") == main_lib.CONFIGS_DIR / "gae_l32.py"
  monkeypatch.chdir(REPO)
  assert main_lib.resolve_config("configs/gae_l32.py").samefile(
      main_lib.CONFIGS_DIR / "gae_l32.py")
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ValueError, match=r"'gae_l23' not found. Did you mean 'gae_l32'\?"):
    main_lib.resolve_config("gae_l23")
  (tmp_path / "mine.py").write_text("def get_config(arg=None):\n  return None\n")
  assert main_lib.resolve_config("mine.py") == pathlib.Path("mine.py")   # a path, not a name


def test_batch_the_mesh_cannot_split_is_one_line(devices8, capsys):
  c = configs_lib.autoencoder_config("runlocal", latent_dim=32)   # mesh: data over 8 devices
  main_lib._check_mesh_and_batch(c)  # pylint: disable=protected-access
  c.batch_size = 12
  with pytest.raises(SystemExit) as e:
    main_lib._check_mesh_and_batch(c)  # pylint: disable=protected-access
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: config.batch_size=12 is not divisible") and "\n" not in err
