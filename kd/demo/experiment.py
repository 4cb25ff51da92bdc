"""The demo distillation experiment: teacher data -> students (3 variants x seeds) -> held-out accuracy.

    python -m kd.experiment --config configs/experiment/default.yaml [--seeds 3] [--out runs/experiment/<config name>]

A config with `kind: choice` runs the entropy experiment instead (kd/demo/choice_experiment.py), one
with `kind: onpolicy` the on-policy experiment (kd/demo/onpolicy_experiment.py).

1. The teacher (builtin:tiny-teacher) answers the training prompts greedily, seeing their strategy
   instructions (kd.generate); its responses, right or wrong, are the distillation set.
2. For each variant and seed, `python -m kd.train --config <base> <overrides>` trains the student:
     ce_erase    alpha=1 (CE on the teacher's responses only), instruction erased (generic system)
     kd_erase    alpha<1 (logit KD + CE), instruction erased
     kd_noerase  alpha<1, instruction kept in the student's training view
3. Evaluation protocol, fixed before any result was seen: data/demo/eval.jsonl (held out, disjoint
   from the training prompts), greedy decoding, exact match of the final answer (kd.accuracy), the
   student always under the generic system message. Token metrics (kd.accuracy.token_metrics) on
   the gold eval responses: student CE and forward KL / top-1 agreement to the teacher, with the
   student reading the generic view and the teacher the strategy view. The teacher is evaluated
   with and without (generic system) its instructions.
4. A table (mean ± sample std over seeds) with the command and settings goes to docs/results.md
   (--report), every number to <out>/results.json.

Finished runs are reused on a rerun when their settings match (<out>/runs/<variant>/seed<k>/result.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

from kd.demo.runs import ROOT, digest, load, load_settings, model_digest, read_jsonl, train_cached


# --------------------------------------------------------------------------- steps


def make_teacher_data(s: dict, out: Path, log) -> tuple[Path, dict]:
    """Teacher's greedy responses (strategy instructions shown) over the training prompts."""
    from kd.demo import tasks
    from kd.tools.generation import generate_for_records
    from kd.tools.shards import write_jsonl_atomic

    records = read_jsonl(ROOT / s["train_prompts"], s.get("train_limit"))
    key = digest([s["teacher"], model_digest(s["teacher"]), s["train_prompts"], s.get("train_limit"), s["generation"]])
    path, meta_path = out / "data" / "teacher_train.jsonl", out / "data" / "meta.json"
    if path.is_file() and meta_path.is_file() and json.loads(meta_path.read_text()).get("key") == key:
        log(f"teacher data: reusing {path}")
        return path, json.loads(meta_path.read_text())
    t0 = time.time()
    tok, model = load(s["teacher"])
    g = s["generation"]
    texts = generate_for_records(model, tok, records, "strategy", g["batch_size"], g["max_new_tokens"])
    write_jsonl_atomic(path, ({**r, "response": t} for r, t in zip(records, texts)))
    correct = sum(tasks.is_correct(r, t) for r, t in zip(records, texts))
    meta = {"key": key, "n": len(records), "teacher_correct": correct, "seconds": round(time.time() - t0, 1)}
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    log(f"teacher data: {len(records)} responses ({correct} correct) in {meta['seconds']} s -> {path}")
    return path, meta


def evaluate(model_name: str, s: dict, evals: list[dict], modes=("generic",), teacher=None) -> dict:
    """Accuracy under each system mode, plus token metrics against `teacher` (generic view)."""
    from kd.demo.accuracy import evaluate_accuracy, token_metrics

    e = s["eval"]
    tok, model = load(model_name)
    res = {m: evaluate_accuracy(model, tok, evals, m, e["batch_size"], e["max_new_tokens"]) for m in modes}
    if teacher is not None:
        res["token_metrics"] = token_metrics(model, teacher, tok, evals, "generic", e["batch_size"])
    return res


def train_one(s: dict, variant: str, seed: int, data: Path, eval_file: Path, out: Path, evals, teacher, log,
              train_only: bool = False) -> dict | None:
    """Train one student (subprocess), then evaluate it; cached by settings. With `train_only`,
    stop after training (None), so several trainings can run side by side before evaluating."""
    run_dir = out / "runs" / variant / f"seed{seed}"
    overrides = {**s["train_overrides"], **s["variants"][variant]["overrides"],
                 "teacher.name_or_path": s["teacher"], "student.name_or_path": s["student"],
                 "data.train_files": f"[{data}]", "data.eval_files": f"[{eval_file}]",
                 "train.seed": seed, "train.output_dir": str(run_dir), "train.resume": "off",
                 "log.progress_bar": "false", "log.tracker": "none"}
    key = digest([overrides, s["base_config"], model_digest(s["teacher"]), s["eval"],
                  (data.parent / "meta.json").read_text()])
    res_path = run_dir / "result.json"
    if res_path.is_file() and json.loads(res_path.read_text()).get("key") == key:
        if not train_only:
            log(f"{variant} seed {seed}: reusing {res_path}")
        return None if train_only else json.loads(res_path.read_text())
    trained = train_cached(run_dir, s["base_config"], overrides, key, f"{variant} seed {seed}", log)
    if train_only:
        return None
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    last_eval = next((r for r in reversed(rows) if "eval/ce" in r), {})
    t0 = time.time()
    res = evaluate(str(run_dir / "student"), s, evals, ("generic",), teacher)
    res.update(key=key, variant=variant, seed=seed, train_seconds=trained["train_seconds"],
               eval_seconds=round(time.time() - t0, 1), overrides=overrides,
               trainer_eval={k: v for k, v in last_eval.items() if k.startswith("eval/")},
               final_train_loss=rows[-1].get("train/loss"))
    res_path.write_text(json.dumps(res, indent=2) + "\n")
    log(f"{variant} seed {seed}: accuracy {res['generic']['accuracy']:.3f}, used its strategy "
        f"{res['generic']['strategy_match']:.3f} (eval {res['eval_seconds']:.0f} s)")
    return res


# --------------------------------------------------------------------------- report


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def pm(xs: list[float], pct=True) -> str:
    m, sd = mean_std(xs)
    f = 100.0 if pct else 1.0
    d = 1 if pct else 3
    return f"{f * m:.{d}f} ± {f * sd:.{d}f}" if len(xs) > 1 else f"{f * m:.{d}f}"


NOTES = "<!-- notes: kept across reruns -->"
BUCKETS = ("addition/direct", "addition/step_by_step", "count/direct", "count/step_by_step")


def summarise(s: dict, teacher_res: dict, runs: dict[str, list[dict]]) -> list[dict]:
    """One row per model/variant: accuracies as lists over seeds (teacher: one value)."""
    rows = []
    for mode, label in (("strategy", "teacher, with its instructions"), ("generic", "teacher, generic system")):
        r = teacher_res[mode]
        rows.append(dict(name=label, acc=[r["accuracy"]], chose=[r["strategy_match"]],
                         buckets={b: [r["by_bucket"].get(b, {}).get("accuracy", 0.0)] for b in BUCKETS}, tm=None))
    for variant, results in runs.items():
        rows.append(dict(
            name=s["variants"][variant]["label"], variant=variant,
            acc=[r["generic"]["accuracy"] for r in results],
            chose=[r["generic"]["strategy_match"] for r in results],
            buckets={b: [r["generic"]["by_bucket"].get(b, {}).get("accuracy", 0.0) for r in results] for b in BUCKETS},
            tm={k: [r["token_metrics"][k] for r in results] for k in ("ce", "forward_kl", "top1_agreement")},
            seeds=[r["seed"] for r in results]))
    return rows


def render(s: dict, rows: list[dict], meta: dict, command: str, timings: dict) -> str:
    n_eval = timings["n_eval"]
    head = ("| model (evaluated with the generic system message unless noted) | accuracy % | right strategy % | "
            + " | ".join(BUCKETS) + " | eval CE | KL(t‖s) | top-1 agr. % |")
    lines = [head, "|:--|--:|--:|" + "--:|" * len(BUCKETS) + "--:|--:|--:|"]
    for r in rows:
        tm = r["tm"]
        extra = ([pm(tm["ce"], False), pm(tm["forward_kl"], False), pm(tm["top1_agreement"])]
                 if tm else ["–", "–", "–"])
        lines.append(f"| {r['name']} | {pm(r['acc'])} | {pm(r['chose'])} | " + " | ".join(pm(r["buckets"][b]) for b in BUCKETS)
                     + " | " + " | ".join(extra) + " |")
    ov = s["train_overrides"]
    settings = [
        f"- teacher `{s['teacher']}` (kd/demo/assets/teacher, made by `scripts/train_teacher.py`), "
        f"student `{s['student']}` (random init, seeded).",
        f"- distillation data: the teacher's greedy responses to the {meta['n']} prompts of "
        f"`{s['train_prompts']}` with their strategy instructions ({meta['teacher_correct']}/{meta['n']} "
        f"= {100 * meta['teacher_correct'] / meta['n']:.1f}% end on the right answer; all are kept).",
        f"- training: `python -m kd.train --config {s['base_config']}` with "
        + ", ".join(f"`{k}={v}`" for k, v in ov.items()) + "; per variant: "
        + "; ".join(f"{v['label']}: " + ", ".join(f"`{k}={x}`" for k, x in v["overrides"].items())
                    for v in s["variants"].values()) + ".",
        f"- seeds: {', '.join(str(x) for x in rows[-1].get('seeds', []))} (`train.seed`: init order, "
        "shuffling, dropout); mean ± sample standard deviation over seeds. The teacher is deterministic "
        "(greedy), so its rows are single numbers.",
        f"- evaluation (fixed before results were seen): the {n_eval} held-out problems of "
        f"`{s['eval_data']}` (no prompt shared with the training set), greedy decoding, at most "
        f"{s['eval']['max_new_tokens']} new tokens, exact match of the final \"The answer is N.\" "
        "(kd.accuracy); \"right strategy\" is the share of responses in the form the problem's "
        "strategy calls for (a trace for long problems, a lone answer line for short ones), right or "
        "wrong (kd.tasks.response_strategy). Students always see the generic system message "
        f"(\"{_generic()}\"), including variant (c), which was trained with the instructions.",
        "- token metrics on the gold responses of the same eval set (kd.accuracy.token_metrics): "
        "student CE per response token, forward KL(teacher ‖ student) at T = 1 and top-1 agreement, "
        "the student reading the generic view and the teacher the strategy view.",
        f"- machine: {platform.processor() or platform.machine()}, {timings['threads']} thread(s) per "
        f"process, {timings.get('jobs', 1)} training run(s) at a time, "
        f"torch {timings['torch']}; wall time {timings['total'] / 60:.1f} min (teacher data "
        f"{timings['data']:.0f} s, teacher eval {timings['teacher_eval']:.0f} s, students "
        f"{timings['students']:.0f} s).",
    ]
    return "\n".join(["## Table", "", *lines, "", "## Command", "", "```bash", command, "```", "",
                      "## Settings", "", *settings, "", "## What the numbers say", "", _verdict(rows), ""])


def _generic() -> str:
    from kd.demo.tasks import GENERIC_SYSTEM

    return GENERIC_SYSTEM


def _verdict(rows: list[dict]) -> str:
    """A mechanical comparison of the variants (difference of means against the seed spread)."""
    by = {r.get("variant"): r for r in rows if r.get("variant")}
    out = []
    t_s, t_g = rows[0]["acc"][0], rows[1]["acc"][0]
    out.append(f"The teacher scores {100 * t_s:.1f}% with its instructions and {100 * t_g:.1f}% with the generic "
               "system message.")

    def cmp(a, b):
        if a not in by or b not in by:
            return
        (ma, sa), (mb, sb) = mean_std(by[a]["acc"]), mean_std(by[b]["acc"])
        d, spread = ma - mb, max(sa, sb)
        real = abs(d) > 2 * spread and d != 0
        out.append(f"{by[a]['name']} vs {by[b]['name']}: {100 * d:+.1f} points "
                   f"({'beyond' if real else 'within'} twice the larger seed std, {100 * spread:.1f}).")

    cmp("kd_erase", "ce_erase")
    cmp("kd_erase", "kd_noerase")
    out.append("A difference counts as real here only when it exceeds twice the larger seed std; with "
               f"{len(rows[-1]['acc'])} seeds this is a rough screen, not a significance test.")
    return " ".join(out)


# --------------------------------------------------------------------------- main


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m kd.experiment", description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/experiment/default.yaml")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (0..n-1); default from config")
    ap.add_argument("--out", default=None, help="work directory (default: runs/experiment/<config name>)")
    ap.add_argument("--report", default=None, help="markdown file to write (default: the config's report)")
    ap.add_argument("--no-report", action="store_true", help="write results.json only")
    ap.add_argument("--max-steps", type=int, default=None, help="miniature runs: override train.max_steps")
    ap.add_argument("--train-limit", type=int, default=None, help="miniature runs: first N training prompts")
    ap.add_argument("--eval-limit", type=int, default=None, help="miniature runs: first N eval problems")
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--variants", default=None, help="comma-separated subset of the config's variants (arms)")
    ap.add_argument("--sizes", default=None, help="entropy experiment: comma-separated data sizes")
    ap.add_argument("--threads", type=int, default=1, help="torch threads here and in each training run")
    ap.add_argument("--jobs", type=int, default=2, help="training runs at a time (each uses --threads)")
    args = ap.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from kd.cli import quiet_libraries

    torch.set_num_threads(args.threads)
    quiet_libraries()
    command = "python -m kd.experiment " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    s = load_settings(args.config, args)
    if s.get("kind") == "choice":  # the entropy experiment (kd/demo/choice_experiment.py)
        from kd.demo import choice_experiment

        return choice_experiment.main(s, args, command)
    if s.get("kind") == "onpolicy":  # the on-policy experiment (kd/demo/onpolicy_experiment.py)
        from kd.demo import onpolicy_experiment

        return onpolicy_experiment.main(s, args, command)
    out = Path(args.out or Path("runs/experiment") / Path(args.config).stem)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    def log(msg):
        print(f"[{(time.time() - t_start) / 60:5.1f} min] {msg}", flush=True)

    data, meta = make_teacher_data(s, out, log)
    t_data = time.time() - t_start
    evals = read_jsonl(ROOT / s["eval_data"], s["eval"].get("limit"))
    eval_file = ROOT / s["eval_data"]
    if s["eval"].get("limit"):  # the trainer's own eval metrics use the same (limited) problems
        from kd.tools.shards import write_jsonl_atomic

        eval_file = out / "data" / "eval.jsonl"
        write_jsonl_atomic(eval_file, evals)
    t0 = time.time()
    tok, teacher = load(s["teacher"])
    teacher_res = evaluate(s["teacher"], s, evals, ("strategy", "generic"))
    t_teacher = time.time() - t0
    log(f"teacher: accuracy {teacher_res['strategy']['accuracy']:.3f} with instructions, "
        f"{teacher_res['generic']['accuracy']:.3f} generic")
    t0 = time.time()
    jobs = [(v, seed) for v in s["variants"] for seed in range(s["seeds"])]
    if args.jobs > 1:  # trainings are independent single-thread processes: run them side by side
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda j: train_one(s, *j, data, eval_file, out, evals, teacher, log, train_only=True),
                          jobs))
    runs = {v: [train_one(s, v, seed, data, eval_file, out, evals, teacher, log) for seed in range(s["seeds"])]
            for v in s["variants"]}
    t_students = time.time() - t0
    timings = dict(total=time.time() - t_start, data=t_data, teacher_eval=t_teacher, students=t_students,
                   threads=args.threads, jobs=args.jobs, torch=torch.__version__, n_eval=len(evals))
    rows = summarise(s, teacher_res, runs)
    (out / "results.json").write_text(json.dumps(dict(settings=s, command=command, teacher=teacher_res,
                                                      data=meta, runs=runs, rows=rows, timings=timings),
                                                 indent=2) + "\n")
    body = render(s, rows, meta, command, timings)
    print(body)
    if not args.no_report:
        report = Path(args.report or s["report"])
        report.parent.mkdir(parents=True, exist_ok=True)
        # Hand-written notes below the marker survive a rerun; everything above is regenerated.
        old = report.read_text() if report.is_file() else ""
        notes = old[old.index(NOTES):] if NOTES in old else ""
        report.write_text(f"# {s.get('title', 'Results')}\n\n{s.get('intro', '').strip()}\n\n{body}\n{notes}")
        log(f"wrote {report}")


if __name__ == "__main__":
    main()
