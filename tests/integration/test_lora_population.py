"""Adding, activating and co-training clients touch only the clients concerned (`FederatedLoRAModel.add_client`,
`activate`, `training_together`), so a large population costs no more per call than a small one; what they leave
must be what PEFT's own `add_adapter`, `set_adapter` and `train` leave (the reference: they visit every client)."""
from __future__ import annotations

import pytest
import torch

from atlasfl.engines.inprocess import held_once, set_up
from atlasfl.federation.driver import plan_or_restore
from atlasfl.methods import method_for
from atlasfl.models import registry
from atlasfl.models.lora import FederatedLoRAModel
from tests.conftest import TINY_MODELS, tiny_config


def _model(model: str, *, peft_adds: bool = False) -> FederatedLoRAModel:
    """Five clients with different per-module ranks and head widths, their states moved off PEFT's B = 0 start;
    with `peft_adds`, the clients after the first are added by PEFT's `add_adapter` (the reference)."""
    fm = FederatedLoRAModel(registry.load_backbone(model, seed=0), alpha=16.0, dropout=0.1, seed=0)
    if peft_adds:
        fm._add_adapter = lambda name, config, ranks: fm.peft.add_adapter(name, config)
    for cid in range(5):
        fm.add_client(cid, {m: 2 + (cid + i) % 3 for i, m in enumerate(fm.modules)}, 2 + cid % 2)
        gen = torch.Generator().manual_seed(cid)
        fm.set_state(cid, {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in fm.get_state(cid).items()})
    return fm


def _peft_activate(fm: FederatedLoRAModel, cid: int, train: bool) -> None:
    fm.peft.set_adapter(f"c{cid}")
    fm.peft.train(train)


def _peft_together(fm: FederatedLoRAModel, cids: list[int]) -> None:
    for _, layer in fm._lora_layers():
        layer.set_adapter([])
    for cid in cids:
        for p in fm.trainable_parameters(cid):
            p.requires_grad_(True)
    fm.peft.train(True)


def _running_state(fm: FederatedLoRAModel, running: list[int]) -> dict:
    """What a forward and backward depend on: every layer's active adapters, every parameter's requires_grad, and
    the mode of every module that runs (the shared ones and the running clients' adapters)."""
    mine = [f".c{cid}" for cid in running]
    modes = {name: m.training for name, m in fm.peft.named_modules()
             if ".lora_" not in name.rsplit(".", 1)[-1] and (not _is_client_module(name) or name.endswith(tuple(mine)))}
    return dict(active={name: list(layer.active_adapters) for name, layer in fm._lora_layers()},
                grads={name: p.requires_grad for name, p in fm.peft.named_parameters()},
                modes=modes, peft_active=fm.peft.active_adapters)


def _is_client_module(name: str) -> bool:
    parts = name.split(".")
    return len(parts) >= 2 and parts[-2].startswith("lora_")


@pytest.mark.parametrize("model", TINY_MODELS)
def test_adding_clients_builds_what_peft_builds(model):
    ours, reference = _model(model), _model(model, peft_adds=True)
    for cid in range(5):
        got, want = ours.get_state(cid), reference.get_state(cid)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
        assert ours.peft.peft_config[f"c{cid}"] == reference.peft.peft_config[f"c{cid}"]
    assert {n: (type(m), m.training) for n, m in ours.peft.named_modules()} == \
        {n: (type(m), m.training) for n, m in reference.peft.named_modules()}
    assert {n: (p.requires_grad, p.dtype) for n, p in ours.peft.named_parameters()} == \
        {n: (p.requires_grad, p.dtype) for n, p in reference.peft.named_parameters()}
    for name, layer in ours._lora_layers():
        twin = reference.peft.base_model.model.get_submodule(name)
        assert (layer.r, layer.scaling, layer.active_adapters) == (twin.r, twin.scaling, twin.active_adapters)


@pytest.mark.parametrize("model", TINY_MODELS)
def test_activation_leaves_the_state_peft_leaves(model):
    ours, reference = _model(model), _model(model)
    batch = dict(input_ids=torch.randint(5, 1000, (3, 7)), attention_mask=torch.ones(3, 7, dtype=torch.long))
    steps = [("activate", 3, True), ("activate", 1, False), ("together", [0, 2, 4]), ("activate", 2, True),
             ("together", [1, 3]), ("activate", 4, False), ("activate", 4, True), ("activate", 0, False)]
    for step in steps:
        if step[0] == "activate":
            _, cid, train = step
            ours.activate(cid, train=train)
            _peft_activate(reference, cid, train)
            running = [cid]
        else:
            with ours.training_together(step[1]):
                _peft_together(reference, step[1])
                assert _running_state(ours, step[1]) == _running_state(reference, step[1]), step
            reference.peft.set_adapter(f"c{step[1][0]}")  # what training_together's exit does
            reference.peft.train(True)
            running = [step[1][0]]
        assert _running_state(ours, running) == _running_state(reference, running), step
        torch.manual_seed(7)  # dropout in train mode: the same masks only if the same modules are in train mode
        got = ours.logits(running[0], batch)
        torch.manual_seed(7)
        torch.testing.assert_close(got, reference.logits(running[0], batch), rtol=0, atol=0)


def test_initial_states_hold_equal_tensors_once():
    a, b = torch.arange(6.0).reshape(2, 3), torch.zeros(4, dtype=torch.bfloat16)
    states = {0: {"x": a.clone(), "y": b.clone()}, 1: {"x": a.clone(), "y": b.clone()},
              2: {"x": a.clone() + 1, "y": torch.zeros(4)}}  # other values; other dtype
    held = held_once(states)
    assert held[1]["x"] is held[0]["x"] and held[1]["y"] is held[0]["y"]
    assert held[2]["x"] is not held[0]["x"] and held[2]["y"] is not held[0]["y"]
    assert all(torch.equal(held[c][k], states[c][k]) and held[c][k].dtype == states[c][k].dtype
               for c in states for k in states[c])


def test_a_populations_initial_states_are_a_few_tensors(tmp_path):
    transport = set_up(tiny_config(tmp_path, clients_per_task=4, rounds=1))
    plan_or_restore(transport.cfg, method_for(transport.cfg), transport, None)
    tensors = [t for state in transport.initial.values() for t in state.values()]
    assert len({id(t) for t in tensors}) < len(tensors) / 2  # 8 clients, a handful of distinct shapes
    now = transport.states()
    assert all(torch.equal(now[c][k], transport.initial[c][k]) for c in now for k in now[c])
