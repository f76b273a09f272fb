"""The end-of-run sample: which held-out prompts are shown, and how answers are trimmed."""

from __future__ import annotations

import datasets

from server.samples import pick_prompts, tidy


def _holdout():
    rows = [(c, i) for c in ("ai", "food", "trivia") for i in range(4)]
    return datasets.Dataset.from_dict({"prompt": [f"{c} q{i}" for c, i in rows],
                                       "response": [f"{c} a{i}" for c, i in rows],
                                       "category": [c for c, _ in rows]})


def test_prompts_take_each_category_in_turn_and_follow_the_seed():
    ds = _holdout()
    # Execute
    five = pick_prompts(ds, 5, seed=0)
    # Assert: every category before any repeats; the reference is the record's own response
    cats = [s["source"].rsplit(" ", 1)[1] for s in five]
    assert sorted(cats[:3]) == ["ai", "food", "trivia"] and len(set(cats[3:])) == 2
    for s in five:
        assert s["reference"] == s["prompt"].replace(" q", " a")
    assert len({s["prompt"] for s in five}) == 5
    assert pick_prompts(ds, 5, seed=0) == five  # same seed, same sample
    assert [s["prompt"] for s in pick_prompts(ds, 12, seed=1)] != [s["prompt"] for s in pick_prompts(ds, 12, seed=0)]
    assert len(pick_prompts(ds, 50, seed=0)) == len(ds) and pick_prompts(ds, 0, seed=0) == []


def test_an_answer_cut_by_the_token_limit_ends_at_a_sentence_or_word():
    assert tidy("Paris is the capital.\n It has many", cut=True) == "Paris is the capital."
    assert tidy("Paris is the capital of Fra", cut=True) == "Paris is the capital of …"
    assert tidy("Short  answer\nhere", cut=False) == "Short answer here"  # ended on its own: kept whole


def test_only_the_branches_groups_are_sampled():
    ds = _holdout()
    picked = pick_prompts(ds, 6, seed=0, column="category", only={"ai", "trivia"})
    assert sorted(s["source"].rsplit(" ", 1)[1] for s in picked) == ["ai"] * 3 + ["trivia"] * 3
