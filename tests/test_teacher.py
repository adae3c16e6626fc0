"""Stage 1 semantic teacher: downsamplers, windows, SVD fit, decoder, losses, VFM backends."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gae_jax import loading
from gae_jax.models import layers
from gae_jax.models import teacher as T
from gae_jax.models import vfm

C, D, H = 64, 8, 4   # tiny feature width, latent dim, grid


def _feats(seed=0, b=2, h=H, c=C):
  return jax.random.normal(jax.random.key(seed), (b, h, h, c)) * 3.0 + 0.5


def _sphere(z, d):
  np.testing.assert_allclose(np.sum(np.square(np.asarray(z)), -1), d, rtol=1e-4)


@pytest.mark.parametrize("w", [1, 2, 4])
def test_window_partition_reverse_exact_inverse(w):
  x = jax.random.normal(jax.random.key(w), (2, 8, 8, 3))
  win = T.window_partition(x, w)
  assert win.shape == (2 * (8 // w) ** 2, w * w, 3)
  # First window = top-left w x w block, tokens row-major (wy, wx).
  np.testing.assert_array_equal(win[0], x[0, :w, :w].reshape(w * w, 3))
  # Second window = next block to the right.
  if w < 8:
    np.testing.assert_array_equal(win[1], x[0, :w, w:2 * w].reshape(w * w, 3))
  np.testing.assert_array_equal(T.window_reverse(win, w, 8, 8), x)
  with pytest.raises(ValueError, match="not divisible"):
    T.window_partition(x[:, :7], 2 if w == 1 else w)


def test_windowed_linear_mixes_exactly_its_window():
  m = T.WindowedLinear(features=3, window=2)
  x = jax.random.normal(jax.random.key(0), (1, 8, 8, 5))
  v = nn.unbox(m.init(jax.random.key(1), x))
  assert v["params"]["kernel"].shape == (4 * 5, 4 * 3)
  y = m.apply(v, x)
  y2 = m.apply(v, x.at[0, 2, 3].add(1.0))          # token (2, 3) lies in window rows 2-3, cols 2-3
  changed = np.asarray(jnp.any(jnp.abs(y2 - y) > 1e-6, axis=-1))[0]
  expect = np.zeros((8, 8), bool)
  expect[2:4, 2:4] = True
  np.testing.assert_array_equal(changed, expect)
  # Reference: the released layout (flatten window as (wy, wx, c); output as (wy, wx, d)).
  k = np.asarray(v["params"]["kernel"])
  xn = np.asarray(x)
  ref = np.zeros((1, 8, 8, 3), np.float32)
  for gy in range(4):
    for gx in range(4):
      flat = xn[0, 2 * gy:2 * gy + 2, 2 * gx:2 * gx + 2].reshape(-1)
      ref[0, 2 * gy:2 * gy + 2, 2 * gx:2 * gx + 2] = (flat @ k).reshape(2, 2, 3)
  np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)


def test_attention_only_block_has_no_residual_and_no_mlp():
  x = _feats()[..., :C].reshape(2, H * H, C)
  block = T.AttentionOnlyBlock(num_heads=4)
  v = nn.unbox(block.init(jax.random.key(0), x))
  assert set(v["params"]) == {"attn"} and set(v["params"]["attn"]) == {"qkv", "proj"}
  # Output is exactly attn(RMSNorm(x)): recompute with a standalone layers.Attention.
  ref = jax.jit(layers.Attention(4).apply)({"params": v["params"]["attn"]}, layers.rms_normalize(x))
  np.testing.assert_allclose(jax.jit(block.apply)(v, x), ref, rtol=1e-5, atol=1e-5)
  # Zero output projection -> exactly zero (a residual block would return x).
  zero = jax.tree.map(jnp.zeros_like, v["params"]["attn"]["proj"])
  vz = {"params": {"attn": {**v["params"]["attn"], "proj": zero}}}
  assert float(jnp.max(jnp.abs(jax.jit(block.apply)(vz, x)))) == 0.0

  # Whole downsampler: nothing named mlp; zero attention -> zero latent (no input path).
  ds = T.make_downsampler("attn_patchconv", D, C, window=2, num_heads=4)
  dv = nn.unbox(ds.init(jax.random.key(1), _feats()))
  assert "mlp" not in str(jax.tree.map(lambda a: a.shape, dv))
  assert set(dv["params"]) == {"pos_embed", "projector_block", "to_latent"}
  dz = jax.tree.map(lambda a: a, dv)
  dz["params"]["projector_block"]["attn"]["proj"]["kernel"] = jnp.zeros_like(
      dv["params"]["projector_block"]["attn"]["proj"]["kernel"])
  assert float(jnp.max(jnp.abs(jax.jit(ds.apply)(dz, _feats())))) == 0.0


@pytest.mark.parametrize("kind,window", [("attn_patchconv", 2), ("attn_linear", 1),
                                         ("attn", 1), ("svd", 1)])
def test_teacher_variants_shapes_and_sphere(kind, window):
  f = _feats()
  m = T.SemanticTeacher(channels=C, latent_dim=D, downsampler=kind, window=window,
                        num_heads=4, decoder_depth=2)
  v = nn.unbox(m.init(jax.random.key(0), f))
  if kind == "svd":
    assert "downsampler" not in v["params"]          # fixed projection: not trainable
    assert np.isnan(np.asarray(m.apply(v, f)[1]["latent"])).all()   # unset -> NaN, loudly
    mean, comps = T.fit_svd(np.asarray(f).reshape(-1, C), D)
    v = T.set_svd(v, mean, comps)
  recon, aux = jax.jit(m.apply)(v, f)
  assert recon.shape == f.shape and recon.dtype == jnp.float32
  assert aux["latent"].shape == (2, H, H, D) and aux["latent"].dtype == jnp.float32
  _sphere(aux["latent"], D)
  _sphere(recon, C)
  _sphere(aux["target"], C)
  # Stage 2 path: latents() with the downsampler's variables only.
  only = {k: {"downsampler": c["downsampler"]} for k, c in v.items() if "downsampler" in c}
  np.testing.assert_allclose(m.apply(only, f, method="latents"), aux["latent"], atol=1e-5)


def test_teacher_gradients_reach_the_downsampler_not_the_target():
  f = _feats(1)
  m = T.SemanticTeacher(channels=C, latent_dim=D, num_heads=4, decoder_depth=1)
  v = m.init(jax.random.key(0), f)

  def loss(params, feats):
    recon, aux = m.apply({"params": params}, feats)
    return T.teacher_loss(recon, aux["target"])

  g = nn.unbox(jax.jit(jax.grad(loss))(v["params"], f))
  assert float(jnp.abs(g["downsampler"]["to_latent"]["kernel"]).max()) > 0
  assert float(jnp.abs(g["downsampler"]["pos_embed"]).max()) > 0
  assert float(jnp.abs(g["decoder"]["recon_head"]["kernel"]).max()) > 0
  # The VFM target is a constant: no gradient flows into it.
  recon = jax.random.normal(jax.random.key(2), f.shape)
  g_t = jax.grad(lambda ff: T.teacher_loss(recon, m.apply(v, ff, method="target")))(f)
  assert float(jnp.abs(g_t).max()) == 0.0


def test_decoder_structure():
  dec = T.FeatureDecoder(width=C, depth=2, num_heads=4)
  z = layers.rms_normalize(jax.random.normal(jax.random.key(0), (2, H, H, D)))
  v = nn.unbox(dec.init(jax.random.key(1), z))
  p = v["params"]
  assert set(p) == {"recon_head", "pos_embed", "decoder_layers_0", "decoder_layers_1"}
  assert p["recon_head"]["kernel"].shape == (D, C)                     # no bias
  assert p["decoder_layers_0"]["mlp"]["fc1"]["kernel"].shape == (C, layers.swiglu_hidden(C))
  leaves = jax.tree_util.tree_leaves_with_path(p)
  assert not [k for k, _ in leaves if "bias" in jax.tree_util.keystr(k)
              or "scale" in jax.tree_util.keystr(k)]                   # no biases, no norm weights
  out = dec.apply(v, z)
  assert out.shape == (2, H, H, C)
  _sphere(out, C)                                                      # ends in RMSNorm, no linear


def test_svd_fit_matches_numpy_svd():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(600, 12)) * np.linspace(4.0, 0.2, 12) @ np.linalg.qr(
      rng.normal(size=(12, 12)))[0] + rng.normal(size=12)
  for center in (True, False):
    mean, comps = T.fit_svd(x, 4, center=center)
    xc = x - x.mean(0) if center else x
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    ref = vt[:4].T
    np.testing.assert_allclose(mean, x.mean(0) if center else 0.0, atol=1e-5)
    np.testing.assert_allclose(np.abs(comps), np.abs(ref), atol=1e-4)
    np.testing.assert_allclose(comps @ comps.T, ref @ ref.T, atol=1e-4)   # same subspace
  # Streaming accumulation gives the same answer as one shot.
  acc = T.SVDAccumulator(12)
  for chunk in np.split(x, 3):
    acc.update(chunk)
  np.testing.assert_allclose(acc.finalize(4)[1], T.fit_svd(x, 4)[1], atol=1e-5)
  # The module applies RMSNorm((f - mean) @ V).
  ds = T.SVDDownsampler(latent_dim=4)
  f = jnp.asarray(x[:16].reshape(1, 4, 4, 12), jnp.float32)
  v = T.set_svd(ds.init(jax.random.key(0), f), *T.fit_svd(x, 4), path=())
  ref = layers.rms_normalize((f - T.fit_svd(x, 4)[0]) @ T.fit_svd(x, 4)[1])
  np.testing.assert_allclose(ds.apply(v, f), ref, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="components has shape"):
    T.set_svd(v, np.zeros(12), np.zeros((12, 5)), path=())


def test_cosine_loss_and_released_mse_relation():
  k1, k2 = jax.random.split(jax.random.key(0))
  a = jax.random.normal(k1, (3, 4, 4, 32))
  b = jax.random.normal(k2, (3, 4, 4, 32)) * 5.0 + a
  cos = T.cosine_loss(a, b)
  mse = T.normalized_mse_loss(a, b)
  np.testing.assert_allclose(mse, 2.0 * cos, rtol=1e-5)
  an, bn = layers.rms_normalize(a), layers.rms_normalize(b)
  np.testing.assert_allclose(jnp.mean(jnp.square(an - bn), -1),
                             2.0 * (1.0 - jnp.sum(an * bn, -1) / 32.0), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(T.cosine_loss(a, 7.0 * a), 0.0, atol=1e-6)   # scale invariant
  np.testing.assert_allclose(T.cosine_loss(a, -a), 2.0, atol=1e-6)
  np.testing.assert_allclose(T.teacher_loss(a, b, "cos"), cos)
  with pytest.raises(ValueError, match="unknown teacher loss"):
    T.teacher_loss(a, b, "l1")


def test_param_counts_match_paper_table13():
  """Tab. 13: E*_sp 316.95M (DINOv2-L + downsampler), D_sp 51.41M: reproduced with w = 4,
  L = 4 and the two pos-embeds (256 x 1024 each) left out of the paper's count."""
  f = jax.ShapeDtypeStruct((1, 16, 16, 1024), jnp.float32)
  m = T.SemanticTeacher(channels=1024, latent_dim=32, window=4, decoder_depth=4)
  p = jax.eval_shape(m.init, jax.random.key(0), f)["params"]
  pos = 256 * 1024
  down, dec = T.param_count(p["downsampler"]), T.param_count(p["decoder"])
  assert down - pos == 4 * 1024 ** 2 + (16 * 1024) * (16 * 32)
  assert dec - pos == 4 * (4 * 1024 ** 2 + 3 * 1024 * 2816) + 32 * 1024
  dino_l = 304_368_640   # DINOv2 ViT-L/14 incl. its 37x37 pos-embed and mask token
  assert round((dino_l + down - pos) / 1e6, 2) == 316.95
  assert round((dec - pos) / 1e6, 2) == 51.41
  # The released default w = 1: per-token 1024 -> 32.
  m1 = T.SemanticTeacher(channels=1024, latent_dim=32, window=1, decoder_depth=1)
  p1 = jax.eval_shape(m1.init, jax.random.key(0), f)["params"]
  assert T.param_count(p1["downsampler"]) == pos + 4 * 1024 ** 2 + 1024 * 32


def test_bad_inputs_fail_clearly():
  with pytest.raises(ValueError, match="unknown downsampler"):
    T.make_downsampler("conv", D)
  with pytest.raises(ValueError, match="has no window"):
    T.make_downsampler("attn", D, window=2)
  m = T.SemanticTeacher(channels=C + 1, latent_dim=D, num_heads=5)
  with pytest.raises(ValueError, match="C=65"):
    m.init(jax.random.key(0), _feats())


def test_vgg_backend_stride16_and_preprocessing():
  backend, params = loading.load_vfm("vgg16_relu5_3", image_size=64)
  assert (backend.grid, backend.channels) == (4, 512)
  assert vfm.vgg16_relu5_3(256).grid == 16
  x = jax.random.uniform(jax.random.key(0), (2, 64, 64, 3), minval=-1.0, maxval=1.0)
  f = jax.jit(backend.features)(params, x)
  assert f.shape == (2, 4, 4, 512) and f.dtype == jnp.float32
  _sphere(f, 512)
  # ImageNet mean/std on [0, 1] images, then relu5_3, then per-token RMSNorm.
  x01 = (x + 1) / 2
  xin = (x01 - jnp.array([0.485, 0.456, 0.406])) / jnp.array([0.229, 0.224, 0.225])
  raw = jax.jit(backend.module.apply)(params, xin)["relu5_3"]
  np.testing.assert_allclose(f, layers.rms_normalize(raw), rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="64x64"):
    backend.features(params, x[:, :48, :48])
  with pytest.raises(ValueError, match="needs weights"):
    loading.load_vfm("dinov2")


def test_matches_released_forward_in_torch():
  """E_sp + D_sp against a torch transcription of the released DinoReconstructor4D forward
  (w = 2, L = 1): window order, qkv split, no-residual projector block, norms."""
  torch = pytest.importorskip("torch")
  F = torch.nn.functional
  torch.manual_seed(0)
  c, d, w, heads, hid = 64, 8, 2, 2, 96
  rms = lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

  def attn(x, qkv, proj):
    b, n, _ = x.shape
    q, k, v = [t.view(b, n, heads, c // heads).transpose(1, 2) for t in (x @ qkv.T).split(c, -1)]
    o = F.scaled_dot_product_attention(rms(q), rms(k), v)
    return o.transpose(1, 2).reshape(b, n, c) @ proj.T

  shapes = dict(pos=(1, 16, c), qkv=(3 * c, c), proj=(c, c), tl=(w * w * d, w * w * c),
                rh=(c, d), pos2=(1, 16, c), dqkv=(3 * c, c), dproj=(c, c), fc1=(hid, c),
                gate=(hid, c), fc2=(c, hid))
  W = {k: torch.randn(*s) * 0.05 for k, s in shapes.items()}
  feat = torch.randn(2, 16, c) * 2
  x = rms(attn(rms(rms(feat) + W["pos"]), W["qkv"], W["proj"]))
  x = x.view(2, 2, w, 2, w, c).permute(0, 1, 3, 2, 4, 5).reshape(2, 4, w * w * c) @ W["tl"].T
  z = rms(x.view(2, 2, 2, w, w, d).permute(0, 1, 3, 2, 4, 5).reshape(2, 16, d))
  r = z @ W["rh"].T + W["pos2"]
  r = r + attn(rms(r), W["dqkv"], W["dproj"])
  h = rms(r)
  r = rms(r + (F.silu(h @ W["fc1"].T) * (h @ W["gate"].T)) @ W["fc2"].T)

  n = lambda a: jnp.asarray(a.numpy())
  qkv = lambda a: {"kernel": n(a.T).reshape(c, 3, heads, c // heads)}
  proj = lambda a: {"kernel": n(a.T).reshape(heads, c // heads, c)}
  p = {"downsampler": {"pos_embed": n(W["pos"]), "to_latent": {"kernel": n(W["tl"].T)},
                       "projector_block": {"attn": {"qkv": qkv(W["qkv"]),
                                                    "proj": proj(W["proj"])}}},
       "decoder": {"pos_embed": n(W["pos2"]), "recon_head": {"kernel": n(W["rh"].T)},
                   "decoder_layers_0": {
                       "attn": {"qkv": qkv(W["dqkv"]), "proj": proj(W["dproj"])},
                       "mlp": {k: {"kernel": n(W[k].T)} for k in ("fc1", "gate", "fc2")}}}}
  m = T.SemanticTeacher(channels=c, latent_dim=d, window=w, num_heads=heads,
                        decoder_depth=1, decoder_num_heads=heads, decoder_mlp_hidden=hid)
  fj = n(feat).reshape(2, 4, 4, c)
  shapes_ok = jax.eval_shape(m.init, jax.random.key(0), fj)["params"]
  assert jax.tree.structure(nn.unbox(shapes_ok)) == jax.tree.structure(p)
  rec, aux = jax.jit(m.apply)({"params": p}, fj)
  np.testing.assert_allclose(np.asarray(aux["latent"]).reshape(2, 16, d), z.numpy(), atol=2e-5)
  np.testing.assert_allclose(np.asarray(rec).reshape(2, 16, c), r.numpy(), atol=2e-5)


@pytest.mark.torch
@pytest.mark.parametrize("window,depth", [(1, 1), (2, 2)])
def test_released_file_matches_float64_torch_reference(tmp_path, window, depth):
  """A `latest.pth` in the released layout (random weights, tiny DINOv2 inside) read by
  `pretrained.load_teacher` against the float64 torch forward of DinoReconstructor4D
  (tests/torch_reference_teacher.py) on the same features; heads (C // 64), window,
  decoder depth and SwiGLU width come from the file. Tolerance: max |diff| <= 1e-4 with
  the float32 model vs float64 (measured ~1e-6) on RMS-normalised outputs (rms 1)."""
  torch = pytest.importorskip("torch")
  import torch_reference_teacher as ref  # tests/ helper
  from gae_jax import pretrained

  c, d = 128, 8
  sd = ref.random_state_dict(np.random.default_rng(window), channels=c, latent_dim=d,
                             window=window, decoder_depth=depth)
  path = str(tmp_path / "latest.pth")
  torch.save({"epoch": 7, "model_state_dict": {k: torch.from_numpy(v) for k, v in sd.items()},
              "optimizer_state_dict": {"state": {}, "param_groups": []},
              "scaler_state_dict": None, "scheduler_state_dict": {"last_epoch": 7}}, path)
  handle = pretrained.load_teacher(path)
  cfg = handle.config
  assert (cfg.channels, cfg.latent_dim, cfg.window, cfg.decoder_depth, cfg.grid) == (
      c, d, window, depth, 16)
  assert cfg.num_heads == cfg.decoder_num_heads == 2 and cfg.decoder_mlp_hidden == 512

  feats = np.asarray(_feats(seed=window, b=2, h=16, c=c))
  want_recon, want_z, want_target = ref.forward(sd, feats, window)
  recon, aux = jax.jit(handle.module.apply)(handle.variables, jnp.asarray(feats))
  z = jax.jit(lambda v, f: handle.module.apply(v, f, method="latents"))(
      handle.variables, jnp.asarray(feats))
  for name, got, want in (("latent", aux["latent"], want_z), ("latents()", z, want_z),
                          ("recon", recon, want_recon), ("target", aux["target"], want_target)):
    diff = float(np.max(np.abs(np.asarray(got, np.float64) - want)))
    print(f"teacher w={window} L={depth} {name}: max|diff| {diff:.3g}")
    assert diff <= 1e-4, f"{name}: max |jax - torch64| = {diff:.3g}"
  # Non-degenerate: the reference recon is not the target, and windows mix (w = 2).
  assert float(np.max(np.abs(want_recon - want_target))) > 0.5
