"""The cached-teacher loss (kd.loss.topk): equal to the live loss at k = V, bounded by it below,
and the tail-mass estimates between and beyond the stored temperatures."""

from __future__ import annotations

import torch

from kd.loss import DIVERGENCES, LossSpec, kd_loss
from kd.loss.topk import teacher_topk, tempered_tail_lse, topk_kd_loss


def test_topk_loss_equals_live_loss_when_k_is_the_vocabulary():
    torch.manual_seed(0)
    n, v = 12, 50
    student = torch.randn(n, v + 3) * 2  # padded rows beyond the vocabulary are ignored
    teacher = torch.randn(n, v + 14) * 3
    labels = torch.randint(0, v, (n,))
    top = teacher_topk(teacher, v, v, (1.0, 2.0))
    assert torch.isneginf(top.tail_lse).all() and top.tail_lse.shape == (n, 2)
    for div in DIVERGENCES:
        for t in (1.0, 2.0, 4.0):
            s1, s2 = student.clone().requires_grad_(), student.clone().requires_grad_()
            ref = kd_loss(s1, teacher, labels, LossSpec(vocab_size=v, alpha=0.3, temperature=t, divergence=div))
            spec = LossSpec(vocab_size=v, alpha=0.3, temperature=t, divergence=div)
            got = topk_kd_loss(s2, top.ids, top.logits, top.tail_lse, labels, spec, tail_temperatures=(1.0, 2.0))
            ref.weighted_sum.backward()
            got.weighted_sum.backward()
            torch.testing.assert_close(got.kd_sum, ref.kd_sum, rtol=1e-5, atol=1e-5, msg=f"{div} T={t}")
            torch.testing.assert_close(got.weighted_sum, ref.weighted_sum, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(s2.grad, s1.grad, rtol=1e-4, atol=1e-6, msg=f"{div} T={t}")


def test_topk_loss_with_a_tail_is_finite_and_bounded_by_the_live_divergence():
    torch.manual_seed(1)
    n, v = 16, 64
    student, teacher = torch.randn(n, v) * 2, torch.randn(n, v) * 3
    labels = torch.randint(0, v, (n,))
    for k in (1, 8, 63):
        top = teacher_topk(teacher, k, v, (1.0, 2.0, 4.0))
        for t in (1.0, 2.0, 4.0):  # stored temperatures: the buckets are exact
            s = student.clone().requires_grad_()
            spec = LossSpec(vocab_size=v, alpha=0.0, temperature=t)
            got = topk_kd_loss(s, top.ids, top.logits, top.tail_lse, labels, spec, tail_temperatures=top.tail_temperatures)
            got.weighted_sum.backward()
            assert torch.isfinite(s.grad).all()
            live = kd_loss(student, teacher, labels, spec).kd_sum
            # so the data-processing inequality holds exactly: the cache only drops the within-tail term
            assert 0 <= got.kd_sum <= live + 1e-4


def test_tempered_tail_mass_exact_at_stored_temperatures_and_bounded_between():
    torch.manual_seed(2)
    n, v, k = 32, 300, 20
    z = torch.randn(n, v) * 2.5
    top = teacher_topk(z, k, v, (1.0, 2.0, 4.0))
    rest = z.scatter(-1, top.ids, float("-inf"))
    for t in (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0):
        true = (rest / t).logsumexp(-1)
        est = tempered_tail_lse(top.tail_lse, top.tail_temperatures, v - k, t)
        if t in (1.0, 2.0, 4.0):
            torch.testing.assert_close(est, true, rtol=0, atol=1e-6)
        elif t > 1.0:  # the chord in 1/T and the flat-tail extrapolation are upper bounds
            assert (est >= true - 1e-5).all(), t
        flat_from_1 = tempered_tail_lse(top.tail_lse[:, :1], (1.0,), v - k, t)
        if t > 1.0:
            assert (flat_from_1 >= est - 1e-5).all()  # storing more temperatures only tightens it
