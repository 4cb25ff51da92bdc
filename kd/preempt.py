"""Stop requests: SIGTERM/SIGUSR1 (Slurm before the time limit, torchrun on shutdown), a first
Ctrl-C (SIGINT; a second one aborts without saving) or a file `<output_dir>/STOP` (what
launch/slurm_multinode.sbatch touches). The loop all-reduces the flag
with the step's token counts, so every rank stops after the same step, saves, and exits cleanly."""

from __future__ import annotations

import signal
from pathlib import Path


class StopRequest:
    def __init__(self, output_dir: str, clear: bool, say=print):
        self.file = Path(output_dir) / "STOP"
        self.signalled = None
        self.say = say
        if clear:  # a leftover request from the previous job is spent
            self.file.unlink(missing_ok=True)
        self.previous = {sig: signal.signal(sig, self._handler) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}

    def _handler(self, signum, frame):
        if signum == signal.SIGINT:
            if self.signalled is not None:  # asked twice: the user means it
                raise KeyboardInterrupt
            self.say("Ctrl-C: stopping after this step to save a checkpoint; Ctrl-C again aborts without saving")
        self.signalled = signal.Signals(signum).name

    def close(self) -> None:
        """Give the signals back (a library caller's Ctrl-C is its own again)."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    @property
    def requested(self) -> bool:
        return self.signalled is not None or self.file.exists()

    def reason(self) -> str:
        if self.signalled:
            return self.signalled
        return f"{self.file} exists" if self.file.exists() else ""
