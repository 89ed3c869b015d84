#!/usr/bin/env bash
# Seed interface: ./gpu0_seed42.sh <model> <method> [flags] runs seed 42 on GPU 0.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 <model> <method> [flags]" >&2
  exit 2
fi
model="$1"; method="$2"; shift 2
export CUDA_VISIBLE_DEVICES=0
exec "$(dirname "${BASH_SOURCE[0]}")/run_experiment.sh" "$model" 42 "$method" "$@"
