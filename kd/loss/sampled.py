"""Distillation loss against a teacher given by tokens *sampled* from it (kd.cache --format sampled).

Why sampling, not top-k
-----------------------
A top-k cache (kd.loss.topk) drops the teacher's shape inside its tail, so its loss and gradient
are biased wherever the teacher's mass leaves the top k, and temperature moves it there. Sampling
(Anshumann et al., "Sparse Logit Sampling", ACL 2025) stores N draws from a proposal q instead: the
unique ids drawn, their counts c_u, and what makes the estimate exact at other temperatures.

The estimate
------------
The proposal is the teacher at temperature T0 (default 1): q(u) = softmax(z / T0)_u. For a
training temperature T the target is p_T(u) = softmax(z / T)_u, and

    log p_T(u) = r * log q(u) + c_T,    r = T0 / T,    c_T = r * logsumexp(z / T0) - logsumexp(z / T)

so the cache stores log q(u) at each drawn id and one number c_T per token for each temperature
it serves (c_T0 = 0 is not stored). Each draw x_i ~ q gives the importance weight p_T(x_i) / q(x_i),
and the estimate of the teacher distribution is

    p_hat(u) = (c_u / N) * p_T(u) / q(u),      E[p_hat(u)] = p_T(u)   for every u, any T.

It is not normalised (sum_u p_hat(u) is 1 only in expectation). A temperature the cache does not
store is refused rather than estimated: an estimated c_T would bias every weight of the token.

Which divergences are unbiased
------------------------------
An estimate built from p_hat is unbiased exactly when the quantity is *linear* in the teacher's
probabilities (expectation passes through a linear map). Forward KL per token is

    KL(p || s) = sum_u p(u) (log p(u) - log s(u)),    s = softmax(student / T)

linear in p, with log p(u) known exactly at every drawn u; so the value estimate
sum_u p_hat(u) (log p_T(u) - log s(u)) is unbiased, and so is its gradient with respect to the
student logits, (1 / T) * (sum_u p_hat(u) * s - p_hat), whose expectation is (s - p) / T, the live
gradient. The other divergences are not linear in p: reverse KL needs log p at the student's tokens,
which the samples do not give (sum_u s(u) log p(u) over every u); JSD and the skew KLs take the log of
a mixture containing p; TVD takes |p - s|. Plugging p_hat into them is biased (e.g. E|p_hat - s| >
|p - s|), so a run that asks one of them of a sampled cache is refused in one line (`check_serves`).
Hard-label CE uses the data's own tokens and is exact.

Variance, and which temperatures a cache serves
-----------------------------------------------
The estimate is unbiased at every T, but its variance is sum_u p_T(u)^2 / q(u) - (sum p_T)^2 per
draw. For T <= T0 the target is more peaked than the proposal and the weights are bounded
(p_T(u) / q(u) <= 1 / q(top)); for T > T0 the target has the heavier tail, and on a Zipf-like teacher
the sum grows with the vocabulary: measured on V = 32000 LLM-like logits, drawing at T0 = 1 and
training at T = 2 gives a per-cache gradient error above 1000 % (benchmarks/README.md). So a cache
serves only temperatures at or below its proposal's: draw at the highest temperature a sweep will
use. A token whose teacher is near-deterministic is drawn N times and costs nothing; the variance
is concentrated where the teacher is uncertain, which is where soft targets carry information.
Measured bias, error and bytes: benchmarks/README.md.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from kd.loss.dense import LossParts
from kd.loss.spec import IGNORE_INDEX, LossSpec


class CachedSample(NamedTuple):
    """Sampled teacher outputs for N response rows, padded to U unique ids per row (a NamedTuple of
    tensors so DDP moves it like one)."""

    ids: torch.Tensor  # [N, U] long, unique drawn ids (padding: 0)
    freq: torch.Tensor  # [N, U] fp32 count / draws (padding: 0)
    logq: torch.Tensor  # [N, U] fp32 log q(id), the proposal's log-probability (padding: 0)
    log_norm: torch.Tensor  # [N, m] fp32 c_T for each served temperature (module doc); the T0 column is 0
    temperatures: torch.Tensor  # [m] the temperatures served, proposal first
    proposal: torch.Tensor  # [1] T0


def serves(divergence_text: str) -> bool:
    """Whether a sampled cache gives an unbiased loss for this divergence (module doc)."""
    return divergence_text == "KL(teacher‖student)"


def check_serves(spec: LossSpec, temperatures) -> str | None:
    """None when a sampled cache serving `temperatures` can give this loss without bias, else why not."""
    if not spec.needs_teacher:
        return None
    if not serves(spec.divergence_text()):
        return (f"a sampled teacher cache is unbiased only for forward KL, not {spec.divergence_text()} "
                f"(loss.divergence={spec.divergence}); use loss.divergence=forward_kl, a top-k cache, or the live "
                f"teacher")
    temps = [float(t) for t in (temperatures.tolist() if torch.is_tensor(temperatures) else temperatures)]
    if not any(math.isclose(spec.temperature, t) for t in temps):
        return (f"the sampled teacher cache serves temperatures {', '.join(f'{t:g}' for t in temps)}, not "
                f"loss.temperature={spec.temperature:g}; rebuild it with --proposal-temperature at least "
                f"{spec.temperature:g} and --tail-temperatures including it")
    return None


def unservable(temperatures, proposal: float) -> list[float]:
    """The temperatures above the proposal's: their importance weights have a variance that grows
    with the vocabulary (module doc), so a cache does not serve them."""
    return [float(t) for t in temperatures if float(t) > float(proposal) + 1e-9]


def _column(temperatures: list[float], temperature: float) -> int:
    for i, t in enumerate(temperatures):
        if math.isclose(t, temperature):
            return i
    raise ValueError(f"temperature {temperature:g} is not served by this sampled cache "
                     f"({', '.join(f'{t:g}' for t in temperatures)})")


def _host(cached: CachedSample, temperatures: list[float] | None) -> list[float]:
    """The served temperatures as floats, proposal first. Callers that score many chunks of one
    micro-batch pass them once (`temperatures`): reading the tensor is a host sync on a GPU."""
    return cached.temperatures.tolist() if temperatures is None else temperatures


@torch.no_grad()
def teacher_sample(logits: torch.Tensor, draws: int, vocab_size: int, temperatures=(1.0,), *,
                   proposal: float = 1.0, generator: torch.Generator | None = None) -> CachedSample:
    """What the sampled cache stores for full teacher logits [N, Vt] (Vt >= vocab_size): `draws`
    ids per row from softmax(z / proposal) with `generator`, as unique ids and frequencies, fp32.
    `temperatures` are those served besides the proposal's (which is always served, first)."""
    z = logits[..., :vocab_size].float()
    n = z.shape[0]
    temps = [float(proposal)] + [float(t) for t in temperatures if not math.isclose(float(t), proposal)]
    lse0 = (z / proposal).logsumexp(-1, keepdim=True)
    logq_all = z / proposal - lse0
    drawn = torch.multinomial(logq_all.exp(), draws, replacement=True, generator=generator) if n else \
        torch.zeros(0, draws, dtype=torch.long, device=z.device)
    # unique (row, id) pairs with counts, then back to a [N, U] layout
    keys, counts = torch.unique(drawn + torch.arange(n, device=z.device).unsqueeze(-1) * vocab_size,
                                return_counts=True)
    rows, ids = keys // vocab_size, keys % vocab_size
    per_row = torch.bincount(rows, minlength=n)
    width = int(per_row.max()) if n else 0
    first = torch.cumsum(per_row, 0) - per_row
    col = torch.arange(keys.numel(), device=z.device) - first[rows]
    out_ids = torch.zeros(n, width, dtype=torch.long, device=z.device)
    out_freq = torch.zeros(n, width, device=z.device)
    out_ids[rows, col] = ids
    out_freq[rows, col] = counts.float() / draws
    logq = torch.where(out_freq > 0, logq_all.gather(-1, out_ids), 0.0)
    r = torch.tensor([proposal / t for t in temps], device=z.device)
    log_norm = r * lse0 - torch.stack([(z / t).logsumexp(-1) for t in temps], -1)
    log_norm[:, 0] = 0.0  # exactly: the proposal needs no correction
    return CachedSample(out_ids, out_freq, logq, log_norm, torch.tensor(temps, device=z.device),
                        torch.tensor([float(proposal)], device=z.device))


def sampled_target(cached: CachedSample, temperature: float,
                   temperatures: list[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (p_hat [N, U], log p_T [N, U]) at the drawn ids (module doc); p_hat is 0 on padding."""
    temps = _host(cached, temperatures)
    j = _column(temps, temperature)
    r = temps[0] / temperature  # the proposal's temperature comes first
    logq = cached.logq.float()
    log_p = r * logq + cached.log_norm[:, j:j + 1].float()
    p_hat = cached.freq.float() * torch.exp(log_p - logq)
    return torch.where(cached.freq > 0, p_hat, 0.0), log_p


def sampled_forward_kl(student_logits: torch.Tensor, cached: CachedSample, temperature: float,
                       temperatures: list[float] | None = None) -> torch.Tensor:
    """Unbiased estimate of KL(p_T || softmax(student / T)) per row [N] (module doc)."""
    s = student_logits.float() / temperature
    log_s = s.gather(-1, cached.ids.long()) - s.logsumexp(-1, keepdim=True)
    p_hat, log_p = sampled_target(cached, temperature, temperatures)
    return (p_hat * (log_p - log_s)).sum(-1)


def sampled_kd_loss(student_logits: torch.Tensor, cached: CachedSample, labels: torch.Tensor,
                    spec: LossSpec, *, temperatures: list[float] | None = None) -> LossParts:
    """`kd.loss.dense.kd_loss` with the teacher given by its cached samples: token sums, fp32.
    Forward KL only (`check_serves`); CE on the labels is exact. `temperatures`: the cache's served
    temperatures as floats, if the caller has them (no host sync here then)."""
    V = spec.vocab_size
    s = student_logits[..., :V].float()
    valid = labels != IGNORE_INDEX
    ce = F.cross_entropy(s, labels, reduction="none", ignore_index=IGNORE_INDEX).sum()
    if spec.needs_teacher:
        temps = _host(cached, temperatures)
        why = check_serves(spec, temps)
        if why:
            raise ValueError(why)
        kd = torch.where(valid, sampled_forward_kl(s, cached, spec.temperature, temps), 0.0).sum()
    else:
        kd = ce.new_zeros(())
    return LossParts(spec.mix(ce, kd), ce.detach(), kd.detach(), valid.sum())
