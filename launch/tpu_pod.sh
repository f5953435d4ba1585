#!/usr/bin/env bash
# Run a paxgpt gin experiment on every worker of a Cloud TPU VM pod slice, or of
# several slices joined over the data-center network (multislice).
#
#   launch/tpu_pod.sh --name NAME --zone ZONE [--project PROJECT]
#       [--num_slices N] [--create --accelerator_type v5p-256 [--version RUNTIME]]
#       [--coordinator IP] [--no_install] [--command train] [--dry-run]
#       --gin_file FILE [--gin_file FILE ...] [-- EXTRA PAXGPT FLAGS]
#
# e.g. launch/tpu_pod.sh --name gpt3 --zone us-east5-a --create \
#        --accelerator_type v5p-256 --gin_file gin/models/gpt3_175b.gin \
#        --gin_file gin/runs/pretrain.gin -- --gin.MODEL_DIR="'gs://bucket/gpt3'"
#      launch/tpu_pod.sh --name gpt3 --zone us-east5-a --num_slices 4 --create \
#        --accelerator_type v5e-256 --gin_file gin/models/gpt3_175b.gin \
#        --gin_file gin/runs/pretrain.gin -- --mesh=fsdp:64,tensor:4 --dcn=data:4
#
# Steps: (1, with --create) create the TPU VM slice, or with --num_slices N a
# queued resource of N slices named NAME-0 ... NAME-(N-1); (2, unless
# --no_install) copy this checkout to every worker and install paxgpt[tpu]
# there with launch/setup_env.sh; (3) start `paxgpt COMMAND` on all workers of
# all slices at once (`gcloud compute tpus tpu-vm ssh --worker=all`, one per
# slice). The workers find each other through the TPU metadata
# (PAXGPT_DISTRIBUTED=auto -> jax.distributed); several slices also get the
# environment of the multislice runtime: MEGASCALE_COORDINATOR_ADDRESS (worker 0
# of NAME-0, from `tpu-vm describe` unless --coordinator), MEGASCALE_PORT,
# MEGASCALE_NUM_SLICES and MEGASCALE_SLICE_ID. paxgpt's mesh then puts data
# parallelism across the slices unless --dcn says otherwise.
# --dry-run prints the commands instead of running them.
set -euo pipefail

name=""
zone=""
project=""
create=0
accelerator_type=""
version="${TPU_RUNTIME_VERSION:-v2-alpha-tpuv5}"
install=1
command="train"
dry_run=0
gin_files=()
remote_dir="paxgpt"
num_slices=1
coordinator=""
megascale_port=8080

die() { echo "tpu_pod.sh: $*" >&2; exit 2; }
usage() { sed -n '2,29p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --name) name="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --create) create=1; shift ;;
    --accelerator_type) accelerator_type="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --no_install) install=0; shift ;;
    --num_slices) num_slices="$2"; shift 2 ;;
    --coordinator) coordinator="$2"; shift 2 ;;
    --command) command="$2"; shift 2 ;;
    --gin_file) gin_files+=("$2"); shift 2 ;;
    --gin_file=*) gin_files+=("${1#--gin_file=}"); shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option $1 (put extra paxgpt flags after --)" ;;
  esac
done
extra=("$@")

[ -n "$name" ] || die "--name is required (the TPU VM's name)"
[ -n "$zone" ] || die "--zone is required"
[ "${#gin_files[@]}" -gt 0 ] || die "at least one --gin_file is required"
if [ "$create" -eq 1 ] && [ -z "$accelerator_type" ]; then
  die "--create needs --accelerator_type (e.g. v5p-256)"
fi
case "$command" in
  train|eval|sample) ;;
  *) die "--command $command: expected train, eval or sample" ;;
esac
case "$num_slices" in
  ''|*[!0-9]*|0) die "--num_slices $num_slices: expected a positive integer" ;;
esac

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
for f in "${gin_files[@]}"; do
  [ -f "$f" ] || [ -f "$root/$f" ] || die "--gin_file $f: no such file"
done

where=(--zone="$zone")
[ -n "$project" ] && where+=(--project="$project")

# Print a command (shell-quoted, runnable as printed) or run it.
run() {
  if [ "$dry_run" -eq 1 ]; then
    printf '%q' "$1"
    shift
    printf ' %q' "$@"
    printf '\n'
  else
    "$@"
  fi
}

# The slices' TPU VM names: NAME alone, or NAME-0 ... NAME-(N-1) (a queued
# resource's --node-prefix naming).
slices=("$name")
if [ "$num_slices" -gt 1 ]; then
  slices=()
  for ((i = 0; i < num_slices; i++)); do slices+=("$name-$i"); done
fi

if [ "$create" -eq 1 ]; then
  if [ "$num_slices" -gt 1 ]; then
    run gcloud compute tpus queued-resources create "$name" "${where[@]}" \
      --accelerator-type="$accelerator_type" --runtime-version="$version" \
      --node-count="$num_slices" --node-prefix="$name"
  else
    run gcloud compute tpus tpu-vm create "$name" "${where[@]}" \
      --accelerator-type="$accelerator_type" --version="$version"
  fi
fi

if [ "$install" -eq 1 ]; then
  archive="${TMPDIR:-/tmp}/paxgpt-$name.tar.gz"
  run tar -czf "$archive" -C "$root" --exclude=.venv --exclude=.git --exclude='__pycache__' .
  for node in "${slices[@]}"; do
    run gcloud compute tpus tpu-vm scp "$archive" "$node:paxgpt.tar.gz" "${where[@]}" --worker=all
    run gcloud compute tpus tpu-vm ssh "$node" "${where[@]}" --worker=all \
      --command="mkdir -p $remote_dir && tar -xzf paxgpt.tar.gz -C $remote_dir && cd $remote_dir && EXTRAS=tpu bash launch/setup_env.sh"
  done
fi

paxgpt_args=("$command")
for f in "${gin_files[@]}"; do
  paxgpt_args+=("--gin_file=$f")
done
paxgpt_args+=("${extra[@]}")
quoted="$(printf ' %q' "${paxgpt_args[@]}")"
environment="PAXGPT_DISTRIBUTED=auto TF_CPP_MIN_LOG_LEVEL=2"

if [ "$num_slices" -eq 1 ]; then
  run gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker=all \
    --command="cd $remote_dir && $environment .venv/bin/python -m paxgpt.cli$quoted"
  exit 0
fi

# Several slices: the multislice runtime's coordinator is worker 0 of the first slice.
if [ -z "$coordinator" ]; then
  describe=(gcloud compute tpus tpu-vm describe "${slices[0]}" "${where[@]}"
            "--format=value(networkEndpoints[0].ipAddress)")
  if [ "$dry_run" -eq 1 ]; then
    printf '#'; printf ' %q' "${describe[@]}"; printf '\n'
    coordinator="WORKER0_IP"
  else
    coordinator="$("${describe[@]}")"
    [ -n "$coordinator" ] || die "could not read the internal IP of ${slices[0]} worker 0"
  fi
fi
pids=()
for ((i = 0; i < num_slices; i++)); do
  megascale="MEGASCALE_COORDINATOR_ADDRESS=$coordinator:$megascale_port MEGASCALE_PORT=$megascale_port MEGASCALE_NUM_SLICES=$num_slices MEGASCALE_SLICE_ID=$i"
  if [ "$dry_run" -eq 1 ]; then
    run gcloud compute tpus tpu-vm ssh "${slices[$i]}" "${where[@]}" --worker=all \
      --command="cd $remote_dir && $megascale $environment .venv/bin/python -m paxgpt.cli$quoted"
  else
    gcloud compute tpus tpu-vm ssh "${slices[$i]}" "${where[@]}" --worker=all \
      --command="cd $remote_dir && $megascale $environment .venv/bin/python -m paxgpt.cli$quoted" &
    pids+=("$!")
  fi
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit "$status"
