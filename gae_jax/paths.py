"""Where gae_jax caches files it derives from installed packages (never from the net)."""

import os
import pathlib


def cache_dir(*parts: str) -> pathlib.Path:
  """Returns (and creates) `$GAE_JAX_CACHE/<parts>`, default `~/.cache/gae_jax`."""
  root = os.environ.get("GAE_JAX_CACHE") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "gae_jax")
  path = pathlib.Path(root, *parts)
  path.mkdir(parents=True, exist_ok=True)
  return path
