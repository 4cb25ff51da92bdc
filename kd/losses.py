"""Distillation losses as pure tensor functions.

Convention (also in README and `LossConfig`):

    loss = alpha * CE(student, labels) + (1 - alpha) * T^2 * D(p_teacher^T || p_student^T)

where p^T = softmax(logits / T). Every function here returns *sums* over tokens, never means:
the trainer divides by the global number of response tokens in the optimizer step (all
micro-batches, all ranks), which is what makes gradient accumulation and data parallelism exact.

All math runs in fp32 whatever the input dtype. Shapes: N = response tokens, V = vocabulary.
Logits whose last dim is larger than `vocab_size` (embedding matrices padded to a multiple of 64,
or a teacher with 32001 rows against a student with 32000) are cut to the tokenizer's real
vocabulary first, so both distributions live on the same support.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")


@dataclass
class LossParts:
    """Token sums for one micro-batch.

    `weighted_sum` = alpha * ce_sum + (1 - alpha) * T^2 * kd_sum carries the autograd graph;
    `ce_sum` and `kd_sum` are detached copies for logging. Divide `weighted_sum` by the global
    response-token count of the optimizer step (see `total`).
    """

    weighted_sum: torch.Tensor
    ce_sum: torch.Tensor
    kd_sum: torch.Tensor
    n_tokens: int

    def total(self, normaliser: float | torch.Tensor) -> torch.Tensor:
        return self.weighted_sum / normaliser


def mix(ce_sum: torch.Tensor, kd_sum: torch.Tensor, alpha: float, temperature: float) -> torch.Tensor:
    """The loss convention in one place: alpha * CE + (1 - alpha) * T^2 * D."""
    return alpha * ce_sum + (1.0 - alpha) * temperature**2 * kd_sum


# Floor for log-probabilities: a masked (-inf) logit would otherwise give 0 * inf = NaN in the
# forward pass or the backward pass; -1e30 keeps every product finite in fp32.
_LOG_FLOOR = -1e30


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
    reverse_kl       KL(p_s || p_t).
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
        return _kl_from_logprobs(s_logp, t_logp)
    if kind == "jsd":
        if beta == 0.0:
            return _kl_from_logprobs(t_logp, s_logp)
        if beta == 1.0:
            return _kl_from_logprobs(s_logp, t_logp)
        m = _log_mix(t_logp, s_logp, beta)
        return beta * _kl_from_logprobs(t_logp, m) + (1.0 - beta) * _kl_from_logprobs(s_logp, m)
    if kind == "skew_forward_kl":
        if skew == 0.0:
            return _kl_from_logprobs(t_logp, s_logp)
        return _kl_from_logprobs(t_logp, _log_mix(t_logp, s_logp, skew))
    if kind == "skew_reverse_kl":
        if skew == 0.0:
            return _kl_from_logprobs(s_logp, t_logp)
        return _kl_from_logprobs(s_logp, _log_mix(s_logp, t_logp, skew))
    if kind == "tvd":
        return 0.5 * (t_logp.exp() - s_logp.exp()).abs().sum(-1)
    raise ValueError(f"unknown divergence {kind!r}; choose one of {', '.join(DIVERGENCES)}")


def token_losses(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    vocab_size: int,
    temperature: float = 1.0,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    skew: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token CE and divergence, both fp32 [N].

    student_logits [N, Vs], teacher_logits [N, Vt] (Vs, Vt >= vocab_size), labels [N] in
    [0, vocab_size). CE uses T = 1 (it is the hard-label term); the divergence uses T on both
    sides. With teacher_logits None only the CE is computed.
    """
    s = student_logits[..., :vocab_size].float()
    ce = F.cross_entropy(s, labels, reduction="none")
    if teacher_logits is None:
        return ce, None
    t = teacher_logits[..., :vocab_size].float()
    s_logp = F.log_softmax(s / temperature, dim=-1)
    t_logp = F.log_softmax(t / temperature, dim=-1)
    return ce, divergence_from_logprobs(t_logp, s_logp, divergence, beta=beta, skew=skew)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    vocab_size: int,
    alpha: float,
    temperature: float = 1.0,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    skew: float = 0.1,
) -> LossParts:
    """Dense reference path: CE + divergence sums over N response tokens (see module doc)."""
    need_teacher = alpha < 1.0
    ce, kd = token_losses(
        student_logits,
        teacher_logits if need_teacher else None,
        labels,
        vocab_size=vocab_size,
        temperature=temperature,
        divergence=divergence,
        beta=beta,
        skew=skew,
    )
    ce_sum = ce.sum()
    kd_sum = kd.sum() if kd is not None else ce.new_zeros(())
    weighted = mix(ce_sum, kd_sum, alpha, temperature)
    return LossParts(weighted, ce_sum.detach(), kd_sum.detach(), labels.numel())
