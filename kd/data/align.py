"""Aligning two tokenisations of one text by character offsets (cross-tokenizer distillation).

The teacher and the student tokenise the same assistant text with different vocabularies. Their
target tokens are aligned by where they sit in that text, not by decoding buffers: a *cut* is a
character position that no token of either side straddles, and the groups are the stretches between
consecutive cuts, merged until each holds at least one token on both sides. Every token lies in
exactly one group, groups are in text order and cover the text exactly once, so a group's
probability on each side is the chain of its tokens' conditional probabilities over the same string.

Offsets are what a fast tokenizer reports (`return_offsets_mapping=True`), relative to the text:
    * a token that covers only part of a character (byte-level BPE splitting a multi-byte
      character) reports the whole character, so two neighbours overlap; no cut falls inside;
    * a token may skip characters (SentencePiece's "▁" marks a space the token does not report):
      the gap joins whichever group the cut positions give it;
    * a zero-width token joins the group at its position. Special tokens (BOS, EOS, end of turn)
      carry no text of the answer and are aligned by role by the caller, not passed here.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

from kd.errors import DataError


class AlignError(DataError):
    """Offsets that cannot be aligned (out of order, out of the text, or zero-width)."""


class Group(NamedTuple):
    """One aligned group: characters [start, end) of the text; tokens [a_start, a_end) of side a,
    [b_start, b_end) of side b (indices into each side's token list)."""

    start: int
    end: int
    a_start: int
    a_end: int
    b_start: int
    b_end: int


def _cuts(spans: Sequence[tuple[int, int]], length: int, side: str) -> list[bool]:
    """ok[x] for x in 0..length: True where no token of this side straddles position x."""
    inside = [0] * (length + 2)
    last = 0
    for i, (s, e) in enumerate(spans):
        if not 0 <= s <= e <= length:
            raise AlignError(f"{side} token {i} has offsets ({s}, {e}) outside the text of {length} characters")
        if s < last - 1:  # neighbours sharing one split character overlap by one; more is disorder
            raise AlignError(f"{side} token {i} at ({s}, {e}) starts before its predecessor ends ({last})")
        if s == e:  # zero width: straddles nothing
            continue
        last = max(last, e)
        inside[s + 1] += 1
        inside[e] -= 1
    ok, depth = [], 0
    for x in range(length + 1):
        depth += inside[x]
        ok.append(depth == 0)
    return ok


def align_by_offsets(a: Sequence[tuple[int, int]], b: Sequence[tuple[int, int]], length: int) -> list[Group]:
    """Groups of tokens of two tokenisations of one text of `length` characters (module doc).
    `a`, `b`: each token's (start, end) character offsets, in order. Both sides must have tokens."""
    if not a or not b:
        raise AlignError(f"cannot align {len(a)} with {len(b)} tokens: a text tokenised on one side only")
    ok_a, ok_b = _cuts(a, length, "a"), _cuts(b, length, "b")
    cuts = [x for x in range(1, length) if ok_a[x] and ok_b[x]] + [length]
    groups: list[Group] = []
    ia = ib = 0
    start = 0
    for cut in cuts:
        ja, jb = ia, ib
        end = cut == length  # the last group takes every token left, zero-width ones at the end included
        while ja < len(a) and (a[ja][0] < cut or end):
            ja += 1
        while jb < len(b) and (b[jb][0] < cut or end):
            jb += 1
        if ja == ia or jb == ib:  # empty on one side: extend to the next cut
            if cut == length and groups:  # the text ends in what one side skipped: join the last group
                g = groups.pop()
                groups.append(g._replace(end=length, a_end=ja, b_end=jb))
            continue
        groups.append(Group(start, cut, ia, ja, ib, jb))
        ia, ib, start = ja, jb, cut
    if ia != len(a) or ib != len(b) or not groups or groups[-1].end != length:
        raise AlignError(f"offsets do not cover the text: {ia} of {len(a)} and {ib} of {len(b)} tokens aligned")
    return groups


def offsets(tokenizer, text: str) -> list[tuple[int, int]]:
    """(start, end) character offsets of `text`'s tokens (no special tokens added), from a fast
    tokenizer; spans that reach beyond the text (a leading-space marker) are clipped to it."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return [(max(0, s), min(len(text), e)) for s, e in enc["offset_mapping"]]
