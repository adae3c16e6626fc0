#!/usr/bin/env bash
# Run a gae_jax config on every host of a Cloud TPU VM pod slice.
#   launch/tpu_vm.sh NAME ZONE CONFIG WORKDIR [extra gae_jax.main flags...]
#   e.g. ACCELERATOR_TYPE=v5p-64 launch/tpu_vm.sh gae-pod us-east5-a configs/gae_l32.py \
#          gs://bucket/runs/gae_l32 --config.teacher.init_from=gs://bucket/runs/teacher_l32
# Steps (each on every worker, --worker=all):
#   1. create the TPU VM NAME unless it exists (needs ACCELERATOR_TYPE; RUNTIME_VERSION,
#      default v2-alpha-tpuv5; SPOT=1 for a spot slice), else reuse it;
#   2. copy this checkout (tracked + untracked, not ignored files: `git ls-files`) to
#      ~/gae_jax on every worker;
#   3. install it (`pip install -e ~/gae_jax "jax[tpu]"`; SKIP_INSTALL=1 skips);
#   4. start `python3 -m gae_jax.main --config=CONFIG --workdir=WORKDIR --distributed ...`
#      detached on every worker, logging to ~/gae_jax_run.log, with LIBTPU_INIT_ARGS
#      (default: gae_jax.benchmark.peaks.LIBTPU_INIT_ARGS_TPU, the project's recommended
#      scheduler / async-collective flags);
#   5. tail worker 0's log (Ctrl-C stops the tail, not the run; TAIL=0 skips it).
# WORKDIR must be one place every host sees (gs://..., or a shared mount). Preemption /
# maintenance: JAX's preemption service notifies every process, the loop saves at the same
# step on all of them and exits 0; run this script again to resume from the checkpoint.
# DRY_RUN=1 prints the gcloud commands instead of running them.
set -euo pipefail
if [[ $# -lt 4 ]]; then
  echo "usage: [ACCELERATOR_TYPE=v5p-64] $0 NAME ZONE CONFIG WORKDIR [gae_jax.main flags...]" >&2
  exit 2
fi
name=$1 zone=$2 config=$3 workdir=$4
shift 4
repo=$(cd "$(dirname "$0")/.." && pwd)
log='~/gae_jax_run.log'

run() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}
ssh_all() {
  run gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command "$1"
}

# 1. create or reuse
if [[ "${DRY_RUN:-0}" != 1 ]] && gcloud compute tpus tpu-vm describe "$name" --zone "$zone" \
    >/dev/null 2>&1; then
  echo "tpu_vm: reusing TPU VM $name in $zone"
else
  if [[ -z "${ACCELERATOR_TYPE:-}" ]]; then
    echo "error: TPU VM $name does not exist in $zone; set ACCELERATOR_TYPE (e.g. v5p-64) to create it" >&2
    exit 2
  fi
  spot=()
  [[ "${SPOT:-0}" == 1 ]] && spot=(--spot)
  echo "tpu_vm: creating TPU VM $name ($ACCELERATOR_TYPE) in $zone"
  run gcloud compute tpus tpu-vm create "$name" --zone "$zone" \
    --accelerator-type "$ACCELERATOR_TYPE" --version "${RUNTIME_VERSION:-v2-alpha-tpuv5}" \
    "${spot[@]}"
fi

# 2. copy the checkout
tmp=$(mktemp -d -t gae_jax_src.XXXXXX)
tarball=$tmp/gae_jax_src.tar.gz
(cd "$repo" && git ls-files -z --cached --others --exclude-standard \
   | xargs -0 tar -czf "$tarball" --ignore-failed-read)
run gcloud compute tpus tpu-vm scp "$tarball" "$name:~/gae_jax_src.tar.gz" --zone "$zone" \
  --worker=all
rm -rf "$tmp"
ssh_all "rm -rf ~/gae_jax && mkdir -p ~/gae_jax && tar -xzf ~/gae_jax_src.tar.gz -C ~/gae_jax"

# 3. install
if [[ "${SKIP_INSTALL:-0}" != 1 ]]; then
  ssh_all "python3 -m pip install -q -e ~/gae_jax 'jax[tpu]'"
fi

# 4. run detached on every worker
args=$(printf '%q ' --config="$config" --workdir="$workdir" --distributed "$@")
if [[ -n "${LIBTPU_INIT_ARGS:-}" ]]; then
  libtpu=$(printf '%q' "$LIBTPU_INIT_ARGS")
else
  libtpu="\"\$(python3 -c 'from gae_jax.benchmark import peaks; print(peaks.LIBTPU_INIT_ARGS_TPU)')\""
fi
ssh_all "cd ~/gae_jax && export LIBTPU_INIT_ARGS=$libtpu && \
  nohup python3 -m gae_jax.main $args > $log 2>&1 < /dev/null & echo started on \$(hostname)"

# 5. tail worker 0
if [[ "${TAIL:-1}" == 1 ]]; then
  echo "tpu_vm: following worker 0's log (Ctrl-C stops following; the run continues)."
  echo "  other workers: gcloud compute tpus tpu-vm ssh $name --zone $zone --worker=N --command 'tail -f $log'"
  run gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=0 \
    --command "tail -n +1 -F $log"
fi
