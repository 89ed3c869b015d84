#!/usr/bin/env bash
# Seed interface: ./run_experiment.sh <model> <seed> <method> [extra atlas run flags]
# A thin wrapper over `atlas run`; results go to results/atlas_<model>_<method>_seed<seed>_r<rounds>.json.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 <model> <seed> <method> [flags]  (models: distilbert gpt2 gpt2-xl qwen2.5 minilm; methods: atlas atlas_no_laplacian fedavg_cluster standard_fl local_only)" >&2
  exit 2
fi
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
atlas="$here/.venv/bin/atlas"
[ -x "$atlas" ] || atlas="$(command -v atlas || true)"
if [ -z "$atlas" ]; then
  echo "$0: atlas is not installed; run 'make install' (or 'pip install -e .') first" >&2
  exit 2
fi
# --resume: re-running a preempted script continues it; a finished run is reported, not redone.
exec "$atlas" run "$@" --resume
