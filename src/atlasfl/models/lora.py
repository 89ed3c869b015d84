"""LoRA on one shared frozen backbone: every client's adapter and head are its own state.

The adapted modules are found by structure: the backbone's list of transformer blocks is the
`nn.ModuleList` with one entry per layer, and a small per-family table names the attention
projections inside a block. A model type the table does not know fails with a clear error.
Each client is a PEFT named adapter (so per-module ranks go through PEFT's `rank_pattern`) plus a
linear classification head of its own task's width.
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from atlasfl.errors import AtlasError
from atlasfl.models.registry import Backbone
from atlasfl.models.residual import Residuals
from atlasfl.phases.devices import ModelFacts


@dataclass(frozen=True)
class Family:
    kind: str  # 'encoder' mean-pools real tokens; 'decoder' pools the last non-pad token
    attention: tuple[str, ...]  # paths, inside one block, of the attention projections LoRA adapts


FAMILIES: dict[str, Family] = {
    "bert": Family("encoder", ("attention.self.query", "attention.self.value")),
    "distilbert": Family("encoder", ("attention.q_lin", "attention.v_lin")),
    "gpt2": Family("decoder", ("attn.c_attn",)),
    "llama": Family("decoder", ("self_attn.q_proj", "self_attn.v_proj")),
    "qwen2": Family("decoder", ("self_attn.q_proj", "self_attn.v_proj")),
}

# Which activation model of atlasfl.phases.devices describes each architecture.
MEMORY_FAMILY = {"bert": "bert", "distilbert": "bert", "gpt2": "gpt2", "llama": "llama", "qwen2": "llama"}


def head_has_bias(memory_family: str) -> bool:
    """Whether a client's head has a bias, from `ModelFacts.family` (what a server knows of the model):
    encoders' heads do (`FederatedLoRAModel.new_head`)."""
    return any(FAMILIES[t].kind == "encoder" for t, f in MEMORY_FAMILY.items() if f == memory_family)


def family_of(model: nn.Module) -> Family:
    model_type = model.config.model_type
    if model_type not in FAMILIES:
        raise AtlasError(f"unsupported architecture {model_type!r}: ATLAS knows {', '.join(FAMILIES)}; "
                         "add its attention projections to atlasfl.models.lora.FAMILIES")
    return FAMILIES[model_type]


def transformer_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList holding one block per layer (all of one class), found by structure, not by name."""
    num_layers = model.config.num_hidden_layers
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) == num_layers and len({type(b) for b in m}) == 1]
    if len(found) != 1:
        raise AtlasError(f"cannot locate the {num_layers} transformer blocks of {model.config.model_type!r} "
                         f"(found {len(found)} candidate module lists)")
    return found[0]


def target_modules(model: nn.Module) -> list[str]:
    """Full names of the attention projections to adapt, ordered by layer."""
    family = family_of(model)
    prefix, blocks = transformer_blocks(model)
    names = []
    for i, block in enumerate(blocks):
        for path in family.attention:
            module = block.get_submodule(path)
            if not hasattr(module, "weight") or module.weight.dim() != 2:
                raise AtlasError(f"{prefix}.{i}.{path} of {model.config.model_type!r} is not a projection layer")
            names.append(f"{prefix}.{i}.{path}")
    return names


def layer_index(module_name: str) -> int:
    """Block index of an adapted module name such as 'encoder.layer.3.attention.self.query'."""
    return int(re.search(r"\.(\d+)\.", module_name).group(1))


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The mean of `hidden` (batch × seq × d) over each row's real (non-pad) tokens."""
    m = attention_mask.to(hidden.device).unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1)


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over keys and float32 bytes: equal digests mean clients hold identical trainable state."""
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(np.ascontiguousarray(state[key].detach().to(torch.float32).cpu().numpy()).tobytes())
    return h.hexdigest()[:16]


class FederatedLoRAModel:
    """One frozen backbone; client k is PEFT adapter 'c<k>' at its own ranks plus its own linear head."""

    def __init__(self, backbone: Backbone, *, alpha: float, dropout: float, seed: int):
        self.backbone = backbone
        self.family = family_of(backbone.model)
        self.modules = target_modules(backbone.model)
        self.alpha = alpha
        self.dropout = dropout
        self.seed = seed
        self.hidden_size = backbone.model.config.hidden_size
        self.device = next(backbone.model.parameters()).device
        self.peft: PeftModel | None = None
        self.heads = nn.ModuleDict()
        self.ranks: dict[int, dict[str, int]] = {}
        self.residuals = Residuals()
        self._trainable: list[int] = []  # the clients whose factors take gradients now (`_select`)
        self._shared: list[nn.Module] | None = None  # the modules no client owns (`_set_training`); None: unlisted

    # ---- building ---------------------------------------------------------------------------
    def add_client(self, cid: int, ranks: dict[str, int], num_labels: int, *, residual: bool = False) -> None:
        """Adapter and head start from the run seed, so same-shape clients start identical (a server broadcast);
        with `residual`, a zero frozen residual per module too (`models.residual`)."""
        if set(ranks) != set(self.modules):
            raise ValueError("ranks must name exactly the adapted modules")
        default = max(set(ranks.values()), key=list(ranks.values()).count)
        config = LoraConfig(
            r=default, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=list(self.modules),
            rank_pattern={re.escape(m): r for m, r in ranks.items() if r != default}, bias="none",
        )
        torch.manual_seed(self.seed)
        if self.peft is None:
            self.peft = get_peft_model(self.backbone.model, config, adapter_name=_name(cid))
            self._trainable = [cid]  # PEFT activates its first adapter; later ones join inactive and frozen
        else:
            self._add_adapter(_name(cid), config, ranks)
        self._shared = None
        self.heads[str(cid)] = self.new_head(num_labels)
        self.ranks[cid] = dict(ranks)
        if residual:
            self.residuals.add(cid, dict(self._lora_layers()), self.module_shapes(), self.base_weight(self.modules[0]))

    def _add_adapter(self, name: str, config: LoraConfig, ranks: dict[str, int]) -> None:
        """PEFT's `add_adapter`, as the call its injection makes on each adapted layer that is already a LoRA layer
        (`update_layer`, in the same order, so a seed draws the same factors), added to its record of configs for
        saving. PEFT's own walks every module of the model, every client's included, several times over: building a
        population that way costs the square of its size. `update_layer` itself visits every adapter of its layer
        (to set their `requires_grad`, and to look for one on the meta device), so it runs on the layer with its
        other adapters set aside (`_alone`). The new adapter joins inactive and frozen, as there."""
        self.peft.peft_config[name] = config
        for module, layer in self._lora_layers():
            with _alone(layer):
                layer.update_layer(name, ranks[module], lora_alpha=self.alpha, target_name=module, config=config)

    # ---- per-client state -------------------------------------------------------------------
    def _lora_layers(self):
        for name in self.modules:
            yield name, self.peft.base_model.model.get_submodule(name)

    def activate(self, cid: int, train: bool) -> None:
        """The client's adapter alone runs and takes gradients (PEFT's `set_adapter`), in train or eval mode."""
        self._select([cid], trainable=[cid])
        self.peft.active_adapter = self.peft.base_model.active_adapter = _name(cid)
        self._set_training(train, [cid])

    def _select(self, active: Sequence[int], trainable: Sequence[int]) -> None:
        """Every adapted layer runs the `active` clients' adapters, and only the `trainable` clients' factors take
        gradients: the state PEFT's `set_adapter` leaves. PEFT's visits every adapter of every layer, a cost that
        grows with the population on each call; this changes only the factors whose role changes, so activating a
        client costs the same in a population of 12 or 1,200 (`tests/integration/test_lora_population.py` checks
        that the two agree). It sets PEFT's per-layer record of active adapters, which PEFT itself sets only there."""
        for _, layer in self._lora_layers():
            layer._active_adapter = [_name(cid) for cid in active]
        frozen = [cid for cid in self._trainable if cid not in trainable]
        for cid, needs in [(cid, False) for cid in frozen] + [(cid, True) for cid in trainable]:
            for p in self.trainable_parameters(cid, ("lora_A", "lora_B")):
                p.requires_grad_(needs)
        self._trainable = list(trainable)

    def _set_training(self, train: bool, cids: Sequence[int]) -> None:
        """Train or eval mode (`nn.Module.train`) for the modules no client owns and for the given clients' adapters:
        the others' modes matter only once they run, and are set then, so the cost does not grow with the population."""
        if self._shared is None:
            self._shared = [m for name, m in self.peft.named_modules() if not _PER_CLIENT.search(name)]
        for module in self._shared:
            module.training = train
        for cid in cids:
            for _, layer in self._lora_layers():
                for part in (layer.lora_A, layer.lora_B, layer.lora_dropout):
                    part[_name(cid)].train(train)

    def trainable_parameters(self, cid: int, parts: Sequence[str] = ("lora_A", "lora_B", "head")
                             ) -> list[nn.Parameter]:
        """The client's parameters of the given parts of its state (`methods.base.PARTS`), module by module."""
        params = []
        for _, layer in self._lora_layers():
            params += [getattr(layer, part)[_name(cid)].weight for part in ("lora_A", "lora_B") if part in parts]
        return params + (list(self.heads[str(cid)].parameters()) if "head" in parts else [])

    def get_state(self, cid: int) -> dict[str, torch.Tensor]:
        """The client's trainable state in the canonical flat format (detached CPU copies)."""
        state = {}
        for name, layer in self._lora_layers():
            state[f"lora::{name}::A"] = layer.lora_A[_name(cid)].weight.detach().cpu().clone()
            state[f"lora::{name}::B"] = layer.lora_B[_name(cid)].weight.detach().cpu().clone()
        state.update({key: t.detach().cpu().clone() for key, t in self.residuals.tensors(cid).items()})
        for pname, p in self.heads[str(cid)].named_parameters():
            state[f"head::{pname}"] = p.detach().cpu().clone()
        return state

    def set_state(self, cid: int, state: dict[str, torch.Tensor], *, partial: bool = False) -> None:
        """Copy `state` into the client's tensors; with `partial`, only the keys it holds (a method that sends some
        parts back: the rest stays the client's own)."""
        targets = {}
        for name, layer in self._lora_layers():
            targets[f"lora::{name}::A"] = layer.lora_A[_name(cid)].weight
            targets[f"lora::{name}::B"] = layer.lora_B[_name(cid)].weight
        targets.update(self.residuals.tensors(cid))
        for pname, p in self.heads[str(cid)].named_parameters():
            targets[f"head::{pname}"] = p
        if not (set(state) <= set(targets) if partial else set(state) == set(targets)):
            raise ValueError(f"state keys do not match client {cid}'s trainable state")
        targets = {key: targets[key] for key in state}
        with torch.no_grad():
            for key, p in targets.items():
                if p.shape != state[key].shape:
                    raise ValueError(f"{key}: shape {tuple(state[key].shape)} != client's {tuple(p.shape)}")
                p.copy_(state[key].to(p.device, p.dtype))

    # ---- forward ----------------------------------------------------------------------------
    def hidden_states(self, batch: dict[str, torch.Tensor], *, adapters: bool = True) -> torch.Tensor:
        """Last hidden states; with `adapters=False` (or before any client exists) the frozen base alone."""
        inputs = dict(input_ids=batch["input_ids"].to(self.device),
                      attention_mask=batch["attention_mask"].to(self.device))
        if self.peft is None:
            return self.backbone.model(**inputs).last_hidden_state
        if adapters:
            return self.peft(**inputs).last_hidden_state
        with self.peft.disable_adapter():
            return self.peft(**inputs).last_hidden_state

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Sequence representation: the mean over real tokens (encoders; sentence-embedding checkpoints
        such as MiniLM never trained their first token for classification) or the last non-pad token
        (decoders, whose last position alone has seen the whole sequence; right padding)."""
        if self.family.kind == "encoder":
            return masked_mean(hidden, attention_mask)
        mask = attention_mask.to(hidden.device)
        last = mask.sum(dim=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]

    def base_weight(self, module_name: str) -> nn.Parameter:
        """The frozen weight of an adapted module, whether or not PEFT has wrapped it yet."""
        module = self.backbone.model.get_submodule(module_name)
        return getattr(module, "base_layer", module).weight

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """(d_out, d_in) of every adapted module (GPT-2's Conv1D stores its weight transposed)."""
        shapes = {}
        for m in self.modules:
            module = self.backbone.model.get_submodule(m)
            base = getattr(module, "base_layer", module)
            d0, d1 = base.weight.shape
            shapes[m] = (d1, d0) if type(base).__name__ == "Conv1D" else (d0, d1)
        return shapes

    def facts(self) -> ModelFacts:
        """What the memory model needs, read from the real config (family-specific attribute names)."""
        c = self.backbone.model.config
        intermediate = getattr(c, "intermediate_size", None) or getattr(c, "hidden_dim", None) \
            or getattr(c, "n_inner", None) or 4 * c.hidden_size
        base_params = sum(p.numel() for n, p in self.backbone.model.named_parameters() if "lora_" not in n)
        return ModelFacts(total_params=base_params, hidden_size=c.hidden_size, num_layers=c.num_hidden_layers,
                          intermediate_size=intermediate, num_heads=c.num_attention_heads, vocab_size=c.vocab_size,
                          family=MEMORY_FAMILY[c.model_type],
                          dtype_bytes=next(self.backbone.model.parameters()).element_size())

    def new_head(self, num_labels: int) -> nn.Linear:
        """A linear head initialised from the run seed: every client (and the fingerprint pass) starts alike."""
        head = nn.Linear(self.hidden_size, num_labels, bias=self.family.kind == "encoder")
        gen = torch.Generator().manual_seed(self.seed)
        with torch.no_grad():
            head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * 0.02)
            if head.bias is not None:
                head.bias.zero_()
        return head.to(self.device)

    def logits(self, cid: int, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.heads[str(cid)](self.pool(self.hidden_states(batch), batch["attention_mask"]))

    # ---- several clients in one forward pass --------------------------------------------------
    @contextmanager
    def training_together(self, cids: Sequence[int]) -> Iterator[None]:
        """Train mode with no PEFT adapter active (its layers compute the frozen base alone) and every listed
        client's factors trainable: `routed_logits` adds each row's own delta. On exit the first client is
        active again, as after `activate`."""
        self._select([], trainable=cids)  # PEFT adds no delta; the clients trained here take gradients
        self._set_training(True, cids)
        try:
            yield
        finally:
            self.activate(cids[0], train=True)

    def routed_logits(self, spans: Sequence[tuple[int, int, int]], batch: dict[str, torch.Tensor]
                      ) -> list[torch.Tensor]:
        """One forward pass of the frozen base over `batch`, whose rows `start:stop` belong to client `cid` for each
        (cid, start, stop) of `spans` (contiguous, covering every row): every adapted module adds to those rows
        the LoRA delta of that client's adapter, as PEFT's forward does for the active one (dropout, then A, B
        and scaling), and its residual if it has one; each client's head scores its pooled rows. Use inside
        `training_together`.

        Its own hooks rather than PEFT's mixed-batch `adapter_names` (inference only at PeftModel level): rows
        of a client are contiguous here, so slices replace PEFT's row gathers and scatters."""
        if spans[0][1] != 0 or spans[-1][2] != len(batch["input_ids"]) or \
                any(a[2] != b[1] for a, b in zip(spans, spans[1:])):
            raise ValueError("spans must cover the batch's rows contiguously, in order")
        names = [(cid, _name(cid), start, stop) for cid, start, stop in spans]

        def add_deltas(layer, args, output, *, module):
            x = args[0]
            deltas = []
            for cid, name, start, stop in names:
                rows = x[start:stop].to(layer.lora_A[name].weight.dtype)
                delta = layer.lora_B[name](layer.lora_A[name](layer.lora_dropout[name](rows))) * layer.scaling[name]
                deltas.append(self.residuals.add_to(delta, rows, cid, module))
            return output + torch.cat(deltas).to(output.dtype)

        handles = [layer.register_forward_hook(partial(add_deltas, module=m)) for m, layer in self._lora_layers()]
        try:
            hidden = self.hidden_states(batch)
        finally:
            for h in handles:
                h.remove()
        pooled = self.pool(hidden, batch["attention_mask"])
        return [self.heads[str(cid)](pooled[start:stop]) for cid, start, stop in spans]


# A module one client owns: an entry of a LoRA layer's per-adapter ModuleDict (`...query.lora_A.c5`).
_PER_CLIENT = re.compile(r"\.lora_\w+\.[^.]+")


@contextmanager
def _alone(layer: nn.Module) -> Iterator[None]:
    """The layer's per-adapter module and parameter containers emptied while the block runs, then given back with
    what the block added after what they held (in that order, as if it had run on the full containers). The other
    adapters' `requires_grad` are `_select`'s to set, never PEFT's, so hiding them changes nothing they hold."""
    kept = {}
    for attr in (*layer.adapter_layer_names, *layer.other_param_names):
        container = getattr(layer, attr, None)
        if type(container) in (nn.ModuleDict, nn.ParameterDict):
            kept[attr] = container
            setattr(layer, attr, type(container)())
    try:
        yield
    finally:
        for attr, container in kept.items():
            container.update(getattr(layer, attr))
            setattr(layer, attr, container)


def _name(cid: int) -> str:
    return f"c{cid}"
