"""bf16 ZeRO-3 KD run on one GPU: a ~1B teacher and a ~150M student (random init from configs),
a few dozen steps; prints tokens/s, peak memory against kd.plan's estimate, and MFU.

    python benchmarks/gpu_kd.py --steps 40            # on a GPU machine (H100: peak 989 TFLOP/s bf16)
    python benchmarks/gpu_kd.py --smoke               # CPU: tiny sizes, 2 DeepSpeed ranks, checks the script

The vocabulary is a real 32000-entry LLaMA-style SentencePiece model (mistral-common ships one);
pass --tokenizer-model to point at a copy where mistral-common is not installed. The GPU machine
needs deepspeed, datasets, omegaconf and wandb besides torch/transformers/accelerate.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {  # name: (hidden, layers, heads, intermediate)
    "teacher": (2048, 16, 16, 5504),  # ~0.94B parameters with a 32000 vocabulary, untied
    "student": (768, 14, 12, 2048),   # ~150M
    "smoke-teacher": (128, 2, 4, 256),
    "smoke-student": (64, 2, 4, 128),
}
H100_BF16_PEAK = 989e12


def tokenizer_dir(dst: Path, model_file: str | None) -> Path:
    if model_file is None:
        import mistral_common

        model_file = str(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1")
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(model_file, dst / "tokenizer.model")
    (dst / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    return dst


def build_models(work: Path, tok_dir: Path, smoke: bool) -> dict[str, int]:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tok_dir)
    params = {}
    for role in ("teacher", "student"):
        h, layers, heads, inter = SIZES[("smoke-" if smoke else "") + role]
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
                          num_key_value_heads=heads, intermediate_size=inter, max_position_embeddings=4096,
                          tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
        model.save_pretrained(work / role)
        tok.save_pretrained(work / role)
        params[role] = sum(p.numel() for p in model.parameters())
    return params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--implementation", default="dense", choices=("dense", "chunked"))
    ap.add_argument("--tokenizer-model", default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run that only checks the script")
    ap.add_argument("--out", default=None, help="write the result row as JSON here")
    args = ap.parse_args()
    if args.smoke:
        args.steps, args.micro_batch, args.seq = 3, 2, 256

    from kd.demo.tasks import generate

    work = Path(tempfile.mkdtemp(prefix="kd-gpu-bench-"))
    params = build_models(work, tokenizer_dir(work / "tok", args.tokenizer_model), args.smoke)
    with open(work / "train.jsonl", "w") as fh:
        for rec in generate(4000, seed=0):
            fh.write(json.dumps(rec) + "\n")
    launch = "launch/cpu_ds2_zero3.yaml" if args.smoke else "launch/gpu1_zero3.yaml"
    overrides = [f"teacher.name_or_path={work / 'teacher'}", f"student.name_or_path={work / 'student'}",
                 "teacher.dtype=bfloat16", "student.dtype=bfloat16", "student.gradient_checkpointing=true",
                 f"data.train_files=[{work / 'train.jsonl'}]", "data.eval_fraction=0", "data.chat_template=llama2",
                 f"data.max_length={args.seq}", f"train.micro_batch_size={args.micro_batch}",
                 "train.grad_accum_steps=1", f"train.max_steps={args.steps}", "train.eval_every=0",
                 "train.save_every=0", "train.export=false", f"train.output_dir={work / 'run'}",
                 f"loss.implementation={args.implementation}", "log.progress_bar=false",
                 "train.mixed_precision=" + ("no" if args.smoke else "bf16")]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", launch, "kd/train.py",
           "--config", "configs/demo.yaml", *overrides]
    subprocess.run(cmd, cwd=ROOT, check=True)

    rows = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    steady = rows[min(5, len(rows) - 1):]  # skip warm-up steps
    tps = statistics.median(r["train/tokens_per_s"] for r in steady)
    peak = max(r["sys/peak_mem_gib"] for r in rows)

    from kd.config import load_config
    from kd.tools.plan import GiB, plan

    cfg = load_config(ROOT / "configs/demo.yaml", overrides)
    planned = sum(b for _, b in plan(cfg, gpus=1, student_zero=3, gpu=not args.smoke)) / GiB
    # FLOPs per token: student forward+backward (6P) plus recomputation under checkpointing (2P),
    # teacher forward (2P). Teacher and student see about the same number of tokens.
    flops_per_token = 8 * params["student"] + 2 * params["teacher"]
    mfu = tps * flops_per_token / H100_BF16_PEAK
    result = {"teacher_params": params["teacher"], "student_params": params["student"], "tokens_per_s": tps,
              "peak_mem_gib": peak, "planned_gib": planned, "mfu": mfu, "steps": len(rows),
              "micro_batch": args.micro_batch, "seq": args.seq, "implementation": args.implementation}
    print(json.dumps(result, indent=1))
    print(f"| {params['teacher'] / 1e9:.2f}B -> {params['student'] / 1e6:.0f}M | {args.implementation} | "
          f"{tps:,.0f} tok/s | peak {peak:.1f} GiB (plan {planned:.1f}) | MFU {mfu:.1%} |")
    if args.out:
        Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
