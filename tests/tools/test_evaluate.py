"""kd.evaluate: token and generation metrics on any record format, for any model source."""

from __future__ import annotations

import json
import re

import pytest

from conftest import ROOT, run_cli, tiny_overrides
from kd.tools import evaluate as ev

EVAL = ROOT / "data/demo/eval.jsonl"
REGEX = r"answer is (-?\d+)"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def records(n: int) -> list[dict]:
    with open(EVAL) as fh:
        return [json.loads(line) for _, line in zip(range(n), fh)]


def as_messages(rec: dict) -> dict:
    return {"messages": [{"role": "system", "content": rec["system"]}, {"role": "user", "content": rec["prompt"]},
                         {"role": "assistant", "content": rec["response"]}]}


def summary(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_the_teacher_against_itself_on_plain_and_messages_records(tmp_path, capsys):
    recs = records(12)
    plain, chats = tmp_path / "plain.jsonl", tmp_path / "chats.jsonl"
    plain.write_text("".join(json.dumps(r) + "\n" for r in recs))
    chats.write_text("".join(json.dumps(as_messages(r)) + "\n" for r in recs))
    common = ["--model", "builtin:tiny-teacher", "--teacher", "builtin:tiny-teacher", "--system", "strategy",
              "--answer-regex", REGEX, "--max-new-tokens", "60", "--batch-size", "4"]
    ev.main([*common, "--data", str(plain), "--output", str(tmp_path / "gens.jsonl")])
    out = capsys.readouterr().out
    assert "| top-1 agreement with the teacher | 100.0% |" in out
    a = json.loads(out.strip().splitlines()[-1])
    assert a["tokens"]["forward_kl"] == pytest.approx(0.0, abs=1e-6) and a["tokens"]["top1_agreement"] == 1.0
    assert a["tokens"]["tokens"] > 12 and a["records"] == 12
    assert a["generation"]["exact_match"] > 0.2  # the demo teacher solves some of its own task in 60 tokens
    rows = [json.loads(line) for line in open(tmp_path / "gens.jsonl")]
    assert len(rows) == 12 and all(r["reference_answer"] == re.search(REGEX, rec["response"]).group(1)
                                   for r, rec in zip(rows, recs))
    assert a["generation"]["exact_match"] == sum(r["match"][0] for r in rows) / 12
    ev.main([*common, "--data", str(chats)])
    b = summary(capsys)
    assert b["tokens"] == a["tokens"] and b["generation"] == a["generation"]


def test_a_checkpoint_and_its_export_score_alike(small_data, tmp_path, capsys):
    out = tmp_path / "run"
    run_cli(["--config", "configs/demo.yaml", *tiny_overrides(small_data, out, **{"train.max_steps": 2})])
    common = ["--data", small_data["eval"], "--no-generate", "--teacher", "builtin:tiny-teacher"]
    ev.main(["--model", str(out / "student"), *common])
    exported = summary(capsys)
    ev.main(["--model", str(out), *common])  # the run directory: its latest checkpoint
    ckpt = summary(capsys)
    assert "step 2" in ckpt["model"]
    assert ckpt["tokens"]["ce"] == pytest.approx(exported["tokens"]["ce"], rel=1e-6)
    assert ckpt["tokens"]["forward_kl"] == pytest.approx(exported["tokens"]["forward_kl"], rel=1e-6)
    # sampling: several answers per record, any-of-n reported
    ev.main(["--model", str(out / "student"), "--data", small_data["eval"], "--no-tokens", "--limit", "3",
             "--temperature", "1.0", "--num-samples", "2", "--max-new-tokens", "4"])
    s = summary(capsys)
    assert s["num_samples"] == 2 and "any_match" in s["generation"] and "tokens" not in s


@pytest.mark.parametrize("content,args,message", [
    ('{"prompt": "x"}\n', [], ":1: missing 'response'"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', [], ":1: the last message must be an assistant turn"),
    ('{"prompt": "x", "response": "y"}\n', ["--answer-regex", "(("], "--answer-regex '((': missing )"),
    ('{"prompt": "x", "response": "y"}\n', ["--no-generate", "--no-tokens"], "nothing to measure"),
    ('{"prompt": "x", "response": "y"}\n', ["--top-p", "0"], "argument --top-p: must be in (0, 1]"),
])
def test_user_errors_are_one_line(tmp_path, capsys, content, args, message):
    src = tmp_path / "in.jsonl"
    src.write_text(content)
    with pytest.raises(SystemExit) as e:
        ev.main(["--model", "builtin:tiny-teacher", "--data", str(src), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kd: error: ") and message in err[0], err


def test_a_datasetdict_directory_is_scored_on_the_split_asked_for(tmp_path, capsys):
    import datasets

    recs = records(10)
    datasets.DatasetDict(train=datasets.Dataset.from_list(recs[:7]),
                         test=datasets.Dataset.from_list(recs[7:])).save_to_disk(str(tmp_path / "dd"))
    common = ["--model", "builtin:tiny-teacher", "--data", str(tmp_path / "dd"), "--no-generate"]
    ev.main(common)  # --split defaults to test
    out = capsys.readouterr().out
    a = json.loads(out.strip().splitlines()[-1])
    assert a["records"] == 3 and f"{tmp_path / 'dd'}[test]" in out
    ev.main([*common, "--split", "train"])
    assert summary(capsys)["records"] == 7
    with pytest.raises(SystemExit):
        ev.main([*common, "--split", "validation"])
    assert "a DatasetDict without a 'validation' split (has train, test)" in capsys.readouterr().err
