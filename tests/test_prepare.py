"""`fedge prepare`: the base model's one-off work is done before the first run."""

from fedge import models
from fedge.cli import main
from tests.conftest import tiny_scenario_overrides


def test_prepare_leaves_the_base_hash_a_run_will_read(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    # Prepare: an empty fedge cache
    monkeypatch.setenv("FEDGE_CACHE", str(tmp_path / "cache"))
    overrides = [a for o in tiny_scenario_overrides(tiny_llama_dir) for a in ("--set", o)]
    # Execute
    rc = main(["prepare", "default", *overrides])
    # Assert: the hash book is written, and it holds the hash of the weights (oracle: hashing them afresh)
    books = list((tmp_path / "cache" / "base-hashes").glob("*.txt"))
    fresh = models.base_hash(models.load_base(str(tiny_llama_dir)).model)
    assert rc == 0 and len(books) == 1 and books[0].read_text().strip() == fresh
    assert fresh[:16] in capsys.readouterr().out


def test_prepare_names_a_bad_field(capsys):
    # Execute
    rc = main(["prepare", "default", "--set", "train.lr=-1"])
    # Assert: a usage error that names the field
    assert rc == 2 and "train.lr" in capsys.readouterr().err
