"""Distillation losses on full logits: the dense reference path, pure tensor functions.

Convention (also in docs/loss.md and `LossConfig`):

    loss = alpha * CE(student, labels) + (1 - alpha) * T^2 * D(p_teacher^T || p_student^T)

where p^T = softmax(logits / T). Every function here returns *sums* over tokens, never means:
the trainer divides by the global number of response tokens in the optimizer step (all
micro-batches, all ranks), which is what makes gradient accumulation and data parallelism exact.

All math runs in fp32 whatever the input dtype. Shapes: N = response tokens, V = vocabulary.
Logits whose last dim is larger than `vocab_size` (embedding matrices padded to a multiple of 64,
or a teacher with 32001 rows against a student with 32000) are cut to the tokenizer's real
vocabulary first, so both distributions live on the same support.

One contract for every loss here, in kd.loss.chunked and in kd.loss.topk: a position whose label
is IGNORE_INDEX (-100) adds nothing to the CE, nothing to the divergence and is not counted in
`LossParts.n_tokens`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kd.loss.spec import DIVERGENCES, IGNORE_INDEX, LossSpec


@dataclass
class LossParts:
    """Token sums for one micro-batch.

    `weighted_sum` = alpha * ce_sum + (1 - alpha) * T^2 * kd_sum carries the autograd graph;
    `ce_sum` and `kd_sum` are detached copies for logging. Divide `weighted_sum` by the global
    response-token count of the optimizer step (see `total`). `n_tokens` counts the labels that
    are not IGNORE_INDEX (a 0-dim tensor: reading it is the caller's choice of host sync).
    """

    weighted_sum: torch.Tensor
    ce_sum: torch.Tensor
    kd_sum: torch.Tensor
    n_tokens: torch.Tensor

    def total(self, normaliser: float | torch.Tensor) -> torch.Tensor:
        return self.weighted_sum / normaliser


# Floor for log-probabilities: a masked (-inf) logit would otherwise give 0 * inf = NaN in the
# forward pass or the backward pass; -1e30 keeps every product finite in fp32.
_LOG_FLOOR = -1e30
# Reverse KL puts the teacher's log-probability in the denominator: a teacher column at -inf
# (a token the teacher forbids: masked or padded vocabulary) makes KL(p_s || p_t) infinite
# wherever the student gives it mass, and the -1e30 floor would turn that into ~1e29. Instead a
# forbidden token's teacher probability counts as fp32's smallest normal number (2**-126, log
# -87.34): it costs q * (log q + 87.34) nats, finite and still pushing its student mass to 0.
# Only -inf is replaced: every finite log-probability, however far below -87.34 (peaked teachers
# put most of the vocabulary there), stays exact. Only the teacher side (no gradient) is touched.
TEACHER_LOG_FLOOR = math.log(torch.finfo(torch.float32).tiny)


def forbidden_floored(t_logp: torch.Tensor) -> torch.Tensor:
    """The teacher's log-probabilities with -inf (forbidden tokens) at TEACHER_LOG_FLOOR, every
    finite value unchanged."""
    return t_logp.masked_fill(t_logp == float("-inf"), TEACHER_LOG_FLOOR)


def _kl_from_logprobs(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, [N]. Entries with p == 0 contribute exactly 0, never NaN."""
    log_p = log_p.clamp_min(_LOG_FLOOR)
    log_q = log_q.clamp_min(_LOG_FLOOR)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _log_mix(log_p: torch.Tensor, log_q: torch.Tensor, w: float) -> torch.Tensor:
    """log(w * p + (1 - w) * q), computed in log space (no underflow for tiny probabilities)."""
    # Floor first: logaddexp(-inf, -inf) has a NaN gradient (a column masked in both models).
    log_p = log_p.clamp_min(_LOG_FLOOR)
    log_q = log_q.clamp_min(_LOG_FLOOR)
    return torch.logaddexp(log_p + math.log(w), log_q + math.log1p(-w))


def divergence_from_logprobs(
    t_logp: torch.Tensor,
    s_logp: torch.Tensor,
    kind: str,
    *,
    beta: float = 0.5,
    skew: float = 0.1,
) -> torch.Tensor:
    """Per-token divergence D(teacher || student) from fp32 log-probabilities [N, V] -> [N].

    forward_kl       KL(p_t || p_s), the true KL (teacher entropy included, so 0 iff equal).
    reverse_kl       KL(p_s || p_t), a forbidden (-inf) teacher token at TEACHER_LOG_FLOOR.
    jsd              generalised JSD(beta) = beta*KL(p_t||m) + (1-beta)*KL(p_s||m),
                     m = beta*p_t + (1-beta)*p_s. As in GKD, the endpoints are the plain KLs:
                     beta = 0 -> forward KL, beta = 1 -> reverse KL (JSD(beta)/beta tends to the
                     forward KL as beta -> 0, so the endpoints are the natural limits).
    skew_forward_kl  KL(p_t || skew*p_t + (1-skew)*p_s)   (DistiLLM; skew = 0 is forward KL).
    skew_reverse_kl  KL(p_s || skew*p_s + (1-skew)*p_t)   (skew = 0 is reverse KL).
    tvd              0.5 * sum |p_t - p_s|.
    """
    if kind == "forward_kl":
        return _kl_from_logprobs(t_logp, s_logp)
    if kind == "reverse_kl":
        return _kl_from_logprobs(s_logp, forbidden_floored(t_logp))
    if kind == "jsd":
        if beta == 0.0:
            return _kl_from_logprobs(t_logp, s_logp)
        if beta == 1.0:
            return _kl_from_logprobs(s_logp, forbidden_floored(t_logp))
        m = _log_mix(t_logp, s_logp, beta)
        return beta * _kl_from_logprobs(t_logp, m) + (1.0 - beta) * _kl_from_logprobs(s_logp, m)
    if kind == "skew_forward_kl":
        if skew == 0.0:
            return _kl_from_logprobs(t_logp, s_logp)
        return _kl_from_logprobs(t_logp, _log_mix(t_logp, s_logp, skew))
    if kind == "skew_reverse_kl":
        if skew == 0.0:
            return _kl_from_logprobs(s_logp, forbidden_floored(t_logp))
        return _kl_from_logprobs(s_logp, _log_mix(s_logp, t_logp, skew))
    if kind == "tvd":
        return 0.5 * (t_logp.exp() - s_logp.exp()).abs().sum(-1)
    raise ValueError(f"unknown divergence {kind!r}; choose one of {', '.join(DIVERGENCES)}")


def token_losses(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    spec: LossSpec,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token CE and divergence, both fp32 [N]; 0 at positions whose label is IGNORE_INDEX.

    student_logits [N, Vs], teacher_logits [N, Vt] (Vs, Vt >= spec.vocab_size), labels [N] in
    [0, vocab_size) or IGNORE_INDEX. CE uses T = 1 (it is the hard-label term); the divergence
    uses T on both sides. With teacher_logits None only the CE is computed.
    """
    V, T = spec.vocab_size, spec.temperature
    s = student_logits[..., :V].float()
    ce = F.cross_entropy(s, labels, reduction="none", ignore_index=IGNORE_INDEX)
    if teacher_logits is None:
        return ce, None
    t = teacher_logits[..., :V].float()
    s_logp = F.log_softmax(s / T, dim=-1)
    t_logp = F.log_softmax(t / T, dim=-1)
    kd = divergence_from_logprobs(t_logp, s_logp, spec.divergence, beta=spec.beta, skew=spec.skew)
    return ce, torch.where(labels != IGNORE_INDEX, kd, 0.0)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    spec: LossSpec,
) -> LossParts:
    """Dense reference path: CE + divergence sums over N response tokens (see module doc)."""
    ce, kd = token_losses(student_logits, teacher_logits if spec.needs_teacher else None, labels, spec)
    ce_sum = ce.sum()
    kd_sum = kd.sum() if kd is not None else ce.new_zeros(())
    return LossParts(spec.mix(ce_sum, kd_sum), ce_sum.detach(), kd_sum.detach(), (labels != IGNORE_INDEX).sum())
