"""Trained clients others can load: each client's final adapter in PEFT's own format, plus its head.

`--save-adapters DIR` writes, for a run named NAME:

    DIR/NAME/README.md                      which client is which, and how to load one
    DIR/NAME/tokenizer/                     the run's tokenizer (decoders: pad token = EOS)
    DIR/NAME/c<k>/adapter_config.json       PEFT LoraConfig of client k, its per-module ranks in `rank_pattern`
    DIR/NAME/c<k>/adapter_model.safetensors client k's LoRA factors
    DIR/NAME/c<k>/head.safetensors          its linear classification head (`weight`, and `bias` for encoders)
    DIR/NAME/c<k>/head_config.json          num_labels, pooling, task, base model, ...

`PeftModel.from_pretrained(AutoModel.from_pretrained(BASE), "DIR/NAME/c<k>")` gives client k's
backbone; its last hidden state, pooled as `head_config.json` says, through the head gives its logits.
A client with a frozen residual (`flora`) is written as one merged adapter: its residual plus its LoRA's update,
refactored at full rank (min(d_out, d_in) per module), so peft alone loads the client's whole model.

With `--lambda-sweep` every eta's final clients are written to a staging folder as the eta finishes
(so a resumed run still has them); the chosen eta's are moved into place when the run ends.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import save_file

from atlasfl.config import RunConfig
from atlasfl.models.lora import _name
from atlasfl.models.personal import PersonalLoRAModel
from atlasfl.models.registry import HUB_ALIASES

log = logging.getLogger("atlasfl")
POOLING = {
    "encoder": ("mean", "mean of the last hidden state over the tokens whose attention_mask is 1"),
    "decoder": ("last", "the last hidden state at the last token whose attention_mask is 1 (right padding)"),
}


def base_model_code(cfg: RunConfig, source: str) -> str:
    """The Python line that loads the run's base model (`source`: the backbone's, pretrained or random)."""
    if source == "random":  # tiny-* and --init random: rebuilt from the architecture and the run seed
        return ("from atlasfl.models.registry import load_backbone\n"
                f'base = load_backbone("{cfg.model}", init="{cfg.init}", seed={cfg.seed}).model')
    if cfg.model == "minilm":
        return ("from atlasfl.models.registry import minilm_path  # the packaged all-MiniLM-L6-v2\n"
                "base = AutoModel.from_pretrained(minilm_path())")
    return f'base = AutoModel.from_pretrained("{HUB_ALIASES.get(cfg.model, cfg.model)}")'


def adapters_folder(cfg: RunConfig) -> Path:
    return Path(cfg.save_adapters) / cfg.run_name


def _staging(cfg: RunConfig, eta_index: int) -> Path:
    return adapters_folder(cfg) / f".eta-{eta_index:02d}"


def save_client_adapters(cfg: RunConfig, fm: PersonalLoRAModel, clients: dict[int, tuple[str, str]],
                         folder: Path) -> None:
    """Write every client's adapter (PEFT format) and head into `folder/c<k>/`. `clients`: id -> (task, metric)."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    pooling, pooling_doc = POOLING[fm.family.kind]
    for cid, (task, metric) in clients.items():
        used = fm.model_of(cid)  # what the client predicts with: its personal copy where it keeps one
        saved_ranks = _save_adapter(fm, used, folder)
        if used != cid:
            (folder / _name(used)).rename(folder / _name(cid))
        head = fm.heads[str(used)]
        save_file({n: p.detach().cpu().contiguous() for n, p in head.named_parameters()},
                  str(folder / _name(cid) / "head.safetensors"))
        meta = dict(client_id=cid, task=task, metric=metric, num_labels=head.out_features,
                    hidden_size=head.in_features, bias=head.bias is not None, pooling=pooling,
                    pooling_doc=pooling_doc, base_model=cfg.model, base_model_id=HUB_ALIASES.get(cfg.model, cfg.model),
                    base_model_source=fm.backbone.source, init=cfg.init, seed=cfg.seed,
                    method=cfg.method, run_name=cfg.run_name, ranks=fm.ranks[used], lora_alpha=cfg.lora_alpha,
                    max_length=cfg.max_length, **({} if saved_ranks is None else dict(
                        saved_ranks=saved_ranks, residual="merged into the adapter (full rank)")))
        (folder / _name(cid) / "head_config.json").write_text(json.dumps(meta, indent=2) + "\n")
    (folder / "README.md").unlink(missing_ok=True)  # PEFT's generic model card; ours is written on publishing
    _readable(folder)


def _save_adapter(fm: PersonalLoRAModel, cid: int, folder: Path) -> dict[str, int] | None:
    """Write client `cid`'s adapter into `folder/c<k>/` (PEFT writes a named adapter into folder/<name>/). A client
    with a residual gets a temporary adapter of full rank whose update is R + (α/r)·B@A: its ranks are returned."""
    if cid not in fm.residuals.of:
        fm.peft.save_pretrained(str(folder), selected_adapters=[_name(cid)], save_embedding_layers=False)
        return None
    from atlasfl.phases.aggregation import lora_delta, refactor

    state, shapes, name = fm.get_state(cid), fm.module_shapes(), f"{_name(cid)}-merged"
    ranks = {m: min(shapes[m]) for m in fm.modules}
    default = max(ranks.values())
    with torch.random.fork_rng(devices=[]):  # PEFT's initialisation of the temporary adapter draws from it
        fm.peft.add_adapter(name, LoraConfig(r=default, lora_alpha=fm.alpha, target_modules=list(fm.modules),
                                             rank_pattern={re.escape(m): r for m, r in ranks.items() if r != default},
                                             bias="none"))
    try:
        for m in fm.modules:
            A, B = state[f"lora::{m}::A"], state[f"lora::{m}::B"]
            merged = refactor(state[f"lora::{m}::R"] + lora_delta(A, B, fm.alpha / A.shape[0]), ranks[m],
                              fm.alpha / ranks[m])
            layer = fm.peft.base_model.model.get_submodule(m)
            with torch.no_grad():
                for factor, value in zip((layer.lora_A[name].weight, layer.lora_B[name].weight), merged):
                    factor.copy_(value)
        fm.peft.save_pretrained(str(folder), selected_adapters=[name], save_embedding_layers=False)
        (folder / name).rename(folder / _name(cid))
    finally:
        fm.peft.delete_adapter(name)
    return ranks


def _readable(folder: Path) -> None:
    """safetensors writes its files 0600; files meant for others get the usual umask-derived mode."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~umask)


def save_eta(cfg: RunConfig, fm: PersonalLoRAModel, clients: dict[int, tuple[str, str]], eta_index: int) -> None:
    """The clients at the end of eta number `eta_index`, staged until the run chooses its eta."""
    save_client_adapters(cfg, fm, clients, _staging(cfg, eta_index))


def publish(cfg: RunConfig, fm: PersonalLoRAModel, chosen_index: int, eta: float) -> Path | None:
    """Move the chosen eta's clients into place, with the tokenizer and a README; drop the other etas.
    A missing stage (a resumed run whose chosen eta finished before --save-adapters was given) is a warning:
    the run's result still gets written."""
    root = adapters_folder(cfg)
    staged = _staging(cfg, chosen_index)
    if not staged.is_dir():
        msg = (f"warning: the adapters of eta {eta:g} were not saved (that eta finished in an earlier attempt "
               "without --save-adapters); rerun without --resume to save them")
        log.warning(msg)
        print(msg, file=sys.stderr)
        return None
    for old in root.iterdir():  # a previous run's clients, and the etas not chosen
        if old != staged:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    for client in sorted(staged.iterdir()):
        client.rename(root / client.name)
    staged.rmdir()
    fm.backbone.tokenizer.save_pretrained(str(root / "tokenizer"))
    clients = sorted(root.glob("c*/head_config.json"), key=lambda p: int(p.parent.name[1:]))
    rows = [json.loads(p.read_text()) for p in clients]
    lines = [f"# {cfg.run_name}: the final adapters of its {len(rows)} clients (eta {eta:g})", "",
             "Each `c<k>/` is a PEFT LoRA adapter of the base model plus a linear head (`head.safetensors`,",
             "`head_config.json`: pooling and number of labels). The tokenizer the run used is in `tokenizer/`.", "",
             "```python", "from peft import PeftModel", "from transformers import AutoModel, AutoTokenizer", "",
             base_model_code(cfg, fm.backbone.source),
             'model = PeftModel.from_pretrained(base, "c0").eval()',
             'tokenizer = AutoTokenizer.from_pretrained("tokenizer")',
             "# logits = head(pool(model(**tokenizer(texts, ...)).last_hidden_state)), pooling as in head_config.json",
             "```", "",
             "| client | task | labels | pooling | ranks (min-max) |", "|---|---|---|---|---|"]
    for row in rows:
        ranks = row["ranks"].values()
        lines.append(f"| c{row['client_id']} | {row['task']} | {row['num_labels']} | {row['pooling']} | "
                     f"{min(ranks)}-{max(ranks)} |")
    (root / "README.md").write_text("\n".join(lines) + "\n")
    _readable(root)
    return root
