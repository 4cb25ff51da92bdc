"""Packing changes nothing but speed: packed and padded micro-batches of the same examples give the
same hidden rows, loss and gradients; length-grouped sampling is a deterministic, resumable
reordering of the same epoch."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from kd.data import MicroBatchSampler, collate, collate_packed, conversation_rows
from kd.data.batches import pack_rows
from kd.errors import ConfigError
from kd.forward import Distiller, head, isolates_packed_sequences, packing_leak, packing_refusal, teacher_forward
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


@pytest.mark.parametrize("row_tokens", [None, 150, 100_000])  # the longest example's length, between, one row
def test_packed_equals_padded_rows_loss_and_gradients(row_tokens):
    tok = load_tokenizer("builtin:tokenizer")
    exs = examples(tok)
    padded, packed = collate(exs, tok.pad_token_id), collate_packed(exs, tok.pad_token_id, row_tokens=row_tokens)
    assert torch.equal(padded["labels"], packed["labels"])
    for view in ("teacher", "student"):
        lengths = [len(e[f"{view}_ids"]) for e in exs]
        capacity = max(row_tokens or 0, max(lengths))
        layout = pack_rows(lengths, capacity)
        assert sorted(i for row in layout for i in row) == list(range(len(exs)))
        assert all(sum(lengths[i] for i in row) <= capacity for row in layout)
        assert (len(layout) == 1) == (row_tokens == 100_000)
        ids, pos = packed[f"{view}_input_ids"], packed[f"{view}_position_ids"]
        assert ids.shape == (len(layout), max(sum(lengths[i] for i in row) for row in layout))
        for r, row in enumerate(layout):  # each example whole in one row, its positions from 0
            at = 0
            for i in row:
                n = lengths[i]
                assert ids[r, at:at + n].tolist() == exs[i][f"{view}_ids"] and pos[r, at:at + n].tolist() == list(range(n))
                at += n
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


def _tiny(kind: str, impl: str):
    import transformers as T

    base = dict(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128)
    configs = {
        "llama": lambda: T.LlamaConfig(**base), "qwen2": lambda: T.Qwen2Config(**base),
        "qwen3": lambda: T.Qwen3Config(**base, head_dim=8),
        "mistral-sliding-window": lambda: T.MistralConfig(**base, sliding_window=4),
        "gemma": lambda: T.GemmaConfig(**base, head_dim=8), "phi3": lambda: T.Phi3Config(**base, pad_token_id=0),
        "phi": lambda: T.PhiConfig(**{k: v for k, v in base.items() if k != "num_key_value_heads"}),
        "gpt2": lambda: T.GPT2Config(vocab_size=400, n_embd=32, n_layer=2, n_head=4, n_positions=128),
        "gpt-neox": lambda: T.GPTNeoXConfig(**{k: v for k, v in base.items() if k != "num_key_value_heads"}),
        "falcon": lambda: T.FalconConfig(vocab_size=400, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         new_decoder_architecture=True, num_kv_heads=2),
        # ALiBi without position ids: with small weights its leak is 1e-4..1e-2, which a relative
        # tolerance of 1e-2 on packed-vs-alone accepted
        "bloom": lambda: T.BloomConfig(vocab_size=400, hidden_size=32, n_layer=2, n_head=4, initializer_range=0.005),
        "opt": lambda: T.OPTConfig(vocab_size=400, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                   num_attention_heads=4, word_embed_proj_dim=32),
    }
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(configs[kind](), attn_implementation=impl)


ISOLATING = ["llama", "qwen2", "qwen3", "mistral-sliding-window", "gemma", "phi3", "phi", "gpt2", "gpt-neox", "falcon"]


@pytest.mark.parametrize("kind", ISOLATING)
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_models_that_isolate_packed_examples_are_accepted(kind, impl):
    model = _tiny(kind, impl).train()
    leak, err = packing_leak(model, 400)
    assert leak == 0.0 and err < 1e-6  # structurally apart: bit for bit, whatever the other example holds
    assert isolates_packed_sequences(model, 400) and model.training


def test_the_builtin_models_isolate_packed_examples():
    for name in ("builtin:tiny-student", "builtin:tiny-teacher"):
        for impl in ("sdpa", "eager"):
            model = AutoModelForCausalLM.from_pretrained(resolve(name), attn_implementation=impl)
            assert isolates_packed_sequences(model, 400)


@pytest.mark.parametrize("kind, impl", [("bloom", "eager"), ("opt", "sdpa"), ("opt", "eager")])
def test_models_that_leak_even_a_little_are_refused_without_advising_what_they_use(kind, impl):
    model = _tiny(kind, impl)
    leak, _ = packing_leak(model, 400)
    assert leak > 1e-5 and not isolates_packed_sequences(model, 400)
    with pytest.raises(ConfigError) as e:
        packing_refusal("student", model, 400)
    msg = str(e.value)
    assert f"attn_implementation={impl}) lets packed examples see each other" in msg and "data.packing=false" in msg
    assert f"student.attn_implementation={impl}" not in msg and f"or {impl}" not in msg


def test_a_leak_below_float_rounding_of_packed_vs_alone_is_still_refused():
    from types import SimpleNamespace

    class Leaky(torch.nn.Module):  # isolates but for a 1e-4 running sum over the whole row
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(400, 8)

        @property
        def base_model(self):
            return self

        def forward(self, input_ids, position_ids=None, use_cache=False):
            e = self.emb(input_ids)
            return SimpleNamespace(last_hidden_state=e + 1e-4 * e.cumsum(1))

    leak, err = packing_leak(Leaky(), 400)
    assert 1e-5 < leak < 1e-2 and err < 1e-2  # the old probe (packed vs alone < 1e-2) accepted it
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


def test_rows_are_as_few_as_first_fit_finds_and_balanced_under_their_capacity():
    assert pack_rows([5, 3, 4, 2, 1], 6) == [[0], [2, 4], [1, 3]]  # 15 tokens need 3 rows of 6: rows of 5
    assert pack_rows([6, 6], 6) == [[0], [1]] and pack_rows([1, 1, 1], 10) == [[0, 1, 2]]
    # 8 short examples, 520 tokens, rows of at most 384: two rows of 285 and 235, not 384 + 136
    lengths = [90, 80, 75, 70, 60, 55, 50, 40]
    rows = pack_rows(lengths, 384)
    assert len(rows) == 2 and max(sum(lengths[i] for i in r) for r in rows) == 285
