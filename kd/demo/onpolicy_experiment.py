"""The on-policy experiment: does on-policy KD pay once the student is warm? (docs/results-onpolicy.md)

    python -m kd.experiment --config configs/experiment/onpolicy.yaml [--seeds 5] [--jobs 2]

Task and teacher as in the entropy experiment (kd/demo/choice_experiment.py). Steps:

1. The protocol is written into the report before any student is evaluated.
2. Data: the last `dev_prompts` training prompts are a development split, never trained on; one
   teacher sample (T = 1, strategy view) per remaining prompt is the distillation set. Fresh
   teacher samples of the dev and of the held-out eval prompts are the token-metric references.
3. The off-policy curve on the dev split (one dev seed, disjoint from the final seeds): warm-start
   runs of each length in `curve`, which is what W and S were chosen from.
4. Per final seed: a warm start (off-policy KD, W steps, exported), then each arm continues from
   that export for S steps (an arm may ask a multiple of S: the equal-wall-clock off-policy arm),
   or from the random init (`from: scratch`).
5. Every student, under the generic system message on the eval prompts: the metrics of the entropy
   experiment, and, on its own T = 1 samples, why an arm does what it does: their length, the share
   cut at the token budget, the teacher's NLL of them (its judgement, strategy view), the reverse
   KL(student ‖ teacher) on them (what on-policy minimises) and the student's entropy on them.
   Each run's share of generations cut at the budget during training (train/gen_stopped_by_length)
   is read from its metrics.jsonl: it is what the collapse guard's default was chosen from.
6. The report: per arm mean ± std, paired differences against the continued off-policy arm (equal
   steps) and against the long off-policy arm (equal wall clock), wall time per arm.

Finished runs are reused when their settings match (<out>/runs/<arm>/seed<k>/result.json).
"""

from __future__ import annotations

import json
import platform
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kd.demo.choice_experiment import NOTES, PROTOCOL, RESULTS, ece, paired_ci, teacher_samples, token_stats
from kd.demo.runs import ROOT, digest, load, model_digest, read_jsonl, train_cached


# --------------------------------------------------------------------------- evaluation

# transformers' loading patches module-global state (meta-device init): one load at a time
_LOAD = threading.Lock()


def _texts(model, tok, records, e: dict, temperature: float, seed: int) -> list[str]:
    from kd.tools.generation import Sampling, generate_for_records

    return generate_for_records(model, tok, records, "generic", e["batch_size"], e["max_new_tokens"],
                                sampling=Sampling(temperature, 1.0, 1, seed))


def evaluate_student(model_dir: str, s: dict, fresh: list[dict], teacher) -> dict:
    """The entropy experiment's metrics, plus what the student's own samples look like."""
    from kd.demo import choice
    from kd.tools.evaluate import token_metrics

    e = s["eval"]
    with _LOAD:
        tok, model = load(model_dir)
    n = len(fresh)
    greedy = _texts(model, tok, fresh, e, 0.0, 0)
    sampled = _texts(model, tok, fresh, e, 1.0, e["sample_seed"])
    tm = token_metrics(model, teacher, tok, fresh, "generic", e["batch_size"], targets="last")
    st = token_stats(model, tok, fresh, "generic", e["batch_size"])
    own = [{**r, "response": t} for r, t in zip(fresh, sampled)]
    lengths = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in sampled]
    judged = token_metrics(teacher, None, tok, own, "strategy", e["batch_size"], targets="last")
    rkl = token_metrics(model, teacher, tok, own, "generic", e["batch_size"], targets="last",
                        divergence="reverse_kl")
    own_st = token_stats(model, tok, own, "generic", e["batch_size"])
    return {"valid_greedy": sum(choice.is_valid(r, t) for r, t in zip(fresh, greedy)) / n,
            "valid_sampled": sum(choice.is_valid(r, t) for r, t in zip(fresh, sampled)) / n,
            "right_strategy": sum(choice.response_strategy(t) == r["strategy"] for r, t in zip(fresh, greedy)) / n,
            "nll": tm["ce"], "kl": tm["forward_kl"], "ece": ece(st["top1_prob"], st["correct"]),
            "own_len": statistics.fmean(lengths),
            "own_cut": sum(x >= e["max_new_tokens"] for x in lengths) / n,
            "own_teacher_nll": judged["ce"], "own_rkl": rkl["reverse_kl"],
            "own_entropy": statistics.fmean(own_st["entropy"])}


def training_cuts(run_dir: Path) -> dict:
    """From the run's metrics.jsonl: the mean and largest share of generations cut at the budget
    over the logged steps that generated (None: none did), and the step at which the collapse guard
    (kd.onpolicy.CutWatch, default settings) warned, None if it did not."""
    from kd.config.schema import OnPolicyConfig
    from kd.onpolicy import CutWatch

    p = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in p.read_text().splitlines()] if p.is_file() else []
    xs = [r["train/gen_stopped_by_length"] for r in rows if r.get("train/gen_stopped_by_length") is not None]
    watch, fired = CutWatch(OnPolicyConfig(fraction=0.5)), None
    for r in rows:
        if watch.see(r["step"], r) and fired is None:
            fired = r["step"]
    return {"train_cut_share": statistics.fmean(xs) if xs else None, "train_cut_max": max(xs) if xs else None,
            "guard_step": fired}


# --------------------------------------------------------------------------- runs


class Runner:
    """Trains and evaluates the runs of one experiment directory, each cached by its settings."""

    def __init__(self, s: dict, out: Path, data: Path, log):
        self.s, self.out, self.data, self.log = s, out, data, log
        self.data_key = data.with_suffix(".meta.json").read_text()

    def overrides(self, run_dir: Path, steps: int, seed: int, student: str, extra: dict) -> dict:
        s = self.s
        return {**s["train_overrides"], **extra, "train.max_steps": steps,
                "teacher.name_or_path": s["teacher"], "student.name_or_path": student,
                "data.train_files": f"[{self.data}]", "data.eval_fraction": 0, "train.seed": seed,
                "train.output_dir": str(run_dir), "train.resume": "off", "log.progress_bar": "false",
                "log.tracker": "none"}

    def warm(self, steps: int, seed: int) -> tuple[Path, str, float]:
        """The off-policy warm start of `steps` steps for `seed`: (run dir, key, train seconds)."""
        s = self.s
        run_dir = self.out / "runs" / "warm" / f"w{steps}" / f"seed{seed}"
        ov = self.overrides(run_dir, steps, seed, s["student"], s["warm"]["overrides"])
        key = digest([ov, s["base_config"], model_digest(s["teacher"]), self.data_key])
        trained = train_cached(run_dir, s["base_config"], ov, key, f"warm start W={steps} seed {seed}", self.log)
        return run_dir, key, trained["train_seconds"]

    def arm(self, arm: str, seed: int) -> tuple[Path, str, float]:
        s, a = self.s, self.s["arms"][arm]
        run_dir = self.out / "runs" / arm / f"seed{seed}"
        steps = int(s["continue_steps"] * a.get("steps_factor", 1))
        if a.get("from") == "scratch":
            student, warm_key = s["student"], None
        else:
            warm_dir, warm_key, _ = self.warm(s["warm"]["steps"], seed)
            student = str(warm_dir / "student")
        ov = self.overrides(run_dir, steps, seed, student, a["overrides"])
        key = digest([ov, s["base_config"], model_digest(s["teacher"]), self.data_key, warm_key])
        trained = train_cached(run_dir, s["base_config"], ov, key, f"{arm} seed {seed}", self.log)
        return run_dir, key, trained["train_seconds"]

    def result(self, what: str, run_dir: Path, key: str, seconds: float, refs: list[dict], teacher, **tags) -> dict:
        path = run_dir / "result.json"
        key = digest([key, self.s["eval"], [r["response"] for r in refs]])
        if path.is_file() and json.loads(path.read_text()).get("key") == key:
            return {**json.loads(path.read_text()), **training_cuts(run_dir)}
        t0 = time.time()
        res = evaluate_student(str(run_dir / "student"), self.s, refs, teacher)
        res.update(key=key, train_seconds=seconds, eval_seconds=round(time.time() - t0, 1),
                   **training_cuts(run_dir), **tags)
        path.write_text(json.dumps(res, indent=2) + "\n")
        self.log(f"{what}: valid {res['valid_greedy']:.3f}, NLL {res['nll']:.3f}, sampled length {res['own_len']:.1f}")
        return res


# --------------------------------------------------------------------------- report

METRICS = (("valid_greedy", "valid (greedy) %", True), ("valid_sampled", "valid (sampled) %", True),
           ("right_strategy", "right strategy %", True), ("nll", "NLL of teacher samples", False),
           ("kl", "KL(t‖s)", False), ("ece", "ECE %", True))
WHY = (("own_len", "length (tokens)", False), ("own_cut", "cut at budget %", True),
       ("own_teacher_nll", "teacher NLL of them", False), ("own_rkl", "KL(s‖t) on them", False),
       ("own_entropy", "student entropy on them", False))


def _fmt(x: float, pct: bool, sign: bool = False) -> str:
    f, d = (100.0, 1) if pct else (1.0, 3)
    return f"{f * x:{'+' if sign else ''}.{d}f}"


def _pm(xs: list[float], pct: bool) -> str:
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return _fmt(m, pct)
    return f"{_fmt(m, pct)} ± {_fmt(statistics.stdev(xs), pct)}"


def _diff(base: list[dict], other: list[dict], key: str, pct: bool) -> str:
    b, o = {r["seed"]: r[key] for r in base}, {r["seed"]: r[key] for r in other}
    seeds = sorted(b.keys() & o.keys())
    if not seeds:
        return "–"
    m, lo, hi = paired_ci([o[sd] - b[sd] for sd in seeds])
    if lo != lo:  # one seed: no interval
        return _fmt(m, pct, True)
    star = "*" if (lo > 0 or hi < 0) else ""
    return f"{_fmt(m, pct, True)} [{_fmt(lo, pct, True)}, {_fmt(hi, pct, True)}]{star}"


def protocol(s: dict, command: str) -> str:
    ov, w = s["train_overrides"], s["warm"]
    arms = "; ".join(f"{a['label']}: {_start(s, a)}, {int(s['continue_steps'] * a.get('steps_factor', 1))} steps, "
                     + ", ".join(f"`{k}={v}`" for k, v in a["overrides"].items()) for a in s["arms"].values())
    return "\n".join([
        "## Protocol (written before any student was evaluated)", "",
        f"- command: `{command}`",
        f"- task: kd/demo/choice.py (every problem has several valid answers); teacher `{s['teacher']}`, "
        f"student `{s['student']}` (random init, seeded).",
        f"- data: the last {s['dev_prompts']} prompts of `{s['train_prompts']}` are a development split, never "
        f"trained on; one teacher sample (temperature {s['sampling']['temperature']}, seed {s['sampling']['seed']}, "
        "strategy instruction shown) per remaining prompt is the distillation set of every run.",
        f"- W and S were chosen on the development split only, from the off-policy curve below (dev seed "
        f"{s['dev_seed']}): W = {w['steps']} warm-start steps, S = {s['continue_steps']} further steps. "
        + s.get("why_w_s", ""),
        "- warm start, the same for every arm of a seed: off-policy KD for W steps, "
        + ", ".join(f"`{k}={v}`" for k, v in w["overrides"].items())
        + "; exported, then each arm starts from that export with a fresh optimizer and LR schedule "
          "(`student.name_or_path=<export>`).",
        f"- arms (fixed here, not tuned): {arms}.",
        f"- every run: `python -m kd.train --config {s['base_config']}` with "
        + ", ".join(f"`{k}={v}`" for k, v in ov.items()) + ".",
        f"- final seeds {', '.join(map(str, s['seeds']))} (`train.seed`; disjoint from the dev seed); comparisons "
        "paired by seed against (a), the off-policy arm with as many steps, and against the off-policy arm "
        "that ran about as long in wall-clock time; 95 % paired-t intervals, an interval that excludes 0 is "
        "called a difference.",
        f"- evaluation, students under the generic system message, on the {s['eval']['n']} held-out prompts of "
        f"`{s['eval_data']}`: validity (kd/demo/choice.py `is_valid`) of the greedy answer and of one sample at "
        "T = 1, right-strategy rate (greedy); on one fresh teacher sample per prompt (seed "
        f"{s['eval']['fresh_seed']}): NLL per response token, KL(teacher ‖ student) at T = 1, ECE of the top-1 "
        "probability (10 bins). On the student's own T = 1 samples: mean length in tokens, the share that "
        f"reach the {s['eval']['max_new_tokens']}-token budget, the teacher's NLL per token of them (strategy "
        "view), KL(student ‖ teacher) on them, the student's mean next-token entropy on them. From each run's "
        "metrics.jsonl: the share of its training generations cut at `onpolicy.max_new_tokens` (mean and "
        "largest over logged steps) and whether the collapse guard at its defaults warned.",
        "- no tuning on the evaluation prompts; the settings above are those of the first final run.", ""])


def _start(s: dict, a: dict) -> str:
    return "from the random init" if a.get("from") == "scratch" else "from the warm start"


def render(s: dict, teacher: dict, curve: list[dict], warm: list[dict], runs: dict[str, list[dict]],
           timings: dict) -> str:
    lab = {a: s["arms"][a]["label"] for a in s["arms"]}
    lines = ["## Teacher", "",
             f"Validity with its instructions {100 * teacher['strategy']:.1f} %, with the generic system message "
             f"{100 * teacher['generic']:.1f} %.", "",
             f"## The off-policy curve on the development split (seed {s['dev_seed']}, from which W and S were chosen)",
             "", "| warm-start steps | train s | " + " | ".join(m[1] for m in METRICS) + " |",
             "|--:|--:|" + "--:|" * len(METRICS)]
    for c in curve:
        lines.append(f"| {c['steps']} | {c['train_seconds']:.0f} | "
                     + " | ".join(_fmt(c[k], pct) for k, _, pct in METRICS) + " |")
    rows = [(name, rs) for name, rs in [("warm start (W steps, the common start)", warm)]
            + [(lab[a], runs.get(a)) for a in s["arms"]] if rs]
    lines += ["", "## Table (eval prompts, mean ± std over seeds)", "",
              "| arm | train s | " + " | ".join(m[1] for m in METRICS) + " |", "|:--|--:|" + "--:|" * len(METRICS)]
    for name, rs in rows:
        lines.append(f"| {name} | {statistics.fmean(r['train_seconds'] for r in rs):.0f} | "
                     + " | ".join(_pm([r[k] for r in rs], pct) for k, _, pct in METRICS) + " |")
    lines += ["", "## What the students' own samples look like (T = 1, eval prompts)", "",
              "| arm | " + " | ".join(m[1] for m in WHY) + " | cut in training %: mean, largest | guard warned |",
              "|:--|" + "--:|" * (len(WHY) + 2)]
    for name, rs in rows:
        cut = [r["train_cut_share"] for r in rs if r.get("train_cut_share") is not None]
        top = [r["train_cut_max"] for r in rs if r.get("train_cut_max") is not None]
        fired = [r["guard_step"] for r in rs if r.get("guard_step") is not None]
        lines.append(f"| {name} | " + " | ".join(_pm([r[k] for r in rs], pct) for k, _, pct in WHY)
                     + (f" | {_pm(cut, True)}, {100 * max(top):.0f} | " if cut else " | – | ")
                     + (f"{len(fired)} of {len(rs)} runs (step {min(fired)}–{max(fired)}) |" if fired
                        else (f"0 of {len(rs)} runs |" if cut else "– |")))
    for title, base in (("equal steps", s["baseline"]), ("equal wall clock", s["baseline_wallclock"])):
        if not runs.get(base):
            continue
        lines += ["", f"## Paired differences against {lab[base]} ({title}; 95 % paired-t; * = excludes 0)", "",
                  "| arm − base | " + " | ".join(m[1] for m in METRICS) + " |", "|:--|" + "--:|" * len(METRICS)]
        for a in s["arms"]:
            if a != base and runs.get(a):
                lines.append(f"| {lab[a]} | " + " | ".join(_diff(runs[base], runs[a], k, pct) for k, _, pct in METRICS)
                             + " |")
    lines += ["", f"Wall time {timings['total'] / 60:.1f} min on {platform.processor() or platform.machine()} "
              f"({timings['jobs']} training runs at a time, {timings['threads']} thread each); \"train s\" is "
              "the wall time of the arm's own training (not its warm start) at that concurrency."
              + (f" (The wall time of the run that computed these results; this report was rewritten from them "
                 f"in {timings['report_only']:.0f} s.)" if "report_only" in timings else ""), ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def reused_wall_time(path: Path, groups: list[list[dict]], now: float) -> dict:
    """A rerun that only read cached results keeps the wall time of the run that computed them."""
    keys = sorted(r["key"] for g in groups for r in g)
    prev = json.loads(path.read_text()) if path.is_file() else None
    if prev is None:
        return {}
    prev_keys = sorted(r["key"] for g in [prev["curve"], prev["warm"], *prev["runs"].values()] for r in g)
    if prev_keys != keys:
        return {}
    return {"total": prev["timings"]["total"], "report_only": now}


def main(s: dict, args, command: str) -> None:
    import torch

    out = Path(args.out or Path("runs/experiment") / Path(args.config).stem)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    def log(msg):
        print(f"[{(time.time() - t_start) / 60:5.1f} min] {msg}", flush=True)

    s["seeds"] = list(range(s["seeds_from"], s["seeds_from"] + s["seeds"]))  # the final seeds
    if args.max_steps is not None:  # miniature runs: every warm start and continuation this long
        s["curve"], s["warm"]["steps"], s["continue_steps"] = [args.max_steps], args.max_steps, args.max_steps
    report = Path(args.report or s["report"])
    prompts = read_jsonl(ROOT / s["train_prompts"], s.get("train_limit"))
    n_dev = min(s["dev_prompts"], len(prompts) // 2)
    s["dev_prompts"] = n_dev
    dev, pool = prompts[len(prompts) - n_dev:], prompts[:len(prompts) - n_dev]
    evals = read_jsonl(ROOT / s["eval_data"], s["eval"].get("limit"))
    s["eval"]["n"] = len(evals)
    text = protocol(s, command)

    def write(body: str) -> None:
        if args.no_report:
            return
        old = report.read_text() if report.is_file() else ""
        if body == "(results pending)" and PROTOCOL in old and \
                old.split(PROTOCOL)[1].split(RESULTS)[0].strip() != text.strip():
            log(f"{report}: the settings differ from the recorded protocol; a new protocol is written")
        notes = old[old.index(NOTES):] if NOTES in old else ""
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(f"# {s['title']}\n\n{s.get('intro', '').strip()}\n\n{PROTOCOL}\n{text}\n{RESULTS}\n{body}\n\n"
                          f"{notes}")

    write("(results pending)")
    train = teacher_samples(s, pool, s["sampling"]["seed"], out / "data" / "teacher_train.jsonl", log)
    fresh_dev = teacher_samples(s, dev, s["eval"]["fresh_seed"], out / "data" / "teacher_dev.jsonl", log)
    fresh = teacher_samples(s, evals, s["eval"]["fresh_seed"], out / "data" / "teacher_eval.jsonl", log)
    data = out / "data" / "train.jsonl"
    if not data.is_file() or read_jsonl(data) != train:
        data.write_text("".join(json.dumps(r) + "\n" for r in train))
        data.with_suffix(".meta.json").write_text(json.dumps({"key": digest(train)}) + "\n")
    tok, teacher = load(s["teacher"])
    from kd.demo import choice
    from kd.tools.generation import generate_for_records

    teacher_res = {}
    for mode in ("strategy", "generic"):
        texts = generate_for_records(teacher, tok, evals, mode, s["eval"]["batch_size"], s["eval"]["max_new_tokens"])
        teacher_res[mode] = sum(choice.is_valid(r, t) for r, t in zip(evals, texts)) / len(evals)
    log(f"teacher: valid {teacher_res['strategy']:.3f} with its instructions, {teacher_res['generic']:.3f} generic")
    runner = Runner(s, out, data, log)

    def curve_point(w):
        return runner.result(f"curve W={w}", *runner.warm(w, s["dev_seed"]), fresh_dev, teacher, steps=w,
                             seed=s["dev_seed"])

    def warm_start(sd):
        return runner.result(f"warm seed {sd}", *runner.warm(s["warm"]["steps"], sd), fresh, teacher, arm="warm",
                             seed=sd)

    def arm(job):
        a, sd = job
        return runner.result(f"{a} seed {sd}", *runner.arm(a, sd), fresh, teacher, arm=a, seed=sd)

    # `jobs` runs at a time, each training (a subprocess) then evaluated here, so one run's evaluation
    # overlaps the other's training; the warm starts finish before any arm starts from them
    with ThreadPoolExecutor(args.jobs) as pool_:
        curve = list(pool_.map(curve_point, s["curve"]))
        warm = list(pool_.map(warm_start, s["seeds"]))
        runs = {}
        for r in pool_.map(arm, [(a, sd) for a in s["arms"] for sd in s["seeds"]]):
            runs.setdefault(r["arm"], []).append(r)
    timings = dict(total=time.time() - t_start, jobs=args.jobs, threads=args.threads, torch=torch.__version__)
    timings.update(reused_wall_time(out / "results.json", [curve, warm, *runs.values()], timings["total"]))
    (out / "results.json").write_text(json.dumps(dict(settings=s, command=command, teacher=teacher_res, curve=curve,
                                                      warm=warm, runs=runs, timings=timings), indent=2) + "\n")
    body = render(s, teacher_res, curve, warm, runs, timings)
    print(body)
    write(body)
    if not args.no_report:
        log(f"wrote {report}")
