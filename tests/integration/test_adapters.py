"""`--save-adapters`: each client's final adapter in PEFT's own format, loaded back by peft alone,
predicts exactly what the run's own evaluation predicted."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoTokenizer

from atlasfl.data.batching import batches, encode
from atlasfl.data.tasks import load_task
from atlasfl.experiment import run_and_save
from atlasfl.federation.evaluation import predict
from atlasfl.federation.server import Plan
from atlasfl.models.lora import FederatedLoRAModel
from atlasfl.models.personal import PersonalLoRAModel
from atlasfl.models.registry import load_backbone
from atlasfl.results.checkpoint import complete_checkpoints, load_checkpoint
from tests.conftest import tiny_config


def _peft_predictions(folder, model_name, seed, encoded, pad_token_id) -> np.ndarray:
    """What a user does with the files: the base model, PeftModel.from_pretrained, the head, the pooling."""
    head_cfg = json.loads((folder / "head_config.json").read_text())
    base = load_backbone(model_name, seed=seed).model  # a random-init tiny base is rebuilt from its seed
    model = PeftModel.from_pretrained(base, str(folder)).eval()
    head = torch.nn.Linear(head_cfg["hidden_size"], head_cfg["num_labels"], bias=head_cfg["bias"])
    head.load_state_dict(load_file(str(folder / "head.safetensors")))
    preds = []
    with torch.no_grad():
        for batch in batches(encoded, 8, shuffle=False, seed=None, pad_token_id=pad_token_id):
            mask = batch["attention_mask"]
            hidden = model(input_ids=batch["input_ids"], attention_mask=mask).last_hidden_state
            if head_cfg["pooling"] == "mean":
                pooled = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
            else:
                pooled = hidden[torch.arange(len(hidden)), mask.sum(1) - 1]
            preds.append(head(pooled).argmax(-1).numpy())
    return np.concatenate(preds)


@pytest.mark.parametrize("model", ["tiny-bert", "tiny-gpt2"])
def test_saved_adapters_load_in_peft_and_predict_as_the_run(tmp_path, model):
    cfg = tiny_config(tmp_path, model=model, method="atlas", save_adapters=str(tmp_path / "adapters"))
    result, _ = run_and_save(cfg, progress=False)
    root = tmp_path / "adapters" / cfg.run_name
    assert sorted(p.name for p in root.iterdir()) == ["README.md", "c0", "c1", "c2", "c3", "tokenizer"]
    assert "PeftModel.from_pretrained" in (root / "README.md").read_text()
    assert result["diverged_clients"] == [] and not result["final_metrics"]["per_client"]["0"]["diverged"]
    # The run's own final clients: its last checkpoint holds the states it evaluated last.
    meta, states = load_checkpoint(complete_checkpoints(cfg.checkpoint_path)[-1])
    plan = Plan.from_json(meta["plan"])
    tokenizer = AutoTokenizer.from_pretrained(str(root / "tokenizer"))
    backbone = load_backbone(model, seed=cfg.seed)
    fm = FederatedLoRAModel(backbone, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, seed=cfg.seed)
    for cid in (0, 2):
        folder = root / f"c{cid}"
        adapter_cfg = json.loads((folder / "adapter_config.json").read_text())
        head_cfg = json.loads((folder / "head_config.json").read_text())
        assert adapter_cfg["peft_type"] == "LORA" and (folder / "adapter_model.safetensors").exists()
        # rank_pattern (regex keys) over the default r gives exactly the client's planned per-module ranks
        written = {m: next((r for k, r in adapter_cfg["rank_pattern"].items() if re.fullmatch(k, m)),
                           adapter_cfg["r"]) for m in fm.modules}
        assert written == plan.ranks[cid] == {m: int(r) for m, r in head_cfg["ranks"].items()}
        task = load_task(head_cfg["task"], max_test=cfg.max_test_samples)
        encoded = encode(tokenizer, task.test, cfg.max_length)
        assert encoded == encode(backbone.tokenizer, task.test, cfg.max_length)  # the saved tokenizer is the run's
        fm.add_client(cid, plan.ranks[cid], head_cfg["num_labels"])
        fm.set_state(cid, states[cid])
        y_true, y_run, _ = predict(fm, cid, encoded, batch_size=cfg.eval_batch_size)
        y_peft = _peft_predictions(folder, model, cfg.seed, encoded, tokenizer.pad_token_id)
        assert np.array_equal(y_peft, y_run)
        assert float(np.mean(y_peft == y_true)) == pytest.approx(
            result["final_metrics"]["per_client"][str(cid)]["accuracy"], abs=1e-12)


@pytest.mark.parametrize("model", ["tiny-bert", "tiny-qwen2"])
def test_per_module_ranks_travel_in_rank_pattern(tmp_path, model):
    """Clients with different ranks per module: PEFT rebuilds each at its own ranks and gives the same logits."""
    from atlasfl.results.adapters import save_client_adapters

    cfg = tiny_config(tmp_path, model=model, method="atlas", save_adapters=str(tmp_path / "adapters"))
    fm = PersonalLoRAModel(load_backbone(model, seed=0), alpha=16.0, dropout=0.0, seed=0)
    ranks = {0: {m: (2, 8, 4)[i % 3] for i, m in enumerate(fm.modules)}, 1: {m: 4 for m in fm.modules}}
    gen = torch.Generator().manual_seed(1)
    for cid, r in ranks.items():
        fm.add_client(cid, r, 3)
        fm.set_state(cid, {k: torch.randn(v.shape, generator=gen) * 0.3 for k, v in fm.get_state(cid).items()})
    folder = tmp_path / "out"
    save_client_adapters(cfg, fm, {0: ("a", "accuracy"), 1: ("b", "accuracy")}, folder)
    assert json.loads((folder / "c0" / "adapter_config.json").read_text())["rank_pattern"]  # heterogeneous
    task = load_task("gen_sentiment", max_test=16)
    encoded = encode(fm.backbone.tokenizer, task.test, 64)
    for cid in ranks:
        _, y_run, _ = predict(fm, cid, encoded, batch_size=8)
        peft_model = PeftModel.from_pretrained(load_backbone(model, seed=0).model, str(folder / f"c{cid}"))
        shapes = {name: peft_model.base_model.model.get_submodule(name).lora_A["default"].weight.shape[0]
                  for name in fm.modules}
        assert shapes == ranks[cid]
        y_peft = _peft_predictions(folder / f"c{cid}", model, 0, encoded, fm.backbone.tokenizer.pad_token_id)
        assert np.array_equal(y_peft, y_run)


def test_lambda_sweep_publishes_the_chosen_eta_only(tmp_path):
    cfg = tiny_config(tmp_path, method="atlas", rounds=1, lambda_sweep=True, lambda_grid=(0.0, 1.0),
                      save_adapters=str(tmp_path / "adapters"))
    result, _ = run_and_save(cfg, progress=False)
    root = tmp_path / "adapters" / cfg.run_name
    assert sorted(p.name for p in root.iterdir()) == ["README.md", "c0", "c1", "c2", "c3", "tokenizer"]
    assert f"(eta {result['lambda_sweep']['selected_eta']:g})" in (root / "README.md").read_text()


def test_flower_engine_refuses_save_adapters(tmp_path):
    from atlasfl.errors import AtlasError

    with pytest.raises(AtlasError, match="--save-adapters"):
        tiny_config(tmp_path, engine="flower", save_adapters=str(tmp_path / "a"))


@pytest.mark.parametrize("model", ["tiny-bert", "tiny-gpt2"])
def test_a_client_with_a_residual_is_saved_as_one_merged_adapter_that_peft_loads(tmp_path, model):
    """flora's clients: the residual and the LoRA's update in one full-rank adapter (GPT-2's Conv1D included)."""
    from atlasfl.models.personal import PersonalLoRAModel
    from atlasfl.results.adapters import save_client_adapters

    cfg = tiny_config(tmp_path, model=model, method="flora", save_adapters=str(tmp_path / "adapters"))
    fm = PersonalLoRAModel(load_backbone(model, seed=0), alpha=16.0, dropout=0.0, seed=0)  # as the engines build
    fm.add_client(0, {m: 2 for m in fm.modules}, 2, residual=True)
    gen = torch.Generator().manual_seed(1)
    fm.set_state(0, {k: torch.randn(v.shape, generator=gen) * 0.3 for k, v in fm.get_state(0).items()})
    save_client_adapters(cfg, fm, {0: ("gen_sentiment", "accuracy")}, tmp_path / "out")
    folder = tmp_path / "out" / "c0"
    head_cfg = json.loads((folder / "head_config.json").read_text())
    assert head_cfg["saved_ranks"] == {m: min(s) for m, s in fm.module_shapes().items()}
    assert list(fm.peft.peft_config) == ["c0"]  # the temporary adapter is gone
    encoded = encode(fm.backbone.tokenizer, load_task("gen_sentiment", max_test=16).test, 64)
    _, y_run, _ = predict(fm, 0, encoded, batch_size=8)
    assert np.array_equal(_peft_predictions(folder, model, 0, encoded, fm.backbone.tokenizer.pad_token_id), y_run)
    batch = next(batches(encoded, 8, shuffle=False, seed=None, pad_token_id=fm.backbone.tokenizer.pad_token_id))
    peft_model = PeftModel.from_pretrained(load_backbone(model, seed=0).model, str(folder)).eval()
    with torch.no_grad():
        fm.activate(0, train=False)
        theirs = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        torch.testing.assert_close(theirs, fm.hidden_states(batch), rtol=1e-4, atol=1e-4)
