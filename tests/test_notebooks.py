"""The demo pipeline at its tiny size through the CLI (`configs/demo.py:tiny`), then the
notebooks executed on its outputs with a real kernel (nbclient): a stale notebook cell or a
broken stage link fails here.

One module fixture runs the tiny demo once (a subprocess, one CPU device, the tests' XLA
compilation cache); everything else reuses its workdir.
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from gae_jax.trainers import demo

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

pytestmark = pytest.mark.xdist_group("demo")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The suite's XLA flags (tests/conftest.py) without its 8 fake devices: one CPU device.
ONE_DEVICE_FLAGS = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                            if "device_count" not in f)
NOTEBOOKS = os.path.join(ROOT, "notebooks")
NAMES = ("inspect_gae", "sample_dit")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
  """(workdir, console output) of `python -m gae_jax.main --config=configs/demo.py:tiny`."""
  workdir = str(tmp_path_factory.mktemp("demo") / "w")
  env = dict(os.environ, XLA_FLAGS=ONE_DEVICE_FLAGS, JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-m", "gae_jax.main", "--config=configs/demo.py:tiny",
                      f"--workdir={workdir}"], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=1800)
  assert r.returncode == 0, r.stderr[-4000:]
  return workdir, r.stdout + r.stderr


def test_demo_runs_every_stage_and_writes_a_readable_report(demo_run):
  workdir, log = demo_run
  n = len(demo.STAGES)
  # One progress display: every stage announces itself in order, with its index.
  starts = re.findall(r"\[stage (\d)/(\d) ([^|\]]+?) \| [0-9m]+s\] running", log)
  assert [(int(i), int(k)) for i, k, _ in starts] == [(i, n) for i in range(1, n + 1)]
  assert [t for _, _, t in starts] == [s.title for s in demo.STAGES]
  for s in demo.STAGES:
    marker = demo.read_marker(os.path.join(workdir, s.subdir))
    assert marker["stage"] == s.key and marker["seconds"] > 0
    assert marker["inputs"].keys() == set(s.inputs)
  # The trainers' own outputs, linked stage to stage.
  subdirs = {s.key: s.subdir for s in demo.STAGES}
  for key in demo.TRAINING_STAGES:
    sub = os.path.join(workdir, subdirs[key])
    assert os.path.isdir(os.path.join(sub, "checkpoints", "3"))
    steps = [json.loads(line)["step"] for line in open(os.path.join(sub, "metrics.jsonl"))]
    assert sorted(set(steps)) == [1, 2, 3]
  with open(os.path.join(workdir, "2_gae", "config.json")) as f:
    assert json.load(f)["teacher"]["init_from"] == os.path.join(workdir, "1_teacher")
  with open(os.path.join(workdir, "3_latents", "manifest.json")) as f:
    assert json.load(f)["tokenizer"] == os.path.join(workdir, "2_gae")
  samples = np.load(os.path.join(workdir, "5_samples", "samples.npz"))["arr_0"]
  assert samples.shape == (22, 32, 32, 3) and samples.dtype == np.uint8

  with open(os.path.join(workdir, "report.md")) as f:
    report = f.read()
  for section in ("## Stages", "## Metrics", "## Reconstructions", "## Samples per class",
                  "## Training curves", "## Decoder robustness"):
    assert section in report
  assert demo.TINY_NOTE in report
  figures = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", report)
  assert sorted(figures) == ["reconstructions.png", "robustness.png",
                             "samples_per_class.png", "training_curves.png"]
  for name in figures:
    with Image.open(os.path.join(workdir, name)) as im:
      assert im.format == "PNG" and min(im.size) >= 150, (name, im.size)
  # The metrics table holds the evaluation's numbers: PSNR of the s = 0 robustness row.
  with open(os.path.join(workdir, "6_eval", "metrics.json")) as f:
    ev = json.load(f)
  psnr0 = ev["robustness"]["per_scale"][0]["psnr"]
  row = next(line for line in report.splitlines() if line.startswith("| GAE: PSNR"))
  assert abs(float(row.split("|")[2]) - psnr0) < 1e-3 * abs(psnr0)
  assert all(f"| {i} | {s.title} |" in report for i, s in enumerate(demo.STAGES, 1))
  with open(os.path.join(workdir, "metrics.json")) as f:
    summary = json.load(f)
  assert summary["tiny"] and summary["metrics"]["GAE: PSNR (dB)"] == pytest.approx(psnr0)
  assert summary["metrics"]["samples: FID"] is None        # tiny: no Inception
  assert {k: v["status"] for k, v in summary["stages"].items()} == {
      s.key: "ran" for s in demo.STAGES}


def test_demo_rerun_reuses_finished_stages(demo_run):
  workdir, _ = demo_run
  report = os.path.join(workdir, "report.md")
  before = os.stat(report).st_mtime_ns
  lines = []
  config = demo.demo_config("tiny")
  config.sample.sample.seed = 7       # a finished stage's outputs exist: reused, diff named
  out = demo.train_and_evaluate(config, workdir, echo=lines.append)
  assert {k: v["status"] for k, v in out["stages"].items()} == {
      s.key: "reused" for s in demo.STAGES}
  assert sum("done earlier" in line for line in lines) == len(demo.STAGES)
  assert os.stat(report).st_mtime_ns == before      # nothing ran: the report stands
  cfgs = demo.stage_configs(config, workdir)
  assert demo.config_diff(cfgs["sample"], os.path.join(workdir, "5_samples",
                                                       "config.json")) == ["sample.seed"]
  assert demo.config_diff(cfgs["dit"], os.path.join(workdir, "4_dit", "config.json")) == []


def test_demo_refuses_a_training_stage_built_from_changed_upstream_outputs(demo_run):
  workdir, _ = demo_run
  path = os.path.join(workdir, "4_dit", demo.MARKER)
  with open(path) as f:
    original = f.read()
  marker = json.loads(original)
  marker["inputs"]["cache"] = "a cache that no longer exists"
  try:
    with open(path, "w") as f:
      json.dump(marker, f)
    with pytest.raises(demo.StaleStageError, match=r"stage 4/6 .*4_dit.* cache"):
      demo.train_and_evaluate(demo.demo_config("tiny"), workdir)
  finally:
    with open(path, "w") as f:
      f.write(original)


def _stream_text(nb) -> str:
  return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                 for o in c.get("outputs", []) if o.get("output_type") == "stream")


def _pngs(nb) -> int:
  return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
             for o in c.get("outputs", []))


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_on_the_demo_outputs(demo_run, name, tmp_path, monkeypatch):
  workdir, _ = demo_run
  nb = nbformat.read(os.path.join(NOTEBOOKS, f"{name}.ipynb"), as_version=4)
  for key, value in {"GAE_JAX_DEMO": workdir, "GAE_JAX_DEMO_SIZE": "tiny", "GAE_CKPT": "",
                     "GAE_DIT_CKPT": "", "GAE_DIT_STATS": "",
                     "XLA_FLAGS": ONE_DEVICE_FLAGS}.items():
    monkeypatch.setenv(key, value)
  monkeypatch.delenv("MPLBACKEND", raising=False)      # the inline backend: PNG outputs
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()
  text = _stream_text(nb)
  assert "WARNING" not in text and "Warning" not in text, text
  assert not any(o.get("output_type") == "error" for c in nb.cells
                 for o in c.get("outputs", []))
  # The notebook reused the fixture's demo instead of training again.
  assert text.count("done earlier") == len(demo.STAGES)
  if name == "inspect_gae":
    rms = [float(v) for v in text.split("token RMS min/max")[1].split()[:2]]
    assert all(abs(r - 1.0) < 1e-4 for r in rms)   # every latent token on the sphere
    assert "s=0.5" in text and _pngs(nb) == 2
  else:
    assert "DiT: 11 classes, latents (4, 4, 32)" in text
    assert "Euler steps guided" in text
    assert _pngs(nb) == 5     # samples, CFG sweep, samplers, time grid, interval CFG


@pytest.mark.parametrize("name", NAMES)
def test_saved_notebook_has_badge_setup_and_outputs(name):
  path = os.path.join(NOTEBOOKS, f"{name}.ipynb")
  assert os.path.getsize(path) < 1_000_000
  nb = nbformat.read(path, as_version=4)
  setup = nb.cells[1].source
  repo = re.search(r'GAE_JAX_REPO = "https://github\.com/([\w.-]+/[\w.-]+)"', setup).group(1)
  badge = (f"https://colab.research.google.com/github/{repo}/blob/main/notebooks/"
           f"{name}.ipynb")
  assert badge in nb.cells[0].source        # badge and install point at the same repo
  assert 'if "google.colab" in sys.modules:' in setup and "git+{GAE_JAX_REPO}" in setup
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(c.execution_count for c in code)            # saved executed, in order
  assert [c.execution_count for c in code] == sorted(c.execution_count for c in code)
  assert _pngs(nb) >= 2
  text = _stream_text(nb)
  assert "WARNING" not in text and "Warning" not in text
