"""Records from files or a `datasets` name, and their schema (see kd.data for both)."""

from __future__ import annotations

import contextlib
import glob
import json
import logging
from pathlib import Path

from kd.errors import DataError

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


# Role names seen in the wild (ShareGPT's human/gpt, OpenAI's user/assistant, ...) -> the template's.
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
         "bot": "assistant", "model": "assistant", "chatgpt": "assistant"}
# Column sets of well-known schemas, for the hint when a record lacks prompt/response/messages.
KNOWN_SCHEMAS = {
    ("system_prompt", "question", "response"): "{system: system_prompt, prompt: question}",  # OpenOrca
    ("instruction", "output"): "{prompt: instruction, response: output}",  # Alpaca
    ("instruction", "response"): "{prompt: instruction}",  # Dolly
    ("question", "answer"): "{prompt: question, response: answer}",
    ("chosen",): "{messages: chosen}",  # preference sets: the chosen conversation
}


def to_conversation(rec: dict, where: str) -> tuple[str | None, list[dict]]:
    """A record -> (strategy system message or None, the turns after it as {role, content}, ending
    on an assistant turn). Accepts {system?, prompt, response}, or `messages` / `conversations`
    lists of {role, content} or ShareGPT's {from, value}, with the role names of ROLES."""
    msgs = rec.get("messages") if rec.get("messages") is not None else rec.get("conversations")
    if msgs is not None:
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        turns = []
        for n, m in enumerate(msgs, 1):
            role = m.get("role", m.get("from")) if isinstance(m, dict) else None
            content = m.get("content", m.get("value")) if isinstance(m, dict) else None
            if not isinstance(role, str) or not isinstance(content, str):
                raise DataError(f"{where}: message {n} is not a {{role, content}} (or {{from, value}}) object")
            if role.lower() not in ROLES:
                raise DataError(f"{where}: message {n} has role {role!r} (known: {', '.join(sorted(ROLES))})")
            turns.append(dict(role=ROLES[role.lower()], content=content))
        system = turns[0]["content"] if turns[0]["role"] == "system" else None
        turns = turns[1:] if system is not None else turns
        if not turns or turns[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message must be an assistant turn")
        if turns[0]["role"] == "assistant":
            raise DataError(f"{where}: message {1 + (system is not None)} is an assistant turn before any user "
                            f"message; a conversation starts with a user message (after an optional system one)")
        if not any(m["role"] == "user" for m in turns):
            raise DataError(f"{where}: the conversation has no user message")
        return system, turns
    for key in ("prompt", "response"):
        if not isinstance(rec.get(key), str):
            what = "missing" if rec.get(key) is None else "not a string:"
            raise DataError(f"{where}: {what} '{key}' (need prompt+response, messages or conversations)"
                            + _schema_hint(rec, key))
    system = rec.get("system")
    if system is not None and not isinstance(system, str):
        raise DataError(f"{where}: 'system' must be a string")
    return system or None, [dict(role="user", content=rec["prompt"]), dict(role="assistant", content=rec["response"])]


def _schema_hint(rec: dict, key: str) -> str:
    """A mapping suggestion when the data has no `key` column at all (not when one row lacks a
    value the column has elsewhere)."""
    cols = {k for k in rec if not k.startswith("_")}
    if key in rec:
        return ""
    for known, mapping in KNOWN_SCHEMAS.items():
        if set(known) <= cols:
            return f"; the data has columns {', '.join(sorted(cols))}: map them with data.columns={mapping}"
    return f"; the data has columns {', '.join(sorted(cols))} (data.columns renames them)"


def to_messages(rec: dict, where: str) -> tuple[str | None, list[dict], str]:
    """-> (strategy system message or None, the messages before the last assistant turn, its text)."""
    system, turns = to_conversation(rec, where)
    return system, turns[:-1], turns[-1]["content"]


def expand_files(files: list[str]) -> list[str]:
    """data.*_files entries as the files (or save_to_disk directories) they stand for, as datasets'
    `data_files` allows: a glob is its sorted matches, a directory of data files its .jsonl, .json
    and .parquet files (recursively, sorted, hidden ones skipped); anything else is kept as given."""
    out: list[str] = []
    for f in files:
        if any(c in f for c in "*?["):
            matches = sorted(glob.glob(f, recursive=True))
            if not matches:
                raise DataError(f"no data file matches {f}")
        else:
            matches = [f]
        for m in matches:
            path = Path(m)
            if not path.is_dir() or saved_dataset(path):
                out.append(m)
                continue
            found = sorted(str(p) for p in path.rglob("*") if p.suffix in _BUILDERS and p.is_file()
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                raise DataError(f"{m}: a directory with no data files (.jsonl, .json, .parquet) that is not a "
                                f"dataset saved with save_to_disk either")
            out.extend(found)
    return out


def saved_dataset(path: Path) -> bool:
    """A directory `save_to_disk` wrote (a Dataset or a DatasetDict)."""
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def load_records(files: list[str] | None = None, dataset: str | None = None, config_name=None, split="train"):
    """Local files (each tagged with its name for error messages) or a `datasets` name."""
    import datasets

    if files:
        parts = []
        for f in expand_files(files):
            path = Path(f)
            if path.is_dir():
                parts.append(_from_disk(path, split))
                continue
            if not path.is_file():
                raise DataError(f"data file not found: {f}")
            builder = _BUILDERS.get(path.suffix)
            if builder is None:
                raise DataError(f"{f}: unsupported file type (use .jsonl, .json or .parquet)")
            if path.suffix != ".parquet" and (problem := text_problem(path)):
                raise DataError(problem)
            try:
                # datasets' own cache keys local files on path and mtime, and would serve the old rows
                # of an edit whose mtime was put back: parse into a fresh scratch directory instead
                with _quiet("datasets.packaged_modules.json.json"):  # its error line counts rows its own way
                    ds = datasets.load_dataset(builder, data_files=str(path), split="train",
                                               cache_dir=_scratch_dir())
            except Exception as e:
                raise DataError(_diagnose(path, e)) from None
            if len(ds) == 0:
                raise DataError(f"{f}: no records")
            n = len(ds)
            ds = ds.add_column("_source", [str(f)] * n).add_column("_row", list(range(1, n + 1)))
            parts.append(ds)
        return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    if dataset:
        if Path(dataset).is_dir() and saved_dataset(Path(dataset)):  # the path the user has: load it
            return _from_disk(Path(dataset), split)
        try:
            ds = datasets.load_dataset(dataset, config_name, split=split)
        except Exception as e:
            raise DataError(f"cannot load dataset {dataset!r} split {split!r}: {str(e).splitlines()[0]}") from None
        n = len(ds)
        return ds.add_column("_source", [f"{dataset}[{split}]"] * n).add_column("_row", list(range(n)))
    raise DataError("no training data: set data.train_files or data.dataset")


def text_problem(path: Path) -> str | None:
    """None for a UTF-8 text file with content, else the one line that says what is wrong. Read in
    blocks cut at newlines (a newline byte is never inside a multi-byte character), so the check
    runs at the speed of bytes.decode."""
    line, content, rest = 1, False, b""
    with open(path, "rb") as fh:
        while True:
            block = fh.read(1 << 20)
            chunk = rest + block
            cut = chunk.rfind(b"\n") + 1 if block else len(chunk)
            chunk, rest = chunk[:cut], chunk[cut:]
            try:
                chunk.decode("utf-8")
            except UnicodeDecodeError as e:
                at = line + chunk.count(b"\n", 0, e.start)
                column = e.start - (chunk.rfind(b"\n", 0, e.start) + 1) + 1
                return (f"{path}:{at}: not UTF-8 (byte 0x{chunk[e.start]:02x} at column {column}); save the file as "
                        f"UTF-8, e.g. iconv -f latin1 -t utf-8")
            content = content or bool(chunk.strip())
            line += chunk.count(b"\n")
            if not block:
                break
    return None if content else f"{path}: no records (the file is empty)"


@contextlib.contextmanager
def _quiet(logger: str):
    log = logging.getLogger(logger)
    was = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(was)


def _scratch_dir() -> str:
    """A new directory inside datasets' scratch space (removed when the process exits)."""
    import tempfile

    from datasets import fingerprint

    return tempfile.mkdtemp(dir=fingerprint.get_temporary_cache_files_directory())


@contextlib.contextmanager
def scratch_caching():
    """datasets writes the results of map/filter/select/split next to their source's Arrow files:
    into the user's `save_to_disk` directory (which may be read-only), where a later identical run
    would not even look. Inside this block they go to datasets' scratch directory instead
    (removed at exit); the tokenised store is written by kd itself."""
    from datasets import fingerprint

    was = fingerprint.is_caching_enabled()
    fingerprint.disable_caching()
    try:
        yield
    finally:
        if was:
            fingerprint.enable_caching()


def _from_disk(path: Path, split: str):
    """A `save_to_disk` directory: a Dataset, or a DatasetDict from which `split` is taken."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # not a saved dataset
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"{path}: not a dataset saved with save_to_disk ({first[:200]})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path}: a DatasetDict without a {split!r} split (has {', '.join(ds)}); "
                            f"set data.train_split / data.eval_split")
        ds, where = ds[split], f"{path}[{split}]"
    else:
        where = str(path)
    if len(ds) == 0:
        raise DataError(f"{where}: no records")
    n = len(ds)
    return ds.add_column("_source", [where] * n).add_column("_row", list(range(1, n + 1)))


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
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return f"{path}: cannot read records ({first[:200]})"


def renamed(records, columns: dict[str, str]):
    """Map source column names onto the schema's (`data.columns`: schema name -> source name)."""
    missing = [src for src in columns.values() if src not in records.column_names]
    if missing:
        raise DataError(f"data.columns: no column {missing[0]!r} in the data (has {', '.join(records.column_names)})")
    return records.rename_columns({src: dst for dst, src in columns.items() if src != dst})


