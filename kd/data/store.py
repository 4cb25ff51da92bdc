"""Tokenise once: the tokenised views on disk, keyed by everything that changes them.

The main process builds the train/eval views (with `data.num_proc` workers) into
`<data.store>/<fingerprint>/` as Arrow files (`save_to_disk`), written under a temporary name
and renamed when complete; every rank then memory-maps them (`load_from_disk`), so no rank holds
the tokenised set in its own memory and a restart or Slurm requeue skips tokenising. The
fingerprint covers the data (each file's path, size and mtime; a dataset's name, config and
split), the tokenizer (vocabulary hash) and chat template, the length policy, erasure, targets,
column mapping, eval split and seed: a change to any of them builds a new store beside the old.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from kd.config import DataConfig

STORE_VERSION = 1
COMPLETE = "complete.json"


def kd_home() -> Path:
    """$KD_HOME, else ~/.cache/kd: where kd keeps what it builds once."""
    return Path(os.environ.get("KD_HOME") or Path.home() / ".cache" / "kd").expanduser()


def store_root(cfg: DataConfig) -> Path | None:
    if cfg.store in (None, "off"):
        return None
    return kd_home() / "tokenised" if cfg.store == "auto" else Path(cfg.store)


def _source_identity(name: str) -> list:
    p = Path(name)
    if p.is_dir():  # a save_to_disk directory
        return [str(p.resolve()), [(f.name, f.stat().st_size, f.stat().st_mtime_ns)
                                   for f in sorted(p.rglob("*")) if f.is_file()]]
    if p.is_file():
        st = p.stat()
        return [str(p.resolve()), st.st_size, st.st_mtime_ns]
    return [name]


def fingerprint(cfg: DataConfig, tokenizer, seed: int) -> str:
    from kd.models import tokenizer_sha256

    key = {
        "version": STORE_VERSION,
        "train_files": [_source_identity(f) for f in cfg.train_files],
        "eval_files": [_source_identity(f) for f in cfg.eval_files],
        "dataset": [cfg.dataset, cfg.dataset_config, cfg.train_split, cfg.eval_split],
        "columns": dict(sorted(cfg.columns.items())),
        "eval_fraction": cfg.eval_fraction, "shuffle": cfg.shuffle, "seed": seed,
        "tokenizer": tokenizer_sha256(tokenizer), "chat_template": tokenizer.chat_template,
        "length": [cfg.max_length, cfg.min_prompt_tokens], "targets": cfg.targets,
        "erasure": [cfg.erase_strategy, cfg.generic_system],
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]


def tokenised(cfg: DataConfig, tokenizer, seed: int, build, log=print):
    """-> (train, eval or None, train stats, eval stats or None as JSON dicts), memory-mapped from
    the store; `build()` makes them (on the main process) when the store has no complete copy."""
    import datasets
    from accelerate import PartialState

    path = store_root(cfg) / fingerprint(cfg, tokenizer, seed)
    state = PartialState()
    with state.main_process_first():  # the main process builds; the others wait, then read
        if not (path / COMPLETE).is_file():
            if not state.is_main_process:
                raise RuntimeError(f"tokenised store {path} missing after the main process built it "
                                   f"(is data.store on a filesystem every rank sees?)")
            train, evald, train_stats, eval_stats = build()
            tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
            shutil.rmtree(tmp, ignore_errors=True)
            train.save_to_disk(str(tmp / "train"))
            if evald is not None:
                evald.save_to_disk(str(tmp / "eval"))
            stats = {"train": train_stats.to_json(), "eval": eval_stats.to_json() if eval_stats else None}
            (tmp / COMPLETE).write_text(json.dumps(stats, indent=1))
            try:  # atomic; a concurrent run (e.g. parallel experiment jobs) may have stored them first
                os.replace(tmp, path)
                log(f"tokenised views stored in {path}")
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
                log(f"tokenised views read from {path} (stored by a concurrent run)")
        elif state.is_main_process:
            log(f"tokenised views read from {path}")
        stats = json.loads((path / COMPLETE).read_text())
        train = datasets.load_from_disk(str(path / "train"))
        evald = datasets.load_from_disk(str(path / "eval")) if stats["eval"] is not None else None
    return train, evald, stats["train"], stats["eval"]
