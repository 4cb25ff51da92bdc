"""kd.accuracy: exact-match scoring and buckets, token metrics plumbing, the CLI end to end."""

from __future__ import annotations

import json
import math
import subprocess
from collections import Counter

import pytest

from conftest import PY, ROOT
from kd.demo import accuracy as acc
from kd.demo import tasks

EVAL = ROOT / "data/demo/eval.jsonl"


def eval_records(n: int | None = None) -> list[dict]:
    recs = [json.loads(line) for line in open(EVAL)]
    return recs if n is None else recs[:n]


# --------------------------------------------------------------------------- scoring


def test_gold_responses_score_100_percent_with_right_bucket_counts():
    recs = eval_records()
    res = acc.score(recs, [r["response"] for r in recs])
    assert (res["n"], res["correct"], res["answered"], res["accuracy"]) == (len(recs), len(recs), len(recs), 1.0)
    cells = Counter(f"{r['family']}/{r['strategy']}" for r in recs)
    assert {k: v["n"] for k, v in res["by_bucket"].items()} == dict(cells)
    assert list(res["by_bucket"]) == [f"{f}/{s}" for f in tasks.FAMILIES for s in tasks.STRATEGIES]
    diffs = Counter(str(r["difficulty"]) for r in recs)
    assert {k: v["n"] for k, v in res["by_difficulty"].items()} == dict(diffs)
    assert [int(k) for k in res["by_difficulty"]] == sorted(int(k) for k in diffs)  # numeric, not "10" < "2"
    assert all(c["accuracy"] == 1.0 for c in [*res["by_bucket"].values(), *res["by_difficulty"].values()])
    assert res["strategy_match"] == 1.0 and all(c["strategy_match"] == 1.0 for c in res["by_bucket"].values())


def test_strategy_match_is_independent_of_correctness():
    recs = eval_records(80)
    swapped = []
    for r in recs:  # the other strategy's form, right answer: correct but the wrong strategy
        if r["strategy"] == "direct":
            swapped.append(f"{tasks.STEP_HEADERS[r['family']]}...\nThe answer is {r['answer']}.")
        else:
            swapped.append(f"The answer is {r['answer']}.")
    res = acc.score(recs, swapped)
    assert res["accuracy"] == 1.0 and res["strategy_match"] == 0.0
    wrong_but_chosen = [r["response"].replace(f"is {r['answer']}.", f"is {int(r['answer']) + 1}.") for r in recs]
    res = acc.score(recs, wrong_but_chosen)
    assert res["accuracy"] == 0.0 and res["strategy_match"] == 1.0
    assert all(c["strategy_match"] == 1.0 for c in res["by_bucket"].values())


def test_corrupted_responses_are_counted_per_bucket():
    recs = eval_records(40)
    texts, expect = [], Counter()
    for i, r in enumerate(recs):
        kind = i % 4
        if kind == 0:  # right
            texts.append(r["response"])
            expect[r["family"], r["strategy"]] += 1
        elif kind == 1:  # wrong final number
            right, wrong = f"The answer is {r['answer']}.", f"The answer is {int(r['answer']) + 1}."
            texts.append(r["response"].replace(right, wrong))
        elif kind == 2:  # no answer line at all
            texts.append("I am not sure.")
        else:  # right answer restated, then a wrong one: the last answer counts
            texts.append(f"The answer is {r['answer']}. The answer is {int(r['answer']) + 7}.")
    res = acc.score(recs, texts)
    assert res["correct"] == sum(expect.values()) == 10
    assert res["answered"] == 30 and res["accuracy"] == pytest.approx(0.25)
    for (family, strategy), n in Counter((r["family"], r["strategy"]) for r in recs).items():
        cell = res["by_bucket"][f"{family}/{strategy}"]
        assert (cell["n"], cell["correct"]) == (n, expect[family, strategy])
        assert cell["accuracy"] == pytest.approx(expect[family, strategy] / n)
    assert sum(c["correct"] for c in res["by_difficulty"].values()) == 10


def test_score_handles_missing_optional_fields_and_rejects_length_mismatch():
    recs = [{"prompt": "p", "family": "count", "answer": "3"}]
    res = acc.score(recs, ["The answer is 3."])
    assert res["by_bucket"] == {"count/-": {"n": 1, "correct": 1, "accuracy": 1.0, "strategy_match": 0.0}}
    assert list(res["by_difficulty"]) == ["-"]
    with pytest.raises(ValueError):
        acc.score(recs, [])


def test_format_table_lists_every_bucket():
    recs = eval_records(12)
    res = dict(acc.score(recs, [r["response"] for r in recs]), model="m", system="generic")
    table = acc.format_table(res)
    assert "| all | 12 | 12 | 100.0% | 100.0% |" in table
    for k in res["by_bucket"]:
        assert f"| {k} |" in table
    assert "forward KL" not in table


# --------------------------------------------------------------------------- models


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core box: one intra-op thread avoids oversubscription stalls."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    """(tokenizer, teacher, student) builtin models on CPU, fp32."""
    import torch

    from kd.tools.generation import load_for_generation

    tok, teacher = load_for_generation("builtin:tiny-teacher", "float32", torch.device("cpu"))
    _, student = load_for_generation("builtin:tiny-student", "float32", torch.device("cpu"))
    return tok, teacher, student


def test_token_metrics_of_a_model_against_itself(tiny):
    """Same model, same view: KL 0 and full top-1 agreement; tokens = the gold response tokens."""
    from kd.data import render_views

    tok, teacher, _ = tiny
    recs = eval_records(5)
    tm = acc.token_metrics(teacher, teacher, tok, recs, "strategy", batch_size=2)
    n = sum(len(render_views(r, tok, erase=False, generic_system=None)[2]) for r in recs)
    assert tm["tokens"] == n
    assert tm["forward_kl"] == pytest.approx(0.0, abs=1e-5) and tm["top1_agreement"] == 1.0
    assert tm["ppl"] == pytest.approx(math.exp(tm["ce"]))
    # an erased student view makes the two models see different prompts: divergence appears
    assert acc.token_metrics(teacher, teacher, tok, recs, "none", batch_size=2)["forward_kl"] > 1e-4


def test_evaluate_accuracy_api(tiny):
    tok, _, student = tiny
    recs = eval_records(3)
    res = acc.evaluate_accuracy(student, tok, recs, "generic", batch_size=2, max_new_tokens=4)
    assert res["n"] == 3 and 0 <= res["correct"] <= 3 and sum(c["n"] for c in res["by_bucket"].values()) == 3


def test_cli_end_to_end_prints_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "acc.json"
    acc.main(["--model", "builtin:tiny-student", "--data", str(EVAL), "--system", "generic", "--limit", "8",
              "--batch-size", "4", "--max-new-tokens", "8", "--teacher", "builtin:tiny-teacher", "--json", str(out)])
    stdout = capsys.readouterr().out
    assert "| bucket | n | correct | accuracy |" in stdout and "| all | 8 |" in stdout
    assert "| difficulty |" in stdout and "forward KL (T=1)" in stdout
    res = json.loads(out.read_text())
    assert (res["n"], res["system"], res["model"]) == (8, "generic", "builtin:tiny-student")
    assert sum(c["n"] for c in res["by_bucket"].values()) == 8
    assert sum(c["n"] for c in res["by_difficulty"].values()) == 8
    tm = res["token_metrics"]
    assert tm["tokens"] > 0 and tm["forward_kl"] >= 0 and 0 <= tm["top1_agreement"] <= 1


# --------------------------------------------------------------------------- errors


def test_cli_unknown_family_is_one_line_error(tmp_path):
    bad = tmp_path / "eval.jsonl"
    rows = [eval_records(1)[0], {"prompt": "p", "family": "chess", "answer": "1"}]
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = subprocess.run([PY, "-m", "kd.accuracy", "--model", "builtin:tiny-student", "--data", str(bad),
                          "--system", "none"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2 and res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"kd: error: {bad}:2: unknown family 'chess'")


@pytest.mark.parametrize(
    "record,args,message",
    [
        ({"prompt": "p", "family": "count"}, [], ":1: missing 'answer'"),
        ({"prompt": "p", "family": "count", "answer": "1"}, ["--teacher", "builtin:tiny-teacher"],
         ":1: missing 'response'"),
        ({"prompt": "p", "family": "count", "answer": "1"}, ["--model", "/no/such/model"], "no such directory: /no/such/model"),
        (None, [], "input file not found"),
    ],
)
def test_cli_user_errors_exit_2_with_one_line(tmp_path, capsys, record, args, message):
    data = tmp_path / "eval.jsonl"
    if record is not None:
        data.write_text(json.dumps(record) + "\n")
    with pytest.raises(SystemExit) as e:
        acc.main(["--model", "builtin:tiny-student", "--data", str(data), "--system", "strategy", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kd: error: ") and message in err[0]


def test_cli_requires_system(capsys):
    with pytest.raises(SystemExit) as e:
        acc.main(["--model", "builtin:tiny-student", "--data", str(EVAL)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--system" in err[0]
