"""Orbax checkpoints of the train state together with the grain iterator state.

Saves are atomic (orbax writes to a temporary directory and renames it when complete), so a
crash mid-save never corrupts the last good checkpoint and a torn one is never listed or
loaded. Restores go into ShapeDtypeStructs that carry the *current* run's shardings, so a
checkpoint written on one mesh restores onto any other.
"""

import os
from typing import Any, Optional

from absl import logging
import grain
import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """CheckpointManager with an interval + preemption save policy and keep-latest-N."""

  def __init__(self, directory: str, *, save_every: int, keep: int = 3,
               async_save: bool = True):
    self.directory = os.path.abspath(directory)
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

  def save(self, step: int, state: Any, data_iter: Any = None, *, force: bool = False) -> bool:
    """Saves when the interval says so, on preemption, or when forced."""
    force = force or step % self.save_every == 0 or self.manager.reached_preemption(step)
    if not force:
      return False
    items = dict(state=ocp.args.StandardSave(state))
    if data_iter is not None:
      items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
    if saved:
      logging.info("Saving checkpoint at step %d to %s", step, self.directory)
    return saved

  def restore(self, abstract_state: Any, data_iter: Any = None,
              step: Optional[int] = None) -> Any:
    """Restores `step` (default: latest) into `abstract_state`'s shapes and shardings.

    The data iterator, if given, is restored in place.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
    items = dict(state=ocp.args.StandardRestore(abstract_state))
    if data_iter is not None:
      if "data_iter" not in self._saved_items(step):
        raise ValueError(f"checkpoint {self.directory}/{step} holds no data iterator state")
      items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f"checkpoint {self.directory}/{step} does not match this run's "
                       f"train state (changed model or optimizer config?): {e}") from e
    logging.info("Restored step %d from %s", step, self.directory)
    return restored["state"]

  def _saved_items(self, step: int) -> set:
    path = os.path.join(self.directory, str(step))
    return set(os.listdir(path)) if os.path.isdir(path) else set()

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def restore_params(directory: str, step: Optional[int] = None, item: str = "state") -> Any:
  """Reads a gae_jax checkpoint's train state as host numpy arrays (no target needed).

  For notebooks and `config.init_from`: returns the raw nested dict.
  """
  directory = os.path.abspath(directory)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
  with ocp.CheckpointManager(directory, item_names=(item,),
                             options=ocp.CheckpointManagerOptions(read_only=True)) as mngr:
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no complete checkpoint in {directory}")
    restored = mngr.restore(step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore()}))
  return jax.tree.map(lambda x: x, restored[item])
