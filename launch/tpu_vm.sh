#!/usr/bin/env bash
# Run a gae_jax config on every host of a TPU VM pod slice.
#   launch/tpu_vm.sh NAME ZONE configs/gae_l32.py gs://bucket/runs/gae_l32 [extra flags...]
# Assumes the repo is cloned at ~/gae_jax on each host (first run: setup installs it).
set -euo pipefail
name=$1 zone=$2 config=$3 workdir=$4; shift 4
cmd="cd ~/gae_jax && python3 -m pip install -q -e . 'jax[tpu]' && \
  python3 -m gae_jax.main --config=${config} --workdir=${workdir} --distributed $*"
gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command "$cmd"
