"""chunked_kd_loss must be kd_loss on projected hidden states: same values, same gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kd.loss.chunked
from kd.loss.chunked import chunked_kd_loss
from kd.loss.dense import DIVERGENCES, kd_loss
from kd.loss.spec import LossSpec

V, VS, VT = 50, 53, 57  # real vocabulary, padded student and teacher embedding widths
HS, HT = 16, 24
N = 23

DIV_CASES = [(k, {}) for k in DIVERGENCES] + [
    ("jsd", {"beta": 0.0}),
    ("jsd", {"beta": 1.0}),
    ("jsd", {"beta": 0.2}),
    ("skew_forward_kl", {"skew": 0.0}),
    ("skew_reverse_kl", {"skew": 0.0}),
    ("skew_reverse_kl", {"skew": 0.5}),
]
DIV_IDS = [k + "".join(f"-{a}={b}" for a, b in kw.items()) for k, kw in DIV_CASES]


@pytest.fixture(autouse=True)
def small_row_blocks(monkeypatch):
    # Blocks of 4 rows, so the per-chunk elementwise loop runs several (uneven) steps.
    monkeypatch.setattr(kd.loss.chunked, "_ROW_BLOCK_BYTES", {"cpu": 4 * 4 * V})


def make_inputs(n=N, *, seed=0, dtype=torch.float32, bias=False, scale=1.0):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(dtype)

    x = {
        "student_hidden": randn(n, HS).requires_grad_(),
        "student_weight": randn(VS, HS, s=scale * HS**-0.5 * 3).requires_grad_(),
        "teacher_hidden": randn(n, HT),
        "teacher_weight": randn(VT, HT, s=scale * HT**-0.5 * 3),
        "labels": torch.randint(0, V, (n,), generator=g),
    }
    # Padding rows hold junk that must never matter.
    with torch.no_grad():
        x["student_weight"][V:] = 50.0
        x["teacher_weight"][V:] = -80.0
    if bias:
        x["student_bias"] = randn(VS).requires_grad_()
        x["teacher_bias"] = randn(VT)
    return x


def dense_loss(x, **kw):
    s_logits = F.linear(x["student_hidden"], x["student_weight"], x.get("student_bias"))
    t_logits = None
    if x["teacher_hidden"] is not None:
        t_logits = F.linear(x["teacher_hidden"], x["teacher_weight"], x.get("teacher_bias"))
    return kd_loss(s_logits, t_logits, x["labels"], LossSpec(**kw))


def chunked_loss(x, chunk_size, **kw):
    return chunked_kd_loss(
        x["student_hidden"],
        x["student_weight"],
        x["teacher_hidden"],
        x["teacher_weight"],
        x["labels"],
        LossSpec(chunk_size=chunk_size, **kw),
        student_bias=x.get("student_bias"),
        teacher_bias=x.get("teacher_bias"),
    )


def grads(out, x, scale=0.37):
    # A grad_output other than 1 checks that backward scales the stored gradients.
    params = [x[k] for k in ("student_hidden", "student_weight", "student_bias") if k in x]
    return torch.autograd.grad(out.weighted_sum * scale, params)


def assert_same(x, chunk_size, rtol=1e-5, atol=1e-5, **kw):
    ref = dense_loss(x, **kw)
    out = chunked_loss(x, chunk_size, **kw)
    for name in ("weighted_sum", "ce_sum", "kd_sum"):
        a, b = getattr(out, name), getattr(ref, name)
        assert a.dtype == torch.float32 and a.shape == ()
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=name)
    assert not out.ce_sum.requires_grad and not out.kd_sum.requires_grad
    assert out.n_tokens == ref.n_tokens
    for name, a, b in zip(("hidden", "weight", "bias"), grads(out, x), grads(ref, x)):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=name)
    return out


@pytest.mark.parametrize("div,dkw", DIV_CASES, ids=DIV_IDS)
@pytest.mark.parametrize(
    "alpha,temperature,chunk_size",
    [(0.5, 1.0, 7), (0.3, 2.0, 5), (0.0, 1.0, 64), (0.0, 2.0, N), (1.0, 1.0, 10)],
)
def test_matches_dense(div, dkw, alpha, temperature, chunk_size):
    x = make_inputs(bias=chunk_size == 5)
    assert_same(x, chunk_size, vocab_size=V, alpha=alpha, temperature=temperature, divergence=div, **dkw)


@pytest.mark.parametrize("div", DIVERGENCES)
def test_peaked_distributions(div):
    # Large logits: near one-hot distributions, probabilities underflowing to 0 in fp32.
    x = make_inputs(seed=1, scale=30.0)
    ref = dense_loss(x, vocab_size=V, alpha=0.5, divergence=div)
    assert torch.isfinite(ref.weighted_sum)
    assert_same(x, 6, rtol=1e-4, atol=1e-3, vocab_size=V, alpha=0.5, divergence=div)


@pytest.mark.parametrize("div", ["forward_kl", "jsd", "tvd"])
def test_bf16_inputs(div):
    x = make_inputs(seed=2, dtype=torch.bfloat16, bias=True)
    kw = dict(vocab_size=V, alpha=0.5, temperature=2.0, divergence=div)
    ref, out = dense_loss(x, **kw), chunked_loss(x, 9, **kw)
    for name in ("weighted_sum", "ce_sum", "kd_sum"):
        assert getattr(out, name).dtype == torch.float32
        # Same bf16 GEMM, same fp32 math: only the row chunking can move the logits' rounding.
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), rtol=1e-4, atol=1e-4)
    for a, b in zip(grads(out, x), grads(ref, x)):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2 * b.float().abs().max().item())


def test_ignored_labels_match_dense():
    x = make_inputs(seed=3)
    x["labels"][::3] = -100
    assert_same(x, 4, vocab_size=V, alpha=0.5, temperature=2.0)
    x["labels"][:] = -100  # every row masked: nothing counts (tests/loss/test_contract.py)
    out = assert_same(x, 4, vocab_size=V, alpha=0.5)
    assert out.ce_sum.item() == 0.0 and out.kd_sum.item() == 0.0 and out.n_tokens == 0


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_empty_batch(alpha):
    x = make_inputs(n=0, bias=True)
    out = chunked_loss(x, 8, vocab_size=V, alpha=alpha)
    assert out.n_tokens == 0
    assert out.weighted_sum.item() == 0.0 and out.ce_sum.item() == 0.0 and out.kd_sum.item() == 0.0
    out.weighted_sum.backward()
    assert x["student_hidden"].grad.shape == (0, HS)
    assert (x["student_weight"].grad == 0).all() and (x["student_bias"].grad == 0).all()


def test_no_teacher_is_ce_only():
    x = make_inputs(seed=4)
    x["teacher_hidden"] = x["teacher_weight"] = None
    for alpha in (0.0, 0.5, 1.0):
        out = assert_same(x, 6, vocab_size=V, alpha=alpha)
        assert out.kd_sum.item() == 0.0


def test_alpha_one_never_reads_the_teacher():
    x = make_inputs(seed=5)
    x["teacher_hidden"] = torch.full_like(x["teacher_hidden"], float("nan"))
    out = chunked_loss(x, 6, vocab_size=V, alpha=1.0)
    assert torch.isfinite(out.weighted_sum) and out.kd_sum.item() == 0.0


def test_teacher_gets_no_gradient():
    x = make_inputs(seed=6, bias=True)
    for k in ("teacher_hidden", "teacher_weight", "teacher_bias"):
        x[k].requires_grad_()
    chunked_loss(x, 5, vocab_size=V, alpha=0.5).weighted_sum.backward()
    assert all(x[k].grad is None for k in ("teacher_hidden", "teacher_weight", "teacher_bias"))
    assert x["student_weight"].grad is not None


def test_padded_rows_get_zero_gradient():
    x = make_inputs(seed=7, bias=True)
    out = chunked_loss(x, 5, vocab_size=V, alpha=0.5)
    _, gw, gb = grads(out, x)
    assert (gw[V:] == 0).all() and (gb[V:] == 0).all()
    assert (gw[:V] != 0).any()


def test_tied_lm_head_accumulates_both_uses():
    # Student lm_head tied to the input embedding: one parameter, two uses.
    g = torch.Generator().manual_seed(8)
    emb = torch.nn.Parameter(torch.randn(VS, HS, generator=g) * 0.3)
    ids = torch.randint(0, V, (N,), generator=g)
    mix_in = torch.randn(HS, HS, generator=g) * 0.3
    x = make_inputs(seed=8)
    grads_by_path = []
    for path in ("dense", "chunked"):
        emb.grad = None
        hidden = torch.tanh(emb[ids] @ mix_in)
        y = dict(x, student_hidden=hidden, student_weight=emb)
        out = dense_loss(y, vocab_size=V, alpha=0.5) if path == "dense" else chunked_loss(y, 5, vocab_size=V, alpha=0.5)
        out.weighted_sum.backward()
        grads_by_path.append(emb.grad.clone())
    torch.testing.assert_close(grads_by_path[1], grads_by_path[0], rtol=1e-5, atol=1e-5)


def test_frozen_weight_and_no_grad():
    x = make_inputs(seed=9)
    x["student_weight"].requires_grad_(False)
    ref = dense_loss(x, vocab_size=V, alpha=0.5)
    out = chunked_loss(x, 5, vocab_size=V, alpha=0.5)
    (gh,) = torch.autograd.grad(out.weighted_sum, x["student_hidden"])
    (gh_ref,) = torch.autograd.grad(ref.weighted_sum, x["student_hidden"])
    torch.testing.assert_close(gh, gh_ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        out = chunked_loss(x, 5, vocab_size=V, alpha=0.5)
    assert not out.weighted_sum.requires_grad
    torch.testing.assert_close(out.weighted_sum, ref.weighted_sum.detach(), rtol=1e-5, atol=1e-5)


def test_second_backward_is_refused():
    x = make_inputs(seed=10)
    out = chunked_loss(x, 5, vocab_size=V, alpha=0.5)
    out.weighted_sum.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        out.weighted_sum.backward()


def test_bad_arguments():
    x = make_inputs(seed=11)
    with pytest.raises(ValueError, match="unknown divergence"):
        chunked_loss(x, 5, vocab_size=V, alpha=0.5, divergence="kl")
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_loss(x, 0, vocab_size=V, alpha=0.5)
    with pytest.raises(ValueError, match="vocab_size"):
        chunked_loss(x, 5, vocab_size=VT + 1, alpha=0.5)


@pytest.mark.parametrize("div,dkw", DIV_CASES, ids=DIV_IDS)
def test_columns_masked_by_bias_in_both_models(div, dkw):
    # A -inf bias masks vocabulary entries out of both distributions: finite values and gradients,
    # the masked columns take no gradient, and everything matches the dense path.
    x = make_inputs(seed=12, bias=True)
    x["labels"] = x["labels"] % 40
    with torch.no_grad():
        x["student_bias"][40:V] = float("-inf")
        x["teacher_bias"][40:V] = float("-inf")
    kw = dict(vocab_size=V, alpha=0.5, temperature=2.0, divergence=div, **dkw)
    assert_same(x, 6, **kw)
    out = chunked_loss(x, 6, **kw)
    assert torch.isfinite(out.weighted_sum)
    gh, gw, gb = grads(out, x)
    assert all(torch.isfinite(g).all() for g in (gh, gw, gb))
    assert (gb[40:] == 0).all() and (gw[40:] == 0).all()
