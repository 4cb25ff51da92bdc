"""The run directory: checked before anything is loaded, and locked for the run's lifetime.

The lock is an advisory `flock` on `<output_dir>/.lock`, held by the main process. The kernel
drops it when that process dies however it dies, so a lock left by a killed run is simply taken
over (with a line saying whose it was); a lock held by a live run stops a second run on the same
directory before it writes anything. A run that ends (an error included) before writing anything
else there leaves nothing behind: the lock goes, and the directory if the run created it.
"""

from __future__ import annotations

import atexit
import fcntl
import os
import socket
from pathlib import Path

from kd.errors import KDError

LOCK = ".lock"


class RunDirError(KDError):
    pass


def prepare(output_dir: str) -> Path:
    """Create output_dir if needed; one-line errors for a file in the way or no write access."""
    out = Path(output_dir)
    if not out.exists():
        _created.add(str(out.resolve()))
    if out.exists() and not out.is_dir():
        raise RunDirError(f"train.output_dir={output_dir} is a file, not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"train.output_dir={output_dir}: cannot create it ({e.strerror})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise RunDirError(f"train.output_dir={output_dir} is not writable")
    return out


_created: set[str] = set()  # output directories this process made


class RunLock:
    """Held from `acquire()` until the process exits (or `release()`)."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / LOCK
        self.fh = None

    def acquire(self) -> str | None:
        """-> a note when a stale lock was taken over, else None. Raises if a live run holds it."""
        try:
            fh = open(self.path, "a+")
        except OSError as e:
            raise RunDirError(f"cannot create the run lock {self.path} ({e.strerror})") from None
        fh.seek(0)
        previous = fh.read().strip()
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise RunDirError(f"another run is using {self.path.parent} ({previous or 'holder unknown'}); "
                              f"wait for it, stop it, or choose another train.output_dir") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        fh.flush()
        self.fh = fh
        # an error exit releases it too, so only a killed run leaves a holder for the next to name
        atexit.register(self.release)
        return f"took over the run lock of a previous run ({previous}), no longer running" if previous else None

    def release(self) -> None:
        if self.fh is not None:
            out = self.path.parent
            if [p.name for p in out.iterdir()] == [LOCK]:  # the run wrote nothing: leave nothing
                self.path.unlink()
                if str(out.resolve()) in _created:
                    out.rmdir()
            self.fh.seek(0)
            self.fh.truncate()
            fcntl.flock(self.fh.fileno(), fcntl.LOCK_UN)
            self.fh.close()
            self.fh = None
