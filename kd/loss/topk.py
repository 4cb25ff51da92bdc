"""Distillation loss against a teacher given by its cached top-k logits (see kd.cache).

Loss on cached logits, and how the tail is handled
--------------------------------------------------
Both distributions are collapsed to k + 1 buckets: the teacher's top-k tokens, and one bucket for
everything else. The student's buckets are exact (its full logits are there): its top-k entries
and its tail mass logsumexp_{j not in top-k}(s_j / T) - logsumexp(s / T). The teacher's top-k
entries at temperature T are z_i / T, re-normalised against

    log Z_T = logaddexp(logsumexp(z_topk / T), tail_T),   tail_T = log sum_tail exp(z_j / T).

tail_T is stored for the tail temperatures, so at those T the teacher's buckets are exact. The
tempered tail mass depends on the tail's shape, which is not stored, so another T is estimated:
between two stored temperatures by the chord of tail_T in 1/T (log-sum-exp is convex in 1/T, so
the chord is an upper bound, and tight when the stored temperatures are close); outside them by
taking the tail at the nearest stored temperature T0 as flat over its V - k tokens:

    tail_T ~= (T0/T) * tail_T0 + (1 - T0/T) * log(V - k)

(exact for a flat tail; for T > T0 an upper bound by the power-mean inequality). With only T0 = 1
stored this flat estimate is poor for peaked, LLM-like tails (measured in benchmarks/README.md),
which is why several temperatures are stored: they cost 4 bytes per token each.

Separately, the divergence is taken between the bucketed distributions. For KL,
KL(p || q) = KL_buckets + p_tail * KL(p(.|tail) || q(.|tail)); the second term (the teacher's
shape inside its tail) is unknown and dropped, so at a stored temperature the cached divergence is
at most the live one (data-processing inequality, which holds for every divergence here), and the
student's within-tail shape gets no gradient, only its total tail mass. With k = V there is no
tail and the loss equals the live one. The dropped term is the main error at T > 1: tempering
moves a large share of an LLM-like teacher's mass into the tail (e.g. ~45% beyond the top 64 at
T = 2 in the synthetic benchmark), so choose k with the temperatures to be swept in mind.
Measured errors, bytes and speed: benchmarks/README.md.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from kd.loss.dense import LossParts, divergence_from_logprobs
from kd.loss.spec import IGNORE_INDEX, LossSpec


class CachedTopK(NamedTuple):
    """Cached teacher outputs for N response rows (a NamedTuple so DDP moves it like a tensor)."""

    ids: torch.Tensor  # [N, k] long, sorted by teacher logit, descending
    logits: torch.Tensor  # [N, k] fp32 teacher logits at T = 1
    tail_lse: torch.Tensor  # [N, m] fp32 log sum exp(z / T) of the other V - k logits (-inf if k = V)
    tail_temperatures: torch.Tensor  # [m] the T of each tail_lse column (1 first)



def teacher_topk(logits: torch.Tensor, k: int, vocab_size: int, tail_temperatures=(1.0,)) -> CachedTopK:
    """What the cache stores for full teacher logits [N, Vt] (Vt >= vocab_size), fp32."""
    z = logits[..., :vocab_size].float()
    top = z.topk(k, dim=-1, sorted=True)
    temps = torch.tensor([float(t) for t in tail_temperatures])
    if k < vocab_size:
        rest = z.scatter(-1, top.indices, float("-inf"))
        tail = torch.stack([(rest / t).logsumexp(-1) for t in temps.tolist()], -1)
    else:
        tail = z.new_full((*z.shape[:-1], len(temps)), float("-inf"))
    return CachedTopK(top.indices, top.values, tail, temps.to(z.device))


def tempered_tail_lse(tail_lse: torch.Tensor, tail_temperatures, n_tail: int, temperature: float) -> torch.Tensor:
    """log sum_tail exp(z_j / T) [N] from its stored values [N, m] (or [N] at T = 1) at
    `tail_temperatures`: exact at a stored T, else the module doc's chord or flat-tail estimate."""
    if torch.is_tensor(tail_temperatures):
        tail_temperatures = tail_temperatures.tolist()
    temps = [float(t) for t in tail_temperatures]
    lse = (tail_lse if tail_lse.dim() == 2 else tail_lse.unsqueeze(-1)).float()
    if temperature in temps:
        return lse[:, temps.index(temperature)]
    lse = lse.clamp_min(-1e30)  # a fully masked tail (-inf) must not give inf - inf below
    betas, b = [1.0 / t for t in temps], 1.0 / temperature
    lo = [i for i, x in enumerate(betas) if x < b]
    hi = [i for i, x in enumerate(betas) if x > b]
    if lo and hi:
        i, j = max(lo, key=betas.__getitem__), min(hi, key=betas.__getitem__)
        w = (b - betas[i]) / (betas[j] - betas[i])
        return lse[:, i] + w * (lse[:, j] - lse[:, i])
    i = min(range(len(betas)), key=lambda n: abs(betas[n] - b))
    r = b / betas[i]
    return r * lse[:, i] + (1.0 - r) * math.log(n_tail)


def bucket_logprobs(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logits: torch.Tensor,
    teacher_tail_lse: torch.Tensor,
    *,
    vocab_size: int,
    temperature: float,
    tail_temperatures=(1.0,),
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (teacher, student) tempered log-probabilities over k + 1 buckets [N, k+1] (just [N, k]
    when k = vocab_size): the teacher's top-k tokens, then the tail bucket."""
    s = student_logits[..., :vocab_size].float() / temperature
    s_lse = s.logsumexp(-1, keepdim=True)
    ids = topk_ids.long()
    s_top = s.gather(-1, ids) - s_lse
    t_top = topk_logits.float() / temperature
    n_tail = vocab_size - ids.shape[-1]
    if n_tail == 0:
        return t_top - t_top.logsumexp(-1, keepdim=True), s_top
    # the student's tail from its own logits (exact, no 1 - sum cancellation)
    s_tail = s.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True) - s_lse
    t_tail = tempered_tail_lse(teacher_tail_lse, tail_temperatures, n_tail, temperature).unsqueeze(-1)
    t_all = torch.cat([t_top, t_tail], -1)
    return t_all - t_all.logsumexp(-1, keepdim=True), torch.cat([s_top, s_tail], -1)


def topk_kd_loss(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logits: torch.Tensor,
    teacher_tail_lse: torch.Tensor,
    labels: torch.Tensor,
    spec: LossSpec,
    *,
    tail_temperatures=(1.0,),
) -> LossParts:
    """`kd.loss.dense.kd_loss` with the teacher given by its cached top-k (module doc): token
    sums, fp32. student_logits [N, Vs >= vocab_size], topk_ids/topk_logits [N, k],
    teacher_tail_lse [N, m] (log sum exp(z / T) of the other V - k teacher logits at each of the m
    `tail_temperatures`; or [N] at T = 1), labels [N] (IGNORE_INDEX rows count for nothing).
    Every divergence of kd.loss.dense is supported, on the k + 1 buckets; with k = vocab_size it
    equals kd_loss."""
    V = spec.vocab_size
    s = student_logits[..., :V].float()
    valid = labels != IGNORE_INDEX
    ce = F.cross_entropy(s, labels, reduction="none", ignore_index=IGNORE_INDEX).sum()
    if spec.needs_teacher:
        t_logp, s_logp = bucket_logprobs(s, topk_ids, topk_logits, teacher_tail_lse, vocab_size=V,
                                         temperature=spec.temperature, tail_temperatures=tail_temperatures)
        kd = divergence_from_logprobs(t_logp, s_logp, spec.divergence, beta=spec.beta, skew=spec.skew)
        kd = torch.where(valid, kd, 0.0).sum()
    else:
        kd = ce.new_zeros(())
    return LossParts(spec.mix(ce, kd), ce.detach(), kd.detach(), valid.sum())
