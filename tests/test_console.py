"""Console log filtering and the CLI's compilation-cache choice (gae_jax/console.py)."""

import logging
import os

import jax
import pytest

from gae_jax import console

PKG = os.path.dirname(os.path.abspath(console.__file__))


def _record(path, level=logging.INFO, msg="hello"):
  return logging.LogRecord("absl", level, path, 1, msg, None, None)


def test_quiet_filter_keeps_our_lines_and_warnings_drops_library_info():
  f = console.QuietFilter()
  ours = os.path.join(PKG, "trainers", "common.py")
  library = "/usr/lib/python3/site-packages/orbax/checkpoint/checkpoint_manager.py"
  assert f.filter(_record(ours))
  assert not f.filter(_record(library))
  assert f.filter(_record(library, logging.WARNING))
  assert f.filter(_record(library, logging.ERROR))
  assert not f.filter(_record(os.path.join(PKG, "data", "pipeline.py")))   # a detail module
  assert f.filter(_record(os.path.join(PKG, "data", "pipeline.py"), logging.WARNING))
  assert not f.filter(_record(library, logging.WARNING,
                              "Given directory is read only=/x/checkpoints"))


def test_console_formatter():
  fmt = console.ConsoleFormatter()
  line = fmt.format(_record("/x/y/orbax.py", logging.WARNING, "careful"))
  assert line.endswith(" WARNING: careful (orbax.py:1)")
  assert fmt.format(_record("/a/common.py")).split(" ", 1)[1] == "hello"


@pytest.mark.parametrize("n,want", [(1, "1"), (512, "512"), (2_345, "2.3k"),
                                    (310_380_000, "310.38M")])
def test_fmt_count(n, want):
  assert console.fmt_count(n) == want


def test_module_sizes_splits_containers_not_networks():
  x = lambda *shape: jax.ShapeDtypeStruct(shape, "f4")
  net = lambda n: {"block_0": {"attn": {"q": {"kernel": x(n, 2)}}}, "norm": {"scale": x(2)}}
  ae = {"generator": {"gae": {"encoder": net(3), "projector": {"kernel": x(4, 2)},
                              "decoder": net(5)},
                      "logvar": x()},
        "discriminator": {"conv": {"kernel": x(5)}}}
  assert console.module_sizes(ae) == [("encoder", 8), ("projector", 8), ("decoder", 12),
                                      ("logvar", 1), ("discriminator", 5)]
  # A network's own layers are not split; clashing short names keep their paths.
  teacher = {"downsampler": {"attn": {"q": {"kernel": x(3)}}, "pos": x(2)},
             "decoder": {"attn": {"q": {"kernel": x(4)}}, "pos": x(2)}}
  assert console.module_sizes(teacher) == [("downsampler", 5), ("decoder", 6)]
  two = {"a": {"net": net(1), "pos": x(2)}, "b": {"net": net(3), "pos": x(1)}}
  assert console.module_sizes(two) == [("a/net", 4), ("a/pos", 2), ("b/net", 8), ("b/pos", 1)]
  many = {f"block_{i}": {"k": x(2)} for i in range(10)}
  assert console.module_sizes(many) == [("params", 20)]


def test_compilation_cache_respects_user_dir_then_env(monkeypatch, tmp_path):
  before = (jax.config.jax_compilation_cache_dir,
            jax.config.jax_persistent_cache_min_compile_time_secs)
  try:
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "user"))
    monkeypatch.setenv(console.CACHE_ENV, str(tmp_path / "ours"))
    assert console.compilation_cache() == str(tmp_path / "user")       # left alone
    jax.config.update("jax_compilation_cache_dir", None)
    monkeypatch.delenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", raising=False)
    assert console.compilation_cache() == str(tmp_path / "ours")
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "ours")
    assert jax.config.jax_persistent_cache_min_compile_time_secs == console.MIN_COMPILE_SECS
    jax.config.update("jax_compilation_cache_dir", None)
    monkeypatch.setenv(console.CACHE_ENV, "")
    assert console.compilation_cache() is None                          # empty: off
    assert jax.config.jax_compilation_cache_dir is None
    jax.config.update("jax_compilation_cache_dir", None)
    monkeypatch.delenv(console.CACHE_ENV)
    monkeypatch.setenv("GAE_JAX_CACHE", str(tmp_path / "gae_cache"))
    assert console.compilation_cache() == str(tmp_path / "gae_cache" / "xla")
  finally:
    jax.config.update("jax_compilation_cache_dir", before[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])


def test_python_warnings_show_once_per_site_as_one_line(monkeypatch):
  import warnings  # pylint: disable=g-import-not-at-top
  records = []

  class Keep(logging.Handler):
    def emit(self, record):
      records.append(record)

  keep = Keep()
  logging.getLogger().addHandler(keep)
  monkeypatch.setattr(console, "_warned_at", set())
  monkeypatch.setattr(warnings, "showwarning", console.show_warning_once)
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("always")
      warnings.showwarning = console.show_warning_once
      for i in range(3):      # one site, changing text: Python would print all three
        warnings.warn(f"near-singular, min eigenvalue {i}e-15", UserWarning)
      warnings.warn("another site", RuntimeWarning)
  finally:
    logging.getLogger().removeHandler(keep)
  lines = [console.ConsoleFormatter().format(r).split(" ", 1)[1] for r in records]
  assert len(lines) == 2, lines
  assert lines[0].startswith("WARNING: UserWarning: near-singular, min eigenvalue 0e-15 (")
  assert lines[0].endswith(f"test_console.py:{records[0].lineno})")
  assert "\n" not in lines[0]
  assert lines[1].startswith("WARNING: RuntimeWarning: another site")
