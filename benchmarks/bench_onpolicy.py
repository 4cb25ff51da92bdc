"""On-policy distillation cost: optimizer-step time and its split (student generation, teacher
forward, student forward + loss + backward, optimizer) for onpolicy.fraction in {0, 0.5, 1}, on
the demo models and config, all fractions measured in the same process, alternating.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_onpolicy.py [--steps 12] [--max-new-tokens 128]

Each step is what kd/train.py runs for one optimizer step of configs/demo.yaml (micro-batch 4,
2 micro-batches): the on-policy choice per micro-batch comes from kd.onpolicy.is_onpolicy, the
student answers with transformers' generate (KV cache, sampled at T = 1), and the ratio column is
the step time against the off-policy (fraction 0) step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kd.cli import quiet_libraries  # noqa: E402
from kd.config import load_config  # noqa: E402
from kd.data import build_datasets, collate  # noqa: E402
from kd.forward import Distiller, head, teacher_forward  # noqa: E402
from kd.loss import LossSpec  # noqa: E402
from kd.models import load_model, load_tokenizer  # noqa: E402
from kd.onpolicy import OnPolicy, is_onpolicy  # noqa: E402
from kd.train import adamw_kernel  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps per fraction (after 2 warm-up steps)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--fractions", default="0,0.5,1")
    args = ap.parse_args()
    quiet_libraries()
    fractions = [float(f) for f in args.fractions.split(",")]
    base = load_config(ROOT / "configs/demo.yaml", ["data.store=off", f"onpolicy.max_new_tokens={args.max_new_tokens}",
                                                   "onpolicy.temperature=1.0"])
    tok = load_tokenizer(base.student.name_or_path, base.data.chat_template)
    train_set, *_ = build_datasets(base.data, tok, 0, log=lambda *a: None)
    teacher = load_model(base.teacher.name_or_path, torch.float32, None, "teacher").eval().requires_grad_(False)
    torch.manual_seed(0)
    student = load_model(base.student.name_or_path, torch.float32, None, "student").train()
    spec = LossSpec.from_config(base.loss, len(tok))
    distiller = Distiller(student, spec)
    opt = torch.optim.AdamW([p for p in student.parameters()], lr=1e-5, **adamw_kernel("fused", "cpu"))
    micro, accum = base.train.micro_batch_size, base.train.grad_accum_steps
    ops = {f: OnPolicy(load_config(ROOT / "configs/demo.yaml", ["data.store=off", f"onpolicy.fraction={f}",
                                                             f"onpolicy.max_new_tokens={args.max_new_tokens}",
                                                             "onpolicy.temperature=1.0"]), tok) for f in fractions}
    parts = {f: {k: [] for k in ("generation", "teacher", "student", "optimizer", "total", "gen_tokens")} for f in fractions}

    def step(f: float, s: int) -> None:
        t_step = time.perf_counter()
        batches, on, gen_s, gen_tok = [], [], 0.0, 0
        for i in range(accum):
            rows = [train_set[(s * accum + i) * micro + j] for j in range(micro)]
            on.append(is_onpolicy(0, s, i, f))
            if on[-1]:
                t0 = time.perf_counter()
                b, stats = ops[f].batch(student, rows, s, i, 0)
                gen_s += time.perf_counter() - t0
                gen_tok += stats.tokens
            else:
                b = collate(rows, tok.pad_token_id)
            batches.append(b)
        n = sum(b["labels"].numel() for b in batches)
        t_teacher = t_student = 0.0
        for b, o in zip(batches, on):
            t0 = time.perf_counter()
            th = teacher_forward(teacher, b)
            t1 = time.perf_counter()
            out = distiller(b, th, head(teacher), ops[f].spec if o else None)
            (out["weighted_sum"] / n).backward()
            t2 = time.perf_counter()
            t_teacher, t_student = t_teacher + t1 - t0, t_student + t2 - t1
        t0 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        p = parts[f]
        p["optimizer"].append(time.perf_counter() - t0)
        p["generation"].append(gen_s)
        p["teacher"].append(t_teacher)
        p["student"].append(t_student)
        p["total"].append(time.perf_counter() - t_step)
        p["gen_tokens"].append(gen_tok)

    state = {k: v.clone() for k, v in student.state_dict().items()}
    for s in range(2 + args.steps):  # alternate fractions; the same student weights for each
        for f in fractions:
            student.load_state_dict(state)
            step(f, s)
        if s == 1:
            for p in parts.values():
                for v in p.values():
                    v.clear()
    base_total = statistics.mean(parts[fractions[0]]["total"])
    print(f"demo models, micro-batch {micro} x {accum}, max_new_tokens {args.max_new_tokens}, T = 1 sampling, "
          f"{args.steps} steps per fraction (means, ms)")
    print("| onpolicy.fraction | generation | teacher forward | student fwd + loss + bwd | optimizer | step "
          "| generated tokens / step | step vs fraction 0 |\n|---:|---:|---:|---:|---:|---:|---:|---:|")
    for f in fractions:
        m = {k: statistics.mean(v) * (1 if k == "gen_tokens" else 1e3) for k, v in parts[f].items()}
        print(f"| {f:g} | {m['generation']:.0f} | {m['teacher']:.0f} | {m['student']:.0f} | {m['optimizer']:.1f} "
              f"| {m['total']:.0f} | {m['gen_tokens']:.0f} | {m['total'] / (base_total * 1e3):.2f}x |")


if __name__ == "__main__":
    main()
