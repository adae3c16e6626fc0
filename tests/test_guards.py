"""Non-finite guards: a non-finite loss / gradient skips the update on device (params,
optimizer and EMA untouched), the skip counters are in the state and the metrics, K
consecutive skips stop the run with one line naming the last good checkpoint, and
divergence never rotates the last finite checkpoint out; config checks for L_sp."""

import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gae_jax import checkpoint as ckpt_lib
from gae_jax import configs_lib
from gae_jax import sharding as sharding_lib
from gae_jax.trainers import common
from gae_jax.trainers import flow as flow_trainer

pytestmark = pytest.mark.xdist_group("guards")

LATENT, D, B = 4, 4, 8


def _config(**overrides):
  c = configs_lib.dit_config("runlocal", latent_dim=D, epochs=80)
  c.model.latent_size, c.batch_size, c.image_every = LATENT, B, 0
  for k, v in overrides.items():
    setattr(c, k, v)
  return c


def _batch(seed: int, bad: bool = False) -> dict:
  rng = np.random.default_rng(seed)
  latent = rng.normal(size=(B, LATENT, LATENT, D)).astype(np.float32)
  if bad:
    latent[0, 0, 0, 0] = np.inf
  return {"latent": latent, "label": rng.integers(0, 10, size=B).astype(np.int32)}


@pytest.fixture(scope="module")
def flow_setup():
  s = flow_trainer.Setup(_config(), need_data=False)
  step = s.compile_train_step(donate=False)
  stats = jax.device_put({"mean": np.zeros((D,), np.float32), "std": np.ones((D,), np.float32)},
                         s.replicated)
  return s, (lambda state, batch: step(state, sharding_lib.to_global(batch, s.data_sharding),
                                       stats))


def test_guard_update_keeps_every_part_and_counts():
  """Pure guard_update: with a NaN check the old params / optimizer / EMA / model state are
  returned bit for bit, step advances, counters run 1 -> 2 and reset to 0 on a finite one."""
  old = common.TrainState(step=jnp.int32(5), params={"w": jnp.ones(3)},
                          opt_state={"m": jnp.zeros(3)}, rng=jnp.zeros(2, jnp.uint32),
                          ema_params={"w": jnp.ones(3)}, model_state={"bn": jnp.ones(2)})
  new = old.replace(step=old.step + 1, params={"w": jnp.full(3, jnp.nan)},
                    opt_state={"m": jnp.ones(3)}, ema_params={"w": jnp.zeros(3)},
                    model_state={"bn": jnp.zeros(2)})
  guard = jax.jit(common.guard_update)
  s1, m1 = guard(old, new, jnp.float32(1.0), jnp.float32(jnp.nan))
  for part in ("params", "opt_state", "ema_params", "model_state"):
    jax.tree.map(np.testing.assert_array_equal, getattr(s1, part), getattr(old, part))
  assert int(s1.step) == 6 and float(m1["update_skipped"]) == 1.0
  assert (int(s1.skipped_run), int(s1.skipped_total)) == (1, 1)
  s2, _ = guard(s1, new.replace(skipped_run=s1.skipped_run,
                                skipped_total=s1.skipped_total), jnp.float32(jnp.inf))
  assert (int(s2.skipped_run), int(s2.skipped_total)) == (2, 2)
  good = new.replace(params={"w": jnp.full(3, 2.0)}, skipped_run=s2.skipped_run,
                     skipped_total=s2.skipped_total)
  s3, m3 = guard(s2, good, jnp.float32(0.5))
  np.testing.assert_array_equal(s3.params["w"], 2.0)
  assert (int(s3.skipped_run), int(s3.skipped_total), float(m3["update_skipped"])) == (0, 2, 0)


def test_dit_step_skips_inf_batch(flow_setup):
  """The compiled DiT step on a batch with one inf: loss non-finite, update skipped (params,
  Adam moments, EMA bit-identical), step + 1, counters in the metrics; the next finite batch
  updates again and resets the consecutive counter."""
  s, step = flow_setup
  state = s.init_state()
  before = jax.device_get(state)
  state, m = step(state, _batch(0, bad=True))
  m, after = jax.device_get((m, state))
  assert not np.isfinite(m["loss"])
  assert (m["update_skipped"], m["skipped_run"], m["skipped_total"]) == (1.0, 1, 1)
  assert int(after.step) == 1
  for part in ("params", "opt_state", "ema_params", "rng"):
    jax.tree.map(np.testing.assert_array_equal, getattr(after, part), getattr(before, part))
  state, m = step(state, _batch(1))
  m, after2 = jax.device_get((m, state))
  assert np.isfinite(m["loss"]) and m["update_skipped"] == 0.0
  assert (m["skipped_run"], m["skipped_total"]) == (0, 1)
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), after2.params,
                                         after.params))
  assert max(changed) > 0


def test_divergence_stops_and_keeps_last_finite_checkpoint(flow_setup, tmp_path):
  """ckpt_every=1, keep_ckpts=2, log_every=6: finite batches for steps 1-3, then inf. No
  checkpoint is written while the latest update was skipped, so 2 and 3 survive; at the log
  step 12 (9 consecutive skips >= max_nonfinite_steps=4) the run stops with one line naming
  step 12 and checkpoint 3, which restores to the step-3 parameters."""
  s, step = flow_setup
  c = _config(total_steps=30, ckpt_every=1, keep_ckpts=2, log_every=6, max_nonfinite_steps=4)
  batches = [_batch(i, bad=i >= 3) for i in range(30)]
  train_iter = iter(grain.MapDataset.source(batches).to_iter_dataset())
  ckpt = common.checkpointer(c, str(tmp_path))
  state = s.init_state()
  with pytest.raises(common.NonFiniteStop) as e:
    common.run_loop(c, str(tmp_path), state=state, step_fn=step, train_iter=train_iter,
                    data_sharding=s.data_sharding, ckpt=ckpt, log_keys=(("loss", ".4f"),))
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith("step 12:"), msg
  assert msg.endswith(os.path.join(str(tmp_path), "checkpoints", "3")), msg
  assert "max_nonfinite_steps=4" in msg
  saved = ckpt_lib.Checkpointer(os.path.join(tmp_path, "checkpoints"), save_every=1)
  assert saved.all_steps() == [2, 3]
  restored = ckpt_lib.restore_params(os.path.join(tmp_path, "checkpoints"), step=3)
  assert int(restored["skipped_run"]) == 0 and int(restored["step"]) == 3
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(restored["params"]))
  # Replaying the three finite batches reproduces checkpoint 3's params exactly.
  ref = s.init_state()
  for i in range(3):
    ref, _ = step(ref, batches[i])
  jax.tree.map(np.testing.assert_array_equal, restored["params"],
               jax.device_get(ref.params))


def test_checkpoint_without_skip_counters_restores(flow_setup, tmp_path):
  """A checkpoint written before the counters existed resumes: counters start at 0, the
  rest is restored exactly."""
  s, _ = flow_setup
  legacy = s.init_state().replace(skipped_run=None, skipped_total=None)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), save_every=1)
  ckpt.save(1, legacy, force=True)
  ckpt.close()
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), save_every=1)
  state = common.restore_or_init(ckpt, s.abstract_state, None, s.init_state, 10)
  ckpt.close()
  assert (int(state.skipped_run), int(state.skipped_total)) == (0, 0)
  assert state.skipped_run.sharding == s.abstract_state.skipped_run.sharding
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params),
               jax.device_get(legacy.params))


def test_sp_weight_without_teacher_is_an_error():
  c = configs_lib.autoencoder_config(None, latent_dim=8)
  assert c.loss.sp_weight > 0 and not c.teacher.init_from
  configs_lib.validate(c)   # the dry-run checks pass
  with pytest.raises(ValueError, match=r"config\.loss\.sp_weight=1\.0 needs a teacher: set "
                                       r"config\.teacher\.init_from"):
    configs_lib.validate_training(c)
  c.loss.sp_weight = 0.0
  configs_lib.validate_training(c)
  c.loss.sp_weight, c.teacher.init_from = 1.0, "/some/teacher"
  configs_lib.validate_training(c)
  c.loss.sp_weight = 0.0      # a teacher that L_sp would never use: also one line
  with pytest.raises(ValueError, match=r"config\.teacher\.init_from='/some/teacher' would be "
                                       r"unused: config\.loss\.sp_weight=0"):
    configs_lib.validate_training(c)
  # runlocal (the README's main job) has no teacher: the lambda_sp = 0 run, and valid;
  # ':runlocal,teacher=W' turns L_sp on with that teacher.
  r = configs_lib.autoencoder_config("runlocal", latent_dim=8)
  assert r.loss.sp_weight == 0 and not r.teacher.init_from
  configs_lib.validate_training(r)
  r = configs_lib.autoencoder_config("runlocal,teacher=/t", latent_dim=8)
  assert (r.loss.sp_weight, r.teacher.init_from) == (1.0, "/t")
  configs_lib.validate_training(r)
  c.max_nonfinite_steps = -1
  with pytest.raises(ValueError, match=r"config\.max_nonfinite_steps=-1 must be >= 0"):
    configs_lib.validate(c)
