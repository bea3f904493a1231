#!/usr/bin/env bash
# Runs the trainer on this machine: one process, or N local processes under jax.distributed.
set -euo pipefail

usage() {
  cat <<USAGE
usage: launch/local.sh -c CONFIG -w WORKDIR [-p PROCESSES] [-d CPU_DEVICES] [-P PORT] [-- --config.FIELD=VALUE ...]

Runs python -m qsft_jax.main on this machine (from the repository root).

  -c CONFIG       config file, e.g. configs/tiny.py
  -w WORKDIR      work directory (checkpoints, logs); running again resumes from it
  -p PROCESSES    number of local processes [1]. With more than one, every process runs on the CPU
                  (JAX_PLATFORMS=cpu, gloo collectives) and they meet through jax.distributed at
                  127.0.0.1:PORT: the way to try a multi-host config on a laptop
  -d CPU_DEVICES  simulated CPU devices per process (XLA_FLAGS=--xla_force_host_platform_device_count);
                  implies JAX_PLATFORMS=cpu [unset: the machine's own devices]
  -P PORT         coordinator port for -p > 1 [a free port]
  -h              this help
  after --         more arguments for qsft_jax.main, e.g. --config.bc.steps=10

Environment: PYTHON [python3]; DRY_RUN=1 prints the commands instead of running them.
Examples:
  launch/local.sh -c configs/tiny.py -w /tmp/qsft_tiny
  launch/local.sh -c configs/tiny.py -w /tmp/qsft_2proc -p 2 -d 4 -- --config.data_shards=2 --config.eval.enabled=False
USAGE
}

config="" workdir="" processes=1 devices="" port=""
while getopts "c:w:p:d:P:h" opt; do
  case "$opt" in
    c) config="$OPTARG" ;;
    w) workdir="$OPTARG" ;;
    p) processes="$OPTARG" ;;
    d) devices="$OPTARG" ;;
    P) port="$OPTARG" ;;
    h) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[[ "${1:-}" == "--" ]] && shift
if [[ -z "$config" || -z "$workdir" ]]; then
  echo "launch/local.sh: -c CONFIG and -w WORKDIR are required" >&2
  usage >&2
  exit 2
fi
if ! [[ "$processes" =~ ^[1-9][0-9]*$ ]]; then
  echo "launch/local.sh: -p wants a positive integer, got '$processes'" >&2
  exit 2
fi

PYTHON="${PYTHON:-python3}"
cd "$(dirname "$0")/.."
env_vars=()
if [[ -n "$devices" ]]; then
  env_vars+=(JAX_PLATFORMS=cpu "XLA_FLAGS=--xla_force_host_platform_device_count=$devices")
fi
command=("$PYTHON" -m qsft_jax.main "--config=$config" "--workdir=$workdir" "$@")

if [[ "$processes" == 1 ]]; then
  if [[ -n "${DRY_RUN:-}" ]]; then
    echo "${env_vars[*]} ${command[*]}"
    exit 0
  fi
  exec env "${env_vars[@]}" "${command[@]}"
fi

if [[ -z "$port" ]]; then
  port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' 2>/dev/null || echo 12355)
fi
[[ -n "$devices" ]] || env_vars+=(JAX_PLATFORMS=cpu)
env_vars+=(QSFT_DISTRIBUTED=1 QSFT_CPU_COLLECTIVES=gloo)
pids=()
for ((i = 0; i < processes; i++)); do
  args=("${command[@]}" "--config.distributed.coordinator_address=127.0.0.1:$port"
        "--config.distributed.num_processes=$processes" "--config.distributed.process_id=$i")
  if [[ -n "${DRY_RUN:-}" ]]; then
    echo "${env_vars[*]} ${args[*]}"
    continue
  fi
  env "${env_vars[@]}" "${args[@]}" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit "$status"
