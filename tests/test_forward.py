"""Response-only forwards agree with the models' own full forward; the loss stays fp32 under autocast."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from kd.demo import builtin
from kd.data import collate, example_from_views, render_views
from kd.forward import Distiller, eval_sums, fp32_logits, head, response_hidden, teacher_forward
from kd.loss import LossSpec, kd_loss
from kd.models import load_tokenizer

RECS = [
    {"system": "Think step by step.", "prompt": "What is 12 + 30?", "response": "2+0=2\n1+3=4\nThe answer is 42."},
    {"system": "Answer directly.", "prompt": "What is 1 + 1?", "response": "The answer is 2."},
]


@pytest.fixture(scope="module")
def setup():
    tok = load_tokenizer("builtin:tokenizer")
    teacher = AutoModelForCausalLM.from_pretrained(builtin.resolve("builtin:tiny-teacher")).eval()
    student = AutoModelForCausalLM.from_pretrained(builtin.resolve("builtin:tiny-student"))
    exs = []
    for r in RECS:
        t, s, resp = render_views(r, tok, erase=True, generic_system=None)
        exs.append(example_from_views(t, s, resp))
    return tok, teacher, student, collate(exs, tok.pad_token_id)


def test_response_rows_match_the_full_forward(setup):
    tok, teacher, student, b = setup
    for model, view in ((teacher, "teacher"), (student, "student")):
        full = model(input_ids=b[f"{view}_input_ids"], attention_mask=b[f"{view}_attention_mask"]).logits
        rows = fp32_logits(response_hidden(model, b, view), head(model))
        torch.testing.assert_close(rows, full.flatten(0, 1)[b[f"{view}_index"]], rtol=1e-5, atol=1e-5)


def test_distiller_equals_reference_loss_and_stays_fp32_under_bf16_autocast(setup):
    tok, teacher, student, b = setup
    spec = LossSpec(len(tok), alpha=0.3, temperature=2.0)
    d = Distiller(student, spec)
    th = teacher_forward(teacher, b)
    parts = d(b, th, head(teacher))
    s_logits = student(input_ids=b["student_input_ids"], attention_mask=b["student_attention_mask"]).logits
    t_logits = teacher(input_ids=b["teacher_input_ids"], attention_mask=b["teacher_attention_mask"]).logits
    ref = kd_loss(s_logits.flatten(0, 1)[b["student_index"]], t_logits.flatten(0, 1)[b["teacher_index"]], b["labels"], LossSpec(vocab_size=len(tok), alpha=0.3, temperature=2.0))
    torch.testing.assert_close(parts["weighted_sum"], ref.weighted_sum, rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        p16 = d(b, teacher_forward(teacher, b), head(teacher))
    assert all(v.dtype == torch.float32 for v in p16.values())
    assert torch.isfinite(p16["weighted_sum"])


def test_eval_sums_counts_agreement(setup):
    tok, teacher, student, _ = setup
    exs = []
    for r in RECS:  # not erased: both views identical, so the teacher against itself agrees everywhere
        t, s, resp = render_views(r, tok, erase=False, generic_system=None)
        exs.append(example_from_views(t, s, resp))
    b = collate(exs, tok.pad_token_id)
    sums = eval_sums(teacher, teacher, b, LossSpec(len(tok)))
    assert sums["kd"].abs() < 1e-5 and sums["top1_agreement"] == sums["tokens"] == b["labels"].numel()
