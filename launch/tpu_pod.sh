#!/usr/bin/env bash
# Starts one training job on every worker of a Cloud TPU VM pod slice.
set -euo pipefail

usage() {
  cat <<USAGE
usage: launch/tpu_pod.sh -n TPU_NAME -z ZONE -c CONFIG -w WORKDIR [-p PROJECT] [-d REMOTE_DIR]
                         [-s] [-u] [-- --config.FIELD=VALUE ...]

Runs python -m qsft_jax.main on all workers of a TPU VM slice at once (gcloud compute tpus tpu-vm ssh
--worker=all), with QSFT_DISTRIBUTED=1: on Cloud TPU, jax.distributed.initialize() finds the
coordinator, the process count and each worker's id by itself.

  -n TPU_NAME    the TPU VM (gcloud compute tpus tpu-vm create ...)
  -z ZONE        its zone, e.g. us-central2-b
  -c CONFIG      config file, relative to the repository root, e.g. configs/maze_cpu.py
  -w WORKDIR     a directory every worker sees at the same path (Filestore/NFS, or a GCS bucket
                 mounted with gcsfuse, e.g. /gcs/my-bucket/run1). The trainer writes its files with the
                 local file API, so gs:// URLs are refused. Re-running resumes from it.
  -p PROJECT     GCP project [gcloud's default]
  -d REMOTE_DIR  checkout of this repository on the workers [~/qsft_jax]
  -s             copy this checkout to REMOTE_DIR on every worker first (gcloud ... scp)
  -u             run scripts/setup.sh --tpu on every worker first (the pinned runtime requirements and
                 jax[tpu]); needed once per new TPU VM
  -h             this help
  after --        more arguments for qsft_jax.main, e.g. --config.bc.steps=1000

Environment: DRY_RUN=1 prints the gcloud commands instead of running them; EXTRA_ENV="A=1 B=2" adds
variables to every worker's environment; PYTHON is the workers' interpreter [python3], Python 3.11 or
newer, e.g. PYTHON='~/qsft-venv/bin/python' (README.md: Installing).
Example:
  launch/tpu_pod.sh -n my-v5e-16 -z us-west4-a -s -u -c configs/maze_cpu.py -w /gcs/my-bucket/maze \\
      -- --config.bc.batch_size=256
USAGE
}

name="" zone="" config="" workdir="" project="" remote_dir="~/qsft_jax" copy=0 setup=0
while getopts "n:z:c:w:p:d:suh" opt; do
  case "$opt" in
    n) name="$OPTARG" ;;
    z) zone="$OPTARG" ;;
    c) config="$OPTARG" ;;
    w) workdir="$OPTARG" ;;
    p) project="$OPTARG" ;;
    d) remote_dir="$OPTARG" ;;
    s) copy=1 ;;
    u) setup=1 ;;
    h) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[[ "${1:-}" == "--" ]] && shift
if [[ -z "$name" || -z "$zone" || -z "$config" || -z "$workdir" ]]; then
  echo "launch/tpu_pod.sh: -n TPU_NAME, -z ZONE, -c CONFIG and -w WORKDIR are required" >&2
  usage >&2
  exit 2
fi
if [[ "$workdir" == gs://* ]]; then
  echo "launch/tpu_pod.sh: $workdir: gs:// workdirs are not supported; mount the bucket with gcsfuse at the same path on every worker and pass that path" >&2
  exit 2
fi

run() {
  if [[ -n "${DRY_RUN:-}" ]]; then
    printf '%s\n' "$*"
  else
    "$@"
  fi
}

gcloud_args=(--zone "$zone")
[[ -n "$project" ]] && gcloud_args+=(--project "$project")

if [[ "$copy" == 1 ]]; then
  repo="$(cd "$(dirname "$0")/.." && pwd)"
  archive="${TMPDIR:-/tmp}/qsft_jax.$$.tar.gz"
  run tar -C "$repo" --exclude=.git --exclude='*.pyc' --exclude=__pycache__ -czf "$archive" .
  run gcloud compute tpus tpu-vm scp "$archive" "$name:qsft_jax.tar.gz" "${gcloud_args[@]}" --worker=all
  run gcloud compute tpus tpu-vm ssh "$name" "${gcloud_args[@]}" --worker=all \
    --command "mkdir -p $remote_dir && tar -C $remote_dir -xzf ~/qsft_jax.tar.gz"
fi

quoted_args=""
for a in "$@"; do quoted_args+=" $(printf '%q' "$a")"; done
worker_env="QSFT_DISTRIBUTED=1 TF_CPP_MIN_LOG_LEVEL=2 ${EXTRA_ENV:-}"
setup_cmd=""
python="${PYTHON:-python3}"
[[ "$setup" == 1 ]] && setup_cmd="PYTHON=$python bash scripts/setup.sh --tpu && "
# One process per worker; every worker's output is prefixed by gcloud with its worker number.
remote="cd $remote_dir && ${setup_cmd}env $worker_env $python -m qsft_jax.main --config=$(printf '%q' "$config") --workdir=$(printf '%q' "$workdir")$quoted_args"
run gcloud compute tpus tpu-vm ssh "$name" "${gcloud_args[@]}" --worker=all --command "$remote"
