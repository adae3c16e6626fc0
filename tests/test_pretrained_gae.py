"""The authors' GAE checkpoint layout <-> gae_jax, and the `load_gae` handle.

The PyTorch reference below is written from the released architecture's formulas (SPEC
stage 2): RMSNorm without affine (eps 1e-6), fused qkv split [q | k | v] into 64-dim heads,
QK-RMSNorm, SwiGLU fc2(silu(fc1 x) * gate x), patch conv, unpatchify (p1, p2, c), latent
RMSNorm, and bicubic F.interpolate of inputs whose size differs from the encoder's.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from gae_jax import pretrained  # noqa: E402
from gae_jax.convert import gae as convert_gae_lib  # noqa: E402
from gae_jax.models import gae as gae_lib  # noqa: E402

SIZE = 64


def _photo(size: int) -> np.ndarray:
  """skimage's astronaut, resized, (1, size, size, 3) in [-1, 1]."""
  skimage_data = pytest.importorskip("skimage.data")
  from skimage import transform
  img = transform.resize(skimage_data.astronaut(), (size, size), anti_aliasing=True)
  return (img[None].astype(np.float32) * 2.0 - 1.0)


def _save_ckpt(path, sd: dict, extra: dict | None = None) -> str:
  state = {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}
  state.update(extra or {})
  torch.save({"state_dict": state, "epoch": 3}, path)
  return str(path)


# ---------------------------------------------------------------------------------------
# A PyTorch re-implementation of the authors' forward, from the formulas (float64).


def _rms(x):
  return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def _block(x, sd, b, heads):
  bsz, n, c = x.shape
  h = _rms(x)
  q, k, v = (h @ sd[b + "attn.qkv.weight"].T).split(c, dim=-1)
  q, k, v = (t.reshape(bsz, n, heads, c // heads).transpose(1, 2) for t in (q, k, v))
  q, k = _rms(q), _rms(k)
  att = torch.softmax(q @ k.transpose(-1, -2) * (c // heads) ** -0.5, dim=-1)
  o = (att @ v).transpose(1, 2).reshape(bsz, n, c)
  x = x + o @ sd[b + "attn.proj.weight"].T
  h = _rms(x)
  ff = F.silu(h @ sd[b + "mlp.fc1.weight"].T) * (h @ sd[b + "mlp.gate.weight"].T)
  return x + ff @ sd[b + "mlp.fc2.weight"].T


def _ref_encode(sd, x_nhwc, heads, depth, input_size):
  x = torch.from_numpy(np.array(x_nhwc)).double().permute(0, 3, 1, 2)
  if x.shape[-1] != input_size:
    x = F.interpolate(x, size=(input_size, input_size), mode="bicubic", align_corners=False)
  w = sd["foundation_encoder.patch_embed.weight"]
  h = F.conv2d(x, w, stride=w.shape[-1]).flatten(2).transpose(1, 2)
  h = h + sd["foundation_encoder.pos_embed"]
  for i in range(depth):
    h = _block(h, sd, f"foundation_encoder.blocks.{i}.", heads)
  h = _rms(h) @ sd["foundation_encoder.proj_out.weight"].T
  mu = _rms(h @ sd["adapter.model.weight"].T)
  g = int(round(mu.shape[1] ** 0.5))
  return mu.reshape(mu.shape[0], g, g, -1).numpy()


def _ref_decode(sd, z_nhwc, heads, depth, patch):
  z = torch.from_numpy(np.array(z_nhwc)).double()
  b, gh, gw, d = z.shape
  h = z.reshape(b, gh * gw, d) @ sd["decoder.z_proj.weight"].T + sd["decoder.pos_embed"]
  for i in range(depth):
    h = _block(h, sd, f"decoder.blocks.{i}.", heads)
  h = _rms(h) @ sd["decoder.linear_out.weight"].T  # (b, n, p*p*3) ordered (p1, p2, c)
  h = h.reshape(b, gh, gw, patch, patch, 3).permute(0, 1, 3, 2, 4, 5)
  return h.reshape(b, gh * patch, gw * patch, 3).numpy()


def _authors_state_dict(rng, width, depth, dec_width, dec_depth, patch, image, d):
  """Random weights in the authors' layout, written out by hand (not via export_gae)."""
  n = (image // patch) ** 2
  sd = {}

  def lin(key, out, inp):
    sd[key] = rng.normal(0.0, inp ** -0.5, (out, inp)).astype(np.float32)

  sd["foundation_encoder.patch_embed.weight"] = rng.normal(
      0.0, (3 * patch * patch) ** -0.5, (width, 3, patch, patch)).astype(np.float32)
  for prefix, w, depth_ in (("foundation_encoder.", width, depth), ("decoder.", dec_width,
                                                                      dec_depth)):
    sd[prefix + "pos_embed"] = rng.normal(0.0, 0.02, (1, n, w)).astype(np.float32)
    hidden = 256 * -(-int(w * 8 / 3) // 256)
    for i in range(depth_):
      b = f"{prefix}blocks.{i}."
      lin(b + "attn.qkv.weight", 3 * w, w)
      lin(b + "attn.proj.weight", w, w)
      lin(b + "mlp.fc1.weight", hidden, w)
      lin(b + "mlp.gate.weight", hidden, w)
      lin(b + "mlp.fc2.weight", w, hidden)
  lin("foundation_encoder.proj_out.weight", width, width)
  lin("adapter.model.weight", d, width)
  lin("decoder.z_proj.weight", dec_width, d)
  lin("decoder.linear_out.weight", patch * patch * 3, dec_width)
  return sd


# ---------------------------------------------------------------------------------------


def _random_params(model, x, seed: int = 1):
  """Params of `model`'s own tree and shapes (eval_shape: no compile), random values."""
  import flax.linen as nn
  shapes = nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), x)))["params"]
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.normal(0.0, 0.1, s.shape).astype(np.float32), shapes)


@pytest.fixture(scope="module")
def small_gae():
  """A GAE (width 128, depth 2, heads 2, patch 16, 64 px, d 16) with random params."""
  model = gae_lib.GAE(width=128, depth=2, num_heads=2, patch_size=16, latent_dim=16)
  x = jnp.asarray(_photo(SIZE))
  return model, _random_params(model, x), x


@pytest.fixture(scope="module")
def small_ckpt(small_gae, tmp_path_factory):
  _, params, _ = small_gae
  sd = convert_gae_lib.export_gae(params)
  extra = {"loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight":
           torch.zeros(64, 3, 4, 4)}
  return _save_ckpt(tmp_path_factory.mktemp("ckpt") / "gae.ckpt", sd, extra)


def test_round_trip_through_authors_layout(small_gae, small_ckpt):
  model, params, x = small_gae
  handle = pretrained.load_gae(small_ckpt)
  c = handle.config
  assert (c.width, c.depth, c.num_heads, c.patch_size, c.latent_dim, c.image_size) == (
      128, 2, 2, 16, 16, 64)
  assert (c.decoder_width, c.decoder_depth, c.decoder_num_heads) == (128, 2, 2)
  want_x, aux = jax.jit(model.apply)({"params": params}, x)
  want_mu = aux["mu"]
  mu = handle.encode(x)
  assert mu.shape == (1, 4, 4, 16)
  np.testing.assert_allclose(mu, want_mu, atol=1e-6)
  np.testing.assert_allclose(handle.decode(want_mu), want_x, atol=1e-6)
  np.testing.assert_allclose(handle.reconstruct(x), want_x, atol=1e-5)
  assert float(jnp.abs(want_x).mean()) > 0.1  # a non-degenerate output was compared
  # Latent norm: every token on the sphere of radius sqrt(d).
  np.testing.assert_allclose(jnp.linalg.norm(mu, axis=-1), 4.0, rtol=1e-4)
  # export(convert(export(p))) is the identity on the authors' layout.
  sd = convert_gae_lib.export_gae(params)
  sd2 = convert_gae_lib.export_gae(handle.params)
  assert sd.keys() == sd2.keys()
  for k in sd:
    np.testing.assert_array_equal(sd[k], sd2[k], err_msg=k)


def test_smaller_model_matches_pytorch_reference(tmp_path):
  """Other sizes are inferred from shapes; mu and decode agree with the torch formulas."""
  rng = np.random.default_rng(0)
  kw = dict(width=128, depth=1, dec_width=192, dec_depth=2, patch=16, image=SIZE, d=8)
  sd = _authors_state_dict(rng, **kw)
  path = _save_ckpt(tmp_path / "small.ckpt", sd)
  handle = pretrained.load_gae(path)
  c = handle.config
  assert (c.width, c.depth, c.num_heads) == (128, 1, 2)
  assert (c.decoder_width, c.decoder_depth, c.decoder_num_heads) == (192, 2, 3)
  assert (c.latent_dim, c.patch_size, c.image_size) == (8, 16, SIZE)
  tsd = {k: torch.from_numpy(v).double() for k, v in sd.items()}

  x = _photo(SIZE)
  mu = np.asarray(handle.encode(x))
  want = _ref_encode(tsd, x, heads=2, depth=1, input_size=SIZE)
  np.testing.assert_allclose(mu, want, atol=1e-4)
  # Another input size is resized to 64 with torch's bicubic first, as in the release.
  for other in (80, 48):
    x2 = _photo(other)
    np.testing.assert_allclose(handle.encode(x2), _ref_encode(tsd, x2, 2, 1, SIZE),
                               atol=1e-4, err_msg=f"input {other}px")
  img = np.asarray(handle.decode(mu))
  np.testing.assert_allclose(img, _ref_decode(tsd, mu, heads=3, depth=2, patch=16),
                             atol=1e-4)
  assert img.shape == (1, SIZE, SIZE, 3)


def test_conversion_errors(small_gae, tmp_path):
  _, params, _ = small_gae
  sd = convert_gae_lib.export_gae(params)
  missing = {k: v for k, v in sd.items() if k != "decoder.blocks.1.mlp.fc2.weight"}
  with pytest.raises(ValueError, match=r"missing.*decoder\.blocks\.1\.mlp\.fc2\.weight"):
    convert_gae_lib.convert_gae(missing)
  no_adapter = {k: v for k, v in sd.items() if k != "adapter.model.weight"}
  with pytest.raises(ValueError, match=r"adapter\.model\.weight"):
    convert_gae_lib.convert_gae(no_adapter)
  bad = dict(sd)
  bad["decoder.blocks.0.attn.proj.weight"] = np.zeros((128, 64), np.float32)
  with pytest.raises(ValueError) as e:
    convert_gae_lib.convert_gae(bad)
  msg = str(e.value)
  assert "decoder.blocks.0.attn.proj.weight" in msg
  assert "(128, 64)" in msg and "(128, 128)" in msg
  # The same errors surface through load_gae, naming the file.
  path = _save_ckpt(tmp_path / "bad.ckpt", bad)
  with pytest.raises(ValueError, match=r"bad\.ckpt.*decoder\.blocks\.0\.attn\.proj\.weight"):
    pretrained.load_gae(path)
  with pytest.raises(FileNotFoundError, match="nope.ckpt"):
    pretrained.load_gae(tmp_path / "nope.ckpt")
  with pytest.raises(FileNotFoundError):
    pretrained.load_gae(tmp_path)  # a directory that is no workdir


def test_convert_cli_then_load_dir(small_gae, small_ckpt, tmp_path, capsys):
  _, params, x = small_gae
  dst = tmp_path / "converted"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-m", "gae_jax.convert", "gae", "--src", small_ckpt,
                        "--dst", str(dst)], capture_output=True, text=True, env=env,
                       timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  handle = pretrained.load_gae(dst)
  assert handle.config.width == 128 and handle.config.image_size == SIZE
  # Bit-identical params (the round-trip test shows these give the original outputs).
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(handle.params), params)
  assert handle.encode(x).shape == (1, 4, 4, 16)
  # The checkpoints/ directory itself loads too; a second conversion refuses to overwrite.
  params2, config2 = pretrained.load_gae_params(dst / "checkpoints")
  assert config2.to_dict() == {k: v for k, v in handle.config.to_dict().items()
                               if k != "source"}
  jax.tree.map(np.testing.assert_array_equal, params2, jax.device_get(handle.params))
  from gae_jax.convert import __main__ as convert_main
  assert convert_main.main(["gae", "--src", small_ckpt, "--dst", str(dst)]) == 2
  assert "already holds a checkpoint" in capsys.readouterr().err
  assert convert_main.main(["gae", "--src", str(tmp_path / "missing.ckpt"), "--dst",
                            str(tmp_path / "d2")]) == 2
  assert "missing.ckpt" in capsys.readouterr().err

def test_dinov2_wrapper_file_and_converted_dir(tmp_path):
  """load_dinov2 on a tiny torch-hub file and on its `python -m gae_jax.convert` output."""
  from gae_jax.convert import __main__ as convert_main
  from gae_jax.convert import dinov2 as dinov2_convert
  from gae_jax.models import dinov2 as dinov2_lib
  info = dict(variant=None, width=64, depth=1, num_heads=1, ffn="mlp", pos_grid=4)
  model = dinov2_lib.DinoV2(**info)
  params = _random_params(model, jnp.zeros((1, 56, 56, 3)))
  src = tmp_path / "tiny_dinov2.pth"
  torch.save({k: torch.from_numpy(np.array(v)) for k, v in
              dinov2_convert.to_torch_hub(params, info).items()}, src)
  x = jnp.asarray(_photo(SIZE))  # 64 px: resized to 56 and normalised inside the handle
  _, full_info = dinov2_convert.load_dinov2_params(src, num_heads=1)
  want = jax.jit(dinov2_lib.DinoV2(**full_info).apply)(
      {"params": params}, dinov2_lib.preprocess(x, size=56))["patch_tokens"]
  handle = pretrained.load_dinov2(src, image_size=56, num_heads=1)
  tokens = handle.patch_tokens(x)
  assert tokens.shape == (1, 16, 64)
  np.testing.assert_allclose(tokens, want, atol=1e-5)
  dst = tmp_path / "dino_conv"
  assert convert_main.main(["dinov2", "--src", str(src), "--dst", str(dst),
                            "--num_heads", "1"]) == 0
  from_dir = pretrained.load_dinov2(dst, image_size=56)
  assert from_dir.info == handle.info
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(from_dir.params),
               jax.device_get(handle.params))
  with pytest.raises(ValueError, match="variant"):
    pretrained.load_dinov2(src, "L", num_heads=1)
  with pytest.raises(ValueError, match="dinov2"):
    pretrained.load_gae(dst)  # a DINOv2 directory is not a GAE


def test_handle_names_the_param_that_does_not_fit(small_gae, tmp_path):
  """A converted dir whose params do not fit its config fails naming the entry."""
  import copy
  _, params, _ = small_gae
  fields = dict(width=128, depth=2, num_heads=2, decoder_width=128, decoder_depth=2,
                decoder_num_heads=2, patch_size=16, latent_dim=16, image_size=SIZE)
  ok = pretrained.save_converted(str(tmp_path / "ok"), params, fields, kind="gae")
  assert pretrained.load_gae(ok).latent_shape == (SIZE // 16, SIZE // 16, 16)
  bad = copy.deepcopy(jax.device_get(params))
  bad["projector"]["kernel"] = np.zeros((3, 16), np.float32)
  path = pretrained.save_converted(str(tmp_path / "bad"), bad, fields, kind="gae")
  with pytest.raises(ValueError, match=r"bad.*projector/kernel has shape \(3, 16\)"):
    pretrained.load_gae(path)
  del bad["projector"]
  path = pretrained.save_converted(str(tmp_path / "lacks"), bad, fields, kind="gae")
  with pytest.raises(ValueError, match=r"lacks projector/kernel"):
    pretrained.load_gae(path)
