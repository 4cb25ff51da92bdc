"""Records -> two aligned tokenised views: teacher with the strategy instruction, student without.

Record schema (JSONL/JSON/Parquet rows, `save_to_disk` directories or a `datasets` dataset):
    {"system": "<strategy instruction, optional>", "prompt": "...", "response": "..."}
or  {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
or  {"conversations": [{"from": "system"|"human"|"gpt", "value": "..."}, ...]}   (ShareGPT)
    (a leading system message is the instruction; the conversation ends on an assistant turn).

Targets (`data.targets`): every assistant turn (`all_assistant`, the default) or only the last
(`last`). Alignment rule: both views render the same turns with the chat template; each trained
assistant turn is the text the template adds after the prompt up to that turn (the answer plus
its end-of-turn marker), tokenised on its own, once, so its ids are the same list in both views
and labels cover exactly those ids. The views differ only in the system message.

Length policy, per example, on the longer of the two views: first the oldest exchanges (a user
turn and the assistant answer that follows) are dropped whole, while more than one trained turn
is left; then the prompt of the last turn is cut from the left (never below
`data.min_prompt_tokens`), then its answer from the right; an example with nothing left is
dropped. Each is counted in the data summary.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from dataclasses import dataclass, field

from kd import templates
from kd.config import DataConfig
from kd.data.records import load_records, renamed, scratch_caching, to_conversation, to_messages
from kd.errors import DataError

def _system_views(system, erase, generic_system):
    teacher = [dict(role="system", content=system)] if system else []
    if not erase:
        return teacher, teacher
    return teacher, ([dict(role="system", content=generic_system)] if generic_system else [])


# A user message appended to find where the template ends an assistant turn mid-conversation.
_PROBE = "kd probe: where does the turn end?"


class _RewritesEarlierTurns(DataError):
    """Rendering a later turn changes the text of earlier ones (Qwen3 drops their <think> blocks)."""


def render_views(
    rec: dict, tokenizer, *, erase: bool, generic_system: str | None, where: str = "record"
) -> tuple[list[int], list[int], list[int]]:
    """The last assistant turn as the only target -> (teacher prompt ids, student prompt ids,
    response ids shared by both views)."""
    system, turns = to_conversation(rec, where)
    if not turns[-1]["content"].strip():
        raise DataError(f"{where}: empty response")
    t_sys, s_sys = _system_views(system, erase, generic_system)
    return _turn_views(t_sys, s_sys, turns, len(turns) - 1, tokenizer, where)


def _turn_views(t_sys: list, s_sys: list, turns: list[dict], k: int, tokenizer, where: str):
    """Assistant turn `k` of `turns` as the template renders it at that point of the conversation,
    in both views -> (teacher context ids, student context ids, the turn's ids)."""
    t_prompt, t_answer = turn_text(tokenizer, t_sys + turns, len(t_sys) + k, where)
    s_prompt, s_answer = (t_prompt, t_answer) if s_sys is t_sys else \
        turn_text(tokenizer, s_sys + turns, len(s_sys) + k, where)
    if t_answer != s_answer:
        raise DataError(f"{where}: the chat template renders the response differently in the two views")
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    t_ids = enc(t_prompt)
    s_ids = t_ids if s_prompt == t_prompt else enc(s_prompt)
    return t_ids, s_ids, enc(t_answer)


def turn_text(tokenizer, msgs: list[dict], k: int, where: str) -> tuple[str, str]:
    """Assistant message `k` as trained: (context, answer). The context is msgs[:k] rendered with
    the generation prompt, exactly what the model is given at inference; the answer is what
    rendering msgs[:k+1] adds after it, through the turn's end-of-turn marker. Text a template
    adds only after a whole conversation (Phi-3's trailing eos after <|end|>) and trailing
    whitespace are left out: each turn ends the way the template ends a turn that is followed by
    another. A template whose generation prompt is not how it renders the turn (DeepSeek-R1's
    opens <think>, which an answer without reasoning does not have) trains the turn as the
    template renders it after the bare context, its assistant header included."""
    prompt = templates.render(tokenizer, msgs[:k], where, add_generation_prompt=True)
    full = templates.render(tokenizer, msgs[:k + 1], where)
    if not full.startswith(prompt):
        bare = templates.render(tokenizer, msgs[:k], where)
        if not full.startswith(bare) or len(full) == len(bare):
            at = len(os.path.commonprefix([prompt, full]))
            raise DataError(f"{where}: the chat template renders assistant turn {_ordinal(msgs, k)} differently from "
                            f"the conversation before it (prompt: ...{prompt[max(0, at - 16):][:40]!r}, turn: "
                            f"...{full[max(0, at - 16):][:40]!r}); {_REMEDY}")
        prompt = bare
    answer = full[len(prompt):_end_of_turn(tokenizer, msgs[:k + 1], full, len(prompt), where)].rstrip()
    if not _renders_content(tokenizer, msgs, k, prompt, answer, where):
        raise DataError(f"{where}: the chat template leaves part of assistant turn {_ordinal(msgs, k)} out of the "
                        f"text it renders (DeepSeek-R1's original drops the reasoning up to </think>), so it "
                        f"would not be trained; {_REMEDY}")
    return prompt, answer


def _renders_content(tokenizer, msgs, k, prompt, answer, where) -> bool:
    """Whitespace aside, is all of message k's content in the answer, or in the answer and the
    generation prompt (DeepSeek-R1's training variant puts the reasoning's <think> there)?"""
    squash = lambda text: "".join(text.split())  # noqa: E731
    content = squash(str(msgs[k]["content"] or ""))
    if content in squash(answer):
        return True
    bare = templates.render(tokenizer, msgs[:k], where)
    return prompt.startswith(bare) and content in squash(prompt[len(bare):] + answer)


_REMEDY = ("use the template's training variant (trl ships them: chat_templates/*_training.jinja in its package) "
           "with data.chat_template=<path to the .jinja file>")


def _ordinal(msgs: list[dict], k: int) -> int:
    return sum(m["role"] == "assistant" for m in msgs[:k + 1])


def _end_of_turn(tokenizer, msgs: list[dict], full: str, start: int, where: str) -> int:
    """Where the last turn of `full` ends: where its rendering followed by a probe user message
    parts from `full`, moved back out of any special token the two part inside (<|im_end|> vs
    <|user|>), if what it leaves out of `full` is only special tokens and whitespace; else the end
    of `full` (a template that renders the turn itself differently once another follows)."""
    try:
        probed = templates.render(tokenizer, msgs + [dict(role="user", content=_PROBE)], where)
    except DataError:  # a template that refuses the probe has nothing to say about it
        return len(full)
    cut = len(os.path.commonprefix([full, probed]))
    if cut >= len(full):
        return len(full)
    specials = _special_strings(tokenizer)
    moved = True
    while moved:
        moved = False
        for tok in specials:
            i = full.find(tok, max(start, cut - len(tok) + 1), cut + len(tok) - 1)
            if 0 <= i < cut < i + len(tok):
                cut, moved = i, True
    rest = full[cut:]
    for tok in specials:
        rest = rest.replace(tok, "")
    return cut if cut > start and not rest.strip() else len(full)


def _special_strings(tokenizer) -> list[str]:
    found = set(tokenizer.all_special_tokens)
    found.update(t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special)
    return sorted((t for t in found if t), key=len, reverse=True)


def segments(msgs: list[dict], tokenizer, where: str) -> list[tuple[str, str]]:
    """One view's conversation as (context, assistant turn) text pairs, each turn as turn_text
    gives it, when each turn's context starts with everything before it; trailing whitespace
    after an end-of-turn marker goes to the next context."""
    out, prev = [], ""
    for k, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prompt, answer = turn_text(tokenizer, msgs, k, where)
        if not prompt.startswith(prev):
            raise _RewritesEarlierTurns(f"{where}: the chat template rewrites earlier turns")
        out.append((prompt[len(prev):], answer))
        prev = prompt + answer
    return out


@dataclass
class Views:
    """Two token views of one example and where its trained turns sit in each."""

    teacher_ids: list[int] = field(default_factory=list)
    student_ids: list[int] = field(default_factory=list)
    teacher_starts: list[int] = field(default_factory=list)
    student_starts: list[int] = field(default_factory=list)
    target_lens: list[int] = field(default_factory=list)

    def add(self, t_ctx: list[int], s_ctx: list[int], target: list[int]) -> None:
        self.teacher_ids += t_ctx
        self.student_ids += s_ctx
        self.teacher_starts.append(len(self.teacher_ids))
        self.student_starts.append(len(self.student_ids))
        self.target_lens.append(len(target))
        self.teacher_ids += target
        self.student_ids += target

    def row(self) -> dict:
        return dict(teacher_ids=self.teacher_ids, student_ids=self.student_ids, teacher_starts=self.teacher_starts,
                    student_starts=self.student_starts, target_lens=self.target_lens,
                    n_response=sum(self.target_lens))


def example_from_views(t_prompt: list[int], s_prompt: list[int], response: list[int]) -> dict:
    """A single-target example (what render_views returns) in the batch format."""
    v = Views()
    v.add(t_prompt, s_prompt, response)
    return v.row()


def conversation_rows(rec: dict, tokenizer, *, erase: bool, generic_system: str | None, targets: str,
                      max_length: int, min_prompt: int, where: str = "record") -> tuple[list[dict], dict]:
    """-> (example rows, none if nothing fits; {"truncated", "turns_dropped", "per_turn"}) under the
    module's length policy. One row holds every trained turn, unless the template rewrites earlier
    turns once a later one follows (Qwen3's originals drop earlier reasoning): then each trained
    turn is a row of its own, its context rendered the way the template renders the conversation
    up to that turn, which is what the model sees at inference."""
    system, turns = to_conversation(rec, where)
    t_sys, s_sys = _system_views(system, erase, generic_system)
    answers = [k for k, m in enumerate(turns) if m["role"] == "assistant"]
    cache: dict[str, list[int]] = {}

    def enc(text):
        if text not in cache:
            cache[text] = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        return cache[text]

    dropped = 0
    while True:
        first = answers[dropped - 1] + 1 if dropped else 0  # after the `dropped` oldest exchanges
        keep, left = turns[first:], len(answers) - dropped
        if targets == "last" or left == 1:
            # one trained turn: the context before it is tokenised whole, as for single-turn records
            t_p, s_p, r = _turn_views(t_sys, s_sys, keep, len(keep) - 1, tokenizer, where)
            if max(len(t_p), len(s_p)) + len(r) > max_length and left > 1:
                dropped += 1
                continue
            fitted = fit_length(t_p, s_p, r, max_length, min_prompt)
            how = {"truncated": dropped > 0, "turns_dropped": dropped, "per_turn": False}
            if fitted is None:
                return [], {**how, "truncated": False}
            v = Views()
            v.add(*fitted)
            how["truncated"] |= tuple(map(len, fitted)) != (len(t_p), len(s_p), len(r))
            return [v.row()], how
        try:
            t_seg = segments(t_sys + keep, tokenizer, where)
            s_seg = t_seg if s_sys is t_sys else segments(s_sys + keep, tokenizer, where)
        except _RewritesEarlierTurns:
            return _per_turn_rows(t_sys, s_sys, turns, tokenizer, max_length, min_prompt, where)
        if [a for _, a in t_seg] != [a for _, a in s_seg]:
            raise DataError(f"{where}: the chat template renders the assistant turns differently in the two views")
        v = Views()
        for (t_ctx, answer), (s_ctx, _) in zip(t_seg, s_seg):
            v.add(enc(t_ctx), enc(s_ctx), enc(answer))
        if max(len(v.teacher_ids), len(v.student_ids)) > max_length:
            dropped += 1
            continue
        return [v.row()], {"truncated": dropped > 0, "turns_dropped": dropped, "per_turn": False}


def _per_turn_rows(t_sys, s_sys, turns, tokenizer, max_length, min_prompt, where) -> tuple[list[dict], dict]:
    """One single-target row per assistant turn, each fitted alone (its context cut from the left)."""
    rows, truncated, lost = [], False, 0
    for k, m in enumerate(turns):
        if m["role"] != "assistant":
            continue
        t_p, s_p, r = _turn_views(t_sys, s_sys, turns, k, tokenizer, where)
        fitted = fit_length(t_p, s_p, r, max_length, min_prompt)
        if fitted is None:
            lost += 1
            continue
        v = Views()
        v.add(*fitted)
        rows.append(v.row())
        truncated |= tuple(map(len, fitted)) != (len(t_p), len(s_p), len(r))
    return rows, {"truncated": truncated, "turns_dropped": lost, "per_turn": True}


def fit_length(
    t_prompt: list[int], s_prompt: list[int], response: list[int], max_length: int, min_prompt: int
) -> tuple[list[int], list[int], list[int]] | None:
    """Cut prompts from the left first (never below `min_prompt` tokens), then the response from
    the right; the same response tokens survive in both views. None if no response token fits."""
    floor = max(min(len(t_prompt), min_prompt), min(len(s_prompt), min_prompt), 1)
    keep = min(len(response), max_length - floor)
    if keep <= 0 or not t_prompt or not s_prompt:
        return None
    room = max_length - keep
    return t_prompt[-room:], s_prompt[-room:], response[:keep]


def erase_coin(seed: int, index: int, p: float) -> bool:
    """Per-example erasure decision, a pure function of (seed, index): stable across resumes."""
    if p >= 1.0:
        return True
    if p <= 0.0:
        return False
    return random.Random(f"erase-{seed}-{index}").random() < p


@dataclass
class DataStats:
    examples: int
    dropped: Counter
    truncated: int
    erased: int
    turns_dropped: int = 0
    target_tokens: int = 0
    per_turn: int = 0  # conversations trained one row per turn (their template rewrites earlier turns)
    store: str = "off"  # where the views came from: "off" (built in memory), "read" or "built" (the store)

    def summary(self, name: str) -> str:
        s = (f"{name}: {self.examples} examples, {self.target_tokens} target tokens, {self.erased} with the "
             f"instruction erased, {self.truncated} truncated")
        if self.turns_dropped:
            s += f" ({self.turns_dropped} oldest exchanges dropped to fit)"
        if self.per_turn:
            s += (f", {self.per_turn} conversations one example per assistant turn (the chat template rewrites "
                  f"earlier turns)")
        if self.dropped:
            s += ", dropped " + ", ".join(f"{n} ({why})" for why, n in sorted(self.dropped.items()))
        return s

    def to_json(self) -> dict:
        return {**self.__dict__, "dropped": dict(self.dropped)}

    @classmethod
    def from_json(cls, d: dict) -> "DataStats":
        return cls(**{**d, "dropped": Counter(d["dropped"])})


# a conversation served one row per turn gives its rows ids idx + j * 2**40 (j = 0 keeps idx)
_TURN_ID = 1 << 40


def tokenize_dataset(records, tokenizer, cfg: DataConfig, seed: int, num_proc=None, keep_in_memory=True):
    """datasets.Dataset of records -> tokenised views (+ stats). Dropped rows are counted, not hidden."""
    p_erase = cfg.erase_probability
    columns = ["example_id", *Views().row(), "erased", "truncated", "turns_dropped", "per_turn", "drop"]

    def one(rec, idx) -> list[dict]:
        # the record's counts ride on its first row only, so per-turn rows do not multiply them
        where = f"{rec['_source']} row {rec['_row']}"
        erased = erase_coin(seed, idx, p_erase)
        system, prompt_msgs, response = to_messages(rec, where)
        out = dict(example_id=idx, **Views().row(), erased=erased and bool(system),  # no instruction, none erased
                   truncated=False, turns_dropped=0, per_turn=False, drop="")
        if not response.strip():  # unusable rows are dropped and counted, like rows that do not fit
            return [{**out, "drop": "empty response"}]
        if not any(str(m["content"]).strip() for m in prompt_msgs):
            return [{**out, "drop": "empty prompt"}]
        rows, how = conversation_rows(rec, tokenizer, erase=erased, generic_system=cfg.generic_system,
                                      targets=cfg.targets, max_length=cfg.max_length,
                                      min_prompt=cfg.min_prompt_tokens, where=where)
        if not rows:
            return [{**out, "drop": "response does not fit data.max_length"}]
        first = {**out, **rows[0], **how}
        rest = [dict(example_id=idx + j * _TURN_ID, **row, erased=False, truncated=False, turns_dropped=0,
                     per_turn=False, drop="") for j, row in enumerate(rows[1:], 1)]
        return [first, *rest]

    def fn(batch, indices):
        rows = [r for i, idx in enumerate(indices) for r in one({k: v[i] for k, v in batch.items()}, idx)]
        return {c: [r[c] for r in rows] for c in columns}

    try:
        ds = records.map(fn, with_indices=True, batched=True, batch_size=64, remove_columns=records.column_names,
                         num_proc=num_proc, keep_in_memory=keep_in_memory, desc="tokenising")
    except DataError:
        raise
    except Exception as e:  # datasets wraps errors raised in worker processes
        cause = e
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__
            if isinstance(cause, DataError):
                raise cause from None
        raise
    drops = Counter(d for d in ds["drop"] if d)
    kept = ds.filter(lambda d: not d, input_columns="drop", keep_in_memory=keep_in_memory) if drops else ds
    stats = DataStats(len(kept), drops, sum(kept["truncated"]), sum(kept["erased"]), sum(kept["turns_dropped"]),
                      sum(kept["n_response"]), sum(kept["per_turn"]))
    kept = kept.remove_columns(["drop", "truncated", "erased", "turns_dropped", "per_turn"])
    return kept, stats


def split_eval(records, fraction: float, seed: int, shuffle: bool):
    """Hold out `fraction` of the records (a seeded choice). The training part keeps file order
    when data.shuffle is false; otherwise it is the permuted order train_test_split gives."""
    if shuffle:
        split = records.train_test_split(test_size=fraction, seed=seed, shuffle=True)
        return split["train"], split["test"]
    import numpy as np

    n = len(records)
    n_eval = max(1, int(np.ceil(fraction * n)))
    chosen = np.random.default_rng(seed).permutation(n)[:n_eval]
    is_eval = np.zeros(n, dtype=bool)
    is_eval[chosen] = True
    return records.select(np.flatnonzero(~is_eval)), records.select(np.flatnonzero(is_eval))


def build_datasets(cfg: DataConfig, tokenizer, seed: int, log=print):
    """-> (train, eval or None, train stats, eval stats or None): from the on-disk store of
    tokenised views (kd.data.store; built there once), or in memory with data.store=off."""
    from kd.data import store

    if store.store_root(cfg) is None:
        return _build(cfg, tokenizer, seed, keep_in_memory=True)
    built = []

    def build():
        built.append(True)
        return _build(cfg, tokenizer, seed, keep_in_memory=False)

    train, evald, train_stats, eval_stats = store.tokenised(cfg, tokenizer, seed, build, log)
    train_stats = DataStats.from_json({**train_stats, "store": "built" if built else "read"})
    return train, evald, train_stats, eval_stats and DataStats.from_json(eval_stats)


def _build(cfg: DataConfig, tokenizer, seed: int, keep_in_memory: bool):
    with scratch_caching():  # nothing is written beside the user's input files
        return _build_views(cfg, tokenizer, seed, keep_in_memory)


def _build_views(cfg: DataConfig, tokenizer, seed: int, keep_in_memory: bool):
    train_recs = renamed(load_records(cfg.train_files, cfg.dataset, cfg.dataset_config, cfg.train_split), cfg.columns)
    eval_recs = None
    if cfg.eval_files:
        eval_recs = renamed(load_records(cfg.eval_files, split=cfg.eval_split or "test"), cfg.columns)
    elif cfg.dataset and cfg.eval_split and not cfg.train_files:
        eval_recs = renamed(load_records(None, cfg.dataset, cfg.dataset_config, cfg.eval_split), cfg.columns)
    sources = [train_recs] + ([eval_recs] if eval_recs is not None else [])
    if eval_recs is None and cfg.eval_fraction > 0 and len(train_recs) > 1:
        train_recs, eval_recs = split_eval(train_recs, cfg.eval_fraction, seed, cfg.shuffle)
    try:
        return _tokenised(cfg, tokenizer, seed, keep_in_memory, train_recs, eval_recs)
    except DataError:
        # the rows were shuffled for the hold-out and tokenised by several workers: name the
        # sources' own first bad row, not whichever one failed first
        for recs in sources:
            first_bad_row(recs)
        raise


def first_bad_row(records) -> None:
    """Raise the DataError of the first record, in file order, that the schema refuses."""
    for rec in records:
        to_conversation(rec, f"{rec['_source']} row {rec['_row']}")


def _tokenised(cfg: DataConfig, tokenizer, seed: int, keep_in_memory: bool, train_recs, eval_recs):
    train, train_stats = tokenize_dataset(train_recs, tokenizer, cfg, seed, cfg.num_proc, keep_in_memory)
    if len(train) == 0:
        raise DataError("no training example survives tokenisation: " + train_stats.summary("train"))
    if eval_recs is None:
        return train, None, train_stats, None
    # eval views use seed+1 coins so they are not correlated with the training coins
    evald, eval_stats = tokenize_dataset(eval_recs, tokenizer, cfg, seed + 1, cfg.num_proc, keep_in_memory)
    if len(evald) == 0:  # an empty eval set would report perfect scores; say so instead
        raise DataError("no eval example survives tokenisation: " + eval_stats.summary("eval")
                        + "; fix the eval data, or turn eval off with data.eval_fraction=0 and no data.eval_files")
    return train, evald, train_stats, eval_stats
