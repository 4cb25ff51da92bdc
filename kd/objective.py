"""What a run optimises, in one line, read back from the objects the loss uses (the LossSpec of
the off-policy batches and the one on-policy batches get), so it cannot drift from them. Printed at
start, written as config.yaml's first line and put in the W&B run config."""

from __future__ import annotations

from kd.config import Config
from kd.loss import LossSpec


def onpolicy_spec(spec: LossSpec, cfg: Config) -> LossSpec:
    """The loss on the student's own samples: the divergence alone (they have no gold label)."""
    return spec.replace(alpha=0.0, divergence=cfg.onpolicy.divergence)


def objective(cfg: Config, spec: LossSpec, world: int) -> str:
    accum = cfg.train.grad_accum_steps
    p, generic = cfg.data.erase_probability, cfg.data.generic_system
    replaced = f"replaced by data.generic_system {generic!r}" if generic else "erased"
    student_view = ("the teacher's (erasure off)" if p == 0 else
                    f"strategy instruction {replaced}" if p == 1 else
                    f"strategy instruction {replaced} for a seeded {p:g} of examples, the teacher's otherwise")
    text = (f"objective: {spec.describe()} per target token, summed over the step and divided by its target "
            f"tokens on all ranks ({accum} micro-batch{'es' if accum > 1 else ''} × {world} "
            f"rank{'s' if world > 1 else ''}); teacher view: strategy instruction; student view: {student_view}")
    o = cfg.onpolicy
    if o.fraction > 0:
        when = o.schedule() and o.schedule() + ","  # off-policy before the start step
        text += (f"; on-policy: {o.fraction:.0%} of micro-batches{when} are the student's own answers (sampled at "
                 f"temperature {o.temperature:g}, top-p {o.top_p:g}, up to {o.max_new_tokens} tokens) with "
                 f"{o.weight:g}·({onpolicy_spec(spec, cfg).describe()})")
    else:
        text += "; on-policy: off"
    return text
