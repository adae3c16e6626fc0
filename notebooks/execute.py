r"""Runs the notebooks top to bottom and saves them WITH their outputs (PNG figures inline).

  python notebooks/execute.py --demo=/tmp/demo --size=          # the full CPU demo's run
  python notebooks/execute.py --demo=/tmp/demo_tiny --size=tiny inspect_gae

Each notebook reads GAE_JAX_DEMO / GAE_JAX_DEMO_SIZE (set from the flags here): the demo
pipeline in that workdir is reused where finished (`gae_jax.trainers.demo`) and run where
not. The saved notebook must stay under 1 MB; the tests (tests/test_notebooks.py) execute
the same notebooks on the tiny demo without saving them.
"""

import argparse
import os
import sys
import tempfile

import nbclient
import nbformat

HERE = os.path.dirname(os.path.abspath(__file__))
NOTEBOOKS = ("inspect_gae", "sample_dit")
MAX_BYTES = 1_000_000


def execute(name: str, env: dict[str, str], timeout: int = 1800) -> nbformat.NotebookNode:
  """The executed notebook `name` (not written). env: variables the kernel sees."""
  nb = nbformat.read(os.path.join(HERE, f"{name}.ipynb"), as_version=4)
  old = dict(os.environ)
  os.environ.update(env)
  try:
    with tempfile.TemporaryDirectory() as cwd:
      client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                       record_timing=False,
                                       resources={"metadata": {"path": cwd}})
      client.execute()
  finally:
    os.environ.clear()
    os.environ.update(old)
  return nb


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--demo", required=True, help="demo workdir (GAE_JAX_DEMO)")
  p.add_argument("--size", default="", help="'tiny' or '' (the full demo)")
  p.add_argument("names", nargs="*", default=list(NOTEBOOKS))
  a = p.parse_args(argv)
  env = {"GAE_JAX_DEMO": os.path.abspath(a.demo), "GAE_JAX_DEMO_SIZE": a.size,
         "GAE_CKPT": "", "GAE_DIT_CKPT": "", "GAE_DIT_STATS": "", "XLA_FLAGS": ""}
  for name in a.names:
    nb = execute(name, env)
    path = os.path.join(HERE, f"{name}.ipynb")
    nbformat.write(nb, path)
    size = os.path.getsize(path)
    print(f"{path}: {size / 1e3:.0f} kB")
    if size > MAX_BYTES:
      sys.exit(f"{path} is {size} bytes, over {MAX_BYTES}: make its figures smaller")


if __name__ == "__main__":
  main()
