"""launch/: the TPU VM pod script's gcloud sequence (DRY_RUN), the SLURM script's srun line
and XLA flags (a stand-in srun on PATH), local_multiprocess.sh's argument checks. The
N-process CPU run itself: test_local_multiprocess_two_processes (slow)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from gae_jax.benchmark import peaks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sh(args, env=None, timeout=120):
  return subprocess.run(args, cwd=ROOT, env={**os.environ, **(env or {})},
                        capture_output=True, text=True, timeout=timeout)


def test_tpu_vm_creates_copies_installs_runs_everywhere_and_tails():
  r = _sh(["bash", "launch/tpu_vm.sh", "pod", "us-east5-a",
           "configs/gae_l32.py:source=folder,root=/d", "gs://b/run",
           "--config.teacher.init_from=gs://b/t"],
          env={"DRY_RUN": "1", "ACCELERATOR_TYPE": "v5p-64", "SPOT": "1"})
  assert r.returncode == 0, r.stderr
  cmds = [l for l in r.stdout.splitlines() if l.startswith("gcloud ")]
  verbs = [c.split()[4] for c in cmds]       # gcloud compute tpus tpu-vm <verb> ...
  assert verbs == ["create", "scp", "ssh", "ssh", "ssh", "ssh"], verbs
  assert cmds[0].split()[5] == "pod" and cmds[1].split()[5].endswith("gae_jax_src.tar.gz")
  assert "--accelerator-type v5p-64" in cmds[0] and "--spot" in cmds[0]
  assert all("--worker=all" in c for c in cmds[1:5]) and "--worker=0" in cmds[5]
  run = cmds[4].replace("\\", "")
  assert "python3 -m gae_jax.main --config=configs/gae_l32.py:source=folder,root=/d" in run
  assert "--workdir=gs://b/run --distributed --config.teacher.init_from=gs://b/t" in run
  assert "peaks.LIBTPU_INIT_ARGS_TPU" in run and "nohup" in run
  assert "pip install" in cmds[3].replace("\\", "") and "tail -n +1 -F" in cmds[5].replace(
      "\\", "")
  r = _sh(["bash", "launch/tpu_vm.sh", "pod", "zone", "c", "w"], env={"DRY_RUN": "1",
                                                                     "ACCELERATOR_TYPE": ""})
  assert r.returncode == 2 and "set ACCELERATOR_TYPE" in r.stderr


def test_slurm_script_runs_one_srun_with_distributed_and_peak_xla_flags(tmp_path):
  fake = tmp_path / "bin"
  fake.mkdir()
  (fake / "srun").write_text('#!/usr/bin/env bash\n'
                             'python3 -c "import json, os, sys; print(json.dumps('
                             '{\'argv\': sys.argv[1:], \'xla\': os.environ[\'XLA_FLAGS\']}))" '
                             '"$@"\n')
  (fake / "srun").chmod(0o755)
  full_env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  full_env.update(PATH=f"{fake}:{os.environ['PATH']}", PYTHON=sys.executable)
  r = subprocess.run(["bash", "launch/slurm_gpu.sbatch", "configs/gae_l32.py", "/shared/run",
                      "--config.seed=3"], cwd=ROOT, env=full_env, capture_output=True,
                     text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  got = json.loads(r.stdout.strip().splitlines()[-1])
  assert got["xla"] == peaks.XLA_FLAGS_GPU
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" in got["xla"]
  assert got["argv"][:2] == ["--kill-on-bad-exit=1", "--cpu-bind=none"]
  assert got["argv"][3:] == ["-m", "gae_jax.main", "--config=configs/gae_l32.py",
                             "--workdir=/shared/run", "--distributed", "--config.seed=3"]
  text = open(os.path.join(ROOT, "launch/slurm_gpu.sbatch")).read()
  assert "#SBATCH --signal=TERM@120" in text and "#SBATCH --gres=gpu:8" in text


def test_local_multiprocess_rejects_bad_arguments():
  r = _sh(["bash", "launch/local_multiprocess.sh", "0", "c", "/tmp/w"])
  assert r.returncode == 2 and "N=0 is not a positive integer" in r.stderr
  r = _sh(["bash", "launch/local_multiprocess.sh", "2"])
  assert r.returncode == 2 and "usage:" in r.stderr


@pytest.mark.slow
def test_local_multiprocess_two_processes(tmp_path):
  """2 CPU processes x 2 fake devices train the tiny DiT 3 steps on a synthetic cache."""
  from gae_jax.data import latents as latents_lib  # pylint: disable=g-import-not-at-top
  cache = str(tmp_path / "latents")
  os.makedirs(cache)
  rng = np.random.default_rng(0)
  recs = [latents_lib.encode_record(rng.normal(size=(4, 4, 4)).astype(np.float32),
                                    rng.normal(size=(4, 4, 4)).astype(np.float32), i % 10, i)
          for i in range(32)]
  name = latents_lib.shard_name(0, 0)
  latents_lib.write_shard(os.path.join(cache, name), recs)
  np.savez(os.path.join(cache, latents_lib.STATS), mean=np.zeros(4, np.float32),
           std=np.ones(4, np.float32), num_samples=np.int64(32))
  latents_lib.write_json(os.path.join(cache, latents_lib.MANIFEST), {
      "format": latents_lib.FORMAT, "latent_shape": [4, 4, 4], "num_classes": 10,
      "shards": [{"file": name, "num_records": 32}], "num_records": 32,
      "stats": latents_lib.STATS, "stats_num_samples": 32, "stats_seed": 0})
  work = tmp_path / "run"
  r = _sh(["bash", "launch/local_multiprocess.sh", "2",
           f"configs/dit_xl_gae32_80ep.py:runlocal,cache={cache}", str(work),
           "--config.model.latent_dim=4", "--config.model.latent_size=4",
           "--config.batch_size=8", "--config.total_steps=3", "--config.ckpt_every=3",
           "--config.image_every=0", "--config.data.read_threads=1"],
          env={"DEVICES_PER_PROCESS": "2", "PYTHON": sys.executable}, timeout=600)
  assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
  assert "2 processes, 4 devices" in r.stdout
  assert os.path.isdir(work / "checkpoints" / "3")
  assert "4 cpu devices on 2 processes" in open(work / "logs" / "process_0.log").read()
