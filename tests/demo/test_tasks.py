"""Demo tasks, shipped demo data and the shipped tokenizer."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kd.demo import tasks
from kd.demo.tokenizer import DEFAULT_DIR as TOKENIZER_DIR

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "data" / "demo"
CELLS = [(f, s) for f in tasks.FAMILIES for s in tasks.STRATEGIES]
MAX_RESPONSE_TOKENS = 160


@pytest.fixture(scope="module")
def tok():
    """The shipped tokenizer, loaded the way users load it."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


@pytest.fixture(scope="module")
def sample():
    """A few hundred records covering every cell."""
    return tasks.generate(400, seed=7)


def _load(name: str) -> list[dict]:
    """Records of a shipped demo split."""
    with open(DEMO / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# --- generation ---------------------------------------------------------------------------


def test_generate_is_deterministic_and_seed_dependent():
    assert tasks.generate(60, seed=3) == tasks.generate(60, seed=3)
    assert tasks.generate(60, seed=3) != tasks.generate(60, seed=4)


def test_generate_balanced_distinct_and_schema(sample):
    counts = {c: 0 for c in CELLS}
    for r in sample:
        assert set(r) == {"system", "prompt", "response", "family", "strategy", "difficulty", "answer"}
        assert r["system"] == tasks.SYSTEM_INSTRUCTIONS[(r["family"], r["strategy"])]
        counts[(r["family"], r["strategy"])] += 1
    assert set(counts.values()) == {100}
    assert len({r["prompt"] for r in sample}) == len(sample)
    # Strategy instructions are all different from each other and from the generic message.
    systems = list(tasks.SYSTEM_INSTRUCTIONS.values()) + [tasks.GENERIC_SYSTEM]
    assert len(set(systems)) == len(systems)


def test_families_filter_and_unknown_family():
    recs = tasks.generate(10, seed=0, families=["count"])
    assert {r["family"] for r in recs} == {"count"}
    with pytest.raises(ValueError):
        tasks.generate(1, seed=0, families=["nope"])


def test_strategy_follows_problem_size(sample):
    for r in sample:
        if r["family"] == "addition":
            a, b = map(int, re.fullmatch(r"What is (\d+) \+ (\d+)\?", r["prompt"]).groups())
            assert int(r["answer"]) == a + b
            if r["strategy"] == "direct":
                assert tasks.ADD_DIRECT_A[0] <= a <= tasks.ADD_DIRECT_A[1]
                assert tasks.ADD_DIRECT_B[0] <= b <= tasks.ADD_DIRECT_B[1]
            else:
                lo, hi = tasks.ADD_STEP_DIGITS
                assert lo <= len(str(a)) <= hi and lo <= len(str(b)) <= hi
        else:
            m = re.fullmatch(r'How many times does the word "(\w+)" appear in this list\? (.*)', r["prompt"])
            target, words = m.group(1), m.group(2).split(", ")
            assert int(r["answer"]) == words.count(target)
            lo, hi = tasks.COUNT_DIRECT_LEN if r["strategy"] == "direct" else tasks.COUNT_STEP_LEN
            assert lo <= len(words) <= hi and r["difficulty"] == len(words)


def _check_addition_trace(prompt: str, lines: list[str], answer: str) -> None:
    """Replays an addition trace: each line drops one digit of each number and carries right."""
    a, b = map(int, re.fullmatch(r"What is (\d+) \+ (\d+)\?", prompt).groups())
    assert lines[0] == tasks.STEP_HEADERS["addition"]
    carry, result = 0, ""
    for line in lines[1:]:
        m = re.fullmatch(r"(\d+) \+ (\d+) carry (\d): (\d)\+(\d)\+(\d)=(\d+) so far (\d+)", line)
        la, lb, c, x, y, c2, s, so_far = m.groups()
        assert (int(la), int(lb), int(c), int(c2)) == (a, b, carry, carry)
        assert (int(x), int(y), int(s)) == (a % 10, b % 10, a % 10 + b % 10 + carry)
        result = str(int(s) % 10) + result
        assert so_far == result
        a, b, carry = a // 10, b // 10, int(s) // 10
    assert a == b == carry == 0 and str(int(result)) == answer


def test_step_by_step_traces_are_consistent(sample):
    for r in sample:
        if r["strategy"] != "step_by_step":
            assert r["response"] == f"The answer is {r['answer']}."
            continue
        lines = r["response"].split("\n")
        assert lines[-1] == f"The answer is {r['answer']}."
        if r["family"] == "addition":
            _check_addition_trace(r["prompt"], lines[:-1], r["answer"])
        else:
            target = re.search(r'word "(\w+)"', r["prompt"]).group(1)
            words = r["prompt"].split("? ", 1)[1].split(", ")
            assert lines[0] == f"Count {target}:"
            running = 0
            for w, line in zip(words, lines[1:-1], strict=True):
                running += w == target
                assert line == f"{w} {'yes' if w == target else 'no'} {running}"
            assert running == int(r["answer"])


def test_addition_trace_edge_cases():
    # A final carry gets its own line; a shorter number continues as 0.
    _check_addition_trace("What is 999 + 9999?", tasks.addition_steps(999, 9999).split("\n")[:-1], "10998")
    assert tasks.addition_steps(999, 9999).split("\n")[-2] == "0 + 0 carry 1: 0+0+1=1 so far 10998"
    _check_addition_trace("What is 100 + 100?", tasks.addition_steps(100, 100).split("\n")[:-1], "200")


def test_generate_with_repeats_still_excludes():
    ev = tasks.generate(40, seed=2, families=["addition"])
    excluded = {r["prompt"] for r in ev}
    many = tasks.generate(4000, seed=3, families=["addition"], exclude=excluded, distinct=False)
    prompts = [r["prompt"] for r in many]
    assert not set(prompts) & excluded
    assert len(set(prompts)) < len(prompts)  # 2000 direct additions from 810 - 40 prompts repeat
    with pytest.raises(RuntimeError):
        tasks.generate(4000, seed=3, families=["addition"])  # distinct: only 810 direct additions exist


@pytest.mark.parametrize("family", tasks.FAMILIES)
def test_response_strategy(family, sample):
    for r in sample:
        if r["family"] == family:
            assert tasks.response_strategy(family, r["response"]) == r["strategy"]
    assert tasks.response_strategy(family, "no idea") == "other"
    assert tasks.response_strategy(family, "The answer is 3.\nThe answer is 4.") == "other"
    with pytest.raises(ValueError):
        tasks.response_strategy("nope", "The answer is 1.")


def test_splits_are_disjoint():
    train, ev = tasks.make_splits(300, 100, train_seed=1, eval_seed=2)
    assert len(train) == 300 and len(ev) == 100
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in ev}


# --- answers ------------------------------------------------------------------------------


@pytest.mark.parametrize("family,strategy", CELLS)
def test_extract_answer_roundtrip_on_gold(family, strategy):
    for r in tasks.generate(40, seed=11, families=[family]):
        if r["strategy"] != strategy:
            continue
        assert tasks.extract_answer(family, r["response"]) == r["answer"]
        assert tasks.is_correct(r, r["response"])
        gold_line = f"The answer is {r['answer']}."
        wrong = r["response"].replace(gold_line, f"The answer is {int(r['answer']) + 1}.")
        assert not tasks.is_correct(r, wrong)


def test_extract_answer_edge_cases():
    assert tasks.extract_answer("addition", "no idea") is None
    assert tasks.extract_answer("addition", "The answer is 057.") == "57"
    assert tasks.extract_answer("count", "The answer is 3. The answer is 4.") == "4"
    assert tasks.extract_answer("addition", "The answer is 1,234") == "1234"
    assert tasks.extract_answer("count", "The answer is 5<|im_end|>") == "5"
    with pytest.raises(ValueError):
        tasks.extract_answer("nope", "The answer is 1.")


def test_messages_erase_swaps_only_the_system_message(sample):
    r = sample[0]
    teacher, student = tasks.messages(r), tasks.messages(r, erase=True)
    assert teacher[0]["content"] == r["system"] and student[0]["content"] == tasks.GENERIC_SYSTEM
    assert teacher[1:] == student[1:]


# --- shipped data ---------------------------------------------------------------------------


def test_shipped_demo_data():
    train, ev = _load("train.jsonl"), _load("eval.jsonl")
    assert len(train) == 2000 and len(ev) == 200
    tp, ep = [r["prompt"] for r in train], [r["prompt"] for r in ev]
    assert len(set(tp)) == len(tp) and len(set(ep)) == len(ep) and not set(tp) & set(ep)
    assert all(tasks.is_correct(r, r["response"]) for r in train + ev)
    size = (DEMO / "train.jsonl").stat().st_size + (DEMO / "eval.jsonl").stat().st_size
    assert size < 2_000_000


def test_make_demo_data_is_byte_identical(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_demo_data.py"), str(tmp_path)], check=True)
    for name in ("train.jsonl", "eval.jsonl"):
        assert (tmp_path / name).read_bytes() == (DEMO / name).read_bytes()


# --- tokenizer ----------------------------------------------------------------------------


def test_tokenizer_specials_and_chat_template(tok):
    from transformers import PreTrainedTokenizerFast

    assert isinstance(tok, PreTrainedTokenizerFast)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")}
    assert ids == {"<pad>": 0, "<s>": 1, "</s>": 2, "<|im_start|>": 3, "<|im_end|>": 4}
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 4)
    assert 256 + 5 <= len(tok) <= 600 and len(tok) % 64 != 0
    # No BOS/EOS added to plain text.
    assert tok("hi").input_ids == tok.encode("hi", add_special_tokens=False)
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
    assert ids == tok.encode(text, add_special_tokens=False) and ids.count(3) == 3


def test_digits_split_one_per_token(tok):
    for text in ("1234567890", " 98765", "x=2024, y=77.", "What is 4521 + 9380?"):
        ids = tok.encode(text, add_special_tokens=False)
        pieces = [tok.decode([i]) for i in ids]
        assert tok.decode(ids) == text
        assert [p for p in pieces if any(ch.isdigit() for ch in p)] == [ch for ch in text if ch.isdigit()]
    # No merged token in the vocabulary contains a digit next to anything else.
    for piece in tok.get_vocab():
        if any(ch.isdigit() for ch in piece):
            assert len(piece) == 1


def test_response_and_chat_lengths(tok, sample):
    worst = tasks.addition_steps(9_999, 9_999)
    assert len(tok.encode(worst, add_special_tokens=False)) <= MAX_RESPONSE_TOKENS
    for r in sample:
        assert len(tok.encode(r["response"], add_special_tokens=False)) <= MAX_RESPONSE_TOKENS
        chat = tok.apply_chat_template(tasks.messages(r), tokenize=True, return_dict=False)
        assert len(chat) <= 512


def test_tokenizer_rebuild_is_byte_identical(tmp_path):
    # Subprocess: the build sets RAYON_NUM_THREADS, which must not leak into the test process.
    subprocess.run([sys.executable, "-m", "kd.demo.tokenizer", str(tmp_path)], check=True, cwd=ROOT)
    shipped = sorted(p.name for p in TOKENIZER_DIR.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == shipped
    for name in shipped:
        assert (tmp_path / name).read_bytes() == (TOKENIZER_DIR / name).read_bytes(), name


def test_random_module_state_untouched():
    state = random.getstate()
    tasks.generate(20, seed=0)
    assert random.getstate() == state
