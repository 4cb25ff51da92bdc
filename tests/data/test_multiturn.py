"""Multi-turn conversations: every assistant turn a target, its ids identical in the teacher and the
student view whatever the system message, for ChatML, Llama-2 and tokenizer-style Jinja templates
(Llama-3 headers; Qwen's default system message); formats (ShareGPT, save_to_disk); the length
policy; the on-disk store; file order kept without shuffling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kd.config import DataConfig
from kd.data import build_datasets, collate, conversation_rows, render_views
from kd.errors import DataError
from kd.models import load_tokenizer

SYSTEM = "Solve step by step and show every carry."
TURNS = [("What is 12 + 30?", "12 + 30 = 42."), ("And 42 + 8?", "42 + 8 = 50, carry 1."),
         ("Now double it.", "50 doubled is 100.")]
CONV = [dict(role="system", content=SYSTEM)] + [dict(role=r, content=c) for u, a in TURNS
                                                 for r, c in (("user", u), ("assistant", a))]

LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
QWEN = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are Qwen, a helpful assistant.<|im_end|>\n"
        "{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _llama3(llama_dir):
    tok = load_tokenizer(str(llama_dir), chat_template=LLAMA3)
    tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    return tok


TEMPLATES = {  # name -> (tokenizer factory, end-of-turn marker)
    "chatml": (lambda d: load_tokenizer("builtin:tokenizer"), "<|im_end|>"),
    "llama2": (lambda d: load_tokenizer(str(d), chat_template="llama2"), "</s>"),
    "llama3-jinja": (_llama3, "<|eot_id|>"),
    "qwen-jinja": (lambda d: load_tokenizer("builtin:tokenizer", chat_template=QWEN), "<|im_end|>"),
}


@pytest.mark.parametrize("template", sorted(TEMPLATES))
@pytest.mark.parametrize("generic", [None, "You are a helpful assistant."])
def test_every_assistant_turn_is_a_target_with_identical_ids_in_both_views(template, generic,
                                                                            llama_tokenizer_dir):
    make, marker = TEMPLATES[template]
    tok = make(llama_tokenizer_dir)
    (row,), how = conversation_rows({"messages": CONV}, tok, erase=True, generic_system=generic,
                                  targets="all_assistant", max_length=4096, min_prompt=8)
    assert how == {"truncated": False, "turns_dropped": 0, "per_turn": False} and len(row["target_lens"]) == 3
    assert SYSTEM in tok.decode(row["teacher_ids"]) and SYSTEM not in tok.decode(row["student_ids"])
    for (_, answer), ts, ss, n in zip(TURNS, row["teacher_starts"], row["student_starts"], row["target_lens"]):
        span = row["teacher_ids"][ts:ts + n]
        assert span == row["student_ids"][ss:ss + n]
        text = tok.decode(span)
        assert answer in text and text.rstrip().endswith(marker)  # the end-of-turn marker is trained too
        assert "user" not in text and TURNS[0][0] not in text  # nothing of the prompt
    b = collate([row, row], tok.pad_token_id)
    assert b["labels"].numel() == 2 * row["n_response"]
    for view in ("teacher", "student"):  # position index[i] predicts labels[i], in both views
        flat = b[f"{view}_input_ids"].flatten()
        assert flat[b[f"{view}_index"] + 1].tolist() == b["labels"].tolist()
    (last,), _ = conversation_rows({"messages": CONV}, tok, erase=True, generic_system=generic, targets="last",
                                 max_length=4096, min_prompt=8)
    t, s, r = render_views({"messages": CONV}, tok, erase=True, generic_system=generic)
    assert last["teacher_ids"] == t + r and last["student_ids"] == s + r and last["target_lens"] == [len(r)]


def test_long_conversations_drop_oldest_exchanges_first_then_cut_from_the_left():
    tok = load_tokenizer("builtin:tokenizer")
    (full,), _ = conversation_rows({"messages": CONV}, tok, erase=True, generic_system=None, targets="all_assistant",
                                 max_length=4096, min_prompt=8)
    size = len(full["teacher_ids"])
    (row,), how = conversation_rows({"messages": CONV}, tok, erase=True, generic_system=None,
                                  targets="all_assistant", max_length=size - 5, min_prompt=8)
    assert how == {"truncated": True, "turns_dropped": 1, "per_turn": False} and len(row["target_lens"]) == 2
    assert row["target_lens"] == full["target_lens"][1:]  # the newest two turns, whole
    assert SYSTEM in tok.decode(row["teacher_ids"])  # the instruction survives
    (row,), how = conversation_rows({"messages": CONV}, tok, erase=True, generic_system=None,
                                  targets="all_assistant", max_length=30, min_prompt=8)
    assert how["turns_dropped"] == 2 and len(row["target_lens"]) == 1 and len(row["teacher_ids"]) == 30


def _write(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_sharegpt_and_save_to_disk_records(tmp_path):
    import datasets

    tok = load_tokenizer("builtin:tokenizer")
    role = {"system": "system", "user": "human", "assistant": "gpt"}
    share = [{"conversations": [{"from": role[m["role"]], "value": m["content"]} for m in CONV]}] * 4
    cfg = DataConfig(train_files=[_write(tmp_path / "share.jsonl", share)], eval_fraction=0.0, store="off")
    train, _, stats, _ = build_datasets(cfg, tok, 0)
    (ref,), _ = conversation_rows({"messages": CONV}, tok, erase=True, generic_system=None, targets="all_assistant",
                                max_length=1024, min_prompt=8)
    assert stats.examples == 4 and train[0]["student_ids"] == ref["student_ids"]
    assert stats.target_tokens == 4 * ref["n_response"]
    datasets.Dataset.from_list(share).save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(share), "test": datasets.Dataset.from_list(share[:2])}) \
        .save_to_disk(str(tmp_path / "dd"))
    train, _, _, _ = build_datasets(DataConfig(train_files=[str(tmp_path / "ds")], eval_fraction=0.0, store="off"),
                                    tok, 0)
    assert train[0]["teacher_ids"] == ref["teacher_ids"]
    train, evald, _, _ = build_datasets(DataConfig(train_files=[str(tmp_path / "dd")], eval_files=[str(tmp_path / "dd")],
                                                   store="off"), tok, 0)
    assert (len(train), len(evald)) == (4, 2)
    with pytest.raises(DataError, match=r"dd: a DatasetDict without a 'nope' split \(has train, test\)"):
        build_datasets(DataConfig(train_files=[str(tmp_path / "dd")], train_split="nope", store="off"), tok, 0)


def test_missing_fields_name_the_original_row_and_suggest_columns(tmp_path):
    tok = load_tokenizer("builtin:tokenizer")
    rows = [{"system_prompt": "s", "question": f"q{i}", "response": "r"} for i in range(6)]
    cfg = DataConfig(train_files=[_write(tmp_path / "orca.jsonl", rows)], eval_fraction=0.5, store="off")
    with pytest.raises(DataError, match=r"orca.jsonl row [1-6]: missing 'prompt'.*columns question, response, "
                                        r"system_prompt: map them with data.columns=\{system: system_prompt, "
                                        r"prompt: question\}"):
        build_datasets(cfg, tok, 0)


def test_without_shuffle_the_training_set_keeps_file_order(tmp_path):
    tok = load_tokenizer("builtin:tokenizer")
    rows = [{"prompt": f"What is {i} + 1?", "response": f"{i + 1}"} for i in range(20)]
    cfg = DataConfig(train_files=[_write(tmp_path / "d.jsonl", rows)], eval_fraction=0.25, shuffle=False, store="off")
    train, evald, _, _ = build_datasets(cfg, tok, 0)
    order = [int(tok.decode(e["student_ids"]).split("What is ")[1].split(" ")[0]) for e in train]
    assert order == sorted(order) and len(train) == 15 and len(evald) == 5


def test_the_store_is_built_once_and_rebuilt_on_change(tmp_path, monkeypatch):
    monkeypatch.setenv("KD_HOME", str(tmp_path / "home"))
    tok = load_tokenizer("builtin:tokenizer")
    data = _write(tmp_path / "d.jsonl", [{"messages": CONV}] * 6)
    said = []
    cfg = DataConfig(train_files=[data], eval_fraction=0.34)
    a = build_datasets(cfg, tok, 0, log=said.append)
    b = build_datasets(cfg, tok, 0, log=said.append)
    assert said[0].startswith("tokenised views stored in") and said[1].startswith("tokenised views read from")
    assert b[0].cache_files and all(f["filename"].startswith(str(tmp_path / "home")) for f in b[0].cache_files)
    assert a[0][:] == b[0][:] and a[1][:] == b[1][:] and b[2].examples == a[2].examples
    build_datasets(DataConfig(train_files=[data], eval_fraction=0.34, targets="last"), tok, 0, log=said.append)
    assert said[2].startswith("tokenised views stored in")
    assert len(list((tmp_path / "home" / "tokenised").iterdir())) == 2


def test_a_conversation_that_opens_with_the_assistant_is_one_line(tmp_path):
    rows = [{"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "Hello!"},
                          {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    cfg = DataConfig(train_files=[_write(tmp_path / "d.jsonl", rows)], eval_fraction=0.0, store="off")
    with pytest.raises(DataError, match=r"d.jsonl row 1: message 2 is an assistant turn before any user message"):
        build_datasets(cfg, load_tokenizer("builtin:tokenizer"), 0)
