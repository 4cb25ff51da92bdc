"""Atomic checkpoints on top of accelerate's save_state/load_state, and the final HF export.

Layout under <output_dir>/checkpoints/:
    step_00000050/   model, optimizer, scheduler, per-rank RNG states, trainer_state.json
    latest           text file naming the newest *complete* checkpoint directory

A checkpoint is written to a hidden temporary directory and renamed into place only after every
rank has finished writing; `latest` is then replaced atomically. A kill at any moment leaves the
previous `latest` intact, and a half-written directory is never read.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from kd.errors import KDError

STATE_FILE = "trainer_state.json"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def save(accelerator, output_dir: str, step: int, state: dict, keep: int) -> Path:
    """Collective: every rank calls it. -> the final checkpoint directory."""
    root = Path(output_dir) / "checkpoints"
    final = root / f"step_{step:08d}"
    tmp = root / f".step_{step:08d}.partial"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_atomic(tmp / STATE_FILE, json.dumps(state, indent=1))
        if final.exists():  # re-saving a step (e.g. end of a resumed run) replaces it
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(root)
        _write_atomic(root / "latest", final.name)
        for old in sorted(root.glob("step_*"))[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def find(output_dir: str, resume: str) -> Path | None:
    """`resume` is latest | off | a checkpoint directory. -> directory to load, or None."""
    if resume in ("off", "none", "false", "False", ""):
        return None
    if resume == "latest":
        pointer = Path(output_dir) / "checkpoints" / "latest"
        if not pointer.exists():
            return None
        path = pointer.parent / pointer.read_text().strip()
    else:
        path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise KDError(f"train.resume: {path} is not a complete checkpoint (no {STATE_FILE})")
    return path


def load(accelerator, path: Path) -> dict:
    accelerator.load_state(str(path))
    return json.loads((path / STATE_FILE).read_text())


def export(accelerator, distiller, tokenizer, output_dir: str) -> Path:
    """The student inside the prepared Distiller -> save_pretrained + tokenizer in
    <output_dir>/student, atomically. Collective (gathers sharded weights where needed)."""
    out = Path(output_dir) / "student"
    tmp = Path(output_dir) / ".student.partial"
    full = accelerator.get_state_dict(distiller)
    if accelerator.is_main_process:
        prefix = "student."
        state_dict = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
        shutil.rmtree(tmp, ignore_errors=True)
        student = accelerator.unwrap_model(distiller).student
        if getattr(student.config, "tie_word_embeddings", False):
            # a gathered (ZeRO) state dict holds tied weights as separate copies: keep the source only
            for key in getattr(student, "_tied_weights_keys", None) or {}:
                state_dict.pop(key, None)
        student.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    accelerator.wait_for_everyone()
    return out
