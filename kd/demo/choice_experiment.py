"""The entropy experiment: where logit KD beats training on teacher samples (docs/results-entropy.md).

    python -m kd.experiment --config configs/experiment/entropy.yaml [--seeds 5] [--sizes 250,1000,4000]

Task: kd/demo/choice.py, whose problems have several valid answers; the teacher
(builtin:tiny-choice-teacher) was trained on uniformly drawn valid answers, so it spreads its
probability at the choice points. Steps:

1. The protocol (arms, sizes, seeds, metrics, settings) is written into the report before any
   student is evaluated; a rerun with other settings starts a new protocol, and says so.
2. Distillation data: one teacher sample per training prompt (temperature 1, seeded, with the
   strategy instruction shown); a size n uses the first n prompts. Fresh teacher samples of the
   held-out prompts (another seed) are the reference for the token metrics.
3. Teacher figures: validity with and without its instructions, mean per-token entropy of its
   next-token distribution on response tokens and at choice tokens (first token of each freely
   chosen word), on the fresh samples.
4. Every arm x size x seed trains a student with `python -m kd.train` (same optimizer steps for
   every size) and is evaluated under the generic system message: validity accuracy greedy and
   sampled (T = 1, one sample, seeded), right-strategy rate (greedy), NLL of the fresh teacher
   samples, KL(teacher || student) at T = 1 on them, and the expected calibration error of the
   student's top-1 next-token probability on them (10 equal-width bins).
5. The report: per cell mean ± std, paired differences by seed (b - a, c - a) with 95 % paired-t
   intervals, a plot of validity and NLL against data size per arm, the wall time.

Finished runs are reused when their settings match (<out>/runs/<arm>/n<size>/seed<k>/result.json).
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kd.demo.runs import ROOT, digest, load, model_digest, read_jsonl, train_cached

# two-sided 95 % quantiles of Student's t by degrees of freedom (1..30); above, the normal's
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]
PROTOCOL, RESULTS = "<!-- protocol -->", "<!-- results -->"
NOTES = "<!-- notes: kept across reruns -->"  # the hand-written reading below it survives a rerun


def paired_ci(diffs: list[float]) -> tuple[float, float, float]:
    """(mean, low, high) of a 95 % paired-t interval for the mean difference."""
    n = len(diffs)
    m = statistics.fmean(diffs)
    if n < 2:
        return m, float("nan"), float("nan")
    half = (_T975[n - 2] if n - 1 <= len(_T975) else 1.96) * statistics.stdev(diffs) / math.sqrt(n)
    return m, m - half, m + half


# --------------------------------------------------------------------------- token statistics


def _choice_starts(text: str) -> set[int]:
    """Character offsets where a freely chosen word begins (the answer word of a direct response,
    each numbered pick of a step-by-step one; the closing list only repeats the picks)."""
    import re

    starts = {m.start(1) for m in re.finditer(r"^\d+\. ([a-z]+)", text, flags=re.M)}
    if not starts:
        m = re.search(r"The answer is ([a-z]+)", text)
        starts = {m.start(1)} if m else set()
    return starts


def token_stats(model, tok, records: list[dict], system_mode: str, batch_size: int = 50) -> dict[str, list]:
    """Per response token of `records` (their last assistant turn) under `system_mode`: entropy of
    the model's next-token distribution, its top-1 probability, whether top-1 is the token, and
    whether the token starts a freely chosen word."""
    import torch

    from kd.data import collate
    from kd.data.views import conversation_rows
    from kd.forward import fp32_logits, head, response_hidden
    from kd.tools.prompt_records import GENERIC_SYSTEM

    out = {"entropy": [], "top1_prob": [], "correct": [], "choice": []}
    rows, flags = [], []
    for i, r in enumerate(records):
        (row,), _ = conversation_rows(r, tok, erase=system_mode != "strategy",
                                      generic_system=GENERIC_SYSTEM if system_mode == "generic" else None,
                                      targets="last", max_length=1 << 20, min_prompt=8, where=f"record {i}")
        target = row["student_ids"][row["student_starts"][-1]:]
        starts = _choice_starts(r["response"])
        # token k covers the characters [ends[k], ends[k + 1]) of the response: a choice token
        # is the one covering a chosen word's first character
        ends = [len(tok.decode(target[:k], skip_special_tokens=True)) for k in range(len(target) + 1)]
        flags.append([any(ends[k] <= c < ends[k + 1] for c in starts) for k in range(len(target))])
        rows.append(row)
    model.eval()
    with torch.no_grad():
        for b in range(0, len(rows), batch_size):
            batch = collate(rows[b:b + batch_size], tok.pad_token_id)
            logits = fp32_logits(response_hidden(model, batch, "student"), head(model))[:, :len(tok)]
            logp = torch.log_softmax(logits, -1)
            p = logp.exp()
            out["entropy"] += (-(p * logp).sum(-1)).tolist()
            top = p.max(-1)
            out["top1_prob"] += top.values.tolist()
            out["correct"] += (top.indices == batch["labels"]).tolist()
            out["choice"] += [f for fl in flags[b:b + batch_size] for f in fl]
    return out


def ece(top1_prob: list[float], correct: list[bool], bins: int = 10) -> float:
    """Expected calibration error of top-1 probabilities, equal-width bins."""
    total, err = len(top1_prob), 0.0
    for k in range(bins):
        lo, hi = k / bins, (k + 1) / bins
        idx = [i for i, p in enumerate(top1_prob) if lo < p <= hi or (k == 0 and p == 0)]
        if idx:
            conf = statistics.fmean(top1_prob[i] for i in idx)
            acc = statistics.fmean(float(correct[i]) for i in idx)
            err += len(idx) / total * abs(acc - conf)
    return err


# --------------------------------------------------------------------------- steps


def teacher_samples(s: dict, records: list[dict], seed: int, path: Path, log) -> list[dict]:
    """One teacher sample per record (strategy view, T = s.sampling.temperature), cached by settings."""
    from kd.tools.generation import Sampling, generate_for_records
    from kd.tools.shards import write_jsonl_atomic

    g = s["sampling"]
    key = digest([s["teacher"], model_digest(s["teacher"]), [r["prompt"] for r in records], g, seed])
    meta = path.with_suffix(".meta.json")
    if path.is_file() and meta.is_file() and json.loads(meta.read_text()).get("key") == key:
        return read_jsonl(path)
    tok, model = load(s["teacher"])
    t0 = time.time()
    texts = generate_for_records(model, tok, records, "strategy", g["batch_size"], g["max_new_tokens"],
                                 sampling=Sampling(g["temperature"], 1.0, 1, seed))
    out = [{**r, "response": t} for r, t in zip(records, texts)]
    write_jsonl_atomic(path, out)
    meta.write_text(json.dumps({"key": key, "seconds": round(time.time() - t0, 1)}) + "\n")
    log(f"teacher samples: {len(out)} -> {path} ({time.time() - t0:.0f} s)")
    return out


def validity(model, tok, records: list[dict], mode: str, e: dict, temperature: float = 0.0, seed: int = 0) -> dict:
    from kd.demo import choice
    from kd.tools.generation import Sampling, generate_for_records

    texts = generate_for_records(model, tok, records, mode, e["batch_size"], e["max_new_tokens"],
                                 sampling=Sampling(temperature, 1.0, 1, seed))
    n = len(records)
    return {"valid": sum(choice.is_valid(r, t) for r, t in zip(records, texts)) / n,
            "right_strategy": sum(choice.response_strategy(t) == r["strategy"] for r, t in zip(records, texts)) / n}


def evaluate_student(model_dir: str, s: dict, fresh: list[dict], teacher) -> dict:
    from kd.tools.evaluate import token_metrics

    e = s["eval"]
    tok, model = load(model_dir)
    greedy = validity(model, tok, fresh, "generic", e)
    sampled = validity(model, tok, fresh, "generic", e, temperature=1.0, seed=e["sample_seed"])
    tm = token_metrics(model, teacher, tok, fresh, "generic", e["batch_size"], targets="last")
    st = token_stats(model, tok, fresh, "generic", e["batch_size"])
    return {"valid_greedy": greedy["valid"], "valid_sampled": sampled["valid"],
            "right_strategy": greedy["right_strategy"], "nll": tm["ce"], "kl": tm["forward_kl"],
            "ece": ece(st["top1_prob"], st["correct"])}


def run_one(s: dict, arm: str, size: int, seed: int, data: Path, out: Path, fresh, teacher, log,
            train_only: bool = False) -> dict | None:
    run_dir = out / "runs" / arm / f"n{size}" / f"seed{seed}"
    overrides = {**s["train_overrides"], **s["arms"][arm]["overrides"],
                 "teacher.name_or_path": s["teacher"], "student.name_or_path": s["student"],
                 "data.train_files": f"[{data}]", "data.eval_fraction": 0, "train.seed": seed,
                 "train.output_dir": str(run_dir), "train.resume": "off", "log.progress_bar": "false",
                 "log.tracker": "none"}
    key = digest([overrides, s["base_config"], model_digest(s["teacher"]), s["eval"],
                  data.with_suffix(".meta.json").read_text() if data.with_suffix(".meta.json").is_file() else ""])
    res_path = run_dir / "result.json"
    if res_path.is_file() and json.loads(res_path.read_text()).get("key") == key:
        return None if train_only else json.loads(res_path.read_text())
    trained = train_cached(run_dir, s["base_config"], overrides, key, f"{arm} n={size} seed {seed}", log)
    if train_only:
        return None
    t0 = time.time()
    res = evaluate_student(str(run_dir / "student"), s, fresh, teacher)
    res.update(key=key, arm=arm, size=size, seed=seed, train_seconds=trained["train_seconds"],
               eval_seconds=round(time.time() - t0, 1))
    res_path.write_text(json.dumps(res, indent=2) + "\n")
    log(f"{arm} n={size} seed {seed}: valid {res['valid_greedy']:.3f}, NLL {res['nll']:.3f}")
    return res


# --------------------------------------------------------------------------- report

METRICS = (("valid_greedy", "valid (greedy) %", True), ("valid_sampled", "valid (sampled) %", True),
           ("right_strategy", "right strategy %", True), ("nll", "NLL of teacher samples", False),
           ("kl", "KL(t‖s)", False), ("ece", "ECE %", True))


def protocol(s: dict, command: str) -> str:
    ov = s["train_overrides"]
    arms = "; ".join(f"{a['label']}: " + ", ".join(f"`{k}={v}`" for k, v in a["overrides"].items())
                     for a in s["arms"].values())
    return "\n".join([
        "## Protocol (written before any student was evaluated)", "",
        f"- command: `{command}`",
        f"- task: kd/demo/choice.py (every problem has several valid answers); teacher `{s['teacher']}` "
        f"(`scripts/train_teacher.py --task choice`), student `{s['student']}`.",
        f"- distillation data: one teacher sample per prompt of `{s['train_prompts']}` (temperature "
        f"{s['sampling']['temperature']}, seed {s['sampling']['seed']}, strategy instruction shown); data sizes "
        f"{', '.join(map(str, s['sizes']))} distinct prompts (the first n), the same "
        f"{ov['train.max_steps']} optimizer steps for every size.",
        f"- arms (erasure on unless stated; alpha, T and divergence fixed here, not tuned): {arms}.",
        f"- training: `python -m kd.train --config {s['base_config']}` with "
        + ", ".join(f"`{k}={v}`" for k, v in ov.items()) + ".",
        f"- seeds: {s['seeds']} per cell (`train.seed` 0..{s['seeds'] - 1}); comparisons are paired by seed: "
        "b − a and c − a with 95 % paired-t intervals; an interval that excludes 0 is called a difference.",
        f"- evaluation, students under the generic system message, on the {s['eval']['n']} held-out prompts "
        f"of `{s['eval_data']}` (no prompt shared with the training pool): validity (kd/demo/choice.py "
        "`is_valid`: every named word in the category, none excluded, none repeated, as many as asked) of "
        "the greedy answer and of one sample at T = 1; right-strategy rate of the greedy answer; on one fresh "
        f"teacher sample per prompt (seed {s['eval']['fresh_seed']}): the student's NLL per response token, "
        "KL(teacher ‖ student) at T = 1 (teacher reading the strategy view), and the expected calibration "
        "error of its top-1 next-token probability (10 equal-width bins).",
        "- no tuning was done on the evaluation prompts; the settings above are those of the first run.", ""])


def render(s: dict, teacher: dict, runs: list[dict], timings: dict) -> str:
    arms, sizes = list(s["arms"]), s["sizes"]
    cell = {(r["arm"], r["size"]): [] for r in runs}
    for r in runs:
        cell[(r["arm"], r["size"])].append(r)

    def pm(xs, pct):
        f, d = (100.0, 1) if pct else (1.0, 3)
        m = statistics.fmean(xs)
        return f"{f * m:.{d}f} ± {f * statistics.stdev(xs):.{d}f}" if len(xs) > 1 else f"{f * m:.{d}f}"

    lines = ["## Teacher", "",
             f"Validity with its instructions {100 * teacher['strategy']['valid']:.1f} %, with the generic system "
             f"message {100 * teacher['generic']['valid']:.1f} %; mean next-token entropy on its own fresh samples "
             f"{teacher['entropy_all']:.3f} nats per response token and {teacher['entropy_choice']:.3f} nats at "
             f"choice tokens ({teacher['n_choice']} of {teacher['n_tokens']} tokens; log 5 = 1.609, log 7 = 1.946).",
             "", "## Table (mean ± std over seeds)", "",
             "| arm | n | " + " | ".join(m[1] for m in METRICS) + " |", "|:--|--:|" + "--:|" * len(METRICS)]
    for a in arms:
        for n in sizes:
            rs = cell.get((a, n), [])
            if rs:
                lines.append(f"| {s['arms'][a]['label']} | {n} | "
                             + " | ".join(pm([r[k] for r in rs], pct) for k, _, pct in METRICS) + " |")
    lines += ["", "## Paired differences (95 % paired-t interval; * = excludes 0)", "",
              "| comparison | n | " + " | ".join(m[1] for m in METRICS) + " |", "|:--|--:|" + "--:|" * len(METRICS)]
    for b in [x for x in ("kd", "onpolicy") if x in arms]:
        if "ce" not in arms:
            break
        for n in sizes:
            base = {r["seed"]: r for r in cell.get(("ce", n), [])}
            other = {r["seed"]: r for r in cell.get((b, n), [])}
            seeds = sorted(base.keys() & other.keys())
            if not seeds:
                continue
            cells = []
            for k, _, pct in METRICS:
                m, lo, hi = paired_ci([other[sd][k] - base[sd][k] for sd in seeds])
                f = 100.0 if pct else 1.0
                star = "*" if (lo > 0 or hi < 0) else ""
                cells.append(f"{f * m:+.{1 if pct else 3}f} [{f * lo:+.{1 if pct else 3}f}, {f * hi:+.{1 if pct else 3}f}]{star}")
            lines.append(f"| {b} − ce | {n} | " + " | ".join(cells) + " |")
    lines += ["", f"![validity and NLL against data size]({Path(s['plot']).name})", "",
              f"Wall time {timings['total'] / 60:.1f} min on {platform.processor() or platform.machine()} "
              f"({timings['jobs']} training runs at a time, {timings['threads']} thread each).", ""]
    return "\n".join(lines)


def plot(s: dict, runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for a in s["arms"]:
        for ax, key in zip(axes, ("valid_greedy", "nll")):
            xs, ys, es = [], [], []
            for n in s["sizes"]:
                v = [r[key] for r in runs if r["arm"] == a and r["size"] == n]
                if v:
                    xs.append(n)
                    ys.append(statistics.fmean(v))
                    es.append(statistics.stdev(v) if len(v) > 1 else 0.0)
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=s["arms"][a]["label"])
    for ax, title in zip(axes, ("validity (greedy)", "NLL of teacher samples")):
        ax.set_xscale("log")
        ax.set_xlabel("distinct training prompts")
        ax.set_title(title)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


# --------------------------------------------------------------------------- main


def main(s: dict, args, command: str) -> None:
    import torch

    out = Path(args.out or Path("runs/experiment") / Path(args.config).stem)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    def log(msg):
        print(f"[{(time.time() - t_start) / 60:5.1f} min] {msg}", flush=True)

    report = Path(args.report or s["report"])
    if args.sizes:
        s["sizes"] = [int(x) for x in args.sizes.split(",")]
    prompts = read_jsonl(ROOT / s["train_prompts"], max(s["sizes"]))
    evals = read_jsonl(ROOT / s["eval_data"], s["eval"].get("limit"))
    s["eval"]["n"] = len(evals)
    text = protocol(s, command)
    if not args.no_report:
        old = report.read_text() if report.is_file() else ""
        if PROTOCOL in old and old.split(PROTOCOL)[1].split(RESULTS)[0].strip() != text.strip():
            log(f"{report}: the settings differ from the recorded protocol; a new protocol is written")
        report.parent.mkdir(parents=True, exist_ok=True)
        notes = old[old.index(NOTES):] if NOTES in old else ""
        report.write_text(f"# {s['title']}\n\n{s.get('intro', '').strip()}\n\n{PROTOCOL}\n{text}\n{RESULTS}\n"
                          f"(results pending)\n\n{notes}")
    train = teacher_samples(s, prompts, s["sampling"]["seed"], out / "data" / "teacher_train.jsonl", log)
    fresh = teacher_samples(s, evals, s["eval"]["fresh_seed"], out / "data" / "teacher_eval.jsonl", log)
    files = {}
    for n in s["sizes"]:
        files[n] = out / "data" / f"train_n{n}.jsonl"
        if not files[n].is_file() or read_jsonl(files[n]) != train[:n]:
            files[n].write_text("".join(json.dumps(r) + "\n" for r in train[:n]))
            files[n].with_suffix(".meta.json").write_text(json.dumps({"key": digest(train[:n])}) + "\n")
    tok, teacher = load(s["teacher"])
    e = s["eval"]
    st = token_stats(teacher, tok, fresh, "strategy", e["batch_size"])
    ent_choice = [h for h, c in zip(st["entropy"], st["choice"]) if c]
    teacher_res = {m: validity(teacher, tok, evals, m, e) for m in ("strategy", "generic")}
    teacher_res.update(entropy_all=statistics.fmean(st["entropy"]),
                       entropy_choice=statistics.fmean(ent_choice) if ent_choice else float("nan"),
                       n_choice=len(ent_choice), n_tokens=len(st["entropy"]))
    log(f"teacher: valid {teacher_res['strategy']['valid']:.3f} / {teacher_res['generic']['valid']:.3f}; entropy "
        f"{teacher_res['entropy_all']:.3f} all, {teacher_res['entropy_choice']:.3f} at choices")
    jobs = [(a, n, seed) for a in s["arms"] for n in s["sizes"] for seed in range(s["seeds"])]
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda j: run_one(s, *j, files[j[1]], out, fresh, teacher, log, train_only=True), jobs))
    runs = [run_one(s, a, n, seed, files[n], out, fresh, teacher, log) for a, n, seed in jobs]
    timings = dict(total=time.time() - t_start, jobs=args.jobs, threads=args.threads, torch=torch.__version__)
    (out / "results.json").write_text(json.dumps(dict(settings=s, command=command, teacher=teacher_res, runs=runs,
                                                      timings=timings), indent=2) + "\n")
    body = render(s, teacher_res, runs, timings)
    print(body)
    if not args.no_report:
        plot(s, runs, report.parent / Path(s["plot"]).name)
        old = report.read_text() if report.is_file() else ""
        notes = old[old.index(NOTES):] if NOTES in old else ""
        report.write_text(f"# {s['title']}\n\n{s.get('intro', '').strip()}\n\n{PROTOCOL}\n{text}\n{RESULTS}\n{body}\n"
                          f"{notes}")
        log(f"wrote {report}")

