"""ditto end to end on a tiny model: the global state is FedAvg's bit for bit (same bytes), the personal copy trains
as a client alone at λ = 0 and is pulled toward the round's global state at λ > 0, the client is scored with it,
and a resumed run ends as an uninterrupted one."""
from __future__ import annotations

import pytest
import torch

import atlasfl.results.checkpoint as ckpt
from atlasfl.engines import inprocess
from atlasfl.experiment import run_and_save
from atlasfl.federation import evaluation
from atlasfl.federation.training import TrainJob, train_client, train_cohort, train_local
from atlasfl.methods import method_for
from atlasfl.methods.base import PARTS, select
from atlasfl.models.personal import PERSONAL, personal_id
from atlasfl.results.checkpoint import complete_checkpoints, load_checkpoint


def _digests(result):
    return [r["state_digests"] for r in result["round_metrics"]]


@pytest.mark.parametrize("together", [False, True], ids=["one client", "client batching"])
def test_at_lambda_zero_the_personal_copy_trains_as_a_client_alone_on_the_same_batches(make_config, together):
    transport = inprocess.set_up(make_config(method="ditto", ditto_lambda=0.0, local_epochs=2))
    fm, shard = transport.fm, transport.shards[0]
    cid, labels, encoded = shard.client_id, transport.tasks[shard.task].num_labels, transport.train_enc[0]
    ranks = {m: 4 for m in fm.modules}
    fm.add_client(cid, ranks, labels, personal=True)
    alone, fedavg = 7, 8  # a plain client starting as the personal copy, another as the global state
    noise = torch.Generator().manual_seed(0)
    start = {k: v + 0.05 * torch.randn(v.shape, generator=noise) for k, v in fm.get_state(cid).items()}
    fm.set_state(cid, start)  # the copy and the global state now differ
    for other, prefix in ((alone, PERSONAL), (fedavg, "")):
        fm.add_client(other, ranks, labels)
        fm.set_state(other, {k[len(prefix):]: v for k, v in start.items() if k.startswith(prefix)
                             and (prefix or not k.startswith(PERSONAL))})
    kw = dict(lr=1e-2, batch_size=8)
    if together:
        train_cohort(fm, [TrainJob(cid, encoded, 5)], method=method_for(transport.cfg), **kw)
        train_cohort(fm, [TrainJob(alone, encoded, 5)], method=method_for(make_config(method="local_only",
                                                                                      local_epochs=2)), **kw)
        train_cohort(fm, [TrainJob(fedavg, encoded, 5)], method=method_for(make_config(method="standard_fl",
                                                                                       local_epochs=2)), **kw)
    else:
        train_client(fm, cid, encoded, method=method_for(transport.cfg), seed=5, **kw)
        for other in (alone, fedavg):
            train_local(fm, other, encoded, epochs=2, seed=5, **kw)
    end = fm.get_state(cid)
    copy = {k[len(PERSONAL):]: v for k, v in end.items() if k.startswith(PERSONAL)}
    shared = select(end, PARTS)
    for mine, theirs in ((copy, fm.get_state(alone)), (shared, fm.get_state(fedavg))):
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert all(not torch.equal(copy[k], start[PERSONAL + k]) for k in select(copy, ("lora_A", "lora_B")))


def test_a_positive_lambda_pulls_the_copy_toward_the_global_state_the_round_started_from(make_config):
    transport = inprocess.set_up(make_config(method="ditto", ditto_lambda=0.5))
    fm, shard = transport.fm, transport.shards[0]
    cid, encoded = shard.client_id, transport.train_enc[0]
    fm.add_client(cid, {m: 4 for m in fm.modules}, transport.tasks[shard.task].num_labels, personal=True)
    method, anchors = method_for(transport.cfg), []
    global_start = [p.detach().clone() for p in fm.trainable_parameters(cid)]
    pull = method.personal_loss()

    def spy():
        def term(params, anchor):
            anchors.append(all(torch.equal(a, g) for a, g in zip(anchor, global_start, strict=True)))
            assert all(p is q for p, q in zip(params, fm.trainable_parameters(personal_id(cid)), strict=True))
            return pull(params, anchor)
        return term

    method.personal_loss = spy
    train_client(fm, cid, encoded, method=method, seed=5, lr=1e-2, batch_size=8)
    assert len(anchors) == -(-len(encoded) // 8) and all(anchors)  # every step, anchored at the round's w


def test_ditto_global_is_fedavg_bit_for_bit_and_its_clients_are_scored_with_their_personal_copies(make_config,
                                                                                                   tmp_path,
                                                                                                   monkeypatch):
    last = {}
    evaluate = inprocess.InProcess.evaluate

    def spy(self, round_idx, trained, validate, test=True):
        out = evaluate(self, round_idx, trained, validate, test)
        last.update(fm=self.fm, transport=self, tests=out.tests)
        return out

    fedavg, _ = run_and_save(make_config(method="standard_fl", output_dir=str(tmp_path / "fedavg")), progress=False)
    monkeypatch.setattr(inprocess.InProcess, "evaluate", spy)
    ditto, _ = run_and_save(make_config(method="ditto", output_dir=str(tmp_path / "ditto")), progress=False)
    fm, transport = last["fm"], last["transport"]
    # Bytes: exactly FedAvg's, each client, each round, each way.
    assert [[(c["bytes_up"], c["bytes_down"]) for c in r["clients"]] for r in ditto["round_metrics"]] == \
        [[(c["bytes_up"], c["bytes_down"]) for c in r["clients"]] for r in fedavg["round_metrics"]]
    for key in ("per_client_bytes_up", "per_client_bytes_down", "total_bytes_up"):
        assert ditto["communication_costs"][key] == fedavg["communication_costs"][key]
    # The global state is FedAvg's own, bit for bit; the clients' full states (with their copies) differ.
    from atlasfl.models.lora import state_digest

    shared = {str(s.client_id): state_digest(select(fm.get_state(s.client_id), PARTS)) for s in transport.shards}
    assert shared == _digests(fedavg)[-1] != _digests(ditto)[-1]
    # Every client's scores are its personal copy's (the global state is FedAvg's, whose scores differ).
    for s in transport.shards:
        copy = evaluation.predict(fm, personal_id(s.client_id), transport.test_enc[s.task],
                                   batch_size=transport.cfg.eval_batch_size)
        assert last["tests"][s.client_id] == evaluation.test_scores(transport.tasks[s.task], copy, s.personal)
    assert ditto["final_metrics"]["per_client"] != fedavg["final_metrics"]["per_client"]


def test_a_resumed_ditto_run_ends_as_an_uninterrupted_one(make_config, tmp_path, monkeypatch):
    reference, _ = run_and_save(make_config(method="ditto", rounds=3, output_dir=str(tmp_path / "ref")),
                                progress=False)
    real, calls = ckpt.save_file, []

    def stop_after_round_2(tensors, filename):
        real(tensors, filename)
        calls.append(filename)
        if len(calls) == 3:  # the plan's checkpoint, round 1's, round 2's
            raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "save_file", stop_after_round_2)
    cfg = make_config(method="ditto", rounds=3)
    with pytest.raises(KeyboardInterrupt):
        run_and_save(cfg, progress=False)
    monkeypatch.setattr(ckpt, "save_file", real)
    _, states = load_checkpoint(complete_checkpoints(cfg.checkpoint_path)[-1])
    assert any(k.startswith(PERSONAL) for k in states[0])  # the copies are checkpointed with their clients
    resumed, _ = run_and_save(cfg, progress=False, resume=True)
    assert _digests(resumed) == _digests(reference)
    assert resumed["final_metrics"] == reference["final_metrics"]
