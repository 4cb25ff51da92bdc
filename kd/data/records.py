"""Records from files or a `datasets` name, and their schema (see kd.data for both)."""

from __future__ import annotations

import json
from pathlib import Path

from kd.errors import DataError

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def to_messages(rec: dict, where: str) -> tuple[str | None, list[dict], str]:
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
            if path.suffix != ".parquet" and not _has_content(path):
                raise DataError(f"{f}: no records (the file is empty)")
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
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return f"{path}: cannot read records ({first[:200]})"


def _has_content(path: Path) -> bool:
    with open(path, "rb") as fh:
        while block := fh.read(1 << 16):
            if block.strip():
                return True
    return False



def renamed(records, columns: dict[str, str]):
    """Map source column names onto the schema's (`data.columns`: schema name -> source name)."""
    missing = [src for src in columns.values() if src not in records.column_names]
    if missing:
        raise DataError(f"data.columns: no column {missing[0]!r} in the data (has {', '.join(records.column_names)})")
    return records.rename_columns({src: dst for dst, src in columns.items() if src != dst})


