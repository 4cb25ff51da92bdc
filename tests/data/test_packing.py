"""Packing changes nothing but speed: packed and padded micro-batches of the same examples give the
same hidden rows, loss and gradients; length-grouped sampling is a deterministic, resumable
reordering of the same epoch."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from kd.data import MicroBatchSampler, collate, collate_packed, conversation_rows
from kd.forward import Distiller, head, isolates_packed_sequences, teacher_forward
from kd.loss import LossSpec
from kd.models import load_tokenizer, resolve

CONV = [{"role": "system", "content": "Add step by step."}, {"role": "user", "content": "What is 12 + 30?"},
        {"role": "assistant", "content": "12 + 30 = 42."}, {"role": "user", "content": "And 42 + 8?"},
        {"role": "assistant", "content": "42 + 8 = 50."}]


def examples(tok):
    out = []
    for i, n in enumerate((1, 3, 2, 5)):  # different lengths, one or two trained turns
        msgs = [dict(m, content=m["content"] + " x" * n * (j + 1)) for j, m in enumerate(CONV)]
        (row,), _ = conversation_rows({"messages": msgs if i % 2 else msgs[:3]}, tok, erase=True, generic_system=None,
                                    targets="all_assistant", max_length=512, min_prompt=8)
        out.append(dict(row, example_id=i))
    return out


def test_packed_equals_padded_rows_loss_and_gradients():
    tok = load_tokenizer("builtin:tokenizer")
    exs = examples(tok)
    padded, packed = collate(exs, tok.pad_token_id), collate_packed(exs)
    assert torch.equal(padded["labels"], packed["labels"]) and packed["student_input_ids"].shape[0] == 1
    assert packed["teacher_input_ids"].numel() == sum(len(e["teacher_ids"]) for e in exs)  # no padding at all
    teacher = AutoModelForCausalLM.from_pretrained(resolve("builtin:tiny-teacher")).eval()
    ht_pad, ht_pack = teacher_forward(teacher, padded), teacher_forward(teacher, packed)
    torch.testing.assert_close(ht_pack, ht_pad, rtol=1e-5, atol=1e-5)
    grads = []
    for batch, ht in ((padded, ht_pad), (packed, ht_pack)):
        student = AutoModelForCausalLM.from_pretrained(resolve("builtin:tiny-student"))
        d = Distiller(student, LossSpec(len(tok), alpha=0.5, temperature=2.0, divergence="jsd", chunk_size=7))
        parts = d(batch, ht, head(teacher))
        parts["weighted_sum"].backward()
        grads.append((parts, {n: p.grad.clone() for n, p in student.named_parameters()}))
    (a, ga), (b, gb) = grads
    for key in ("weighted_sum", "ce_sum", "kd_sum"):
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-5)
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-4, atol=1e-6, msg=n)


def test_which_models_isolate_packed_sequences():
    from types import SimpleNamespace

    for name in ("builtin:tiny-student", "builtin:tiny-teacher"):
        for impl in ("sdpa", "eager"):
            model = AutoModelForCausalLM.from_pretrained(resolve(name), attn_implementation=impl).train()
            assert isolates_packed_sequences(model, 400) and model.training

    class Leaky(torch.nn.Module):  # a running sum over the row: ignores where examples start
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(400, 8)

        @property
        def base_model(self):
            return self

        def forward(self, input_ids, position_ids=None, use_cache=False):
            return SimpleNamespace(last_hidden_state=self.emb(input_ids).cumsum(1))

    assert not isolates_packed_sequences(Leaky(), 400)


def test_length_grouping_is_a_deterministic_reordering_of_the_epoch():
    n, mb, world, accum = 1000, 4, 2, 2
    lengths = [(i * 7919) % 997 + 10 for i in range(n)]
    plain = MicroBatchSampler(n, mb, world, 0, seed=3, accum=accum)
    ranks = [MicroBatchSampler(n, mb, world, r, seed=3, accum=accum, lengths=lengths) for r in range(world)]
    per_epoch = plain.per_epoch
    for epoch in (0, 1):
        ks = range(epoch * per_epoch, (epoch + 1) * per_epoch)
        grouped = [i for k in ks for r in ranks for i in r.indices(k)]
        baseline = [i for k in ks for r in range(world)
                    for i in MicroBatchSampler(n, mb, world, r, seed=3, accum=accum).indices(k)]
        assert sorted(grouped) == sorted(baseline)  # the same examples each epoch
        pad = lambda idx: sum(max(lengths[i] for i in idx[j:j + mb]) * mb - sum(lengths[i] for i in idx[j:j + mb])  # noqa: E731
                              for j in range(0, len(idx), mb))
        assert pad(grouped) < 0.2 * pad(baseline)  # far less padding
    fresh = MicroBatchSampler(n, mb, world, 1, seed=3, accum=accum, lengths=lengths)
    assert [fresh.indices(k) for k in (250, 3, 777)] == [ranks[1].indices(k) for k in (250, 3, 777)]  # resumable
