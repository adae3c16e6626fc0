"""The notebooks run top to bottom on a tiny checkpoint (nbclient, real kernel)."""

import os

import jax
import jax.numpy as jnp
import pytest

from gae_jax import pretrained
from gae_jax.models import gae as gae_lib

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "notebooks")


def test_inspect_gae_notebook(tmp_path, monkeypatch):
  fields = dict(width=64, depth=1, num_heads=2, patch_size=8, latent_dim=8, image_size=32)
  model = gae_lib.GAE(width=64, depth=1, num_heads=2, patch_size=8, latent_dim=8)
  params = model.init({"params": jax.random.key(0), "noise": jax.random.key(1)},
                      jnp.zeros((1, 32, 32, 3)))["params"]
  ckpt = pretrained.save_converted(str(tmp_path / "gae"), params, fields, kind="gae")
  nb = nbformat.read(os.path.join(NOTEBOOKS, "inspect_gae.ipynb"), as_version=4)
  monkeypatch.setenv("GAE_CKPT", ckpt)
  monkeypatch.setenv("MPLBACKEND", "Agg")
  monkeypatch.setenv("XLA_FLAGS", "")
  client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()
  outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                    for o in c.get("outputs", []))
  assert "token RMS min/max" in outputs
  rms = [float(v) for v in outputs.split("token RMS min/max")[1].split()[:2]]
  assert all(abs(r - 1.0) < 1e-4 for r in rms)   # every latent token on the sphere
  assert "s=0.5" in outputs
