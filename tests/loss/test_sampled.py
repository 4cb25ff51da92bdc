"""The sampled-teacher loss (kd.loss.sampled): what the cache stores is exact, the forward-KL
estimate is unbiased in value and gradient at the proposal's temperature and at others (tested
statistically, with a biased estimator as the control the test must reject), and the divergences
it cannot serve without bias are refused."""

from __future__ import annotations

import pytest
import torch

from kd.loss import DIVERGENCES, LossSpec, kd_loss
from kd.loss.sampled import CachedSample, check_serves, sampled_kd_loss, sampled_target, teacher_sample


def _logits(n, v, seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * scale


def test_what_is_stored_is_exact():
    z = _logits(9, 40, 0)
    s = teacher_sample(torch.cat([z, torch.zeros(9, 3)], -1), 16, 40, (2.0, 4.0), proposal=1.0,
                       generator=torch.Generator().manual_seed(3))
    assert s.ids.shape == s.freq.shape == s.logq.shape and s.log_norm.shape == (9, 3)
    assert s.temperatures.tolist() == [1.0, 2.0, 4.0] and s.proposal.tolist() == [1.0]
    torch.testing.assert_close(s.freq.sum(-1), torch.ones(9))  # every draw counted once
    for row in range(9):
        drawn = s.ids[row][s.freq[row] > 0]
        assert drawn.unique().numel() == drawn.numel()  # unique ids, counts carry the repeats
    for j, t in enumerate((1.0, 2.0, 4.0)):  # log p_T at the drawn ids from log q and c_T
        _, log_p = sampled_target(s, t)
        want = (z / t).log_softmax(-1).gather(-1, s.ids)
        torch.testing.assert_close(torch.where(s.freq > 0, log_p, 0.0), torch.where(s.freq > 0, want, 0.0))
    again = teacher_sample(z, 16, 40, (2.0, 4.0), generator=torch.Generator().manual_seed(3))
    assert torch.equal(again.ids, s.ids) and torch.equal(again.freq, s.freq)  # seeded


def test_draws_do_not_depend_on_the_thread_count():
    z = _logits(64, 3000, 4)
    threads = torch.get_num_threads()
    try:
        out = []
        for n in (1, 2):
            torch.set_num_threads(n)
            out.append(teacher_sample(z, 32, 3000, (0.5,), generator=torch.Generator().manual_seed(9)))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*out))


def test_many_draws_approach_the_live_loss():
    z, st = _logits(6, 30, 1), _logits(6, 30, 2)
    labels = torch.randint(0, 30, (6,))
    spec = LossSpec(vocab_size=30, alpha=0.2, temperature=2.0)
    live = kd_loss(st, z, labels, spec)
    est = sampled_kd_loss(st, teacher_sample(z, 200_000, 30, (2.0,), generator=torch.Generator().manual_seed(0)),
                          labels, spec)
    torch.testing.assert_close(est.ce_sum, live.ce_sum)  # CE is exact
    torch.testing.assert_close(est.kd_sum, live.kd_sum, rtol=0.02, atol=1e-3)


def _estimates(z, st, draws, temperature, proposal, m, self_normalise=False):
    """M independently seeded caches -> their KD values [M, N] and gradients [M, N, V]."""
    vals, grads = [], []
    spec = LossSpec(vocab_size=z.shape[1], alpha=0.0, temperature=temperature)
    for seed in range(m):
        c = teacher_sample(z, draws, z.shape[1], (temperature,), proposal=proposal,
                           generator=torch.Generator().manual_seed(1000 + seed))
        if self_normalise:  # the usual importance-sampling shortcut: biased at finite N
            p_hat, _ = sampled_target(c, temperature)
            c = c._replace(freq=c.freq * (c.freq.sum(-1, keepdim=True) / p_hat.sum(-1, keepdim=True)))
        s = st.clone().requires_grad_()
        parts = sampled_kd_loss(s, c, torch.zeros(z.shape[0], dtype=torch.long), spec)
        parts.weighted_sum.backward()
        vals.append(parts.kd_sum.reshape(1))
        grads.append(s.grad)
    return torch.stack(vals), torch.stack(grads)


def _z_scores(samples: torch.Tensor, exact: torch.Tensor, atol: float = 1e-6) -> torch.Tensor:
    mean, se = samples.mean(0), samples.std(0) / samples.shape[0] ** 0.5
    keep = se > 1e-9
    # an element with no spread is a token never drawn in any cache: its teacher mass must be that small
    torch.testing.assert_close(mean[~keep], exact[~keep], rtol=0, atol=atol)
    return ((mean - exact) / se)[keep]


@pytest.mark.parametrize("temperature,proposal", [(1.0, 1.0), (2.0, 1.0), (1.0, 2.0)])
def test_forward_kl_estimate_is_unbiased_in_value_and_gradient(temperature, proposal):
    n, v, draws, m = 4, 10, 4, 4000  # fewer caches leave the z-score spread too noisy to judge
    z, st = _logits(n, v, 5, scale=1.0), _logits(n, v, 6)
    s = st.clone().requires_grad_()
    live = kd_loss(s, z, torch.zeros(n, dtype=torch.long),
                   LossSpec(vocab_size=v, alpha=0.0, temperature=temperature))
    live.weighted_sum.backward()
    vals, grads = _estimates(z, st, draws, temperature, proposal, m)
    zv = _z_scores(vals, live.kd_sum.reshape(1))
    zg = _z_scores(grads.flatten(1), s.grad.flatten(), atol=10 / (m * draws))
    assert zg.numel() >= n * v // 2
    # unbiased: every element within a few standard errors, and the z-scores spread like N(0, 1)
    assert zv.abs().max() < 4.5, zv
    assert zg.abs().max() < 4.5 and 0.6 < zg.pow(2).mean() < 1.5, (zg.abs().max(), zg.pow(2).mean())
    if temperature != proposal:  # the control: self-normalised weights are biased, and this test sees it
        _, biased = _estimates(z, st, draws, temperature, proposal, m, self_normalise=True)
        assert _z_scores(biased.flatten(1), s.grad.flatten(), atol=1.0).pow(2).mean() > 3.0


def test_divergences_a_sample_cannot_serve_are_refused():
    temps = torch.tensor([1.0, 2.0])
    ok = [d for d in DIVERGENCES if check_serves(LossSpec(vocab_size=8, divergence=d), temps) is None]
    assert ok == ["forward_kl"]
    assert check_serves(LossSpec(vocab_size=8, divergence="jsd", beta=0.0), temps) is None  # JSD(0) is forward KL
    why = check_serves(LossSpec(vocab_size=8, divergence="reverse_kl"), temps)
    assert "unbiased only for forward KL" in why and "loss.divergence=reverse_kl" in why
    why = check_serves(LossSpec(vocab_size=8, temperature=3.0), temps)
    assert "serves temperatures 1, 2" in why and "loss.temperature=3" in why
    assert check_serves(LossSpec(vocab_size=8, alpha=1.0, divergence="tvd", temperature=3.0), temps) is None  # CE only
    c = CachedSample(torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1), torch.zeros(2, 1), torch.zeros(2, 2),
                     temps, torch.ones(1))
    with pytest.raises(ValueError, match="forward KL"):
        sampled_kd_loss(torch.randn(2, 8), c, torch.zeros(2, dtype=torch.long),
                        LossSpec(vocab_size=8, divergence="tvd"))
