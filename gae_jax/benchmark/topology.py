"""Pods on paper: compile a trainer's real sharded step for a TPU topology from a CPU host.

  report = compile_report(config, "v5p:4x4x4")

With `libtpu` installed (`pip install -e ".[tpu_aot]"`; jax's TPU extra pins the version)
`jax.experimental.topologies.get_topology_desc(platform="tpu", topology_name=...)` gives
TPU devices that XLA compiles for without the hardware, as maxtext's `train_compile.py`
does. The trainer's own `Setup` builds the mesh (`config.mesh`) over those devices, lays
out the train state with the project's logical-axis rules (gae_jax/sharding.py,
trainers/common.layout_state) and AOT-compiles its real `train_step` with the shardings
and donation it uses in training. Nothing is allocated: the state, batch and frozen
networks are ShapeDtypeStructs that carry NamedShardings.

The report (a dict, JSON-serialisable) holds per-device memory from
`compiled.memory_analysis()` against the chip's HBM, the FLOPs and the compiler's
estimated step time from `compiled.cost_analysis()` (per device: XLA's SPMD program is one
device's program), and the collectives of the optimised HLO (static instruction counts:
an op inside a loop counts once).

Stages: "autoencoder" (GAE, stage 2), "flow" (LightningDiT, stage 3) and "teacher"
(stage 1). The compute dtype is the config's `compute_dtype` (bf16): the trainers force
float32 on a CPU backend, which is what this host is, so the config copy compiled here
sets `compute_dtype_cpu` to it. The GAE step includes L_sp with an abstract frozen
DINOv2-L/14 + teacher downsampler (the paper's main model; `semantic=False` drops it)
unless `config.loss.sp_weight` is 0.
"""

import copy
import math
import os
import re
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from gae_jax import sharding as sharding_lib

GiB = 2 ** 30

# HBM per chip, GiB (Cloud TPU system-architecture pages: v4 32, v5e 16, v5p 95, v6e 32).
# Keyed by `device.device_kind` as libtpu reports it for compile-only topologies.
HBM_GIB_PER_CHIP = {
    "TPU v4": 32.0,
    "TPU v5 lite": 16.0,   # v5e
    "TPU v5e": 16.0,
    "TPU v5": 95.0,        # v5p
    "TPU v5p": 95.0,
    "TPU v6 lite": 32.0,   # v6e (Trillium)
    "TPU v6e": 32.0,
}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
               "collective-permute")
# An HLO instruction's opcode: "<name> = <shape> all-gather(" or the async "...-start(";
# instruction *names* (%all-gather.3) are followed by " =", never by "(".
_COLLECTIVE_RE = re.compile(r"[\s}\])](" + "|".join(COLLECTIVES) + r")(-start)?\(")
STAGES = ("autoencoder", "flow", "teacher")

LIBTPU_MISSING = ("compiling for a TPU topology needs libtpu: pip install -e \".[tpu_aot]\" "
                  "(jax's TPU extra pins the libtpu version; it exists for Linux x86-64 / "
                  "arm64 and the Python versions libtpu is built for)")


def get_topology(topology_name: str):
  """The compile-only TPU topology (`jax.experimental.topologies`).

  topology_name: "<generation>:<chips grid>", e.g. "v5p:2x2x2", "v6e:4x4", "v4:2x2x1".
  Raises RuntimeError (libtpu missing) or ValueError (a name libtpu does not know).
  """
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  # libtpu takes /tmp/libtpu_lockfile per process; a compile-only topology touches no chip,
  # so several compiles (or a test next to a running compile) may share the host.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    import libtpu  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise RuntimeError(LIBTPU_MISSING) from e
  try:
    return topologies.get_topology_desc(platform="tpu", topology_name=topology_name)
  except Exception as e:  # libtpu raises XlaRuntimeError / RuntimeError for unknown names
    raise ValueError(f"--topology={topology_name!r}: libtpu cannot build it "
                     f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); use e.g. "
                     f"v5p:2x2x2, v5e:4x4, v6e:4x4, v4:2x2x1") from e


def topology_info(topology_name: str, devices) -> dict:
  """Chips, devices per chip, hosts and HBM per device of a topology's devices."""
  kind = devices[0].device_kind
  grid = topology_name.partition(":")[2]
  try:
    chips = math.prod(int(s) for s in grid.split("x"))
  except ValueError:
    chips = len({tuple(getattr(d, "coords", (i,))) for i, d in enumerate(devices)})
  per_chip = max(1, len(devices) // max(chips, 1))
  hbm_chip = HBM_GIB_PER_CHIP.get(kind)
  return {"topology": topology_name, "device_kind": kind, "devices": len(devices),
          "chips": chips, "devices_per_chip": per_chip,
          "hosts": len({d.process_index for d in devices}),
          "hbm_gib_per_chip": hbm_chip,
          "hbm_gib_per_device": None if hbm_chip is None else hbm_chip / per_chip}


def count_collectives(hlo_text: str) -> dict:
  """{kind: number of instructions} of every collective in an HLO module's text.

  Async pairs count once (the -start; -done is not matched). Static counts: a collective
  inside a while loop (nn.scan) counts once however many iterations run.
  """
  counts = {k: 0 for k in COLLECTIVES}
  for m in _COLLECTIVE_RE.finditer(hlo_text):
    counts[m.group(1)] += 1
  return counts


def memory_report(compiled, hbm_gib: Optional[float]) -> dict:
  """Per-device bytes of a compiled program (GiB) and whether they fit `hbm_gib`.

  total = arguments + outputs - aliased (donated state reused for outputs) + temporaries
  + generated code (maxtext's train_compile sum plus the code).
  """
  mem = compiled.memory_analysis()
  if mem is None:
    return {"available": False}
  g = lambda b: round(float(b) / GiB, 3)  # noqa: E731
  total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
           + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
  out = {"available": True, "arguments_gib": g(mem.argument_size_in_bytes),
         "outputs_gib": g(mem.output_size_in_bytes), "aliased_gib": g(mem.alias_size_in_bytes),
         "temporaries_gib": g(mem.temp_size_in_bytes),
         "code_gib": g(mem.generated_code_size_in_bytes), "total_gib": g(total)}
  if hbm_gib:
    out.update(hbm_gib=hbm_gib, fits=bool(total / GiB <= hbm_gib),
               hbm_fraction=round(total / GiB / hbm_gib, 3))
  return out


def cost_report(compiled, n_devices: int) -> dict:
  """FLOPs, bytes accessed and the compiler's time estimate (per device) + FLOPs total.

  Keys absent from a backend's cost analysis are omitted ('optimal_seconds' is libtpu's
  estimate of the step time on the target chip; a value <= 0, as libtpu 0.0.50 gives for
  v6e, is reported as 'estimate_unavailable' instead).
  """
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else {}
  ca = dict(ca or {})
  out = {}
  for src, dst in (("flops", "flops_per_device"), ("transcendentals", "transcendentals"),
                   ("bytes accessed", "bytes_accessed_per_device"),
                   ("optimal_seconds", "estimated_step_s")):
    if src not in ca:
      continue
    if src == "optimal_seconds" and not float(ca[src]) > 0:
      # libtpu 0.0.50 returns a negative optimal_seconds for v6e: no estimate, not a time.
      out["estimate_unavailable"] = f"libtpu's optimal_seconds is {float(ca[src]):.4g}"
      continue
    out[dst] = float(ca[src])
  if "flops_per_device" in out:
    out["flops_total"] = out["flops_per_device"] * n_devices
  if out.get("estimated_step_s") and out.get("flops_per_device"):
    out["estimated_tflops_per_device"] = round(
        out["flops_per_device"] / out["estimated_step_s"] / 1e12, 2)
  out["cost_keys"] = sorted(k for k in ca if "{" not in k)
  return out


def _with_peak(cost: dict, info: dict, compute_dtype: str) -> dict:
  """Adds the chip's peak (benchmark/peaks.py) and the compiler estimate's share of it."""
  from gae_jax.benchmark import peaks  # pylint: disable=g-import-not-at-top
  peak, column = peaks.peak_for(info["device_kind"], compute_dtype)
  if peak:
    cost["peak_tflops_per_chip"] = round(peak / 1e12, 1)
    cost["peak_column"] = column
    if cost.get("estimated_step_s") and cost.get("flops_per_device"):
      per_chip = cost["flops_per_device"] * info["devices_per_chip"] / cost["estimated_step_s"]
      cost["estimated_fraction_of_peak"] = round(per_chip / peak, 3)
  return cost


def _tpu_config(config):
  """A copy of `config` whose compute dtype holds on a CPU host (see module docstring)."""
  c = copy.deepcopy(config)
  with c.unlocked():
    c.compute_dtype_cpu = str(c.compute_dtype)
  return c


def _replicated_abstract(tree, mesh):
  """ShapeDtypeStructs of a (numpy or abstract) tree, replicated over `mesh`."""
  rep = sharding_lib.replicated(mesh)
  return jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(np.shape(a), getattr(a, "dtype", None) or
                                     np.asarray(a).dtype, sharding=rep), tree)


def _abstract_semantic(config, mesh):
  """frozen["teacher"] for a GAE step with L_sp, abstract: a stage-1 teacher's VFM +
  downsampler (configs_lib.teacher_config defaults at the GAE's latent width): DINOv2-L/14
  for a 16 x 16 latent grid (the paper), VGG16 relu5_3 for other grids (small test GAEs).
  Returns (FrozenSemantic of replicated ShapeDtypeStructs, a description)."""
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  from gae_jax import configs_lib  # pylint: disable=g-import-not-at-top
  from gae_jax.convert import teacher as convert_teacher  # pylint: disable=g-import-not-at-top
  from gae_jax.trainers import autoencoder  # pylint: disable=g-import-not-at-top
  from gae_jax.trainers import common  # pylint: disable=g-import-not-at-top
  from gae_jax.trainers import teacher as teacher_trainer  # pylint: disable=g-import-not-at-top
  grid = config.data.image_size // config.model.patch_size
  if grid == 16:   # the paper's: DINOv2-L/14 at 224 px gives 16 x 16
    tc = configs_lib.teacher_config(None, latent_dim=int(config.model.latent_dim))
  else:            # small GAEs (runlocal): VGG16 relu5_3 at 16 px per grid cell
    tc = configs_lib.teacher_config("runlocal", latent_dim=int(config.model.latent_dim))
  with tc.unlocked():
    tc.teacher.vfm_image_size = tc.data.image_size = tc.data.image_size if grid == 16 \
        else 16 * grid
    tc.compute_dtype = config.compute_dtype
    tc.compute_dtype_cpu = config.compute_dtype_cpu
  backend, info = teacher_trainer.build_backend(tc, abstract=True)
  fields = teacher_trainer.model_fields(tc, backend, info)
  dtype = common.compute_dtype(config)
  spec = autoencoder.SemanticSpec("latent", backend,
                                  convert_teacher.build_teacher(fields, dtype), fields)
  x = jax.ShapeDtypeStruct((1, backend.image_size, backend.image_size, 3), jnp.float32)
  vfm = nn.meta.unbox(jax.eval_shape(backend.module.init, jax.random.key(0), x))
  f32 = lambda t: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32), t)  # noqa
  teacher = {"params": {"downsampler": convert_teacher.teacher_shapes(fields)["downsampler"]}}
  sem = autoencoder.FrozenSemantic(vfm=f32(vfm), teacher=f32(teacher), spec=spec)
  vfm_name = f"DINOv2-{info.get('variant', '?')}/14" if info else backend.name
  desc = (f"{vfm_name} at {backend.image_size} px + {fields['downsampler']} downsampler to "
          f"d={fields['latent_dim']} (abstract)")
  return _replicated_abstract(sem, mesh), desc


def _compile_autoencoder(config, mesh, semantic: bool):
  from gae_jax.models import vgg  # pylint: disable=g-import-not-at-top
  from gae_jax.trainers import autoencoder  # pylint: disable=g-import-not-at-top
  s = autoencoder.Setup(config, mesh=mesh)
  frozen = {"lpips": _replicated_abstract(vgg.load_lpips_params(), mesh)}
  notes = {"frozen": ["LPIPS VGG16"]}
  if autoencoder.semantic_spec(config) is not None:
    raise ValueError("config.teacher.* names a real teacher / VFM: compile_report builds "
                     "an abstract one; unset config.teacher.init_from / vfm")
  if semantic and float(config.loss.sp_weight) > 0:
    frozen["teacher"], desc = _abstract_semantic(config, mesh)
    notes["frozen"].append(desc)
  t0 = time.perf_counter()
  compiled = s.compile_train_step(frozen)
  return s, compiled, time.perf_counter() - t0, notes


def _compile_flow(config, mesh):
  from gae_jax.trainers import flow as flow_trainer  # pylint: disable=g-import-not-at-top
  s = flow_trainer.Setup(config, mesh=mesh, need_data=False)
  t0 = time.perf_counter()
  compiled = s.compile_train_step()
  return s, compiled, time.perf_counter() - t0, {}


def _compile_teacher(config, mesh):
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  from gae_jax.trainers import teacher as teacher_trainer  # pylint: disable=g-import-not-at-top
  s = teacher_trainer.Setup(config, mesh=mesh, abstract_vfm=True)
  b = s.backend
  x = jax.ShapeDtypeStruct((1, b.image_size, b.image_size, 3), jnp.float32)
  vfm = nn.meta.unbox(jax.eval_shape(b.module.init, jax.random.key(0), x))
  vfm = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32), vfm)
  frozen = {"vfm": _replicated_abstract(vfm, mesh)}
  t0 = time.perf_counter()
  compiled = s.compile_train_step(frozen)
  return s, compiled, time.perf_counter() - t0, {"frozen": [f"{b.name} (abstract)"]}


def compile_report(config, topology_name: str, *, semantic: bool = True,
                   hlo_path: Optional[str] = None) -> dict:
  """Compiles `config`'s train step for a TPU topology and reports memory, FLOPs, collectives.

  config: a trainer config (stage autoencoder / flow / teacher) at any size, e.g.
    configs/gae_l32.py's get_config(). topology_name: e.g. "v5p:4x4x4" (see
    `get_topology`). semantic: include L_sp's frozen DINOv2 + teacher in a GAE step.
  hlo_path: also write the optimised HLO text there.
  Returns a JSON-serialisable dict: topology, mesh, batch, params, memory (GiB per
  device vs HBM), cost (FLOPs per device and total, estimated step seconds), collectives,
  compile_s. Raises RuntimeError without libtpu, ValueError for an unknown stage /
  topology or a mesh / batch the topology cannot split.
  """
  stage = config.get("stage")
  if stage not in STAGES:
    raise ValueError(f"config.stage={stage!r}: compile_report compiles the train step of "
                     f"{', '.join(STAGES)}")
  topo = get_topology(topology_name)
  devices = list(topo.devices)
  info = topology_info(topology_name, devices)
  config = _tpu_config(config)
  mesh = sharding_lib.make_mesh(config.mesh, devices=devices)
  if stage == "autoencoder":
    s, compiled, dt, notes = _compile_autoencoder(config, mesh, semantic)
  elif stage == "flow":
    s, compiled, dt, notes = _compile_flow(config, mesh)
  else:
    s, compiled, dt, notes = _compile_teacher(config, mesh)
  from gae_jax.trainers import common  # pylint: disable=g-import-not-at-top
  params = {k: int(v) for k, v in common.param_counts(s.abstract_boxed.params).items()}
  text = compiled.as_text()
  if hlo_path:
    with open(hlo_path, "w") as f:
      f.write(text)
  n_batch = math.prod(mesh.shape[a] for a in sharding_lib.batch_axes(mesh, s.rules))
  model = config.get("model") or config.teacher
  return {
      "stage": stage,
      "model": {k: model.get(k) for k in ("variant", "decoder_variant", "patch_size",
                                          "latent_dim", "remat", "scan", "vfm",
                                          "downsampler") if k in model},
      **info,
      "mesh": {k: int(v) for k, v in mesh.shape.items()},
      "param_sharding": config.param_sharding,
      "compute_dtype": str(config.compute_dtype),
      "param_dtype": str(config.param_dtype),
      "global_batch": int(config.batch_size),
      "batch_per_device": config.batch_size / n_batch,
      "params": params,
      "params_total": int(sum(params.values())),
      **notes,
      "memory": memory_report(compiled, info["hbm_gib_per_device"]),
      "cost": _with_peak(cost_report(compiled, len(devices)), info, str(config.compute_dtype)),
      "collectives": count_collectives(text),
      "compile_s": round(dt, 1),
      "jax": jax.__version__,
      "libtpu": _libtpu_version(),
  }


def _libtpu_version() -> str:
  try:
    from importlib import metadata  # pylint: disable=g-import-not-at-top
    return metadata.version("libtpu")
  except Exception:  # not installed as a distribution
    return "unknown"


def format_report(r: dict) -> str:
  """A few human lines for one report (the benchmark CLI prints them)."""
  m, c, col = r["memory"], r["cost"], r["collectives"]
  lines = [f"{r['stage']} {r['model']} on {r['topology']} ({r['devices']} x "
           f"{r['device_kind']}, {r['hosts']} hosts), mesh {r['mesh']}, global batch "
           f"{r['global_batch']} ({r['batch_per_device']:g} per device), "
           f"{r['compute_dtype']} compute, {r['params_total'] / 1e6:.1f}M trainable params"]
  if m.get("available"):
    fit = ""
    if "fits" in m:
      fit = (f" of {m['hbm_gib']:.1f} GiB HBM per device ({100 * m['hbm_fraction']:.0f}%"
             f", {'fits' if m['fits'] else 'DOES NOT FIT'})")
    lines.append(f"  memory per device: {m['total_gib']:.2f} GiB{fit}; arguments "
                 f"{m['arguments_gib']:.2f}, outputs {m['outputs_gib']:.2f}, aliased "
                 f"{m['aliased_gib']:.2f}, temporaries {m['temporaries_gib']:.2f}")
  if "flops_per_device" in c:
    est = (f", compiler's step estimate {c['estimated_step_s'] * 1e3:.1f} ms"
           if "estimated_step_s" in c else
           f", no step estimate ({c['estimate_unavailable']})"
           if "estimate_unavailable" in c else "")
    if "estimated_fraction_of_peak" in c:
      est += f" = {100 * c['estimated_fraction_of_peak']:.0f}% of the chip's peak"
    lines.append(f"  {c['flops_per_device'] / 1e12:.2f} TFLOP per device per step "
                 f"({c['flops_total'] / 1e15:.2f} PFLOP total){est}")
  lines.append("  collectives: " + ", ".join(f"{k} {v}" for k, v in col.items()))
  lines.append(f"  compiled in {r['compile_s']:.0f} s")
  return "\n".join(lines)


def main(argv=None):
  """python -m gae_jax.benchmark.topology --config=configs/gae_l32.py --topology=v5p:4x4x4
  [--mesh=data:1,fsdp:-1,tensor:1] [--json=/tmp/r.json] [--nosemantic]: one report,
  printed (and written as JSON)."""
  import json  # pylint: disable=g-import-not-at-top
  from absl import app, flags  # pylint: disable=g-import-not-at-top,g-multiple-import
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "Trainer config file (path[:arg]).")
  flags.DEFINE_string("topology", "v5p:2x2x2", "TPU topology, e.g. v5p:4x4x4, v6e:8x8.")
  flags.DEFINE_string("json", None, "Also write the report here.")
  flags.DEFINE_bool("semantic", True, "GAE: include L_sp's frozen VFM + teacher.")
  flags.DEFINE_string("mesh", None, "Replaces config.mesh, e.g. data:1,fsdp:-1,tensor:1 "
                      "(ml_collections cannot override a list field from the command line).")

  def run(_):
    f = flags.FLAGS
    config = f.config
    if f.mesh:
      try:
        mesh = [(name, int(size)) for name, size in
                (axis.split(":") for axis in f.mesh.split(","))]
      except ValueError:
        raise app.UsageError(f"--mesh={f.mesh!r}: use name:size,... e.g. "
                             "data:1,fsdp:-1,tensor:1") from None
      config.mesh = mesh
    r = compile_report(config, f.topology, semantic=f.semantic)
    print(format_report(r))
    if f.json:
      with open(f.json, "w") as fh:
        json.dump(r, fh, indent=1)

  app.run(run, argv=argv)


if __name__ == "__main__":
  main()
