"""What serving a template that rewrites earlier turns costs: one example per assistant turn
(Qwen3's original template, which drops earlier <think> blocks) against one example per
conversation (its trl training variant, and templates whose turns are prefixes of the next).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_templates.py [--conversations 1000] [--repeats 3]

Synthetic conversations with a system message and 1-6 exchanges (seeded), the real Jinja text
trl ships, the demo tokenizer with each family's special tokens. For each template: examples,
tokens the teacher and the student forward per epoch (contexts included: a per-turn example
repeats the conversation before its turn), trained tokens, and tokenising time per conversation
(kd.data.conversation_rows, one process; arms alternated, median of --repeats), each as a ratio
to the Qwen3 training variant measured in the same run.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "data"))

WORDS = ("the of and to in is was for on that with as by at from carry digit answer step value number list "
         "count result sum total check each because first then also add write").split()


def conversations(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    text = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    out = []
    for _ in range(n):
        msgs = [dict(role="system", content="Solve step by step. " + text(rng.randint(10, 40)))]
        for _ in range(rng.randint(1, 6)):
            msgs += [dict(role="user", content=text(rng.randint(8, 60))),
                     dict(role="assistant", content=text(rng.randint(20, 200)))]
        out.append({"messages": msgs})
    return out


def measure(tok, convs) -> tuple[dict, float]:
    from kd.data import conversation_rows

    totals = dict(examples=0, teacher_tokens=0, student_tokens=0, trained_tokens=0)
    t0 = time.perf_counter()
    for c in convs:
        rows, _ = conversation_rows(c, tok, erase=True, generic_system=None, targets="all_assistant",
                                    max_length=1 << 20, min_prompt=8)
        totals["examples"] += len(rows)
        for r in rows:
            totals["teacher_tokens"] += len(r["teacher_ids"])
            totals["student_tokens"] += len(r["student_ids"])
            totals["trained_tokens"] += r["n_response"]
    return totals, (time.perf_counter() - t0) / len(convs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--conversations", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    assert importlib.util.find_spec("trl"), "needs trl (a dev dependency) for its chat templates"
    from test_templates import tokenizer_for  # the test's tokenizers: demo vocabulary + family specials

    arms = ["qwen3_training", "qwen3", "phi3", "gemma3", "deepseek_r1_distill_training"]
    toks = {a: tokenizer_for(a) for a in arms}
    convs = conversations(args.conversations)
    times: dict[str, list[float]] = {a: [] for a in arms}
    counts = {}
    for _ in range(args.repeats):  # arms alternate so drift hits all alike
        for a in arms:
            counts[a], dt = measure(toks[a], convs)
            times[a].append(dt)
    base, base_t = counts["qwen3_training"], statistics.median(times["qwen3_training"])
    print(f"{args.conversations} conversations, {sum(len(c['messages']) // 2 for c in convs)} assistant turns")
    print("| template | examples | teacher tokens | student tokens | trained tokens | ms / conversation |")
    print("|---|---|---|---|---|---|")
    for a in arms:
        c, t = counts[a], statistics.median(times[a])
        cells = [f"{c[k]:,} ({c[k] / base[k]:.2f}x)" for k in ("examples", "teacher_tokens", "student_tokens",
                                                                "trained_tokens")]
        print(f"| {a} | " + " | ".join(cells) + f" | {t * 1e3:.2f} ({t / base_t:.2f}x) |")


if __name__ == "__main__":
    main()
