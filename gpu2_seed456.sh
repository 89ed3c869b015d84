#!/usr/bin/env bash
# Seed interface: ./gpu2_seed456.sh <model> <method> [flags] runs seed 456 on GPU 2.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 <model> <method> [flags]" >&2
  exit 2
fi
model="$1"; method="$2"; shift 2
export CUDA_VISIBLE_DEVICES=2
exec "$(dirname "${BASH_SOURCE[0]}")/run_experiment.sh" "$model" 456 "$method" "$@"
