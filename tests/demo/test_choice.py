"""The many-valid-answers task (kd/demo/choice.py) and the entropy experiment's pipeline."""

from __future__ import annotations

import json
import random

import pytest

from conftest import ROOT
from kd.demo import choice
from kd.demo.choice_experiment import _choice_starts, ece, paired_ci


def test_problems_have_many_valid_answers_and_a_checkable_strategy():
    rng = random.Random(0)
    for strategy in choice.STRATEGIES:
        for _ in range(50):
            rec = choice.problem(rng, strategy)
            answers = {choice.sample_response(rec, rng) for _ in range(40)}
            assert len(answers) > 3  # not one gold string
            assert all(choice.is_valid(rec, a) and choice.response_strategy(a) == strategy for a in answers)
    rec = {"category": "fruit", "count": 3, "excluded": ["plum"], "strategy": "step_by_step"}
    ok = "Pick 3 fruits:\n1. apple\n2. pear\n3. lemon\nThe answers are apple, pear, lemon."
    assert choice.is_valid(rec, ok)
    assert not choice.is_valid(rec, ok.replace("lemon", "plum"))  # excluded
    assert not choice.is_valid(rec, ok.replace("lemon", "pear"))  # repeated
    assert not choice.is_valid(rec, ok.replace("lemon", "hammer"))  # another category
    assert not choice.is_valid(rec, "The answer is apple.")  # too few
    assert choice.response_strategy("The answer is apple.") == "direct"


def test_splits_are_distinct_disjoint_and_balanced():
    ev = choice.make_split(100, 1)
    tr = choice.make_split(400, 2, exclude={r["prompt"] for r in ev})
    assert len({r["prompt"] for r in tr}) == 400 and not {r["prompt"] for r in tr} & {r["prompt"] for r in ev}
    assert sum(r["strategy"] == "direct" for r in tr) == 200
    shipped = [json.loads(line) for line in open(ROOT / "data/choice/eval.jsonl")]
    assert all(choice.is_valid(r, r["response"]) for r in shipped)


def test_choice_tokens_ece_and_paired_intervals():
    text = "Pick 2 cows:\n1. cow\n2. goat\nThe answers are cow, goat."
    assert sorted(text[i:i + 3] for i in _choice_starts(text)) == ["cow", "goa"]
    assert ["duck"] == ["The answer is duck."[i:i + 4] for i in _choice_starts("The answer is duck.")]
    assert ece([0.9] * 10, [True] * 9 + [False]) == pytest.approx(0.0)
    assert ece([0.9] * 10, [True] * 5 + [False] * 5) == pytest.approx(0.4)
    m, lo, hi = paired_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    assert m == 3.0 and lo == pytest.approx(3.0 - 2.776 * 1.5811 / 5 ** 0.5, rel=1e-4) and hi > m


def test_two_seed_smoke_run_of_the_whole_pipeline(tmp_path):
    """Every arm x 2 sizes x 2 seeds, miniature: the pipeline runs and the report is complete
    (not the result)."""
    from kd.demo.experiment import main

    report = tmp_path / "results-entropy.md"
    main(["--config", "configs/experiment/entropy.yaml", "--seeds", "2", "--sizes", "16,32", "--max-steps", "2",
          "--eval-limit", "6", "--max-new-tokens", "12", "--out", str(tmp_path / "work"), "--report", str(report),
          "--jobs", "2"])
    text = report.read_text()
    assert "## Protocol (written before any student was evaluated)" in text and "(results pending)" not in text
    for label in ("(a) CE on teacher samples", "(b) logit KD + CE", "(c) on-policy KD", "(d) (b) without erasure"):
        assert text.count(f"| {label} |") == 2  # one row per size
    assert "| kd − ce | 16 |" in text and "| onpolicy − ce | 32 |" in text
    assert "nats at choice tokens" in text and (tmp_path / "results-entropy.png").is_file()
    results = json.loads((tmp_path / "work" / "results.json").read_text())
    assert len(results["runs"]) == 16
