"""One integrity story for everything kd writes and later reads back: checkpoints, the tokenised
store, the teacher cache and kd.generate's shards.

A writer records each file's size and XXH3-128 hash (`digests`) once the file is complete; a
reader checks them (`problems`) before it trusts a byte. XXH3 hashes at ~16 GB/s per core here
(CRC-32 manages ~3, SHA-256 ~1.6), so verifying on open costs little next to reading. These are
checksums against corruption and truncation (a bad disk, a copy cut short, an edited file), not
signatures against tampering: whoever can rewrite a file can rewrite its checksum too.
"""

from __future__ import annotations

import errno
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import xxhash

_BLOCK = 16 * 2**20


def file_digest(path: Path) -> str:
    """XXH3-128 of a file's bytes, read in 16 MiB blocks into one reused buffer."""
    h = xxhash.xxh3_128()
    buf = bytearray(_BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def source_identity(name: str) -> list:
    """What a data source is, by content: a file's resolved path, size and hash; a directory's
    (a save_to_disk dataset) files the same way; anything else (a hub name) as given. A same-size
    edit whose mtime was put back (rsync -t, a restored backup) still changes it."""
    p = Path(name)
    if p.is_dir():
        return [str(p.resolve()), [(str(f.relative_to(p)), f.stat().st_size, file_digest(f))
                                   for f in sorted(p.rglob("*")) if f.is_file()]]
    if p.is_file():
        return [str(p.resolve()), p.stat().st_size, file_digest(p)]
    return [name]


def text_digest(text: str) -> str:
    return xxhash.xxh3_128_hexdigest(text.encode())


def files_under(root: Path, skip: tuple[str, ...] = ()) -> list[str]:
    """Every file below `root`, as sorted relative paths, except those named in `skip`."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name not in skip)


def digests(root: Path, names: list[str]) -> dict[str, dict]:
    """{name: {size, xxh3_128}} of the files `names` under `root`, hashed on a few threads."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        hashes = list(pool.map(lambda n: file_digest(root / n), names))
    return {n: {"size": (root / n).stat().st_size, "xxh3_128": d} for n, d in zip(names, hashes)}


def problems(root: Path, record: dict[str, dict], names: list[str] | None = None) -> list[str]:
    """What is wrong with the files of `record` (all, or `names` of them) under `root`: missing,
    another size, another hash. [] when every one matches."""
    bad = []
    for name in sorted(record) if names is None else names:
        f, want = root / name, record[name]
        if not f.is_file():
            bad.append(f"{name} is missing")
        elif f.stat().st_size != want["size"]:
            bad.append(f"{name} has {f.stat().st_size} bytes, {want['size']} were written")
        elif file_digest(f) != want["xxh3_128"]:
            bad.append(f"{name} does not match its checksum")
    return bad


def summary(found: list[str]) -> str:
    """Up to three problems in one line."""
    found = sorted(found)
    return "; ".join(found[:3]) + (f" (+{len(found) - 3} more)" if len(found) > 3 else "")


def write_failure(e: BaseException, where: Path) -> str:
    """One line for a failed write. Writers word a full disk differently (OSError ENOSPC,
    safetensors' 'os error 28', Arrow's 'Error writing bytes', torch.save's 'unexpected pos'), so
    the free space decides too."""
    try:
        free = shutil.disk_usage(where if where.exists() else where.parent).free
    except OSError:
        free = -1
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if getattr(e, "errno", None) == errno.ENOSPC or "os error 28" in text or "No space left" in text \
            or 0 <= free < 2**20:
        return f"no space left on the device of {where} ({free / 2**20:.1f} MiB free)"
    return f"{getattr(e, 'strerror', None) or text[:200]} ({getattr(e, 'filename', None) or where})"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """`text` into `path` through a temporary file, fsynced and renamed: all of it or none."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
