#!/usr/bin/env bash
# N jax.distributed CPU processes on this machine: a multi-host run in miniature.
#   launch/local_multiprocess.sh N CONFIG WORKDIR [extra gae_jax.main flags...]
#   e.g. launch/local_multiprocess.sh 2 configs/dit_xl_gae32_80ep.py:runlocal,cache=/tmp/lat /tmp/dit2
# Process i runs `python -m gae_jax.main --config=CONFIG --workdir=WORKDIR --distributed
# --coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=i` with
# XLA_FLAGS=--xla_force_host_platform_device_count=K (K fake CPU devices per process, so
# the mesh has N*K devices) and gloo cross-process collectives.
# Environment: DEVICES_PER_PROCESS (K, default 1), PORT (default: a free one), LOG_DIR
# (default WORKDIR/logs, or a temporary directory for a remote WORKDIR), PYTHON (python3).
# Logs: LOG_DIR/process_<i>.log; process 0's is printed as it runs. Exit status: the first
# failing process's (the others are then stopped), else 0. SIGTERM/SIGINT to this script is
# forwarded to every process (JAX's preemption service: a checkpoint, then exit 0).
set -euo pipefail
if [[ $# -lt 3 ]]; then
  echo "usage: $0 N CONFIG WORKDIR [gae_jax.main flags...]" >&2
  exit 2
fi
n=$1 config=$2 workdir=$3
shift 3
if ! [[ "$n" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: N=$n is not a positive integer" >&2
  exit 2
fi
k=${DEVICES_PER_PROCESS:-1}
python=${PYTHON:-python3}
port=${PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
if [[ -n "${LOG_DIR:-}" ]]; then
  logs=$LOG_DIR
elif [[ "$workdir" == *://* ]]; then
  logs=$(mktemp -d -t gae_jax_logs.XXXXXX)
else
  logs=$workdir/logs
fi
mkdir -p "$logs"
cd "$(dirname "$0")/.."   # the checkout: configs/ paths resolve from here

pids=()
stop_all() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
}
trap 'stop_all' TERM INT

echo "local_multiprocess: $n processes x $k CPU devices, coordinator 127.0.0.1:$port, logs in $logs"
for ((i = 0; i < n; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=$k ${XLA_FLAGS_EXTRA:-}" \
  JAX_PLATFORMS=cpu JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo \
    "$python" -m gae_jax.main --config="$config" --workdir="$workdir" --distributed \
      --coordinator_address="127.0.0.1:$port" --num_processes="$n" --process_id="$i" "$@" \
      >"$logs/process_$i.log" 2>&1 &
  pids+=($!)
done
tail -n +1 -F "$logs/process_0.log" 2>/dev/null &
tailer=$!

status=0
declare -A done_=()
while ((${#done_[@]} < n)); do
  for ((i = 0; i < n; i++)); do
    p=${pids[$i]}
    [[ -n "${done_[$i]:-}" ]] && continue
    kill -0 "$p" 2>/dev/null && continue
    set +e
    wait "$p"
    rc=$?
    set -e
    done_[$i]=$rc
    if ((rc != 0)) && ((status == 0)); then
      status=$rc
      echo "local_multiprocess: process $i exited with status $rc; stopping the others" >&2
      stop_all
    fi
  done
  sleep 0.5
done
kill "$tailer" 2>/dev/null || true
wait "$tailer" 2>/dev/null || true
for ((i = 1; i < n; i++)); do
  if grep -q "Traceback\|^error:" "$logs/process_$i.log"; then
    echo "--- process $i (tail) ---" >&2
    tail -n 20 "$logs/process_$i.log" >&2
  fi
done
exit "$status"
