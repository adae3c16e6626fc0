"""Cached L_sp targets (config.teacher.cache_outputs, data/sp_targets.py): the joined
stream carries exactly the VFM + teacher target of the image it holds (flip included), the
step on it equals the step that runs the VFM, the cache is reused or rebuilt by its
fingerprint, and a per-step crop is refused."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from gae_jax import configs_lib
from gae_jax import pretrained
from gae_jax import sharding as sharding_lib
from gae_jax.convert import teacher as convert_teacher
from gae_jax.data import pipeline
from gae_jax.data import sp_targets
from gae_jax.trainers import autoencoder

D, GRID, SIZE = 8, 4, 32    # tiny GAE latent width; 32 px / patch 8; VGG at 64 px


def _teacher_dir(path, seed):
  fields = dict(vfm="vgg16_relu5_3", vfm_info=None, vfm_image_size=GRID * 16,
                vfm_weights=None, channels=512, grid=GRID, latent_dim=D,
                downsampler="attn_patchconv", window=1, num_heads=None, decoder_depth=1,
                decoder_num_heads=None, decoder_mlp_hidden=64, qk_norm="rms")
  model = convert_teacher.build_teacher(fields)
  params = nn.unbox(model.init(jax.random.key(seed), jnp.zeros((1, GRID, GRID, 512))))
  pretrained.save_converted(str(path), params["params"], fields, kind="teacher")
  return str(path)


def _folder(root, n=6):
  """root/train/<class>/*.png: n random 40x48 photos in 2 classes."""
  rng = np.random.default_rng(0)
  for i in range(n):
    d = root / "train" / f"c{i % 2}"
    d.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(d / f"{i}.png")
  return str(root)


def _config(root, teacher, cache_dir, **data):
  c = configs_lib.autoencoder_config("runlocal", latent_dim=D)
  c.data.image_size = SIZE
  c.data.source = "folder"
  c.data.root = root
  c.data.crop = "adm_center"
  c.data.random_flip = True
  c.data.read_threads = 1
  for k, v in data.items():
    c.data[k] = v
  c.batch_size = 6
  c.loss.sp_weight = 1.0
  c.optim.warmup_steps = 0
  c.teacher.init_from = teacher
  c.teacher.cache_outputs = True
  c.teacher.cache_dir = cache_dir
  return c


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("sp_targets")
  root = _folder(tmp / "photos")
  teacher = _teacher_dir(tmp / "teacher", seed=3)
  return tmp, root, teacher


def _shard_mtimes(directory):
  return {f: os.stat(os.path.join(directory, f)).st_mtime_ns
          for f in os.listdir(directory) if f.endswith(".array_record")}


def test_cached_step_equals_vfm_step(tiny):
  tmp, root, teacher = tiny
  config = _config(root, teacher, str(tmp / "cache"))
  mesh = sharding_lib.make_mesh([("data", 1), ("fsdp", 1), ("tensor", 1)],
                                devices=jax.devices()[:1])
  s = autoencoder.Setup(config, mesh=mesh)
  manifest = s.use_sp_targets(str(tmp / "cache"))
  assert manifest["num_records"] == 6 and tuple(manifest["target_shape"]) == (GRID, GRID, D)
  assert autoencoder.caches_sp_targets(config)
  cached_frozen = autoencoder.load_frozen(config, mesh)
  assert "teacher" not in cached_frozen          # the VFM is not put on the device
  config_vfm = config.copy_and_resolve_references()
  config_vfm.teacher.cache_outputs = False
  frozen = autoencoder.load_frozen(config_vfm, mesh)

  batch = next(s.train_iterator())
  assert batch["sp_target"].shape == (6, GRID, GRID, D)
  # The join: each example's target is the VFM + teacher on the very pixels it carries
  # (its flip draw included), and the image stream is the one without the cache.
  plain = next(pipeline.make_iterator(config.data, split="train", batch_size=6,
                                      seed=config.seed))
  np.testing.assert_array_equal(plain["image"], batch["image"])
  src = pipeline.make_source(config.data, "train")
  prep = pipeline.Preprocess(SIZE, "adm_center", False)
  unflipped = np.stack([prep(src[int(i)])["image"] for i in batch["index"]])
  flipped = [not np.array_equal(u, x) for u, x in zip(unflipped, batch["image"])]
  assert any(flipped) and not all(flipped)       # both flip states are exercised
  direct = np.asarray(jax.jit(autoencoder.sp_target)(frozen["teacher"], batch["image"]))
  np.testing.assert_allclose(batch["sp_target"], direct, rtol=1e-5, atol=1e-5)
  # flip(t(x)) is not t(flip x) (the VFM is not flip-equivariant): the cache holds both.
  k = flipped.index(True)
  t_x = np.asarray(jax.jit(autoencoder.sp_target)(frozen["teacher"], unflipped[k:k + 1]))[0]
  assert np.max(np.abs(direct[k] - t_x[:, ::-1])) > 1e-3

  state = s.init_state()
  g = sharding_lib.to_global({k: batch[k] for k in ("image", "label", "sp_target")},
                             s.data_sharding)
  s_cached, m_cached = s.compile_train_step(cached_frozen, donate=False, disc_active=False)(
      state, g, cached_frozen)
  s.sp_targets = None                            # the same Setup, the VFM in the step
  g_plain = {k: g[k] for k in ("image", "label")}
  s_vfm, m_vfm = s.compile_train_step(frozen, donate=False, disc_active=False)(
      state, g_plain, frozen)
  m_cached, m_vfm = jax.device_get(m_cached), jax.device_get(m_vfm)
  assert m_vfm["sp"] > 0
  for key in ("loss", "sp", "nll", "grad_norm", "update_norm"):
    np.testing.assert_allclose(m_cached[key], m_vfm[key], rtol=2e-5, err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               jax.device_get(s_cached.params), jax.device_get(s_vfm.params))


def test_reused_and_rebuilt_by_fingerprint(tiny):
  tmp, root, teacher = tiny
  cache = str(tmp / "cache2")
  config = _config(root, teacher, cache)
  m1 = autoencoder.prepare_sp_targets(config, cache)
  before = _shard_mtimes(cache)
  m2 = autoencoder.prepare_sp_targets(config, cache)     # resume: same key, no rewrite
  assert m2 == m1 and _shard_mtimes(cache) == before
  first = sp_targets.JoinedSource(pipeline.make_source(config.data, "train"), cache)[0]

  other = _config(root, _teacher_dir(tmp / "teacher_b", seed=4), cache)
  m3 = autoencoder.prepare_sp_targets(other, cache)      # another teacher: rebuilt
  assert m3["settings"]["teacher"] != m1["settings"]["teacher"]
  again = sp_targets.JoinedSource(pipeline.make_source(config.data, "train"), cache)[0]
  assert np.max(np.abs(again["sp_target"] - first["sp_target"])) > 1e-3

  resized = _config(root, teacher, cache, image_size=16)
  assert (sp_targets.settings(resized, pipeline.make_source(resized.data, "train"))
          != m1["settings"])                             # the size is in the key
  more = _config(_folder(tmp / "photos7", n=7), teacher, cache)   # other data
  with pytest.raises(ValueError, match="has 6 records, the train source 7"):
    sp_targets.JoinedSource(pipeline.make_source(more.data, "train"), cache)
  m4 = autoencoder.prepare_sp_targets(more, cache)
  assert m4["num_records"] == 7 and m4["settings"]["data_fingerprint"] != (
      m1["settings"]["data_fingerprint"])


@pytest.mark.parametrize("data,match", [
    (dict(crop="random"), "data.crop='random' draws a new crop every step"),
    (dict(crop="random_scale"), "data.crop='random_scale' draws a new crop every step"),
    (dict(source="embedded"), "data.source='embedded' always takes random-scale"),
])
def test_crop_that_changes_per_step_is_refused(tiny, data, match):
  tmp, root, teacher = tiny
  config = _config(root, teacher, str(tmp / "never"), **data)
  with pytest.raises(ValueError, match=match):
    autoencoder.caches_sp_targets(config)
  with pytest.raises(ValueError, match=match):
    autoencoder.prepare_sp_targets(config, str(tmp / "never"))
  assert not os.path.exists(tmp / "never")
