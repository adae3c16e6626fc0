"""GAE model shapes and invariants: latent sphere, sigma-noise statistics, no biases,
paper parameter counts (abstractly)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gae_jax import configs_lib
from gae_jax.models import gae as gae_lib
from gae_jax.models import layers
from gae_jax.trainers import common


def tiny(**kw):
  args = dict(width=64, depth=2, num_heads=2, patch_size=8, latent_dim=16, sigma_std=0.2)
  args.update(kw)
  return gae_lib.GAE(**args)


@pytest.fixture(scope="module")
def tiny_setup():
  model = tiny()
  x = jax.random.uniform(jax.random.key(0), (4, 32, 32, 3), minval=-1, maxval=1)
  params = model.init({"params": jax.random.key(1), "noise": jax.random.key(2)}, x)["params"]
  return model, params, x


def test_shapes_and_latent_sphere(tiny_setup):
  model, params, x = tiny_setup
  params = common.nn.meta.unbox(params)
  x_hat, aux = model.apply({"params": params}, x)
  assert x_hat.shape == x.shape
  assert aux["mu"].shape == (4, 4, 4, 16)
  rms = jnp.sqrt(jnp.mean(jnp.square(aux["mu"]), axis=-1))
  # Every token on the sqrt(d) sphere, up to the norm's eps: rms = sqrt(m / (m + 1e-6)) for
  # a token's mean square m (~0.05 at the torch init of this tiny model): 1e-4 covers it.
  np.testing.assert_allclose(rms, 1.0, atol=1e-4)
  np.testing.assert_allclose(jnp.linalg.norm(aux["mu"], axis=-1), 4.0, rtol=1e-4)
  np.testing.assert_array_equal(aux["z"], aux["mu"])       # inference: z = mu
  z, _ = model.apply({"params": params}, x, method=model.encode)
  np.testing.assert_allclose(model.apply({"params": params}, z, method=model.decode), x_hat,
                             atol=1e-5)


def test_sigma_noise_statistics(tiny_setup):
  model, params, x = tiny_setup
  params = common.nn.meta.unbox(params)
  sig = gae_lib.sample_sigma(jax.random.key(3), 200_000, 0.2)
  # sigma ~ N(0, (0.2/0.8)^2): std 0.25 and E|sigma| = 0.25*sqrt(2/pi) ~= 0.1995
  np.testing.assert_allclose(jnp.std(sig), 0.25, rtol=0.01)
  np.testing.assert_allclose(jnp.mean(jnp.abs(sig)), 0.25 * np.sqrt(2 / np.pi), rtol=0.01)
  _, aux = model.apply({"params": params}, x, train=True, rngs={"noise": jax.random.key(4)})
  noise = aux["z"] - aux["mu"]
  # one sigma per image: per-image noise std equals |sigma|
  per_image = jnp.std(noise, axis=(1, 2, 3))
  np.testing.assert_allclose(per_image, jnp.abs(aux["sigma"]), rtol=0.15)
  assert not np.allclose(aux["sigma"], aux["sigma"][0])
  _, aux2 = model.apply({"params": params}, x, train=True, rngs={"noise": jax.random.key(5)})
  assert not np.allclose(aux["z"], aux2["z"])


def test_no_biases_and_param_names(tiny_setup):
  _, params, _ = tiny_setup
  names = ["/".join(str(k.key) for k in path)
           for path, _ in jax.tree_util.tree_leaves_with_path(common.nn.meta.unbox(params))]
  assert not [n for n in names if n.endswith("bias")], "the release has no biases"
  assert not [n for n in names if n.endswith("scale")], "RMSNorms are parameter-free"
  assert "encoder/patch_embed/kernel" in names and "projector/kernel" in names


def test_kl_switch():
  model = tiny(kl=True)
  x = jnp.zeros((2, 32, 32, 3))
  v = model.init({"params": jax.random.key(0), "noise": jax.random.key(1)}, x)
  params = common.nn.meta.unbox(v["params"])
  assert params["projector"]["kernel"].shape == (64, 32)   # mean and logvar
  _, aux = model.apply({"params": params}, x, train=True, rngs={"noise": jax.random.key(2)})
  assert aux["kl_logvar"].shape == (2, 4, 4, 16)
  assert not np.allclose(aux["z"], aux["mu"])


def test_swiglu_hidden_and_rms_norm():
  assert layers.swiglu_hidden(1024) == 2816
  x = jax.random.normal(jax.random.key(0), (3, 5, 32)) * 7.0
  y = layers.RMSNorm().apply({}, x)
  np.testing.assert_allclose(jnp.sqrt(jnp.mean(y ** 2, -1)), 1.0, atol=1e-4)


def test_scan_and_loop_agree():
  """nn.scan over blocks is a layout choice: same function for the same weights."""
  x = jax.random.normal(jax.random.key(0), (2, 8, 32))
  loop = layers.Transformer(depth=2, num_heads=2, mlp_hidden=64)
  scan = layers.Transformer(depth=2, num_heads=2, mlp_hidden=64, scan=True, remat="full")
  p_loop = common.nn.meta.unbox(loop.init(jax.random.key(1), x))
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *[p_loop["params"][f"blocks_{i}"]
                                                    for i in range(2)])
  y1 = loop.apply(p_loop, x)
  y2 = scan.apply({"params": {"blocks": stacked}}, x)
  np.testing.assert_allclose(y1, y2, atol=1e-5)


@pytest.mark.parametrize("latent_dim", [32, 64])
def test_paper_parameter_counts(latent_dim):
  """Paper Tab. 13: E_p 310.38M, A_p 0.03M, D_p 309.36M for ViT-L d=32 — abstractly."""
  c = configs_lib.autoencoder_config(None, latent_dim=latent_dim).model
  model = gae_lib.make_gae(c)
  abstract = jax.eval_shape(lambda: model.init(
      {"params": jax.random.key(0), "noise": jax.random.key(0)}, jnp.zeros((1, 256, 256, 3))))
  counts = common.param_counts(abstract["params"])
  if latent_dim == 32:
    np.testing.assert_allclose(counts["encoder"] / 1e6, 310.38, rtol=5e-3)
    np.testing.assert_allclose(counts["decoder"] / 1e6, 309.36, rtol=5e-3)
    np.testing.assert_allclose(counts["projector"] / 1e6, 0.03, atol=0.005)
  assert counts["projector"] == 1024 * latent_dim


# ------------------------------------------------------------------------------------------
# Parameter initialisation (config.model.init; docs/fidelity.md).


def _kernels(params, prefix=""):
  """{path: kernel} of every Linear / conv kernel in a (unboxed) param tree."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    if name.endswith("kernel"):
      out[prefix + name] = np.asarray(leaf, np.float64)
  return out


def _fan_in(name, k):
  """Input size of a kernel as torch counts it (fused qkv: width; attention proj: width;
  conv (kh, kw, in, out): in * kh * kw)."""
  if "patch_embed" in name:
    return k.shape[0] * k.shape[1] * k.shape[2]
  if "attn/proj" in name:
    return k.shape[0] * k.shape[1]
  return k.shape[0]


def _init_gae(scheme=None, width=128):
  kw = dict(width=width, depth=1, num_heads=2, patch_size=8, latent_dim=16)
  if scheme is not None:
    kw["init_scheme"] = scheme
  model = gae_lib.GAE(**kw)
  params = model.init({"params": jax.random.key(7), "noise": jax.random.key(8)},
                      jnp.zeros((1, 32, 32, 3)))["params"]
  return common.nn.meta.unbox(params)


def test_torch_init_statistics():
  """init="torch": every Linear kernel is U(+-1/sqrt(fan_in)) (torch's kaiming_uniform(a=
  sqrt(5))): bounded by 1/sqrt(fan_in) and with variance 1/(3 fan_in) within 6 standard
  errors of the sample variance (uniform: SE/var = sqrt(0.8/n)); the patch conv is the
  release's kaiming_normal(fan_out, relu) = N(0, 2/(width p p)), untruncated (about 4.6%
  beyond 2 std); pos tables N(0, 0.02^2) (torch trunc_normal_ cuts at +-2 absolute)."""
  params = _init_gae("torch")
  kernels = _kernels(params)
  linear = {n: k for n, k in kernels.items() if "patch_embed" not in n}
  assert len(linear) >= 12       # per ViT: 2 attn + 3 mlp + head/embed; + projector
  for name, k in linear.items():
    fan_in = _fan_in(name, k)
    assert np.abs(k).max() <= 1 / np.sqrt(fan_in) + 1e-7, name
    assert np.abs(k).max() > 0.9 / np.sqrt(fan_in), name      # fills the interval
    rtol = 6 * np.sqrt(0.8 / k.size)
    np.testing.assert_allclose(k.var(), 1 / (3 * fan_in), rtol=rtol, err_msg=name)
  patch = kernels["encoder/patch_embed/kernel"]        # (8, 8, 3, 128)
  std = np.sqrt(2.0 / (128 * 8 * 8))
  np.testing.assert_allclose(patch.std(), std, rtol=6 * np.sqrt(0.5 / patch.size))
  assert 0.035 < np.mean(np.abs(patch) > 2 * std) < 0.057      # normal: 4.55%, not truncated
  for part in ("encoder", "decoder"):
    pos = np.asarray(params[part]["pos_embed"])
    np.testing.assert_allclose(pos.std(), 0.02, rtol=0.05)
    assert np.abs(pos).max() > 2 * 0.02                        # flax's cut at 2 std is gone


def test_default_init_is_torch_and_flax_differs():
  """The GAE default (class, make_gae, the stage-2 config) is "torch"; "flax" is the
  earlier xavier scheme, whose kernels exceed torch's 1/sqrt(fan_in) bound."""
  assert gae_lib.GAE(latent_dim=8).init_scheme == "torch"
  c = configs_lib.autoencoder_config("runlocal", latent_dim=32).model
  assert c.init == "torch"
  assert gae_lib.make_gae(c).init_scheme == "torch"
  c.init = "flax"
  assert gae_lib.make_gae(c).init_scheme == "flax"
  default = _kernels(_init_gae())
  torch_ = _kernels(_init_gae("torch"))
  for name in default:
    np.testing.assert_array_equal(default[name], torch_[name], err_msg=name)
  flax_params = _init_gae("flax")
  flax_ = _kernels(flax_params)
  fc1 = "encoder/transformer/blocks_0/mlp/fc1/kernel"          # (128, 512)
  assert np.abs(flax_[fc1]).max() > 1.05 / np.sqrt(128)       # xavier: sqrt(6/640) = 0.097
  np.testing.assert_allclose(np.abs(flax_[fc1]).max(), np.sqrt(6 / 640), rtol=0.01)
  pos = np.asarray(flax_params["encoder"]["pos_embed"])
  assert np.abs(pos).max() <= 2 * 0.02 + 1e-7                  # flax truncated_normal
  with pytest.raises(ValueError, match="unknown init 'jax'"):
    _init_gae("jax")


def test_dit_and_discriminator_default_init_is_the_release():
  """DiT: LightningDiT `initialize_weights` (xavier_uniform Linears, zero biases, t-MLP and
  label table N(0, 0.02^2), adaLN and final layer zero); discriminator: taming
  `weights_init` (conv N(0, 0.02^2), BN scale N(1, 0.02^2)) with torch-default conv biases."""
  from gae_jax.models import dit as dit_lib  # pylint: disable=g-import-not-at-top
  from gae_jax.models import discriminator  # pylint: disable=g-import-not-at-top
  model = dit_lib.make_dit("mu/1", in_channels=8, num_classes=11)
  x = jnp.zeros((1, 8, 8, 8))
  p = common.nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), x, jnp.zeros((1,)),
                                               jnp.zeros((1,), jnp.int32)))["params"]
  qkv = np.asarray(p["blocks_0"]["attn"]["qkv"]["kernel"]).reshape(64, -1)
  bound = np.sqrt(6 / (64 + qkv.shape[1]))                      # xavier on (64, 192)
  assert bound * 0.9 < np.abs(qkv).max() <= bound + 1e-7
  np.testing.assert_array_equal(p["blocks_0"]["attn"]["qkv"]["bias"], 0.0)
  np.testing.assert_array_equal(p["blocks_0"]["adaLN_modulation"]["kernel"], 0.0)
  np.testing.assert_array_equal(p["final_layer"]["linear"]["kernel"], 0.0)
  t0 = np.asarray(p["t_embedder"]["mlp_0"]["kernel"])
  np.testing.assert_allclose(t0.std(), 0.02, rtol=0.05)
  emb = np.asarray(p["y_embedder"]["embedding_table"]["embedding"])
  np.testing.assert_allclose(emb.std(), 0.02, rtol=0.15)
  disc = discriminator.NLayerDiscriminator(ndf=16, n_layers=2)
  v = jax.jit(lambda k: disc.init(k, jnp.zeros((1, 32, 32, 3)), train=False))(jax.random.key(0))
  dp = v["params"]
  k1 = np.asarray(dp["conv1"]["kernel"])                        # (4, 4, 16, 32)
  np.testing.assert_allclose(k1.std(), 0.02, rtol=0.05)
  np.testing.assert_allclose(np.asarray(dp["bn1"]["scale"]).mean(), 1.0, atol=0.02)
  b0 = np.asarray(dp["conv0"]["bias"])
  assert np.abs(b0).max() <= 1 / np.sqrt(3 * 16) and np.abs(b0).max() > 0
