"""Prompt records for generation: read any record format kd.train reads (with file:line in every
error), the conversation to answer (up to its last user turn) under a system mode, and the record
with its answer written back in its own style."""

from __future__ import annotations

import json
from pathlib import Path

from kd.errors import DataError

SYSTEM_MODES = ("strategy", "generic", "none")
# The system message of `--system generic`: the usual neutral assistant line (the demo data uses
# the same text for its erased student view).
GENERIC_SYSTEM = "You are a helpful assistant."


def read_records(path: str, limit: int | None = None, required: tuple[str, ...] = (),
                 validate=None, split: str = "train") -> list[dict]:
    """Records from `path`, the first `limit` if given: JSONL read line by line (blank lines
    skipped), or .json / .parquet / a save_to_disk directory through kd.data's loader.

    Every record must be a JSON object whose `required` fields are strings and whose `system`,
    if present, is a string or null; `validate(record)` may return a further complaint. Errors
    are DataErrors naming the file and line (row). `split` is the one taken from a DatasetDict.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"input file not found: {path}")
    out: list[dict] = []
    for where, rec in _rows(p, limit, split):
        if not isinstance(rec, dict):
            raise DataError(f"{where}: each line must be a JSON object")
        for key in required:
            if not isinstance(rec.get(key), str):
                what = "missing" if rec.get(key) is None else "not a string:"
                raise DataError(f"{where}: {what} '{key}'")
        if rec.get("system") is not None and not isinstance(rec["system"], str):
            raise DataError(f"{where}: 'system' must be a string")
        problem = validate(rec) if validate else None
        if problem:
            raise DataError(f"{where}: {problem}")
        out.append(rec)
    if not out:
        raise DataError(f"{path}: no records")
    return out


def _rows(p: Path, limit: int | None, split: str):
    if p.suffix == ".jsonl" and p.is_file():
        from kd.data.records import text_problem

        if problem := text_problem(p):
            raise DataError(problem)
        with open(p, encoding="utf-8") as fh:
            n = 0
            for lineno, line in enumerate(fh, 1):
                if limit is not None and n >= limit:
                    return
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{p}:{lineno}: invalid JSON ({e.msg})") from None
                n += 1
                yield f"{p}:{lineno}", rec
        return
    from kd.data.records import load_records

    ds = load_records([str(p)], split=split)
    for i in range(len(ds) if limit is None else min(limit, len(ds))):
        row = ds[i]
        where = f"{row.pop('_source')}:{row.pop('_row')}"
        yield where, {k: v for k, v in row.items() if v is not None or k == "system"}


def prompt_conversation(record: dict, where: str = "record") -> tuple[str | None, list[dict]]:
    """-> (strategy instruction or None, the turns to answer: up to and including the last user
    turn). Any record kd.train reads; a prompt record needs no response, and a conversation may end
    on the user turn to answer (one ending on an assistant turn has that turn answered anew)."""
    from kd.data.records import ROLES, to_conversation

    msgs = record.get("messages") if record.get("messages") is not None else record.get("conversations")
    if msgs is None:
        if isinstance(record.get("prompt"), str) and record.get("response") is None:
            record = {**record, "response": ""}
        system, turns = to_conversation(record, where)
        return system, turns[:-1]
    last = msgs[-1] if isinstance(msgs, list) and msgs else None
    role = last.get("role", last.get("from")) if isinstance(last, dict) else None
    if isinstance(role, str) and ROLES.get(role.lower()) == "user":  # the turn to answer is the last
        record = {**record, "messages": [*msgs, {"role": "assistant", "content": ""}]}
    system, turns = to_conversation(record, where)
    return system, turns[:-1]


def _promptable(record: dict) -> str | None:
    try:
        prompt_conversation(record, "@")
    except DataError as e:
        return str(e).removeprefix("@: ")
    return None


def read_prompts(path: str, limit: int | None = None) -> list[dict]:
    """read_records for generation: each record must give a conversation to answer."""
    return read_records(path, limit, validate=_promptable)


def with_response(record: dict, text: str) -> dict:
    """The record with `text` as its answer: `response` for a prompt record, the last assistant
    turn (replaced, or appended after the final user turn) for a conversation, in its own style."""
    key = "messages" if record.get("messages") is not None else "conversations" if record.get("conversations") \
        is not None else None
    if key is None:
        return {**record, "response": text}
    from kd.data.records import ROLES

    msgs = [dict(m) for m in record[key]]
    sharegpt = "from" in msgs[-1]
    role = ROLES.get(str(msgs[-1].get("from" if sharegpt else "role")).lower())
    if role == "assistant":
        msgs[-1]["value" if sharegpt else "content"] = text
    else:
        msgs.append({"from": "gpt", "value": text} if sharegpt else {"role": "assistant", "content": text})
    return {**record, key: msgs}


def prompt_messages(record: dict, system_mode: str) -> list[dict]:
    """Chat messages up to the user turn to answer. `strategy` uses the record's own instruction
    (no system message if it has none), `generic` uses GENERIC_SYSTEM, `none` drops it."""
    if system_mode not in SYSTEM_MODES:
        raise ValueError(f"system_mode must be one of {SYSTEM_MODES}, got {system_mode!r}")
    own, turns = prompt_conversation(record)
    system = {"strategy": own or None, "generic": GENERIC_SYSTEM, "none": None}[system_mode]
    return ([dict(role="system", content=system)] if system else []) + turns
