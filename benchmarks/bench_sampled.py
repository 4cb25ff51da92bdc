"""Sampled teacher cache vs top-k: bytes per token, gradient bias and gradient error at T = 1, 2, 4.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_sampled.py [--caches 200] [--part bytes|error|demo]

bytes: on synthetic LLM-like logits (V = 32000, the generator of bench_cache.py: Zipf-ranked rows
       with exponents 1.5-3), the mean number of unique ids among N draws, and the bytes per token
       each format stores: sampled U * (2 id + 1 count + 2 fp16 log q) + 1 + 4 (m - 1), top-k
       k * (2 + 4) + 4 m, with m = 4 served temperatures (1, 2, 4, 8) for both. Also the on-disk
       shard bytes of `kd.cache --format sampled` on the demo data (vocabulary 520).
error: the forward-KL gradient w.r.t. the student logits (alpha = 0), against the live one, for
       --caches independently seeded sampled caches (as stored: log q rounded to fp16), drawn at the
       training temperature T0 = T and, for T > 1, at T0 = 1; and for the top-k cache of about the
       same bytes (deterministic: its bias is its error):
         bias      ||mean over caches - live|| / ||live||, next to its noise floor
                   ||standard error of the mean|| / ||live|| (bias consistent with 0 when the two
                   are alike; an unbiased estimator's bias shrinks as 1/sqrt(caches))
         error     mean over caches of ||one cache - live|| / ||live||
       on the synthetic logits (student = 0.8 teacher + N(0, 1)) and on the builtin tiny demo
       teacher and student (part demo).
hybrid: the same measurements for an estimator that keeps the exact top-k head and samples only the
       tail (importance-weighted, unbiased), against top-k at equal bytes; measured here, not built
       into kd.cache (benchmarks/README.md says why).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from kd.loss import LossSpec, kd_loss  # noqa: E402
from kd.loss.sampled import sampled_kd_loss, teacher_sample  # noqa: E402
from kd.loss.topk import teacher_topk, topk_kd_loss  # noqa: E402
from bench_cache import demo_logits, synthetic_logits as synthetic  # noqa: E402  (the same logits as its table)

TEMPS = (1.0, 2.0, 4.0, 8.0)


def sampled_bytes(unique: float, v: int, m: int = len(TEMPS)) -> float:
    return unique * ((2 if v <= 2**15 else 4) + 1 + 2) + 1 + 4 * (m - 1)


def topk_bytes(k: int, v: int, m: int = len(TEMPS)) -> float:
    return k * ((2 if v <= 2**15 else 4) + 4) + 4 * m


def mean_unique(teacher: torch.Tensor, draws: int, seed: int = 0) -> float:
    s = teacher_sample(teacher, draws, teacher.shape[1], generator=torch.Generator().manual_seed(seed))
    return (s.freq > 0).sum(-1).float().mean().item()


def part_bytes(draws=(16, 32, 64), ks=(16, 64)) -> dict[int, float]:
    teacher, _, _ = synthetic()
    v = teacher.shape[1]
    print(f"\n### Bytes per token, V = {v} (synthetic LLM-like logits, 256 tokens; m = 4 served temperatures)\n")
    print("| format | unique ids / token | bytes / token |")
    print("|---|--:|--:|")
    uniq = {}
    for n in draws:
        uniq[n] = mean_unique(teacher, n)
        print(f"| sampled, N = {n} | {uniq[n]:.1f} | {sampled_bytes(uniq[n], v):.1f} |")
        print(f"| sampled, N = {n}, served T = 1 only | {uniq[n]:.1f} | {sampled_bytes(uniq[n], v, 1):.1f} |")
    for k in ks:
        print(f"| top-k, k = {k} | {k} | {topk_bytes(k, v):.1f} |")
    return uniq


def _grad(fn, student):
    s = student.clone().requires_grad_()
    fn(s).weighted_sum.backward()
    return s.grad


def _spread(grads, live: torch.Tensor) -> tuple[float, float, float]:
    """Over independently seeded estimates of `live`: (bias ‖mean − live‖, its noise floor ‖standard
    error of the mean‖, mean error per estimate), each relative to ‖live‖."""
    norm = live.norm().item()
    total, total_sq, errs = torch.zeros_like(live), torch.zeros_like(live), []
    for g in grads:
        total += g
        total_sq += g * g
        errs.append((g - live).norm().item() / norm)
    m = len(errs)
    mean = total / m
    se = ((total_sq / m - mean * mean).clamp_min(0) * m / (m - 1) / m).sqrt()
    return (mean - live).norm().item() / norm, se.norm().item() / norm, sum(errs) / m


def _topk_row(teacher, student, labels, spec: LossSpec, nbytes: float, live: torch.Tensor) -> None:
    """The top-k cache with about `nbytes` per token: its (deterministic) error is its bias."""
    v, t = teacher.shape[1], spec.temperature
    k = max(1, round((nbytes - 4 * len(TEMPS)) / ((2 if v <= 2**15 else 4) + 4)))
    top = teacher_topk(teacher, k, v, TEMPS)
    g = _grad(lambda s: topk_kd_loss(s, top.ids, top.logits, top.tail_lse, labels, spec, tail_temperatures=TEMPS),
              student)
    e = (g - live).norm().item() / live.norm().item()
    print(f"| {t:g} | top-k, k = {k} (same bytes) | {topk_bytes(k, v):.0f} | {e:.2%} | 0 (deterministic) | "
          f"{e:.2%} |", flush=True)


def error_table(title: str, teacher, student, labels, draws, caches: int, temps=(1.0, 2.0, 4.0)) -> None:
    v = teacher.shape[1]
    print(f"\n#### {title}\n")
    print("| T | format | bytes / token | bias (‖mean − live‖ / ‖live‖) | noise floor of the bias | "
          "error per cache |")
    print("|--:|---|--:|--:|--:|--:|")
    for t in temps:
        spec = LossSpec(vocab_size=v, alpha=0.0, temperature=t)
        live = _grad(lambda s: kd_loss(s, teacher, labels, spec), student)
        norm = live.norm().item()
        # the proposal at T itself, and one at T = 1 for T > 1 (the temperature the samples are
        # usually drawn at): weights p_T / q then grow with the vocabulary (module doc of kd.loss.sampled)
        for t0 in ([t] if t == 1.0 else [t, 1.0]):
            for n in draws:
                uniq = []

                def grads():
                    for c in range(caches):
                        cached = teacher_sample(teacher, n, v, (t,), proposal=t0,
                                                generator=torch.Generator().manual_seed(10_000 + c))
                        cached = cached._replace(logq=cached.logq.half().float())  # as stored on disk
                        uniq.append((cached.freq > 0).sum(-1).float().mean().item())
                        yield _grad(lambda s: sampled_kd_loss(s, cached, labels, spec), student)

                bias, floor, err = _spread(grads(), live)
                u = sum(uniq) / len(uniq)
                print(f"| {t:g} | sampled N = {n} at T0 = {t0:g} ({u:.1f} unique) | {sampled_bytes(u, v):.0f} | "
                      f"{bias:.2%} | {floor:.2%} | {err:.2%} |", flush=True)
                if t0 == t:
                    _topk_row(teacher, student, labels, spec, sampled_bytes(u, v), live)
        if t == 1.0:  # context: one draw is what the hard label of CE is, as an estimate of this gradient
            g = student[:, :v].float().softmax(-1) - torch.nn.functional.one_hot(labels, v).float()  # CE's gradient
            print(f"| 1 | one teacher sample (a hard label) | – | – | – | {(g - live).norm().item() / norm:.2%} |")


def hybrid_kl(student, teacher, k: int, draws: int, t: float, generator) -> tuple[torch.Tensor, float]:
    """Forward KL per row from an exact top-k head plus `draws` draws from the teacher's tail (the
    other V - k tokens) at the proposal T0 = t, importance-weighted as in kd.loss.sampled: unbiased,
    with the head's share of the variance removed. -> (KL sum, mean unique tail ids per row)."""
    z = teacher.float() / t
    lse = z.logsumexp(-1, keepdim=True)
    top = z.topk(k, dim=-1)
    s = student.float() / t
    log_s = s - s.logsumexp(-1, keepdim=True)
    head = top.values - lse  # exact log p_T of the head
    kl_head = (head.exp() * (head - log_s.gather(-1, top.indices))).sum(-1)
    tail = z.scatter(-1, top.indices, float("-inf"))
    tail_lse = tail.logsumexp(-1, keepdim=True)
    q_tail = (tail - tail_lse).exp()  # the proposal: the tail at T0 = t, so the tail weights are 1
    drawn = torch.multinomial(q_tail, draws, replacement=True, generator=generator)
    counts = torch.zeros_like(z).scatter_add_(-1, drawn, torch.ones_like(drawn, dtype=torch.float))
    p_tail_mass = (tail_lse - lse).exp()
    p_hat = p_tail_mass * counts / draws  # unbiased for p_T on the tail
    log_p = z - lse
    kl_tail = torch.where(counts > 0, p_hat * (log_p - log_s), 0.0).sum(-1)
    return (kl_head + kl_tail).sum(), (counts > 0).sum(-1).float().mean().item()


def hybrid_table(teacher, student, labels, caches: int, heads=(4, 16), draws=16, temps=(1.0, 2.0, 4.0)) -> None:
    v = teacher.shape[1]
    print(f"\n#### Hybrid: exact top-k head + {draws} tail draws at T0 = T, {caches} seeded caches per row\n")
    print("| T | format | bytes / token | bias (‖mean − live‖ / ‖live‖) | noise floor of the bias | error per cache |")
    print("|--:|---|--:|--:|--:|--:|")
    for t in temps:
        spec = LossSpec(vocab_size=v, alpha=0.0, temperature=t)
        live = _grad(lambda s: kd_loss(s, teacher, labels, spec), student)
        for k in heads:
            uniq = []

            def grads():
                for c in range(caches):
                    s = student.clone().requires_grad_()
                    kl, u = hybrid_kl(s, teacher, k, draws, t, torch.Generator().manual_seed(20_000 + c))
                    (t * t * kl).backward()  # the T^2 of LossSpec.mix with alpha = 0
                    uniq.append(u)
                    yield s.grad

            bias, floor, err = _spread(grads(), live)
            u = sum(uniq) / len(uniq)
            nbytes = topk_bytes(k, v) + sampled_bytes(u, v, 1)  # head as top-k, tail ids + counts + log q
            print(f"| {t:g} | top-{k} head + {draws} tail draws ({u:.1f} unique) | {nbytes:.0f} | "
                  f"{bias:.2%} | {floor:.2%} | {err:.2%} |", flush=True)
            _topk_row(teacher, student, labels, spec, nbytes, live)


def part_hybrid(caches: int) -> None:
    teacher, student, labels = synthetic()
    hybrid_table(teacher, student, labels, caches)


def part_error(caches: int, draws=(16, 32, 64)) -> None:
    teacher, student, labels = synthetic()
    error_table(f"Synthetic LLM-like logits: 256 tokens, V = {teacher.shape[1]}, {caches} seeded caches per row",
                teacher, student, labels, draws, caches)


def part_demo(caches: int, draws=(16, 32)) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        t_logits, s_logits, labels, v = demo_logits(Path(tmp))
    error_table(f"Builtin tiny teacher -> tiny student, 16 demo examples ({t_logits.shape[0]} tokens), V = {v}, "
                f"{caches} seeded caches per row", t_logits, s_logits[:, :v], labels, draws, caches)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=("bytes", "error", "demo", "hybrid"), default=None)
    ap.add_argument("--caches", type=int, default=200)
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.part in (None, "bytes"):
        part_bytes()
    if args.part in (None, "error"):
        part_error(args.caches)
    if args.part in (None, "demo"):
        part_demo(args.caches)
    if args.part in (None, "hybrid"):
        part_hybrid(args.caches)


if __name__ == "__main__":
    main()
