"""A seeded task with many valid answers, for the entropy experiment (issue 15, docs/results-entropy.md).

"Name one fruit that is not plum or pear." has six right answers, so a teacher trained on uniformly
sampled valid answers spreads its probability over them: its soft targets carry what one sampled
answer cannot. The strategy follows the problem, as in kd/demo/tasks.py, and only the teacher's
instruction names it:

  direct        "Name one C that is not X, Y."   -> "The answer is W."
  step_by_step  "Name three Cs that are not X."  -> "Pick 3 fruits:" then one numbered line per word,
                                                    then "The answers are W1, W2, W3."

An answer is valid when every named word is in the category, none is excluded, none repeats, and
there are as many as asked (`is_valid`); the format is what `response_strategy` reads.
"""

from __future__ import annotations

import random
import re

CATEGORIES = {
    "animal": ("cat", "dog", "fish", "bird", "horse", "cow", "goat", "duck"),
    "fruit": ("apple", "pear", "plum", "grape", "lemon", "mango", "peach", "melon"),
    "color": ("red", "blue", "green", "black", "white", "pink", "brown", "gray"),
    "tool": ("saw", "drill", "hammer", "wrench", "knife", "rake", "shovel", "axe"),
    "vehicle": ("car", "bus", "train", "boat", "bike", "truck", "plane", "ship"),
    "drink": ("tea", "milk", "water", "juice", "soda", "wine", "beer", "coffee"),
}
PLURAL = {c: c + "s" for c in CATEGORIES}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
STRATEGIES = ("direct", "step_by_step")
FAMILY = "choice"

SYSTEM_INSTRUCTIONS = {
    "direct": 'Answer at once: "The answer is W." with one allowed word W.',
    "step_by_step": 'Write "Pick N <category>s:", one numbered line per word, all different and allowed, '
                    'then "The answers are W1, W2, ...".',
}

_SINGLE_RE = re.compile(r"The answer is ([a-z]+)\.")
_MULTI_RE = re.compile(r"The answers are ([a-z, ]+)\.")


def _excluded_phrase(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def problem(rng: random.Random, strategy: str) -> dict:
    """One problem (no response) in the form that suits `strategy`."""
    cat = rng.choice(sorted(CATEGORIES))
    words = list(CATEGORIES[cat])
    k = 1 if strategy == "direct" else rng.choice((3, 4))
    n_excl = rng.randint(1, 3)
    excluded = rng.sample(words, n_excl)
    if k == 1:
        prompt = f"Name one {cat} that is not {_excluded_phrase(excluded)}."
    else:
        prompt = f"Name {NUMBER_WORDS[k]} {PLURAL[cat]} that are not {_excluded_phrase(excluded)}."
    return {"system": SYSTEM_INSTRUCTIONS[strategy], "prompt": prompt, "family": FAMILY, "strategy": strategy,
            "category": cat, "count": k, "excluded": excluded}


def sample_response(record: dict, rng: random.Random) -> str:
    """A uniformly drawn valid answer to `record` (the teacher's training targets)."""
    allowed = [w for w in CATEGORIES[record["category"]] if w not in record["excluded"]]
    picks = rng.sample(allowed, record["count"])
    if record["strategy"] == "direct":
        return f"The answer is {picks[0]}."
    lines = [f"Pick {record['count']} {PLURAL[record['category']]}:"]
    lines += [f"{i}. {w}" for i, w in enumerate(picks, 1)]
    lines.append(f"The answers are {', '.join(picks)}.")
    return "\n".join(lines)


def answers(text: str) -> list[str] | None:
    """The words a response gives on its closing line, or None without one."""
    m = _MULTI_RE.search(text)
    if m:
        return [w.strip() for w in m.group(1).split(",") if w.strip()]
    m = _SINGLE_RE.search(text)
    return [m.group(1)] if m else None


def is_valid(record: dict, text: str) -> bool:
    got = answers(text)
    if got is None or len(got) != record["count"] or len(set(got)) != len(got):
        return False
    allowed = set(CATEGORIES[record["category"]]) - set(record["excluded"])
    return all(w in allowed for w in got)


def response_strategy(text: str) -> str | None:
    """step_by_step for a numbered pick list, direct for a lone answer line, None otherwise."""
    if re.search(r"^Pick \d", text, flags=re.M) and _MULTI_RE.search(text):
        return "step_by_step"
    if _SINGLE_RE.search(text) and "\n" not in text.strip():
        return "direct"
    return None


def make_split(n: int, seed: int, exclude: set[str] = frozenset(), with_response: bool = True) -> list[dict]:
    """`n` distinct problems (none of whose prompts is in `exclude`), half of each strategy, in a
    seeded order; each with one uniformly sampled valid response."""
    rng = random.Random(seed)
    out, seen = [], set(exclude)
    while len(out) < n:
        rec = problem(rng, STRATEGIES[len(out) % 2])
        if rec["prompt"] in seen:
            continue
        seen.add(rec["prompt"])
        if with_response:
            rec["response"] = sample_response(rec, rng)
        out.append(rec)
    rng.shuffle(out)
    return out
