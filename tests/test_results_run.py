"""One tiny federation through `fedge simulate` (Flower's simulation engine): what a person sees.

Round lines on stdout (not a terminal: no bar), live progress events from the real message
exchange, plots embedded in report.md, TensorBoard events for every round, and the end-of-run
sample: held-out prompts whose per-answer losses match a recomputation from the saved adapter.
"""

from __future__ import annotations

import json

import pytest

from fedge import config as fcfg
from fedge import progress
from tests.conftest import tiny_scenario_overrides

pytestmark = pytest.mark.slow


def test_simulate_shows_progress_plots_tracking_and_samples(tmp_path, tiny_llama_dir, capsys):
    from fedge.cli import main

    # Prepare
    sets = tiny_scenario_overrides(tiny_llama_dir) + [
        "train.lr=0.01", "train.local_steps=4", "tracking.tensorboard=true", "sample.num_prompts=2",
        "sample.max_new_tokens=8", f"run_root={tmp_path}"]
    run = tmp_path / "run"
    events = []
    stop = progress.subscribe(events.append)
    # Execute
    try:
        rc = main(["simulate", "--run-dir", str(run), *[a for s in sets for a in ("--set", s)]])
    finally:
        stop()
    out = capsys.readouterr().out
    # Assert: plain round lines, one per round
    assert rc == 0
    assert [ln.split("|")[0].split()[1] for ln in out.splitlines() if ln.startswith("round ")] == ["0", "1", "2"]
    # Live progress came from the real exchange: each train phase counted up to the 3 clients
    train = [e for e in events if e["phase"] == "train"]
    assert {e["expected"] for e in train} == {3}
    assert sum(1 for e in train if e["received"] == 0) == 2 and sum(1 for e in train if e["received"] == 3) == 2
    # Plots in the run, embedded in report.md
    report = (run / "report.md").read_text()
    for stem in ("heldout_loss", "train_loss", "bytes", "rejected"):
        assert (run / "plots" / f"{stem}.png").stat().st_size > 1000 and f"(plots/{stem}.png)" in report
    # TensorBoard: every round's central loss, equal to metrics.jsonl
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert {e.step: e.value for e in acc.Scalars("central_loss")} == \
        pytest.approx({r["round"]: r["central_loss"] for r in rows})
    # Samples: 2 held-out prompts (+ the configured one), drawn from the global held-out set
    summary = json.loads((run / "summary.json").read_text())
    held = [s for s in summary["samples"] if s["reference"] is not None]
    assert len(held) == 2 and summary["samples"][-1]["prompt"] == "hello"
    from fedge.data import federated_split
    try:
        from fedge.data import data_args
    except ImportError:  # older layout
        from clients.cache import data_args

    cfg = fcfg.load(run / "config.yaml")
    holdout = federated_split(**data_args(cfg)).global_holdout
    pairs = set(zip(holdout["prompt"], holdout["response"]))
    assert all((s["prompt"], s["reference"]) in pairs for s in held)
    # ... and each loss is the reference's loss recomputed from the base / the saved PEFT adapter
    import datasets
    from peft import PeftModel

    from fedge import models
    from fedge.data.tokenize import encode_dataset
    from fedge.train import evaluate

    base = models.load_base(str(tiny_llama_dir))
    pad = int(base.tokenizer.pad_token_id)

    def loss(model, s):
        ex = encode_dataset(base.tokenizer, datasets.Dataset.from_dict({"prompt": [s["prompt"]],
                                                                        "response": [s["reference"]]}),
                            task="causal-lm", max_length=cfg.model.max_length)
        return evaluate(model, ex, task="causal-lm", pad_id=pad)["loss"]

    base_losses = [loss(base.model, s) for s in held]
    tuned = PeftModel.from_pretrained(base.model, run / "adapter")
    for s, b in zip(held, base_losses):
        assert s["base_loss"] == pytest.approx(b, rel=1e-4)
        assert s["finetuned_loss"] == pytest.approx(loss(tuned, s), rel=1e-4)
    assert "reference:" in out and "[loss of the reference" in out
