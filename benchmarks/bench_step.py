"""Whole KD step on the tiny CPU models: time of one KD step / (teacher forward + student SFT step
on the same batch), both measured in the same process, alternating, median of repetitions.

    .venv/bin/python benchmarks/bench_step.py [--reps 30] [--micro-batch 8] [--implementation chunked]

KD step  = teacher forward to response-row hidden states (no grad) + Distiller forward (student
           forward + chunked/dense CE+KD) + backward + AdamW step   -- what kd/train.py runs
baseline = teacher forward (HF, full logits, no grad) + student SFT step (HF forward with labels,
           backward, AdamW step)
The breakdown shows where the difference goes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kd.data import collate, example_from_views, render_views  # noqa: E402
from kd.forward import Distiller, head, teacher_forward  # noqa: E402
from kd.loss import LossSpec  # noqa: E402
from kd.models import load_model, load_tokenizer  # noqa: E402
from kd.cli import quiet_libraries  # noqa: E402


def batch_of(tok, n: int) -> dict:
    recs = [json.loads(line) for line in open(ROOT / "data/demo/train.jsonl")][:n]
    exs = []
    for r in recs:
        t, s, resp = render_views(r, tok, erase=True, generic_system="You are a helpful assistant.")
        exs.append(example_from_views(t, s, resp))
    return collate(exs, tok.pad_token_id)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--implementation", default="chunked", choices=("chunked", "dense"))
    args = ap.parse_args()
    quiet_libraries()
    torch.manual_seed(0)
    tok = load_tokenizer("builtin:tokenizer")
    teacher = load_model("builtin:tiny-teacher", torch.float32, None, "teacher").eval().requires_grad_(False)
    student = load_model("builtin:tiny-student", torch.float32, None, "student").train()
    b = batch_of(tok, args.micro_batch)
    distiller = Distiller(student, LossSpec(len(tok), alpha=0.5, temperature=2.0, implementation=args.implementation))
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    # HF SFT labels: -100 everywhere except response tokens (the same tokens KD trains on)
    sft_labels = torch.full_like(b["student_input_ids"], -100).flatten()
    sft_labels[b["student_index"] + 1] = b["labels"]
    sft_labels = sft_labels.view_as(b["student_input_ids"])

    parts: dict[str, list[float]] = {k: [] for k in ("kd_teacher", "kd_student_loss_fwd", "kd_backward", "kd_optim",
                                                     "base_teacher", "base_sft_fwd", "base_backward", "base_optim")}

    def kd_step():
        th = [None]
        parts["kd_teacher"].append(timed(lambda: th.__setitem__(0, teacher_forward(teacher, b))))
        out = [None]
        parts["kd_student_loss_fwd"].append(timed(lambda: out.__setitem__(0, distiller(b, th[0], head(teacher)))))
        parts["kd_backward"].append(timed(lambda: (out[0]["weighted_sum"] / len(b["labels"])).backward()))
        parts["kd_optim"].append(timed(lambda: (opt.step(), opt.zero_grad(set_to_none=True))))

    def base_step():
        with torch.no_grad():
            parts["base_teacher"].append(timed(lambda: teacher(input_ids=b["teacher_input_ids"],
                                                               attention_mask=b["teacher_attention_mask"]).logits))
        out = [None]
        parts["base_sft_fwd"].append(timed(lambda: out.__setitem__(0, student(
            input_ids=b["student_input_ids"], attention_mask=b["student_attention_mask"], labels=sft_labels).loss)))
        parts["base_backward"].append(timed(lambda: out[0].backward()))
        parts["base_optim"].append(timed(lambda: (opt.step(), opt.zero_grad(set_to_none=True))))

    for _ in range(3):  # warm-up
        kd_step()
        base_step()
    for v in parts.values():
        v.clear()
    kd_tot, base_tot = [], []
    for _ in range(args.reps):  # alternate so load on the shared machine hits both alike
        kd_tot.append(timed(kd_step))
        base_tot.append(timed(base_step))
    med = {k: statistics.median(v) * 1e3 for k, v in parts.items()}
    kd, base = statistics.median(kd_tot) * 1e3, statistics.median(base_tot) * 1e3
    print(f"micro-batch {args.micro_batch}, {len(b['labels'])} response tokens, "
          f"{int(b['student_attention_mask'].sum())} student tokens, {args.implementation} loss, {args.reps} reps")
    print("| part | KD step (ms) | baseline (ms) |\n|---|---:|---:|")
    print(f"| teacher forward | {med['kd_teacher']:.1f} (hidden states) | {med['base_teacher']:.1f} (full logits) |")
    print(f"| student forward + loss | {med['kd_student_loss_fwd']:.1f} (CE+KD, grads precomputed) | "
          f"{med['base_sft_fwd']:.1f} (CE) |")
    print(f"| backward | {med['kd_backward']:.1f} | {med['base_backward']:.1f} |")
    print(f"| optimizer | {med['kd_optim']:.1f} | {med['base_optim']:.1f} |")
    print(f"| **total** | **{kd:.1f}** | **{base:.1f}** |")
    print(f"ratio KD step / (teacher forward + SFT step) = {kd / base:.3f}  (target <= 1.10)")


if __name__ == "__main__":
    main()
