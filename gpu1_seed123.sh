#!/usr/bin/env bash
# Seed interface: ./gpu1_seed123.sh <model> <method> [flags] runs seed 123 on GPU 1.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 <model> <method> [flags]" >&2
  exit 2
fi
model="$1"; method="$2"; shift 2
export CUDA_VISIBLE_DEVICES=1
exec "$(dirname "${BASH_SOURCE[0]}")/run_experiment.sh" "$model" 123 "$method" "$@"
