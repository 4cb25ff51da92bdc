"""Two aligned views per example: identical response ids, labels on response tokens only."""

from __future__ import annotations

import json

import pytest
import torch

from kd.config import DataConfig
from kd.data import (MicroBatchSampler, build_datasets, collate, erase_coin, eval_batches, example_from_views,
                     fit_length, load_records, render_views, tokenize_dataset)
from kd.errors import DataError
from kd.models import load_tokenizer

REC = {"system": "Solve step by step and show every carry.", "prompt": "What is 1234 + 5678?",
       "response": "4+8=12 write 2 carry 1\nThe answer is 6912."}


@pytest.fixture(scope="module")
def chatml_tok():
    return load_tokenizer("builtin:tokenizer")


@pytest.fixture(scope="module")
def llama_tok(llama_tokenizer_dir):
    tok = load_tokenizer(str(llama_tokenizer_dir), chat_template="llama2")
    assert len(tok) == 32000
    return tok


@pytest.fixture(params=["chatml", "llama2"])
def tok(request, chatml_tok, llama_tok):
    return chatml_tok if request.param == "chatml" else llama_tok


def _views(tok, rec=REC, **kw):
    kw.setdefault("erase", True)
    kw.setdefault("generic_system", None)
    return render_views(rec, tok, **kw)


def test_response_ids_identical_and_labels_on_response_only(tok):
    for generic in (None, "You are a helpful assistant."):
        t, s, r = _views(tok, generic_system=generic)
        assert t != s and len(t) > len(s)  # the instruction is in the teacher prompt only
        text = tok.decode(r, skip_special_tokens=True)
        assert REC["response"].split("\n")[-1] in text and REC["system"] not in tok.decode(s)
        ex = example_from_views(t, s, r)
        b = collate([ex, ex], pad_id=0)
        # label at flat index i is the token right after position index[i], in both views
        for view in ("teacher", "student"):
            ids = b[f"{view}_input_ids"].flatten()
            assert torch.equal(ids[b[f"{view}_index"] + 1], b["labels"])
        assert b["labels"].tolist() == r + r


def test_not_erased_views_are_identical(tok):
    t, s, r = _views(tok, erase=False)
    assert t == s


def test_messages_form_matches_flat_form(chatml_tok):
    msgs = {"messages": [{"role": "system", "content": REC["system"]}, {"role": "user", "content": REC["prompt"]},
                         {"role": "assistant", "content": REC["response"]}]}
    assert _views(chatml_tok, msgs) == _views(chatml_tok, REC)


def test_record_without_system(chatml_tok):
    rec = {"prompt": "hi", "response": "hello"}
    t, s, r = _views(chatml_tok, rec, generic_system="You are a helpful assistant.")
    assert len(s) > len(t)  # the student gets the generic message, the teacher had none


def test_erasure_probability_is_seeded_per_example():
    coins = [erase_coin(7, i, 0.5) for i in range(2000)]
    assert coins == [erase_coin(7, i, 0.5) for i in range(2000)]
    assert 900 < sum(coins) < 1100
    assert all(erase_coin(7, i, 1.0) for i in range(10)) and not any(erase_coin(7, i, 0.0) for i in range(10))


def test_fit_length_cuts_prompt_left_first_then_response():
    t, s, r = list(range(100, 120)), list(range(200, 210)), list(range(10))
    assert fit_length(t, s, r, 64, 4) == (t, s, r)
    tt, ss, rr = fit_length(t, s, r, 16, 4)  # prompts cut from the left, response intact
    assert rr == r and tt == t[-6:] and ss == s[-6:]
    tt, ss, rr = fit_length(t, s, r, 10, 4)  # prompts at their floor, response cut from the right
    assert rr == r[:6] and tt == t[-4:] and ss == s[-4:]
    assert fit_length(t, s, r, 4, 4) is None  # nothing of the response fits


def _write(tmp_path, rows, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(p)


def test_dropped_examples_are_counted(tmp_path, chatml_tok):
    long = dict(REC, prompt="x " * 50)
    cfg = DataConfig(train_files=[_write(tmp_path, [REC, long])], max_length=16, min_prompt_tokens=16)
    ds, stats = tokenize_dataset(load_records(cfg.train_files), chatml_tok, cfg, seed=0)
    assert stats.examples == len(ds) == 0 and sum(stats.dropped.values()) == 2
    assert "dropped 2" in stats.summary("train")
    with pytest.raises(DataError, match="no training example survives"):
        build_datasets(cfg, chatml_tok, seed=0)


def test_empty_responses_and_prompts_are_dropped_and_counted(tmp_path, chatml_tok):
    rows = [REC, dict(REC, response="  "), dict(REC, prompt=" "), REC]
    cfg = DataConfig(train_files=[_write(tmp_path, rows)], eval_fraction=0.0)
    train, _, stats, _ = build_datasets(cfg, chatml_tok, 0)
    assert len(train) == 2 and stats.dropped == {"empty response": 1, "empty prompt": 1}
    assert "dropped 1 (empty prompt), 1 (empty response)" in stats.summary("train")
    only_bad = DataConfig(train_files=[_write(tmp_path, rows[1:3])], eval_fraction=0.0)
    with pytest.raises(DataError, match="no training example survives"):
        build_datasets(only_bad, chatml_tok, 0)


def test_empty_file_and_empty_eval_set_are_one_line_errors(tmp_path, chatml_tok):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="empty.jsonl: no records"):
        build_datasets(DataConfig(train_files=[str(empty)]), chatml_tok, 0)
    bad_eval = tmp_path / "eval.jsonl"
    bad_eval.write_text(json.dumps(dict(REC, response="")) + "\n")
    cfg = DataConfig(train_files=[_write(tmp_path, [REC, REC])], eval_files=[str(bad_eval)])
    with pytest.raises(DataError, match="no eval example survives.*data.eval_fraction=0"):
        build_datasets(cfg, chatml_tok, 0)


@pytest.mark.parametrize("rows, message", [
    ([REC, {"prompt": "p"}], r"d\.jsonl row 2: missing 'response'"),
    ([REC, {"prompt": "p", "response": 3}], r"row 2: not a string: 'response'"),
    ([REC, '{"prompt": "p", "response"'], r"d\.jsonl:2: invalid JSON"),
    ([REC, {"messages": [{"role": "user", "content": "q"}]}], r"row 2: the last message must be an assistant turn"),
])
def test_bad_rows_name_file_and_row(tmp_path, chatml_tok, rows, message):
    cfg = DataConfig(train_files=[_write(tmp_path, rows)], eval_fraction=0.0)
    with pytest.raises(DataError, match=message):
        build_datasets(cfg, chatml_tok, seed=0)


def test_missing_file_and_bad_suffix(tmp_path, chatml_tok):
    with pytest.raises(DataError, match="not found"):
        load_records([str(tmp_path / "nope.jsonl")])
    (tmp_path / "x.csv").write_text("a\n")
    with pytest.raises(DataError, match="unsupported file type"):
        load_records([str(tmp_path / "x.csv")])


def test_sampler_consumes_the_same_examples_per_step_whatever_the_split():
    n, seed = 50, 3

    def step_examples(mb, accum, world, step):
        out = set()
        for rank in range(world):
            s = MicroBatchSampler(n, mb, world, rank, seed, accum=accum)
            for k in range(step * accum, (step + 1) * accum):
                out |= set(s.indices(k))
        return out

    for step in range(12):  # crosses epoch boundaries
        ref = step_examples(8, 1, 1, step)
        assert len(ref) == 8
        assert step_examples(2, 4, 1, step) == ref == step_examples(4, 1, 2, step) == step_examples(2, 2, 2, step)


def test_eval_batches_give_every_rank_the_same_count(chatml_tok):
    ex = example_from_views([1, 2], [1], [3])
    ds = [ex] * 5
    per_rank = [list(eval_batches(ds, 2, 2, r, 0)) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 2
    assert sum(int(b["labels"].numel()) for bs in per_rank for b in bs) == 5  # no token counted twice


def test_columns_are_renamed_onto_the_schema(tmp_path, chatml_tok):
    rows = [{"system_prompt": REC["system"], "question": REC["prompt"], "response": REC["response"]}] * 2
    cfg = DataConfig(train_files=[_write(tmp_path, rows)], eval_fraction=0.0,
                     columns={"system": "system_prompt", "prompt": "question"})
    train, _, stats, _ = build_datasets(cfg, chatml_tok, seed=0)
    assert stats.examples == 2 and train[0]["teacher_ids"][: train[0]["teacher_starts"][0]] == _views(chatml_tok)[0]
    with pytest.raises(DataError, match="data.columns: no column 'nope'"):
        build_datasets(DataConfig(train_files=cfg.train_files, columns={"prompt": "nope"}), chatml_tok, seed=0)


def test_globs_and_directories_of_data_files_are_read_in_sorted_order(tmp_path):
    d = tmp_path / "data"
    (d / "sub").mkdir(parents=True)
    (d / ".hidden").mkdir()
    for path, n in ((d / "b.jsonl", 2), (d / "a.jsonl", 1), (d / "sub" / "c.jsonl", 3), (d / ".hidden" / "x.jsonl", 5)):
        path.write_text("".join(json.dumps(dict(REC, prompt=f"{path.stem}{i}")) + "\n" for i in range(n)))
    (d / "notes.txt").write_text("not data\n")
    want = ["a0", "b0", "b1", "c0", "c1", "c2"]
    assert load_records([str(d)])["prompt"] == want  # recursive, hidden skipped, other suffixes ignored
    assert load_records([str(d / "*.jsonl")])["prompt"] == want[:3]
    assert load_records([str(d / "**" / "*.jsonl")])["prompt"] == want
    with pytest.raises(DataError, match=r"no data file matches .*\*\.parquet"):
        load_records([str(d / "*.parquet")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: a directory with no data files"):
        load_records([str(tmp_path / "empty")])


def test_a_save_to_disk_directory_is_data_dataset_or_a_data_file(tmp_path, chatml_tok):
    import datasets

    rows = [dict(REC, prompt=f"q{i}") for i in range(6)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict(train=datasets.Dataset.from_list(rows[:4]),
                         test=datasets.Dataset.from_list(rows[4:])).save_to_disk(str(tmp_path / "dict"))
    assert load_records(None, str(tmp_path / "saved"))["prompt"] == [r["prompt"] for r in rows]
    assert load_records(None, str(tmp_path / "dict"), split="test")["prompt"] == ["q4", "q5"]
    assert load_records([str(tmp_path / "dict")], split="train")["_source"][0] == f"{tmp_path / 'dict'}[train]"
    cfg = DataConfig(dataset=str(tmp_path / "dict"), eval_split="test", eval_fraction=0.0)
    train, evald, stats, eval_stats = build_datasets(cfg, chatml_tok, seed=0)
    assert (stats.examples, eval_stats.examples) == (4, 2)


def test_a_file_that_is_not_utf8_names_its_line_and_column(tmp_path):
    good = json.dumps(REC) + "\n"
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes((good * 3 + json.dumps(dict(REC, prompt="caf\u00e9"), ensure_ascii=False) + "\n").encode("latin-1"))
    col = json.dumps(dict(REC, prompt="caf")).index("caf") + 4
    with pytest.raises(DataError, match=rf"latin1\.jsonl:4: not UTF-8 \(byte 0xe9 at column {col}\); save the file "
                                        r"as UTF-8"):
        load_records([str(bad)])
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"blank\.jsonl: no records \(the file is empty\)"):
        load_records([str(tmp_path / "blank.jsonl")])


def test_the_first_bad_row_in_file_order_is_named_whatever_the_shuffle(tmp_path, chatml_tok):
    rows = [{"prompt": f"q{i}"} for i in range(40)]  # every row lacks its response
    cfg = DataConfig(train_files=[_write(tmp_path, rows)], eval_fraction=0.25, shuffle=True, num_proc=2)
    with pytest.raises(DataError, match=r"d\.jsonl row 1: missing 'response'"):
        build_datasets(cfg, chatml_tok, seed=3)


def test_a_conversation_without_a_system_message_is_not_counted_as_erased(tmp_path, chatml_tok):
    rows = [dict(REC), {"prompt": REC["prompt"], "response": REC["response"]}]
    cfg = DataConfig(train_files=[_write(tmp_path, rows)], eval_fraction=0.0, erase_strategy="on")
    _, _, stats, _ = build_datasets(cfg, chatml_tok, seed=0)
    assert (stats.examples, stats.erased) == (2, 1)
