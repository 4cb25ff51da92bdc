"""The objective line: what a run optimises, read back from the LossSpec objects the loss uses."""

from __future__ import annotations

import pytest

from conftest import ROOT
from kd.config import load_config
from kd.loss import LossSpec
from kd.objective import objective, onpolicy_spec

DEMO = ROOT / "configs" / "demo.yaml"
SUM = "per target token, summed over the step and divided by its target tokens on all ranks"
GENERIC = "student view: strategy instruction replaced by data.generic_system 'You are a helpful assistant.'"


@pytest.mark.parametrize("overrides, world, want", [
    ([], 1, f"objective: 0.5·CE + 0.5·T²(=4)·KL(teacher‖student) at T=2 {SUM} (2 micro-batches × 1 rank); "
            f"teacher view: strategy instruction; {GENERIC}; on-policy: off"),
    (["loss.alpha=1", "data.erase_strategy=off"], 1,
     f"objective: 1·CE {SUM} (2 micro-batches × 1 rank); teacher view: strategy instruction; student view: the "
     f"teacher's (erasure off); on-policy: off"),
    # JSD's beta = 1 endpoint is reverse KL, and says so
    (["loss.divergence=jsd", "loss.beta=1", "loss.alpha=0", "loss.temperature=1", "train.grad_accum_steps=1",
      "data.generic_system=null"], 8,
     f"objective: 1·T²(=1)·KL(student‖teacher) at T=1 {SUM} (1 micro-batch × 8 ranks); teacher view: strategy "
     f"instruction; student view: strategy instruction erased; on-policy: off"),
    (["onpolicy.fraction=0.5", "onpolicy.weight=2", "train.grad_accum_steps=16", "data.erase_strategy=0.3"], 2,
     f"objective: 0.5·CE + 0.5·T²(=4)·KL(teacher‖student) at T=2 {SUM} (16 micro-batches × 2 ranks); teacher view: "
     f"strategy instruction; {GENERIC} for a seeded 0.3 of examples, the teacher's otherwise; on-policy: 50% of "
     f"micro-batches are the student's own answers (sampled at temperature 1, top-p 1, up to 256 tokens) with "
     f"2·(1·T²(=4)·KL(student‖teacher) at T=2)"),
])
def test_the_objective_line_reads_the_loss_back(overrides, world, want):
    cfg = load_config(DEMO, overrides)
    assert objective(cfg, LossSpec.from_config(cfg.loss, 400), world) == want


def test_the_words_follow_the_spec_the_loss_is_given():
    spec = LossSpec(400, alpha=0.25, temperature=3.0, divergence="skew_reverse_kl", skew=0.2)
    assert spec.describe() == "0.25·CE + 0.75·T²(=9)·KL(student‖0.2·student+0.8·teacher) at T=3"
    assert spec.mix(1.0, 0.0) == 0.25 and spec.mix(0.0, 1.0) == 0.75 * 9
    cfg = load_config(DEMO, ["onpolicy.divergence=forward_kl"])
    on = onpolicy_spec(spec, cfg)
    assert on.alpha == 0.0 and on.describe() == "1·T²(=9)·KL(teacher‖student) at T=3"
