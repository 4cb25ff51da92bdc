"""Memory-frugal distillation loss computed from final hidden states instead of logits.

`chunked_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, spec)`
has the semantics and values of

    kd_loss(student_hidden @ student_weight.T, teacher_hidden @ teacher_weight.T, labels, spec)

(see `kd.loss.dense`, including its IGNORE_INDEX contract), but never holds a full [N, V] tensor: rows are processed `chunk_size` at a
time. Each chunk is projected through both lm_heads into two reused fp32 [chunk, V] buffers,
CE and the divergence are evaluated in fp32 (a few rows at a time, in place), and the gradient of
the weighted loss w.r.t. the chunk's student logits is written down analytically (formulas
below). That logits-gradient is pushed through the lm_head at once: into the student-hidden
gradient rows and accumulated into the weight (and bias) gradient, all inside forward. Backward
only scales the stored gradients by the incoming grad_output.

Why analytic rather than a local autograd graph per chunk (both measured, CPU fp32, 7B/70B
shapes, chunk 1024): autograd keeps every intermediate of kd_loss alive, ~9 [chunk, V] tensors;
extra peak at N = 2048 was 1816 MiB against 864 MiB here. Time was within noise (1 thread,
N = 1024: dense 12.6 s, per-chunk autograd 12.8 s, this 11.7 s); the GEMMs dominate.

Gradients, with q = softmax(s / T) (student), p = softmax(t / T) (teacher), D(p || q) per row,
and g_j = dD/dq_j: dD/d(s_j / T) = q_j * (g_j - sum_k q_k g_k). Per divergence (terms constant
in j are dropped, they cancel):

    forward_kl       q - p                                         (closed form)
    reverse_kl       g = log q - log p
    jsd(beta)        g = (1 - beta) * log(q / m),   m = beta p + (1 - beta) q
    skew_forward_kl  g = -(1 - skew) * p / m,       m = skew p + (1 - skew) q
    skew_reverse_kl  g = log(q / m) - skew * q / m, m = skew q + (1 - skew) p
    tvd              g = 0.5 * sign(q - p)

and d(weighted)/ds = alpha * (softmax(s) - onehot(label)) + (1 - alpha) * T * dD/d(s / T).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kd.loss.dense import _LOG_FLOOR, TEACHER_LOG_FLOOR, LossParts
from kd.loss.spec import IGNORE_INDEX, LossSpec
# Bytes of one [rows, V] fp32 block of the elementwise loss math; its ~3 temporaries stay this
# size whatever chunk_size. On CPU: small enough to stay in cache and below malloc's mmap
# threshold (no page faults), large enough to keep the op count low (each op is a parallel
# region, costly when the cores are shared). On GPU: big, so kernels are few and large.
_ROW_BLOCK_BYTES = {"cpu": 16 * 2**20}
_ROW_BLOCK_BYTES_DEFAULT = 256 * 2**20


@dataclass(frozen=True)
class _Opts:
    spec: LossSpec
    need_teacher: bool
    grad_enabled: bool


def chunked_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor | None,
    teacher_weight: torch.Tensor | None,
    labels: torch.Tensor,
    spec: LossSpec,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
) -> LossParts:
    """CE + divergence token sums from hidden states; see the module doc.

    student_hidden [N, Hs], student_weight [Vs, Hs] (Vs >= spec.vocab_size), teacher_hidden
    [N, Ht], teacher_weight [Vt, Ht] (Vt >= vocab_size), labels [N] (IGNORE_INDEX rows count for
    nothing). Rows are projected spec.chunk_size at a time. Gradients reach student_hidden,
    student_weight and student_bias (in their own dtypes); the teacher never gets any. The graph
    can be backpropagated once (the stored gradients are scaled in place).
    """
    vocab_size = spec.vocab_size
    if student_hidden.dim() != 2 or labels.shape != student_hidden.shape[:1]:
        raise ValueError(
            f"expected student_hidden [N, H] and labels [N], got {tuple(student_hidden.shape)} "
            f"and {tuple(labels.shape)}"
        )
    if student_weight.shape[0] < vocab_size:
        raise ValueError(f"student_weight has {student_weight.shape[0]} rows < vocab_size {vocab_size}")
    need_teacher = spec.needs_teacher and teacher_hidden is not None
    if need_teacher:
        if teacher_weight is None:
            raise ValueError("teacher_hidden given without teacher_weight")
        if teacher_hidden.shape[0] != student_hidden.shape[0]:
            raise ValueError("teacher_hidden and student_hidden must have the same number of rows")
        if teacher_weight.shape[0] < vocab_size:
            raise ValueError(f"teacher_weight has {teacher_weight.shape[0]} rows < vocab_size {vocab_size}")
    else:
        teacher_hidden = teacher_weight = teacher_bias = None

    opts = _Opts(
        spec=spec,
        need_teacher=need_teacher,
        # Inside Function.forward grad mode is off and needs_input_grad ignores it: read it here.
        grad_enabled=torch.is_grad_enabled(),
    )
    weighted, ce_sum, kd_sum = _ChunkedKD.apply(
        student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, labels, opts
    )
    return LossParts(weighted, ce_sum, kd_sum, (labels != IGNORE_INDEX).sum())


class _ChunkedKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, labels, opts: _Opts):
        want_h, want_w, want_b = (opts.grad_enabled and n for n in ctx.needs_input_grad[:3])
        want_any = want_h or want_w or want_b
        spec = opts.spec
        V, n_rows = spec.vocab_size, s_hidden.shape[0]
        # Padded rows never reach the loss; views keep the projection to the real vocabulary.
        w = s_weight[:V]
        b = s_bias[:V] if s_bias is not None else None
        tw = t_weight[:V] if opts.need_teacher else None
        tb = t_bias[:V] if opts.need_teacher and t_bias is not None else None

        grad_h = torch.empty_like(s_hidden, memory_format=torch.contiguous_format) if want_h else None
        # Low-precision weight/bias grads accumulate over chunks in fp32 (a bf16 running sum would
        # be rounded N / chunk_size times); cast once in backward. The first chunk overwrites
        # rows [:V], so no zero-fill pass over a weight-sized buffer.
        grad_w = s_weight.new_empty(s_weight.shape, dtype=_acc_dtype(s_weight)) if want_w else None
        grad_b = s_bias.new_zeros(s_bias.shape, dtype=torch.float32) if want_b else None
        if grad_w is not None:
            (grad_w if n_rows == 0 else grad_w[V:]).zero_()

        ce_total = torch.zeros((), dtype=torch.float32, device=s_hidden.device)
        kd_total = torch.zeros((), dtype=torch.float32, device=s_hidden.device)
        # Two fp32 logits buffers reused by every chunk (fresh ones would be page-faulted in again
        # each chunk on CPU). The loss math runs on them a block of rows at a time: the GEMMs want
        # tall chunks, the elementwise temporaries only a few rows.
        rows_max = min(spec.chunk_size, n_rows)
        s_buf = s_hidden.new_empty((rows_max, V), dtype=torch.float32)
        t_buf = s_hidden.new_empty((rows_max, V), dtype=torch.float32) if opts.need_teacher else None
        block = max(1, _ROW_BLOCK_BYTES.get(s_hidden.device.type, _ROW_BLOCK_BYTES_DEFAULT) // (4 * V))
        for i in range(0, n_rows, spec.chunk_size):
            j = min(i + spec.chunk_size, n_rows)
            h = s_hidden[i:j]
            s = _project(h, w, b, s_buf[: j - i])
            t = _project(t_hidden[i:j], tw, tb, t_buf[: j - i]) if opts.need_teacher else None
            for r in range(0, j - i, block):
                r_end = min(r + block, j - i)
                ce_rows, kd_rows = _rows_loss_and_grad(
                    s[r:r_end], t[r:r_end] if t is not None else None, labels[i + r : i + r_end], opts, want_any
                )
                ce_total += ce_rows.sum()
                if kd_rows is not None:
                    kd_total += kd_rows.sum()
            if not want_any:
                continue
            # s now holds d(weighted)/d(student logits) for the chunk.
            if want_b:
                grad_b[:V] += s.sum(0)
            d = s.to(s_hidden.dtype)
            if want_h:
                torch.mm(d, w, out=grad_h[i:j])
            if want_w:
                if grad_w.dtype == d.dtype:
                    torch.addmm(grad_w[:V], d.t(), h, beta=0.0 if i == 0 else 1.0, out=grad_w[:V])
                elif i == 0:
                    grad_w[:V].copy_(d.t() @ h)
                else:
                    grad_w[:V] += d.t() @ h
            del d

        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.dtypes = (s_hidden.dtype, s_weight.dtype, s_bias.dtype if s_bias is not None else None)
        weighted = spec.mix(ce_total, kd_total)
        ctx.mark_non_differentiable(ce_total, kd_total)
        return weighted, ce_total, kd_total

    @staticmethod
    def backward(ctx, grad_weighted, _grad_ce, _grad_kd):
        if ctx.grads is None:
            raise RuntimeError("chunked_kd_loss: backward can run only once (its gradients are scaled in place)")
        out = []
        for g, dtype in zip(ctx.grads, ctx.dtypes):
            if g is not None:
                # In place: the scaled copy would be one more weight-sized buffer at peak.
                g = g.mul_(grad_weighted).to(dtype)
            out.append(g)
        ctx.grads = None
        return (*out, None, None, None, None, None)


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32


def _project(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """fp32 logits of one chunk into `out`; the GEMM runs in the model dtype, as in the dense path."""
    if h.dtype == out.dtype:
        return torch.addmm(b, h, w.t(), out=out) if b is not None else torch.mm(h, w.t(), out=out)
    return out.copy_(F.linear(h, w, b))


def _rows_loss_and_grad(
    s: torch.Tensor, t: torch.Tensor | None, labels: torch.Tensor, opts: _Opts, want_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row CE [R] and divergence [R] (None without a teacher) from fp32 logits s, t [R, V].
    Both are overwritten; with want_grad, `s` ends up holding d(weighted)/ds."""
    alpha, T = opts.spec.alpha, opts.spec.temperature
    valid = labels != IGNORE_INDEX
    safe = torch.where(valid, labels, torch.zeros_like(labels)).unsqueeze(1)
    # The fused kernel, as in the dense path: one pass fewer than max/logsumexp/sub, and
    # s - logsumexp(s) done by hand would round log-probabilities near 0 on peaked rows.
    log_q = F.log_softmax(s, -1)
    ce_rows = torch.where(valid, -log_q.gather(1, safe).squeeze(1), 0.0)
    # d(alpha * CE)/ds = ce_w * (softmax(s) - onehot(label)); ignored rows have no CE term.
    ce_w = torch.where(valid, alpha, 0.0).unsqueeze(1) if want_grad and alpha > 0.0 else None

    if t is None:
        if want_grad and ce_w is None:
            s.zero_()  # alpha = 0 and no teacher: the loss is identically zero
        elif want_grad:
            torch.exp(log_q, out=s).mul_(ce_w).scatter_add_(1, safe, -ce_w)
        return ce_rows, None

    ce_in_s = False
    if T != 1.0:
        log_q1, log_q = log_q, F.log_softmax(s.div_(T), -1)
        if ce_w is not None:
            torch.exp(log_q1, out=s).mul_(ce_w)  # the CE softmax term, T = 1
            ce_in_s = True
        del log_q1
        t.div_(T)
    # The floor keeps 0 * log 0 terms finite, as in kd.loss.dense.
    log_q.clamp_min_(_LOG_FLOOR)
    log_p = F.log_softmax(t, -1).clamp_min_(_LOG_FLOOR)
    # At T = 1 softmax(s) is q itself: the divergence gradient folds the CE softmax term in.
    q_coef = ce_w if T == 1.0 else None
    kd_rows = _divergence_and_grad(log_p, log_q, opts.spec, want_grad, (1.0 - alpha) * T, q_coef)
    # An ignored row adds no divergence and no gradient; multiplying by the 0/1 mask where the
    # gradient is moved into `s` anyway costs no extra pass (and x * 1 == x bit for bit).
    keep = valid.unsqueeze(1)
    if want_grad:
        if ce_in_s:
            s.addcmul_(log_q, keep)
        else:
            torch.mul(log_q, keep, out=s)
        if ce_w is not None:
            s.scatter_add_(1, safe, -ce_w)
    return ce_rows, torch.where(valid, kd_rows, 0.0)


def _divergence_and_grad(
    log_p: torch.Tensor,
    log_q: torch.Tensor,
    spec: LossSpec,
    want_grad: bool,
    scale: float,
    q_coef: torch.Tensor | None,
) -> torch.Tensor:
    """D(p || q) per row [R] from floored fp32 log-probs [R, V] (same endpoint conventions as
    `divergence_from_logprobs`). Both inputs are consumed; with want_grad, `log_q`'s storage ends
    up holding scale * dD/d(s / T) + q_coef * q."""
    kind, beta, skew = spec.divergence, spec.beta, spec.skew
    if (kind == "jsd" and beta == 0.0) or (kind == "skew_forward_kl" and skew == 0.0):
        kind = "forward_kl"
    elif (kind == "jsd" and beta == 1.0) or (kind == "skew_reverse_kl" and skew == 0.0):
        kind = "reverse_kl"

    if kind == "forward_kl":
        p = log_p.exp()
        rows = log_p.sub_(log_q).mul_(p).sum(-1)
        if want_grad:  # scale * (q - p) + q_coef * q
            log_q.exp_().mul_(scale if q_coef is None else q_coef + scale).sub_(p, alpha=scale)
        return rows
    if kind == "reverse_kl":
        # log(q / p); a forbidden teacher token (-inf, floored to _LOG_FLOOR above) counts as
        # TEACHER_LOG_FLOOR, every finite log-probability stays exact (see kd.loss.dense)
        g = log_p.masked_fill_(log_p <= _LOG_FLOOR, TEACHER_LOG_FLOOR).neg_().add_(log_q)
        q = log_q.exp_()
        rows = torch.mul(q, g).sum(-1)
        if want_grad:
            _softmax_grad(q, g, rows, scale, q_coef)
        return rows
    if kind == "jsd":
        log_m = _log_mix(log_p, log_q, beta)
        p = log_p.exp()
        kl_pm = log_p.sub_(log_m).mul_(p).sum(-1)
        del p
        g = log_m.neg_().add_(log_q)  # log(q / m)
        q = log_q.exp_()
        kl_qm = torch.mul(q, g).sum(-1)
        if want_grad:
            _softmax_grad(q, g, kl_qm, scale * (1.0 - beta), q_coef)
        return beta * kl_pm + (1.0 - beta) * kl_qm
    if kind == "skew_forward_kl":
        log_m = _log_mix(log_p, log_q, skew)
        p = log_p.exp()
        log_r = log_p.sub_(log_m)  # log(p / m)
        del log_m
        rows = torch.mul(p, log_r).sum(-1)
        del p
        if want_grad:
            r = log_r.exp_()  # p / m <= 1 / skew, no overflow
            q = log_q.exp_()
            _softmax_grad(q, r, torch.mul(q, r).sum(-1), -scale * (1.0 - skew), q_coef)
        return rows
    if kind == "skew_reverse_kl":
        log_m = _log_mix(log_q, log_p, skew)
        g = log_m.neg_().add_(log_q)  # log(q / m)
        q = log_q.exp_()
        rows = torch.mul(q, g).sum(-1)
        if want_grad:
            g.sub_(torch.exp(g, out=log_p).mul_(skew))  # log(q/m) - skew * q/m; log_p is scratch now
            _softmax_grad(q, g, torch.mul(q, g).sum(-1), scale, q_coef)
        return rows
    if kind == "tvd":
        q = log_q.exp_()
        diff = log_p.exp_().neg_().add_(q)  # q - p
        # abs().sum() is summed pairwise; a float32 vector_norm(., 1) over 32000 columns is not
        # (~2e-5 relative error).
        rows = diff.abs().sum(-1).mul_(0.5)
        if want_grad:
            g = diff.sign_().mul_(0.5)
            _softmax_grad(q, g, torch.mul(q, g).sum(-1), scale, q_coef)
        return rows
    raise ValueError(f"unknown divergence {kind!r}")


def _softmax_grad(q: torch.Tensor, g: torch.Tensor, qg: torch.Tensor, k: float, q_coef: torch.Tensor | None) -> None:
    """q <- q * (k * (g - qg) + q_coef): k times the softmax backward of g, plus the folded CE
    term. `qg` is the per-row sum of q * g; g is clobbered."""
    g.sub_(qg.unsqueeze(1)).mul_(k)
    if q_coef is not None:
        g.add_(q_coef)
    q.mul_(g)


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, w: float) -> torch.Tensor:
    """log(w * a + (1 - w) * b) from floored log-probs (so never logaddexp(-inf, -inf))."""
    out = torch.add(log_a, math.log(w))
    return torch.logaddexp(out, log_b + math.log1p(-w), out=out)
