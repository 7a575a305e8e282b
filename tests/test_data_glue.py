"""GLUE data: each task's TSV layout, errors naming file and line, tfds (mock) and offline
behaviour, tokenization of pairs, and batches padded to a fixed set of shapes."""

from __future__ import annotations

import os

import grain
import numpy as np
import pytest

from vera_jax import data
from vera_jax.data import glue as glue_lib
from vera_jax.train import data as train_data

REAL_GLUE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "glue")
VOCAB = ["[CLS]", "[PAD]", "[SEP]", "[UNK]", "[MASK]"] + "a b c d e f g h i j the cat dog sat on mat".split()


def write(path, text: str, bom: bool = False) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8-sig" if bom else "utf-8", newline="") as f:
        f.write(text)
    return str(path)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import BertTokenizerFast

    return BertTokenizerFast(vocab={w: i for i, w in enumerate(VOCAB)})


def test_each_task_reads_its_own_column_layout(tmp_path):
    write(tmp_path / "RTE/train.tsv", "index\tsentence1\tsentence2\tlabel\n0\tA cat.\tA dog.\tnot_entailment\n"
          "1\tThe mat.\tA mat.\tentailment\n")
    write(tmp_path / "MRPC/train.tsv", 'Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\t"Quoted\tbare " quote\n',
          bom=True)
    write(tmp_path / "CoLA/train.tsv", "gj04\t1\t\tThe cat sat.\ngj04\t0\t*\tCat the sat.")  # no final newline
    write(tmp_path / "STS-B/train.tsv", "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\t"
          "sentence2\tscore\n0\tmain-captions\tMSRvid\t2012test\t0000\tnone\tnone\tA cat.\tA dog.\t3.800\n")
    write(tmp_path / "SST-2/train.tsv", "sentence\tlabel\nit 's good . \t1\n")
    write(tmp_path / "QNLI/train.tsv", "index\tquestion\tsentence\tlabel\n0\tWho?\tThe cat.\tentailment\n")

    rte = data.read_local(str(tmp_path), data.get_task("rte"), "train")
    assert rte.text_a == ["A cat.", "The mat."] and rte.text_b == ["A dog.", "A mat."]
    assert rte.labels.tolist() == [1, 0] and rte.labels.dtype == np.int64
    mrpc = data.read_local(str(tmp_path), data.get_task("MRPC"), "train")
    assert (mrpc.text_a, mrpc.text_b, mrpc.labels.tolist()) == (['"Quoted'], ['bare " quote'], [1])
    cola = data.read_local(str(tmp_path), data.get_task("cola"), "train")
    assert (cola.text_a, cola.text_b, cola.labels.tolist()) == (["The cat sat.", "Cat the sat."], None, [1, 0])
    stsb = data.read_local(str(tmp_path), data.get_task("sts-b"), "train")
    assert stsb.labels.dtype == np.float32 and stsb.labels.tolist() == [pytest.approx(3.8)]
    assert data.read_local(str(tmp_path), data.get_task("sst2"), "train").text_a == ["it 's good . "]
    assert data.read_local(str(tmp_path), data.get_task("qnli"), "train").text_b == ["The cat."]


@pytest.mark.parametrize("task, text, message", [
    ("rte", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\n",
     r"train.tsv:3: expected 4 tab-separated"),
    ("rte", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n", r"train.tsv:2: label 'maybe' is not one of"),
    ("rte", "index\tsentence1\tlabel\n0\ta\tentailment\n",
     r"train.tsv:1: header .* lacks the rte columns \['sentence2'\]"),
    ("stsb", "sentence1\tsentence2\tscore\na\tb\tfive\n", r"train.tsv:2: score 'five' is not a number"),
    ("cola", "gj04\t1\t\tfine\ngj04\t2\t\tbad label\n", r"train.tsv:2: label '2' is not one of \[0, 1\]"),
    ("sst2", "sentence\tlabel\n \t1\n", r"train.tsv:2: empty sentence"),
])
def test_malformed_rows_name_file_and_line(tmp_path, task, text, message):
    spec = data.get_task(task)
    write(tmp_path / spec.dir_name / "train.tsv", text)
    with pytest.raises(data.GlueDataError, match=message):
        data.read_local(str(tmp_path), spec, "train")


def test_missing_file_says_which_layout_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="RTE/dev.tsv: no such file .*RTE/train.tsv, dev.tsv"):
        data.read_local(str(tmp_path), data.get_task("rte"), "dev")


@pytest.mark.skipif(not os.path.isdir(REAL_GLUE), reason="../shared/data/glue not present")
@pytest.mark.parametrize("task, train, dev, dev_counts", [
    ("rte", 2490, 277, [146, 131]), ("mrpc", 3668, 408, [129, 279]), ("cola", 8551, 1043, [322, 721]),
    ("sst2", 67349, 872, [428, 444]), ("stsb", 5749, 1500, None),
])
def test_real_glue_files_parse_with_published_sizes(task, train, dev, dev_counts):
    spec = data.get_task(task)
    assert len(data.read_local(REAL_GLUE, spec, "train")) == train
    split = data.read_local(REAL_GLUE, spec, "dev")
    assert len(split) == dev
    if dev_counts is None:
        assert 0.0 <= split.labels.min() and split.labels.max() <= 5.0
    else:
        assert np.bincount(split.labels).tolist() == dev_counts


def test_limit_keeps_a_fixed_random_subset(tmp_path):
    rows = "".join(f"{i}\ts{i}\tt{i}\tentailment\n" for i in range(50))
    write(tmp_path / "RTE/train.tsv", "index\tsentence1\tsentence2\tlabel\n" + rows)
    a = data.load_split(data.get_task("rte"), "train", data_dir=str(tmp_path), limit=10)
    b = data.load_split(data.get_task("rte"), "train", data_dir=str(tmp_path), limit=10)
    assert a.text_a == b.text_a and len(a) == 10 and a.text_a != [f"s{i}" for i in range(10)]
    assert [int(s[1:]) for s in a.text_a] == sorted(int(s[1:]) for s in a.text_a)
    assert [t[1:] for t in a.text_b] == [s[1:] for s in a.text_a]


def test_tfds_data_source_reads_mock_glue():
    import tensorflow_datasets as tfds
    import tensorflow_datasets.text  # noqa: F401

    with tfds.testing.mock_data(num_examples=6):
        rte = data.read_tfds(data.get_task("rte"), "train")
        stsb = data.read_tfds(data.get_task("stsb"), "dev")
        cola = data.read_tfds(data.get_task("cola"), "train")
    assert len(rte) == 6 and all(isinstance(t, str) for t in rte.text_a + rte.text_b)
    assert set(rte.labels.tolist()) <= {0, 1} and rte.labels.dtype == np.int64
    assert stsb.labels.dtype == np.float32 and cola.text_b is None


def test_tfds_offline_fails_fast_pointing_at_local_tsvs(tmp_path, monkeypatch):
    monkeypatch.setattr(glue_lib, "reachable", lambda url, timeout: "no network")
    with pytest.raises(data.DataUnavailableError, match=r"glue/rte is not prepared .*--config.data.dir="):
        data.read_tfds(data.get_task("rte"), "train", data_dir=str(tmp_path))


def test_tokenize_pairs_gets_segment_ids_and_truncates(tokenizer):
    split = data.Split(["the cat sat on the mat", "a"], ["the dog", "b c d e f g h i j a b c"], np.array([0, 1]), "x")
    enc = data.tokenize(split, tokenizer, max_length=8)
    first = enc["input_ids"][0]
    assert len(first) == 8 and first[0] == VOCAB.index("[CLS]") and first[-1] == VOCAB.index("[SEP]")
    assert max(len(x) for x in enc["input_ids"]) == 8
    assert enc["token_type_ids"][1].tolist() == [0, 0, 0] + [1] * 5


def ragged(lengths) -> list[dict]:
    """Examples as the GLUE family makes them, labelled by their index."""
    return [{"input_ids": np.arange(5, 5 + n, dtype=np.int32), "token_type_ids": np.zeros(n, np.int32),
             "label": np.int32(i)} for i, n in enumerate(lengths)]


def stream(lengths, *, seed, buckets, pad_id=1, sort_window=0, **kw):
    """The trainer's (seed, step) iterator over the examples, padded by the GLUE collate."""
    collate = lambda rows, longest: data.pad_rows(rows, data.bucket_for(longest, buckets), pad_id)  # noqa: E731
    return train_data.train_iterator(grain.MapDataset.source(ragged(lengths)), seed=seed, shuffle=True,
                                     threads=1, prefetch=1, collate=collate, lengths=np.asarray(lengths),
                                     sort_window=sort_window, **kw)


def test_train_batches_use_bucket_shapes_and_are_seeded():
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 60, 40)
    buckets = data.bucket_lengths(64, (16, 32))
    assert buckets == (16, 32, 64)
    kw = dict(global_batch=8, num_steps=10, buckets=buckets)
    batches = list(stream(lengths, seed=3, **kw))
    assert len(batches) == 10 and {b["input_ids"].shape[1] for b in batches} <= set(buckets)
    for b in batches:
        rows = b["label"]
        assert b["input_ids"].shape[1] == data.bucket_for(int(lengths[rows].max()), buckets)
        assert b["attention_mask"].sum(1).tolist() == lengths[rows].tolist()
        assert np.all(b["input_ids"][b["attention_mask"] == 0] == 1)
    epoch0 = np.concatenate([b["label"] for b in batches[:5]])
    assert len(set(epoch0.tolist())) == 40
    again = list(stream(lengths, seed=3, **kw))
    assert all(np.array_equal(x["label"], y["label"]) for x, y in zip(batches, again))
    other = list(stream(lengths, seed=4, **kw))
    assert not all(np.array_equal(x["label"], y["label"]) for x, y in zip(batches, other))
    assert not np.array_equal(epoch0, np.concatenate([b["label"] for b in batches[5:]]))


def test_sort_window_pads_less_and_still_covers_the_epoch():
    lengths = np.random.default_rng(1).integers(2, 120, 256)
    buckets = data.bucket_lengths(128, (16, 32, 48, 64, 96))
    kw = dict(global_batch=16, buckets=buckets, seed=0, shuffle=True)
    assert (data.padding_fraction(lengths, sort_window=8, **kw)
            < data.padding_fraction(lengths, sort_window=0, **kw) - 0.1)
    order = train_data.epoch_order(256, global_batch=16, epoch=0, seed=0, shuffle=True, lengths=lengths, sort_window=8)
    assert sorted(order.reshape(-1).tolist()) == list(range(256))
    batches = list(stream(lengths, seed=0, buckets=buckets, sort_window=8, global_batch=16, num_steps=16))
    np.testing.assert_array_equal(np.stack([b["label"] for b in batches]), order)


def test_train_stream_resumes_from_its_iterator_state():
    lengths = np.arange(3, 27)
    it = stream(lengths, seed=0, buckets=(32,), global_batch=4, num_steps=12)
    for _ in range(5):
        next(it)
    state = it.get_state()
    rest = [b["label"] for b in it]
    resumed = stream(lengths, seed=0, buckets=(32,), global_batch=4, num_steps=12)
    resumed.set_state(state)
    assert all(np.array_equal(a, b["label"]) for a, b in zip(rest, resumed, strict=True))


def test_eval_batches_share_one_bucket_and_cover_the_split():
    lengths = np.array([90, 3, 40, 5, 70, 8, 12, 2, 99, 15, 33, 64, 7, 4, 6, 9, 11, 3, 80, 50, 20])
    order = np.argsort(lengths, kind="stable")
    buckets = (16, 32, 64, 128)
    examples = ragged(lengths)
    ds = grain.MapDataset.source([examples[i] for i in order])
    collate = lambda rows, longest: data.pad_rows(rows, data.bucket_for(longest, buckets), 0)  # noqa: E731
    batches = list(train_data.eval_batches(ds, 8, 1, collate=collate, lengths=lengths[order]))
    assert [n for _, n in batches] == [8, 8, 5]
    assert [b["input_ids"].shape for b, _ in batches] == [(8, 16), (8, 64), (8, 128)]
    seen = np.concatenate([b["label"][:n] for b, n in batches])
    assert sorted(seen.tolist()) == list(range(21))


def test_bucket_errors_name_the_field():
    with pytest.raises(ValueError, match="data.max_length"):
        data.bucket_lengths(1)
    with pytest.raises(ValueError, match="longer than the largest bucket 32"):
        data.bucket_for(40, (16, 32))
    with pytest.raises(ValueError, match="3 examples is less than batch_size 4"):
        train_data.steps_per_epoch(grain.MapDataset.source([0, 1, 2]), 4)
    with pytest.raises(ValueError, match="train_lengths: expected one length per example"):
        train_data.train_iterator(grain.MapDataset.source([0, 1]), global_batch=1, num_steps=1, seed=0,
                                  shuffle=False, threads=1, prefetch=1, lengths=[1, 2, 3])
