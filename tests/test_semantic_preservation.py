"""Stage 2's L_sp (latent / pre / post alignment) and the authors' teacher file import."""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gae_jax import configs_lib
from gae_jax import pretrained
from gae_jax import sharding as sharding_lib
from gae_jax.convert import teacher as convert_teacher
from gae_jax.models import dinov2 as dinov2_lib
from gae_jax.models import vfm as vfm_lib
from gae_jax.trainers import autoencoder

D = 8          # latent width of the tiny GAE and teacher
GRID = 4       # 32 px images / patch 8; VGG at 64 px / stride 16


def _teacher_dir(tmp_path, grid=GRID, name="teacher"):
  """A random-init VGG-feature teacher saved in the converted-directory layout."""
  fields = dict(vfm="vgg16_relu5_3", vfm_info=None, vfm_image_size=grid * 16,
                vfm_weights=None, channels=512, grid=grid, latent_dim=D,
                downsampler="attn_patchconv", window=1, num_heads=None, decoder_depth=1,
                decoder_num_heads=None, decoder_mlp_hidden=64, qk_norm="rms")
  model = convert_teacher.build_teacher(fields)
  params = nn.unbox(model.init(jax.random.key(3), jnp.zeros((1, grid, grid, 512))))["params"]
  dst = str(tmp_path / name)
  pretrained.save_converted(dst, params, fields, kind="teacher")
  return dst, params


def _config(align="latent", teacher=None, sp_weight=1.0, **teacher_fields):
  c = configs_lib.autoencoder_config("runlocal", latent_dim=D)
  c.data.image_size = 32
  c.batch_size = 2
  c.loss.sp_align = align
  c.loss.sp_weight = sp_weight
  c.teacher.init_from = teacher
  for k, v in teacher_fields.items():
    c.teacher[k] = v
  return c


def _setup(config):
  mesh = sharding_lib.make_mesh([("data", 1), ("fsdp", 1), ("tensor", 1)],
                                devices=jax.devices()[:1])
  s = autoencoder.Setup(config, mesh=mesh)
  return s, autoencoder.load_frozen(config, mesh), s.init_state()


def _images(n=2, size=32, seed=0):
  return jax.random.uniform(jax.random.key(seed), (n, size, size, 3), minval=-1, maxval=1)


def _sp(gparams, frozen, model, config, x):
  """L_sp alone, through the same forward (with the 'pre' feature capture) as train_step."""
  kw = dict(train=True, rngs={"noise": jax.random.key(0)})
  if config.loss.sp_align == "pre":
    (_, aux), inter = model.apply(
        {"params": gparams["gae"]}, x, capture_intermediates=lambda m, n: m.name == "encoder"
        and n == "__call__", mutable=["intermediates"], **kw)
    aux = {**aux, "features": inter["intermediates"]["encoder"]["__call__"][0]}
  else:
    _, aux = model.apply({"params": gparams["gae"]}, x, **kw)
  return autoencoder.semantic_loss(aux, x, frozen, config, gparams.get("sp_proj"))


def _nonzero(tree) -> bool:
  return any(np.any(np.asarray(a) != 0) for a in jax.tree.leaves(jax.device_get(tree)))


@pytest.mark.parametrize("align", ["latent", "pre", "post"])
def test_sp_gradients_reach_only_the_pixel_branch(tmp_path, align):
  teacher_dir, _ = _teacher_dir(tmp_path)
  config = _config(align, teacher_dir)
  s, frozen, state = _setup(config)
  gparams = jax.device_get(state.params["generator"])
  # Nothing of the teacher or the VFM is trainable or optimised.
  assert set(gparams) == ({"gae", "logvar"} if align == "latent"
                          else {"gae", "logvar", "sp_proj"})
  if align != "latent":   # learned map onto the 512 VGG channels: width 64 / d 8 -> 512
    assert gparams["sp_proj"]["kernel"].shape == ((64 if align == "pre" else D), 512)
  assert (frozen["teacher"].teacher is None) == (align != "latent")
  x = _images()
  # jitted: one program instead of hundreds of op-by-op compiles
  sp, grads = jax.jit(jax.value_and_grad(
      lambda gp, fr, x: _sp(gp, fr, s.model, config, x)))(gparams, frozen, x)
  assert float(sp) > 0
  g = grads["gae"]
  assert _nonzero(g["encoder"])
  assert not _nonzero(g["decoder"])
  assert not _nonzero(grads["logvar"])
  if align == "pre":
    assert not _nonzero(g["projector"])        # pre aligns the features before A_p
  else:
    assert _nonzero(g["projector"])
  if align != "latent":
    assert _nonzero(grads["sp_proj"])
  if align == "latent":
    # The frozen side sits behind stop_gradient: zero gradient w.r.t. every teacher/VFM array.
    fg = jax.jit(jax.grad(lambda fr: _sp(gparams, {"teacher": fr}, s.model, config, x)))(
        frozen["teacher"])
    assert not _nonzero(fg.vfm)
    assert not _nonzero(fg.teacher)


@pytest.mark.slow
def test_train_step_sp_weight_changes_only_encoder_side(tmp_path):
  """In the jitted step, lambda_sp changes the encoder's gradients, not the decoder's."""
  teacher_dir, _ = _teacher_dir(tmp_path)
  results = []
  for w in (0.0, 2.0):
    config = _config("latent", teacher_dir, sp_weight=w)
    config.optim.warmup_steps = 0
    s, frozen, state = _setup(config)
    batch = sharding_lib.to_global({"image": np.asarray(_images()),
                                    "label": np.zeros((2,), np.int32)}, s.data_sharding)
    before = jax.device_get(state.params["generator"])
    state, m = s.compile_train_step(frozen)(state, batch, frozen)
    after = jax.device_get(state.params["generator"])
    results.append((before, after, jax.device_get(m)))
  (b0, a0, m0), (b1, a1, m1) = results
  np.testing.assert_allclose(m0["sp"], m1["sp"], rtol=1e-5)     # same batch, same init
  assert m0["sp"] > 0
  delta = lambda a, b, k: jax.tree.map(lambda u, v: np.asarray(u) - np.asarray(v), a[k], b[k])
  enc0, enc1 = delta(a0, b0, "gae")["encoder"], delta(a1, b1, "gae")["encoder"]
  diffs = [np.max(np.abs(u - v)) for u, v in zip(jax.tree.leaves(enc0), jax.tree.leaves(enc1))]
  assert max(diffs) > 1e-5
  dec0, dec1 = delta(a0, b0, "gae")["decoder"], delta(a1, b1, "gae")["decoder"]
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, atol=1e-6), dec0, dec1)


def test_grid_and_config_errors(tmp_path):
  teacher_dir, _ = _teacher_dir(tmp_path, grid=8, name="t8")
  with pytest.raises(ValueError, match="grids must be equal"):
    autoencoder.semantic_spec(_config("latent", teacher_dir))
  with pytest.raises(ValueError, match="needs a VFM"):
    autoencoder.semantic_spec(_config("pre"))
  with pytest.raises(ValueError, match="needs config.teacher.init_from"):
    autoencoder.semantic_spec(_config("latent", None, vfm="vgg16_relu5_3"))
  with pytest.raises(ValueError, match="sp_align"):
    autoencoder.semantic_spec(_config("mid"))
  assert autoencoder.semantic_spec(_config("latent")) is None      # no teacher: L_sp = 0
  with pytest.raises(FileNotFoundError):
    pretrained.load_teacher(str(tmp_path / "nope"))


# ------------------------------------------------------------------------------ authors' file


def _tiny_dino():
  info = dict(variant=None, width=64, depth=1, num_heads=1, ffn="mlp", mlp_hidden=128,
              num_registers=0, patch_size=14, pos_grid=4, interpolate_offset=0.1,
              interpolate_antialias=False)
  model = dinov2_lib.DinoV2(**info)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, 56, 56, 3))))["params"]
  # Non-trivial LayerNorm / layer-scale values so a mix-up would show.
  params = jax.jit(lambda t: jax.tree.map(
      lambda a: a + 0.05 * jax.random.normal(jax.random.key(2), a.shape), t))(params)
  return params, info


def test_authors_teacher_file_round_trip(tmp_path):
  torch = pytest.importorskip("torch")
  fields = dict(channels=64, latent_dim=D, downsampler="attn_patchconv", window=2,
                num_heads=1, decoder_depth=2, decoder_num_heads=1, decoder_mlp_hidden=96,
                grid=16)
  model = convert_teacher.build_teacher(fields)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 64))))["params"]
  dino, info = _tiny_dino()
  sd = convert_teacher.to_torch_state_dict(params, fields, dino, info)
  assert "to_latent.weight" in sd and sd["to_latent.weight"].shape == (4 * D, 4 * 64)
  assert "base_model.model.blocks.0.attn.qkv.weight" in sd
  path = str(tmp_path / "latest.pth")
  torch.save({"epoch": 3, "model_state_dict": {k: torch.from_numpy(v) for k, v in sd.items()},
              "optimizer_state_dict": {}}, path)

  got, cfg, got_dino, got_info = convert_teacher.load_teacher_params(path)
  for k in ("channels", "latent_dim", "window", "decoder_depth", "decoder_mlp_hidden", "grid"):
    assert cfg[k] == fields[k], k
  jax.tree.map(np.testing.assert_array_equal, got, jax.tree.map(np.asarray, params))
  jax.tree.map(np.testing.assert_array_equal, got_dino, jax.tree.map(np.asarray, dino))

  handle = pretrained.load_teacher(path)
  assert handle.latent_shape == (16, 16, D)
  x = _images(2, 40, seed=5)              # any size: resize 224 + crop inside
  z = np.asarray(handle.latents(x))
  # Reference: our modules on the same weights, DINOv2 preprocessing as the VFM backend.
  backend = vfm_lib.dinov2(info, 224)
  feats = backend.features({"params": dino}, x)
  ref = model.apply({"params": params}, feats, method="latents")
  np.testing.assert_allclose(z, np.asarray(ref), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.sum(z ** 2, -1), D, rtol=1e-3)

  # The convert CLI writes a directory that loads alone to the same teacher.
  from gae_jax.convert import __main__ as convert_main
  dst = str(tmp_path / "converted")
  assert convert_main.main(["teacher", "--src", path, "--dst", dst]) == 0
  z2 = np.asarray(pretrained.load_teacher(dst).latents(x))
  np.testing.assert_allclose(z2, z, rtol=1e-5, atol=1e-5)

  # A broken file names the missing key.
  del sd["recon_head.weight"]
  bad = str(tmp_path / "bad.pth")
  torch.save({"model_state_dict": {k: torch.from_numpy(v) for k, v in sd.items()}}, bad)
  with pytest.raises(ValueError, match="recon_head.weight"):
    pretrained.load_teacher(bad)
