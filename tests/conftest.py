"""Shared fixtures: a per-session KD_HOME (builtin tiny models are built once, never in ~/.cache),
small data files, and helpers to run the real CLI."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
ACCELERATE = str(Path(PY).with_name("accelerate"))

# Set before any test imports kd, and inherited by every subprocess the tests start.
os.environ.setdefault("KD_HOME", tempfile.mkdtemp(prefix="kd-test-home-"))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_cmd(args: list[str], procs: int = 0) -> list[str]:
    """The trainer's command line as a user types it: `python -m kd.train` (procs=0) or
    `accelerate launch` with 1 or 2 CPU processes."""
    if procs == 0:
        return [PY, "-m", "kd.train", *args]
    cfg = "launch/cpu.yaml" if procs == 1 else "launch/cpu_ddp2.yaml"
    return [ACCELERATE, "launch", "--config_file", cfg, "--main_process_port", str(free_port()),
            "--num_cpu_threads_per_process", "1", "kd/train.py", *args]


def kill_run(proc: subprocess.Popen) -> None:
    """SIGKILL a launched run as a node failure would: the launcher and every rank. torch's
    elastic launcher starts each rank in a session of its own, so a kill of the launcher's process
    group alone would leave the ranks training on."""
    import psutil

    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    psutil.wait_procs(procs, timeout=30)


def run_cli(args: list[str], *, procs: int = 0, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the trainer as a user would (see cli_cmd)."""
    cmd = cli_cmd(args, procs)
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}")
    return res


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> dict[str, str]:
    """48 train / 16 eval records from the shipped demo data (both strategies, both families)."""
    d = tmp_path_factory.mktemp("data")
    rows = [json.loads(line) for line in open(ROOT / "data/demo/train.jsonl")]
    evals = [json.loads(line) for line in open(ROOT / "data/demo/eval.jsonl")]
    paths = {}
    for name, recs in (("train", rows[:48]), ("eval", evals[:16])):
        p = d / f"{name}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in recs))
        paths[name] = str(p)
    return paths


@pytest.fixture(scope="session")
def llama_tokenizer_dir(tmp_path_factory) -> Path:
    """The real 32000-entry LLaMA-style SentencePiece vocabulary (shipped inside mistral-common),
    as a directory AutoTokenizer loads offline."""
    import shutil

    mc = pytest.importorskip("mistral_common")
    d = tmp_path_factory.mktemp("llama_tok")
    shutil.copy(Path(mc.__file__).parent / "data" / "tokenizer.model.v1", d / "tokenizer.model")
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    return d


def tiny_overrides(data: dict[str, str], out: Path, **extra) -> list[str]:
    """Overrides that make the demo config a seconds-long run on `small_data`."""
    base = {
        "data.train_files": f"[{data['train']}]",
        "data.eval_files": f"[{data['eval']}]",
        "data.max_length": 256,
        "train.output_dir": str(out),
        "train.micro_batch_size": 4,
        "train.grad_accum_steps": 1,
        "train.max_steps": 3,
        "train.eval_every": 0,
        "train.save_every": 0,
        "log.progress_bar": "false",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
