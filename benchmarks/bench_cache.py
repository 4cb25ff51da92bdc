"""Teacher-logit cache: bytes per response token, error of the cached loss against the live one,
and train-step time with the cache vs the live teacher.

    .venv/bin/python benchmarks/bench_cache.py                  # all three parts, Markdown tables
    .venv/bin/python benchmarks/bench_cache.py --part error     # bytes | error | time

bytes: `kd.cache.build_cache` over the first --examples demo records for each k; on-disk shard bytes
       (headers and per-example index included) / response tokens, next to k*(2|4) + 4k + 4m
       (m = 4 stored tail temperatures).
error: the cached loss (`topk_kd_loss`: top-k + one tail bucket) against the exact live loss
       (`kd_loss` on full logits), KD term only (alpha = 0; the CE term is exact), and the gradient
       w.r.t. the student logits. Three tail treatments: the cache as shipped (tail mass stored at
       T = 1, 2, 4, 8, chord in 1/T between), a cache storing T = 1 only (flat-tail estimate), and the
       true tempered tail mass (what is left is the dropped within-tail divergence). Two settings:
       the builtin tiny teacher/student on demo batches (random-init models: flat distributions),
       and synthetic LLM-like logits (V = 32000, Zipf-ranked teacher with exponents 1.5-3, a
       student = teacher perturbed).
time:  median optimizer-step time of the same loop body as kd/train.py with the live tiny teacher
       (teacher forward + Distiller) vs the cache (lookup + CachedDistiller), alternating in one
       process on the same batches.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from kd.cache.build import build_cache  # noqa: E402
from kd.cache.store import TeacherCache  # noqa: E402
from kd.cache.teacher import CachedDistiller  # noqa: E402
from kd.loss.topk import teacher_topk, topk_kd_loss  # noqa: E402
from kd.config import load_config  # noqa: E402
from kd.loss import LossSpec, kd_loss  # noqa: E402


def demo_config(tmp: Path, examples: int, cache: Path, **extra):
    lines = (ROOT / "data/demo/train.jsonl").read_text().splitlines()[:examples]
    train = tmp / f"train{examples}.jsonl"
    train.write_text("\n".join(lines) + "\n")
    over = {"data.train_files": f"[{train}]", "data.eval_files": "[]", "data.eval_fraction": 0,
            "teacher.cache": str(cache), "train.output_dir": str(tmp / "run"), **extra}
    return load_config(ROOT / "configs/demo.yaml", [f"{k}={v}" for k, v in over.items()])


# --------------------------------------------------------------------------- bytes


def part_bytes(tmp: Path, examples: int, ks=(16, 64, 256)) -> None:
    print(f"\n### Bytes per response token (demo data, first {examples} records, vocabulary 520: int16 ids)\n")
    print("| k | shard bytes / token | formula 2k + 4k + 4·4 | same k, V = 32000 (int16 ids) "
          "| V = 128256 (int32 ids) |")
    print("|---:|---:|---:|---:|---:|")
    for k in ks:
        path = tmp / f"cache_k{k}"
        m = build_cache(demo_config(tmp, examples, path), k=k, log=lambda *a: None)
        tokens = sum(s["tokens"] for s in m["splits"].values())
        nbytes = sum(p.stat().st_size for p in path.glob("*.safetensors"))
        print(f"| {k} | {nbytes / tokens:.1f} | {6 * k + 16} | {6 * k + 16} | {8 * k + 16} |")
    print(f"\n({tokens} response tokens.) For scale: LLaMA-2 70B's full fp32 logits are 128,000 bytes/token.")


# --------------------------------------------------------------------------- error


TEMPS = (1.0, 2.0, 4.0, 8.0)  # build_cache's default tail temperatures


def _errors(student: torch.Tensor, teacher: torch.Tensor, labels, v: int, k: int, t: float, div: str):
    """Relative loss and gradient errors of three tail treatments against the live loss."""
    s_live = student.clone().requires_grad_()
    live = kd_loss(s_live, teacher, labels, LossSpec(vocab_size=v, alpha=0.0, temperature=t, divergence=div))
    live.weighted_sum.backward()
    top = teacher_topk(teacher, k, v, TEMPS)
    z = teacher[:, :v].float()
    true_tail = (z / t).scatter(-1, top.ids, float("-inf")).logsumexp(-1)
    variants = {"cache": (top.tail_lse, TEMPS),  # as shipped: exact at 1, 2, 4, 8, chord between
                "t1": (top.tail_lse[:, :1], (1.0,)),  # only T = 1 stored: flat-tail estimate
                "exact": (true_tail.unsqueeze(-1), (t,))}  # the true tempered tail mass
    out = {}
    for name, (tail, temps) in variants.items():
        s = student.clone().requires_grad_()
        got = topk_kd_loss(s, top.ids, top.logits, tail, labels, LossSpec(vocab_size=v, alpha=0.0, temperature=t, divergence=div), tail_temperatures=temps)
        got.weighted_sum.backward()
        rel = (got.kd_sum - live.kd_sum).abs().item() / live.kd_sum.abs().item()
        g = (s.grad - s_live.grad).norm().item() / s_live.grad.norm().item()
        cos = torch.nn.functional.cosine_similarity(s.grad.flatten(), s_live.grad.flatten(), dim=0).item()
        out[name] = (rel, g, cos)
    tail_mass = (true_tail - (z / t).logsumexp(-1)).exp().mean().item()
    return live.kd_sum.item() / labels.numel(), tail_mass, out


def _table(title: str, student, teacher, labels, v: int, ks, temps=(1.0, 1.5, 2.0, 3.0, 4.0),
           divs=("forward_kl", "reverse_kl", "jsd")) -> None:
    print(f"\n#### {title}\n")
    print("Loss / gradient relative error; the cache as shipped stores the tail mass at T = 1, 2, 4, 8 "
          "(chord in 1/T between).\n")
    print("| divergence | k | T | teacher tail mass at T | live KD / token | cache: loss / grad error | grad cosine "
          "| T=1-only tail (flat estimate) | true tempered tail |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for div in divs:
        for k in ks:
            for t in temps:
                kd, tail, e = _errors(student, teacher, labels, v, k, t, div)
                f = lambda x: f"{x[0]:.2%} / {x[1]:.2%}"  # noqa: E731
                print(f"| {div} | {k} | {t:g} | {tail:.2%} | {kd:.4g} | {f(e['cache'])} | {e['cache'][2]:.4f} | "
                      f"{f(e['t1'])} | {f(e['exact'])} |")


def part_error(tmp: Path, ks=(16, 64, 256)) -> None:
    print("\n### Cached loss vs the exact live loss (KD term, alpha = 0; gradient w.r.t. student logits)")
    t_logits, s_logits, labels, v = demo_logits(tmp)
    _table(f"Builtin tiny teacher -> tiny student, 16 demo examples ({t_logits.shape[0]} response tokens), V = {v}",
           s_logits, t_logits, labels, v, ks, temps=(1.0, 2.0, 4.0), divs=("forward_kl",))

    n, v = 256, 32000
    teacher_syn, student_syn, labels = synthetic_logits(n, v)
    _table(f"Synthetic LLM-like logits: {n} tokens, V = {v}, Zipf exponents 1.5-3, student = 0.8 teacher + N(0, 1)",
           student_syn, teacher_syn, labels, v, ks)


def demo_logits(tmp: Path):
    """The builtin tiny teacher's and student's fp32 logits on 16 demo examples' response tokens:
    (teacher [N, V], student [N, Vs], labels [N], V)."""
    from kd.data import build_datasets, collate
    from kd.forward import fp32_logits, head, response_hidden, teacher_forward
    from kd.models import load_student, load_teacher, load_tokenizers

    cfg = demo_config(tmp, 64, tmp / "unused")
    tok = load_tokenizers(cfg)
    v = len(tok)
    train, *_ = build_datasets(cfg.data, tok, cfg.train.seed)
    batch = collate([train[i] for i in range(16)], tok.pad_token_id)
    teacher, student = load_teacher(cfg, v, "cpu"), load_student(cfg, v, "cpu")
    with torch.no_grad():
        t_logits = fp32_logits(teacher_forward(teacher, batch), head(teacher))[:, :v]
        s_logits = fp32_logits(response_hidden(student, batch, "student"), head(student))
    return t_logits, s_logits, batch["labels"], v


def synthetic_logits(n: int = 256, v: int = 32000, seed: int = 0):
    """LLM-like logits: each row a Zipf-ranked teacher (exponent 1.5-3) over a random permutation of
    the vocabulary, a student = 0.8 teacher + N(0, 1), labels drawn from the teacher."""
    g = torch.Generator().manual_seed(seed)
    exponent = 1.5 + 1.5 * torch.rand(n, 1, generator=g)
    ranked = -exponent * torch.log(torch.arange(1, v + 1, dtype=torch.float32)) + 0.3 * torch.randn(n, v, generator=g)
    perm = torch.argsort(torch.rand(n, v, generator=g), dim=-1)
    teacher = torch.empty(n, v).scatter_(-1, perm, ranked)
    student = 0.8 * teacher + 1.0 * torch.randn(n, v, generator=g)
    labels = torch.multinomial(teacher.softmax(-1), 1, generator=g).squeeze(-1)
    return teacher, student, labels


# --------------------------------------------------------------------------- time


def part_time(tmp: Path, examples: int, steps: int, k: int = 64) -> None:
    from kd.data import MicroBatchSampler, build_datasets, collate
    from kd.forward import Distiller, head, teacher_forward
    from kd.models import load_student, load_teacher, load_tokenizers
    from kd.train import make_optimizer

    cfg = demo_config(tmp, examples, tmp / f"time_k{k}")
    t0 = time.perf_counter()
    build_cache(cfg, k=k, log=lambda *a: None)
    build_s = time.perf_counter() - t0
    tok = load_tokenizers(cfg)
    v = len(tok)
    train, *_ = build_datasets(cfg.data, tok, cfg.train.seed)
    cache = TeacherCache.open(cfg, tok, train, None)
    teacher = load_teacher(cfg, v, "cpu")
    mb = cfg.train.micro_batch_size
    sampler = MicroBatchSampler(len(train), mb, seed=cfg.train.seed)
    batches = [collate([train[i] for i in sampler.indices(j)], tok.pad_token_id) for j in range(steps + 1)]
    spec = LossSpec(v, alpha=cfg.loss.alpha, temperature=cfg.loss.temperature, divergence=cfg.loss.divergence)
    student = load_student(cfg, v, "cpu")
    live = Distiller(copy.deepcopy(student), spec)
    cached = CachedDistiller(copy.deepcopy(student), spec)
    opts = {name: make_optimizer(m, cfg)[0] for name, m in (("live", live), ("cache", cached))}

    def step(name: str, batch: dict) -> float:
        t = time.perf_counter()
        if name == "live":
            parts = live(batch, teacher_forward(teacher, batch), head(teacher))
        else:
            parts = cached(batch, cache.lookup(batch, "train"))
        (parts["weighted_sum"] / batch["labels"].numel()).backward()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)
        return time.perf_counter() - t

    times = {"live": [], "cache": []}
    for j, batch in enumerate(batches):
        order = ("live", "cache") if j % 2 == 0 else ("cache", "live")
        for name in order:
            dt = step(name, batch)
            if j > 0:  # the first step of each warms up
                times[name].append(dt)
    tokens = statistics.mean(b["labels"].numel() for b in batches)
    live_s, cache_s = statistics.median(times["live"]), statistics.median(times["cache"])
    t_fwd = []
    for batch in batches[1:]:
        t = time.perf_counter()
        teacher_forward(teacher, batch)
        t_fwd.append(time.perf_counter() - t)
    print(f"\n### Step time, cache vs live teacher (tiny CPU models, same process, {steps} alternating steps)\n")
    print(f"micro-batch {mb} demo examples (~{tokens:.0f} response tokens), data.max_length {cfg.data.max_length}, "
          f"{cfg.loss.divergence}, T = {cfg.loss.temperature:g}, k = {k}, torch threads {torch.get_num_threads()}\n")
    print("| path | median step (s) | |")
    print("|---|---:|---|")
    print(f"| live teacher (forward + Distiller + backward + AdamW) | {live_s:.3f} | |")
    print(f"| cache (lookup + CachedDistiller + backward + AdamW) | {cache_s:.3f} | {live_s / cache_s:.2f}x faster |")
    print(f"| teacher forward alone | {statistics.median(t_fwd):.3f} | |")
    print(f"\nBuilding the k={k} cache of these {examples} examples took {build_s:.1f}s "
          f"(one teacher pass, {sum(s['tokens'] for s in cache.manifest['splits'].values())} response tokens).")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", default="all", choices=("all", "bytes", "error", "time"))
    p.add_argument("--examples", type=int, default=128, help="demo records for the bytes and time parts")
    p.add_argument("--steps", type=int, default=16, help="timed steps per path")
    args = p.parse_args()
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if args.part in ("all", "bytes"):
            part_bytes(tmp, args.examples)
        if args.part in ("all", "error"):
            part_error(tmp)
        if args.part in ("all", "time"):
            part_time(tmp, args.examples, args.steps)


if __name__ == "__main__":
    main()
