"""gae_jax.benchmark: analytic FLOP counts, the peak table, and a CPU smoke run of every
stage's real compiled program (one child process on one CPU device, tiny configs).

The smoke runs assert only that each stage ran and that XLA's cost analysis agrees with
the analytic count within 10% (sizes picked so matmuls / convs dominate; the remainder is
norms, activations, the optimizer and, for convs, nothing: both count valid taps only).
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gae_jax import configs_lib
from gae_jax.benchmark import flops
from gae_jax.benchmark import peaks
from gae_jax.benchmark import stages


# ------------------------------------------------------------------ analytic counts


def test_valid_taps_counts_padding_out():
  # 3 taps, pad 1, stride 1 on 4 pixels: the two edge outputs lose one tap each.
  assert flops.valid_taps(4, 3, 1, (1, 1)) == (4, 10)
  # VALID patchify: every tap lands on a pixel.
  assert flops.valid_taps(16, 8, 8, (0, 0)) == (2, 16)
  # Stride 2, 4x4 kernel, pad 1 (PatchGAN conv0) on 8 pixels: 4 outputs, both ends lose one.
  assert flops.valid_taps(8, 4, 2, (1, 1)) == (4, 14)


def _abstract_init(module, *inputs, **kw):
  return jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs, **kw))


def test_closed_forms_match_the_traced_programs():
  """Each closed form equals the matmul / conv count of the model's own jaxpr."""
  from gae_jax.models import discriminator, dinov2, dit, gae, vgg
  c = configs_lib.autoencoder_config("runlocal", latent_dim=32)
  m = gae.make_gae(c.model)
  x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
  v = jax.eval_shape(lambda: m.init({"params": jax.random.key(0), "noise": jax.random.key(1)},
                                    jnp.zeros((1, 64, 64, 3))))
  assert flops.jaxpr_flops(lambda p, a: m.apply(p, a), v, x) == 2 * flops.total(
      flops.gae_model(m, 64))
  lp = vgg.LPIPS()
  v = _abstract_init(lp, jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 32, 32, 3)))
  x32 = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  assert flops.jaxpr_flops(lambda p, a: lp.apply(p, a, a), v, x32) == pytest.approx(
      2 * 2 * flops.total(flops.lpips(32)))
  d = discriminator.NLayerDiscriminator()
  v = _abstract_init(d, jnp.zeros((1, 64, 64, 3)), train=False)
  assert flops.jaxpr_flops(lambda p, a: d.apply(p, a, train=False), v, x) == 2 * flops.total(
      flops.patchgan(64))
  mm = dit.make_dit("mu", in_channels=32, num_classes=11)
  v = _abstract_init(mm, jnp.zeros((1, 8, 8, 32)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))
  args = (jax.ShapeDtypeStruct((2, 8, 8, 32), jnp.float32),
          jax.ShapeDtypeStruct((2,), jnp.float32), jax.ShapeDtypeStruct((2,), jnp.int32))
  assert flops.jaxpr_flops(lambda p, *a: mm.apply(p, *a), v, *args) == 2 * flops.total(
      flops.dit_model(mm, 8))
  ds = dinov2.DinoV2(variant="S")
  v = _abstract_init(ds, jnp.zeros((1, 56, 56, 3)))
  got = flops.jaxpr_flops(lambda p, a: ds.apply(p, a), v,
                          jax.ShapeDtypeStruct((1, 56, 56, 3), jnp.float32))
  # The traced program also resizes the 37x37 position table (bicubic matmuls): +0.3%.
  assert got == pytest.approx(flops.total(flops.dinov2_module(ds, 56)), rel=0.01)


def test_paper_size_counts_match_the_issue_anchors():
  """LightningDiT-XL/1 training 712 GFLOP/img (adaLN once per sample), DINOv2-L 162,
  GAE-L encoder + decoder training 986 (issue 11)."""
  from gae_jax.models import dinov2, dit, gae
  xl = dit.make_dit("XL/1", in_channels=32)
  assert 3 * flops.total(flops.dit_model(xl, 16)) / 1e9 == pytest.approx(712, rel=0.01)
  assert flops.total(flops.dinov2_module(dinov2.DinoV2(variant="L"), 224)) / 1e9 == \
      pytest.approx(162, rel=0.01)
  gl = gae.make_gae(configs_lib.autoencoder_config(None, latent_dim=32).model)
  assert 3 * flops.total(flops.gae_model(gl, 256)) / 1e9 == pytest.approx(986, rel=0.01)
  # Per-token adaLN would add 255 x depth x 2 x W x 6W: the count is not that.
  per_token = 3 * 255 * 28 * flops.dense(1, 1152, 6 * 1152)
  assert per_token / 1e9 > 100


def test_peak_table():
  assert peaks.chip_name("NVIDIA H100 80GB HBM3") == "H100"
  assert peaks.chip_name("NVIDIA H100 PCIe") == "H100 PCIe"
  assert peaks.chip_name("NVIDIA H200") == "H200"
  assert peaks.chip_name("TPU v5 lite") == "TPU v5e"
  assert peaks.chip_name("TPU v5") == "TPU v5p"
  assert peaks.chip_name("TPU v6 lite") == "TPU v6e"
  assert peaks.chip_name("cpu") is None
  assert peaks.peak_for("NVIDIA H200", "bfloat16")[0] == pytest.approx(989.4e12)
  assert peaks.peak_for("NVIDIA A100-SXM4-80GB", "float32")[0] == pytest.approx(156e12)
  assert peaks.peak_for("TPU v4", "float32")[0] == pytest.approx(275e12)
  assert peaks.peak_for("cpu", "float32")[0] is None
  assert "latency_hiding_scheduler" in peaks.XLA_FLAGS_GPU
  gap = stages.target_gap("dit_train", 712e9, 347.5, 0.25, "NVIDIA H100 80GB HBM3",
                          "bfloat16")["gap"]
  assert gap == {"mfu_ratio": pytest.approx(0.5), "img_per_s_ratio": pytest.approx(0.5)}
  assert "not comparable" in stages.target_gap("dit_train", 712e9, 1.0, None, "cpu",
                                                "float32")["gap"]


# ------------------------------------------------------------------ smoke runs


def _cfg(name, arg, **overrides):
  import importlib.util
  path = os.path.join(os.path.dirname(__file__), "..", "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config(arg)
  with c.unlocked():
    for k, v in overrides.items():
      node = c
      *parents, leaf = k.split(".")
      for p in parents:
        node = node[p]
      node[leaf] = v
  return c


# Tiny configs, run on ONE CPU device (the benchmark's own path; compiling for 8 fake
# devices doubles the compile time): the runlocal models at small images (16 px GAE: 2x2
# latents, LPIPS at 16 px, the synthesised VGG16 teacher at 32 px, a 2-layer PatchGAN;
# the stage-1 teacher at 64 px, where its matmuls outweigh its norms), few images.
SMOKE = {
    "dit_train": lambda: _cfg("dit_xl_gae32_80ep", "runlocal"),
    "sampling": lambda: _cfg("dit_xl_gae32_80ep", "runlocal", batch_size=4),
    "autoencoder": lambda: _cfg("gae_l32", "runlocal", batch_size=4, **{
        "data.image_size": 16, "loss.disc_layers": 2}),
    "teacher": lambda: _cfg("teacher_l32", "runlocal", batch_size=2, **{
        "data.image_size": 64, "teacher.vfm_image_size": 64}),
    "latent_cache": lambda: _cfg("gae_l32", "runlocal", **{"data.image_size": 32}),
    "fid_features": lambda: _cfg("eval_reconstruction", "runlocal", batch_size=2,
                                 **{"data.image_size": 32}),
}


def smoke_child():
  """In the child process: every stage once (1 timed call), one 'BENCH <json>' line each."""
  for stage in stages.STAGES:
    bench = stages.build(stage, SMOKE[stage](), stages.Options(sample_steps=4))
    rec = stages.measure(bench, steps=1, warmup=0)
    print("BENCH " + json.dumps(rec, default=str), flush=True)


@pytest.fixture(scope="module")
def smoke_records():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if "force_host_platform_device_count" not in f)
  here = os.path.dirname(os.path.abspath(__file__))
  code = (f"import sys; sys.path.insert(0, {here!r}); import test_benchmark; "
          "test_benchmark.smoke_child()")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        env=env, timeout=900)
  recs = {}
  for line in proc.stdout.splitlines():
    if line.startswith("BENCH "):
      rec = json.loads(line[len("BENCH "):])
      recs[rec["stage"]] = rec
  return recs, proc.stderr[-3000:]


@pytest.mark.parametrize("stage", stages.STAGES)
def test_stage_runs_and_xla_agrees_with_analytic(stage, smoke_records):
  recs, stderr = smoke_records
  assert stage in recs, stderr
  rec = recs[stage]
  print(f"\n{stage}: {rec['img_per_s']:.2f} img/s, step {1e3 * rec['step_time_s']:.1f} ms, "
        f"analytic {rec['flops_per_image_analytic'] / 1e9:.4f} GFLOP/img, XLA "
        f"{rec['flops_per_image_xla'] / 1e9:.4f}, compiled peak "
        f"{rec['memory'].get('compiled_peak_bytes', 0) / 2**20:.1f} MiB")
  assert rec["stage"] == stage and rec["devices"] == 1
  assert rec["img_per_s"] > 0 and rec["step_time_s"] > 0
  assert rec["mfu"] is None and "CPU" in rec["peak"]      # no MFU on CPU
  assert rec["memory"]["compiled_peak_bytes"] > 0
  assert 0.9 <= rec["xla_over_analytic"] <= 1.1, rec["analytic_gflop_by_network"]


def test_cli_writes_one_json_line_and_config_errors_are_one_line(tmp_path):
  out = tmp_path / "bench.jsonl"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "gae_jax.benchmark", "--config=gae_l32:runlocal",
         "--config.data.image_size=32", "--stage=latent_cache", "--steps=1", "--warmup=0",
         f"--out={out}"]
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  rec = json.loads(out.read_text().strip())
  assert rec["stage"] == "latent_cache" and rec["img_per_s"] > 0
  assert "latent_cache:" in proc.stderr
  bad = subprocess.run(cmd[:4] + ["--stage=trainn"], capture_output=True, text=True, env=env,
                       timeout=300)
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines()[-1].startswith("error: --stage='trainn'")


def test_data_only_times_folder_and_tfds_sources(tmp_path):
  """Both sources are built offline (the TFDS one without TensorFlow) and read back."""
  from gae_jax.benchmark import data
  c = _cfg("gae_l32", "runlocal", **{"data.image_size": 32})
  recs = data.run(c, batches=2, warmup=1, copies=1, workdir=str(tmp_path))
  assert [r["source"] for r in recs] == ["folder", "tfds"]
  for r in recs:
    print(f"\n{r['source']}: {r['img_per_s_per_host']:.1f} img/s per host")
    assert r["images"] == 2 * c.batch_size and r["img_per_s_per_host"] > 0


def test_sweep_switches_and_overrides():
  from gae_jax.benchmark import __main__ as bench_main
  sw = bench_main.switches("autoencoder", "cpu")
  assert set(sw) == {"compute_dtype", "attention_impl", "remat", "scan", "donate",
                     "frozen_dtype", "disc_dtype", "skip_disc",
                     "teacher_cache"}   # no cudnn, no XLA flags on CPU
  assert sw["teacher_cache"] == [("on", {"teacher.cache_outputs": True}),
                                 ("off", {"teacher.cache_outputs": False})]
  # skip_disc times the step before disc_start, with and without the PatchGAN's work.
  assert [(label, o[bench_main.PHASE], o["loss.skip_disc_before_start"])
          for label, o in sw["skip_disc"]] == [("on", "before", True), ("off", "before", False)]
  assert [label for label, _ in sw["attention_impl"]] == ["xla"]
  assert "cudnn" in [label for label, _ in bench_main.switches("dit_train", "gpu")[
      "attention_impl"]]
  c = _cfg("gae_l32", "runlocal")
  c2 = bench_main.with_overrides(c, {"model.remat": "full", "compute_dtype_cpu": "bfloat16",
                                     "frozen_dtype": "bfloat16"})
  assert c2.model.remat == "full" and c.model.remat == "none"
  from gae_jax.trainers import common
  assert common.compute_dtype(c2) == jnp.bfloat16 and common.frozen_dtype(c2) == jnp.bfloat16
  assert common.frozen_dtype(c) == common.compute_dtype(c)


def test_timm_shim_layers_and_cleanup():
  """torch_compare's timm stand-ins: PatchEmbed is patchify @ W + b with timm's names and
  attributes, Mlp is fc2(gelu(fc1)); the shim is gone from sys.modules after the block, and
  is used only when timm itself does not import."""
  torch = pytest.importorskip("torch")
  from gae_jax.benchmark import timm_shim
  real, _ = timm_shim.timm_importable()
  with timm_shim.release_timm(log=lambda m: None) as used:
    from timm.models.vision_transformer import Mlp, PatchEmbed  # pylint: disable=g-import-not-at-top
  assert used.startswith("timm ") if real else used.startswith("shim")
  if not real:
    assert not any(m == "timm" or m.startswith("timm.") for m in sys.modules)
  torch.manual_seed(0)
  pe = PatchEmbed(4, 2, 3, 5, bias=True)
  assert pe.num_patches == 4 and pe.patch_size[0] == 2
  assert sorted(k for k, _ in pe.named_parameters()) == ["proj.bias", "proj.weight"]
  x = torch.randn(2, 3, 4, 4)
  with torch.no_grad():
    got = pe(x).numpy()
  xn, w, b = x.numpy(), pe.proj.weight.detach().numpy(), pe.proj.bias.detach().numpy()
  # (B, C, 2, 2, 2, 2) -> tokens in row-major patch order, each (C, p, p) flattened
  patches = xn.reshape(2, 3, 2, 2, 2, 2).transpose(0, 2, 4, 1, 3, 5).reshape(2, 4, 12)
  np.testing.assert_allclose(got, patches @ w.reshape(5, 12).T + b, atol=1e-5)
  mlp = Mlp(in_features=5, hidden_features=7, act_layer=lambda: torch.nn.GELU("tanh"))
  assert sorted(k for k, _ in mlp.named_parameters()) == [
      "fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]
  t = torch.randn(3, 5)
  with torch.no_grad():
    ref = torch.nn.functional.linear(torch.nn.functional.gelu(
        torch.nn.functional.linear(t, mlp.fc1.weight, mlp.fc1.bias), approximate="tanh"),
        mlp.fc2.weight, mlp.fc2.bias)
    np.testing.assert_allclose(mlp(t).numpy(), ref.numpy(), atol=1e-6)
