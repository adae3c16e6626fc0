"""Test session setup: 8 fake CPU devices for the mesh/sharding tests, a compilation cache,
LLVM -O1 for the tests' CPU executables.

`-n N` runs use xdist's loadgroup mode: a file marked `xdist_group` runs on one worker, so
its module fixtures (a training run, a compile) are built once; SHARED_FIXTURE_FILES gives
that to files whose expensive module fixture serves several tests but which carry no
group of their own.

XLA executables are cached on disk (jax's persistent compilation cache, also inherited by
the `python -m gae_jax.main` subprocesses): tests that compile the same tiny trainer step
again (resume, a second run, the CLI) load it instead of recompiling. Directory:
$GAE_JAX_TEST_XLA_CACHE (empty: off), default <tmp>/gae_jax_test_xla_cache.
"""

import os
import tempfile

# Must happen before jax initialises its backends.
os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
# LLVM at -O1 instead of -O2 for the CPU executables of the tests (inherited by their
# `python -m gae_jax.main` children): the suite's time is mostly XLA compilation of tiny
# programs. Measured cold, quiet-ish 2 cores: test_disc_skip 67 -> 50 CPU-s, test_pae_trainer
# 140 -> 125 CPU-s; -O0 compiles faster still but runs the PAE steps slower (191 CPU-s).
# Numerics are those of the same XLA graph (every tolerance in the suite holds); a given
# XLA_FLAGS value wins.
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=1"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_xla_cache = os.environ.get("GAE_JAX_TEST_XLA_CACHE",
                            os.path.join(tempfile.gettempdir(), "gae_jax_test_xla_cache"))
if _xla_cache:
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _xla_cache)
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def devices8():
  devs = jax.devices()
  if len(devs) < 8:
    pytest.skip("needs 8 (fake) devices")
  return devs[:8]


def _default_to_loadgroup(config) -> bool:
  """`-n N` given and `--dist` not: xdist has already set `dist = "load"` by now."""
  args = [str(a) for a in config.invocation_params.args]
  return bool(getattr(config.option, "numprocesses", None)) and config.option.dist == "load" \
      and not any(a == "-d" or a.startswith("--dist") for a in args)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
  """`-n N` without `--dist` -> `--dist loadgroup` (files marked `xdist_group` stay on one
  worker). Here rather than in addopts, which would break `-p no:xdist` runs.

  The controller's scheduler reads `dist`; each worker re-parses the command line (so sees
  no `--dist`) and needs `option.loadgroup` to tag its node ids with their group, which the
  controller hands it through `workerinput` (pytest_configure_node below)."""
  worker = getattr(config, "workerinput", None)
  if worker is not None:
    if worker.get("gae_jax_loadgroup"):
      config.option.loadgroup = True
  elif _default_to_loadgroup(config):
    config.option.dist = "loadgroup"


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
  """xdist (controller side), before a worker starts."""
  node.workerinput["gae_jax_loadgroup"] = node.config.option.dist == "loadgroup"


# file name -> xdist group: files with one expensive module fixture read by several tests
# (without a group, `-n 2` may split their tests over both workers and build it twice).
SHARED_FIXTURE_FILES = {
    "test_benchmark.py": "benchmark_smoke",    # smoke_records: every stage compiled in a child
    "test_pae_trainer.py": "pae_trainer",      # runs: PAE stage 0 then stage 1 trained
}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
  """Marks the tests of SHARED_FIXTURE_FILES with their xdist group (before xdist's own
  hook turns the marks into node-id suffixes)."""
  del config
  for item in items:
    group = SHARED_FIXTURE_FILES.get(item.path.name)
    if group and not any(True for _ in item.iter_markers("xdist_group")):
      item.add_marker(pytest.mark.xdist_group(group))


# GAE_JAX_TEST_COMPILE_REPORT=FILE: every test's XLA compile seconds in this process (a module
# fixture counts toward the test that builds it), one JSON line per test appended to FILE at
# the end of the session; children (`python -m gae_jax.main`, jax.distributed workers) are
# not seen. For finding what to share or shrink when the suite gets slow.
_COMPILE_REPORT = os.environ.get("GAE_JAX_TEST_COMPILE_REPORT", "")
_compile_seconds: dict[str, list[float]] = {}
_current_test = ["<collection>"]

if _COMPILE_REPORT:
  import json
  import time

  from jax import monitoring

  def _on_duration(event, duration, **kwargs):
    del kwargs
    if event == "/jax/core/compile/backend_compile_duration":
      _compile_seconds.setdefault(_current_test[0], [0.0, 0.0, 0])[0] += duration
      _compile_seconds[_current_test[0]][2] += 1

  monitoring.register_event_duration_secs_listener(_on_duration)

  @pytest.hookimpl(hookwrapper=True)
  def pytest_runtest_protocol(item, nextitem):
    del nextitem
    _current_test[0] = item.nodeid
    t0 = time.perf_counter()
    yield
    _compile_seconds.setdefault(item.nodeid, [0.0, 0.0, 0])[1] += time.perf_counter() - t0

  def pytest_sessionfinish(session, exitstatus):
    del session, exitstatus
    with open(_COMPILE_REPORT, "a") as f:
      for nodeid, (compile_s, wall_s, n) in _compile_seconds.items():
        f.write(json.dumps(dict(test=nodeid, compile_s=round(compile_s, 2),
                                wall_s=round(wall_s, 2), compiles=n)) + "\n")
