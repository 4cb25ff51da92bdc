"""kd.loss.dense against a plain float64 reference, plus the invariants the trainer relies on."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kd.loss import DIVERGENCES, LossParts, LossSpec, divergence_from_logprobs, kd_loss, token_losses

N, V = 9, 13
NEG_INF = float("-inf")


def _logits(seed: int, n: int = N, v: int = V, scale: float = 2.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, v, generator=g) * scale
    t = torch.randn(n, v, generator=g) * scale
    y = torch.randint(0, v, (n,), generator=g)
    return s, t, y


# Reference: probabilities and textbook formulas, float64, no log-space tricks.
def _kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    terms = a * torch.log(a / b)
    return torch.where(a > 0, terms, torch.zeros_like(terms)).sum(-1)


def ref_divergence(t_logits, s_logits, kind, temperature=1.0, beta=0.5, skew=0.1) -> torch.Tensor:
    p = torch.softmax(t_logits.double() / temperature, -1)
    q = torch.softmax(s_logits.double() / temperature, -1)
    if kind == "forward_kl":
        return _kl(p, q)
    if kind == "reverse_kl":
        return _kl(q, p)
    if kind == "jsd":
        if beta == 0.0:
            return _kl(p, q)
        if beta == 1.0:
            return _kl(q, p)
        m = beta * p + (1 - beta) * q
        return beta * _kl(p, m) + (1 - beta) * _kl(q, m)
    if kind == "skew_forward_kl":
        return _kl(p, skew * p + (1 - skew) * q)
    if kind == "skew_reverse_kl":
        return _kl(q, skew * q + (1 - skew) * p)
    if kind == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    raise ValueError(kind)


def ref_ce(s_logits, labels) -> torch.Tensor:
    q = torch.softmax(s_logits.double(), -1)
    return -torch.log(q[torch.arange(len(labels)), labels])


CASES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("jsd", {"beta": 0.5}),
    ("jsd", {"beta": 0.1}),
    ("jsd", {"beta": 0.0}),
    ("jsd", {"beta": 1.0}),
    ("skew_forward_kl", {"skew": 0.1}),
    ("skew_forward_kl", {"skew": 0.0}),
    ("skew_reverse_kl", {"skew": 0.3}),
    ("skew_reverse_kl", {"skew": 0.0}),
    ("tvd", {}),
]
CASE_IDS = [k + "".join(f"-{a}={b}" for a, b in kw.items()) for k, kw in CASES]


@pytest.mark.parametrize("kind,kw", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7])
def test_matches_naive_reference(kind, kw, temperature):
    s, t, y = _logits(0)
    alpha = 0.3
    out = kd_loss(s, t, y, LossSpec(vocab_size=V, alpha=alpha, temperature=temperature, divergence=kind, **kw))
    ref_kd = ref_divergence(t, s, kind, temperature, **kw).sum()
    ref_ce_sum = ref_ce(s, y).sum()
    torch.testing.assert_close(out.kd_sum.double(), ref_kd, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.ce_sum.double(), ref_ce_sum, rtol=1e-5, atol=1e-5)
    expected = alpha * ref_ce_sum + (1 - alpha) * temperature**2 * ref_kd
    torch.testing.assert_close(out.weighted_sum.double(), expected, rtol=1e-5, atol=1e-5)
    assert out.n_tokens == N


@pytest.mark.parametrize("kind,kw", CASES, ids=CASE_IDS)
def test_per_token_values_match_reference(kind, kw):
    s, t, y = _logits(1)
    _, kd = token_losses(s, t, y, LossSpec(vocab_size=V, temperature=1.5, divergence=kind, **kw))
    assert kd.shape == (N,) and kd.dtype == torch.float32
    torch.testing.assert_close(kd.double(), ref_divergence(t, s, kind, 1.5, **kw), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind,kw", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
def test_identical_logits_give_zero(kind, kw, temperature):
    s, _, y = _logits(2, scale=5.0)
    out = kd_loss(s, s.clone(), y, LossSpec(vocab_size=V, alpha=0.0, temperature=temperature, divergence=kind, **kw))
    assert abs(out.kd_sum.item()) < 1e-5


@pytest.mark.parametrize("kind,kw", CASES, ids=CASE_IDS)
def test_divergences_are_non_negative(kind, kw):
    for seed in range(5):
        s, t, y = _logits(10 + seed, n=32, v=50, scale=4.0)
        _, kd = token_losses(s, t, y, LossSpec(vocab_size=50, temperature=1.3, divergence=kind, **kw))
        assert (kd >= -1e-6).all(), kd.min()


def _logprobs(seed: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    s, t, _ = _logits(seed)
    return F.log_softmax(t.to(dtype), -1), F.log_softmax(s.to(dtype), -1)


def test_jsd_endpoints_are_the_plain_kls():
    t_lp, s_lp = _logprobs(3, torch.float32)
    fkl = divergence_from_logprobs(t_lp, s_lp, "forward_kl")
    rkl = divergence_from_logprobs(t_lp, s_lp, "reverse_kl")
    assert torch.equal(divergence_from_logprobs(t_lp, s_lp, "jsd", beta=0.0), fkl)
    assert torch.equal(divergence_from_logprobs(t_lp, s_lp, "jsd", beta=1.0), rkl)


def test_jsd_over_beta_tends_to_the_endpoint_kls():
    # JSD(beta) / beta -> KL(p_t || p_s) as beta -> 0 and JSD(beta) / (1 - beta) -> KL(p_s || p_t)
    # as beta -> 1, so the endpoint conventions are the continuous limits.
    t_lp, s_lp = _logprobs(4)
    fkl = divergence_from_logprobs(t_lp, s_lp, "forward_kl")
    rkl = divergence_from_logprobs(t_lp, s_lp, "reverse_kl")
    errors = []
    for eps in (1e-4, 1e-5, 1e-6):
        near0 = divergence_from_logprobs(t_lp, s_lp, "jsd", beta=eps) / eps
        near1 = divergence_from_logprobs(t_lp, s_lp, "jsd", beta=1 - eps) / eps
        errors.append(((near0 - fkl).abs().max().item(), (near1 - rkl).abs().max().item()))
        # The gap shrinks like eps * (a chi-square-sized constant).
        torch.testing.assert_close(near0, fkl, rtol=200 * eps, atol=0.0)
        torch.testing.assert_close(near1, rkl, rtol=200 * eps, atol=0.0)
    assert errors[-1][0] < errors[0][0] and errors[-1][1] < errors[0][1]


@pytest.mark.parametrize("kind,plain", [("skew_forward_kl", "forward_kl"), ("skew_reverse_kl", "reverse_kl")])
def test_zero_skew_is_the_plain_kl(kind, plain):
    t_lp, s_lp = _logprobs(5, torch.float32)
    expected = divergence_from_logprobs(t_lp, s_lp, plain)
    assert torch.equal(divergence_from_logprobs(t_lp, s_lp, kind, skew=0.0), expected)
    t64, s64 = _logprobs(5)
    near = divergence_from_logprobs(t64, s64, kind, skew=1e-7)
    torch.testing.assert_close(near, divergence_from_logprobs(t64, s64, plain), rtol=1e-3, atol=0.0)


def test_mix_is_the_convention():
    ce, kd = torch.tensor(3.0), torch.tensor(0.5)
    assert LossSpec(1, alpha=0.25, temperature=2.0).mix(ce, kd).item() == pytest.approx(0.25 * 3.0 + 0.75 * 4.0 * 0.5)
    assert LossSpec(1, alpha=1.0, temperature=3.0).mix(ce, kd).item() == pytest.approx(3.0)
    assert LossSpec(1, alpha=0.0, temperature=3.0).mix(ce, kd).item() == pytest.approx(9.0 * 0.5)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 3.0])
def test_weighted_sum_scales_kd_by_t_squared(temperature):
    s, t, y = _logits(6)
    s.requires_grad_()
    out = kd_loss(s, t, y, LossSpec(vocab_size=V, alpha=0.4, temperature=temperature))
    torch.testing.assert_close(out.weighted_sum.detach(), 0.4 * out.ce_sum + 0.6 * temperature**2 * out.kd_sum)
    assert out.weighted_sum.requires_grad
    assert not out.ce_sum.requires_grad and not out.kd_sum.requires_grad
    assert out.total(4.0).item() == pytest.approx(out.weighted_sum.item() / 4.0)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_alpha(alpha):
    s, t, y = _logits(7)
    s.requires_grad_()
    out = kd_loss(s, t, y, LossSpec(vocab_size=V, alpha=alpha, temperature=2.0))
    ce = ref_ce(s.detach(), y).sum()
    kd = ref_divergence(t, s.detach(), "forward_kl", 2.0).sum()
    if alpha == 1.0:
        kd = torch.zeros((), dtype=torch.float64)  # the teacher is skipped
    torch.testing.assert_close(out.ce_sum.double(), ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.kd_sum.double(), kd, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.weighted_sum.detach().double(), alpha * ce + (1 - alpha) * 4.0 * kd, rtol=1e-5, atol=1e-5)
    (grad,) = torch.autograd.grad(out.weighted_sum, s)
    # The labels only enter through CE: with alpha = 0 they cannot move the gradient.
    other = kd_loss(s, t, (y + 1) % V, LossSpec(vocab_size=V, alpha=alpha, temperature=2.0))
    (grad_other,) = torch.autograd.grad(other.weighted_sum, s)
    assert torch.equal(grad, grad_other) == (alpha == 0.0)


def test_alpha_one_never_reads_the_teacher():
    s, t, y = _logits(8)
    nan_teacher = torch.full_like(t, float("nan"))
    out = kd_loss(s, nan_teacher, y, LossSpec(vocab_size=V, alpha=1.0))
    assert out.kd_sum.item() == 0.0 and torch.isfinite(out.weighted_sum)
    assert kd_loss(s, None, y, LossSpec(vocab_size=V, alpha=1.0)).weighted_sum.item() == pytest.approx(out.weighted_sum.item())


def test_no_teacher_gives_zero_kd():
    s, _, y = _logits(8)
    out = kd_loss(s, None, y, LossSpec(vocab_size=V, alpha=0.5))
    assert out.kd_sum.item() == 0.0
    assert out.weighted_sum.item() == pytest.approx(0.5 * out.ce_sum.item())


@pytest.mark.parametrize("kind,kw", CASES, ids=CASE_IDS)
def test_vocab_padding_changes_nothing(kind, kw):
    s, t, y = _logits(9)
    s.requires_grad_()
    base = kd_loss(s, t, y, LossSpec(vocab_size=V, alpha=0.5, temperature=2.0, divergence=kind, **kw))
    (base_grad,) = torch.autograd.grad(base.weighted_sum, s)

    # Different padded widths, padding rows holding huge or infinite junk.
    junk_s = torch.tensor([1e30, -3.0, float("inf")]).expand(N, 3)
    junk_t = torch.tensor([float("inf"), 1e9, 0.0, float("nan"), -1e30]).expand(N, 5)
    s_pad = torch.cat([s.detach(), junk_s], 1).requires_grad_()
    t_pad = torch.cat([t, junk_t], 1)
    padded = kd_loss(s_pad, t_pad, y, LossSpec(vocab_size=V, alpha=0.5, temperature=2.0, divergence=kind, **kw))
    (pad_grad,) = torch.autograd.grad(padded.weighted_sum, s_pad)
    for a, b in [(base.weighted_sum, padded.weighted_sum), (base.ce_sum, padded.ce_sum), (base.kd_sum, padded.kd_sum)]:
        assert torch.equal(a, b)
    assert torch.equal(pad_grad[:, :V], base_grad)
    assert (pad_grad[:, V:] == 0).all()


@pytest.mark.parametrize("kind,kw", CASES, ids=CASE_IDS)
def test_bf16_inputs_compute_in_fp32(kind, kw):
    s, t, y = _logits(11)
    s16, t16 = s.bfloat16().requires_grad_(), t.bfloat16()
    s32 = s16.detach().float().requires_grad_()
    out16 = kd_loss(s16, t16, y, LossSpec(vocab_size=V, alpha=0.5, temperature=2.0, divergence=kind, **kw))
    out32 = kd_loss(s32, t16.float(), y, LossSpec(vocab_size=V, alpha=0.5, temperature=2.0, divergence=kind, **kw))
    for part in (out16.weighted_sum, out16.ce_sum, out16.kd_sum):
        assert part.dtype == torch.float32
    assert torch.equal(out16.weighted_sum, out32.weighted_sum)
    assert torch.equal(out16.kd_sum, out32.kd_sum)
    (g16,) = torch.autograd.grad(out16.weighted_sum, s16)
    (g32,) = torch.autograd.grad(out32.weighted_sum, s32)
    assert g16.dtype == torch.bfloat16
    assert torch.equal(g16, g32.bfloat16())


@pytest.mark.parametrize("kind,kw", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_neg_inf_logits_never_give_nan(kind, kw, temperature):
    s, t, y = _logits(12)
    y = torch.zeros_like(y)  # keep the label column finite: CE of a -inf label is +inf by definition
    s[:, 3] = NEG_INF  # masked in both models
    t[:, 3] = NEG_INF
    s[0, 5] = NEG_INF  # masked in the student only
    t[1, 6] = NEG_INF  # masked in the teacher only
    s[2, 1:] = NEG_INF  # a one-hot student row
    t[4, 1:] = NEG_INF  # a one-hot teacher row
    s.requires_grad_()
    t.requires_grad_()
    out = kd_loss(s, t, y, LossSpec(vocab_size=V, alpha=0.5, temperature=temperature, divergence=kind, **kw))
    assert not torch.isnan(out.weighted_sum) and not torch.isnan(out.kd_sum) and not torch.isnan(out.ce_sum)
    gs, gt = torch.autograd.grad(out.weighted_sum, (s, t))
    assert torch.isfinite(gs).all() and torch.isfinite(gt).all()
    # Masked columns take no gradient.
    assert (gs[:, 3] == 0).all() and (gt[:, 3] == 0).all()


@pytest.mark.parametrize("kind,kw", CASES, ids=CASE_IDS)
def test_gradcheck_float64(kind, kw):
    # kd_loss computes in fp32 by design, so the float64 check runs on the log-prob math itself.
    s, t, y = _logits(13, n=3, v=5)
    s = s.double().requires_grad_()
    t = t.double().requires_grad_()
    temperature, alpha = 1.7, 0.3

    def loss(s, t):
        ce = F.cross_entropy(s, y, reduction="sum")
        kd = divergence_from_logprobs(
            F.log_softmax(t / temperature, -1), F.log_softmax(s / temperature, -1), kind, **kw
        ).sum()
        return LossSpec(1, alpha=alpha, temperature=temperature).mix(ce, kd)

    assert torch.autograd.gradcheck(loss, (s, t), fast_mode=True)


def test_gradient_matches_float64_reference():
    # End to end through kd_loss (fp32 math) against autograd on the float64 reference.
    s, t, y = _logits(14)
    s32 = s.clone().requires_grad_()
    s64 = s.double().requires_grad_()
    for kind, kw in CASES:
        out = kd_loss(s32, t, y, LossSpec(vocab_size=V, alpha=0.3, temperature=2.0, divergence=kind, **kw))
        ref = 0.3 * ref_ce(s64, y).sum() + 0.7 * 4.0 * ref_divergence(t, s64, kind, 2.0, **kw).sum()
        (g32,) = torch.autograd.grad(out.weighted_sum, s32)
        (g64,) = torch.autograd.grad(ref, s64)
        torch.testing.assert_close(g32.double(), g64, rtol=1e-4, atol=1e-5, msg=kind)


def test_empty_batch():
    s = torch.zeros(0, V, requires_grad=True)
    out = kd_loss(s, torch.zeros(0, V), torch.zeros(0, dtype=torch.long), LossSpec(vocab_size=V, alpha=0.5))
    assert isinstance(out, LossParts) and out.n_tokens == 0
    assert out.weighted_sum.item() == 0.0 and out.kd_sum.item() == 0.0
    out.weighted_sum.backward()
    assert s.grad.shape == (0, V)


def test_unknown_divergence():
    s, t, y = _logits(15)
    with pytest.raises(ValueError, match="unknown divergence"):
        kd_loss(s, t, y, LossSpec(vocab_size=V, alpha=0.5, divergence="kl"))
    assert len(DIVERGENCES) == 6


def test_log_mix_is_stable_for_tiny_probabilities():
    # Probabilities far below fp32's smallest normal still mix without underflowing to log 0.
    t_lp = torch.tensor([[0.0, -200.0, -math.inf]])
    s_lp = torch.tensor([[-200.0, 0.0, -math.inf]])
    for kind in DIVERGENCES:
        d = divergence_from_logprobs(t_lp, s_lp, kind, beta=0.5, skew=0.1)
        assert torch.isfinite(d).all(), kind
