#!/usr/bin/env python
"""How far can `atlas` share? The Laplacian step's mixing weights of every cluster of finished runs.

    python benchmarks/laplacian_weights.py results/benchmark/scarce_iid/*atlas*.json

With C = I − η(I − a) (a: the row-normalised affinity of the cluster, a_kk = 1 before normalisation), a client
keeps (1 − η) + η·a_kk of its own update each round and gives η·a_kl to each neighbour; at η = 1 that is a
itself. The cluster mean (`atlas_no_laplacian`, `fedavg_cluster`) keeps 1/m of its own. Prints, per run and
cluster, m and the self weight a_kk at η = 1 (min–max over the cluster's clients) against 1/m.
"""
import json
import sys

import numpy as np

from atlasfl.phases.clustering import centred_unit_rows
from atlasfl.phases.laplacian import affinity


def main(paths: list[str]) -> None:
    print(f"{'run':48} {'cluster':>7} {'m':>2} {'self weight at η=1':>19} {'cluster mean 1/m':>17}")
    for path in paths:
        result = json.loads(open(path).read())
        fingerprints = result["phase1_clustering"].get("fingerprints")
        if not fingerprints:
            continue
        space = centred_unit_rows(np.asarray(fingerprints, dtype=np.float64))  # the space the server uses
        labels = np.asarray(result["cluster_labels"])
        for c in np.unique(labels):
            members = labels == c
            if members.sum() < 2:
                continue
            self_weight = np.diag(affinity(space[members]))
            print(f"{result['run_name']:48} {c:>7} {members.sum():>2} "
                  f"{self_weight.min():>9.3f}–{self_weight.max():.3f} {1 / members.sum():>17.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
