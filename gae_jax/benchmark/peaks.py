"""Peak dense FLOP/s per chip and the recommended XLA flags, in one place.

Peaks are the vendors' dense (no 2:4 sparsity) numbers per chip, in FLOP/s:

  device   bf16        tf32        fp32 (IEEE, no tensor cores / MXU passes)
  H100     989.4e12    494.7e12    66.9e12    SXM5 (H100 datasheet)
  H100 PCIe 756.0e12   378.0e12    51.2e12
  H200     989.4e12    494.7e12    66.9e12    same GH100 die and clocks as H100 SXM5
  A100     312.0e12    156.0e12    19.5e12    (A100 datasheet; SXM and PCIe)
  B200     2250e12     1100e12     75.0e12    (HGX B200: 2.25 PF dense FP16/BF16 per GPU)
  TPU v4   275e12      -           -          (Cloud TPU system architecture pages)
  TPU v5e  197e12      -           -
  TPU v5p  459e12      -           -
  TPU v6e  918e12      -           -

TPUs publish no float32 figure: their MXU multiplies bfloat16.

Which peak an MFU uses (`peak_for`): bfloat16 compute -> bf16. float32 compute -> what a
float32 dot runs at under JAX's *default* matmul precision (docs.jax.dev "Matmul
precision": TF32 on recent NVIDIA GPUs, one bfloat16 pass on TPU), i.e. tf32 on GPUs of
Ampere and later, bf16 on TPU. A float32 run with `jax_default_matmul_precision=highest`
would run at the fp32 column instead; the benchmark does not change the default.
CPUs have no entry: no MFU is reported on CPU.
"""

import os
import re
from typing import Optional

TERA = 1e12

# name: {"bf16": FLOP/s, "tf32": ..., "fp32": ...}; None where the vendor gives no number.
PEAKS = {
    "H100": {"bf16": 989.4 * TERA, "tf32": 494.7 * TERA, "fp32": 66.9 * TERA},
    "H100 PCIe": {"bf16": 756.0 * TERA, "tf32": 378.0 * TERA, "fp32": 51.2 * TERA},
    "H200": {"bf16": 989.4 * TERA, "tf32": 494.7 * TERA, "fp32": 66.9 * TERA},
    "A100": {"bf16": 312.0 * TERA, "tf32": 156.0 * TERA, "fp32": 19.5 * TERA},
    "B200": {"bf16": 2250.0 * TERA, "tf32": 1100.0 * TERA, "fp32": 75.0 * TERA},
    "TPU v4": {"bf16": 275.0 * TERA, "tf32": None, "fp32": None},
    "TPU v5e": {"bf16": 197.0 * TERA, "tf32": None, "fp32": None},
    "TPU v5p": {"bf16": 459.0 * TERA, "tf32": None, "fp32": None},
    "TPU v6e": {"bf16": 918.0 * TERA, "tf32": None, "fp32": None},
}

# (regex on jax's device_kind, PEAKS key); first match wins, so specific names go first.
_KINDS = (
    (r"H100.*PCIe", "H100 PCIe"),
    (r"H200", "H200"),
    (r"H100", "H100"),
    (r"A100", "A100"),
    (r"B200", "B200"),
    (r"TPU v6( lite|e)", "TPU v6e"),
    (r"TPU v5( lite|e)", "TPU v5e"),
    (r"TPU v5p?$", "TPU v5p"),
    (r"TPU v4", "TPU v4"),
)


def chip_name(device_kind: str) -> Optional[str]:
  """jax `device.device_kind` -> a PEAKS key, or None (CPU, unknown chips).

  'NVIDIA H100 80GB HBM3' -> 'H100'; 'NVIDIA H200' -> 'H200'; 'TPU v5 lite' -> 'TPU v5e';
  'TPU v5' -> 'TPU v5p'; 'cpu' -> None.
  """
  for pattern, name in _KINDS:
    if re.search(pattern, device_kind):
      return name
  return None


def peak_for(device_kind: str, compute_dtype: str) -> tuple[Optional[float], str]:
  """(peak dense FLOP/s per chip, which column) for a run's compute dtype.

  Returns (None, reason) on CPU or an unknown chip. float32 on a GPU uses the tf32 column
  and on a TPU the bf16 column (JAX's default matmul precision; see the module docstring).
  """
  name = chip_name(device_kind)
  if name is None:
    return None, f"no peak known for device {device_kind!r} (no MFU on CPU)"
  row = PEAKS[name]
  if compute_dtype == "bfloat16":
    return row["bf16"], f"{name} bf16 dense"
  if compute_dtype == "float32":
    if name.startswith("TPU"):
      return row["bf16"], f"{name} bf16 dense (float32 dots run one bf16 pass by default)"
    return row["tf32"], f"{name} tf32 dense (float32 dots use TF32 by default)"
  return None, f"no peak for compute dtype {compute_dtype!r}"


# Recommended XLA flags (set before jax starts: `export XLA_FLAGS="..."`). GPU: the
# latency-hiding scheduler overlaps collectives with compute; the async collectives and
# the combine thresholds batch FSDP's all-gathers / reduce-scatters into fewer, larger
# ones; Triton GEMM stays on (XLA's default) and command buffers are left at XLA's
# default. TPU: the analogous scheduler / async collective fusion flags go in LIBTPU_INIT_ARGS.
# These are starting points from the public JAX GPU performance tips and maxtext's
# launch scripts, not values tuned on this project's models: measure with
# `python -m gae_jax.benchmark --sweep=xla_flags` on the target machine.
XLA_FLAGS_GPU = " ".join((
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    "--xla_gpu_enable_highest_priority_async_stream=true",
    "--xla_gpu_all_reduce_combine_threshold_bytes=134217728",
    "--xla_gpu_all_gather_combine_threshold_bytes=134217728",
    "--xla_gpu_reduce_scatter_combine_threshold_bytes=134217728",
))
LIBTPU_INIT_ARGS_TPU = " ".join((
    "--xla_tpu_enable_latency_hiding_scheduler=true",
    "--xla_tpu_enable_async_collective_fusion=true",
    "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true",
    "--xla_tpu_enable_async_collective_fusion_multiple_steps=true",
    "--xla_tpu_overlap_compute_collective_tc=true",
))


def recommended_env(platform: str) -> dict:
  """{env var: value} to export for `platform` ('gpu', 'tpu'); {} for 'cpu'."""
  if platform == "gpu":
    return {"XLA_FLAGS": XLA_FLAGS_GPU}
  if platform == "tpu":
    return {"LIBTPU_INIT_ARGS": LIBTPU_INIT_ARGS_TPU}
  return {}


def active_flags() -> dict:
  """The XLA flag environment this process started with (for the JSON record)."""
  return {k: os.environ.get(k, "") for k in ("XLA_FLAGS", "LIBTPU_INIT_ARGS")
          if os.environ.get(k)}
