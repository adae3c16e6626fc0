"""Data package: sources, transforms and grain pipelines (tiny image sizes, CPU only)."""

import io
import os
import sys

import grain
import numpy as np
from PIL import Image
import pytest

from gae_jax.data import pipeline
from gae_jax.data import sources
from gae_jax.data import transforms

S = 32  # image size for the pipeline tests


def _cfg(**kw):
  c = pipeline.default_data_config()
  c.image_size = S
  c.embedded_length = 64
  c.embedded_val_per_photo = 2
  c.read_threads = 2
  c.prefetch = 8
  c.update(kw)
  return c


def _it(c, split="train", batch_size=4, seed=0, pi=0, pc=1, **kw):
  return pipeline.make_iterator(c, split=split, batch_size=batch_size, seed=seed,
                                process_index=pi, process_count=pc, **kw)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(a, b):
  return all(np.array_equal(x["image"], y["image"]) and np.array_equal(x["label"], y["label"])
             for x, y in zip(a, b, strict=True))


def _adm_center_crop_reference(pil_image, image_size):
  """guided-diffusion image_datasets.center_crop_arr, verbatim logic."""
  while min(*pil_image.size) >= 2 * image_size:
    pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
  scale = image_size / min(*pil_image.size)
  pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size),
                               resample=Image.BICUBIC)
  arr = np.array(pil_image)
  crop_y = (arr.shape[0] - image_size) // 2
  crop_x = (arr.shape[1] - image_size) // 2
  return arr[crop_y:crop_y + image_size, crop_x:crop_x + image_size]


def test_embedded_train_batches():
  c = _cfg()
  assert pipeline.num_classes(c) == len(sources.EMBEDDED_NAMES) == 11
  assert pipeline.num_examples(c, "train") == 64
  assert pipeline.num_examples(c, "val") == 22
  batches = _take(_it(c, batch_size=8), 4)
  for b in batches:
    assert set(b) == {"image", "label"}
    assert b["image"].shape == (8, S, S, 3) and b["image"].dtype == np.float32
    assert b["label"].shape == (8,) and b["label"].dtype == np.int32
    assert b["image"].min() >= -1.0 and b["image"].max() <= 1.0
    assert ((b["label"] >= 0) & (b["label"] < 11)).all()
  imgs = np.concatenate([b["image"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  assert imgs.std() > 0.1 and len(np.unique(labels)) >= 6  # real variety, many photos
  # Two samples of the same photo are different random crops.
  same_photo = np.flatnonzero(labels == labels[0])
  assert len(same_photo) >= 2 and not np.array_equal(imgs[same_photo[0]], imgs[same_photo[1]])


def test_embedded_regions_and_fixed_val():
  src_val = sources.EmbeddedPhotos("val", S, val_per_photo=3)
  for name, (train, val) in zip(sources.EMBEDDED_NAMES, src_val.regions):
    full = sources.load_embedded_photo(name)
    axis = 1 if full.shape[1] >= full.shape[0] else 0
    # Disjoint pieces of the same (maybe upscaled) photo; val strip >= S on every side.
    assert train.shape[1 - axis] == val.shape[1 - axis]
    assert min(val.shape[:2]) >= S and val.shape[axis] < train.shape[axis]
    joined = np.concatenate([train, val], axis=axis)
    assert max(joined.shape[:2]) >= 4 * S
    if joined.shape == full.shape:  # not upscaled: the val strip is the photo's last quarter
      np.testing.assert_array_equal(joined, full)
  for j in range(len(src_val)):
    p, top, left, side = src_val.val_box(j)
    val = src_val.regions[p][1]
    assert p == j % 11 and top + side <= val.shape[0] and left + side <= val.shape[1]
    rec = src_val[j]
    assert rec["label"] == p
    np.testing.assert_array_equal(rec["image"],
                                  transforms.crop_resize(val, (top, left, side), S))
  # The val stream is identical on every call, whatever the seed.
  c = _cfg()
  kw = dict(split="val", batch_size=11, shuffle=False, repeat=False)
  a, b = list(_it(c, seed=0, **kw)), list(_it(c, seed=5, **kw))
  assert len(a) == 2 and _same(a, b)
  np.testing.assert_array_equal(a[0]["label"], np.arange(11))


def test_same_seed_same_stream_and_disjoint_shards():
  c = _cfg()
  a, b, d = _take(_it(c, seed=3), 3), _take(_it(c, seed=3), 3), _take(_it(c, seed=4), 3)
  assert _same(a, b)
  assert not _same(a, d)
  # Two processes of the same job: different train samples ...
  p0, p1 = _take(_it(c, seed=3, pi=0, pc=2), 2), _take(_it(c, seed=3, pi=1, pc=2), 2)
  assert not any(np.array_equal(x, y) for bx, by in zip(p0, p1)
                 for x in bx["image"] for y in by["image"])
  # ... and the val shards are disjoint and together cover the split.
  kw = dict(split="val", batch_size=1, shuffle=False, repeat=False, pc=2)
  s0 = [x["image"][0].tobytes() for x in _it(c, pi=0, **kw)]
  s1 = [x["image"][0].tobytes() for x in _it(c, pi=1, **kw)]
  full = [x["image"][0].tobytes() for x in _it(c, split="val", batch_size=1, shuffle=False,
                                               repeat=False)]
  assert len(s0) == len(s1) == 11 and not set(s0) & set(s1)
  assert set(s0) | set(s1) == set(full)


def test_global_batches_independent_of_process_count():
  """1 process x batch 4 == 2 processes x batch 2, row block by row block, across an epoch
  boundary (64 examples = 16 global batches), with the random crop / flip keyed on the
  global sample; `seek` puts a fresh iterator at global batch j (a resume on another
  process count)."""
  c = _cfg()
  one = _take(_it(c, seed=3, batch_size=4), 20)
  p0, p1 = _it(c, seed=3, batch_size=2, pi=0, pc=2), _it(c, seed=3, batch_size=2, pi=1, pc=2)
  for j, want in enumerate(one):
    a, b = next(p0), next(p1)
    np.testing.assert_array_equal(np.concatenate([a["image"], b["image"]]), want["image"],
                                  err_msg=f"global batch {j}")
    np.testing.assert_array_equal(np.concatenate([a["label"], b["label"]]), want["label"])
  # the next epoch is another permutation
  assert not all(np.array_equal(one[k]["label"], one[16 + k]["label"]) for k in range(4))
  it = _it(c, seed=3, batch_size=2, pi=1, pc=2)
  pipeline.seek(it, 17)
  np.testing.assert_array_equal(next(it)["image"], one[17]["image"][2:])
  it = _it(c, seed=3, batch_size=4)
  pipeline.seek(it, 5)
  assert _same([next(it)], [one[5]])


def test_state_restore_gives_identical_next_batch(tmp_path):
  c = _cfg()
  it = _it(c, seed=1)
  _take(it, 3)
  state = it.get_state()
  expected = _take(it, 2)
  resumed = _it(c, seed=1)
  resumed.set_state(state)
  assert _same(_take(resumed, 2), expected)

  # Through orbax, as the trainer checkpoints it.
  ocp = pytest.importorskip("orbax.checkpoint")
  it = _it(c, seed=2)
  _take(it, 2)
  mngr = ocp.CheckpointManager(tmp_path / "ckpt")
  mngr.save(2, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
  mngr.wait_until_finished()
  expected = next(it)
  resumed = _it(c, seed=2)
  mngr.restore(2, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(resumed)))
  assert _same([next(resumed)], [expected])
  mngr.close()


def test_adm_center_crop_matches_reference():
  for name, size in (("chelsea", 64), ("astronaut", 256), ("rocket", 100)):
    photo = Image.open(sources.embedded_photo_path(name)).convert("RGB")
    ours = transforms.adm_center_crop(photo, size)
    ref = _adm_center_crop_reference(photo, size)
    assert ours.shape == (size, size, 3) and ours.dtype == np.uint8
    np.testing.assert_array_equal(ours, ref)
  # A 1-step bicubic resize is close but not equal: the BOX halving is really applied.
  photo = Image.open(sources.embedded_photo_path("astronaut")).convert("RGB")
  direct = np.asarray(photo.resize((64, 64), resample=Image.BICUBIC))
  ours = transforms.adm_center_crop(photo, 64)
  assert not np.array_equal(ours, direct)
  assert np.abs(ours.astype(int) - direct.astype(int)).mean() < 4
  # Random crop (guided-diffusion random_crop_arr) is reproducible from the rng.
  r1 = transforms.adm_random_crop(photo, 48, np.random.default_rng(0))
  r2 = transforms.adm_random_crop(photo, 48, np.random.default_rng(0))
  assert r1.shape == (48, 48, 3) and np.array_equal(r1, r2)


_FOLDER_PHOTOS = {"cat": "chelsea", "coffee": "coffee", "rocket": "rocket"}


def _write_photo(path, name, shift):
  photo = sources.load_embedded_photo(name)[shift:shift + 60, shift:shift + 80]
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(photo).save(path)
  return photo


def test_folder_source(tmp_path):
  root = tmp_path / "imgs"
  expected = {}
  for split, shifts in (("train", (0, 7)), ("val", (11,))):
    for cls, name in _FOLDER_PHOTOS.items():
      for k in shifts:
        ext = ".png" if k else ".PNG"  # extension match is case-insensitive
        p = str(root / split / cls / f"{k:02d}{ext}")
        expected[p] = _write_photo(p, name, k)
  c = _cfg(source="folder", root=str(root), random_flip=False)
  assert sources.ImageFolder(str(root), "train").classes == ("cat", "coffee", "rocket")
  assert pipeline.num_classes(c) == 3
  assert pipeline.num_examples(c, "train") == 6 and pipeline.num_examples(c, "val") == 3
  (b,) = list(_it(c, split="val", batch_size=3, shuffle=False, repeat=False))
  np.testing.assert_array_equal(b["label"], [0, 1, 2])
  for i, cls in enumerate(_FOLDER_PHOTOS):  # decoded exactly: ADM center crop of the file
    want = transforms.to_float(
        transforms.adm_center_crop(expected[str(root / "val" / cls / "11.png")], S))
    np.testing.assert_array_equal(b["image"][i], want)
  tb = next(_it(c, split="train", batch_size=6, shuffle=False))
  np.testing.assert_array_equal(tb["label"], [0, 0, 1, 1, 2, 2])

  # root/<class>/* without split folders: fixed seeded holdout for val.
  flat = tmp_path / "flat"
  for cls, name in _FOLDER_PHOTOS.items():
    for k in range(5):
      _write_photo(str(flat / cls / f"{k}.jpg"), name, 3 * k)
  tr, va = sources.ImageFolder(str(flat), "train"), sources.ImageFolder(str(flat), "val")
  paths_tr = {tr.path(i) for i in range(len(tr))}
  paths_va = {va.path(i) for i in range(len(va))}
  assert len(paths_va) == 3 and len(paths_tr) == 12 and not paths_tr & paths_va
  assert sorted(int(va[i]["label"]) for i in range(3)) == [0, 1, 2]
  sources._scan.cache_clear()
  assert paths_va == {p for p in (sources.ImageFolder(str(flat), "val").path(i)
                                  for i in range(3))}


def test_folder_errors(tmp_path):
  missing = tmp_path / "nope"
  with pytest.raises(FileNotFoundError, match=str(missing)):
    _it(_cfg(source="folder", root=str(missing)))
  empty = tmp_path / "empty"
  (empty / "a_class").mkdir(parents=True)
  (empty / "a_class" / "notes.txt").write_text("no images here")
  with pytest.raises(ValueError, match=str(empty)):
    _it(_cfg(source="folder", root=str(empty)))
  with pytest.raises(ValueError, match="class subfolders"):
    (tmp_path / "noclass").mkdir()
    _it(_cfg(source="folder", root=str(tmp_path / "noclass")))
  bad_root = tmp_path / "bad"
  _write_photo(str(bad_root / "ok" / "good.png"), "coffee", 0)
  bad = bad_root / "zz" / "broken.jpg"
  bad.parent.mkdir(parents=True)
  bad.write_bytes(b"\xff\xd8\xff garbage, not a jpeg" * 3)
  it = _it(_cfg(source="folder", root=str(bad_root)), split="train", batch_size=2,
           shuffle=False, repeat=False, drop_remainder=False)
  with pytest.raises(ValueError, match="broken.jpg"):
    next(it)


def test_tfds_not_prepared_and_decoding(tmp_path, monkeypatch):
  had_tf = "tensorflow" in sys.modules
  c = _cfg(source="tfds", tfds_data_dir=str(tmp_path / "tfds"))
  with pytest.raises(FileNotFoundError, match="not prepared") as e:
    _it(c)
  assert str(tmp_path / "tfds") in str(e.value) and "array_record" in str(e.value)
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "tfds")):
    pipeline.num_examples(c, "val")
  assert pipeline.num_classes(c) == 1000  # from the builder's code, nothing prepared
  assert had_tf or "tensorflow" not in sys.modules  # reading never imports TensorFlow

  # Records as tfds.data_source returns them with SkipDecoding: encoded JPEG bytes.
  def jpeg(name):
    buf = io.BytesIO()
    Image.fromarray(sources.load_embedded_photo(name)).save(buf, format="JPEG")
    return buf.getvalue()
  records = [{"image": jpeg(n), "label": np.int64(7 * i), "file_name": f"{n}.JPEG".encode()}
             for i, n in enumerate(("coffee", "rocket", "chelsea", "astronaut"))]
  seen = {}

  def fake_open(name, split, data_dir):
    seen.update(name=name, split=split, data_dir=data_dir)
    return records
  monkeypatch.setattr(sources, "open_tfds_source", fake_open)
  (b,) = list(_it(c, split="val", batch_size=4, shuffle=False, repeat=False))
  assert seen == {"name": "imagenet2012", "split": "validation",
                  "data_dir": str(tmp_path / "tfds")}
  np.testing.assert_array_equal(b["label"], [0, 7, 14, 21])
  assert b["image"].shape == (4, S, S, 3) and b["image"].dtype == np.float32
  ref = transforms.adm_center_crop(Image.open(io.BytesIO(records[1]["image"])), S)
  np.testing.assert_array_equal(b["image"][1], transforms.to_float(ref))
  # Train split: ADM random crop + flip, deterministic per seed.
  c.crop = "random"
  t1 = _take(_it(c, batch_size=2, seed=9), 3)
  assert _same(t1, _take(_it(c, batch_size=2, seed=9), 3))
  records[2]["image"] = b"\x00garbage"
  with pytest.raises(ValueError, match="chelsea.JPEG"):
    list(_it(c, split="val", batch_size=4, shuffle=False, repeat=False))


def test_mp_prefetch_matches_in_process():
  """One grain worker process gives the in-process stream and resumes exactly."""
  c = _cfg()
  ref = _take(_it(c, seed=6), 4)
  c.num_workers = 1
  it = _it(c, seed=6)
  try:
    got = _take(it, 2)
    state = it.get_state()
  finally:
    it.close()
  assert _same(got, ref[:2])
  it = _it(c, seed=6)
  try:
    it.set_state(state)
    assert _same(_take(it, 2), ref[2:])
  finally:
    it.close()


# ------------------------------------------------------------------------------------------
# Decoding every format / mode, empty classes, unreadable images (issue 10.5).


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
  b = io.BytesIO()
  img.save(b, fmt, **kw)
  return b.getvalue()


def test_decode_16bit_palette_rgba_cmyk_tif_gif():
  """16-bit greyscale PNG scaled by 65535/255 (32768 -> 128, 4096 -> 16; PIL's convert
  would give 255, white); palette with transparency, RGBA (alpha dropped), CMYK, LA, TIFF
  and GIF all give the expected 8-bit RGB (exact, except CMYK's JPEG: 3 levels)."""
  grey16 = Image.fromarray(np.array([[32768, 4096], [65535, 0]], np.uint16))
  data = _encode(grey16, "PNG")
  assert Image.open(io.BytesIO(data)).mode == "I;16"
  np.testing.assert_array_equal(np.asarray(transforms.decode_image(data))[..., 0],
                                [[128, 16], [255, 0]])
  assert np.asarray(transforms.decode_image(data)).shape == (2, 2, 3)
  assert np.asarray(transforms.decode_image(_encode(grey16, "TIFF")))[0, 0, 0] == 128

  rgb = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3) * 3
  rgba = Image.fromarray(np.concatenate([rgb, np.full((4, 6, 1), 7, np.uint8)], -1), "RGBA")
  np.testing.assert_array_equal(np.asarray(transforms.decode_image(_encode(rgba, "PNG"))), rgb)
  for fmt in ("TIFF", "BMP", "PNG"):
    np.testing.assert_array_equal(
        np.asarray(transforms.decode_image(_encode(Image.fromarray(rgb), fmt))), rgb, fmt)

  pal = Image.fromarray(np.array([[0, 1], [2, 1]], np.uint8), "P")
  pal.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
  want = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [0, 255, 0]]], np.uint8)
  for fmt, kw in (("PNG", {"transparency": 1}), ("GIF", {})):
    data = _encode(pal, fmt, **kw)
    assert Image.open(io.BytesIO(data)).mode == "P", fmt
    np.testing.assert_array_equal(np.asarray(transforms.decode_image(data)), want, fmt)

  cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))        # pure red
  got = np.asarray(transforms.decode_image(_encode(cmyk, "JPEG", quality=100))).astype(int)
  assert np.abs(got - [255, 0, 0]).max() <= 3
  la = Image.fromarray(np.stack([np.full((2, 2), 90, np.uint8), np.zeros((2, 2), np.uint8)],
                                -1), "LA")
  np.testing.assert_array_equal(np.asarray(transforms.decode_image(_encode(la, "PNG"))), 90)


def test_folder_lists_every_pil_format_and_empty_class_is_an_error(tmp_path):
  """.tif/.tiff/.gif classes count (IMAGE_EXTENSIONS comes from PIL); a class folder with
  no image file is a ValueError naming that folder, in both layouts."""
  assert {".tif", ".tiff", ".gif", ".jpg", ".png", ".webp"} <= set(sources.IMAGE_EXTENSIONS)
  img = Image.fromarray(np.full((40, 40, 3), 100, np.uint8))
  root = tmp_path / "fmt"
  for cls, ext in (("a", ".tif"), ("b", ".TIFF"), ("c", ".gif")):
    (root / cls).mkdir(parents=True)
    img.save(root / cls / f"0{ext}")
  src = sources.ImageFolder(str(root), "train", holdout_fraction=0.0)
  assert src.classes == ("a", "b", "c") and len(src) == 3
  assert [int(src[i]["label"]) for i in range(3)] == [0, 1, 2]
  assert src[0]["image"].shape == (40, 40, 3) and src[0]["image"].dtype == np.uint8
  (root / "d").mkdir()
  (root / "d" / "readme.txt").write_text("not an image")
  sources._scan.cache_clear()
  with pytest.raises(ValueError, match=f"class folder {root / 'd'} has no image files"):
    sources.ImageFolder(str(root), "train")
  split = tmp_path / "split"
  for s in ("train", "val"):
    (split / s / "a").mkdir(parents=True)
    img.save(split / s / "a" / "0.png")
  (split / "train" / "b").mkdir()
  img.save(split / "train" / "b" / "0.png")
  (split / "val" / "b").mkdir()
  with pytest.raises(ValueError, match=f"class folder {split / 'val' / 'b'} has no image"):
    sources.ImageFolder(str(split), "val")


def test_bad_images_skipped_then_fraction_stops(tmp_path):
  """A truncated and a garbage file among 10: skipped (logged, counted in .bad), the record
  becomes the next readable file, deterministic; over max_bad_fraction -> ValueError listing
  the bad paths. Through the pipeline the run stops with the file named."""
  root = tmp_path / "imgs"
  (root / "a").mkdir(parents=True)
  for k in range(8):
    Image.fromarray(np.full((8, 8, 3), 10 * k, np.uint8)).save(root / "a" / f"{k}.png")
  full = _encode(Image.fromarray(np.full((64, 64, 3), 5, np.uint8)), "JPEG")
  (root / "a" / "3b_truncated.jpg").write_bytes(full[:len(full) // 2])
  (root / "a" / "5b_garbage.png").write_bytes(b"\x89PNG not really" * 4)
  src = sources.ImageFolder(str(root), "train", holdout_fraction=0.0, max_bad_fraction=0.2)
  names = [os.path.basename(src.path(i)) for i in range(len(src))]
  i_trunc, i_garb = names.index("3b_truncated.jpg"), names.index("5b_garbage.png")
  recs = [src[i] for i in range(len(src))]
  assert os.path.basename(recs[i_trunc]["name"]) == names[i_trunc + 1]
  assert os.path.basename(recs[i_garb]["name"]) == names[i_garb + 1]
  assert sorted(map(os.path.basename, src.bad)) == ["3b_truncated.jpg", "5b_garbage.png"]
  np.testing.assert_array_equal(src[i_trunc]["image"], recs[i_trunc]["image"])

  strict = sources.ImageFolder(str(root), "train", holdout_fraction=0.0,
                               max_bad_fraction=0.1)   # 1 of 10 allowed, 2 found
  with pytest.raises(ValueError, match=r"2 unreadable images exceed "
                                       r"data.max_bad_fraction=0.1 of 10 .*3b_truncated.jpg, "
                                       r".*5b_garbage.png"):
    for i in range(len(strict)):
      strict[i]
  c = _cfg(source="folder", root=str(root), max_bad_fraction=0.0)
  with pytest.raises(ValueError, match=r"1 unreadable images exceed data.max_bad_fraction=0.0"
                                       r" of 9 .*(3b_truncated.jpg|5b_garbage.png)"):
    for _ in _it(c, batch_size=2, shuffle=False, repeat=False):   # 9: the 0.1 holdout
      pass


def test_content_fingerprints_change_with_the_data(tmp_path):
  """Caches derived from data are keyed on content: the folder fingerprint (and so the FID
  reference key) changes when an image is added; path_fingerprint when a file changes;
  both are stable otherwise."""
  from gae_jax.evaluation import generation  # pylint: disable=g-import-not-at-top
  root = tmp_path / "imgs"
  for cls in ("a", "b"):
    (root / "val" / cls).mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "val" / cls / "0.png")
  c = _cfg(source="folder", root=str(root))
  key = generation._data_key(c, "val", 10, "clean")
  fp = sources.ImageFolder(str(root), "val").fingerprint()
  assert generation._data_key(c, "val", 10, "clean") == key
  Image.fromarray(np.ones((8, 8, 3), np.uint8)).save(root / "val" / "b" / "1.png")
  sources._scan.cache_clear()
  assert sources.ImageFolder(str(root), "val").fingerprint() != fp
  assert generation._data_key(c, "val", 10, "clean") != key
  e = sources.EmbeddedPhotos("val", S, val_per_photo=2)
  assert e.fingerprint() == sources.EmbeddedPhotos("val", S, val_per_photo=2).fingerprint()
  assert e.fingerprint() != sources.EmbeddedPhotos("val", S, val_per_photo=3).fingerprint()
  before = sources.path_fingerprint(str(root))
  assert sources.path_fingerprint(str(root)) == before
  (root / "val" / "a" / "0.png").write_bytes(b"changed")
  assert sources.path_fingerprint(str(root)) != before
  with pytest.raises(FileNotFoundError, match="nope"):
    sources.path_fingerprint(str(tmp_path / "nope"))
