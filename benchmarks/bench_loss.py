"""Dense vs chunked distillation loss: extra peak memory and forward+backward time.

    .venv/bin/python benchmarks/bench_loss.py                              # CPU fp32, the issue's grid
    .venv/bin/python benchmarks/bench_loss.py --device cuda --dtype bf16   # GPU

Shapes default to a LLaMA-2-7B student (hidden 4096) and a 70B teacher (hidden 8192), vocab
32000. Both paths do the same work: project the student hidden states (with autograd) and the
teacher's (without), take CE + divergence, and backpropagate into the student hidden states and
lm_head weight. "dense" = full logits + `kd.loss.dense.kd_loss`; "chunked" = `kd.loss.chunked.chunked_kd_loss`.

Memory: every (N, method) runs alone in a fresh child process (this script with --child
memory). It allocates the inputs (hidden states, both lm_head weights, labels) and the student
weight-gradient buffer that both paths must hold, takes that as the baseline, runs one
forward+backward and reports peak minus baseline: VmHWM (reset through /proc/self/clear_refs)
on CPU, torch.cuda.max_memory_allocated on GPU. Nothing else ever ran in that process.

Time: one more child per N runs the methods alternately (A B, B A, ...) so background load
falls on both alike, after `--warmup` untimed rounds. On CPU the memory run's own
forward+backward time is one more sample (a first call costs well under 1 % of a step there);
on GPU it is not (CUDA context, kernel selection). The table gives the median and the minimum
of the samples; on a shared machine the minimum is the steadier of the two.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
CHILD_ARGS = (
    "device", "dtype", "chunk_size", "student_hidden", "teacher_hidden", "vocab",
    "alpha", "temperature", "divergence", "threads", "reps", "warmup",
)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    # "5" resets VmHWM to the current RSS (Linux >= 4.0).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def run_child(args: argparse.Namespace) -> dict:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from kd.loss.chunked import chunked_kd_loss
    from kd.loss import LossSpec, kd_loss

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    dtype = getattr(torch, DTYPES[args.dtype])
    cuda = dev.type == "cuda"
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape, scale):
        return (torch.randn(*shape, generator=g) * scale).to(dev, dtype)

    n, hs, ht, v = args.n, args.student_hidden, args.teacher_hidden, args.vocab
    s_hidden = randn(n, hs, scale=1.0).requires_grad_()
    s_weight = randn(v, hs, scale=hs**-0.5).requires_grad_()
    t_hidden = randn(n, ht, scale=1.0)
    t_weight = randn(v, ht, scale=ht**-0.5)
    labels = torch.randint(0, v, (n,), generator=g).to(dev)
    s_weight.grad = torch.zeros_like(s_weight)
    loss_kw = dict(vocab_size=v, alpha=args.alpha, temperature=args.temperature, divergence=args.divergence)

    def step(method: str) -> float:
        if method == "dense":
            s_logits = s_hidden @ s_weight.t()
            with torch.no_grad():
                t_logits = t_hidden @ t_weight.t()
            out = kd_loss(s_logits, t_logits, labels, LossSpec(**loss_kw))
        else:
            out = chunked_kd_loss(s_hidden, s_weight, t_hidden, t_weight, labels, LossSpec(chunk_size=args.chunk_size, **loss_kw))
        (out.weighted_sum / n).backward()
        return out.weighted_sum.item() / n

    def sync():
        if cuda:
            torch.cuda.synchronize()

    if args.mode == "memory":
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            _reset_peak_rss()
            base = _rss_kib("VmRSS") * 1024
        t0 = time.perf_counter()
        loss = step(args.method)
        sync()
        elapsed = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() if cuda else _rss_kib("VmHWM") * 1024
        return {"loss": loss, "base_bytes": base, "extra_bytes": peak - base, "seconds": elapsed}

    methods = args.method.split(",")
    times: dict[str, list[float]] = {m: [] for m in methods}
    for rep in range(args.warmup + args.reps):
        for m in methods if rep % 2 == 0 else methods[::-1]:
            s_hidden.grad = None
            s_weight.grad.zero_()
            sync()
            t0 = time.perf_counter()
            step(m)
            sync()
            if rep >= args.warmup:
                times[m].append(time.perf_counter() - t0)
    return {"times": times}


def _child(args: argparse.Namespace, n: int, method: str, mode: str) -> dict:
    argv = [sys.executable, os.path.abspath(__file__), "--child", mode, "--n", str(n), "--method", method]
    for name in CHILD_ARGS:
        argv += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"child {mode} {method} N={n} failed ({proc.returncode}):\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _log(msg: str) -> None:
    print("# " + msg, file=sys.stderr, flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--ns", default="2048,4096,8192", help="comma-separated response-token counts")
    p.add_argument("--methods", default="dense,chunked")
    p.add_argument("--reps", type=int, default=None, help="alternated timed reps per method (default: 1 cpu, 5 cuda)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default: 0 cpu, 1 cuda)")
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--student-hidden", type=int, default=4096)
    p.add_argument("--teacher-hidden", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--divergence", default="forward_kl")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads in the children (0: default)")
    p.add_argument("--child", dest="mode", choices=("memory", "time"), help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    args = p.parse_args()
    cpu = args.device == "cpu"
    if args.reps is None:
        args.reps = 1 if cpu else 5
    if args.warmup is None:
        args.warmup = 0 if cpu else 1

    if args.mode:
        print(json.dumps(run_child(args)), flush=True)
        return

    methods = args.methods.split(",")
    rows = []
    started = time.perf_counter()
    for n in (int(x) for x in args.ns.split(",")):
        mem = {}
        for m in methods:
            mem[m] = _child(args, n, m, "memory")
            _log(f"N={n} {m}: extra {mem[m]['extra_bytes'] / 2**20:.0f} MiB over a baseline of "
                 f"{mem[m]['base_bytes'] / 2**20:.0f} MiB, {mem[m]['seconds']:.2f} s, loss {mem[m]['loss']:.6f}")
        timed = _child(args, n, ",".join(methods), "time")["times"] if args.reps > 0 else {m: [] for m in methods}
        times = {m: ([mem[m]["seconds"]] if cpu else []) + timed[m] for m in methods}
        _log(f"N={n} time samples (s): {json.dumps({m: [round(t, 2) for t in ts] for m, ts in times.items()})}")
        rows.append((n, mem, times))

    samples = args.reps + (1 if cpu else 0)
    print(
        f"\n{args.device} {args.dtype}, torch threads {args.threads or 'default'}, Hs={args.student_hidden}, "
        f"Ht={args.teacher_hidden}, V={args.vocab}, {args.divergence}, alpha={args.alpha}, T={args.temperature}, "
        f"chunk_size={args.chunk_size}; {samples} time sample(s) per method; "
        f"grid took {(time.perf_counter() - started) / 60:.1f} min\n"
    )
    if methods != ["dense", "chunked"]:
        return
    print(
        "| N | dense extra MiB | chunked extra MiB | chunked/dense mem "
        "| dense s (median / min) | chunked s (median / min) | chunked/dense time (median / min) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n, mem, times in rows:
        dm, cm = mem["dense"]["extra_bytes"] / 2**20, mem["chunked"]["extra_bytes"] / 2**20
        if times["dense"] and times["chunked"]:
            dmed, dmin = statistics.median(times["dense"]), min(times["dense"])
            cmed, cmin = statistics.median(times["chunked"]), min(times["chunked"])
            t = f"{dmed:.2f} / {dmin:.2f} | {cmed:.2f} / {cmin:.2f} | {cmed / dmed:.2f}x / {cmin / dmin:.2f}x"
        else:
            t = "- | - | -"
        print(f"| {n} | {dm:.0f} | {cm:.0f} | {cm / dm:.1%} | {t} |")


if __name__ == "__main__":
    main()
