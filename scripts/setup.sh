#!/usr/bin/env bash
# Installs what qsft_jax needs on this machine, by kind of machine (run as root, or with sudo for apt).
# Idempotent: a second run installs nothing new.
set -euo pipefail

usage() {
  cat <<USAGE
usage: scripts/setup.sh [--dev | --tpu | --cuda]

  --dev   (default) CPU development and tests, what CI installs: the runtime requirements and the test
          ones (pytest, torch's CPU build for the golden tests, libtpu for ahead-of-time TPU compilation)
  --tpu   a TPU VM worker: the runtime requirements and jax[tpu] (libtpu); no torch, no pytest
  --cuda  a CUDA 12 host: the runtime requirements and jax[cuda12]; no torch, no pytest
Every mode also installs the data packages of requirements-nodeps.txt (without their dependencies),
this checkout (pip install -e .), and with apt: Stockfish (the Chess opponent) and g++ (the CPU
decode-attention kernel, qsft_jax/kernels/).

Environment: PYTHON, the interpreter to install into [python3], Python 3.11 or newer (a virtual
environment's, where the system Python is managed by apt); DRY_RUN=1 prints the commands instead.
USAGE
}

mode=dev
for arg in "$@"; do
  case "$arg" in
    --dev) mode=dev ;;
    --tpu) mode=tpu ;;
    --cuda) mode=cuda ;;
    -h|--help) usage; exit 0 ;;
    *) echo "scripts/setup.sh: unknown argument '$arg'" >&2; usage >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

fail() { echo "scripts/setup.sh: $*" >&2; exit 1; }
how_to_get="on Ubuntu 22.04 (TPU VM images): sudo add-apt-repository -y ppa:deadsnakes/ppa && sudo apt-get install -y python3.11 python3.11-venv, then python3.11 -m venv ~/qsft-venv && . ~/qsft-venv/bin/activate (README.md: Installing)"
command -v "$PYTHON" > /dev/null || fail "$PYTHON: not found; qsft_jax needs Python 3.11 or newer; $how_to_get"
version="$("$PYTHON" -c 'import platform; print(platform.python_version())')"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || fail "$PYTHON is Python $version; qsft_jax needs 3.11 or newer (jax's minimum); $how_to_get"
"$PYTHON" - <<'PY' || fail "$PYTHON (Python $version) is managed by the system's package manager (PEP 668); install into a virtual environment: $PYTHON -m venv ~/qsft-venv && . ~/qsft-venv/bin/activate (Debian: apt-get install python3-venv), then rerun"
import os, sys, sysconfig
managed = os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))
sys.exit(managed and sys.prefix == sys.base_prefix)
PY
"$PYTHON" -m pip --version > /dev/null 2>&1 \
  || fail "$PYTHON (Python $version) has no pip; $PYTHON -m ensurepip, or install into a virtual environment ($PYTHON -m venv ~/qsft-venv)"

run() {
  if [[ -n "${DRY_RUN:-}" ]]; then
    printf '%s\n' "$*"
  else
    "$@"
  fi
}

export DEBIAN_FRONTEND=noninteractive
if [[ -n "${DRY_RUN:-}" ]] || [ ! -x /usr/games/stockfish ] || ! command -v g++ > /dev/null; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  run $SUDO apt-get update -qq
  run $SUDO apt-get install -y -qq stockfish g++
fi
case "$mode" in
  dev) requirements=requirements-test.txt ;;
  tpu) requirements=requirements-tpu.txt ;;
  cuda) requirements=requirements-cuda12.txt ;;
esac
run "$PYTHON" -m pip install -q -r "$requirements"
run "$PYTHON" -m pip install -q --no-deps -r requirements-nodeps.txt
run "$PYTHON" -m pip install -q --no-deps -e .
