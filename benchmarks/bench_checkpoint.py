"""Cost of checkpoint verification: XXH3-128 hash of every file against the save itself, in one run.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_checkpoint.py [--sizes 25,100] [--reps 3]

For each student size (millions of parameters, fp32, AdamW state filled by one step) it saves
full checkpoints with kd.checkpoint.save with hashing switched off (write + fsync of every file),
then times hashing those files exactly as save does (kd.checkpoint._hash_share). Prints the
medians and hash / save; the target is <= 10 %. Timing the two apart keeps the disk's writeback
noise (which swings whole saves by +-50 % here) out of the ratio. Files land on the disk of --dir
(default: a temporary directory).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kd import checkpoint  # noqa: E402


def student(millions: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    h = 512 if millions < 60 else 1024
    layers = max(1, round(millions * 1e6 / (12 * h * h)))
    cfg = LlamaConfig(vocab_size=32000, hidden_size=h, intermediate_size=int(h * 8 / 3) // 64 * 64,
                      num_hidden_layers=layers, num_attention_heads=8, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="25,100", help="student sizes in millions of parameters")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    real_hash = checkpoint._hash_share
    print("| student params | checkpoint MiB | save s (write + fsync) | checksums s | checksums / save |")
    print("|---:|---:|---:|---:|---:|")
    for m in (int(x) for x in args.sizes.split(",")):
        model = student(m)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        model(torch.randint(0, 100, (1, 8)), labels=torch.randint(0, 100, (1, 8))).loss.backward()
        opt.step()
        saves, hashes = [], []
        checkpoint._hash_share = lambda root, names: {n: {"size": 0, "xxh3_128": "0"} for n in names}
        with tempfile.TemporaryDirectory(dir=args.dir) as d:
            for rep in range(args.reps):
                t0 = time.perf_counter()
                path = checkpoint.save(acc, model, opt, d, rep, {"step": 0}, keep=1)
                saves.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                real_hash(path, checkpoint._files(path))
                hashes.append(time.perf_counter() - t0)
            size = sum(f.stat().st_size for f in path.rglob("*")) / 2**20
        checkpoint._hash_share = real_hash
        save_s, hash_s = statistics.median(saves), statistics.median(hashes)
        n = sum(p.numel() for p in model.parameters())
        print(f"| {n / 1e6:.0f}M | {size:.0f} | {save_s:.2f} | {hash_s:.3f} | {hash_s / save_s:.1%} |")


if __name__ == "__main__":
    main()
