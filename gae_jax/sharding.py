"""One mesh, logical-axis rules, parameter shardings and global input arrays."""

import contextlib
import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P


def make_mesh(mesh_axes: Sequence[tuple[str, int]], devices=None) -> jax.sharding.Mesh:
  """Mesh over all devices (of all hosts) from [(name, size)], one size may be -1.

  Axis types are always Auto: recent jax defaults `make_mesh` to Explicit, which rejects
  unannotated sharded matmuls.
  """
  devices = jax.devices() if devices is None else devices
  names = tuple(str(n) for n, _ in mesh_axes)
  sizes = [int(s) for _, s in mesh_axes]
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh {list(mesh_axes)}: at most one axis may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"config.mesh {list(mesh_axes)} does not divide {len(devices)} devices")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"config.mesh {list(mesh_axes)} needs {math.prod(sizes)} devices, "
                     f"have {len(devices)}")
  return jax.make_mesh(tuple(sizes), names, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def rules_from_config(rules) -> tuple:
  return tuple((str(k), tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in rules)


@contextlib.contextmanager
def mesh_rules(mesh: jax.sharding.Mesh, rules):
  """The mesh and the logical-axis rules, both active: `nn.with_logical_constraint` in the
  models only becomes a sharding constraint when a trace (init, apply, lower) runs inside
  this; outside it the constraints are no-ops."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def with_mesh_rules(fn: Callable, mesh: jax.sharding.Mesh, rules) -> Callable:
  """`fn` (e.g. a jitted eval step, traced on its first call) called inside mesh_rules."""
  @functools.wraps(fn)
  def call(*args, **kwargs):
    with mesh_rules(mesh, rules):
      return fn(*args, **kwargs)
  return call


def batch_axes(mesh: jax.sharding.Mesh, rules) -> tuple:
  """Mesh axes the batch dimension is split over (from the 'batch' rule)."""
  for name, axes in rules:
    if name == "batch":
      axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
      return tuple(a for a in axes if a in mesh.axis_names)
  return ()


def data_sharding(mesh: jax.sharding.Mesh, rules) -> NamedSharding:
  return NamedSharding(mesh, P(batch_axes(mesh, rules)))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _fsdp_spec(shape, mesh, axis="fsdp", min_size=2 ** 14) -> P:
  """Shards the largest dimension divisible by the fsdp axis; small arrays replicate."""
  n = mesh.shape.get(axis, 1)
  if n == 1 or math.prod(shape) < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % n == 0:
      spec = [None] * len(shape)
      spec[dim] = axis
      return P(*spec)
  return P()


def tree_shardings(abstract_boxed: Any, mesh: jax.sharding.Mesh, rules,
                   mode: str = "logical") -> Any:
  """NamedShardings for an abstract (eval_shape'd) pytree that may hold LogicallyPartitioned.

  mode 'logical': boxed leaves follow the logical rules; plain leaves use the FSDP rule.
  mode 'fsdp': every leaf uses the FSDP rule. The result matches the *unboxed* tree.
  Optimizer moments and EMA copies initialised from the boxed parameters carry the same
  logical names (and shapes), so they get exactly their parameter's sharding in both modes.
  """
  if mode not in ("logical", "fsdp"):
    raise ValueError(f"config.param_sharding={mode!r}: use 'logical' or 'fsdp'")
  is_boxed = lambda x: isinstance(x, nn.LogicallyPartitioned)

  def one(leaf):
    shape = (leaf.value if is_boxed(leaf) else leaf).shape
    if mode == "logical" and is_boxed(leaf):
      spec = nn.logical_to_mesh_axes(leaf.names, rules)
      # drop mesh axes that don't divide the dimension (tiny test models)
      spec = P(*[a if a is None or shape[i] % _axis_size(mesh, a) == 0 else None
                 for i, a in enumerate(spec)])
      return NamedSharding(mesh, spec)
    return NamedSharding(mesh, _fsdp_spec(shape, mesh))

  return jax.tree.map(one, abstract_boxed, is_leaf=is_boxed)


def _axis_size(mesh, axes) -> int:
  axes = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


def unbox(tree):
  return nn.meta.unbox(tree)


def to_global(batch: dict, sharding: NamedSharding) -> dict:
  """Per-process numpy batch -> global jax.Arrays laid out along the batch axis."""
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def global_batch_check(global_batch: int, mesh: jax.sharding.Mesh, rules) -> int:
  """Validates the global batch against devices and hosts; returns the per-process batch."""
  n_shards = _axis_size(mesh, batch_axes(mesh, rules)) if batch_axes(mesh, rules) else 1
  if global_batch % n_shards:
    raise ValueError(f"config.batch_size={global_batch} is not divisible by the "
                     f"{n_shards} batch shards of mesh {dict(mesh.shape)}")
  if global_batch % jax.process_count():
    raise ValueError(f"config.batch_size={global_batch} is not divisible by "
                     f"{jax.process_count()} processes")
  return global_batch // jax.process_count()


def tree_size(tree) -> int:
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def dtype_from_name(name: str):
  return jnp.dtype(name)


def global_array(x: np.ndarray, sharding) -> jax.Array:
  """A host array every process holds in full -> a global jax.Array with `sharding`."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
