"""Stop requests: SIGTERM/SIGUSR1 (Slurm before the time limit, torchrun on shutdown) or a file
`<output_dir>/STOP` (what launch/slurm_multinode.sbatch touches). The loop all-reduces the flag
with the step's token counts, so every rank stops after the same step, saves, and exits cleanly."""

from __future__ import annotations

import signal
from pathlib import Path


class StopRequest:
    def __init__(self, output_dir: str, clear: bool):
        self.file = Path(output_dir) / "STOP"
        self.signalled = None
        if clear:  # a leftover request from the previous job is spent
            self.file.unlink(missing_ok=True)
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.signalled = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.signalled is not None or self.file.exists()

    def reason(self) -> str:
        if self.signalled:
            return self.signalled
        return f"{self.file} exists" if self.file.exists() else ""
