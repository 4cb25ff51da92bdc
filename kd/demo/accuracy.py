"""Task accuracy of a model on held-out problems, under a chosen system message.

    python -m kd.accuracy --model runs/kd/student --data data/demo/eval.jsonl --system generic
    python -m kd.accuracy --model <student> --data eval.jsonl --system none --teacher <teacher> --json out.json

The model answers each problem greedily (kd.generate.generate_texts) seeing the record's strategy
instruction (`strategy`), `tasks.GENERIC_SYSTEM` (`generic`) or no system message (`none`); an
answer is right when `tasks.is_correct` accepts it. Accuracy is reported overall, per
family/strategy bucket and per difficulty.

With --teacher, token-level metrics on the gold responses are added: the student reads the chosen
view, the teacher the strategy view (kd.data.render_views), and kd.forward.eval_sums gives the
student's CE, forward KL(teacher || student) at T = 1 and top-1 agreement, per response token.

Under `accelerate launch` ranks take strided shards of the records; results meet on rank 0.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

from kd.cli import one_line_errors, quiet_libraries
from kd.demo import tasks
from kd.tools.generate import ArgParser, add_common_args
from kd.tools.generation import generate_for_records, load_for_generation, make_state
from kd.tools.prompt_records import read_records

_FAMILY_ORDER = {f: i for i, f in enumerate(tasks.FAMILIES)}
_STRATEGY_ORDER = {s: i for i, s in enumerate(tasks.STRATEGIES)}


# --------------------------------------------------------------------------- scoring


def _cell(n: int, correct: int, chose: int | None = None) -> dict:
    out = {"n": n, "correct": correct, "accuracy": correct / n if n else 0.0}
    if chose is not None:
        out["strategy_match"] = chose / n if n else 0.0
    return out


def _bucket_key(key: str):
    family, _, strategy = key.partition("/")
    return (_FAMILY_ORDER.get(family, len(_FAMILY_ORDER)), family, _STRATEGY_ORDER.get(strategy, len(_STRATEGY_ORDER)),
            strategy)


def _difficulty_key(key: str):
    try:
        return (0, float(key), key)
    except ValueError:
        return (1, 0.0, key)


def score(records: list[dict], texts: list[str]) -> dict:
    """Exact-match accuracy of `texts` (one model response per record) via `tasks.is_correct`,
    and how often the response used the record's strategy (`tasks.response_strategy`: a trace for
    step_by_step problems, a lone answer line for direct ones), right answer or not.

    -> {n, correct, accuracy, strategy_match, answered (texts with an extractable answer),
        by_bucket: {"family/strategy": {n, correct, accuracy, strategy_match}},
        by_difficulty: {"d": {n, correct, accuracy}}}
    Buckets are ordered by tasks.FAMILIES/STRATEGIES, difficulties numerically; a record without
    `strategy` or `difficulty` is counted under "-".
    """
    if len(records) != len(texts):
        raise ValueError(f"{len(records)} records but {len(texts)} texts")
    counts = {"bucket": defaultdict(lambda: [0, 0, 0]), "difficulty": defaultdict(lambda: [0, 0])}
    correct = answered = chose = 0
    for rec, text in zip(records, texts):
        ok = tasks.is_correct(rec, text)
        same = tasks.response_strategy(rec["family"], text) == rec.get("strategy")
        correct += ok
        chose += same
        answered += tasks.extract_answer(rec["family"], text) is not None
        b = counts["bucket"][f"{rec['family']}/{rec.get('strategy', '-')}"]
        b[0], b[1], b[2] = b[0] + 1, b[1] + ok, b[2] + same
        diff = rec.get("difficulty")
        d = counts["difficulty"]["-" if diff is None else str(diff)]
        d[0], d[1] = d[0] + 1, d[1] + ok
    out = _cell(len(records), correct, chose)
    out["answered"] = answered
    out["by_bucket"] = {k: _cell(*counts["bucket"][k]) for k in sorted(counts["bucket"], key=_bucket_key)}
    out["by_difficulty"] = {k: _cell(*counts["difficulty"][k])
                            for k in sorted(counts["difficulty"], key=_difficulty_key)}
    return out


def evaluate_accuracy(model, tokenizer, records: list[dict], system_mode: str, batch_size: int = 32,
                      max_new_tokens: int = 200, state=None) -> dict:
    """Generate greedily for `records` under `system_mode` (strategy | generic | none) and score
    the answers (see `score`). Pass an accelerate `state` to shard the work over its processes;
    every rank then returns the same full result."""
    texts = generate_for_records(model, tokenizer, records, system_mode, batch_size, max_new_tokens, state)
    return score(records, texts)


# --------------------------------------------------------------------------- token metrics


def token_metrics(student, teacher, tokenizer, records: list[dict], system_mode: str, batch_size: int = 32,
                  state=None, source: str = "records") -> dict:
    """Per-response-token student CE, forward KL(teacher || student) at T = 1 and top-1
    agreement on the records' gold responses (kd.evaluate's token metrics): the teacher reads
    each record's strategy view, the student the `system_mode` view."""
    from kd.tools.evaluate import token_metrics as general

    out = general(student, teacher, tokenizer, records, system_mode, batch_size, state, source, targets="last",
                  max_length=1 << 30)
    out.pop("dropped")
    return out


# --------------------------------------------------------------------------- report


def format_table(result: dict) -> str:
    """Markdown tables of a result dict from `run` / `evaluate_accuracy`."""
    pct = lambda c: f"{100 * c['accuracy']:.1f}%"  # noqa: E731
    chose = lambda c: f"{100 * c['strategy_match']:.1f}%" if "strategy_match" in c else "–"  # noqa: E731
    lines = [
        f"accuracy of {result.get('model', 'model')} (system={result.get('system', '?')}, "
        f"{result['answered']}/{result['n']} responses gave an answer)",
        "",
        "| bucket | n | correct | accuracy | used its strategy |",
        "|:--|--:|--:|--:|--:|",
        f"| all | {result['n']} | {result['correct']} | {pct(result)} | {chose(result)} |",
    ]
    lines += [f"| {k} | {c['n']} | {c['correct']} | {pct(c)} | {chose(c)} |" for k, c in result["by_bucket"].items()]
    lines += ["", "| difficulty | n | correct | accuracy |", "|--:|--:|--:|--:|"]
    lines += [f"| {k} | {c['n']} | {c['correct']} | {pct(c)} |" for k, c in result["by_difficulty"].items()]
    tm = result.get("token_metrics")
    if tm:
        lines += ["", f"| gold-response tokens vs teacher {result.get('teacher', '')} | value |", "|:--|--:|",
                  f"| student CE | {tm['ce']:.4f} |", f"| student ppl | {tm['ppl']:.2f} |",
                  f"| forward KL (T=1) | {tm['forward_kl']:.4f} |",
                  f"| top-1 agreement | {100 * tm['top1_agreement']:.1f}% |", f"| tokens | {tm['tokens']} |"]
    return "\n".join(lines)


def _scorable(rec: dict) -> str | None:
    if rec["family"] not in tasks.FAMILIES:
        return f"unknown family {rec['family']!r} (known: {', '.join(tasks.FAMILIES)})"
    return None


def run(args) -> dict:
    """The accuracy command; returns the result dict on every rank (printed/written on rank 0)."""
    required = ("prompt", "family", "answer") + (("response",) if args.teacher else ())
    records = read_records(args.data, args.limit, required=required, validate=_scorable)
    quiet_libraries()  # after the cheap input checks, which need no heavy imports
    state = make_state()
    tok, model = load_for_generation(args.model, args.dtype, state.device)
    teacher = None
    if args.teacher:  # loaded before generating so a bad teacher fails fast
        from kd.models import check_same_tokenizer, check_vocab, load_model, load_tokenizer, resolve_dtype

        check_same_tokenizer(tok, load_tokenizer(args.teacher), args.model, args.teacher)
        teacher = load_model(args.teacher, resolve_dtype(args.dtype, state.device.type), None, "teacher")
        teacher = teacher.to(state.device).eval()
        check_vocab(model, len(tok), "model")
        check_vocab(teacher, len(tok), "teacher")
    result = {"model": args.model, "data": args.data, "system": args.system, "teacher": args.teacher,
              "max_new_tokens": args.max_new_tokens, "limit": args.limit}
    result.update(evaluate_accuracy(model, tok, records, args.system, args.batch_size, args.max_new_tokens, state))
    if teacher is not None:
        result["token_metrics"] = token_metrics(model, teacher, tok, records, args.system, args.batch_size, state,
                                                source=args.data)
    if state.is_main_process:
        print(format_table(result))
        if args.json:
            _write_json(Path(args.json), result)
    state.wait_for_everyone()
    return result


def _write_json(path: Path, obj) -> None:
    """Atomic: a reader never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def parse_args(argv=None):
    ap = ArgParser(prog="python -m kd.accuracy",
                   description="Exact-match task accuracy of greedy generations (plus token metrics with --teacher).")
    add_common_args(ap, system_required=True)
    ap.add_argument("--data", required=True, help="JSONL eval records (prompt, system, family, answer, ...)")
    ap.add_argument("--teacher", default=None, help="also report CE/KL/top-1 agreement against this teacher")
    ap.add_argument("--json", default=None, help="write every number to this JSON file")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one `kd: error:` line on stderr and exit status 2."""
    args = parse_args(argv)
    with one_line_errors():
        run(args)


if __name__ == "__main__":
    main()
