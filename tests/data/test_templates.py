"""The real chat templates of today's popular students (the Jinja text trl ships, originals and
their *_training variants): every assistant turn is trained, and with data.targets=last the last
one, in both views with the instruction erased; decoding the labels gives exactly each answer as
the template renders it at that point of the conversation, through its end-of-turn marker."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from kd import templates
from kd.data import collate, conversation_rows
from kd.errors import DataError
from kd.models import load_tokenizer

TRL_TEMPLATES = Path(importlib.util.find_spec("trl").submodule_search_locations[0]) / "chat_templates"

SYSTEM = "Solve step by step and show every carry."
PLAIN = [("What is 12 + 30?", "12 + 30 = 42."), ("And 42 + 8?", "42 + 8 = 50, carry 1."),
         ("Now double it.", "50 doubled is 100.")]
REASONED = [("What is 12 + 30?", "<think>\nAdd the tens.\n</think>\n\n12 + 30 = 42."),
            ("And 42 + 8?", "<think>\nCarry the one.\n</think>\n\n42 + 8 = 50.")]

# each family's special tokens as its own tokenizer has them (added to the demo tokenizer)
TOKENS = {
    "qwen3": dict(eos_token="<|im_end|>", extra=["<|im_start|>", "<think>", "</think>"]),
    "phi3": dict(eos_token="<|endoftext|>", extra=["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]),
    "gemma3": dict(bos_token="<bos>", eos_token="<eos>", extra=["<start_of_turn>", "<end_of_turn>"]),
    "deepseek_r1_distill": dict(bos_token="<｜begin▁of▁sentence｜>", eos_token="<｜end▁of▁sentence｜>",
                                extra=["<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"]),
}

R1_EOS = "<｜end▁of▁sentence｜>"
# template file -> (conversation, what each trained turn decodes to, one row per turn?)
CASES = {
    # the original drops earlier turns' <think> blocks: each turn is its own row, as at inference
    "qwen3": (PLAIN, lambda a: f"<think>\n\n</think>\n\n{a}<|im_end|>", True),
    "qwen3_training": (PLAIN, lambda a: f"<think>\n\n</think>\n\n{a}<|im_end|>", False),
    # <|end|> ends a turn; the eos the template adds after the whole conversation is not trained
    "phi3": (PLAIN, lambda a: f"{a}<|end|>", False),
    "phi3_training": (PLAIN, lambda a: f"{a}<|end|>", False),
    # the system message is folded into the first user turn, which erasure removes with it
    "gemma3": (PLAIN, lambda a: f"{a}<end_of_turn>", False),
    "gemma3_training": (PLAIN, lambda a: f"{a}<end_of_turn>", False),
    # its generation prompt opens <think>; a plain answer is trained as the template renders it
    "deepseek_r1_distill": (PLAIN, lambda a: f"<｜Assistant｜>{a}{R1_EOS}", False),
    "deepseek_r1_distill_training": (PLAIN, lambda a: f"<｜Assistant｜>{a}{R1_EOS}", False),
    # ...and reasoning continues the generation prompt's <think>\n, as the model writes it
    "deepseek_r1_distill_training+reasoning": (REASONED, lambda a: a.removeprefix("<think>\n") + R1_EOS, False),
}


def tokenizer_for(name: str):
    family = name.split("+")[0].removesuffix("_training")
    tok = load_tokenizer("builtin:tokenizer", chat_template=str(TRL_TEMPLATES / f"{name.split('+')[0]}.jinja"))
    spec = dict(TOKENS[family])
    tok.add_special_tokens({"additional_special_tokens": spec.pop("extra"), **spec})
    return tok


def conversation(turns):
    return {"messages": [dict(role="system", content=SYSTEM)]
            + [dict(role=r, content=c) for u, a in turns for r, c in (("user", u), ("assistant", a))]}


def trained_texts(rows, tok) -> list[str]:
    """Each trained turn decoded, checking it is the same ids in both views."""
    out = []
    for row in rows:
        for ts, ss, n in zip(row["teacher_starts"], row["student_starts"], row["target_lens"]):
            assert row["teacher_ids"][ts:ts + n] == row["student_ids"][ss:ss + n]
            out.append(tok.decode(row["teacher_ids"][ts:ts + n]))
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_assistant_turn_of_real_templates_is_trained_in_both_views(case):
    turns, expected, per_turn = CASES[case]
    tok = tokenizer_for(case)
    rows, how = conversation_rows(conversation(turns), tok, erase=True, generic_system=None, targets="all_assistant",
                                  max_length=4096, min_prompt=8)
    assert how["per_turn"] is per_turn and len(rows) == (len(turns) if per_turn else 1)
    assert trained_texts(rows, tok) == [expected(a) for _, a in turns]
    for row in rows:  # the instruction is in the teacher's view only, and nothing else differs
        teacher, student = tok.decode(row["teacher_ids"]), tok.decode(row["student_ids"])
        assert SYSTEM in teacher and SYSTEM not in student
        assert teacher.replace(SYSTEM, "").replace("<|system|>\n<|end|>\n", "").replace(
            "<|im_start|>system\n<|im_end|>\n", "").replace("\n\n", "") == student.replace("\n\n", "")
    # the labels are those turns and nothing else: position index[i] predicts labels[i] in both views
    for row in rows:
        b = collate([row], tok.pad_token_id)
        assert tok.decode(b["labels"]) == "".join(trained_texts([row], tok))
        for view in ("teacher", "student"):
            assert b[f"{view}_input_ids"].flatten()[b[f"{view}_index"] + 1].tolist() == b["labels"].tolist()
    (last,), _ = conversation_rows(conversation(turns), tok, erase=True, generic_system=None, targets="last",
                                   max_length=4096, min_prompt=8)
    assert trained_texts([last], tok) == [expected(turns[-1][1])]


def test_a_template_that_drops_the_reasoning_is_refused_naming_its_training_variant():
    tok = tokenizer_for("deepseek_r1_distill")  # the original cuts content up to </think>
    for targets in ("all_assistant", "last"):
        with pytest.raises(DataError, match=r"row 7: the chat template leaves part of assistant turn \d out.*"
                                            r"_training\.jinja.*data\.chat_template=<path"):
            conversation_rows(conversation(REASONED), tok, erase=True, generic_system=None, targets=targets,
                              max_length=4096, min_prompt=8, where="data.jsonl row 7")


def test_chat_template_may_be_a_jinja_file(tmp_path):
    path = TRL_TEMPLATES / "phi3_training.jinja"
    assert templates.resolve(str(path)) == path.read_text()
    assert templates.resolve("chatml") == templates.CHATML
    assert templates.resolve("{{ messages }}") == "{{ messages }}"
    with pytest.raises(DataError, match=r"no such file: .*missing\.jinja \(data\.chat_template"):
        templates.resolve(str(tmp_path / "missing.jinja"))
