"""The latent cache: sharded encode, flips, interrupt + resume, statistics, grain reader."""

import os

import grain
import jax
import ml_collections
import numpy as np
import pytest

from gae_jax import configs_lib
from gae_jax import pretrained
from gae_jax.data import latents as latents_lib
from gae_jax.data import pipeline
from gae_jax.models import gae as gae_lib
from gae_jax.trainers import cache_latents

# One xdist worker runs this whole file: its module fixtures (compiles) are built once.
pytestmark = pytest.mark.xdist_group("latent_cache")

SIZE, LATENT_DIM, N = 32, 4, 40


def make_tiny_gae(path: str) -> str:
  """A random tiny GAE saved like a converted checkpoint (what load_gae reads)."""
  fields = dict(variant="mu", decoder_variant="mu", patch_size=8, latent_dim=LATENT_DIM,
                image_size=SIZE, sigma_std=0.2, kl=False, qk_norm="rms")
  model = gae_lib.make_gae(ml_collections.ConfigDict(fields))
  params = model.init({"params": jax.random.key(0), "noise": jax.random.key(1)},
                      np.zeros((1, SIZE, SIZE, 3), np.float32))["params"]
  return pretrained.save_converted(path, params, fields, kind="gae")


def cache_config(gae: str, **cache) -> ml_collections.ConfigDict:
  c = configs_lib.cache_latents_config(f"runlocal,tokenizer={gae}")
  c.data.embedded_length = N
  c.data.read_threads = 2
  c.cache.shard_size = 12           # 4 shards: 12, 12, 12, 4
  c.batch_size = 8                  # one example per fake device
  c.cache.update(cache)
  return c


@pytest.fixture(scope="module")
def gae_dir(tmp_path_factory):
  return make_tiny_gae(str(tmp_path_factory.mktemp("gae")))


@pytest.fixture(scope="module")
def full_cache(gae_dir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("cache_full"))
  manifest = cache_latents.train_and_evaluate(cache_config(gae_dir), out)
  return out, manifest


def _records(cache_dir: str) -> list[dict]:
  paths = latents_lib.shard_paths(cache_dir)
  src = grain.sources.ArrayRecordDataSource(paths)
  return [latents_lib.decode_record(src[i]) for i in range(len(src))]


def test_cache_contents_flip_and_stats(full_cache, gae_dir):
  cache_dir, manifest = full_cache
  assert manifest["num_records"] == N and len(manifest["shards"]) == 4
  assert manifest["latent_shape"] == [SIZE // 8, SIZE // 8, LATENT_DIM]
  assert [s["num_records"] for s in manifest["shards"]] == [12, 12, 12, 4]
  recs = _records(cache_dir)
  assert sorted(int(r["index"]) for r in recs) == list(range(N))   # no duplicates, none lost
  # The stored latents are mu of the (deterministic) source image and of its mirror image.
  data = ml_collections.ConfigDict(cache_config(gae_dir).data.to_dict())
  data.image_size = SIZE
  ds = pipeline.make_dataset(data, split="train", seed=0, shuffle=False, repeat=False,
                             augment=True)
  gae = pretrained.load_gae(gae_dir)
  r = next(r for r in recs if int(r["index"]) == 5)
  ex = ds[5]
  assert int(r["label"]) == int(ex["label"])
  np.testing.assert_allclose(r["latent"], np.asarray(gae.encode(ex["image"][None]))[0],
                             atol=1e-4)
  np.testing.assert_allclose(r["latent_flip"],
                             np.asarray(gae.encode(ex["image"][None, :, ::-1]))[0], atol=1e-4)
  assert not np.allclose(r["latent"], r["latent_flip"], atol=1e-3)
  # Stats: all 40 (< 10k) unflipped latents, per channel, torch-style unbiased std.
  mean, std = latents_lib.load_stats(cache_dir)
  z = np.stack([r["latent"] for r in recs]).reshape(-1, LATENT_DIM).astype(np.float64)
  np.testing.assert_allclose(mean, z.mean(0), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(std, z.std(0, ddof=1), rtol=1e-4)


def test_interrupted_extraction_resumes(full_cache, gae_dir, tmp_path):
  out = str(tmp_path / "cache")
  assert cache_latents.train_and_evaluate(cache_config(gae_dir, stop_after_shards=2), out) == {}
  first = sorted(os.listdir(out))
  assert "manifest.json" not in first
  assert [f for f in first if f.endswith(".array_record")] == [
      latents_lib.shard_name(0, 0), latents_lib.shard_name(0, 1)]
  mtimes = {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in first
            if f.endswith(".array_record")}
  # A crash mid-write leaves only a temporary file, which is neither listed nor read.
  with open(os.path.join(out, latents_lib.shard_name(0, 2) + ".tmp-99999"), "wb") as f:
    f.write(b"torn")
  assert latents_lib.shard_paths(out) == [os.path.join(out, f) for f in sorted(mtimes)]
  manifest = cache_latents.train_and_evaluate(cache_config(gae_dir), out)
  assert manifest["num_records"] == N
  for f, t in mtimes.items():   # finished shards were not redone
    assert os.stat(os.path.join(out, f)).st_mtime_ns == t
  resumed, full = _records(out), _records(full_cache[0])
  assert [int(r["index"]) for r in resumed] == [int(r["index"]) for r in full]
  for a, b in zip(resumed, full):
    np.testing.assert_array_equal(a["latent"], b["latent"])
    np.testing.assert_array_equal(a["latent_flip"], b["latent_flip"])
  # Other settings in the same directory would mix two caches: refused.
  with pytest.raises(ValueError, match="other settings"):
    cache_latents.train_and_evaluate(cache_config(gae_dir, shard_size=10), out)


def test_reader_flips_and_resumes(full_cache):
  cache_dir, _ = full_cache
  recs = {int(r["index"]): r for r in _records(cache_dir)}
  it = latents_lib.make_latent_iterator(cache_dir, batch_size=8, seed=3,
                                        process_index=0, process_count=1, read_threads=1)
  kinds = set()
  for _ in range(10):
    b = next(it)
    assert b["latent"].shape == (8, 4, 4, LATENT_DIM) and b["latent"].dtype == np.float32
    assert b["label"].dtype == np.int32
    for z, y in zip(b["latent"], b["label"]):
      match = [(k, key) for k, r in recs.items() for key in ("latent", "latent_flip")
               if np.array_equal(z, r[key])]
      assert match, "a batch latent is not a stored latent"
      kinds.add(match[0][1])
      assert int(recs[match[0][0]]["label"]) == int(y)
  assert kinds == {"latent", "latent_flip"}   # both the image and its flip are served
  state = it.get_state()
  nxt = next(it)
  it.set_state(state)
  np.testing.assert_array_equal(next(it)["latent"], nxt["latent"])
  # Two processes split the records without overlap.
  a = latents_lib.make_latent_dataset(cache_dir, seed=0, shuffle=False, repeat=False,
                                      flip=False, process_index=0, process_count=2)
  b = latents_lib.make_latent_dataset(cache_dir, seed=0, shuffle=False, repeat=False,
                                      flip=False, process_index=1, process_count=2)
  assert len(a) == len(b) == N // 2
  with pytest.raises(FileNotFoundError, match="manifest.json"):
    latents_lib.make_latent_iterator(os.path.dirname(cache_dir), batch_size=2, seed=0,
                                     process_index=0, process_count=1)


def test_cached_latents_feed_the_linear_probe(full_cache):
  """The probe on a latent cache == the probe on the same latents held in memory.

  Full-batch steps (batch >= N) make the update independent of the shuffle order, so the
  two sources must give the same head up to float summation order.
  """
  from gae_jax.evaluation import linear_probe as probe_lib
  cache_dir, _ = full_cache
  recs = sorted(_records(cache_dir), key=lambda r: int(r["index"]))
  z = np.stack([r["latent"] for r in recs])
  y = np.asarray([int(r["label"]) for r in recs])
  cached = probe_lib.CachedLatents(cache_dir)
  assert len(cached) == N and cached.shape == z.shape[1:] and cached.num_classes == 11
  got = list(cached.batches(7, epoch=None))
  gz = np.concatenate([b[0] for b in got])
  gy = np.concatenate([b[1] for b in got])
  assert [len(b[0]) for b in got] == [7] * 5 + [5]
  order = np.argsort(gz.reshape(N, -1)[:, 0])          # the same rows, any order
  ref = np.argsort(z.reshape(N, -1)[:, 0])
  np.testing.assert_array_equal(gz[order], z[ref])
  np.testing.assert_array_equal(gy[order], y[ref])
  assert len(list(probe_lib.CachedLatents(cache_dir, max_examples=9).batches(4, epoch=0))) == 3
  arrays = probe_lib.ArrayLatents(z, y)
  kw = dict(num_classes=11, epochs=3, batch_size=64, lr=0.5, seed=0)
  for head in ("flatten", "GAP"):
    a = probe_lib.train_linear_probe(arrays, arrays, head=head, **kw)
    c = probe_lib.train_linear_probe(cached, cached, head=head, **kw)
    assert a.num_train == c.num_train == N
    np.testing.assert_allclose(c.loss_curve, a.loss_curve, rtol=1e-5)
    np.testing.assert_allclose(c.val_loss, a.val_loss, rtol=1e-5)
    assert abs(c.top1 - a.top1) <= 1 / N
