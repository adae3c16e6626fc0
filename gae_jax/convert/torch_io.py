"""Reading PyTorch weight files and mapping them onto Flax parameter trees.

Generic pieces shared by every converter (DINOv2, Inception, GAE, DiT):
  load_torch_state_dict(path, subkey=None) -> {name: np.ndarray}
  Rule / apply_rules(state_dict, rules, reference) -> nested Flax params, checked against
    the model's own (eval_shape'd) parameter shapes, with every missing, unused or
    mis-shaped key named in one ValueError.
  check_and_set, report_missing, report_unused, flatten_tree, unflatten_tree,
  check_tree_matches: the building blocks, usable on their own.
"""

from collections.abc import Callable, Iterable, Mapping, Sequence
import dataclasses
import os
import pathlib
from typing import Any, Optional, Union

import numpy as np

PathLike = Union[str, os.PathLike]
TORCH_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
COMMON_SUBKEYS = ("state_dict", "model_state_dict", "model", "module", "teacher", "ema")


def _to_numpy(value: Any, name: str, path: PathLike) -> np.ndarray:
  import torch  # pylint: disable=g-import-not-at-top
  if not isinstance(value, torch.Tensor):
    raise ValueError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor")
  t = value.detach().cpu()
  if t.dtype == torch.bfloat16:
    import ml_dtypes  # pylint: disable=g-import-not-at-top
    return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.contiguous().numpy()


def _load_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
  try:
    return dict(st_numpy.load_file(str(path)))
  except (TypeError, ValueError) as e:
    # numpy has no bfloat16: read such files through torch when it is available.
    try:
      from safetensors import torch as st_torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ValueError(f"cannot read {path} with safetensors.numpy ({e}); "
                       "install torch to read bfloat16 safetensors") from e
    return {k: _to_numpy(v, k, path) for k, v in st_torch.load_file(str(path)).items()}


def load_torch_state_dict(path: PathLike, subkey: Optional[Union[str, Sequence[str]]] = None,
                          *, weights_only: bool = True) -> dict[str, np.ndarray]:
  """Reads a flat {name: array} state dict from .safetensors / .pth / .pt / .ckpt / .bin.

  subkey: unwrap a nested checkpoint, e.g. "state_dict", "model", "model_state_dict";
  a sequence digs several levels ("teacher", "backbone"); "auto" tries the usual names.
  Without it a nested checkpoint raises a ValueError listing its top-level keys.
  Torch files are read with `torch.load(map_location="cpu", weights_only=True)`; pass
  `weights_only=False` only for a file you trust (it runs pickled code).
  """
  path = pathlib.Path(path).expanduser()
  if not path.is_file():
    raise FileNotFoundError(f"weight file not found: {path}")
  suffix = path.suffix.lower()
  if suffix == ".safetensors":
    obj: Any = _load_safetensors(path)
  elif suffix in TORCH_SUFFIXES:
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(f"reading {path} needs PyTorch (pip install torch, CPU build)") from e
    try:
      obj = torch.load(str(path), map_location="cpu", weights_only=weights_only)
    except Exception as e:  # pickle errors come in many types
      hint = (" (weights_only=True refused it: pass weights_only=False only if you trust the "
              "file)" if weights_only else "")
      raise ValueError(f"cannot read torch checkpoint {path}: {type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''}{hint}") from e
  else:
    raise ValueError(f"unsupported weight file type {suffix!r} for {path}; expected "
                     f".safetensors or one of {TORCH_SUFFIXES}")

  if subkey is not None:
    obj = _unwrap(obj, subkey, path)
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
  nested = [k for k, v in obj.items() if isinstance(v, Mapping)]
  if nested:
    raise ValueError(f"{path} is a nested checkpoint (top-level keys {_short(list(obj))}); "
                     f"pass subkey= one of {_short(nested)}")
  if suffix == ".safetensors":
    return {str(k): np.asarray(v) for k, v in obj.items()}
  return {str(k): _to_numpy(v, k, path) for k, v in obj.items()}


def _unwrap(obj: Any, subkey: Union[str, Sequence[str]], path: PathLike) -> Any:
  if subkey == "auto":
    while isinstance(obj, Mapping) and any(isinstance(v, Mapping) for v in obj.values()):
      found = next((k for k in COMMON_SUBKEYS if isinstance(obj.get(k), Mapping)), None)
      if found is None:
        break
      obj = obj[found]
    return obj
  for key in [subkey] if isinstance(subkey, str) else subkey:
    if not isinstance(obj, Mapping) or key not in obj:
      keys = list(obj) if isinstance(obj, Mapping) else []
      raise ValueError(f"{path}: no subkey {key!r} (available: {_short(keys)})")
    obj = obj[key]
  return obj


def _short(items: Sequence[Any], n: int = 12) -> str:
  items = list(items)
  more = f", ... ({len(items) - n} more)" if len(items) > n else ""
  return "[" + ", ".join(repr(i) for i in items[:n]) + more + "]"


# ---------------------------------------------------------------------------------------
# Trees.
# ---------------------------------------------------------------------------------------


def _split(key_path: Union[str, Sequence[str]]) -> tuple[str, ...]:
  return tuple(key_path.split("/")) if isinstance(key_path, str) else tuple(key_path)


def flatten_tree(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{"a": {"b": x}} -> {"a/b": x} (leaves are anything that is not a Mapping)."""
  out = {}
  for k, v in tree.items():
    name = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(flatten_tree(v, name + "/"))
    else:
      out[name] = v
  return out


def unflatten_tree(flat: Mapping[str, Any]) -> dict[str, Any]:
  """{"a/b": x} -> {"a": {"b": x}}."""
  out: dict[str, Any] = {}
  for name, v in flat.items():
    node = out
    *parents, leaf = _split(name)
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return out


def check_and_set(params: dict, key_path: Union[str, Sequence[str]], array: Any,
                  torch_key: str, expected_shape: Optional[Sequence[int]] = None) -> None:
  """params[key_path] = array, after checking its shape.

  The expected shape is `expected_shape`, else that of a leaf already at key_path (e.g. a
  ShapeDtypeStruct template). A mismatch raises ValueError naming the torch key, the Flax
  path and both shapes.
  """
  parts = _split(key_path)
  node = params
  for p in parts[:-1]:
    node = node.setdefault(p, {})
  if expected_shape is None and parts[-1] in node and hasattr(node[parts[-1]], "shape"):
    expected_shape = node[parts[-1]].shape
  shape = tuple(np.shape(array))
  if expected_shape is not None and shape != tuple(expected_shape):
    raise ValueError(f"{torch_key}: converted shape {shape} does not match the model parameter "
                     f"{'/'.join(parts)} of shape {tuple(expected_shape)}")
  node[parts[-1]] = array


def report_missing(state_dict: Mapping[str, Any], required: Iterable[str],
                   source: str = "checkpoint") -> None:
  """ValueError naming every required key absent from state_dict."""
  missing = [k for k in required if k not in state_dict]
  if missing:
    raise ValueError(f"{source}: missing {len(missing)} key(s): {_short(missing)}")


def report_unused(state_dict: Mapping[str, Any], used_keys: Iterable[str],
                  ignore: Iterable[str] = (), source: str = "checkpoint") -> None:
  """ValueError naming every key of state_dict that was neither used nor ignored."""
  skip = set(used_keys) | set(ignore)
  left = [k for k in state_dict if k not in skip]
  if left:
    raise ValueError(f"{source}: {len(left)} unexpected key(s) not used by the model: "
                     f"{_short(left)}")


def check_tree_matches(params: Mapping[str, Any], reference: Mapping[str, Any],
                       source: str = "converted params") -> None:
  """Same paths and shapes as `reference` (e.g. `jax.eval_shape(model.init, ...)`)."""
  flat, ref = flatten_tree(params), flatten_tree(reference)
  missing = sorted(set(ref) - set(flat))
  extra = sorted(set(flat) - set(ref))
  if missing:
    raise ValueError(f"{source}: model parameters left unset: {_short(missing)}")
  if extra:
    raise ValueError(f"{source}: parameters the model does not have: {_short(extra)}")
  for name, ref_leaf in ref.items():
    if tuple(np.shape(flat[name])) != tuple(ref_leaf.shape):
      raise ValueError(f"{source}: {name} has shape {tuple(np.shape(flat[name]))}, the model "
                       f"expects {tuple(ref_leaf.shape)}")


# ---------------------------------------------------------------------------------------
# Declarative conversion.
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rule:
  """Flax param `target` ("a/b/kernel") = fn(*[state_dict[k] for k in sources])."""
  target: str
  sources: tuple[str, ...]
  fn: Callable[..., np.ndarray] = lambda x: x


def linear(w: np.ndarray) -> np.ndarray:
  """torch Linear weight (out, in) -> Flax Dense kernel (in, out)."""
  return np.ascontiguousarray(w.T)


def conv(w: np.ndarray) -> np.ndarray:
  """torch Conv2d weight (out, in, kh, kw) -> Flax Conv kernel (kh, kw, in, out)."""
  return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def apply_rules(state_dict: Mapping[str, np.ndarray], rules: Sequence[Rule],
                reference: Optional[Mapping[str, Any]] = None, *,
                ignore: Iterable[str] = (), strict: bool = True,
                source: str = "checkpoint", dtype: Any = np.float32) -> dict[str, Any]:
  """Runs the rules; checks missing keys, shapes against `reference`, and unused keys.

  reference: a nested tree of leaves with `.shape` (the model's eval_shape'd params); when
  given, the result must cover it exactly. strict=False tolerates unused checkpoint keys.
  Arrays are returned as numpy `dtype` (float32 by default).
  """
  report_missing(state_dict, [k for r in rules for k in r.sources], source)
  ref_flat = flatten_tree(reference) if reference is not None else {}
  params: dict[str, Any] = {}
  for rule in rules:
    arrays = [np.asarray(state_dict[k]) for k in rule.sources]
    expected = ref_flat[rule.target].shape if rule.target in ref_flat else None
    if reference is not None and expected is None:
      raise ValueError(f"{source}: rule for {rule.sources} targets {rule.target}, which the "
                       "model does not have")
    try:
      value = rule.fn(*arrays)
    except Exception as e:  # reshape/concat failures mean the checkpoint shapes are off
      shapes = ", ".join(f"{k} {a.shape}" for k, a in zip(rule.sources, arrays))
      raise ValueError(f"{source}: cannot map {shapes} onto {rule.target}"
                       f"{'' if expected is None else f' of shape {tuple(expected)}'}: {e}"
                       ) from e
    torch_key = f"{source}: " + ", ".join(f"{k} {a.shape}" for k, a in zip(rule.sources, arrays))
    check_and_set(params, rule.target, np.asarray(value, dtype=dtype), torch_key, expected)
  if reference is not None:
    check_tree_matches(params, reference, source)
  if strict:
    report_unused(state_dict, [k for r in rules for k in r.sources], ignore, source)
  return params
