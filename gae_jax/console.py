"""What a person running `python -m gae_jax.main` reads, and the CLI's process setup.

`setup()` (called once by gae_jax.main, after flag parsing) does two things:

* Log filtering. Unless `--verbosity` (absl's flag, `-v`) is given on the command line, the
  console shows only gae_jax's own INFO lines (the run plan, "compiling ...", one progress
  line per `log_every`, eval lines, the final summary) and every WARNING/ERROR, each as
  `HH:MM:SS message`. INFO from libraries (orbax's per-save internals, grain, jax's
  "Unable to initialize backend 'tpu'" probe, absl) is dropped, as are the few gae_jax
  detail modules in `DETAIL_MODULES`. With `--verbosity=N` logging is absl's own, unfiltered,
  at that level (0 = INFO, 1 = DEBUG).
* The persistent XLA compilation cache (`compilation_cache()`), so a rerun loads its
  compiled programs instead of compiling them again.

The trainers' plan / compiling / progress / summary lines are formatted here and logged
through absl (trainers/common.py calls these for every trainer), so tests and notebooks
that never call `setup()` see the same lines in absl's usual format.
"""

import contextlib
import logging as std_logging
import os
import time
import warnings
from typing import Any, Mapping, Optional, Sequence

from absl import flags
from absl import logging
import jax

from gae_jax import paths

_PKG_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
# gae_jax modules whose INFO lines are details (shown with --verbosity): the data line
# ("data embedded[train]: -1 examples ...") repeats what the plan says.
DETAIL_MODULES = ("data/pipeline.py",)
# Library warnings about choices gae_jax makes on purpose: orbax warns on every read-only
# open of a checkpoint directory (loaders and metadata reads open them read-only).
BENIGN_WARNINGS = ("Given directory is read only",)

CACHE_ENV = "GAE_JAX_XLA_CACHE"     # compilation cache dir; empty string: no cache
MIN_COMPILE_SECS = 0.5              # cache programs that took at least this long to compile

_run: dict = {}                     # the current run: config, workdir, start time
_cache_events = {"hits": 0, "misses": 0}
_listener_registered = False


# ------------------------------------------------------------------------------- setup


def verbosity_requested() -> bool:
  """True when --verbosity / -v was given on the command line (absl's flag)."""
  try:
    return bool(flags.FLAGS["verbosity"].present)
  except (KeyError, flags.UnparsedFlagAccessError):
    return False


class QuietFilter(std_logging.Filter):
  """Keeps gae_jax INFO lines (except DETAIL_MODULES) and every non-benign warning."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.levelno >= std_logging.WARNING:
      msg = record.getMessage()
      return not any(b in msg for b in BENIGN_WARNINGS)
    path = os.path.abspath(record.pathname or "")
    if not path.startswith(_PKG_DIR):
      return False
    return not path[len(_PKG_DIR):].replace(os.sep, "/").endswith(DETAIL_MODULES)


class ConsoleFormatter(std_logging.Formatter):
  """`HH:MM:SS message`; warnings and errors say so and name their source file."""

  def format(self, record: std_logging.LogRecord) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
    msg = record.getMessage()
    if record.levelno >= std_logging.WARNING:
      level = "ERROR" if record.levelno >= std_logging.ERROR else "WARNING"
      msg = f"{level}: {msg} ({os.path.basename(record.pathname or '?')}:{record.lineno})"
    if record.exc_info:
      msg += "\n" + self.formatException(record.exc_info)
    return f"{stamp} {msg}"


_warned_at: set = set()             # (file, line) of Python warnings already shown


def show_warning_once(message, category, filename, lineno, file=None, line=None):
  """`warnings.showwarning` for the quiet console: one line per warning site.

  Python repeats a warning whose text changes (an eigenvalue, a count) at every call; the
  console shows the first one from each (file, line) as `WARNING: Category: text (file:line)`
  through the logging handler and drops the rest (`--verbosity` shows them all).
  """
  del file, line
  if (filename, lineno) in _warned_at:
    return
  _warned_at.add((filename, lineno))
  root = std_logging.getLogger()
  root.handle(root.makeRecord("py.warnings", std_logging.WARNING, filename, lineno,
                              f"{category.__name__}: {message}", None, None))


def setup() -> Optional[str]:
  """The CLI's logging and compilation cache (see the module docstring); returns the cache dir.

  Call once after flags are parsed and before jax compiles or initialises a backend.
  """
  if not verbosity_requested():
    handler = logging.get_absl_handler().python_handler
    if not any(isinstance(f, QuietFilter) for f in handler.filters):
      handler.addFilter(QuietFilter())
    handler.setFormatter(ConsoleFormatter())
    warnings.showwarning = show_warning_once
  return compilation_cache()


def compilation_cache() -> Optional[str]:
  """Turns on jax's persistent compilation cache; returns its directory (None: off).

  Directory, first that is set: JAX_COMPILATION_CACHE_DIR (or jax_compilation_cache_dir
  set before this call: left alone), $GAE_JAX_XLA_CACHE (empty string: no cache),
  `<user cache>/gae_jax/xla` (gae_jax.paths.cache_dir: $GAE_JAX_CACHE or
  $XDG_CACHE_HOME/gae_jax or ~/.cache/gae_jax). Programs that compiled in under
  MIN_COMPILE_SECS are not stored unless JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS says so.
  """
  _register_cache_listener()
  current = jax.config.jax_compilation_cache_dir
  if current:
    return current
  path = os.environ.get(CACHE_ENV)
  if path is None:
    path = str(paths.cache_dir("xla"))
  if not path:
    return None
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECS)
  return path


def _register_cache_listener():
  global _listener_registered
  if _listener_registered:
    return
  _listener_registered = True

  def on_event(event: str, **_):
    if event == "/jax/compilation_cache/cache_hits":
      _cache_events["hits"] += 1
    elif event == "/jax/compilation_cache/cache_misses":
      _cache_events["misses"] += 1

  jax.monitoring.register_event_listener(on_event)


# ------------------------------------------------------------------------------- lines


def fmt_count(n: int) -> str:
  """Parameter count for people: 1 -> '1', 2_345 -> '2.3k', 310_380_000 -> '310.38M'."""
  if n >= 1e6:
    return f"{n / 1e6:.2f}M"
  if n >= 1e3:
    return f"{n / 1e3:.1f}k"
  return str(int(n))


def fmt_duration(seconds: float) -> str:
  """'42s', '3m07s', '2h05m'."""
  s = int(round(seconds))
  if s < 60:
    return f"{seconds:.0f}s" if seconds >= 10 else f"{seconds:.1f}s"
  m, s = divmod(s, 60)
  if m < 60:
    return f"{m}m{s:02d}s"
  h, m = divmod(m, 60)
  return f"{h}h{m:02d}m"


def begin_run(config, workdir: str) -> None:
  """Remembers the run (for the plan and the summary); trainers/common.write_config calls it."""
  _run.update(config=config, workdir=os.fspath(paths.path(workdir)), start=time.time(),
              compile_s=0.0)


def module_sizes(params: Any) -> list[tuple[str, int]]:
  """[(name, parameter count)] of a params tree, split into modules for the plan line.

  Top-level entries are listed; an entry is split further (at most two levels down) when
  it has two to four entries and holds a deep network among them, so containers such as
  {generator: {gae: {encoder, projector, decoder}, logvar}} list the networks while a
  network's own layers never do. A top level of more than eight entries (a DiT's layers)
  is one total.
  """
  def size(t):
    return sum(int(x.size) for x in jax.tree.leaves(t))

  def nesting(t):
    return 1 + max((nesting(v) for v in t.values()), default=0) if isinstance(t, Mapping) else 0

  if not isinstance(params, Mapping) or len(params) > 8:
    return [("params", size(params))]
  out = []

  def walk(name, node, depth):
    if (isinstance(node, Mapping) and depth < 3 and 1 < len(node) <= 4
        and any(nesting(v) >= 4 for v in node.values())):
      for k, v in node.items():
        walk(f"{name}/{k}", v, depth + 1)
    else:
      out.append((name, size(node)))

  for k, v in params.items():
    walk(k, v, 1)
  short = [n.rsplit("/", 1)[-1] for n, _ in out]
  return [(sh if short.count(sh) == 1 else n, c) for sh, (n, c) in zip(short, out)]


def log_plan(*, params: Any, mesh, total_steps: int, start_step: int) -> None:
  """The run's plan: module sizes, mesh and batch, step range, where outputs go."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  config, workdir = _run.get("config"), _run.get("workdir")
  sizes = module_sizes(nn.meta.unbox(params))
  total = sum(n for _, n in sizes)
  logging.info("plan: %s parameters %s (total %s)",
               config.stage if config is not None else "trainer",
               ", ".join(f"{k} {fmt_count(n)}" for k, n in sizes), fmt_count(total))
  devices = f"{mesh.size} {jax.default_backend()} device{'s' if mesh.size > 1 else ''}"
  if jax.process_count() > 1:
    devices += f" on {jax.process_count()} processes"
  axes = " ".join(f"{k}={v}" for k, v in dict(mesh.shape).items())
  batch = ""
  if config is not None and config.get("batch_size"):   # (a demo config has none itself)
    size = config.get("data", {}).get("image_size", 0) if config.get("data") else 0
    batch = f", global batch {config.batch_size}" + (f" of {size}x{size} images" if size else "")
    if config.get("data") and config.data.get("source"):
      batch += f" ({config.data.source})"
  steps = f"steps {start_step} -> {total_steps}" + (" (resuming)" if start_step else "")
  logging.info("plan: mesh %s on %s%s; %s", axes, devices, batch, steps)
  if workdir is not None and config is not None and config.get("ckpt_every"):
    outs = [f"checkpoints/ (every {config.ckpt_every} steps)"]
    if config.get("image_every"):
      outs.append(f"images/ (every {config.image_every} steps)")
    outs.append("metrics.jsonl, tb/")
    logging.info("plan: outputs in %s: %s", workdir, ", ".join(outs))


@contextlib.contextmanager
def compiling(name: str, *, starting: Optional[str] = None, done: Optional[str] = None):
  """Logs 'compiling <name> ...', then how long it took and where the program came from.

  starting / done replace 'compiling <name>' / '<name> compiled' (e.g. a block that
  compiles and runs). Yields a dict: a 'detail' string put in it extends the closing line.
  The time counts as compile time in the summary.
  """
  logging.info("%s ...", starting or f"compiling {name}")
  hits, misses = _cache_events["hits"], _cache_events["misses"]
  info: dict = {}
  t0 = time.perf_counter()
  yield info
  dt = time.perf_counter() - t0
  _run["compile_s"] = _run.get("compile_s", 0.0) + dt
  got_hits = _cache_events["hits"] - hits
  got_misses = _cache_events["misses"] - misses
  source = []
  if got_misses:
    source.append(f"{got_misses} program{'s' if got_misses > 1 else ''} compiled")
  if got_hits:
    source.append(f"{got_hits} from the compilation cache")
  detail = "; ".join(source + ([info["detail"]] if info.get("detail") else []))
  logging.info("%s in %s%s", done or f"{name} ready", fmt_duration(dt),
               f" ({detail})" if detail else "")


def progress_line(step: int, total: int, metrics: Mapping[str, float],
                  keys: Sequence[tuple[str, str]]) -> str:
  """'step 10/120  loss 1.2861  l1 0.5479 ...  2.2 img/s  ETA 6m31s' (keys absent: skipped)."""
  width = len(str(total))
  terms = "  ".join(f"{k} {metrics[k]:{f}}" for k, f in keys if k in metrics)
  eta = metrics.get("eta_min", float("nan"))
  eta_s = fmt_duration(eta * 60) if eta == eta and eta != float("inf") else "?"
  return (f"step {step:>{width}}/{total}  {terms}  "
          f"{metrics.get('images_per_sec', 0.0):.1f} img/s  ETA {eta_s}")


def log_summary(*, step: int, start_step: int, metrics: Mapping[str, float],
                checkpoint_dir: Optional[str] = None, checkpoint_steps: Sequence[int] = (),
                keys: Sequence[tuple[str, str]] = ()) -> None:
  """The final lines: what ran, how long, final metrics, and where every output is."""
  workdir = _run.get("workdir")
  now = time.time()
  wall = now - _run.get("start", now)
  comp = _run.get("compile_s", 0.0)
  logging.info("done: steps %d -> %d in %s (compiling %s)", start_step, step,
               fmt_duration(wall), fmt_duration(comp))
  shown = [f"{k} {metrics[k]:{f}}" for k, f in keys if k in metrics]
  shown += [f"{k} {v:.2f}" if k.endswith("psnr") else f"{k} {v:.4f}"
            for k, v in sorted(metrics.items()) if k.startswith("val/")]
  if shown:
    logging.info("  final: %s", "  ".join(shown))
  if checkpoint_dir:
    steps = ", ".join(str(s) for s in checkpoint_steps)
    logging.info("  checkpoints: %s (steps %s)", checkpoint_dir, steps or "none")
  if workdir:
    images = paths.path(workdir) / "images"
    pngs = sorted(os.fspath(p) for p in images.glob("*.png")) if images.is_dir() else []
    if pngs:
      logging.info("  images:      %s (latest of %d PNG grid%s)", pngs[-1], len(pngs),
                   "s" if len(pngs) > 1 else "")
    logging.info("  metrics:     %s", paths.join(workdir, "metrics.jsonl"))
    logging.info("  tensorboard: tensorboard --logdir %s", paths.join(workdir, "tb"))
