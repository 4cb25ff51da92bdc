"""Training from a sampled teacher cache vs a top-k cache of the same bytes vs the live teacher.

    .venv/bin/python benchmarks/bench_sampled_train.py [--seeds 3] [--jobs 2] [--out runs/bench_sampled_train]

Protocol (fixed before the first result):
- config: configs/demo.yaml as shipped (60 optimizer steps of 16 examples, alpha 0.5, forward KL),
  at loss.temperature 1 and 2; train.seed 0, 1, 2; no evaluation during training.
- arms: the live teacher; one sampled cache for both temperatures (`--format sampled --draws 32
  --proposal-temperature 2`, serving T = 1 and 2, sample seed 0); a top-k cache (serving T = 1, 2, 4,
  8, the default) whose k gives the sampled cache's bytes per token (k = round((bytes - 16) / 6), at
  least 1, from the sampled cache's measured size, before any training).
- metrics, on the 200 records of data/demo/eval.jsonl (the eval split, never trained on), the
  exported student against the live teacher (kd.tools.evaluate.token_metrics, strategy view for the
  teacher, generic view for the student): CE per response token and KL(teacher || student) at T = 1.
- comparisons paired by (seed, T): cache arm - live, with 95 % paired-t intervals over the 3 seeds;
  an interval that excludes 0 is called a difference.
Prints the table and the cache bytes and build times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DRAWS, PROPOSAL = 32, 2.0


def run(cmd: list[str]) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t0 = time.time()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{p.stderr[-3000:]}")
    return time.time() - t0


def shard_bytes(cache: Path) -> tuple[float, int]:
    m = json.loads((cache / "manifest.json").read_text())
    tokens = sum(s["tokens"] for s in m["splits"].values())
    return sum(f.stat().st_size for f in cache.glob("*.safetensors")) / tokens, tokens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default="runs/bench_sampled_train")
    args = ap.parse_args()
    out = (ROOT / args.out).resolve()
    py, demo = sys.executable, "configs/demo.yaml"
    common = ["train.eval_every=0", "train.save_every=0", "log.progress_bar=false", "log.tracker=none"]

    sampled = out / "cache-sampled"
    t_sampled = 0.0 if (sampled / "manifest.json").is_file() else run(
        [py, "-m", "kd.cache", "--config", demo, f"teacher.cache={sampled}", "--format", "sampled", "--draws",
         str(DRAWS), "--proposal-temperature", str(PROPOSAL), "--tail-temperatures", "1,2"])
    b_sampled, tokens = shard_bytes(sampled)
    k = max(1, round((b_sampled - 16) / 6))
    topk = out / f"cache-top{k}"
    t_topk = 0.0 if (topk / "manifest.json").is_file() else run(
        [py, "-m", "kd.cache", "--config", demo, f"teacher.cache={topk}", "--k", str(k)])
    b_topk, _ = shard_bytes(topk)
    print(f"caches over {tokens} response tokens: sampled N={DRAWS} {b_sampled:.1f} bytes/token (built in "
          f"{t_sampled:.0f} s), top-{k} {b_topk:.1f} bytes/token ({t_topk:.0f} s); 0 s = already built")

    arms = {"live": [], "sampled": [f"teacher.cache={sampled}"], f"top-{k}": [f"teacher.cache={topk}"]}
    jobs = [(arm, t, seed) for t in (1.0, 2.0) for seed in range(args.seeds) for arm in arms]

    def train(job):
        arm, t, seed = job
        d = out / "runs" / f"{arm}-T{t:g}-seed{seed}"
        if (d / "student" / "config.json").is_file():
            return job, None
        return job, run([py, "-m", "kd.train", "--config", demo, *common, *arms[arm], f"loss.temperature={t}",
                         f"train.seed={seed}", f"train.output_dir={d}", "train.resume=off"])

    seconds = {}
    with ThreadPoolExecutor(args.jobs) as pool:
        for job, s in pool.map(train, jobs):
            seconds[job] = s
            print(f"trained {job}: {'cached' if s is None else f'{s:.0f} s'}", flush=True)

    import torch

    from kd.demo.runs import load
    from kd.tools.evaluate import token_metrics
    from kd.tools.prompt_records import read_records

    torch.set_num_threads(2)
    records = read_records(str(ROOT / "data/demo/eval.jsonl"))
    _, teacher = load("builtin:tiny-teacher")
    res = {}
    for arm, t, seed in jobs:
        tok, student = load(str(out / "runs" / f"{arm}-T{t:g}-seed{seed}" / "student"))
        m = token_metrics(student, teacher, tok, records, "generic", 16)
        res[(arm, t, seed)] = (m["ce"], m["forward_kl"])

    from kd.demo.choice_experiment import paired_ci

    print("\n| T | arm | train s (mean) | CE | KL(t‖s) | CE − live [95 %] | KL − live [95 %] |")
    print("|--:|---|--:|--:|--:|--:|--:|")
    for t in (1.0, 2.0):
        for arm in arms:
            xs = [res[(arm, t, s)] for s in range(args.seeds)]
            sec = [seconds[(arm, t, s)] for s in range(args.seeds) if seconds[(arm, t, s)] is not None]
            cells = []
            for i in (0, 1):
                if arm == "live":
                    cells.append("–")
                    continue
                m, lo, hi = paired_ci([res[(arm, t, s)][i] - res[("live", t, s)][i] for s in range(args.seeds)])
                star = "*" if lo > 0 or hi < 0 else ""
                cells.append(f"{m:+.4f} [{lo:+.4f}, {hi:+.4f}]{star}")
            print(f"| {t:g} | {arm} | {statistics.fmean(sec) if sec else float('nan'):.0f} | "
                  f"{statistics.fmean(x[0] for x in xs):.4f} | {statistics.fmean(x[1] for x in xs):.4f} | "
                  f"{cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
