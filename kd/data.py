"""Records -> two aligned views (teacher with the strategy instruction, student without) -> batches.

Record schema (JSONL/JSON/Parquet rows or a `datasets` dataset):
    {"system": "<strategy instruction, optional>", "prompt": "...", "response": "..."}
or  {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
    (the last message is the assistant response; a leading system message is the instruction).

Alignment rule: both views are rendered with the chat template; the text the template adds after
the prompt (the response plus its end-of-turn marker) is tokenised on its own, once, so the
response ids are the same list in both views and labels cover exactly those ids.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from kd.config import DataConfig
from kd.errors import DataError

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


# --------------------------------------------------------------------------- records


def _to_messages(rec: dict, where: str) -> tuple[str | None, list[dict], str]:
    """-> (strategy system message or None, the other prompt messages, response text)."""
    msgs = rec.get("messages")
    if msgs:
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
            raise DataError(f"{where}: 'messages' must be a list of {{role, content}} objects")
        if msgs[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message must be the assistant response")
        system = msgs[0]["content"] if msgs[0]["role"] == "system" else None
        rest = msgs[1:-1] if system is not None else msgs[:-1]
        if not any(m["role"] == "user" for m in rest):
            raise DataError(f"{where}: 'messages' has no user message")
        return system, [dict(role=m["role"], content=m["content"]) for m in rest], msgs[-1]["content"]
    for key in ("prompt", "response"):
        if not isinstance(rec.get(key), str):
            what = "missing" if rec.get(key) is None else "not a string:"
            raise DataError(f"{where}: {what} '{key}' (need prompt+response or messages)")
    system = rec.get("system")
    if system is not None and not isinstance(system, str):
        raise DataError(f"{where}: 'system' must be a string")
    return system or None, [dict(role="user", content=rec["prompt"])], rec["response"]


def render_views(
    rec: dict, tokenizer, *, erase: bool, generic_system: str | None, where: str = "record"
) -> tuple[list[int], list[int], list[int]]:
    """-> (teacher prompt ids, student prompt ids, response ids shared by both views)."""
    system, prompt_msgs, response = _to_messages(rec, where)
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


def load_records(files: list[str] | None = None, dataset: str | None = None, config_name=None, split="train"):
    """Local files (each tagged with its name for error messages) or a `datasets` name."""
    import datasets

    if files:
        parts = []
        for f in files:
            path = Path(f)
            if not path.is_file():
                raise DataError(f"data file not found: {f}")
            builder = _BUILDERS.get(path.suffix)
            if builder is None:
                raise DataError(f"{f}: unsupported file type (use .jsonl, .json or .parquet)")
            try:
                ds = datasets.load_dataset(builder, data_files=str(path), split="train")
            except Exception as e:
                raise DataError(_diagnose(path, e)) from None
            if len(ds) == 0:
                raise DataError(f"{f}: no records")
            n = len(ds)
            ds = ds.add_column("_source", [str(f)] * n).add_column("_row", list(range(1, n + 1)))
            parts.append(ds)
        return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    if dataset:
        try:
            ds = datasets.load_dataset(dataset, config_name, split=split)
        except Exception as e:
            raise DataError(f"cannot load dataset {dataset!r} split {split!r}: {str(e).splitlines()[0]}") from None
        n = len(ds)
        return ds.add_column("_source", [f"{dataset}[{split}]"] * n).add_column("_row", list(range(n)))
    raise DataError("no training data: set data.train_files or data.dataset")


def _diagnose(path: Path, exc: Exception) -> str:
    """Find the first malformed JSON line so the message names it (datasets' own error does not)."""
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8", errors="replace") as fh:
            for i, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    return f"{path}:{i}: invalid JSON ({e.msg})"
                if not isinstance(obj, dict):
                    return f"{path}:{i}: each line must be a JSON object"
    return f"{path}: cannot read records ({str(exc).splitlines()[0][:200]})"


# --------------------------------------------------------------------------- tokenised dataset


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
        t, s, r = render_views(rec, tokenizer, erase=erased, generic_system=cfg.generic_system, where=where)
        fitted = fit_length(t, s, r, cfg.max_length, cfg.min_prompt_tokens)
        out = dict(example_id=idx, teacher_ids=[], student_ids=[], teacher_start=0, student_start=0, n_response=0,
                   erased=erased, truncated=False, drop="")
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


def _renamed(records, columns: dict[str, str]):
    """Map source column names onto the schema's (`data.columns`: schema name -> source name)."""
    missing = [src for src in columns.values() if src not in records.column_names]
    if missing:
        raise DataError(f"data.columns: no column {missing[0]!r} in the data (has {', '.join(records.column_names)})")
    return records.rename_columns({src: dst for dst, src in columns.items() if src != dst})


def build_datasets(cfg: DataConfig, tokenizer, seed: int):
    """-> (train, eval or None, train stats, eval stats or None)."""
    train_recs = _renamed(load_records(cfg.train_files, cfg.dataset, cfg.dataset_config, cfg.train_split), cfg.columns)
    eval_recs = None
    if cfg.eval_files:
        eval_recs = _renamed(load_records(cfg.eval_files), cfg.columns)
    elif cfg.dataset and cfg.eval_split and not cfg.train_files:
        eval_recs = _renamed(load_records(None, cfg.dataset, cfg.dataset_config, cfg.eval_split), cfg.columns)
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
    return train, evald, train_stats, eval_stats


# --------------------------------------------------------------------------- batching


def collate(examples: list[dict], pad_id: int, keep: list[bool] | None = None) -> dict:
    """Right-pad each view; flat indices of the positions that predict response tokens, aligned
    1:1 between views. `keep[i] = False` runs example i through the models but contributes no
    tokens (used to give every rank the same number of forwards)."""
    keep = keep or [True] * len(examples)
    out = {}
    for view in ("teacher", "student"):
        seqs = [e[f"{view}_ids"] for e in examples]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        index = []
        for b, (seq, e, k) in enumerate(zip(seqs, examples, keep)):
            ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[b, : len(seq)] = 1
            if k:
                start = e[f"{view}_start"]
                # position t predicts token t+1: the response [start, start+n) is predicted from
                # positions [start-1, start+n-1)
                index.append(torch.arange(start - 1, start - 1 + e["n_response"]) + b * width)
        out[f"{view}_input_ids"] = ids
        out[f"{view}_attention_mask"] = mask
        out[f"{view}_index"] = torch.cat(index) if index else torch.zeros(0, dtype=torch.long)
    labels = [torch.tensor(e["student_ids"][e["student_start"]:], dtype=torch.long) for e, k in zip(examples, keep) if k]
    out["labels"] = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
    # which examples the label rows come from (in order), e.g. to look up cached teacher outputs
    out["example_ids"] = torch.tensor([e.get("example_id", -1) for e, k in zip(examples, keep) if k], dtype=torch.long)
    out["n_response"] = torch.tensor([e["n_response"] for e, k in zip(examples, keep) if k], dtype=torch.long)
    return out


class MicroBatchSampler:
    """Micro-batch k of this rank, as a pure function of k.

    Each epoch is a seeded permutation; global micro-batch j of the epoch is the slice
    [j*B*W, (j+1)*B*W) and rank r takes its r-th block of B. One optimizer step consumes the same
    examples whatever the split into micro-batch size, accumulation and ranks, and resuming only
    needs k. An epoch is a whole number of optimizer steps (so epoch boundaries fall on the same
    step for every split); its incomplete tail is skipped, and every rank runs the same forwards.
    """

    def __init__(self, n: int, micro_batch_size: int, world_size: int = 1, rank: int = 0, seed: int = 0,
                 shuffle: bool = True, accum: int = 1):
        self.n, self.mb, self.world, self.rank, self.seed, self.shuffle = n, micro_batch_size, world_size, rank, seed, shuffle
        self.per_epoch = n // (micro_batch_size * world_size * accum) * accum
        if self.per_epoch == 0:
            raise DataError(f"only {n} training examples, fewer than one optimizer step's global batch "
                            f"({micro_batch_size} x {accum} accumulation x {world_size} processes)")
        self._epoch, self._perm = None, None

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                self._perm = torch.randperm(self.n, generator=g).tolist()
            else:
                self._perm = list(range(self.n))
            self._epoch = epoch
        return self._perm

    def indices(self, k: int) -> list[int]:
        epoch, j = divmod(k, self.per_epoch)
        start = (j * self.world + self.rank) * self.mb
        return self._permutation(epoch)[start : start + self.mb]

    def epoch_of(self, k: int) -> float:
        return k / self.per_epoch


class _Stream(torch.utils.data.Sampler):
    def __init__(self, sampler: MicroBatchSampler, start: int, stop: int):
        self.sampler, self.start, self.stop = sampler, start, stop

    def __iter__(self):
        return (self.sampler.indices(k) for k in range(self.start, self.stop))

    def __len__(self):
        return self.stop - self.start


def train_loader(dataset, sampler: MicroBatchSampler, pad_id: int, start: int, stop: int):
    """Micro-batches start..stop-1 of this rank (a DataLoader, so workers/pinning can be added)."""
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=_Stream(sampler, start, stop), collate_fn=lambda ex: collate(ex, pad_id)
    )


def eval_batches(dataset, micro_batch_size: int, world_size: int, rank: int, pad_id: int, max_batches: int = 0):
    """This rank's share of the eval set, in order. Every rank yields the same number of batches;
    a rank with nothing left re-runs example 0 with no tokens counted."""
    n = len(dataset)
    per_step = micro_batch_size * world_size
    n_batches = -(-n // per_step)
    if max_batches:
        n_batches = min(n_batches, max_batches)
    for j in range(n_batches):
        idx = [j * per_step + rank * micro_batch_size + i for i in range(micro_batch_size)]
        keep = [i < n for i in idx]
        if not any(keep):
            keep, idx = [False], [0]
        else:
            idx = [i for i, k in zip(idx, keep) if k]
            keep = [True] * len(idx)
        yield collate([dataset[i] for i in idx], pad_id, keep)
