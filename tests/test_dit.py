"""LightningDiT: shapes, adaLN-Zero, label dropout, parameter count, RoPE, pos-embed, scan."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gae_jax.models import dit, layers

NUM_CLASSES = 10


def _mu(patch=1, **kw):
  return dit.make_dit(f"mu/{patch}", in_channels=8, num_classes=NUM_CLASSES, **kw)


def _init(model, *args):
  return nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), *args))


def _inputs(b=2, size=8, c=8):
  x = jax.random.normal(jax.random.key(0), (b, size, size, c))
  return x, jnp.linspace(0.1, 0.9, b), jnp.arange(b) % NUM_CLASSES


@pytest.fixture(scope="module")
def mu2():
  """(model, params at init, jitted apply) for mu/2, shared to keep compiles few."""
  model = _mu(2)
  x, t, y = _inputs()
  return model, _init(model, x, t, y), jax.jit(model.apply)


def _randomize(params, scale=0.05):
  """Add noise to every leaf so the zero-init output layers stop hiding the trunk
  (numpy RNG: no per-shape compiles)."""
  rng = np.random.default_rng(42)
  return jax.tree.map(
      lambda l: jnp.asarray(np.asarray(l) + scale * rng.standard_normal(l.shape), l.dtype),
      params)


@pytest.mark.parametrize("patch", [1, 2])
def test_shapes_and_adaln_zero(patch, mu2):
  x, t, y = _inputs()
  if patch == 2:
    model, params, apply = mu2
  else:
    model = _mu(1)
    params, apply = _init(model, x, t, y), jax.jit(model.apply)
  out = apply(params, x, t, y)
  assert out.shape == x.shape and out.dtype == jnp.float32
  assert np.all(np.asarray(out) == 0.0)     # adaLN-Zero: exactly zero at init
  p = params["params"]
  assert p["x_embedder"]["kernel"].shape == (patch, patch, 8, 64)
  assert p["final_layer"]["linear"]["kernel"].shape == (64, patch * patch * 8)
  assert p["y_embedder"]["embedding_table"]["embedding"].shape == (NUM_CLASSES + 1, 64)
  assert p["blocks_0"]["mlp"]["w12"]["kernel"].shape == (64, 2 * dit.dit_swiglu_hidden(64))
  assert "q_norm" not in p["blocks_0"]["attn"]
  # Once trained (random params) the output depends on t, y and on every output pixel.
  rp = _randomize(params)
  out = apply(rp, x, t, y)
  assert np.abs(np.asarray(out)).min() > 0
  assert not np.allclose(out, apply(rp, x, t[::-1], y))
  assert not np.allclose(out, apply(rp, x, t, (y + 1) % NUM_CLASSES))


def test_unpatchify_layout_patch2(mu2):
  # Patch conv = identity onto channels [0, 32) in (p, q, c) order, blocks silent (zero
  # gates), zero modulation, final linear = pass channels [0, 32) through: the output
  # pixel (2i+p, 2j+q, c) must be channel p*16+q*8+c of the normalised token (i, j).
  model, params, apply = mu2
  x, t, y = _inputs()
  p = jax.tree.map(lambda a: a, params)["params"]
  k = np.zeros((32, 64), np.float32)
  k[np.arange(32), np.arange(32)] = 1.0
  p["x_embedder"]["kernel"] = jnp.asarray(k.reshape(2, 2, 8, 64))
  p["final_layer"]["linear"]["kernel"] = jnp.eye(64, 32)
  out = np.asarray(apply({"params": p}, x, t, y))
  xn = np.asarray(x)
  tok = np.zeros((2, 4, 4, 64), np.float32)
  for i in range(4):
    for j in range(4):
      tok[:, i, j, :32] = xn[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2, :].reshape(2, 32)
  tok = tok.reshape(2, 16, 64) + dit.sincos_pos_embed(64, 4, 4)
  tok = np.asarray(layers.rms_normalize(jnp.asarray(tok))).reshape(2, 4, 4, 64)
  ref = np.zeros_like(xn)
  for i in range(4):
    for j in range(4):
      for pp in range(2):
        for q in range(2):
          ref[:, 2 * i + pp, 2 * j + q, :] = tok[:, i, j, pp * 16 + q * 8: pp * 16 + q * 8 + 8]
  np.testing.assert_allclose(out, ref, atol=1e-5)


def test_label_dropout_and_force_drop():
  emb = dit.LabelEmbedder(NUM_CLASSES, 16, dropout_prob=0.1)
  labels = jnp.arange(20_000) % NUM_CLASSES
  params = nn.meta.unbox(emb.init(jax.random.key(0), labels[:2]))
  table = np.asarray(params["params"]["embedding_table"]["embedding"])
  null = table[NUM_CLASSES]

  def is_null(e):
    return np.all(np.asarray(e) == null, axis=-1)

  e = emb.apply(params, labels, train=True, rngs={"dropout": jax.random.key(3)})
  rate = is_null(e).mean()
  assert abs(rate - 0.1) < 0.01                     # ~5 sigma at n=20k
  kept = ~is_null(e)
  np.testing.assert_array_equal(np.asarray(e)[kept], table[np.asarray(labels)[kept]])
  assert not is_null(emb.apply(params, labels)).any()       # eval: no dropout
  force = (jnp.arange(6) % 2).astype(jnp.int32)
  e = emb.apply(params, labels[:6], force_drop_ids=force)
  np.testing.assert_array_equal(is_null(e), np.asarray(force) == 1)
  with pytest.raises(ValueError, match="null class"):
    nodrop = dit.LabelEmbedder(NUM_CLASSES, 16, dropout_prob=0.0)
    nodrop.init(jax.random.key(0), labels[:2], force_drop_ids=force[:2])


def test_model_force_drop_and_dropout_rng(mu2):
  model, params, apply = mu2
  x, t, y = _inputs()
  params = _randomize(params)
  assert model.null_label == NUM_CLASSES
  forced = apply(params, x, t, y, force_drop_ids=jnp.ones(2, jnp.int32))
  np.testing.assert_allclose(forced, apply(params, x, t, jnp.full((2,), NUM_CLASSES)),
                             atol=1e-6)
  assert not np.allclose(forced, apply(params, x, t, y))
  with pytest.raises(Exception, match="dropout"):   # train=True needs the 'dropout' rng
    jax.jit(functools.partial(model.apply, train=True))(params, x, t, y)


def test_xl_param_count_matches_paper():
  model = dit.make_dit("XL/1", in_channels=32)
  n = dit.param_count(model, (16, 16, 32))
  n_paper = dit.param_count(model, (16, 16, 32), include_pos_embed=True)
  # Hand count: 28 blocks x 23,908,992 + embedders/final 5,510,048 (+ 294,912 pos-embed).
  assert n == 28 * 23_908_992 + 5_510_048 == 674_961_824
  assert abs(n_paper - 675.26e6) / 675.26e6 < 1e-5
  assert abs(n - 675.26e6) / 675.26e6 < 0.005
  assert dit.dit_swiglu_hidden(1152) == 3072


def test_rope_table_and_relative_scores():
  head_dim, gh, gw = 16, 5, 6
  cos, sin = dit.rope_2d(head_dim, gh, gw)
  assert cos.shape == sin.shape == (gh * gw, head_dim)
  ang = np.arctan2(sin, cos).reshape(gh, gw, head_dim)
  # First half rotates with the row, second half with the column; pairs share a frequency.
  assert np.allclose(ang[:, :1, : head_dim // 2], ang[:, :, : head_dim // 2])
  assert np.allclose(ang[:1, :, head_dim // 2:], ang[:, :, head_dim // 2:])
  assert np.allclose(ang[..., 0::2], ang[..., 1::2])
  np.testing.assert_allclose(ang[1, 0, 0], 1.0, atol=1e-6)      # freq 1 for the first pair
  np.testing.assert_allclose(ang[0, 1, head_dim // 2], 1.0, atol=1e-6)
  # Scores q_i . k_j after RoPE depend only on the 2-D offset (i - j).
  kq, kk = jax.random.split(jax.random.key(0))
  q = jnp.broadcast_to(jax.random.normal(kq, (head_dim,)), (1, gh * gw, 1, head_dim))
  k = jnp.broadcast_to(jax.random.normal(kk, (head_dim,)), (1, gh * gw, 1, head_dim))
  qr = layers.apply_rope(q, jnp.asarray(cos), jnp.asarray(sin))[0, :, 0]
  kr = layers.apply_rope(k, jnp.asarray(cos), jnp.asarray(sin))[0, :, 0]
  s = np.asarray(qr @ kr.T).reshape(gh, gw, gh, gw)
  for (r, c), (r2, c2), (a, b) in [((0, 0), (1, 2), (2, 3)), ((3, 1), (0, 4), (1, 1)),
                                   ((2, 2), (2, 2), (2, 3))]:
    np.testing.assert_allclose(s[r, c, r2, c2], s[r + a, c + b, r2 + a, c2 + b], atol=1e-5)
  assert abs(s[0, 0, 1, 0] - s[0, 0, 0, 1]) > 1e-3   # rows and columns are distinguished
  assert abs(s[0, 0, 0, 0] - s[0, 0, 0, 1]) > 1e-3   # and the offset matters


def test_sincos_pos_embed_layout_and_timestep_embedding():
  width = 16
  pos = dit.sincos_pos_embed(width, 3, 4)
  assert pos.shape == (12, width)
  q = width // 4
  # token (row 0, col 1): first half = [sin, cos] of the column (released meshgrid(w, h)).
  np.testing.assert_allclose(pos[1, 0], np.sin(1.0), atol=1e-6)
  np.testing.assert_allclose(pos[1, q], np.cos(1.0), atol=1e-6)
  np.testing.assert_allclose(pos[1, 2 * q], 0.0, atol=1e-6)          # row 0
  # token (row 1, col 0): second half encodes the row.
  np.testing.assert_allclose(pos[4, 2 * q], np.sin(1.0), atol=1e-6)
  np.testing.assert_allclose(pos[4, 0], 0.0, atol=1e-6)
  emb = dit.timestep_embedding(jnp.array([0.0, 0.5]), 256)
  assert emb.shape == (2, 256)
  np.testing.assert_allclose(emb[0, :128], 1.0)     # [cos, sin] order
  np.testing.assert_allclose(emb[0, 128:], 0.0)
  f1 = math.exp(-math.log(1e4) / 128)
  np.testing.assert_allclose(emb[1, [0, 1, 128, 129]],
                             [math.cos(0.5), math.cos(0.5 * f1), math.sin(0.5),
                              math.sin(0.5 * f1)], rtol=1e-5)


def test_scan_remat_qknorm_match_unrolled(mu2):
  x, t, y = _inputs()
  _, params, _ = mu2
  shapes = nn.meta.unbox(jax.eval_shape(_mu(2, qk_norm=True).init, jax.random.key(0), x, t, y))
  assert shapes["params"]["blocks_0"]["attn"]["q_norm"]["scale"].shape == (16,)
  # Add the learned per-head-dim q/k RMSNorm weights to the shared init, then randomise.
  params = jax.tree.map(lambda a: a, params)["params"]
  for i in range(2):
    params[f"blocks_{i}"]["attn"]["q_norm"] = {"scale": jnp.ones(16)}
    params[f"blocks_{i}"]["attn"]["k_norm"] = {"scale": jnp.ones(16)}
  params = _randomize(params, scale=0.2)
  ref = jax.jit(_mu(2, qk_norm=True).apply)({"params": params}, x, t, y)
  out = jax.jit(_mu(2, qk_norm=True, remat="full").apply)({"params": params}, x, t, y)
  np.testing.assert_allclose(out, ref, atol=1e-5)
  scanned = {k: v for k, v in params.items() if not k.startswith("blocks_")}
  scanned["blocks"] = jax.tree.map(lambda *a: jnp.stack(a),
                                   *[params[f"blocks_{i}"] for i in range(2)])
  out = jax.jit(_mu(2, qk_norm=True, scan=True, remat="dots").apply)(
      {"params": scanned}, x, t, y)
  np.testing.assert_allclose(out, ref, atol=1e-5)
  # QK-norm weights are used: changing them changes the output.
  params["blocks_0"]["attn"]["q_norm"]["scale"] = 3 * params["blocks_0"]["attn"]["q_norm"][
      "scale"]
  assert not np.allclose(ref, jax.jit(_mu(2, qk_norm=True).apply)({"params": params}, x, t,
                                                                   y), atol=1e-4)


def test_bad_inputs():
  model = _mu(2)
  x, t, y = _inputs()
  with pytest.raises(ValueError, match="in_channels|shape"):
    jax.eval_shape(model.init, jax.random.key(0), x[..., :4], t, y)
  with pytest.raises(ValueError, match="divisible"):
    jax.eval_shape(model.init, jax.random.key(0), x[:, :7, :7], t, y)
  with pytest.raises(ValueError, match="shape"):
    jax.eval_shape(model.init, jax.random.key(0), x, t[:1], y)
  with pytest.raises(ValueError, match="unknown LightningDiT variant"):
    dit.decode_variant("XXL/1")
