"""The tokenised store is verified when opened: damage of any kind is said in one line and the
store rebuilt, never used; its fingerprint follows the data's content, not its mtime; nothing is
written beside the user's input files; failed and killed builds leave nothing behind."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import stat
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from kd.config import DataConfig
from kd.data import build_datasets
from kd.data.store import COMPLETE, fingerprint, store_root
from kd.errors import DataError
from kd.models import load_tokenizer

ROWS = [{"system": "Answer step by step.", "prompt": f"What is {i} + {2 * i}?", "response": f"{i} + {2 * i} = {3 * i}."}
        for i in range(12)]


@pytest.fixture()
def setup(tmp_path, monkeypatch):
    monkeypatch.setenv("KD_HOME", str(tmp_path / "home"))
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    cfg = DataConfig(train_files=[str(data)], eval_fraction=0.25)
    tok = load_tokenizer("builtin:tokenizer")
    said: list[str] = []
    built = build_datasets(cfg, tok, 0, log=said.append)
    path = store_root(cfg) / fingerprint(cfg, tok, 0)
    assert said == [f"tokenised views stored in {path}"]
    # materialised: the datasets memory-map the store's files, which the tests then damage
    return cfg, tok, path, (built[0][:], built[1][:], built[2].target_tokens)


def _reopen(cfg, tok):
    said: list[str] = []
    return build_datasets(cfg, tok, 0, log=said.append), said


def _same(a, b):
    assert (a[0][:], a[1][:], a[2].target_tokens) == b


def _arrow(path: Path) -> Path:
    return next((path / "train").glob("*.arrow"))


def _change_one_token_id(f: Path, column: str, row: int, pos: int, new: int) -> int:
    """Rewrite one token id in place (same file size, Arrow still valid), as a bad disk block or a
    stray write would."""
    with pa.memory_map(str(f)) as src:
        table = pa.ipc.open_stream(src).read_all()
    ids = table.column(column).combine_chunks()
    old = ids[row].values[pos].as_py()
    width = ids.type.value_type.bit_width // 8
    raw = bytearray(f.read_bytes())
    needle = np.asarray([old], dtype=f"<i{width}").tobytes()
    at = raw.index(needle, len(raw) // 4)  # in the data buffers, past the schema
    raw[at:at + width] = np.asarray([new], dtype=f"<i{width}").tobytes()
    f.write_bytes(bytes(raw))
    return old


def test_a_verified_store_is_read_and_equal(setup):
    cfg, tok, path, built = setup
    again, said = _reopen(cfg, tok)
    assert said == [f"tokenised views read from {path} (verified)"]
    _same(again, built)
    record = json.loads((path / COMPLETE).read_text())
    assert set(record["files"]) >= {"train/state.json", "train/dataset_info.json", "eval/state.json"}


@pytest.mark.parametrize("damage, reason", [
    ("token", "does not match its checksum"),
    ("truncate", "bytes,"),
    ("delete arrow", "is missing"),
    ("delete state", "train/state.json is missing"),
    ("delete complete", "no complete.json (an interrupted build)"),
    ("invalid complete", "complete.json unreadable"),
    ("extra file", "was not written by the build"),
])
def test_a_damaged_store_is_said_and_rebuilt(damage, reason, setup):
    cfg, tok, path, built = setup
    f = _arrow(path)
    if damage == "token":
        _change_one_token_id(f, "student_ids", 0, 3, 7)
    elif damage == "truncate":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif damage == "delete arrow":
        f.unlink()
    elif damage == "delete state":
        (path / "train" / "state.json").unlink()
    elif damage == "delete complete":
        (path / COMPLETE).unlink()
    elif damage == "invalid complete":
        (path / COMPLETE).write_text("{not json")
    else:
        (path / "train" / "cache-0123.arrow").write_bytes(b"x")
    again, said = _reopen(cfg, tok)
    assert len(said) == 2 and said[0].startswith(f"tokenised store {path} is damaged or incomplete: ") \
        and reason in said[0] and said[0].endswith("; rebuilding it"), said
    assert said[1] == f"tokenised views stored in {path}"
    _same(again, built)
    assert _reopen(cfg, tok)[1] == [f"tokenised views read from {path} (verified)"]
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # nothing set aside is left


@pytest.mark.parametrize("store", ["auto", "off"])
def test_a_same_size_edit_with_its_mtime_put_back_is_seen(store, setup, tmp_path):
    cfg, tok, _, built = setup
    cfg = DataConfig(**{**cfg.__dict__, "store": store})
    data = Path(cfg.train_files[0])
    before = build_datasets(cfg, tok, 0, log=lambda s: None)
    st = data.stat()
    text = data.read_text()
    assert "What is 3 + 6?" in text
    data.write_text(text.replace("What is 3 + 6?", "What is 3 + 7?"))  # same size
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))  # as rsync -t or a restored backup leave it
    assert data.stat().st_size == st.st_size and data.stat().st_mtime_ns == st.st_mtime_ns
    after = build_datasets(cfg, tok, 0, log=lambda s: None)
    decoded = [tok.decode(e["student_ids"]) for split in (after[0], after[1]) for e in split]
    assert any("3 + 7?" in d for d in decoded) and not any("3 + 6?" in d for d in decoded)
    assert before[0][:] != after[0][:] or before[1][:] != after[1][:]
    assert (before[0][:], before[1][:], before[2].target_tokens) == built


def test_save_to_disk_input_is_never_written_and_may_be_read_only(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("KD_HOME", str(tmp_path / "home"))
    src = tmp_path / "saved"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(src))
    before = sorted(p.name for p in src.iterdir())
    tok = load_tokenizer("builtin:tokenizer")
    for p in [src, *src.iterdir()]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        for store in ("auto", "off"):
            train, evald, stats, _ = build_datasets(DataConfig(train_files=[str(src)], eval_fraction=0.25, store=store),
                                                    tok, 0, log=lambda s: None)
            assert stats.examples == len(train) == 9 and len(evald) == 3
        assert sorted(p.name for p in src.iterdir()) == before
    finally:
        for p in [src, *src.iterdir()]:
            p.chmod(p.stat().st_mode | stat.S_IWUSR)


def test_killed_builds_are_cleared_and_live_ones_kept(setup):
    cfg, tok, path, _ = setup
    host = socket.gethostname()
    dead = path.with_name(f".{path.name}.{host}.999999999.partial")  # no such pid
    live = path.with_name(f".{path.name}.{host}.{os.getppid()}.partial")  # a live process, not this build
    other = path.with_name(f".{path.name}.elsewhere.1.partial")  # another host's: not ours to judge
    for d in (dead, live, other):
        (d / "train").mkdir(parents=True)
    shutil.rmtree(path)
    _reopen(cfg, tok)
    assert not dead.exists() and live.exists() and other.exists()


def test_a_failed_write_is_one_line_and_leaves_nothing(setup, monkeypatch):
    import datasets

    cfg, tok, path, _ = setup
    shutil.rmtree(path)

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", full)
    with pytest.raises(DataError, match=r"^tokenised store not written: no space left on the device of .*"
                                        r"data.store=off$"):
        build_datasets(cfg, tok, 0, log=lambda s: None)
    assert list(path.parent.iterdir()) == []
