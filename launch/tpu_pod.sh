#!/usr/bin/env bash
# Run a paxgpt gin experiment on every worker of a Cloud TPU VM pod slice.
#
#   launch/tpu_pod.sh --name NAME --zone ZONE [--project PROJECT]
#       [--create --accelerator_type v5p-256 [--version RUNTIME]]
#       [--no_install] [--command train] [--dry-run]
#       --gin_file FILE [--gin_file FILE ...] [-- EXTRA PAXGPT FLAGS]
#
# e.g. launch/tpu_pod.sh --name gpt3 --zone us-east5-a --create \
#        --accelerator_type v5p-256 --gin_file gin/models/gpt3_175b.gin \
#        --gin_file gin/runs/pretrain.gin -- --gin.MODEL_DIR="'gs://bucket/gpt3'"
#
# Steps: (1, with --create) create the TPU VM slice; (2, unless --no_install)
# copy this checkout to every worker and install paxgpt[tpu] there with
# launch/setup_env.sh; (3) start `paxgpt COMMAND` on all workers at once with
# `gcloud compute tpus tpu-vm ssh --worker=all`. The workers find each other
# through the TPU metadata (PAXGPT_DISTRIBUTED=auto -> jax.distributed).
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

die() { echo "tpu_pod.sh: $*" >&2; exit 2; }
usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --name) name="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --create) create=1; shift ;;
    --accelerator_type) accelerator_type="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --no_install) install=0; shift ;;
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

if [ "$create" -eq 1 ]; then
  run gcloud compute tpus tpu-vm create "$name" "${where[@]}" \
    --accelerator-type="$accelerator_type" --version="$version"
fi

if [ "$install" -eq 1 ]; then
  archive="${TMPDIR:-/tmp}/paxgpt-$name.tar.gz"
  run tar -czf "$archive" -C "$root" --exclude=.venv --exclude=.git --exclude='__pycache__' .
  run gcloud compute tpus tpu-vm scp "$archive" "$name:paxgpt.tar.gz" "${where[@]}" --worker=all
  run gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker=all \
    --command="mkdir -p $remote_dir && tar -xzf paxgpt.tar.gz -C $remote_dir && cd $remote_dir && EXTRAS=tpu bash launch/setup_env.sh"
fi

paxgpt_args=("$command")
for f in "${gin_files[@]}"; do
  paxgpt_args+=("--gin_file=$f")
done
paxgpt_args+=("${extra[@]}")
quoted="$(printf ' %q' "${paxgpt_args[@]}")"
run gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker=all \
  --command="cd $remote_dir && PAXGPT_DISTRIBUTED=auto TF_CPP_MIN_LOG_LEVEL=2 .venv/bin/python -m paxgpt.cli$quoted"
