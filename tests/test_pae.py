"""PAE: released-layout loading against an independent float64 torch forward, and invariants.

The reference (tests/torch_reference_pae.py) is written from the authors' inference code
(ZhengrongYue/PAE 51f8fa6) and runs on the state dict itself, with the frozen VFM a float64
Hugging Face Dinov2WithRegistersModel whose final LayerNorm has weight = bias = None as in
the release. Checkpoints are written here as `torch.save({"model": state_dict})` with random
values at a tiny size (VFM width 128, 2 heads, patch 14 on 56 px -> a 4 x 4 grid, position
table 8 x 8 so it is resized; DAM depth 2; d = 16; decoder width 128, depth 2, patch 16 ->
64 px) and read by the public loader `gae_jax.pretrained.load_pae`.

Tolerance: max |z_jax - z_ref| and |x_jax - x_ref| <= 1e-4 (float32 JAX vs float64; measured
~1e-5 on z, ~1e-5 on images in [-1, 1]).
"""

import functools
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import torch_reference_pae as ref  # noqa: E402  (tests/ helper)

from gae_jax import pretrained  # noqa: E402
from gae_jax.convert import __main__ as convert_main  # noqa: E402
from gae_jax.convert import pae as convert_pae  # noqa: E402
from gae_jax.models import pae as pae_lib  # noqa: E402
from gae_jax.tokenizers import pae as pae_tokenizer  # noqa: E402

pytestmark = pytest.mark.torch

ATOL = 1e-4
WIDTH, HEADS, PATCH, GRID, LATENT = 128, 2, 14, 4, 16
DEC_WIDTH, DEC_HEADS, DEC_PATCH = 128, 2, 16
VFM_SIZE, IMAGE_SIZE = GRID * PATCH, GRID * DEC_PATCH   # 56, 64

_VFM = {}


def _vfm():
  if "m" not in _VFM:
    _VFM["m"] = ref.random_vfm(width=WIDTH, depth=2, heads=HEADS, patch=PATCH,
                               pos_image_size=8 * PATCH, seed=0)
  return _VFM["m"]


def _pae_sd(fusion="sft", cross=True, seed=0):
  return ref.random_pae_state_dict(
      np.random.default_rng(seed), width=WIDTH, heads=HEADS, patch=PATCH, grid=GRID,
      latent_dim=LATENT, dam_depth=2, decoder_width=DEC_WIDTH, decoder_depth=2,
      decoder_patch=DEC_PATCH, fusion=fusion, cross=cross)


def _save(path, sd, prefix=""):
  torch.save({"model": {prefix + k: torch.from_numpy(np.ascontiguousarray(v))
                        for k, v in sd.items()}}, path)
  return os.fspath(path)


def _with_vfm(sd):
  return {**{convert_pae.VFM_PREFIX + k: v for k, v in _vfm()[1].items()}, **sd}


def _images(n=2, seed=1):
  """Smooth-ish [-1, 1] images at the decoder size (64 px; resized to 56 for the VFM)."""
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(-1, 1, (n, 8, 8, 3)).astype(np.float32)
  fine = np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2)
  return np.clip(fine + 0.2 * rng.standard_normal(fine.shape), -1, 1).astype(np.float32)


def _reference(sd, images, fusion):
  x01 = torch.from_numpy((images + 1.0) / 2.0).permute(0, 3, 1, 2).to(ref.DTYPE)
  z, _ = ref.encode(sd, _vfm()[0], x01, size=VFM_SIZE, heads=HEADS, fusion=fusion)
  rec = ref.decode(sd, z, heads=HEADS, decoder_heads=DEC_HEADS)
  return z.permute(0, 2, 3, 1).numpy(), (rec.permute(0, 2, 3, 1).numpy() * 2.0 - 1.0)


def _check_parity(handle, sd, fusion):
  images = _images()
  z = np.asarray(handle.encode(images))
  rec = np.asarray(handle.decode(z))
  z_ref, rec_ref = _reference(sd, images, fusion)
  assert z.shape == (2, GRID, GRID, LATENT) and rec.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3)
  dz, dx = np.abs(z - z_ref).max(), np.abs(rec - rec_ref).max()
  print(f"PAE parity ({fusion}): max|dz| {dz:.2e}, max|dx| {dx:.2e}, "
        f"|x_ref| max {np.abs(rec_ref).max():.2f}")
  assert dz <= ATOL and dx <= ATOL, (dz, dx)
  # the end-to-end path too: reconstruct == decode(encode)
  np.testing.assert_allclose(np.asarray(handle.reconstruct(images)), rec, atol=1e-5)
  return z


def test_released_file_matches_reference_and_converts_once(tmp_path):
  sd = _with_vfm(_pae_sd("sft"))
  src = _save(tmp_path / "ep-last.pt", sd)
  handle = pretrained.load_pae(src)
  assert handle.family == "pae" and handle.latent_shape == (GRID, GRID, LATENT)
  assert handle.image_size == IMAGE_SIZE and handle.config.vfm_image_size == VFM_SIZE
  assert handle.config.fusion == "sft" and handle.config.dam_depth == 2
  assert "norm" not in handle.params["vfm"]        # affine-free final LayerNorm
  z = _check_parity(handle, sd, "sft")
  # python -m gae_jax.convert pae writes a directory that loads to the same latents
  dst = os.fspath(tmp_path / "converted")
  assert convert_main.main(["pae", "--src", src, "--dst", dst]) == 0
  again = pretrained.load_pae(dst)
  np.testing.assert_array_equal(np.asarray(again.encode(_images())), z)


def test_file_without_vfm_takes_vfm_weights_and_prefixes(tmp_path):
  """`module._orig_mod.` prefixes, concat fusion, the VFM from an HF directory whose final
  LayerNorm still has its affine (dropped on load, as the release does)."""
  sd = _pae_sd("concat", seed=1)
  src = _save(tmp_path / "pae_novfm.pt", sd, prefix="module._orig_mod.")
  with pytest.raises(ValueError, match=r"no frozen VFM.*vfm_weights"):
    pretrained.load_pae(src)
  hf_dir = tmp_path / "dinov2-with-registers"
  hf_dir.mkdir()
  vsd = dict(_vfm()[1])
  vsd["layernorm.weight"] = np.full((WIDTH,), 3.0, np.float32)   # must be ignored
  vsd["layernorm.bias"] = np.full((WIDTH,), -1.0, np.float32)
  torch.save({k: torch.from_numpy(v) for k, v in vsd.items()}, hf_dir / "pytorch_model.bin")
  handle = pretrained.load_pae(src, vfm_weights=os.fspath(hf_dir))
  assert handle.config.fusion == "concat"
  _check_parity(handle, {**_with_vfm({}), **sd}, "concat")


def _one_line_error(path, match):
  with pytest.raises(ValueError, match=match) as e:
    pretrained.load_pae(path)
  assert "\n" not in str(e.value) and os.fspath(path) in str(e.value)


def test_bad_files_name_the_key(tmp_path):
  sd = _with_vfm(_pae_sd("add", seed=2))
  _one_line_error(_save(tmp_path / "extra.pt", {**sd, "decoder.extra.weight": np.ones(3)}),
                  r"decoder\.extra\.weight")
  _one_line_error(_save(tmp_path / "stray.pt", {**sd, "projector.weight": np.ones(3)}),
                  r"unexpected key 'projector\.weight'")
  missing = {k: v for k, v in sd.items() if k != "latent_compressor.1.bias"}
  _one_line_error(_save(tmp_path / "missing.pt", missing), r"latent_compressor\.1\.bias")
  bad_table = {**sd, "decoder.decoder_pos_embed": sd["decoder.decoder_pos_embed"] + 0.5}
  _one_line_error(_save(tmp_path / "table.pt", bad_table), r"decoder\.decoder_pos_embed")
  wide = {**sd, "delta_encoder.fusion_proj.weight": np.ones((3 * WIDTH, WIDTH), np.float32)}
  _one_line_error(_save(tmp_path / "fusion.pt", wide), r"fusion_proj\.weight")
  torch.save({"state_dict": {}}, tmp_path / "other.pt")
  _one_line_error(tmp_path / "other.pt", r"no subkey 'model'")


def test_sincos_table_is_the_released_one():
  for dim, grid in ((128, 4), (64, 8)):
    np.testing.assert_allclose(pae_lib.sincos_2d(dim, grid), ref.sincos_table(dim, grid)[0],
                               atol=1e-6)
  np.testing.assert_allclose(pae_lib.sincos_2d(64, 3, cls_token=True),
                             ref.sincos_table(64, 3, cls_token=True)[0], atol=1e-6)


def _init(fusion, norm_type="per-token", seed=0):
  model = pae_lib.make_pae({"variant": "mu", "latent_dim": 8}, fusion=fusion,
                           norm_type=norm_type)
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  g, p = 4, 7
  x = jax.random.normal(k1, (2, g * p, g * p, 3))
  h = 3.0 * jax.random.normal(k2, (2, g * g, model.width)) + 1.0
  # jitted: one program each instead of ~100 op-by-op compiles (the suite's time is compiling)
  params = jax.jit(model.init)(k3, x, h)["params"]
  z, aux = jax.jit(functools.partial(model.apply, method="encode"))({"params": params}, x, h)
  return model, params, x, h, z, aux


@pytest.mark.parametrize("fusion", ["sft", "add"])
def test_zero_initialised_fusion_is_layernorm_of_the_vfm_tokens(fusion):
  _, _, _, h, _, aux = _init(fusion)
  mu = h.mean(-1, keepdims=True)
  ln = (h - mu) / jnp.sqrt(((h - mu) ** 2).mean(-1, keepdims=True) + pae_lib.DAM_LN_EPS)
  np.testing.assert_allclose(np.asarray(aux["h_z"]), np.asarray(ln), atol=2e-5)
  assert float(jnp.abs(aux["delta"]).max()) > 0   # the DAM stream itself is not zero


def test_other_fusions_and_the_sphere():
  model, params, x, h, z, aux = _init("concat")
  assert aux["h_z"].shape == h.shape and z.shape == (2, 4, 4, 8)
  zp = np.asarray(aux["z_pre"], np.float64)
  ms = (zp ** 2).mean(-1, keepdims=True)
  np.testing.assert_allclose(np.asarray(z), zp / np.sqrt(ms + 1e-6), rtol=1e-5, atol=1e-6)
  radius = np.linalg.norm(np.asarray(z), axis=-1)                  # per token: sqrt(d) up
  np.testing.assert_allclose(radius, math.sqrt(8), rtol=2e-3)      # to eps / mean(z_pre^2)
  assert not np.allclose(np.linalg.norm(zp, axis=-1), math.sqrt(8), rtol=0.1)
  out = model.apply({"params": params}, z, method="decode")
  assert out.shape == (2, 4 * 8, 4 * 8, 3)                         # mu: decoder patch 8
  _, _, _, _, z_none, aux_none = _init("none")
  np.testing.assert_array_equal(np.asarray(aux_none["h_z"]), np.asarray(aux_none["delta"]))
  _, _, _, _, z_s, _ = _init("sft", norm_type="per-sample")
  np.testing.assert_allclose(np.linalg.norm(np.asarray(z_s).reshape(2, -1), axis=-1),
                             math.sqrt(4 * 4 * 8), rtol=2e-3)      # per sample: sqrt(ghwd)
  assert np.linalg.norm(np.asarray(z_s), axis=-1).std() > 1e-3      # tokens not each on it
  with pytest.raises(ValueError, match="fusion 'film'"):
    pae_lib.make_pae({"variant": "mu"}, fusion="film").init(jax.random.key(0), x, h)
  with pytest.raises(ValueError, match="unknown field"):
    pae_lib.make_pae({"variant": "mu", "depth": 3})


def test_param_counts_of_the_released_size():
  """PAE_SPEC §2.6 (DINOv2-L/14-reg, DAM 6 x 1024, d = 32, ViT-L decoder)."""
  config = ml_collections.ConfigDict(dict(
      model=dict(variant="L", latent_dim=32),
      vfm=dict(variant="L", num_registers=4, patch_size=14, pos_grid=37, image_size=224,
               final_norm_affine=False)))
  c = pae_lib.param_counts(config)
  assert c == {"vfm": 304_369_664, "dam": 103_496_704, "compressor": 4_490_272,
               "decompressor": 4_491_264, "decoder": 304_149_248, "trainable": 416_627_488}


def test_a_pae_training_workdir_opens_like_the_trainer_reconstructs(tmp_path):
  """A `stage: pae` workdir (trainer layout: params/generator, the run's seeded random VFM)
  through load_pae and open_tokenizer gives the trainer's own `reconstruct`."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from gae_jax import configs_lib  # pylint: disable=g-import-not-at-top
  from gae_jax.trainers import pae as pae_trainer  # pylint: disable=g-import-not-at-top
  from gae_jax.trainers import pae_common  # pylint: disable=g-import-not-at-top
  config = configs_lib.pae_config("runlocal")
  vfm = pae_common.resolve_vfm(config.vfm)
  frozen = {"vfm": pae_common.load_vfm_variables(vfm)}
  model = pae_trainer.build_model(config, vfm)
  s, n = vfm.image_size, vfm.grid * vfm.grid
  params = jax.jit(model.init)(jax.random.key(3), jnp.zeros((1, s, s, 3)),
                               jnp.zeros((1, n, vfm.width)))
  params = jax.tree.map(np.asarray, nn.meta.unbox(params["params"]))
  # a trained-looking decoder: the zero-initialised fusion and CLS would hide layout errors
  params = jax.tree.map(lambda a: a + 0.02 * np.random.default_rng(a.size).standard_normal(
      a.shape).astype(a.dtype), params)
  (tmp_path / "config.json").write_text(config.to_json_best_effort())
  with ocp.CheckpointManager(tmp_path / "checkpoints", item_names=("state",),
                             options=ocp.CheckpointManagerOptions(create=True)) as mngr:
    mngr.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(
        {"step": np.zeros((), np.int32), "params": {"generator": params}})))
    mngr.wait_until_finished()
  images = _images(n=2, seed=4)
  want = jax.jit(functools.partial(pae_trainer.reconstruct, model=model, vfm=vfm))(
      params, jnp.asarray(images), frozen)
  handle = pretrained.open_tokenizer(os.fspath(tmp_path))   # dispatches to load_pae
  assert isinstance(handle, pae_tokenizer.PAEHandle)
  assert handle.image_size == config.data.image_size and handle.latent_shape == (8, 8, 32)
  np.testing.assert_allclose(np.asarray(handle.reconstruct(images)), np.asarray(want),
                             atol=1e-5)


def test_vfm_input_is_torch_bicubic_256_to_224_in_float32():
  """The release's input path in float32 torch: F.interpolate(bicubic, align_corners=False,
  no antialias) 256 -> 224, then ImageNet mean/std."""
  x = np.random.default_rng(5).uniform(0, 1, (1, 256, 256, 3)).astype(np.float32)
  t = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(224, 224),
                                      mode="bicubic", align_corners=False)
  mean = torch.tensor(ref.MEAN).view(1, 3, 1, 1)
  std = torch.tensor(ref.STD).view(1, 3, 1, 1)
  want = ((t - mean) / std).permute(0, 2, 3, 1).numpy()
  got = np.asarray(pae_lib.vfm_inputs(jnp.asarray(x), 224))
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
  other = pae_lib.vfm_inputs(jax.image.resize(jnp.asarray(x), (1, 224, 224, 3), "cubic"), 224)
  assert np.abs(np.asarray(other) - want).max() > 1e-2   # jax's cubic (a = -0.5, antialias)
