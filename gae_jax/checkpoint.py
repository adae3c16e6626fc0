"""Orbax checkpoints of the train state together with the grain iterator state.

Saves are atomic (orbax writes to a temporary directory and renames it when complete), so a
crash mid-save never corrupts the last good checkpoint and a torn one is never listed or
loaded. Restores go into ShapeDtypeStructs that carry the *current* run's shardings, so a
checkpoint written on one mesh restores onto any other.
"""

import functools
from typing import Any, Optional, Sequence

from absl import logging
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from gae_jax import paths


def _read_only_options() -> ocp.CheckpointManagerOptions:
  """Read-only, with the fields orbax would otherwise reset (and warn about) already set."""
  return ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False,
                                      cleanup_tmp_directories=False)


@functools.cache
def _use_whole_replica_saves_on_cpu():
  """On the CPU backend, saves each array from one replica instead of orbax's default
  replica-parallel slices.

  Replica-parallel saving (orbax's default off GPU) has each replica copy a slice of a
  replicated array to the host; every slice is a `jit(slice)` executable of its own (per
  array shape, offset and device). On CPU the "devices" share host memory, so the slices save
  nothing and the compiles cost ~0.05 s each, several seconds per checkpoint of a small
  model with 8 fake devices. TPU and GPU keep orbax's default. Registered once, for
  jax.Array in orbax's global type-handler registry.
  """
  if jax.default_backend() == "cpu":
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)


class Checkpointer:
  """CheckpointManager with an interval + preemption save policy and keep-latest-N."""

  def __init__(self, directory: paths.PathLike, *, save_every: int, keep: int = 3,
               async_save: bool = True):
    _use_whole_replica_saves_on_cpu()
    self.directory = paths.path(directory)   # local (made absolute) or gs:// etc.
    self.save_every = max(1, int(save_every))
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=self.save_every, max_to_keep=keep, create=True,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(
        self.directory, item_names=("state", "data_iter"), options=options)

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def due(self, step: int) -> bool:
    """The interval says `step` is a save step (no preemption check)."""
    return step % self.save_every == 0

  def preempted(self, step: int) -> bool:
    """JAX's preemption sync point (multi-process runs): every process gets True at the
    same step once any received the notice. Call at every step on every process."""
    return jax.process_count() > 1 and bool(self.manager.reached_preemption(step))

  def save(self, step: int, state: Any, data_iter: Any = None, *, force: bool = False) -> bool:
    """Saves when the interval says so, on preemption, or when forced.

    Save policy (trainers/common.run_loop): the loop never offers a state whose latest
    update was skipped as non-finite, so rotation (keep-latest-N) only drops finite steps
    older than a finite newer one."""
    force = force or step % self.save_every == 0 or self.manager.reached_preemption(step)
    if not force:
      return False
    items = dict(state=ocp.args.StandardSave(state))
    if data_iter is not None:
      items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
    if saved:
      logging.info("checkpoint: saving step %d to %s", step, self.directory / str(step))
    return saved

  def restore(self, abstract_state: Any, data_iter: Any = None,
              step: Optional[int] = None) -> Any:
    """Restores `step` (default: latest) into `abstract_state`'s shapes and shardings.

    The data iterator, if given, is restored in place; when the checkpoint's iterator
    state was written by another number of processes it is instead put at global batch
    `step` (`pipeline.seek`: the global sample order does not depend on the process count)
    and a notice is logged.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
    check_matches(metadata_tree(self.directory, step), abstract_state,
                  f"checkpoint {self.directory}/{step}")
    items = dict(state=ocp.args.StandardRestore(abstract_state))
    seek_to = None
    if data_iter is not None:
      if "data_iter" not in self._saved_items(step):
        raise ValueError(f"checkpoint {self.directory}/{step} holds no data iterator state")
      saved_by = self._iterator_process_count(step)
      if saved_by == jax.process_count():
        items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
      else:
        seek_to = step
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f"checkpoint {self.directory}/{step} does not match this run's "
                       f"train state (changed model or optimizer config?): {e}") from e
    if seek_to is not None:
      # One batch per step: global batch `step` comes next, in the process-count-free
      # global order of gae_jax.data.pipeline.
      from gae_jax.data import pipeline  # pylint: disable=g-import-not-at-top
      pipeline.seek(data_iter, seek_to)
      logging.warning("checkpoint %s/%d: data iterator state was saved by %s process(es), "
                      "this run has %d; data position re-derived from the step (global "
                      "batch %d onward, same global sample order)", self.directory, step,
                      saved_by, jax.process_count(), seek_to)
    logging.info("restored step %d from %s: train state (params, optimizer, EMA)%s", step,
                 self.directory / str(step),
                 " and data iterator position" if data_iter is not None else "")
    return restored["state"]

  def _iterator_process_count(self, step: int) -> Optional[int]:
    """Process count that wrote the step's grain iterator state (process_<i>-of-<n>.json)."""
    path = self.directory / str(step) / "data_iter"
    counts = {int(f[:-5].rsplit("-of-", 1)[1]) for f in (p.name for p in path.iterdir())
              if f.startswith("process_") and f.endswith(".json") and "-of-" in f}
    return counts.pop() if len(counts) == 1 else None

  def _saved_items(self, step: int) -> set:
    path = self.directory / str(step)
    return {p.name for p in path.iterdir()} if path.is_dir() else set()

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def metadata_tree(directory: paths.PathLike, step: int, item: str = "state") -> Any:
  """The saved tree of `item` at `step` with ArrayMetadata leaves (shape, dtype); no data.

  Read with the item's own handler: a CheckpointManager limited to `item` would warn that
  the step's other items (the data iterator) "could not be restored", though nothing is.
  """
  path = paths.path(directory) / str(step) / item
  if not path.is_dir():
    raise FileNotFoundError(f"checkpoint {directory}/{step} has no {item!r} item")
  tree = ocp.PyTreeCheckpointHandler().metadata(path)
  return tree.tree if hasattr(tree, "tree") else tree


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                  for k in path)


def tree_shapes(tree: Any) -> dict[str, tuple]:
  """{'a/b/c': shape} of every array-like leaf (anything with a .shape)."""
  return {_path_str(p): tuple(np.shape(x)) for p, x in
          jax.tree_util.tree_flatten_with_path(tree)[0] if hasattr(x, "shape")}


def tree_mismatch(got: Any, want: Any) -> Optional[str]:
  """None when both trees have the same leaf paths and shapes, else what differs first."""
  got, want = tree_shapes(got), tree_shapes(want)
  missing = sorted(set(want) - set(got))
  if missing:
    more = f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
    return f"it lacks {missing[0]}{more}"
  extra = sorted(set(got) - set(want))
  if extra:
    more = f" (+{len(extra) - 1} more)" if len(extra) > 1 else ""
    return f"it has {extra[0]}{more}, which is not expected"
  for k in sorted(want):
    if got[k] != want[k]:
      return f"{k} has shape {got[k]}, {want[k]} expected"
  return None


def check_matches(saved: Any, abstract: Any, what: str) -> None:
  """Raises a ValueError naming the first entry where `abstract` and the saved tree differ."""
  diff = tree_mismatch(saved, abstract)
  if diff:
    raise ValueError(f"{what} does not match this run's train state: {diff} "
                     "(changed model or optimizer config?)")


def restore_params(directory: paths.PathLike, step: Optional[int] = None, item: str = "state",
                   keys: Optional[Sequence[str]] = None) -> Any:
  """Reads a gae_jax checkpoint's train state as host numpy arrays (no target needed).

  For notebooks, loaders and `config.init_from`: returns the raw nested dict. `keys`: only
  these top-level entries (e.g. ("params", "ema_params")); the others, the optimizer
  moments above all, are never read, so a ViT-L state loads in a third of the memory.
  """
  paths.configure_cloud_storage()
  directory = paths.path(directory)
  if not directory.is_dir():
    raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
  handlers = {item: ocp.PyTreeCheckpointHandler()}
  with ocp.CheckpointManager(directory, item_names=(item,), item_handlers=handlers,
                             options=_read_only_options()) as mngr:
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no complete checkpoint in {directory}")
    # Always as host numpy arrays: the saved shardings name the devices of the run that
    # wrote it (another process count's checkpoint would not restore with them).
    tree = metadata_tree(directory, step, item)
    if not isinstance(tree, dict):
      raise ValueError(f"checkpoint {directory}/{step}/{item} is not a dict of entries")
    wanted = tree.keys() if keys is None else keys
    # Entries not asked for are PLACEHOLDER leaves: orbax skips them entirely.
    target = {k: jax.tree.map((lambda m: np.zeros(m.shape, m.dtype)) if k in wanted
                              else (lambda _: ocp.PLACEHOLDER), v) for k, v in tree.items()}
    args = ocp.args.PyTreeRestore(
        item=target, restore_args=jax.tree.map(
            lambda x: x if x is ocp.PLACEHOLDER else ocp.RestoreArgs(restore_type=np.ndarray),
            target))
    restored = mngr.restore(step, args=ocp.args.Composite(**{item: args}))
  out = restored[item]
  if keys is not None:
    out = {k: v for k, v in out.items() if k in keys}
  return jax.tree.map(lambda x: x, out)
