"""Checkpointer: round trip, save policy, torn / foreign checkpoints, partial weight reads."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gae_jax import checkpoint as ckpt_lib


def _state(seed: float):
  return {"step": jnp.asarray(int(seed), jnp.int32),
          "params": {"w": jnp.full((4, 3), seed, jnp.float32), "b": jnp.arange(3.0) + seed},
          "ema_params": {"w": jnp.full((4, 3), -seed, jnp.float32),
                         "b": jnp.arange(3.0) - seed},
          "opt_state": {"mu": jnp.ones((4, 3)) * seed, "nu": jnp.ones((4, 3)) * seed ** 2}}


def _abstract(state):
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                      state)


def _saved(directory, steps, save_every=2, **kw):
  ck = ckpt_lib.Checkpointer(directory, save_every=save_every, **kw)
  for s in steps:
    ck.save(s, _state(float(s)), force=s == steps[-1])
  ck.close()


def test_round_trip_and_interval_policy(tmp_path):
  d = str(tmp_path / "ckpt")
  _saved(d, [1, 2, 3, 4, 5], save_every=2, keep=10)
  ck = ckpt_lib.Checkpointer(d, save_every=2)
  assert ck.all_steps() == [2, 4, 5]          # interval steps + the forced last one
  got = ck.restore(_abstract(_state(0.0)))
  ck.close()
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(got),
               jax.device_get(_state(5.0)))


def test_keep_latest_n(tmp_path):
  d = str(tmp_path / "ckpt")
  _saved(d, [1, 2, 3, 4, 5, 6], save_every=1, keep=2)
  ck = ckpt_lib.Checkpointer(d, save_every=1)
  assert ck.all_steps() == [5, 6]
  ck.close()


def test_torn_checkpoint_is_never_listed_or_loaded(tmp_path):
  """A save that died mid-way leaves only orbax's temporary directory: ignored."""
  d = str(tmp_path / "ckpt")
  _saved(d, [2], save_every=2)
  # What a crash during the save of step 4 leaves behind: a partial tmp copy.
  torn = os.path.join(d, "4.orbax-checkpoint-tmp-1234")
  shutil.copytree(os.path.join(d, "2"), torn)
  for root, _, files in os.walk(torn):
    for f in files:
      with open(os.path.join(root, f), "wb") as fh:
        fh.write(b"\0garbage")
  ck = ckpt_lib.Checkpointer(d, save_every=2)
  assert ck.latest_step() == 2
  got = ck.restore(_abstract(_state(0.0)))
  np.testing.assert_array_equal(np.asarray(got["params"]["w"]), np.full((4, 3), 2.0))
  assert ckpt_lib.restore_params(d)["params"]["b"].tolist() == [2.0, 3.0, 4.0]
  ck.close()


def test_mismatched_state_names_the_checkpoint(tmp_path):
  d = str(tmp_path / "ckpt")
  _saved(d, [2], save_every=2)
  other = _state(0.0)
  other["params"]["w"] = jnp.zeros((5, 3))
  ck = ckpt_lib.Checkpointer(d, save_every=2)
  with pytest.raises(ValueError, match=r"ckpt/2 does not match this run.s train state: "
                     r"params/w has shape \(4, 3\), \(5, 3\) expected"):
    ck.restore(_abstract(other))
  del other["opt_state"]
  with pytest.raises(ValueError, match=r"it has opt_state/mu \(\+1 more\), which is not expected"):
    ck.restore(_abstract(other))
  other = _state(0.0)
  other["params"]["new"] = jnp.zeros(2)
  with pytest.raises(ValueError, match=r"it lacks params/new"):
    ck.restore(_abstract(other))
  ck.close()


def test_missing_directory_and_empty_directory_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere"):
    ckpt_lib.restore_params(str(tmp_path / "nowhere"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no complete checkpoint in .*empty"):
    ckpt_lib.restore_params(str(tmp_path / "empty"))


def test_restore_params_reads_only_the_asked_entries(tmp_path):
  d = str(tmp_path / "ckpt")
  _saved(d, [2, 4], save_every=2)
  full = ckpt_lib.restore_params(d)
  part = ckpt_lib.restore_params(d, keys=("params", "ema_params", "absent"))
  assert sorted(part) == ["ema_params", "params"]
  assert sorted(full) == ["ema_params", "opt_state", "params", "step"]
  for k in ("params", "ema_params"):
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b)), part[k], full[k])
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(part))
  old = ckpt_lib.restore_params(d, step=2, keys=("params",))
  np.testing.assert_array_equal(old["params"]["w"], np.full((4, 3), 2.0))
