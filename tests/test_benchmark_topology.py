"""gae_jax.benchmark.topology: a trainer's real step compiled for a TPU topology on CPU.

The compile tests need libtpu (`pip install -e ".[tpu_aot]"`) and are skipped without it;
the HLO collective count and the no-libtpu error run everywhere.
"""

import importlib.util

import pytest

from gae_jax import configs_lib
from gae_jax.benchmark import topology

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
NO_LIBTPU = ("libtpu is not installed: the CI environment (Python 3.11 with jax 0.10.2) has "
             "no libtpu; `pip install -e \".[tpu_aot]\"` (verified on Python 3.12, jax "
             "0.12.0.1, libtpu 0.0.50.1) runs these TPU-topology compiles on a CPU host")
requires_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason=NO_LIBTPU)
TOPOLOGY = "v5p:2x2x1"   # 4 chips, 1 host: the smallest v5p slice


def test_count_collectives_counts_opcodes_not_names():
  hlo = """
  %all-reduce.1 = f32[4]{0} all-reduce(f32[4]{0} %p), replica_groups={{0,1}}, to_apply=%add
  %all-gather-start.2 = (bf16[2,8]{1,0}, bf16[4,8]{1,0}) all-gather-start(bf16[2,8]{1,0} %x)
  %all-gather-done.2 = bf16[4,8]{1,0} all-gather-done(%all-gather-start.2)
  %rs = f32[2]{0:T(256)} reduce-scatter(f32[4]{0} %g), dimensions={0}
  %cp = f32[8]{0} collective-permute-start(f32[8]{0} %y), source_target_pairs={{0,1}}
  %fusion.3 = f32[4]{0} fusion(%all-reduce.1), kind=kLoop, calls=%fused
  """
  assert topology.count_collectives(hlo) == {
      "all-reduce": 1, "all-gather": 1, "reduce-scatter": 1, "all-to-all": 0,
      "collective-permute": 1}


@pytest.mark.skipif(HAS_LIBTPU, reason="libtpu is installed: the missing-libtpu error "
                    "cannot occur here")
def test_without_libtpu_the_error_says_how_to_install():
  with pytest.raises(RuntimeError, match=r"libtpu.*tpu_aot"):
    topology.compile_report(configs_lib.dit_config("runlocal", latent_dim=32, epochs=80),
                            TOPOLOGY)


@requires_libtpu
def test_unknown_topology_is_one_clear_error():
  with pytest.raises(ValueError, match="v5x:9x9.*use e.g."):
    topology.get_topology("v5x:9x9")


def _dit_config(mesh):
  c = configs_lib.dit_config("runlocal", latent_dim=32, epochs=80)
  c.mesh = mesh
  return c


@requires_libtpu
def test_tiny_dit_step_compiles_for_v5p_data_parallel_and_fsdp(tmp_path):
  """The flow trainer's real step on 4 v5p chips: memory, FLOPs and collectives follow the
  mesh (replicated state + gradient all-reduce vs FSDP-sharded state + gathers)."""
  hlo = tmp_path / "dp.hlo"
  dp = topology.compile_report(_dit_config([("data", -1), ("fsdp", 1), ("tensor", 1)]),
                               TOPOLOGY, hlo_path=str(hlo))
  assert (dp["devices"], dp["chips"], dp["device_kind"]) == (4, 4, "TPU v5")
  assert dp["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
  assert dp["batch_per_device"] == 16 / 4
  # The trainers force float32 on a CPU backend; the TPU program computes in bf16.
  assert dp["compute_dtype"] == "bfloat16" and "bf16[" in hlo.read_text()
  n = dp["params_total"]
  mem = dp["memory"]
  # Replicated float32 state: params, EMA, AdamW mu and nu on every device (+ the batch).
  assert mem["arguments_gib"] * topology.GiB >= 4 * 4 * n * 0.99
  assert mem["fits"] and mem["hbm_gib"] == 95.0 and 0 < mem["total_gib"] < 1
  # Forward + backward ~ 6 FLOPs per parameter per token (+ attention, loss, AdamW): within
  # a factor of 3 either way of 6 * N * tokens * per-device batch.
  tokens = 8 * 8
  analytic = 6 * n * tokens * dp["batch_per_device"]
  assert analytic / 3 < dp["cost"]["flops_per_device"] < 3 * analytic
  assert dp["cost"]["flops_total"] == pytest.approx(4 * dp["cost"]["flops_per_device"])
  assert dp["collectives"]["all-reduce"] >= 1          # gradient mean over the batch shards

  fsdp = topology.compile_report(_dit_config([("data", 1), ("fsdp", -1), ("tensor", 1)]),
                                 TOPOLOGY)
  assert fsdp["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
  assert fsdp["memory"]["arguments_gib"] < 0.6 * mem["arguments_gib"]   # sharded state
  c = fsdp["collectives"]
  assert c["all-gather"] + c["reduce-scatter"] >= 1    # parameters gathered, grads scattered


@requires_libtpu
@pytest.mark.slow   # ~2.5 min on 2 busy cores; the DiT test above covers the shared path
def test_tiny_gae_step_with_semantic_teacher_compiles(tmp_path):
  c = configs_lib.autoencoder_config("runlocal", latent_dim=32)
  r = topology.compile_report(c, TOPOLOGY)
  assert r["stage"] == "autoencoder" and r["memory"]["fits"]
  assert any("vgg16_relu5_3" in f for f in r["frozen"])   # L_sp's abstract VFM + teacher
  assert r["cost"]["flops_per_device"] > 0
