"""Whole KD step on the tiny CPU models: time of one KD step / (teacher forward + student SFT step
on the same batch), both measured in the same process, alternating, median of repetitions.

    .venv/bin/python benchmarks/bench_step.py [--reps 30] [--micro-batch 8] [--implementation chunked]
                                              [--vocab 32000]
                                              [--optimizers for_loop,fused]

KD step  = teacher forward to response-row hidden states (no grad) + Distiller forward (student
           forward + chunked/dense CE+KD) + backward + AdamW step   -- what kd/train.py runs
baseline = teacher forward (HF, full logits, no grad) + student SFT step (HF forward with labels,
           backward, AdamW step)
The breakdown shows where the difference goes. Each AdamW kernel in --optimizers (kd.train's
optim.implementation) is measured in the same run, KD step and baseline with the same kernel.
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
from kd.train import adamw_kernel  # noqa: E402
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
    ap.add_argument("--vocab", type=int, default=0, help="rebuild both tiny models with this vocabulary size")
    ap.add_argument("--optimizers", default="for_loop,fused",
                    help="comma-separated optim.implementation values, each measured in this run")
    args = ap.parse_args()
    kernels = args.optimizers.split(",")
    quiet_libraries()
    torch.manual_seed(0)
    tok = load_tokenizer("builtin:tokenizer")
    teacher = load_model("builtin:tiny-teacher", torch.float32, None, "teacher").eval().requires_grad_(False)
    student = load_model("builtin:tiny-student", torch.float32, None, "student").train()
    if args.vocab:  # the same tiny bodies with a real-size vocabulary (random weights; the demo ids fit)
        from transformers import AutoModelForCausalLM

        def widened(model):
            cfg = model.config
            cfg.vocab_size = args.vocab
            return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)

        teacher, student = widened(teacher).eval().requires_grad_(False), widened(student).train()
    b = batch_of(tok, args.micro_batch)
    distiller = Distiller(student, LossSpec(args.vocab or len(tok), alpha=0.5, temperature=2.0, implementation=args.implementation))
    opts = {k: torch.optim.AdamW(student.parameters(), lr=1e-5, **adamw_kernel(k, "cpu")) for k in kernels}
    # HF SFT labels: -100 everywhere except response tokens (the same tokens KD trains on)
    sft_labels = torch.full_like(b["student_input_ids"], -100).flatten()
    sft_labels[b["student_index"] + 1] = b["labels"]
    sft_labels = sft_labels.view_as(b["student_input_ids"])

    names = ("kd_teacher", "kd_student_loss_fwd", "kd_backward", "kd_optim",
             "base_teacher", "base_sft_fwd", "base_backward", "base_optim", "kd_total", "base_total")
    parts: dict[str, dict[str, list[float]]] = {k: {n: [] for n in names} for k in kernels}

    def kd_step(k):
        p, opt = parts[k], opts[k]
        th = [None]
        p["kd_teacher"].append(timed(lambda: th.__setitem__(0, teacher_forward(teacher, b))))
        out = [None]
        p["kd_student_loss_fwd"].append(timed(lambda: out.__setitem__(0, distiller(b, th[0], head(teacher)))))
        p["kd_backward"].append(timed(lambda: (out[0]["weighted_sum"] / len(b["labels"])).backward()))
        p["kd_optim"].append(timed(lambda: (opt.step(), opt.zero_grad(set_to_none=True))))

    def base_step(k):
        p, opt = parts[k], opts[k]
        with torch.no_grad():
            p["base_teacher"].append(timed(lambda: teacher(input_ids=b["teacher_input_ids"],
                                                           attention_mask=b["teacher_attention_mask"]).logits))
        out = [None]
        p["base_sft_fwd"].append(timed(lambda: out.__setitem__(0, student(
            input_ids=b["student_input_ids"], attention_mask=b["student_attention_mask"], labels=sft_labels).loss)))
        p["base_backward"].append(timed(lambda: out[0].backward()))
        p["base_optim"].append(timed(lambda: (opt.step(), opt.zero_grad(set_to_none=True))))

    for _ in range(3):  # warm-up
        for k in kernels:
            kd_step(k)
            base_step(k)
    for p in parts.values():
        for v in p.values():
            v.clear()
    for _ in range(args.reps):  # alternate everything so load on the shared machine hits all alike
        for k in kernels:
            parts[k]["kd_total"].append(timed(lambda: kd_step(k)))
            parts[k]["base_total"].append(timed(lambda: base_step(k)))
    print(f"micro-batch {args.micro_batch}, {len(b['labels'])} response tokens, "
          f"{int(b['student_attention_mask'].sum())} student tokens, vocab {args.vocab or len(tok)}, "
          f"{args.implementation} loss, {args.reps} reps")
    med = {k: {n: statistics.median(v) * 1e3 for n, v in parts[k].items()} for k in kernels}
    head_row = " | ".join(f"KD step, {k} (ms) | baseline, {k} (ms)" for k in kernels)
    print(f"| part | {head_row} |\n|---|" + "---:|" * (2 * len(kernels)))
    for label, kd_key, base_key in (("teacher forward", "kd_teacher", "base_teacher"),
                                    ("student forward + loss", "kd_student_loss_fwd", "base_sft_fwd"),
                                    ("backward", "kd_backward", "base_backward"),
                                    ("optimizer", "kd_optim", "base_optim"),
                                    ("**total**", "kd_total", "base_total")):
        cells = " | ".join(f"{med[k][kd_key]:.1f} | {med[k][base_key]:.1f}" for k in kernels)
        print(f"| {label} | {cells} |")
    for k in kernels:
        print(f"optim.implementation={k}: ratio KD step / (teacher forward + SFT step) = "
              f"{med[k]['kd_total'] / med[k]['base_total']:.3f}  (target <= 1.10); optimizer step "
              f"{med[k]['kd_optim']:.1f} ms = {med[k]['kd_optim'] / med[k]['kd_total']:.1%} of the KD step")
    if len(kernels) > 1:
        a, z = kernels[0], kernels[-1]
        print(f"KD step {z} / {a} = {med[z]['kd_total'] / med[a]['kd_total']:.3f}; "
              f"optimizer step {z} / {a} = {med[z]['kd_optim'] / med[a]['kd_optim']:.3f}")


if __name__ == "__main__":
    main()
