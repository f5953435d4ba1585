#!/usr/bin/env bash
# A multi-host run on one machine: N paxgpt processes, each with M fake CPU
# devices, joined by jax.distributed on a loopback coordinator. This is what
# the multi-host tests run; it is also a way to try a multi-host setup without
# a cluster.
#
#   launch/cpu_multiprocess.sh [--processes N] [--devices M] [--port P]
#       [--timeout SECONDS] [--grace SECONDS] [--log_dir DIR] [--dry-run]
#       -- COMMAND [ARGS...]
#
# e.g. launch/cpu_multiprocess.sh --processes 2 --devices 2 -- train \
#        --gin_file=gin/experiments/demo.gin --gin.MODEL_DIR="'/tmp/run'"
#
# Every process runs `python -m paxgpt.cli COMMAND ARGS
# --coordinator_address=127.0.0.1:P --num_processes=N --process_id=I`; its
# output goes to LOG_DIR/process_I.log and process 0's is also shown here.
# The whole run is bounded by --timeout; when one process fails, the others
# get SIGTERM and, --grace seconds later, SIGKILL. Exit code: the first
# failing process's code (124 for a timeout), else 0. PYTHON overrides the
# interpreter.
set -euo pipefail

processes=2
devices=4
port=""
timeout_s=600
grace_s=15
log_dir=""
dry_run=0
python="${PYTHON:-}"

usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --processes) processes="$2"; shift 2 ;;
    --devices) devices="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --timeout) timeout_s="$2"; shift 2 ;;
    --grace) grace_s="$2"; shift 2 ;;
    --log_dir) log_dir="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "cpu_multiprocess.sh: unknown option $1 (put the paxgpt command after --)" >&2
       exit 2 ;;
  esac
done
if [ $# -eq 0 ]; then
  echo "cpu_multiprocess.sh: missing the paxgpt command after --" >&2
  exit 2
fi
for value in "$processes" "$devices" "$timeout_s" "$grace_s"; do
  case "$value" in
    ''|*[!0-9]*|0) echo "cpu_multiprocess.sh: expected a positive integer, got '$value'" >&2
                  exit 2 ;;
  esac
done

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "$python" ]; then
  python="$root/.venv/bin/python"
  [ -x "$python" ] || python="python3"
fi
if [ -z "$port" ]; then  # a free loopback port
  port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi
log_dir="${log_dir:-$(mktemp -d "${TMPDIR:-/tmp}/paxgpt-multiprocess.XXXXXX")}"
mkdir -p "$log_dir"

command_for() {
  printf '%s' "timeout --kill-after=10 $timeout_s $python -m paxgpt.cli $* --coordinator_address=127.0.0.1:$port --num_processes=$processes --process_id="
}

if [ "$dry_run" -eq 1 ]; then
  for ((i = 0; i < processes; i++)); do
    echo "XLA_FLAGS=--xla_force_host_platform_device_count=$devices JAX_PLATFORMS=cpu" \
      "$(command_for "$@")$i > $log_dir/process_$i.log"
  done
  exit 0
fi

export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
# Replace any device count inherited from the caller (pytest sets 8).
xla_flags="$(printf '%s' "${XLA_FLAGS:-}" | sed 's/--xla_force_host_platform_device_count=[0-9]*//g')"
export XLA_FLAGS="$xla_flags --xla_force_host_platform_device_count=$devices"
export JAX_NUM_CPU_DEVICES="$devices"
export JAX_PLATFORMS=cpu
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
export PAXGPT_DISTRIBUTED_TIMEOUT_S="${PAXGPT_DISTRIBUTED_TIMEOUT_S:-$timeout_s}"

# Each process runs in its own process group (setsid), so stopping it stops
# `timeout` and python together: SIGTERM first (the trainer saves and exits),
# SIGKILL for whatever is left after the grace period.
pids=()
signal_all() {
  for pid in "${pids[@]}"; do
    kill "-$1" -- "-$pid" 2>/dev/null || true
  done
}
killer=""
stop_all() {
  signal_all TERM
  (sleep "$grace_s"; signal_all KILL) > /dev/null 2>&1 &
  killer=$!
  disown "$killer"  # not one of the processes `wait -n` waits for
}
trap 'signal_all KILL; exit 130' INT TERM

echo "== $processes processes x $devices CPU devices, coordinator 127.0.0.1:$port," \
     "logs in $log_dir (limit ${timeout_s}s)"
for ((i = 0; i < processes; i++)); do
  setsid timeout --kill-after=10 "$timeout_s" "$python" -m paxgpt.cli "$@" \
    --coordinator_address="127.0.0.1:$port" --num_processes="$processes" --process_id="$i" \
    > "$log_dir/process_$i.log" 2>&1 &
  pids+=("$!")
done

# Wait for the processes in the order they end; the first failure stops the rest.
status=0
remaining=${#pids[@]}
while [ "$remaining" -gt 0 ]; do
  code=0
  wait -n || code=$?
  remaining=$((remaining - 1))
  if [ "$code" -ne 0 ] && [ "$status" -eq 0 ]; then
    status=$code
    echo "== a process exited with code $code; stopping the others" >&2
    stop_all
  fi
done

if [ -n "$killer" ]; then kill "$killer" 2>/dev/null || true; fi
cat "$log_dir/process_0.log"
for ((i = 1; i < processes; i++)); do
  if [ "$status" -ne 0 ]; then
    echo "== process $i (last lines)" >&2
    tail -n 20 "$log_dir/process_$i.log" >&2
  fi
done
exit "$status"
