"""Score a student on any data kd.train reads: token metrics against a teacher, and generations.

    python -m kd.evaluate --model runs/kd/student --data eval.jsonl --teacher builtin:tiny-teacher
    python -m kd.evaluate --model runs/kd/checkpoints/step_00000050 --data chats.jsonl --system none \
        --answer-regex "answer is (-?\\d+)" --output generations.jsonl
    accelerate launch -m kd.evaluate --model <student> --data <file> --teacher <teacher>

--model is an exported student, a training checkpoint directory (`checkpoints/step_N`, or a run
directory: its latest checkpoint; the student is rebuilt from the recorded config, LoRA included),
a `builtin:` name or a hub id. Records are read as kd.train reads them (prompt/response, messages,
ShareGPT; .jsonl, .json, .parquet, save_to_disk directories or `--dataset` on the hub).

Token metrics, per response token over every assistant turn (`--targets last`: the final one):
the student's CE and perplexity under its view (`--system`: generic = the erased instruction
replaced by GENERIC_SYSTEM, none = erased, strategy = kept), and with `--teacher` (reading the
strategy view, as in training) the divergence (`--divergence`, `--kd-temperature`) and top-1
agreement. Generation metrics: the student answers each conversation's last user turn under the
same view (greedy, or sampled with --temperature/--top-p/--num-samples); exact match of the whole
response (whitespace-normalised), or with --answer-regex of the answer it captures (group 1 if
the pattern has a group) in the response and in the reference.

Prints a readable table and then one JSON line with every number; --output writes one JSON line
per record (reference, generations, extracted answers, match). Under `accelerate launch` ranks take
strided shards; results meet on rank 0.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

from kd.cli import one_line_errors, quiet_libraries
from kd.errors import DataError, KDError, ModelError
from kd.tools.generate import ArgParser, _positive, add_common_args, add_sampling_args, sampling_from
from kd.tools.generation import Sampling, generate_for_records, make_state
from kd.tools.prompt_records import GENERIC_SYSTEM, read_records
from kd.tools.shards import shard, write_jsonl_atomic

# --------------------------------------------------------------------------- records


def reference_of(record: dict, where: str = "record") -> str:
    """The record's last assistant turn: what a generation is compared with."""
    from kd.data.records import to_conversation

    return to_conversation(record, where)[1][-1]["content"]


def _scorable(record: dict) -> str | None:
    try:
        reference_of(record, "@")
    except DataError as e:
        return str(e).removeprefix("@: ")
    return None


def data_source(args) -> str:
    """What was scored, as the output names it: a DatasetDict's or the hub's split included."""
    if args.data is None:
        return f"{args.dataset}[{args.split}]"
    return f"{args.data}[{args.split}]" if (Path(args.data) / "dataset_dict.json").is_file() else args.data


def load_data(args) -> list[dict]:
    if args.dataset:
        from kd.data.records import load_records

        ds = load_records(None, args.dataset, args.dataset_config, args.split)
        rows = [{k: v for k, v in ds[i].items() if not k.startswith("_")}
                for i in range(len(ds) if args.limit is None else min(args.limit, len(ds)))]
        for i, r in enumerate(rows):
            problem = _scorable(r)
            if problem:
                raise DataError(f"{args.dataset}[{args.split}] row {i}: {problem}")
        return rows
    return read_records(args.data, args.limit, validate=_scorable, split=args.split)


# --------------------------------------------------------------------------- models


def checkpoint_dir(path: str) -> Path | None:
    """A training checkpoint directory (or a run directory's latest), else None."""
    from kd.checkpoint import STATE_FILE, candidates

    p = Path(path)
    if (p / STATE_FILE).is_file():
        return p
    if (p / "checkpoints").is_dir() and not (p / "config.json").is_file():
        found = candidates(str(p))
        if not found:
            raise ModelError(f"{path}: a run directory without checkpoints")
        return found[0]
    return None


def load_student(name: str, dtype: str, device, chat_template: str | None, state):
    """(tokenizer, student in eval mode on `device`, where it came from) for an exported model, a
    builtin/hub name, or a verified training checkpoint."""
    from kd import checkpoint, models
    from kd.config import from_flat

    ckpt = checkpoint_dir(name)
    if ckpt is None:
        tok = models.load_tokenizer(name, chat_template)
        model = models.load_model(name, models.resolve_dtype(dtype, device.type), None, "model")
        return tok, model.to(device).eval(), name
    problem = checkpoint.verify(state, ckpt)
    if problem:
        raise ModelError(f"checkpoint {ckpt} is damaged or incomplete: {problem}")
    if (ckpt / checkpoint.ENGINE_DIR).is_dir():
        raise ModelError(f"{ckpt} is a DeepSpeed checkpoint (per-rank partitions); evaluate the run's exported "
                         f"student, or rebuild full weights with DeepSpeed's zero_to_fp32.py in {ckpt / 'engine'}")
    cfg = from_flat(json.loads((ckpt / checkpoint.STATE_FILE).read_text())["config"])
    cfg.student.dtype = dtype if dtype != "auto" else cfg.student.dtype
    tok = models.load_tokenizer(models.tokenizer_source(cfg, "student"), chat_template or cfg.data.chat_template)
    student = models.load_student(cfg, len(tok), device.type)
    checkpoint.load_weights(student, ckpt, device, prefix="student.")
    return tok, student.to(device).eval(), f"{ckpt} ({cfg.student.name_or_path}, step {ckpt.name.split('_')[-1].lstrip('0') or 0})"


# --------------------------------------------------------------------------- token metrics


def views_of(records, tokenizer, system_mode: str, targets: str, max_length: int, source: str,
             offset: int = 0) -> tuple[list[dict], int]:
    """Training-style examples (teacher: strategy view; student: `system_mode` view) -> (examples,
    records that do not fit in max_length)."""
    from kd.data.views import conversation_rows

    erase = system_mode != "strategy"
    generic = GENERIC_SYSTEM if system_mode == "generic" else None
    examples, dropped = [], 0
    for i, rec in records:
        rows, _ = conversation_rows(rec, tokenizer, erase=erase, generic_system=generic, targets=targets,
                                    max_length=max_length, min_prompt=8, where=f"{source} record {i + 1}")
        dropped += not rows
        examples.extend(rows)
    return examples, dropped


def token_metrics(student, teacher, tokenizer, records: list[dict], system_mode: str, batch_size: int = 8,
                  state=None, source: str = "records", targets: str = "all_assistant", max_length: int = 4096,
                  divergence: str = "forward_kl", temperature: float = 1.0) -> dict:
    """Per-response-token CE (and perplexity) of the student under `system_mode`; with a teacher
    (strategy view) also the divergence at `temperature` and top-1 agreement. Sharded over
    `state`'s processes when given; every rank returns the global averages."""
    import torch

    from kd.data import collate
    from kd.forward import eval_sums, fp32_logits, head, response_hidden
    from kd.loss import LossSpec
    from kd.loss.dense import token_losses

    world = 1 if state is None else state.num_processes
    rank = 0 if state is None else state.process_index
    examples, dropped = views_of(shard(list(enumerate(records)), rank, world), tokenizer, system_mode, targets,
                                 max_length, source)
    spec = LossSpec(vocab_size=len(tokenizer), alpha=0.5, temperature=temperature, divergence=divergence)
    device = next(student.parameters()).device
    keys = ("ce", "kd", "top1_agreement", "tokens", "dropped")
    totals = torch.zeros(len(keys), dtype=torch.float64)
    totals[4] = dropped
    student.eval()
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate(examples[start:start + batch_size],
                                                         tokenizer.pad_token_id).items()}
            if teacher is not None:
                sums = eval_sums(student, teacher, batch, spec)
                part = [sums["ce"], sums["kd"], sums["top1_agreement"], sums["tokens"]]
            else:
                logits = fp32_logits(response_hidden(student, batch, "student"), head(student))[:, :spec.vocab_size]
                ce, _ = token_losses(logits, None, batch["labels"], spec)
                part = [ce.sum(), 0.0, 0.0, float(batch["labels"].numel())]
            totals[:4] += torch.tensor([float(v) for v in part], dtype=torch.float64)
    if world > 1:
        from accelerate.utils import gather_object

        totals = torch.tensor(gather_object([totals.tolist()]), dtype=torch.float64).sum(0)
    n = totals[3].item()
    if not math.isfinite(totals[:3].sum().item()):
        raise KDError("token metrics are non-finite (NaN/inf): check the model's weights and dtype")
    ce = totals[0].item() / max(n, 1.0)
    out = {"tokens": int(n), "dropped": int(totals[4].item()), "ce": ce, "ppl": math.exp(min(ce, 50.0))}
    if teacher is not None:
        out.update({divergence: totals[1].item() / max(n, 1.0), "top1_agreement": totals[2].item() / max(n, 1.0)})
    return out


# --------------------------------------------------------------------------- generation metrics


def normalise(text: str) -> str:
    return " ".join(text.split())


def extract(text: str, pattern: re.Pattern | None) -> str | None:
    """The compared answer: the whole (normalised) text, or what `pattern` captures in it."""
    if pattern is None:
        return normalise(text)
    m = pattern.search(text)
    if m is None:
        return None
    return normalise(m.group(1) if pattern.groups else m.group(0))


def generation_metrics(records: list[dict], samples: list[list[str]], pattern: re.Pattern | None) -> tuple[dict, list[dict]]:
    """-> (summary, one row per record). exact_match: the mean over records of the share of samples
    whose answer equals the reference's; any_match: a sample matched (pass@n); answered: samples
    with an extractable answer; no_reference: records whose reference has none (scored as wrong)."""
    rows, exact, any_match, answered, no_ref = [], 0.0, 0, 0, 0
    for rec, texts in zip(records, samples, strict=True):
        ref = reference_of(rec)
        want = extract(ref, pattern)
        got = [extract(t, pattern) for t in texts]
        hits = [g is not None and want is not None and g == want for g in got]
        exact += sum(hits) / len(hits)
        any_match += any(hits)
        answered += sum(g is not None for g in got)
        no_ref += want is None
        rows.append({"reference": ref, "reference_answer": want, "generations": texts, "answers": got,
                     "match": hits})
    n = max(len(records), 1)
    k = max(len(samples[0]) if samples else 1, 1)
    summary = {"exact_match": exact / n, "answered": answered / (n * k)}
    if k > 1:
        summary["any_match"] = any_match / n
    if pattern is not None:
        summary["no_reference_answer"] = no_ref
    return summary, rows


# --------------------------------------------------------------------------- report


def format_table(result: dict) -> str:
    pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731
    lines = [f"kd.evaluate: {result['model']} on {result['data']} ({result['records']} records, student view: "
             f"{result['system']} system)", "| metric | value |", "|---|---:|"]
    t = result.get("tokens")
    if t:
        lines.append(f"| response tokens | {t['tokens']:,}" + (f" ({t['dropped']} records longer than --max-length "
                                                            f"left out)" if t["dropped"] else "") + " |")
        lines.append(f"| student CE / token | {t['ce']:.4f} |")
        lines.append(f"| perplexity | {t['ppl']:.3f} |")
        if "top1_agreement" in t:
            lines.append(f"| {result['divergence']} (T={result['kd_temperature']:g}) / token | "
                         f"{t[result['divergence']]:.4f} |")
            lines.append(f"| top-1 agreement with the teacher | {pct(t['top1_agreement'])} |")
    g = result.get("generation")
    if g:
        what = "answer (regex)" if result.get("answer_regex") else "response"
        lines.append(f"| exact match of the {what} | {pct(g['exact_match'])} |")
        if "any_match" in g:
            lines.append(f"| any of {result['num_samples']} samples matches | {pct(g['any_match'])} |")
        lines.append(f"| generations with an answer | {pct(g['answered'])} |")
        if g.get("no_reference_answer"):
            lines.append(f"| references without an answer (scored wrong) | {g['no_reference_answer']} |")
    return "\n".join(lines)


def run(args) -> dict:
    pattern = None
    if args.answer_regex:
        try:
            pattern = re.compile(args.answer_regex)
        except re.error as e:
            raise KDError(f"--answer-regex {args.answer_regex!r}: {e}") from None
    if not args.generate and not args.tokens:
        raise KDError("nothing to measure: --no-generate and --no-tokens together")
    records = load_data(args)
    sampling = sampling_from(args)
    quiet_libraries()
    state = make_state()
    tok, student, origin = load_student(args.model, args.dtype, state.device, args.chat_template, state)
    if tok.chat_template is None:
        raise ModelError(f"tokenizer of {args.model!r} has no chat template; pass --chat-template chatml, llama2 or "
                         f"a Jinja template")
    source = data_source(args)
    result = {"model": origin, "data": source, "records": len(records), "system": args.system,
              "targets": args.targets}
    if args.tokens:
        teacher = None
        if args.teacher:
            from kd import models

            t_tok = models.load_tokenizer(args.teacher, args.chat_template)
            models.check_same_tokenizer(tok, t_tok, args.model, args.teacher)
            teacher = models.load_model(args.teacher, models.resolve_dtype(args.dtype, state.device.type), None,
                                        "teacher").to(state.device).eval()
            result.update(teacher=args.teacher, divergence=args.divergence, kd_temperature=args.kd_temperature)
        result["tokens"] = token_metrics(student, teacher, tok, records, args.system, args.batch_size, state, source,
                                         args.targets, args.max_length, args.divergence, args.kd_temperature)
        del teacher
    if args.generate:
        texts = generate_for_records(student, tok, records, args.system, args.batch_size, args.max_new_tokens, state,
                                     Sampling(sampling.temperature, sampling.top_p, sampling.n, sampling.seed))
        samples = texts if sampling.n > 1 else [[t] for t in texts]
        result["generation"], rows = generation_metrics(records, samples, pattern)
        result.update(answer_regex=args.answer_regex, num_samples=sampling.n, temperature=sampling.temperature)
        if args.output and state.is_main_process:
            write_jsonl_atomic(Path(args.output), ({"index": i, **row} for i, row in enumerate(rows)))
    if state.is_main_process:
        print(format_table(result))
        print(json.dumps(result))
        sys.stdout.flush()
    state.wait_for_everyone()
    return result


def parse_args(argv=None):
    from kd.loss.spec import DIVERGENCES

    ap = ArgParser(prog="python -m kd.evaluate", description=__doc__.split("\n")[0])
    add_common_args(ap)
    add_sampling_args(ap)
    ap.set_defaults(system="generic", batch_size=8)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="records file (.jsonl, .json, .parquet) or save_to_disk directory")
    src.add_argument("--dataset", help="a datasets hub name")
    ap.add_argument("--dataset-config", default=None)
    ap.add_argument("--split", default="test", help="the split of --dataset, or of a --data DatasetDict directory")
    ap.add_argument("--teacher", help="teacher for the divergence and top-1 agreement (hub id, path or builtin:)")
    ap.add_argument("--divergence", choices=DIVERGENCES, default="forward_kl")
    ap.add_argument("--kd-temperature", type=float, default=1.0, help="temperature of the divergence")
    ap.add_argument("--targets", choices=("all_assistant", "last"), default="all_assistant",
                    help="assistant turns the token metrics cover")
    ap.add_argument("--max-length", type=_positive, default=4096, help="tokens per view for the token metrics")
    ap.add_argument("--answer-regex", help="compare the answer this captures (group 1 if any) instead of the "
                                           "whole response")
    ap.add_argument("--no-generate", dest="generate", action="store_false", help="token metrics only")
    ap.add_argument("--no-tokens", dest="tokens", action="store_false", help="generation metrics only")
    ap.add_argument("--output", help="JSONL of per-record generations, answers and matches")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with one_line_errors():
        run(args)


if __name__ == "__main__":
    main()
