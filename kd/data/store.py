"""Tokenise once: the tokenised views on disk, keyed by everything that changes them, verified
every time they are opened.

The main process builds the train/eval views (with `data.num_proc` workers) into
`<data.store>/<fingerprint>/` as Arrow files (`save_to_disk`), written under a temporary name
and renamed when complete; every rank then memory-maps them (`load_from_disk`), so no rank holds
the tokenised set in its own memory and a restart or Slurm requeue skips tokenising.

The fingerprint covers the data by content (an XXH3-128 hash of each file's bytes: a same-size
edit whose mtime was put back, as rsync -t or a restored backup leave it, is still a new store;
a dataset name, config and split), the tokenizer (vocabulary hash) and chat template, the length
policy, erasure, targets, column mapping, eval split and seed: a change to any of them builds a
new store beside the old.

`complete.json`, written last, holds the data statistics and the size and XXH3-128 hash of every
other file in the store (kd.integrity). The main process checks them before any rank reads: a
damaged, truncated or incomplete store is said in one line, moved aside and rebuilt, never used.
Builds killed part-way leave `.<fingerprint>.<host>.<pid>.partial` directories; the next build on
that host removes those whose process is gone.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from pathlib import Path

from kd.config import DataConfig
from kd.errors import DataError
from kd.data.records import expand_files
from kd.integrity import digests, files_under, fsync_dir, problems, source_identity, summary, write_failure

STORE_VERSION = 3  # 2: data files fingerprinted by content; complete.json records checksums; 3: per-turn rows, erased counts
COMPLETE = "complete.json"


def kd_home() -> Path:
    """$KD_HOME, else ~/.cache/kd: where kd keeps what it builds once."""
    return Path(os.environ.get("KD_HOME") or Path.home() / ".cache" / "kd").expanduser()


def store_root(cfg: DataConfig) -> Path | None:
    if cfg.store in (None, "off"):
        return None
    return kd_home() / "tokenised" if cfg.store == "auto" else Path(cfg.store)


def fingerprint(cfg: DataConfig, tokenizer, seed: int) -> str:
    from kd.models import tokenizer_sha256

    key = {
        "version": STORE_VERSION,
        "train_files": [source_identity(f) for f in expand_files(cfg.train_files)],
        "eval_files": [source_identity(f) for f in expand_files(cfg.eval_files)],
        "dataset": [cfg.dataset and source_identity(cfg.dataset), cfg.dataset_config, cfg.train_split, cfg.eval_split],
        "columns": dict(sorted(cfg.columns.items())),
        "eval_fraction": cfg.eval_fraction, "shuffle": cfg.shuffle, "seed": seed,
        "tokenizer": tokenizer_sha256(tokenizer), "chat_template": tokenizer.chat_template,
        "length": [cfg.max_length, cfg.min_prompt_tokens], "targets": cfg.targets,
        "erasure": [cfg.erase_strategy, cfg.generic_system],
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]


def check(path: Path) -> str | None:
    """None when the store at `path` is complete and every file matches its checksum, else what
    is wrong (one line)."""
    if not path.is_dir():
        return "absent"
    try:
        record = json.loads((path / COMPLETE).read_text())
        files, _ = record["files"], record["stats"]["train"]
    except FileNotFoundError:
        return f"no {COMPLETE} (an interrupted build)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{COMPLETE} unreadable ({type(e).__name__})"
    unrecorded = sorted(set(files_under(path, skip=(COMPLETE,))) - set(files))
    found = problems(path, files) + [f"{n} was not written by the build" for n in unrecorded]
    return summary(found) if found else None


def tokenised(cfg: DataConfig, tokenizer, seed: int, build, log=print):
    """-> (train, eval or None, train stats, eval stats or None as JSON dicts), memory-mapped from
    the store; `build()` makes them (on the main process) when the store has no good copy."""
    import datasets
    from accelerate import PartialState

    path = store_root(cfg) / fingerprint(cfg, tokenizer, seed)
    state = PartialState()
    with state.main_process_first():  # the main process verifies or builds; the others wait, then read
        if state.is_main_process:
            problem = check(path)
            if problem is None:
                log(f"tokenised views read from {path} (verified)")
            else:
                if problem != "absent":
                    log(f"tokenised store {path} is damaged or incomplete: {problem}; rebuilding it")
                    _discard(path)
                _store(build, path, log)
        elif not (path / COMPLETE).is_file():
            raise DataError(f"tokenised store {path} missing after the main process built it "
                            f"(is data.store on a filesystem every rank sees?)")
        stats = json.loads((path / COMPLETE).read_text())["stats"]
        train = datasets.load_from_disk(str(path / "train"))
        evald = datasets.load_from_disk(str(path / "eval")) if stats["eval"] is not None else None
    return train, evald, stats["train"], stats["eval"]


def _store(build, path: Path, log) -> None:
    """Build the views and write them to `path` atomically; a failed write removes what it wrote
    and says so in one line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_partials(path.parent)
    train, evald, train_stats, eval_stats = build()
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.partial")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        train.save_to_disk(str(tmp / "train"))
        if evald is not None:
            evald.save_to_disk(str(tmp / "eval"))
        files = digests(tmp, files_under(tmp))
        stats = {"train": train_stats.to_json(), "eval": eval_stats.to_json() if eval_stats else None}
        for name in files:
            with open(tmp / name, "rb+") as fh:
                os.fsync(fh.fileno())
        (tmp / COMPLETE).write_text(json.dumps({"stats": stats, "files": files}, indent=1))
        fsync_dir(tmp)
    except Exception as e:  # noqa: BLE001 (datasets/Arrow word a full disk in several ways)
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"tokenised store not written: {write_failure(e, tmp)}; free space on it, set data.store "
                        f"to another directory, or data.store=off") from None
    try:  # atomic; a concurrent run (e.g. parallel experiment jobs) may have stored them first
        os.replace(tmp, path)
        fsync_dir(path.parent)
        log(f"tokenised views stored in {path}")
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        problem = check(path)
        if problem is not None:
            raise DataError(f"tokenised store {path}: another run's copy is damaged ({problem}); "
                            f"remove it and run again") from None
        log(f"tokenised views read from {path} (stored by a concurrent run, verified)")


def _discard(path: Path) -> None:
    """Move a bad store out of the way (a rename, so a reader never sees it half-deleted)."""
    aside = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.damaged")
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


def _remove_dead_partials(root: Path) -> None:
    """Partial builds of this host whose process has died (a killed build leaves one)."""
    host = socket.gethostname()
    for d in root.glob(".*.partial"):
        _, _, owner = d.name[1:-len(".partial")].partition(".")  # <fingerprint>.<host>.<pid>
        where, _, pid = owner.rpartition(".")
        if where != host or not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass
