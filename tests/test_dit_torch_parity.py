"""Forward parity of the loaded LightningDiT against an independent float64 torch reference.

The reference (tests/torch_reference_dit.py) is written from the released model's code
(hustvl/LightningDiT, sii-research/GAE `models/lightningdit_we.py`) and runs on the state
dict itself; the checkpoint is written here in the authors' layout (random values, including
the pos_embed / RoPE buffers built by the released formulas) and read by our public loader
`gae_jax.pretrained.load_dit`. Nothing goes through `export_dit`, so a layout or formula
mistake made the same way in both conversion directions shows up here.

Tolerance: max |v_jax - v_ref| <= 1e-4 with the float32 JAX model on CPU against float64,
for velocities of standard deviation ~0.5-1 (measured: about 1e-6).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch_reference_dit as ref  # noqa: E402  (tests/ helper)

from gae_jax import flow  # noqa: E402
from gae_jax import pretrained  # noqa: E402

pytestmark = pytest.mark.torch

ATOL = 1e-4
LATENT, CHANNELS, CLASSES, DEPTH = 8, 32, 10, 2

# name: sizes, flags and how the file is written. heads=None: the loader infers them from
# the config's model_type (XL -> 16, B -> 12), else they are passed as num_heads=.
VARIANTS = {
    # GAE 800-epoch DiT config: QK-norm, RoPE, abs pos, SwiGLU, RMSNorm, patch 1.
    "800ep_qknorm_p1": dict(width=128, patch=1, qk_norm=True, use_rope=True, use_abs_pos=True,
                            model_type="LightningDiT-XL/1", heads=None, expect_heads=16),
    # 80-epoch config (no QK-norm), patch 2: patch-conv and unpatchify order.
    "80ep_p2": dict(width=96, patch=2, qk_norm=False, use_rope=True, use_abs_pos=True,
                    model_type="LightningDiT-B/2", heads=None, expect_heads=12),
    # GAE's use_abs_pos=False option: RoPE only, pos_embed left at zeros.
    "rope_no_abs_pos": dict(width=64, patch=1, qk_norm=True, use_rope=True,
                            use_abs_pos=False, model_type=None, heads=4, expect_heads=4),
    # A bare EMA state dict (no train wrapper, no config) of a model without RoPE.
    "bare_no_rope_p2": dict(width=64, patch=2, qk_norm=False, use_rope=False,
                            use_abs_pos=True, model_type=None, heads=4, expect_heads=4,
                            bare=True),
}


def _state_dict(v: dict, seed: int) -> dict:
  return ref.random_state_dict(
      np.random.default_rng(seed), width=v["width"], depth=DEPTH, num_heads=v["expect_heads"],
      patch=v["patch"], in_channels=CHANNELS, num_classes=CLASSES, latent=LATENT,
      qk_norm=v["qk_norm"], use_rope=v["use_rope"], use_abs_pos=v["use_abs_pos"])


def _train_config(v: dict, tmp_path) -> dict:
  """The released train config (configs/dit/gae_dit_d32_*.yaml as yaml.safe_load gives it)."""
  model = dict(in_chans=CHANNELS, model_type=v["model_type"], use_qknorm=v["qk_norm"],
               use_rmsnorm=True, use_rope=v["use_rope"], use_swiglu=True, wo_shift=False)
  if not v["use_abs_pos"]:
    model["use_abs_pos"] = False
  if model["model_type"] is None:
    del model["model_type"]
  return {"data": dict(data_path=str(tmp_path / "no_latents_here"), image_size=16 * LATENT,
                       num_classes=CLASSES, latent_norm=True, latent_multiplier=1.0),
          "vae": dict(downsample_ratio=16, latent_dim=CHANNELS), "model": model,
          "transport": dict(path_type="Linear", prediction="velocity"),
          "train": dict(global_seed=0, ckpt_every=20000)}


def _save(path, obj) -> str:
  to_t = lambda sd: {k: torch.from_numpy(np.array(a)) for k, a in sd.items()}
  if "ema" in obj:
    obj = dict(obj, model=to_t(obj["model"]), ema=to_t(obj["ema"]))
  else:
    obj = to_t(obj)
  torch.save(obj, path)
  return str(path)


def _inputs(batch: int = 4, seed: int = 0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(batch, LATENT, LATENT, CHANNELS)).astype(np.float32)
  t = np.array([0.02, 0.31, 0.77, 1.0][:batch], np.float32)
  y = np.array([0, 3, 9, CLASSES][:batch], np.int32)            # CLASSES = the null class
  return x, t, y


def _max_diff(got, want) -> float:
  return float(np.max(np.abs(np.asarray(got, np.float64) - want)))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_velocity_matches_float64_reference(name, tmp_path):
  v = VARIANTS[name]
  sd_model, sd_ema = _state_dict(v, 1), _state_dict(v, 2)
  if v.get("bare"):
    path = _save(tmp_path / "ema.pt", sd_ema)
  else:
    path = _save(tmp_path / "0100000.pt", {
        "model": sd_model, "ema": sd_ema, "opt": {"state": {}, "param_groups": []},
        "config": _train_config(v, tmp_path)})
  handle = pretrained.load_dit(path, num_heads=v["heads"])
  c = handle.config
  assert (c["width"], c["depth"], c["num_heads"], c["patch_size"], c["in_channels"]) == (
      v["width"], DEPTH, v["expect_heads"], v["patch"], CHANNELS)
  assert (c["qk_norm"], c["use_rope"], c["use_abs_pos"]) == (
      v["qk_norm"], v["use_rope"], v["use_abs_pos"])
  assert c["num_classes"] == CLASSES and handle.null_label == CLASSES
  assert c["latent_size"] == LATENT

  x, t, y = _inputs()
  want = ref.velocity(sd_ema, x, t, y, num_heads=v["expect_heads"])
  got = np.asarray(handle.velocity(x, t, y))
  assert got.shape == want.shape == (4, LATENT, LATENT, CHANNELS)
  assert want.std() > 0.2                     # a non-degenerate output is compared
  diff = _max_diff(got, want)
  print(f"{name}: max|diff| {diff:.3g} (velocity std {want.std():.3f})")
  assert diff <= ATOL, f"{name}: max |v_jax - v_torch64| = {diff:.3g} > {ATOL}"
  # The null-class row and the per-sample t matter: the reference on other labels / times
  # differs by far more than the tolerance.
  y_other = np.array([1, 3, 9, 0], np.int32)
  assert _max_diff(got, ref.velocity(sd_ema, x, t, y_other, num_heads=v["expect_heads"])) > 100 * ATOL
  assert _max_diff(got, ref.velocity(sd_ema, x, t[::-1].copy(), y,
                                     num_heads=v["expect_heads"])) > 100 * ATOL
  if name == "800ep_qknorm_p1":
    # use_ema=False reads 'model', not 'ema'.
    h_model = pretrained.load_dit(path, num_heads=v["heads"], use_ema=False)
    want_m = ref.velocity(sd_model, x, t, y, num_heads=v["expect_heads"])
    assert _max_diff(h_model.velocity(x, t, y), want_m) <= ATOL
    assert _max_diff(want_m, want) > 100 * ATOL


def test_cfg_velocity_matches_released_forward_with_cfg(tmp_path):
  """flow.cfg_velocity on the loaded DiT == the GAE release's forward_with_cfg (guidance
  on all channels, null class = num_classes, conditional below cfg_interval_start)."""
  v = VARIANTS["800ep_qknorm_p1"]
  sd = _state_dict(v, 3)
  handle = pretrained.load_dit(_save(tmp_path / "ema.pt", sd), num_heads=16)
  x, _, y = _inputs(3, seed=1)
  guided = jax.jit(flow.cfg_velocity(handle.velocity, 2.5, null_label=handle.null_label,
                                     interval_start=0.3))
  for t0 in (0.6, 0.1):                          # inside / outside the CFG interval
    t = np.full((3,), t0, np.float32)
    want = ref.velocity_with_cfg(sd, x, t, y, 2.5, 0.3, CLASSES, num_heads=16)
    got = guided(jnp.asarray(x), jnp.asarray(t), jnp.asarray(y))
    diff = _max_diff(got, want)
    print(f"cfg t={t0}: max|diff| {diff:.3g}")
    assert diff <= 2.5 * ATOL, f"t={t0}: max |diff| {diff:.3g}"
  cond = ref.velocity(sd, x, np.full((3,), 0.6, np.float32), y, num_heads=16)
  assert _max_diff(cond, ref.velocity_with_cfg(sd, x, np.full((3,), 0.6, np.float32), y,
                                               2.5, 0.3, CLASSES, num_heads=16)) > 100 * ATOL


def test_released_buffers_equal_the_tables_the_model_recomputes():
  """pos_embed and the RoPE buffers of the release (built here from their formulas, in
  float64) against the tables gae_jax recomputes instead of reading them."""
  from gae_jax.models import dit as dit_lib
  for width, heads, grid in ((128, 16, 8), (64, 4, 4), (1152, 16, 16)):
    pos = ref.pos_embed_table(width, grid)[0]
    np.testing.assert_allclose(dit_lib.sincos_pos_embed(width, grid, grid), pos, atol=1e-6)
    cos, sin = ref.rope_tables(width // heads, grid)
    ours_cos, ours_sin = dit_lib.rope_2d(width // heads, grid, grid)
    np.testing.assert_allclose(ours_cos, cos, atol=1e-6)
    np.testing.assert_allclose(ours_sin, sin, atol=1e-6)
  # The table is not symmetric in rows and columns, so a swapped meshgrid would show.
  assert np.abs(pos - ref.pos_embed_table(1152, 16)[0].reshape(16, 16, -1).transpose(
      1, 0, 2).reshape(256, -1)).max() > 0.5


def test_learn_sigma_checkpoint_is_refused_naming_the_key(tmp_path):
  """The released GAE DiTs have learn_sigma=False; a learn_sigma=True file (final linear
  with 2C outputs per pixel) is refused with the key and both shapes, not misread."""
  sd = ref.random_state_dict(np.random.default_rng(0), width=64, depth=1, num_heads=4,
                             patch=1, in_channels=CHANNELS, num_classes=CLASSES,
                             latent=LATENT, qk_norm=False, use_rope=True, learn_sigma=True)
  path = _save(tmp_path / "sigma.pt", sd)
  with pytest.raises(ValueError, match=r"final_layer\.linear\.weight.*\(64, 64\)"):
    pretrained.load_dit(path, num_heads=4)
