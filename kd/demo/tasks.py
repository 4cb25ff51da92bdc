"""Seeded synthetic tasks whose best strategy depends on the problem (Orca-2 style).

Each family has a short form, solved with strategy "direct" (final answer only), and a long form,
solved with strategy "step_by_step" (a worked trace, then the same final-answer line). The
teacher sees the detailed strategy instruction in `record["system"]`; the student sees
`GENERIC_SYSTEM` instead and must infer the strategy from the problem itself.

Families:
  addition  direct: a two-digit plus a one-digit number. step_by_step: operands of 3-4 digits,
            one line per column from the right with the carry and the result so far.
  count     direct: 2-4 words. step_by_step: 6-9 words, one line per word (match or not, and the
            running count).

The traces are built so every step is local: each line repeats what is left of the numbers (or
the word at hand) next to the state it updates, so a few-layer model can follow them by copying
from the line above rather than by counting positions in the prompt. Every response ends with
"The answer is N." so `extract_answer` works for both strategies.
"""

from __future__ import annotations

import random
import re

FAMILIES = ("addition", "count")
STRATEGIES = ("direct", "step_by_step")

GENERIC_SYSTEM = "You are a helpful assistant."

SYSTEM_INSTRUCTIONS = {
    ("addition", "direct"): (
        'The numbers are small: answer at once, with no working, in one line "The answer is N."'
    ),
    ("addition", "step_by_step"): (
        'Add step by step from the right. Write "Add from the right:", then one line per column: '
        'what is left of both numbers, the carry, the sum of the last digits and the carry, and the '
        'result so far. End with "The answer is N."'
    ),
    ("count", "direct"): (
        'The list is short: answer at once, with no working, in one line "The answer is N."'
    ),
    ("count", "step_by_step"): (
        'Count step by step. Write "Count W:" for the word W, then one line per word of the list: '
        'the word, yes if it is W or no, and the count so far. End with "The answer is N."'
    ),
}

# Short and long forms are kept far apart so the right strategy is unambiguous.
ADD_DIRECT_A = (10, 99)  # a two-digit number ...
ADD_DIRECT_B = (1, 9)  # ... plus a one-digit one
ADD_STEP_DIGITS = (3, 4)
COUNT_DIRECT_LEN = (2, 4)
COUNT_STEP_LEN = (6, 9)
COUNT_WORDS = ("cat", "dog", "sun", "tree", "fish", "book", "car", "bird")
_TARGET_RATE = 0.3
STEP_HEADERS = {"addition": "Add from the right:", "count": "Count "}

_ANSWER_RE = re.compile(r"The answer is\s*(-?[\d,]+)")


def _answer_line(value: int) -> str:
    """The closing line shared by every strategy."""
    return f"The answer is {value}."


def _addition(rng: random.Random, strategy: str) -> dict:
    """One addition problem in the form that suits `strategy`."""
    if strategy == "direct":
        a, b = rng.randint(*ADD_DIRECT_A), rng.randint(*ADD_DIRECT_B)
        response = _answer_line(a + b)
    else:
        lo, hi = ADD_STEP_DIGITS
        da, db = rng.randint(lo, hi), rng.randint(lo, hi)
        a = rng.randint(10 ** (da - 1), 10**da - 1)
        b = rng.randint(10 ** (db - 1), 10**db - 1)
        response = addition_steps(a, b)
    return {
        "prompt": f"What is {a} + {b}?",
        "response": response,
        "difficulty": max(len(str(a)), len(str(b))),
        "answer": str(a + b),
    }


def addition_steps(a: int, b: int) -> str:
    """Column trace of a + b from the right. Line i shows the numbers with their last i digits
    removed (0 once a number is used up), the carry in, the column sum and the result so far;
    a final carry gets its own "0 + 0" line."""
    lines = [STEP_HEADERS["addition"]]
    carry, result = 0, ""
    while a or b or carry:
        s = a % 10 + b % 10 + carry
        result = str(s % 10) + result
        lines.append(f"{a} + {b} carry {carry}: {a % 10}+{b % 10}+{carry}={s} so far {result}")
        a, b, carry = a // 10, b // 10, s // 10
    lines.append(_answer_line(int(result)))
    return "\n".join(lines)


def count_steps(target: str, words: list[str]) -> str:
    """One line per word: the word, whether it is `target`, and the running count."""
    lines, running = [f"{STEP_HEADERS['count']}{target}:"], 0
    for w in words:
        running += w == target
        lines.append(f"{w} {'yes' if w == target else 'no'} {running}")
    lines.append(_answer_line(running))
    return "\n".join(lines)


def _count(rng: random.Random, strategy: str) -> dict:
    """One word-counting problem in the form that suits `strategy`."""
    lo, hi = COUNT_DIRECT_LEN if strategy == "direct" else COUNT_STEP_LEN
    target = rng.choice(COUNT_WORDS)
    others = [w for w in COUNT_WORDS if w != target]
    length = rng.randint(lo, hi)
    words = [target if rng.random() < _TARGET_RATE else rng.choice(others) for _ in range(length)]
    n = words.count(target)
    response = _answer_line(n) if strategy == "direct" else count_steps(target, words)
    return {
        "prompt": f'How many times does the word "{target}" appear in this list? {", ".join(words)}',
        "response": response,
        "difficulty": len(words),
        "answer": str(n),
    }


_MAKERS = {"addition": _addition, "count": _count}


def make_record(family: str, strategy: str, rng: random.Random) -> dict:
    """One full record for (family, strategy), drawing from `rng`."""
    body = _MAKERS[family](rng, strategy)
    return {
        "system": SYSTEM_INSTRUCTIONS[(family, strategy)],
        "prompt": body["prompt"],
        "response": body["response"],
        "family": family,
        "strategy": strategy,
        "difficulty": body["difficulty"],
        "answer": body["answer"],
    }


def generate(n: int, seed: int, families=None, exclude=None, distinct: bool = True) -> list[dict]:
    """`n` records, balanced over (family, strategy) cells, deterministic in `seed`.

    Cells are filled round robin and the result shuffled. Prompts in `exclude` (an iterable of
    prompt strings, e.g. an eval set's) are always skipped, so output sets built with an
    `exclude` are disjoint from it. With `distinct` (the default) no prompt repeats; without it
    small cells (the direct additions have 810 prompts) may repeat, as a large training set needs.
    """
    families = tuple(FAMILIES if families is None else families)
    unknown = [f for f in families if f not in _MAKERS]
    if unknown or not families:
        raise ValueError(f"unknown families {unknown}; valid: {FAMILIES}")
    rng = random.Random(seed)
    cells = [(f, s) for f in families for s in STRATEGIES]
    excluded = set(exclude or ())
    seen: set[str] = set()
    out: list[dict] = []
    misses = 0
    while len(out) < n:
        family, strategy = cells[len(out) % len(cells)]
        rec = make_record(family, strategy, rng)
        if rec["prompt"] in excluded or (distinct and rec["prompt"] in seen):
            misses += 1
            # A runaway loop means n is larger than a cell has distinct prompts.
            if misses > 100 * (n + 100):
                raise RuntimeError(f"could not draw {n} distinct records")
            continue
        seen.add(rec["prompt"])
        out.append(rec)
    rng.shuffle(out)
    return out


def make_splits(n_train: int, n_eval: int, train_seed: int = 0, eval_seed: int = 1, families=None):
    """(train, eval) with different seeds; no eval prompt appears in train."""
    eval_set = generate(n_eval, eval_seed, families)
    train = generate(n_train, train_seed, families, exclude=[r["prompt"] for r in eval_set])
    return train, eval_set


def messages(record: dict, erase: bool = False) -> list[dict]:
    """Chat messages for a record: the strategy instruction (teacher) or, with `erase`, the
    generic system message (student)."""
    return [
        {"role": "system", "content": GENERIC_SYSTEM if erase else record["system"]},
        {"role": "user", "content": record["prompt"]},
        {"role": "assistant", "content": record["response"]},
    ]


def extract_answer(family: str, response_text: str) -> str | None:
    """The final answer in a response, canonicalised ("057" -> "57"); None when absent.

    Both families end with "The answer is N."; the last such line wins, so a model that
    restates the answer is judged on what it finally says.
    """
    if family not in _MAKERS:
        raise ValueError(f"unknown family {family!r}; valid: {FAMILIES}")
    hits = _ANSWER_RE.findall(response_text)
    if not hits:
        return None
    digits = hits[-1].replace(",", "")
    try:
        return str(int(digits))
    except ValueError:
        return None


def is_correct(record: dict, response_text: str) -> bool:
    """Whether `response_text` ends on the record's canonical answer."""
    return extract_answer(record["family"], response_text) == record["answer"]


def response_strategy(family: str, response_text: str) -> str:
    """Which strategy a response used: "step_by_step" when it opens with the family's trace
    header, "direct" when it is a lone answer line, else "other"."""
    if family not in _MAKERS:
        raise ValueError(f"unknown family {family!r}; valid: {FAMILIES}")
    text = response_text.strip()
    if text.startswith(STEP_HEADERS[family]):
        return "step_by_step"
    if "\n" not in text and _ANSWER_RE.match(text):
        return "direct"
    return "other"
