"""DINOv2 in Flax vs transformers' Dinov2Model / Dinov2WithRegistersModel (random weights).

Real widths and head counts of ViT-S (384, 6 heads) and ViT-B (768, 12 heads, 4 registers),
with the depth cut to 4 and 2 blocks to keep the CPU time low, plus a tiny SwiGLU model for
the ViT-g MLP. All parameters (LayerScale and LayerNorm included) are randomised so a
swapped or transposed tensor cannot hide behind a constant init. Inputs are real photos
through `preprocess`, at 224 (37x37 -> 16x16 positions) and 280 (-> 20x20).
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import skimage.data  # pylint: disable=g-import-not-at-top

from gae_jax.convert import dinov2 as convert_lib  # pylint: disable=g-import-not-at-top
from gae_jax.convert import torch_io  # pylint: disable=g-import-not-at-top
from gae_jax.models import dinov2 as dinov2_lib  # pylint: disable=g-import-not-at-top

TOL = 1e-4

CONFIGS = {
    # name: (config class name, model class name, kwargs)
    "S4": ("Dinov2Config", "Dinov2Model",
           dict(hidden_size=384, num_hidden_layers=4, num_attention_heads=6)),
    "B2_reg": ("Dinov2WithRegistersConfig", "Dinov2WithRegistersModel",
               dict(hidden_size=768, num_hidden_layers=2, num_attention_heads=12,
                    num_register_tokens=4)),
    "swiglu": ("Dinov2Config", "Dinov2Model",
               dict(hidden_size=192, num_hidden_layers=2, num_attention_heads=3,
                    use_swiglu_ffn=True)),
}


def _randomize(model, seed=0):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("lambda1"):
        p.copy_(0.25 + 0.5 * torch.rand(p.shape, generator=g))
      elif "norm" in name and name.endswith("weight"):
        p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
      else:
        p.copy_(0.05 * torch.randn(p.shape, generator=g))


_MODELS = {}


def hf_model(name):
  if name not in _MODELS:
    cfg_cls, model_cls, kw = CONFIGS[name]
    cfg = getattr(transformers, cfg_cls)(image_size=518, patch_size=14, **kw)
    model = getattr(transformers, model_cls)(cfg).eval()
    _randomize(model, seed=len(_MODELS))
    sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    _MODELS[name] = (model, sd, convert_lib.convert_dinov2(sd))
  return _MODELS[name]


@pytest.fixture(scope="module")
def photos_m11():
  """astronaut 512x512, chelsea 300x451, coffee 400x600 as [-1, 1] float32 HWC."""
  return [im.astype(np.float32) / 127.5 - 1.0 for im in
          (skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee())]


@pytest.fixture(scope="module")
def batches(photos_m11):
  return {size: np.concatenate([np.asarray(dinov2_lib.preprocess(jnp.asarray(im[None]), size))
                                for im in photos_m11]) for size in (224, 280)}


# ------------------------------------------------------------------------------ numerics


@pytest.mark.parametrize("grid,antialias,offset", [
    ((16, 16), False, 0.0), ((20, 20), False, 0.0), ((16, 16), True, 0.0),
    ((12, 20), True, 0.0), ((45, 50), False, 0.0), ((16, 16), False, 0.1),
    ((23, 30), False, 0.1)])
def test_pos_embed_interpolation_matches_torch(grid, antialias, offset):
  rng = np.random.default_rng(0)
  pos = rng.standard_normal((1, 37 * 37, 8)).astype(np.float32)
  mine = dinov2_lib.interpolate_pos_embed(jnp.asarray(pos), grid, antialias=antialias,
                                          offset=offset)
  t = torch.from_numpy(pos).reshape(1, 37, 37, 8).permute(0, 3, 1, 2)
  kw = (dict(scale_factor=((grid[0] + offset) / 37, (grid[1] + offset) / 37)) if offset
        else dict(size=grid))
  ref = torch.nn.functional.interpolate(t, mode="bicubic", align_corners=False,
                                        antialias=antialias, **kw)
  ref = ref.permute(0, 2, 3, 1).reshape(1, -1, 8).numpy()
  np.testing.assert_allclose(np.asarray(mine), ref, atol=2e-5, rtol=0)


def test_preprocess_matches_torchvision_tensor_pipeline(photos_m11):
  im = photos_m11[1]  # 300 x 451: resize to 224 x 336, crop the middle 224 columns
  mine = np.asarray(dinov2_lib.preprocess(jnp.asarray(im[None]), 224))
  x = torch.from_numpy((im + 1) / 2).permute(2, 0, 1)[None]
  x = torch.nn.functional.interpolate(x, size=(224, int(224 * 451 / 300)), mode="bicubic",
                                      align_corners=False, antialias=True)
  left = int(round((x.shape[-1] - 224) / 2))
  x = x[..., left:left + 224]
  mean = torch.tensor(dinov2_lib.IMAGENET_MEAN)[:, None, None]
  std = torch.tensor(dinov2_lib.IMAGENET_STD)[:, None, None]
  ref = ((x - mean) / std).permute(0, 2, 3, 1).numpy()
  assert mine.shape == (1, 224, 224, 3)
  np.testing.assert_allclose(mine, ref, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_with_transformers(name, batches):
  model, _, (params, info) = hf_model(name)
  r = info["num_registers"]
  flax_model = dinov2_lib.DinoV2(**info)
  apply = jax.jit(lambda p, x: flax_model.apply({"params": p}, x, return_intermediates=True))
  for size, x in batches.items():
    with torch.no_grad():
      ref = model(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2)),
                  output_hidden_states=True)
    out = apply(params, jnp.asarray(x))
    tokens = ref.last_hidden_state.numpy()
    n = (size // 14) ** 2
    assert out["patch_tokens"].shape == (3, n, flax_model.config["width"])
    np.testing.assert_allclose(out["patch_tokens"], tokens[:, 1 + r:], atol=TOL, rtol=0)
    np.testing.assert_allclose(out["cls"], tokens[:, 0], atol=TOL, rtol=0)
    assert out["registers"].shape == (3, r, flax_model.config["width"])
    np.testing.assert_allclose(out["registers"], tokens[:, 1:1 + r], atol=TOL, rtol=0)
    hidden = ref.hidden_states[1:]
    assert len(out["intermediates"]) == len(hidden)
    np.testing.assert_allclose(out["intermediates"][-1], hidden[-1].numpy(), atol=TOL, rtol=0)


def test_non_square_input_matches_transformers(batches):
  model, _, (params, info) = hf_model("swiglu")
  x = batches[280][:1, :224]  # 224 x 280 -> 16 x 20 patch grid
  with torch.no_grad():
    ref = model(pixel_values=torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))))
  out = jax.jit(dinov2_lib.DinoV2(**info).apply)({"params": params}, jnp.asarray(x))
  assert out["patch_tokens"].shape[1] == 16 * 20
  np.testing.assert_allclose(out["patch_tokens"], ref.last_hidden_state.numpy()[:, 1:],
                             atol=TOL, rtol=0)


# ------------------------------------------------------------------------------ layouts


def _hf_v5_to_legacy(sd):
  """transformers >= 5 in-memory names -> the names in released Hugging Face files."""
  out = {}
  for k, v in sd.items():
    if ".mlp.up_proj." in k:
      continue
    if ".mlp.gate_proj." in k:
      out[k.replace("gate_proj", "weights_in")] = np.concatenate(
          [v, sd[k.replace("gate_proj", "up_proj")]], 0)
      continue
    k = (k.replace("attention.q_proj", "attention.attention.query")
         .replace("attention.k_proj", "attention.attention.key")
         .replace("attention.v_proj", "attention.attention.value")
         .replace("attention.o_proj", "attention.output.dense")
         .replace("mlp.down_proj", "mlp.weights_out"))
    out[k] = v
  return out


def _hf_v5_to_hub(sd):
  """An independent (test-side) rename to the facebookresearch torch-hub layout."""
  out = {}
  for k, v in sd.items():
    if any(s in k for s in (".k_proj.", ".v_proj.", ".up_proj.")):
      continue
    if ".q_proj." in k:
      v = np.concatenate([v, sd[k.replace("q_proj", "k_proj")],
                          sd[k.replace("q_proj", "v_proj")]], 0)
    if ".gate_proj." in k:
      v = np.concatenate([v, sd[k.replace("gate_proj", "up_proj")]], 0)
    for a, b in (("embeddings.cls_token", "cls_token"), ("embeddings.mask_token", "mask_token"),
                 ("embeddings.position_embeddings", "pos_embed"),
                 ("embeddings.register_tokens", "register_tokens"),
                 ("embeddings.patch_embeddings.projection", "patch_embed.proj"),
                 ("encoder.layer.", "blocks."), ("attention.q_proj", "attn.qkv"),
                 ("attention.o_proj", "attn.proj"), ("layer_scale1.lambda1", "ls1.gamma"),
                 ("layer_scale2.lambda1", "ls2.gamma"), ("mlp.gate_proj", "mlp.w12"),
                 ("mlp.down_proj", "mlp.w3"), ("layernorm.", "norm.")):
      k = k.replace(a, b)
    out[k] = v
  return out


def _assert_same_params(a, b):
  fa, fb = torch_io.flatten_tree(a), torch_io.flatten_tree(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


@pytest.mark.parametrize("name", ["S4", "B2_reg", "swiglu"])
def test_all_layouts_give_the_same_params(name):
  _, sd, (params, info) = hf_model(name)
  assert convert_lib.detect_layout(sd) == ("hf_v5", "")
  legacy = {f"dinov2.{k}": v for k, v in _hf_v5_to_legacy(sd).items()}
  assert convert_lib.detect_layout(legacy) == ("hf", "dinov2.")
  p_legacy, info_legacy = convert_lib.convert_dinov2(legacy)
  _assert_same_params(p_legacy, params)
  assert info_legacy == info

  hub = _hf_v5_to_hub(sd)
  p_hub, info_hub = convert_lib.convert_dinov2(hub)
  _assert_same_params(p_hub, params)
  # torch-hub models without registers resize positions with the 0.1 offset.
  assert info_hub == dict(info, interpolate_offset=0.0 if info["num_registers"] else 0.1)

  exported = convert_lib.to_torch_hub(params, info)
  assert exported.keys() == hub.keys()
  for k in hub:
    if k != "mask_token":  # not used at inference, exported as zeros
      np.testing.assert_array_equal(exported[k], hub[k], err_msg=k)

  # Chunked training checkpoints: blocks.<chunk>.<global index>.
  chunked = {k.replace("blocks.1.", "blocks.1.1.").replace("blocks.0.", "blocks.0.0."): v
             for k, v in hub.items()}
  _assert_same_params(convert_lib.convert_dinov2(chunked)[0], params)


def test_released_sizes_are_recognised():
  """Shape inference on zero-stride dummies of the real S/B/L/g sizes (no memory used)."""
  for name, v in dinov2_lib.VARIANTS.items():
    for r in ((0, 4) if name == "S" else (0,)):
      info = dict(variant=name, num_registers=r)
      shapes = convert_lib.param_shapes(info)
      dummy = jax.tree.map(lambda s: np.broadcast_to(np.float32(0), s.shape), shapes)
      sd = convert_lib.to_torch_hub(dummy, info, contiguous=False)
      got, layout, _ = convert_lib.infer_config(sd)
      assert layout == "hub"
      assert got["variant"] == name and got["num_registers"] == r
      assert got["pos_grid"] == 37 and got["patch_size"] == 14
      assert got["mlp_hidden"] == (4096 if name == "g" else 4 * v["width"])
      assert got["interpolate_offset"] == (0.0 if r else 0.1)
      assert got["interpolate_antialias"] == bool(r)


# ------------------------------------------------------------------------------ errors


def test_bad_checkpoints_name_the_key():
  _, sd, _ = hf_model("S4")
  bad = dict(sd)
  del bad["encoder.layer.2.layer_scale2.lambda1"]
  with pytest.raises(ValueError, match=r"encoder\.layer\.2\.layer_scale2\.lambda1"):
    convert_lib.convert_dinov2(bad)

  bad = dict(sd)
  bad["encoder.layer.1.norm1.weight"] = np.zeros((383,), np.float32)
  with pytest.raises(ValueError, match=r"encoder\.layer\.1\.norm1\.weight.*\(383,\).*\(384,\)"):
    convert_lib.convert_dinov2(bad)

  bad = dict(sd)
  bad["encoder.layer.0.attention.q_proj.weight"] = np.zeros((384, 380), np.float32)
  with pytest.raises(ValueError, match=r"q_proj\.weight \(384, 380\)"):
    convert_lib.convert_dinov2(bad)

  bad = dict(sd, **{"classifier.weight": np.zeros((10, 768), np.float32)})
  with pytest.raises(ValueError, match=r"classifier\.weight"):
    convert_lib.convert_dinov2(bad)
  convert_lib.convert_dinov2(bad, strict=False)

  with pytest.raises(ValueError, match="cls_token"):
    convert_lib.convert_dinov2({"foo.weight": np.zeros(3)})


def test_torch_io_files_and_load_from_path(tmp_path, batches):
  _, sd, (params, info) = hf_model("swiglu")
  hub = _hf_v5_to_hub(sd)

  with pytest.raises(FileNotFoundError, match="nope.pth"):
    torch_io.load_torch_state_dict(tmp_path / "nope.pth")

  pth = tmp_path / "dino.pth"
  torch.save({"model": {k: torch.from_numpy(v) for k, v in hub.items()}, "epoch": 3}, pth)
  with pytest.raises(ValueError, match="subkey"):
    torch_io.load_torch_state_dict(pth)
  loaded = torch_io.load_torch_state_dict(pth, subkey="model")
  assert loaded.keys() == hub.keys()
  np.testing.assert_array_equal(loaded["blocks.1.mlp.w12.weight"], hub["blocks.1.mlp.w12.weight"])

  st = tmp_path / "dino.safetensors"
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(st))
  bf = tmp_path / "bf16.pt"
  torch.save({"w": torch.ones(2, 3, dtype=torch.bfloat16)}, bf)
  assert torch_io.load_torch_state_dict(bf)["w"].astype(np.float32).sum() == 6

  # From just a path: read + convert, then build the module and apply it.
  p_st, info_st = convert_lib.load_dinov2_params(st)
  _assert_same_params(p_st, params)
  p_pth, info_pth = convert_lib.load_dinov2_params(pth, subkey="model")
  _assert_same_params(p_pth, params)
  out = dinov2_lib.DinoV2(**info_st).apply({"params": p_st}, jnp.asarray(batches[224][:1]))
  assert out["patch_tokens"].shape == (1, 256, 192)
  assert np.isfinite(np.asarray(out["patch_tokens"])).all()
  with pytest.raises(ValueError, match="dino.pth"):
    convert_lib.load_dinov2_params(pth, subkey="model", num_heads=5)
