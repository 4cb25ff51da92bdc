"""The tree shows the architecture: imports point one way (commands and demo -> library), no cycles,
and every command name users type still resolves."""

from __future__ import annotations

import ast
import importlib

import pytest

from conftest import ROOT

KD = ROOT / "kd"
# The command names that users (and README, sweeps, Slurm scripts) type: `python -m kd.<name>`.
COMMANDS = {"train": "kd.train", "cache": "kd.cache.__main__", "plan": "kd.tools.plan", "sweep": "kd.tools.sweep",
            "report": "kd.tools.report", "generate": "kd.tools.generate", "evaluate": "kd.tools.evaluate",
            "accuracy": "kd.demo.accuracy",
            "experiment": "kd.demo.experiment"}
ALIASES = {f"kd.{n}" for n in ("plan", "sweep", "report", "generate", "evaluate", "accuracy", "experiment")}


def module_name(path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """module -> the kd modules it imports, anywhere in its body (lazy imports count too)."""
    mods = {module_name(p): p for p in KD.rglob("*.py")}
    graph = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from kd.x import y` names module kd.x.y when that is a module, else kd.x
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module
                           for a in node.names]
            else:
                continue
            deps.update(t for t in targets if t.split(".")[0] == "kd" and t != name)
        graph[name] = deps
    return graph


def layer(name: str) -> str:
    if name in ALIASES or name == "kd.train" or name == "kd.cache.__main__":
        return "command"
    if name == "kd.cli":
        return "cli"
    for pkg in ("kd.tools", "kd.demo"):
        if name == pkg or name.startswith(pkg + "."):
            return pkg.split(".")[1]
    return "library"


def test_library_never_imports_commands_tools_or_demo():
    graph = imports()
    bad = [f"{m} -> {d}" for m, deps in graph.items() if layer(m) == "library"
           for d in deps if layer(d) != "library"]
    assert not bad, bad


def test_cli_imports_only_errors_and_tools_never_import_demo():
    graph = imports()
    assert graph["kd.cli"] <= {"kd.errors"}
    bad = [f"{m} -> {d}" for m, deps in graph.items() if layer(m) == "tools" for d in deps if layer(d) == "demo"]
    assert not bad, bad


def test_no_import_cycles():
    graph = imports()
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for dep in graph.get(node, ()):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


@pytest.mark.parametrize("command,target", sorted(COMMANDS.items()))
def test_command_names_still_resolve(command, target):
    module = importlib.import_module(f"kd.{command}" if command != "cache" else "kd.cache.__main__")
    assert callable(module.main) and module.main.__module__ == target


def test_builtin_models_resolve_through_the_entry_point():
    from kd.models import resolve

    assert resolve("builtin:tokenizer").endswith("kd/demo/assets/tokenizer")
    assert resolve("some-org/some-model") == "some-org/some-model"


def test_the_layout_page_lists_every_module():
    import re

    table = (ROOT / "docs" / "layout.md").read_text()
    listed = set(re.findall(r"`(kd/[\w/]+\.py)`", table))
    modules = {str(p.relative_to(ROOT)) for p in KD.rglob("*.py")}
    assert modules - listed == set(), "docs/layout.md misses modules"
    assert listed - modules == set(), "docs/layout.md lists modules that do not exist"
