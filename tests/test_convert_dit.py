"""The authors' DiT checkpoint layout <-> gae_jax: export, load back, sizes, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from gae_jax import pretrained  # noqa: E402
from gae_jax.convert import dit as dit_convert  # noqa: E402
from gae_jax.models import dit as dit_lib  # noqa: E402

KW = dict(width=64, depth=2, num_heads=4, patch_size=1, in_channels=4, num_classes=10,
          class_dropout_prob=0.1, qk_norm=True, use_rope=True, use_abs_pos=True,
          latent_size=4)


def _random_params(kw, seed=0):
  """Random (not zero-init) params so every weight matters for the outputs."""
  ref = dit_convert.reference_params(kw)
  leaves, tree = jax.tree.flatten(ref)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  vals = [np.asarray(0.1 * jax.random.normal(k, l.shape)) for k, l in zip(keys, leaves)]
  return jax.tree.unflatten(tree, vals)


def _save_pt(path, sd, ema=None, config=None):
  as_t = lambda d: {k: torch.from_numpy(np.array(v)) for k, v in d.items()}
  torch.save({"model": as_t(sd), "ema": as_t(ema if ema is not None else sd),
              "opt": {"state": {}, "param_groups": []}, "config": config or {}}, path)
  return str(path)


def test_export_load_roundtrip_identical(tmp_path):
  params, ema = _random_params(KW, 0), _random_params(KW, 1)
  sd, sd_ema = dit_convert.export_dit(params, KW), dit_convert.export_dit(ema, KW)
  assert sd["blocks.1.attn.qkv.weight"].shape == (192, 64)
  assert sd["x_embedder.proj.weight"].shape == (64, 4, 1, 1)
  assert sd["y_embedder.embedding_table.weight"].shape == (11, 64)   # + null class
  assert sd["pos_embed"].shape == (1, 16, 64)
  config = {"model": {"model_type": "LightningDiT-mu/1", "use_qknorm": True,
                      "use_rope": True, "use_swiglu": True, "use_rmsnorm": True}}
  path = _save_pt(tmp_path / "0100000.pt", sd, sd_ema, config)
  mean, std = np.linspace(-1, 1, 4).astype(np.float32), np.linspace(0.5, 2, 4).astype(
      np.float32)
  torch.save({"mean": torch.from_numpy(mean).reshape(1, 4, 1, 1),
              "std": torch.from_numpy(std).reshape(1, 4, 1, 1)}, tmp_path / "latents_stats.pt")
  h = pretrained.load_dit(path, num_heads=4)            # EMA weights, stats found beside
  assert h.config["qk_norm"] and h.num_classes == 10 and h.null_label == 10
  np.testing.assert_allclose(np.asarray(h.mean), mean)
  np.testing.assert_allclose(np.asarray(h.std), std)
  model = dit_lib.LightningDiT(**{k: v for k, v in KW.items() if k != "latent_size"})
  x = jax.random.normal(jax.random.key(2), (3, 4, 4, 4))
  t = jnp.array([0.1, 0.5, 0.9])
  y = jnp.array([1, 7, 10])                              # 10 = null class
  apply = jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y))
  want = apply(ema, x, t, y)
  np.testing.assert_array_equal(np.asarray(h.velocity(x, t, y)), np.asarray(want))
  h_model = pretrained.load_dit(path, num_heads=4, use_ema=False)
  np.testing.assert_array_equal(np.asarray(h_model.velocity(x, t, y)),
                                np.asarray(apply(params, x, t, y)))
  # Round trip of the state dict itself.
  back, kw = dit_convert.convert_dit(sd, num_heads=4)
  assert {k: kw[k] for k in KW} == KW
  for k, v in dit_convert.export_dit(back, kw).items():
    np.testing.assert_array_equal(v, sd[k])
  # Sampling: deterministic, CFG path compiles, output denormalised with the stats.
  labels = jnp.array([0, 3])
  a = h.sample(labels, rng=0, num_steps=4, mode="euler", cfg_scale=2.0, cfg_interval=0.3,
               denormalize=False)
  b = h.sample(labels, rng=0, num_steps=4, mode="euler", cfg_scale=2.0, cfg_interval=0.3)
  assert a.shape == (2, 4, 4, 4)
  np.testing.assert_allclose(np.asarray(b), np.asarray(a) * std + mean, rtol=1e-5, atol=1e-5)
  c = h.sample(labels, rng=1, num_steps=4, mode="sde", denormalize=False)
  assert np.all(np.isfinite(np.asarray(c))) and not np.allclose(a, c)


def test_sizes_from_shapes_and_heads_table():
  z = lambda *s: np.broadcast_to(np.float32(0), s)    # shapes only, nothing allocated
  w = 1152
  sd = {"x_embedder.proj.weight": z(w, 32, 1, 1), "y_embedder.embedding_table.weight":
        z(1001, w), "blocks.0.norm1.weight": z(w), "blocks.0.mlp.w12.weight": z(6144, w),
        "blocks.27.norm1.weight": z(w), "pos_embed": z(1, 256, w)}
  kw = dit_convert.infer_model_kwargs(sd)
  assert (kw["width"], kw["depth"], kw["num_heads"], kw["num_classes"]) == (1152, 28, 16, 1000)
  assert kw["latent_size"] == 16 and kw["in_channels"] == 32 and not kw["qk_norm"]
  assert not kw["use_abs_pos"]                           # an all-zero pos_embed
  for width, heads in dit_convert.HEADS_BY_WIDTH.items():
    assert dit_convert._heads(width, None, None) == heads
  assert dit_convert._heads(1024, None, "LightningDiT-L/2") == 16
  with pytest.raises(ValueError, match="heads"):
    dit_convert._heads(640, None, None)


def test_errors_name_the_key_and_shapes(tmp_path):
  sd = dit_convert.export_dit(_random_params(KW), KW)
  broken = {k: v for k, v in sd.items() if k != "blocks.1.mlp.w3.bias"}
  with pytest.raises(ValueError, match=r"blocks\.1\.mlp\.w3\.bias"):
    dit_convert.convert_dit(broken, num_heads=4)
  bad = dict(sd)
  bad["blocks.0.attn.proj.weight"] = np.zeros((64, 60), np.float32)
  with pytest.raises(ValueError, match=r"blocks\.0\.attn\.proj\.weight.*\(64, 60\).*\(4, 16, 64\)"):
    dit_convert.convert_dit(bad, num_heads=4)
  extra = dict(sd, **{"blocks.0.attn.extra.weight": np.zeros(3, np.float32)})
  with pytest.raises(ValueError, match="blocks.0.attn.extra.weight"):
    dit_convert.convert_dit(extra, num_heads=4)
  # DDP prefixes are stripped; a non-checkpoint file is refused with its name.
  params, _ = dit_convert.convert_dit({"module." + k: v for k, v in sd.items()}, num_heads=4)
  assert params["blocks_1"]["attn"]["q_norm"]["scale"].shape == (16,)
  txt = tmp_path / "notes.txt"
  txt.write_text("x")
  with pytest.raises(ValueError, match="notes.txt"):
    pretrained.load_dit(str(txt))
  with pytest.raises(FileNotFoundError):
    pretrained.load_dit(str(tmp_path / "missing.pt"))
