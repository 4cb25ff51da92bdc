"""Aligning two tokenisations by character offsets (kd.data.align), as properties on random texts
(unicode, digits, whitespace runs, emoji) for real tokenizer pairs available offline: the
32000-entry LLaMA SentencePiece vs a byte-level BPE, and two byte-level BPEs of different sizes."""

from __future__ import annotations

import random

import pytest

from kd.data.align import AlignError, Group, align_by_offsets, offsets

POOLS = ["abcdefghij", "ABCXYZ", "0123456789", " ", "  ", "    ", "\n", "\n\n", "\t", ".,;:!?-'\"()",
         "éèüßçñ", "日本語の", "Привет", "😀🎉👍", "👩‍💻", "ﬁ", "\u00a0", "<>/=+*"]


def random_text(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(1, 25)):
        pool = rng.choice(POOLS)
        parts.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 6))) if len(pool) > 2 else pool)
    return "".join(parts)


def _bpe(vocab_size: int, seed: int):
    """A byte-level BPE trained here on seeded random text (the demo tokenizer's layout)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([random_text(rng) for _ in range(2000)], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="module")
def pairs(llama_tokenizer_dir):
    from transformers import AutoTokenizer

    llama = AutoTokenizer.from_pretrained(llama_tokenizer_dir)
    small, large = _bpe(300, 1), _bpe(2000, 2)
    return {"llama-sp vs bpe-2000": (llama, large), "bpe-300 vs bpe-2000": (small, large),
            "llama-sp vs llama-sp": (llama, llama)}


def check(groups: list[Group], a, b, length: int) -> None:
    assert groups and groups[0].start == 0 and groups[-1].end == length
    assert groups[0].a_start == 0 and groups[0].b_start == 0
    assert groups[-1].a_end == len(a) and groups[-1].b_end == len(b)
    for g, h in zip(groups, groups[1:]):  # in order, each character and token exactly once
        assert g.end == h.start and g.a_end == h.a_start and g.b_end == h.b_start
    for g in groups:
        assert g.start < g.end and g.a_start < g.a_end and g.b_start < g.b_end  # non-empty on both sides
        for side, lo, hi in ((a, g.a_start, g.a_end), (b, g.b_start, g.b_end)):
            for s, e in side[lo:hi]:
                assert (g.start <= s and e <= g.end) or s == e, (s, e, g)


@pytest.mark.parametrize("pair", ["llama-sp vs bpe-2000", "bpe-300 vs bpe-2000", "llama-sp vs llama-sp"])
def test_groups_cover_the_text_once_in_order_non_empty_on_both_sides(pairs, pair):
    ta, tb = pairs[pair]
    rng = random.Random(pair)
    for _ in range(300):
        text = random_text(rng)
        a, b = offsets(ta, text), offsets(tb, text)
        groups = align_by_offsets(a, b, len(text))
        check(groups, a, b, len(text))
        if ta is tb:  # one tokenizer: a group holds more than one token only where its tokens overlap
            for g in groups:
                assert (g.a_start, g.a_end) == (g.b_start, g.b_end)
                toks = a[g.a_start:g.a_end]
                assert all(t[0] < p[1] or t[0] == t[1] or p[0] == p[1] for p, t in zip(toks, toks[1:])), toks


def test_a_worked_example():
    # "Hello world" as LLaMA (▁Hello ▁world, the space reported with the second word) and as a BPE
    # that splits finer: two groups, each one LLaMA token and its BPE pieces
    a = [(0, 5), (5, 11)]
    b = [(0, 1), (1, 2), (2, 4), (4, 5), (5, 8), (8, 9), (9, 10), (10, 11)]
    assert align_by_offsets(a, b, 11) == [Group(0, 5, 0, 1, 0, 4), Group(5, 11, 1, 2, 4, 8)]
    # a byte-level split of one character (both halves report it) never puts a cut inside it
    assert align_by_offsets([(0, 1), (1, 2)], [(0, 1), (0, 1), (1, 2)], 2) == [Group(0, 1, 0, 1, 0, 2),
                                                                                Group(1, 2, 1, 2, 2, 3)]
    # a character one side skips (a space SentencePiece folds into "▁") joins a group, never is one
    assert align_by_offsets([(0, 1), (2, 3)], [(0, 2), (2, 3)], 3) == [Group(0, 2, 0, 1, 0, 1), Group(2, 3, 1, 2, 1, 2)]


def test_bad_offsets_are_refused_in_one_line():
    with pytest.raises(AlignError, match="outside the text"):
        align_by_offsets([(0, 4)], [(0, 3)], 3)
    with pytest.raises(AlignError, match="starts before its predecessor ends"):
        align_by_offsets([(0, 3), (0, 3)], [(0, 3)], 3)
    with pytest.raises(AlignError, match="one side only"):
        align_by_offsets([], [(0, 3)], 3)
