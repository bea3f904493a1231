#!/usr/bin/env bash
# Starts one training process per GPU host: inside a SLURM allocation (srun), or over ssh on a host list.
set -euo pipefail

usage() {
  cat <<USAGE
usage: launch/gpu_hosts.sh (-S | -H HOST1,HOST2,...) -c CONFIG -w WORKDIR [-d REMOTE_DIR] [-P PORT]
                           [-- --config.FIELD=VALUE ...]

Runs python -m qsft_jax.main once per host; each process drives all of its host's GPUs and the
processes meet through jax.distributed (QSFT_DISTRIBUTED=1, coordinator on the first host at PORT).

  -S             SLURM: run inside an allocation (sbatch / salloc with one task per node); srun starts
                 one process per node, process ids come from SLURM_PROCID, the coordinator is the first
                 node of SLURM_JOB_NODELIST
  -H HOSTS       plain ssh: comma-separated hosts, the first is the coordinator and process 0. Each
                 host needs password-less ssh, this repository at REMOTE_DIR and the environment
                 (scripts/setup.sh --cuda)
  -c CONFIG      config file, relative to the repository root
  -w WORKDIR     a directory every host sees at the same path (NFS, Lustre, ...); orbax writes each
                 host's shards there. Re-running resumes from it
  -d REMOTE_DIR  the repository's path on the hosts [this checkout's path]
  -P PORT        coordinator port [12355]
  -h             this help
  after --        more arguments for qsft_jax.main, e.g. --config.bc.batch_size=64

Environment: PYTHON [python3] on the hosts; EXTRA_ENV="A=1 B=2" adds variables to every process;
DRY_RUN=1 prints the commands instead of running them.
Examples:
  sbatch --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 --wrap "launch/gpu_hosts.sh -S -c configs/maze_cpu.py -w /shared/runs/maze"
  launch/gpu_hosts.sh -H gpu-a,gpu-b -c configs/maze_cpu.py -w /shared/runs/maze -- --config.mesh.shape.fsdp=8
USAGE
}

slurm=0 hosts="" config="" workdir="" port=12355
remote_dir="$(cd "$(dirname "$0")/.." && pwd)"
while getopts "SH:c:w:d:P:h" opt; do
  case "$opt" in
    S) slurm=1 ;;
    H) hosts="$OPTARG" ;;
    c) config="$OPTARG" ;;
    w) workdir="$OPTARG" ;;
    d) remote_dir="$OPTARG" ;;
    P) port="$OPTARG" ;;
    h) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[[ "${1:-}" == "--" ]] && shift
if [[ -z "$config" || -z "$workdir" ]] || [[ "$slurm" == 0 && -z "$hosts" ]] || [[ "$slurm" == 1 && -n "$hosts" ]]; then
  echo "launch/gpu_hosts.sh: -c CONFIG, -w WORKDIR and exactly one of -S or -H HOSTS are required" >&2
  usage >&2
  exit 2
fi

PYTHON="${PYTHON:-python3}"
extra=""
for a in "$@"; do extra+=" $(printf '%q' "$a")"; done
# $1: coordinator host, $2: process count, $3: process id (may be a shell expression)
trainer_command() {
  echo "cd $(printf '%q' "$remote_dir") && env QSFT_DISTRIBUTED=1 ${EXTRA_ENV:-} $PYTHON -m qsft_jax.main" \
       "--config=$(printf '%q' "$config") --workdir=$(printf '%q' "$workdir")" \
       "--config.distributed.coordinator_address=$1:$port --config.distributed.num_processes=$2" \
       "--config.distributed.process_id=$3$extra"
}

if [[ "$slurm" == 1 ]]; then
  if [[ -z "${SLURM_JOB_NODELIST:-}" ]]; then
    echo "launch/gpu_hosts.sh: -S needs a SLURM allocation (SLURM_JOB_NODELIST is not set)" >&2
    exit 2
  fi
  coordinator="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
  nodes="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
  # SLURM_PROCID is expanded by each task's own shell, not here.
  cmd="$(trainer_command "$coordinator" "$nodes" '$SLURM_PROCID')"
  if [[ -n "${DRY_RUN:-}" ]]; then
    echo "srun --nodes=$nodes --ntasks=$nodes --ntasks-per-node=1 bash -c '$cmd'"
    exit 0
  fi
  exec srun --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c "$cmd"
fi

IFS=, read -r -a host_list <<< "$hosts"
count=${#host_list[@]}
coordinator="${host_list[0]}"
pids=()
for ((i = 0; i < count; i++)); do
  host="${host_list[$i]}"
  cmd="$(trainer_command "$coordinator" "$count" "$i")"
  if [[ -n "${DRY_RUN:-}" ]]; then
    echo "ssh $host $cmd"
    continue
  fi
  # -tt: ending this script (Ctrl-C) ends the remote processes too; output is prefixed by host.
  (ssh -tt -o BatchMode=yes "$host" "$cmd" 2>&1 | sed -u "s/^/[$host] /") &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=1
done
exit "$status"
