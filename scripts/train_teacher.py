"""Train a shipped demo teacher (kd/demo/assets/teacher, or --task choice: assets/choice-teacher).

    python scripts/train_teacher.py [--task strategy|choice] [--out DIR] [--no-ship] [--threads 2] [key=value ...]

--task choice trains the many-valid-answers teacher (kd/demo/choice.py, configs/teacher_choice.yaml)
on 40000 fresh problems (repeats allowed, none of data/choice/eval.jsonl), each with one uniformly
drawn valid answer, and reports its validity rate with and without its instructions. The steps
below describe the default (strategy) task.

1. Writes fresh strategy-task records (kd.tasks, fixed seed, no prompt of data/demo/eval.jsonl)
   to <out>/data/train.jsonl: the teacher is trained on gold responses *with* the instructions.
2. Runs `python -m kd.train --config configs/teacher.yaml` (alpha=1: plain SFT; erase off) on
   builtin:tiny-teacher-init, a seeded random init (kd/demo/builtin.py).
3. Copies the exported student/ (safetensors, config, tokenizer files) to kd/demo/assets/teacher/.
4. Evaluates it on data/demo/eval.jsonl (greedy, exact match) with --system strategy and generic.
Extra key=value arguments are passed to kd.train as config overrides.

Training runs with --threads torch threads (default 2, as the shipped weights were made): CPU
training is bitwise deterministic for a fixed thread count but not across counts, and this recipe
is sensitive to the difference (1 thread: 70 % instead of 84 %; docs/results.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

N_TRAIN, DATA_SEED = 48000, 100  # fresh problems (repeats allowed: 810 direct additions); seeds 1234/5678 made data/demo
ASSETS = ROOT / "kd" / "demo" / "assets" / "teacher"
SHIP = ("model.safetensors", "config.json", "generation_config.json")  # + the project tokenizer's files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/teacher")
    ap.add_argument("--no-ship", action="store_true", help="do not copy the result to kd/demo/assets/teacher")
    ap.add_argument("--eval-limit", type=int, default=None)
    ap.add_argument("--skip-train", action="store_true", help="ship and evaluate <out>/student as it is")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for training (the shipped weights: 2)")
    ap.add_argument("--task", choices=("strategy", "choice"), default="strategy")
    args, overrides = ap.parse_known_args()
    os.chdir(ROOT)
    if args.task == "choice":
        return choice_teacher(args, overrides)
    from kd.demo import tasks

    out = Path(args.out)
    data = out / "data" / "train.jsonl"
    evals = [json.loads(line) for line in open("data/demo/eval.jsonl")]
    recs = tasks.generate(N_TRAIN, DATA_SEED, exclude=[r["prompt"] for r in evals], distinct=False)
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))

    model_dir = train_and_ship(args, "configs/teacher.yaml", out, data, overrides, ASSETS)

    import torch

    from kd.demo.accuracy import evaluate_accuracy, format_table
    from kd.cli import quiet_libraries
    from kd.tools.generate import load_for_generation

    quiet_libraries()
    tok, model = load_for_generation(str(model_dir), "float32", torch.device("cpu"))
    n = sum(p.numel() for p in model.parameters())
    results = {"model": str(model_dir), "parameters": n}
    for mode in ("strategy", "generic"):
        r = evaluate_accuracy(model, tok, evals[: args.eval_limit], mode, batch_size=50, max_new_tokens=200)
        results[mode] = r
        print(format_table({**r, "model": str(model_dir), "system": mode}), flush=True)
    (out / "accuracy.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"teacher ({n:,} parameters): accuracy with instruction {results['strategy']['accuracy']:.3f}, "
          f"with the generic system message {results['generic']['accuracy']:.3f}")


def train_and_ship(args, config: str, out: Path, data: Path, overrides: list[str], assets: Path) -> Path:
    """Train with `config` on `data` (a rerun resumes from <out>'s latest checkpoint), then copy the
    export and the project tokenizer's files into `assets` (unless --no-ship). -> the model dir."""
    from kd.demo.builtin import TOKENIZER_DIR

    t0 = time.time()
    cmd = [sys.executable, "-m", "kd.train", "--config", config, f"train.output_dir={out}",
           f"data.train_files=[{data}]", *overrides]
    if not args.skip_train:
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        print(f"teacher training: {time.time() - t0:.0f} s", flush=True)
    if args.no_ship:
        return out / "student"
    assets.mkdir(parents=True, exist_ok=True)
    for f in assets.iterdir():
        f.unlink()
    for name in SHIP:
        shutil.copyfile(out / "student" / name, assets / name)
    for f in TOKENIZER_DIR.iterdir():  # byte-identical to kd/demo/assets/tokenizer
        shutil.copyfile(f, assets / f.name)
    print(f"shipped to {assets}")
    return assets


def choice_teacher(args, overrides) -> None:
    import random

    from kd.demo import choice
    from kd.demo.builtin import CHOICE_TEACHER_DIR

    out = Path(args.out if args.out != "runs/teacher" else "runs/teacher-choice")
    evals = [json.loads(line) for line in open("data/choice/eval.jsonl")]
    held_out = {r["prompt"] for r in evals}
    rng, recs = random.Random(DATA_SEED), []
    while len(recs) < 40000:  # fresh draws; a prompt may repeat with another valid answer
        rec = choice.problem(rng, choice.STRATEGIES[len(recs) % 2])
        if rec["prompt"] not in held_out:
            recs.append({**rec, "response": choice.sample_response(rec, rng)})
    data = out / "data" / "train.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    model_dir = train_and_ship(args, "configs/teacher_choice.yaml", out, data, overrides, CHOICE_TEACHER_DIR)

    import torch

    from kd.cli import quiet_libraries
    from kd.tools.generate import generate_for_records, load_for_generation

    quiet_libraries()
    tok, model = load_for_generation(str(model_dir), "float32", torch.device("cpu"))
    results = {"model": str(model_dir), "parameters": sum(p.numel() for p in model.parameters())}
    for mode in ("strategy", "generic"):
        texts = generate_for_records(model, tok, evals[: args.eval_limit], mode, 100, 64)
        recs_ = evals[: args.eval_limit]
        results[mode] = {"valid": sum(choice.is_valid(r, t) for r, t in zip(recs_, texts)) / len(recs_),
                         "right_strategy": sum(choice.response_strategy(t) == r["strategy"]
                                               for r, t in zip(recs_, texts)) / len(recs_)}
    (out / "validity.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
