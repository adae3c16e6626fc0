"""gs:// workdirs for real, against a local GCS-API emulator (gcp-storage-emulator, in memory).

One variable, STORAGE_EMULATOR_HOST, points every layer at the emulator once
`gae_jax.paths.configure_cloud_storage()` has run: etils.epath -> gcsfs (config.json,
metrics.jsonl, PNGs, grain iterator state, latent cache files, reports) and tensorstore
(orbax's array writes). The autoencoder trains to gs://, resumes from there; its gs://
workdir feeds a latent cache written to gs:// and read back; an eval report lands on gs://.
"""

import json
import logging
import os
import socket

import numpy as np
import pytest

gcp_storage_emulator = pytest.importorskip("gcp_storage_emulator.server")
pytest.importorskip("gcsfs")

from etils import epath  # noqa: E402

from gae_jax import checkpoint as ckpt_lib  # noqa: E402
from gae_jax import paths  # noqa: E402

# One xdist worker: the emulator, tensorstore's endpoint (read once per process) and the
# trained workdir are shared by the tests below; the same worker as
# tests/test_autoencoder_trainer.py, whose tiny_config programs the AE run here reuses.
pytestmark = pytest.mark.xdist_group("tiny_ae")

BUCKET = "test-bucket"
RUN = f"gs://{BUCKET}/run"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _send_generation_headers():
  """Media downloads of the emulator gain the `x-goog-generation` / `x-goog-metageneration`
  headers real GCS sends with every object read. tensorstore's gcs driver takes an object's
  generation from them; without them it records generation 0 and its next conditional read
  of that object (orbax's second save re-reads the OCDBT manifest) fails with
  'Malformed StorageGeneration'. gcsfs does not need them."""
  from http import HTTPStatus
  from gcp_storage_emulator.handlers import objects
  orig = objects.download
  if getattr(orig, "sends_generation", False):
    return

  def download(request, response, storage, *args, **kwargs):
    orig(request, response, storage, *args, **kwargs)
    if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
      response["x-goog-generation"] = str(obj["generation"])
      response["x-goog-metageneration"] = str(obj["metageneration"])

  download.sends_generation = True
  objects.download = download
  for _, handlers in gcp_storage_emulator.HANDLERS:
    for method, fn in list(handlers.items()):
      if fn is orig:
        handlers[method] = download


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """An in-memory GCS emulator on 127.0.0.1:<free port> with bucket `test-bucket`."""
  logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)
  _send_generation_headers()
  port = _free_port()
  server = gcp_storage_emulator.create_server("127.0.0.1", port, in_memory=True,
                                              default_bucket=BUCKET)
  server.start()
  saved = dict(os.environ)
  os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
  # configure_cloud_storage only fills unset variables: clear any from the outer shell.
  for k in ("TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING"):
    os.environ.pop(k, None)
  # Remote files read through local mirrors (ArrayRecord shards) go to a fresh cache.
  os.environ["GAE_JAX_CACHE"] = str(tmp_path_factory.mktemp("gae_jax_cache"))
  paths.configure_cloud_storage()
  assert os.environ["TENSORSTORE_GCS_HTTP_URL"] == f"http://127.0.0.1:{port}"
  try:
    yield server
  finally:
    server.stop()
    os.environ.clear()
    os.environ.update(saved)


def test_paths_round_trip(gcs):
  p = paths.path(f"gs://{BUCKET}/probe/a.json")
  assert isinstance(p, epath.Path) and os.fspath(p) == f"gs://{BUCKET}/probe/a.json"
  paths.write_text(p, '{"x": 1}')
  assert json.loads(p.read_text()) == {"x": 1}
  assert [q.name for q in p.parent.iterdir()] == ["a.json"]
  local = paths.local_copy(p)
  assert not paths.is_remote(local) and open(local).read() == '{"x": 1}'
  paths.write_text(p, '{"x": 22}')                  # rewritten: the mirror is refreshed
  assert open(paths.local_copy(p)).read() == '{"x": 22}'
  assert os.fspath(paths.path("rel/dir")) == os.path.abspath("rel/dir")
  with pytest.raises(ValueError, match="unsupported URL scheme"):
    paths.path("ftp://host/x")


@pytest.fixture(scope="module")
def trained(gcs):
  """The tiny autoencoder of test_autoencoder_trainer: 2 steps to gs://, then resumed to 3
  (checkpoints at steps 2 and 3)."""
  from gae_jax.trainers import autoencoder
  from test_autoencoder_trainer import tiny_config
  # One checkpoint per run: the Python emulator serves ~2 MiB/s. tiny_config's thin
  # discriminator (disc_ndf 8) keeps the state small; its programs are the ones
  # test_autoencoder_trainer compiles (shared through the test compilation cache).
  config = tiny_config(**{"ckpt_every": 2})
  first = autoencoder.train_and_evaluate(config, RUN)
  config.total_steps = 3
  second = autoencoder.train_and_evaluate(config, RUN)
  return first, second


def test_autoencoder_trains_and_resumes_on_gcs(trained):
  first, second = trained
  assert np.isfinite(first["loss"]) and np.isfinite(second["loss"])
  run = epath.Path(RUN)
  assert not os.path.exists("gs:")               # nothing went to a local folder named gs:
  ckpt = ckpt_lib.Checkpointer(f"{RUN}/checkpoints", save_every=1)
  assert ckpt.latest_step() == 3
  assert ckpt.all_steps() == [2, 3]
  assert {"state", "data_iter"} <= {p.name for p in (run / "checkpoints" / "3").iterdir()}
  ckpt.close()
  # The second run appended to the first's metrics.jsonl: every train step once, in order.
  lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines if "loss" in l] == [1, 2, 3]
  assert json.loads((run / "config.json").read_text())["total_steps"] == 3
  assert (run / "images" / "recon_0000003.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert any(p.name.startswith("events.out.tfevents") for p in (run / "tb").iterdir())
  # Weights-only restore and load_gae read the gs:// workdir like a local one.
  state = ckpt_lib.restore_params(f"{RUN}/checkpoints", keys=("step",))
  assert int(state["step"]) == 3


def test_latent_cache_on_gcs(trained):
  from gae_jax import configs_lib
  from gae_jax.data import latents as latents_lib
  from gae_jax.trainers import cache_latents
  c = configs_lib.cache_latents_config(f"runlocal,tokenizer={RUN}")
  c.data.embedded_length = 12
  c.data.read_threads = 1
  c.cache.shard_size = 8            # 2 shards: 8, 4
  c.batch_size = 8
  out = f"gs://{BUCKET}/cache"
  manifest = cache_latents.train_and_evaluate(c, out)
  assert manifest["num_records"] == 12 and manifest["tokenizer"] == RUN
  names = {p.name for p in epath.Path(out).iterdir()}
  assert {"manifest.json", "stats.npz", "progress-p00000.json",
          "latents-p00000-s00000.array_record", "latents-p00000-s00001.array_record"} <= names
  assert latents_lib.load_manifest(out)["num_records"] == 12
  mean, std = latents_lib.load_stats(out)
  assert mean.shape == std.shape == (8,) and np.all(std > 0)
  # A fresh host (empty local mirror) reads the shards from gs:// and gets every record.
  os.environ["GAE_JAX_CACHE"] = os.environ["GAE_JAX_CACHE"] + "_fresh"
  it = latents_lib.make_latent_iterator(out, batch_size=6, seed=0, shuffle=False,
                                        repeat=False, flip=False, process_index=0,
                                        process_count=1, read_threads=1)
  batches = list(it)
  assert sum(len(b["label"]) for b in batches) == 12
  assert batches[0]["latent"].shape[1:] == (4, 4, 8)


def test_eval_report_on_gcs(gcs):
  from gae_jax import configs_lib
  from gae_jax.trainers import evaluate
  c = configs_lib.eval_config("runlocal,tokenizer=random", kind="reconstruction")
  c.eval.num_images = 8
  c.eval.rfid = False
  c.eval.lpips = False        # what lands on gs:// is under test, not the metrics (no VGG16)
  gae = evaluate.random_gae(32, latent_dim=4, patch_size=16)
  out = epath.Path(f"gs://{BUCKET}/eval")
  evaluate.train_and_evaluate(c, os.fspath(out), tokenizer=gae)
  m = json.loads((out / "metrics.json").read_text())
  assert m["reconstruction"]["per_scale"][0]["num_images"] == 8
  assert "Evaluation report" in (out / "report.md").read_text()
  assert (out / "reconstructions.png").read_bytes()[:4] == b"\x89PNG"
  assert (out / "config.json").is_file()
