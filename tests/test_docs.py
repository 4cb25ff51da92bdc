"""Every command in README.md and docs/*.md is checked, so none goes stale: trainer command lines
(`python -m kd.train`, `accelerate launch ... kd/train.py`) load their config with their overrides;
the tools' command lines parse with the tool's own argument parser; every repository path they name
exists; benchmark flags exist in the benchmark. Commands that need a GPU, the hub or a long run are
checked this way, not run (the tiny-model ones run in their own tests); commands quoted inline in
prose and lines with placeholders (<name>, [overrides ...]) are not checked."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from conftest import ROOT
from kd.config import load_config

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
COMMAND = re.compile(r"^([A-Z_]+=\S+\s+)*(python|\.venv/bin/|accelerate|sbatch|make)\b")
PLACEHOLDER = re.compile(r"<[^>]*>|\.\.\.|\[[^\]]*(\.\.\.|\|)[^\]]*\]")  # <name>, ..., [overrides ...], [a | b]


def commands(page: Path) -> list[str]:
    """The shell command lines of a page's ```bash blocks, command lines (python, accelerate, sbatch,
    make, .venv/bin/...) of its other blocks, and their `$ ` lines."""
    out, block, lang = [], None, ""
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            if block is None:
                block, lang = [], line[3:].strip()
            else:
                text = "\n".join(block).replace("\\\n", " ")
                for cmd in text.splitlines():
                    cmd = cmd.strip()
                    if cmd and not cmd.startswith("#") and (lang == "bash" or COMMAND.match(cmd)):
                        out.append(cmd)
                    elif cmd.startswith("$ "):
                        out.append(cmd[2:])
                block = None
            continue
        if block is not None:
            block.append(line)
    return out


def strip_comment(cmd: str) -> str:
    return re.sub(r"\s+#\s.*$", "", cmd)


def words(cmd: str) -> list[str]:
    words = shlex.split(strip_comment(cmd))
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # OMP_NUM_THREADS=1 ...
        words.pop(0)
    return words


TOOLS = {"kd.evaluate": "kd.tools.evaluate", "kd.generate": "kd.tools.generate", "kd.accuracy": "kd.demo.accuracy"}


def check(cmd: str) -> str:
    """-> what was checked; raises on a stale command."""
    w = words(cmd)
    if not w or w[0] in ("make", "source", "cd", "pip", "export", "wandb", "git", "tail", "cat", "ls"):
        return "not a kd command"
    for arg in w:  # repository paths named on the line exist
        path = arg.split("=", 1)[-1].strip("[]")
        if re.match(r"^(configs|launch|kd|benchmarks|scripts|data/demo)/[\w./-]+$", path) and "*" not in path:
            assert (ROOT / path).exists(), f"{path} does not exist"
    if w[0].endswith("python") and len(w) > 1 and w[1].startswith("benchmarks/"):
        source = (ROOT / w[1]).read_text()
        for flag in (a.split("=")[0] for a in w[2:] if a.startswith("--")):
            assert f'"{flag}"' in source, f"{w[1]} has no {flag}"
        return "benchmark flags"
    if "kd/train.py" in w or (len(w) > 2 and w[1:3] == ["-m", "kd.train"]):
        rest = w[w.index("kd/train.py") + 1:] if "kd/train.py" in w else w[3:]
        from kd.cli import parse_args

        path, overrides = parse_args(rest)
        load_config(ROOT / path if path else None, overrides)
        return "config loads"
    if w[0] == "accelerate" and "-m" in w:
        w = ["python", *w[w.index("-m"):]]
    if w[0].endswith("python") and len(w) > 2 and w[1] == "-m" and w[2] in TOOLS:
        import importlib

        importlib.import_module(TOOLS[w[2]]).parse_args(w[3:])
        return "arguments parse"
    return "paths exist"


CASES = [(page.relative_to(ROOT).as_posix(), cmd) for page in PAGES for cmd in commands(page)
         if not PLACEHOLDER.search(strip_comment(cmd))]


def test_the_pages_have_commands_to_check():
    assert len(CASES) >= 20 and {p for p, _ in CASES} >= {"README.md", "docs/gpu.md", "benchmarks/README.md"}


@pytest.mark.parametrize("page, cmd", CASES, ids=[f"{p}:{i}" for i, (p, _) in enumerate(CASES)])
def test_every_documented_command_is_current(page, cmd, monkeypatch):
    monkeypatch.chdir(ROOT)
    check(cmd)
