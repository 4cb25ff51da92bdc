"""What both demo experiments share: the repository root, cache keys and model loading."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def load_settings(path: str, args) -> dict:
    """The YAML settings with the command-line overrides applied."""
    s = yaml.safe_load(Path(path).read_text())
    if args.seeds is not None:
        s["seeds"] = args.seeds
    if args.max_steps is not None:
        s["train_overrides"]["train.max_steps"] = args.max_steps
    if args.train_limit is not None:
        s["train_limit"] = args.train_limit
    if args.eval_limit is not None:
        s["eval"]["limit"] = args.eval_limit
    if args.max_new_tokens is not None:
        for group in ("generation", "sampling", "eval"):
            if group in s:
                s[group]["max_new_tokens"] = args.max_new_tokens
    if args.variants:
        key = "arms" if "arms" in s else "variants"
        s[key] = {k: v for k, v in s[key].items() if k in args.variants.split(",")}
    return s


def read_jsonl(path, limit=None) -> list[dict]:
    rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    return rows[:limit]


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def model_digest(name: str) -> str:
    """Hash of the resolved model's weights, so cached results follow the shipped teacher."""
    from kd.demo.builtin import resolve

    p = Path(resolve(name)) / "model.safetensors"
    return hashlib.sha256(p.read_bytes()).hexdigest()[:16] if p.is_file() else name


def load(name: str):
    import torch

    from kd.tools.generation import load_for_generation

    return load_for_generation(name, "float32", torch.device("cpu"))


def train_cached(run_dir: Path, base_config: str, overrides: dict, key: str, what: str, log) -> dict:
    """`python -m kd.train` for one student unless <run_dir>/trained.json records the same `key`;
    -> {key, train_seconds}. A failed training ends the experiment with its stderr."""
    trained_path = run_dir / "trained.json"
    trained = json.loads(trained_path.read_text()) if trained_path.is_file() else {}
    if trained.get("key") == key:
        return trained
    cmd = [sys.executable, "-m", "kd.train", "--config", str(ROOT / base_config), *[f"{k}={v}" for k, v in overrides.items()]]
    t0 = time.time()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"kd: error: training {what} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    trained = {"key": key, "train_seconds": round(time.time() - t0, 1)}
    trained_path.write_text(json.dumps(trained) + "\n")
    log(f"{what}: trained in {trained['train_seconds']:.0f} s")
    return trained
