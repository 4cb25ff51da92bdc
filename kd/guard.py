"""Non-finite values never train, get saved or get reported: what the loop checks, and the error.

Per optimizer step the loop folds these flags into the reduction it makes anyway (the step's
loss sums, all-reduced before the last backward) and into the gradient clip, so the check costs
no host sync per micro-batch: one before the last backward (under DeepSpeed the engine steps
inside it) and the clip's own.
"""

from __future__ import annotations

import math

import torch

from kd.errors import KDError


class NonFiniteError(KDError):
    """A non-finite teacher output, loss, gradient norm, eval metric or weight."""

    exit_code = 3


def teacher_nonfinite(t_out) -> torch.Tensor:
    """0-dim device tensor, 1 if the teacher's outputs for a micro-batch hold NaN/inf, else 0: the
    live teacher's hidden states, cached top-k rows (whose tail may be -inf by design), or cached
    samples."""
    if t_out is None:
        return torch.zeros(())
    if torch.is_tensor(t_out):
        return (~torch.isfinite(t_out)).any().float()
    if hasattr(t_out, "logq"):  # kd.loss.sampled.CachedSample
        return ((~torch.isfinite(t_out.logq)).any() | (~torch.isfinite(t_out.log_norm)).any()).float()
    return ((~torch.isfinite(t_out.logits)).any() | torch.isnan(t_out.tail_lse).any()).float()


def teacher_broken(t_out, head_weight) -> float:
    """1.0 if the first batch's teacher outputs or the teacher's lm_head weight hold NaN/inf (the
    weight too: the chunked loss projects with it, so hidden states alone would not show it)."""
    if teacher_nonfinite(t_out).item() > 0:
        return 1.0
    return 0.0 if head_weight is None or bool(torch.isfinite(head_weight).all()) else 1.0


def culprit(teacher_bad: float, loss_parts: list[float]) -> str | None:
    """What went non-finite in a step's forward, or None."""
    if teacher_bad > 0:
        return "the teacher's outputs"
    if not all(map(math.isfinite, loss_parts)):
        return "the student's loss"
    return None
