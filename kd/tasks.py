"""Seeded synthetic tasks whose best strategy depends on the problem (Orca-2 style).

Each family has a short form, solved with strategy "direct" (final answer only), and a long form,
solved with strategy "step_by_step" (a worked trace, then the same final-answer line). The
teacher sees the detailed strategy instruction in `record["system"]`; the student sees
`GENERIC_SYSTEM` instead and must infer the strategy from the problem itself.

Families:
  addition  direct: both operands < 100.  step_by_step: operands of 4-7 digits, column sums with
            carries written right to left.
  count     direct: 2-5 words.  step_by_step: 10-16 words, one line per word with a running tally.

Every response ends with "The answer is N." so `extract_answer` works for both strategies.
"""

from __future__ import annotations

import random
import re

FAMILIES = ("addition", "count")
STRATEGIES = ("direct", "step_by_step")

GENERIC_SYSTEM = "You are a helpful assistant."

SYSTEM_INSTRUCTIONS = {
    ("addition", "direct"): (
        "The numbers are small, so answer directly. Do not show any working: reply with one line "
        'of the form "The answer is N." where N is the sum.'
    ),
    ("addition", "step_by_step"): (
        "Solve step by step. First write \"Add column by column from the right:\". Then, starting "
        "from the rightmost digit, write one line per column: the digit of the first number and "
        "of the second number (0 where a number has no digit left) and the carry in, their sum, the "
        "digit to write and the carry out. If a carry is left at the end, write \"final carry 1\". "
        'Finish with "The answer is N." where N is the sum.'
    ),
    ("count", "direct"): (
        "The list is short, so answer directly. Do not show any working: reply with one line of "
        'the form "The answer is N." where N is how many times the word occurs.'
    ),
    ("count", "step_by_step"): (
        "Solve step by step. First write \"Count the word going through the list:\". Then write "
        "one line per word of the list, in order: the word and the running count of the target "
        "word so far, which goes up by one only when the word matches exactly. "
        'Finish with "The answer is N." where N is the final count.'
    ),
}

# Long forms are kept far from short ones so the right strategy is unambiguous.
ADD_DIRECT_MAX = 99
ADD_STEP_DIGITS = (4, 7)
COUNT_DIRECT_LEN = (2, 5)
COUNT_STEP_LEN = (10, 16)
COUNT_WORDS = ("cat", "dog", "sun", "tree", "fish", "book", "car", "bird")
_TARGET_RATE = 0.3

_ANSWER_RE = re.compile(r"The answer is\s*(-?[\d,]+)")


def _answer_line(value: int) -> str:
    """The closing line shared by every strategy."""
    return f"The answer is {value}."


def _addition(rng: random.Random, strategy: str) -> dict:
    """One addition problem in the form that suits `strategy`."""
    if strategy == "direct":
        a, b = rng.randint(0, ADD_DIRECT_MAX), rng.randint(0, ADD_DIRECT_MAX)
        response = _answer_line(a + b)
    else:
        lo, hi = ADD_STEP_DIGITS
        da, db = rng.randint(lo, hi), rng.randint(lo, hi)
        a = rng.randint(10 ** (da - 1), 10**da - 1)
        b = rng.randint(10 ** (db - 1), 10**db - 1)
        response = _addition_steps(a, b)
    return {
        "prompt": f"What is {a} + {b}?",
        "response": response,
        "difficulty": max(len(str(a)), len(str(b))),
        "answer": str(a + b),
    }


def _addition_steps(a: int, b: int) -> str:
    """Column-by-column trace of a + b, least significant digit first."""
    sa, sb = str(a)[::-1], str(b)[::-1]
    lines = ["Add column by column from the right:"]
    carry = 0
    for i in range(max(len(sa), len(sb))):
        x = int(sa[i]) if i < len(sa) else 0
        y = int(sb[i]) if i < len(sb) else 0
        s = x + y + carry
        lines.append(f"{x}+{y}+{carry}={s} write {s % 10} carry {s // 10}")
        carry = s // 10
    if carry:
        lines.append("final carry 1")
    lines.append(_answer_line(a + b))
    return "\n".join(lines)


def _count(rng: random.Random, strategy: str) -> dict:
    """One word-counting problem in the form that suits `strategy`."""
    lo, hi = COUNT_DIRECT_LEN if strategy == "direct" else COUNT_STEP_LEN
    target = rng.choice(COUNT_WORDS)
    others = [w for w in COUNT_WORDS if w != target]
    length = rng.randint(lo, hi)
    words = [target if rng.random() < _TARGET_RATE else rng.choice(others) for _ in range(length)]
    n = words.count(target)
    if strategy == "direct":
        response = _answer_line(n)
    else:
        lines, running = ["Count the word going through the list:"], 0
        for w in words:
            running += w == target
            lines.append(f"{w} {running}")
        lines.append(_answer_line(n))
        response = "\n".join(lines)
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


def generate(n: int, seed: int, families=None, exclude=None) -> list[dict]:
    """`n` distinct records, balanced over (family, strategy) cells, deterministic in `seed`.

    Cells are filled round robin and the result shuffled. Prompts in `exclude` (an iterable of
    prompt strings, e.g. an eval set's) and repeated prompts are skipped, so output sets built
    with an `exclude` are disjoint from it.
    """
    families = tuple(FAMILIES if families is None else families)
    unknown = [f for f in families if f not in _MAKERS]
    if unknown or not families:
        raise ValueError(f"unknown families {unknown}; valid: {FAMILIES}")
    rng = random.Random(seed)
    cells = [(f, s) for f in families for s in STRATEGIES]
    seen = set(exclude or ())
    out: list[dict] = []
    misses = 0
    while len(out) < n:
        family, strategy = cells[len(out) % len(cells)]
        rec = make_record(family, strategy, rng)
        if rec["prompt"] in seen:
            misses += 1
            # The short forms have ~10^4 distinct prompts; a runaway loop means n is too large.
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
