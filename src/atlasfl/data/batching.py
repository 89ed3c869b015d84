"""Tokenise examples once, then yield dynamically padded batches in a seeded order, and count the work."""

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from atlasfl.data.example import Example


def pair_joiner(tokenizer) -> str | None:
    """What to put in front of `text_pair` so the model can see where the pair's halves meet.

    None when the tokenizer's own pair template adds tokens (BERT's [SEP], RoBERTa's </s></s>,
    Llama's BOS). Byte-level BPE tokenizers (GPT-2, Qwen2) simply concatenate the two texts, so
    there we put the tokenizer's sep or eos token between them (encoded as that single special
    token), falling back to a newline for a tokenizer that has neither. Decoder heads pool the
    rightmost non-pad token, so an eos separator that doubles as the pad token is harmless.
    """
    if tokenizer.num_special_tokens_to_add(pair=True) > tokenizer.num_special_tokens_to_add(pair=False):
        return None
    return tokenizer.sep_token or tokenizer.eos_token or "\n"


def encode(tokenizer, examples: Sequence[Example], max_length: int = 128) -> list[dict]:
    """Each example as {'input_ids', 'attention_mask', 'labels'}, truncated to `max_length` tokens
    (pairs truncate the longer half first)."""
    joiner = pair_joiner(tokenizer)
    out: list[dict | None] = [None] * len(examples)
    singles = [i for i, ex in enumerate(examples) if ex.text_pair is None]
    pairs = [i for i, ex in enumerate(examples) if ex.text_pair is not None]
    for idx, is_pair in ((singles, False), (pairs, True)):
        if not idx:
            continue
        texts = [examples[i].text for i in idx]
        if is_pair:
            second = [examples[i].text_pair for i in idx]
            if joiner is not None:
                second = [f"{joiner} {p}" for p in second]
            enc = tokenizer(texts, second, truncation=True, max_length=max_length)
        else:
            enc = tokenizer(texts, truncation=True, max_length=max_length)
        for k, i in enumerate(idx):
            out[i] = {
                "input_ids": enc["input_ids"][k],
                "attention_mask": enc["attention_mask"][k],
                "labels": examples[i].label,
            }
    return out


@dataclass
class Tally:
    """Work done: examples, and token positions processed (`padded_tokens`) of which `real_tokens` are
    not padding."""

    examples: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0

    def add(self, batch: dict[str, torch.Tensor]) -> None:
        mask = batch["attention_mask"]
        self.examples += mask.shape[0]
        self.real_tokens += int(mask.sum())
        self.padded_tokens += mask.numel()

    def __iadd__(self, other: "Tally") -> "Tally":
        self.examples += other.examples
        self.real_tokens += other.real_tokens
        self.padded_tokens += other.padded_tokens
        return self


MEGA_BATCH = 50  # batches per length-sorted group, as Hugging Face's `group_by_length` sampler


def batch_order(lengths: Sequence[int], batch_size: int, *, shuffle: bool, seed: int | None,
                group_by_length: bool = False) -> list[list[int]]:
    """The rows of each batch. With shuffle, a seeded permutation; with `group_by_length` too, the permutation
    is cut into mega-batches of MEGA_BATCH batches, each sorted by length (longest first), and the batches
    are then shuffled with the same generator, so similar lengths share a batch and padding shrinks."""
    if shuffle and seed is None:
        raise ValueError("shuffle=True needs a seed, so that the order is reproducible")
    if not shuffle:
        order = list(range(len(lengths)))
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=gen).tolist()
    if not group_by_length:
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    mega = MEGA_BATCH * batch_size
    order = [i for s in range(0, len(order), mega)
             for i in sorted(order[s:s + mega], key=lambda i: -lengths[i])]
    groups = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return [groups[i] for i in torch.randperm(len(groups), generator=gen).tolist()]


def batches(
    encoded: list[dict],
    batch_size: int,
    *,
    shuffle: bool,
    seed: int | None,
    pad_token_id: int,
    padding_side: str = "right",
    group_by_length: bool = False,
    tally: Tally | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches padded to their own longest sequence; with shuffle, the order depends only on `seed`
    (see `batch_order`). Each batch yielded is added to `tally`."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    lengths = [len(r["input_ids"]) for r in encoded]
    for group in batch_order(lengths, batch_size, shuffle=shuffle, seed=seed, group_by_length=group_by_length):
        rows = [encoded[i] for i in group]
        width = max(len(r["input_ids"]) for r in rows)
        ids, mask = [], []
        for r in rows:
            pad = width - len(r["input_ids"])
            if padding_side == "right":
                ids.append(r["input_ids"] + [pad_token_id] * pad)
                mask.append(r["attention_mask"] + [0] * pad)
            else:
                ids.append([pad_token_id] * pad + r["input_ids"])
                mask.append([0] * pad + r["attention_mask"])
        batch = {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "attention_mask": torch.tensor(mask, dtype=torch.long),
            "labels": torch.tensor([r["labels"] for r in rows], dtype=torch.long),
        }
        if tally is not None:
            tally.add(batch)
        yield batch
