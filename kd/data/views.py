"""Records -> two aligned tokenised views: teacher with the strategy instruction, student without.

Record schema (JSONL/JSON/Parquet rows or a `datasets` dataset):
    {"system": "<strategy instruction, optional>", "prompt": "...", "response": "..."}
or  {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
    (the last message is the assistant response; a leading system message is the instruction).

Alignment rule: both views are rendered with the chat template; the text the template adds after
the prompt (the response plus its end-of-turn marker) is tokenised on its own, once, so the
response ids are the same list in both views and labels cover exactly those ids.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from kd.config import DataConfig
from kd.data.records import load_records, renamed, to_messages
from kd.errors import DataError


def render_views(
    rec: dict, tokenizer, *, erase: bool, generic_system: str | None, where: str = "record"
) -> tuple[list[int], list[int], list[int]]:
    """-> (teacher prompt ids, student prompt ids, response ids shared by both views)."""
    system, prompt_msgs, response = to_messages(rec, where)
    if not response.strip():
        raise DataError(f"{where}: empty response")
    teacher_msgs = ([dict(role="system", content=system)] if system else []) + prompt_msgs
    if erase:
        student_msgs = ([dict(role="system", content=generic_system)] if generic_system else []) + prompt_msgs
    else:
        student_msgs = teacher_msgs
    answer = dict(role="assistant", content=response)

    def render(msgs):
        prompt = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(msgs + [answer], tokenize=False)
        if not full.startswith(prompt):
            raise DataError(f"{where}: the chat template does not render the prompt as a prefix of the conversation")
        # trailing whitespace after the end-of-turn marker (ChatML's newline) is never generated
        return prompt, full[len(prompt):].rstrip()

    t_prompt, t_tail = render(teacher_msgs)
    s_prompt, s_tail = (t_prompt, t_tail) if student_msgs is teacher_msgs else render(student_msgs)
    if t_tail != s_tail:
        raise DataError(f"{where}: the chat template renders the response differently in the two views")
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    t_ids = enc(t_prompt)
    s_ids = t_ids if s_prompt == t_prompt else enc(s_prompt)
    return t_ids, s_ids, enc(t_tail)


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

    def summary(self, name: str) -> str:
        s = f"{name}: {self.examples} examples, {self.erased} with the instruction erased, {self.truncated} truncated"
        if self.dropped:
            s += ", dropped " + ", ".join(f"{n} ({why})" for why, n in sorted(self.dropped.items()))
        return s


def tokenize_dataset(records, tokenizer, cfg: DataConfig, seed: int, num_proc=None):
    """datasets.Dataset of records -> tokenised views (+ stats). Dropped rows are counted, not hidden."""
    p_erase = cfg.erase_probability

    def fn(rec, idx):
        where = f"{rec['_source']} row {rec['_row']}"
        erased = erase_coin(seed, idx, p_erase)
        out = dict(example_id=idx, teacher_ids=[], student_ids=[], teacher_start=0, student_start=0, n_response=0,
                   erased=erased, truncated=False, drop="")
        _, prompt_msgs, response = to_messages(rec, where)
        if not response.strip():  # unusable rows are dropped and counted, like rows that do not fit
            out["drop"] = "empty response"
            return out
        if not any(str(m["content"]).strip() for m in prompt_msgs):
            out["drop"] = "empty prompt"
            return out
        t, s, r = render_views(rec, tokenizer, erase=erased, generic_system=cfg.generic_system, where=where)
        fitted = fit_length(t, s, r, cfg.max_length, cfg.min_prompt_tokens)
        if fitted is None:
            out["drop"] = "response does not fit data.max_length"
            return out
        t2, s2, r2 = fitted
        out.update(teacher_ids=t2 + r2, student_ids=s2 + r2, teacher_start=len(t2), student_start=len(s2),
                   n_response=len(r2), truncated=(len(t2), len(s2), len(r2)) != (len(t), len(s), len(r)))
        return out

    try:
        ds = records.map(fn, with_indices=True, remove_columns=records.column_names, num_proc=num_proc,
                         keep_in_memory=True, desc="tokenising")
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
    kept = ds.filter(lambda d: not d, input_columns="drop", keep_in_memory=True) if drops else ds
    stats = DataStats(len(kept), drops, sum(kept["truncated"]), sum(kept["erased"]))
    kept = kept.remove_columns(["drop", "truncated", "erased"])
    return kept, stats



def build_datasets(cfg: DataConfig, tokenizer, seed: int):
    """-> (train, eval or None, train stats, eval stats or None)."""
    train_recs = renamed(load_records(cfg.train_files, cfg.dataset, cfg.dataset_config, cfg.train_split), cfg.columns)
    eval_recs = None
    if cfg.eval_files:
        eval_recs = renamed(load_records(cfg.eval_files), cfg.columns)
    elif cfg.dataset and cfg.eval_split and not cfg.train_files:
        eval_recs = renamed(load_records(None, cfg.dataset, cfg.dataset_config, cfg.eval_split), cfg.columns)
    elif cfg.eval_fraction > 0 and len(train_recs) > 1:
        split = train_recs.train_test_split(test_size=cfg.eval_fraction, seed=seed, shuffle=True)
        train_recs, eval_recs = split["train"], split["test"]
    train, train_stats = tokenize_dataset(train_recs, tokenizer, cfg, seed, cfg.num_proc)
    if len(train) == 0:
        raise DataError("no training example survives tokenisation: " + train_stats.summary("train"))
    if eval_recs is None:
        return train, None, train_stats, None
    # eval views use seed+1 coins so they are not correlated with the training coins
    evald, eval_stats = tokenize_dataset(eval_recs, tokenizer, cfg, seed + 1, cfg.num_proc)
    if len(evald) == 0:  # an empty eval set would report perfect scores; say so instead
        raise DataError("no eval example survives tokenisation: " + eval_stats.summary("eval")
                        + "; fix the eval data, or turn eval off with data.eval_fraction=0 and no data.eval_files")
    return train, evald, train_stats, eval_stats
