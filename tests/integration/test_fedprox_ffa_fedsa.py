"""fedprox, ffa_lora and fedsa_lora end to end on a tiny model (in-process): what each trains, what travels and
what the server's rule leaves in every client's state."""
from __future__ import annotations

from atlasfl.experiment import run_and_save


def _digests(result):
    return [r["state_digests"] for r in result["round_metrics"]]


def test_fedprox_at_mu_zero_is_standard_fl_bit_for_bit_and_a_positive_mu_moves_the_weights(make_config, tmp_path):
    runs = {}
    for label, method, kw in (("fedavg", "standard_fl", {}), ("mu0", "fedprox", dict(prox_mu=0.0)),
                              ("mu1", "fedprox", dict(prox_mu=1.0))):
        runs[label], _ = run_and_save(make_config(method=method, output_dir=str(tmp_path / label), **kw),
                                      progress=False)
    fedavg, mu0, mu1 = runs["fedavg"], runs["mu0"], runs["mu1"]
    assert _digests(mu0) == _digests(fedavg)
    assert mu0["final_metrics"] == fedavg["final_metrics"]
    assert mu0["communication_costs"]["total_bytes_up"] == fedavg["communication_costs"]["total_bytes_up"]
    for ours, theirs in zip(_digests(mu1), _digests(fedavg)):
        assert set(ours.values()).isdisjoint(theirs.values())  # the term changed every client's weights
    assert len(set(_digests(mu1)[-1].values())) == 1  # still one group's mean: every client alike
