"""One optimizer step's forwards and backwards: the step's micro-batches in, what the loop needs
out (the global token counts, the loss sums, the gradient norm, the finite guard's verdict,
generation stats). The loop keeps the policy: whether to stop, skip or step the optimizer, what
to log and save.

Order inside a step, all ranks alike:
1. on-policy micro-batches (a pure function of seed, step and micro-batch index) are replaced by
   the student's own answers;
2. one all-reduce of the token counts (the normaliser: target tokens of the whole step on all
   ranks, known before any backward) with the stop flag riding on it, so every rank stops after
   the same step; a stop request returns before any forward;
3. each micro-batch: teacher forward (or cache lookup), the student's loss, backward scaled by
   world * accum / normaliser; before the last backward the step's loss sums are all-reduced and a
   non-finite forward is never stepped (under DeepSpeed the engine steps inside that backward);
4. the gradient norm (clipped), and the verdict: None, or what went non-finite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from kd.data import real_tokens
from kd.distributed import gathered, global_sum
from kd.guard import NonFiniteError, culprit, teacher_broken, teacher_nonfinite
from kd.onpolicy import GenStats


@dataclass
class StepOutcome:
    stopped: bool  # a stop request: nothing was run
    counts: torch.Tensor  # global [target tokens, real tokens, stop, on-policy targets, gen sequences, tokens, by length, seconds]
    on: list[bool] = field(default_factory=list)  # which micro-batches were on-policy
    gen: GenStats = field(default_factory=GenStats)  # this rank's generation
    totals: list[float] = field(default_factory=list)  # global sums: weighted loss, ce, kd (off-policy), teacher bad, kd on-policy
    grad_norm: float | None = None
    bad: str | None = None  # what went non-finite, if anything

    @property
    def n_global(self) -> float:
        return max(self.counts[0].item(), 1.0)


class Step:
    """The step as a callable: `step(k, micro_batches, stop_requested) -> StepOutcome`."""

    def __init__(self, accelerator, distiller, teacher_outputs, teacher_head, *, onpolicy, rows_of, accum: int,
                 use_teacher: bool, max_grad_norm: float, status=lambda text: None):
        self.accelerator, self.distiller = accelerator, distiller
        self.teacher_outputs, self.teacher_head = teacher_outputs, teacher_head
        self.onpolicy, self.rows_of, self.accum = onpolicy, rows_of, accum
        self.use_teacher, self.max_grad_norm, self.status = use_teacher, max_grad_norm, status
        self.student = accelerator.unwrap_model(distiller).student
        self.first_batch = True  # a broken teacher is named at once, on the first batch it sees

    def __call__(self, step: int, micro: list[dict], stop_requested: bool) -> StepOutcome:
        acc, accum, onpolicy = self.accelerator, self.accum, self.onpolicy
        on = [onpolicy is not None and onpolicy.active(step, i) for i in range(accum)]
        gen = GenStats()
        if any(on):
            with acc.autocast():
                for i in (i for i in range(accum) if on[i]):
                    self.status(f"step {step + 1}: the student answers micro-batch {i + 1}/{accum}")
                    micro[i], made = onpolicy.batch(self.student, self.rows_of(step * accum + i), step, i,
                                                    acc.process_index)
                    gen.add(made)
        # Normalise by the response tokens of the whole optimizer step on all ranks (generated ones
        # included), known before any backward: (micro 8, accum 1) and (micro 2, accum 4) and 2
        # ranks give equal gradients. The stop flag rides on the same all-reduce, so all ranks agree
        # on the step they stop at.
        counts = global_sum(acc, [sum(b["labels"].numel() for b in micro), sum(real_tokens(b) for b in micro),
                                  float(stop_requested), sum(b["labels"].numel() for b, o in zip(micro, on) if o),
                                  gen.sequences, gen.tokens, gen.by_length, gen.seconds])
        if counts[2] > 0:
            return StepOutcome(stopped=True, counts=counts, on=on, gen=gen)
        micro = [{k: v.to(acc.device, non_blocking=True) for k, v in b.items()} for b in micro]
        n_global = max(counts[0].item(), 1.0)
        world = acc.num_processes
        head_weight = getattr(self.teacher_head, "weight", None)
        sums = torch.zeros(5, device=acc.device)  # weighted, ce, kd (off-policy), teacher bad, kd on-policy
        forward_bad, totals = None, []
        for i, batch in enumerate(micro):
            # accumulate(): gradients are all-reduced (DDP) or the engine steps (DeepSpeed) only on
            # the last micro-batch; backward divides by accum and ranks average, hence the factor
            with acc.accumulate(self.distiller):
                with acc.autocast():
                    t_out = self.teacher_outputs(batch) if self.use_teacher or on[i] else None
                if self.first_batch and t_out is not None:
                    with gathered(head_weight):
                        broken = teacher_broken(t_out, head_weight)
                    if global_sum(acc, [broken])[0] > 0:
                        raise NonFiniteError(f"step {step + 1}: the teacher's outputs are non-finite (NaN/inf) on "
                                             f"the first batch; check the teacher's weights and dtype")
                    self.first_batch = False
                with gathered(head_weight):
                    parts = self.distiller(batch, t_out, self.teacher_head, onpolicy.spec if on[i] else None)
                loss = parts["weighted_sum"] * onpolicy.cfg.weight if on[i] else parts["weighted_sum"]
                zero = torch.zeros((), device=sums.device)
                sums += torch.stack([loss.detach(), zero if on[i] else parts["ce_sum"],
                                     zero if on[i] else parts["kd_sum"], teacher_nonfinite(t_out).to(sums.device),
                                     parts["kd_sum"] if on[i] else zero]).float()
                if i == accum - 1:
                    # The step's loss parts on all ranks, before the last backward (under DeepSpeed
                    # the engine steps inside it): a non-finite forward is never stepped.
                    totals = global_sum(acc, sums).tolist()
                    forward_bad = culprit(totals[3], totals[:3] + totals[4:])
                    if forward_bad:
                        break
                acc.backward(loss * (world * accum / n_global))
        grad_norm = None
        if not forward_bad:
            max_norm = self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
            grad_norm = float(acc.clip_grad_norm_(self.distiller.parameters(), max_norm))  # DeepSpeed: its own
        bad = forward_bad or (None if math.isfinite(grad_norm) else "the gradients")
        return StepOutcome(stopped=False, counts=counts, on=on, gen=gen, totals=totals, grad_norm=grad_norm, bad=bad)
