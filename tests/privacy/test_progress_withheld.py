"""Under user-level DP the live progress view does not release the realized cohort size (#11.4)."""


import json

from fedge import progress


def test_progress_events_carry_no_reply_counts_when_withheld(tmp_path):
    """The live view's "replies received / expected" is the realized cohort size: under
    user-level DP the server withholds it from listeners and from progress.json."""

    # Prepare: a listener and the progress file, as `fedge simulate` / `fedge server` use them
    seen = []
    unsubscribe = progress.subscribe(seen.append)
    progress.write_to(tmp_path / "progress.json")
    try:
        # Execute: one event with counts published, one withheld
        progress.publish("train", 7, 10)
        progress.withhold_counts(True)
        progress.publish("train", 9, 10, steps=36)
        on_disk = json.loads((tmp_path / "progress.json").read_text())
    finally:
        progress.withhold_counts(False)
        progress.write_to(None)
        unsubscribe()
    # Assert
    assert (seen[0]["received"], seen[0]["expected"]) == (7, 10)
    assert (seen[1]["received"], seen[1]["expected"]) == (0, 0)
    assert (on_disk["received"], on_disk["expected"], on_disk["steps"]) == (0, 0, 0) and on_disk["phase"] == "train"
